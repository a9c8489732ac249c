//! The cluster's certificate authority, each node's certificate, and the rustls configurations
//! of mutual TLS between nodes.
//!
//! One CA per cluster signs one certificate per node. A node's certificate names it twice: its
//! subject alternative name is `node-{id}.optiprism`, which a connecting node checks against the
//! node it means to reach, and the server maps the certificate a peer presents back to the
//! peer's node id. A peer whose certificate was not signed by the cluster's CA is refused during
//! the handshake. Only TLS 1.3 (which QUIC requires) on the `ring` provider.
//!
//! Files, in a node's `tls/` directory: `ca.pem` (the CA certificate), `node.pem` and `node.key`
//! (its own certificate and key, the key readable by the owner only). The CA's key (`ca.key`)
//! stays wherever the CA was made: whoever holds it can add nodes.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol of Raft traffic between nodes.
pub const ALPN: &[u8] = b"optiprism-raft/1";

/// Something went wrong making, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Making or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The DNS name in node `id`'s certificate.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.optiprism")
}

/// The node id a certificate was issued to, read from its `node-{id}.optiprism` name.
pub fn node_of_certificate(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => dns
            .strip_prefix("node-")?
            .strip_suffix(".optiprism")?
            .parse()
            .ok(),
        _ => None,
    })
}

/// A cluster's certificate authority: its certificate and signing key.
#[derive(Debug, Clone)]
pub struct ClusterCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA key, PEM.
    pub key_pem: String,
}

impl ClusterCa {
    /// A new CA for the cluster named `cluster`.
    pub fn generate(cluster: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("optiprism cluster {cluster} CA"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues node `id`'s certificate.
    pub fn issue(&self, id: u64) -> Result<NodeIdentity, TlsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node_name(id)])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("optiprism node {id}"));
        params.subject_alt_names = vec![SanType::DnsName(node_name(id).try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every node is both a server (peers connect to it) and a client (it connects to them).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeIdentity {
            node_id: id,
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` and `ca.key` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        create_dir(dir)?;
        write(&dir.join("ca.pem"), &self.cert_pem, false)?;
        write(&dir.join("ca.key"), &self.key_pem, true)
    }

    /// Reads what [`ClusterCa::save`] wrote.
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        Ok(ClusterCa {
            cert_pem: read(&dir.join("ca.pem"))?,
            key_pem: read(&dir.join("ca.key"))?,
        })
    }
}

/// What a node needs for mutual TLS: the CA it trusts, and its own certificate and key.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node.
    pub node_id: u64,
    /// The cluster CA's certificate, PEM.
    pub ca_pem: String,
    /// This node's certificate, PEM.
    pub cert_pem: String,
    /// This node's key, PEM.
    pub key_pem: String,
}

impl NodeIdentity {
    /// Writes `ca.pem`, `node.pem` and `node.key` (owner-only) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        create_dir(dir)?;
        write(&dir.join("ca.pem"), &self.ca_pem, false)?;
        write(&dir.join("node.pem"), &self.cert_pem, false)?;
        write(&dir.join("node.key"), &self.key_pem, true)
    }

    /// Reads what [`NodeIdentity::save`] wrote, and checks that the certificate is node
    /// `expected`'s.
    pub fn load(dir: &Path, expected: u64) -> Result<NodeIdentity, TlsError> {
        let identity = NodeIdentity {
            node_id: expected,
            ca_pem: read(&dir.join("ca.pem"))?,
            cert_pem: read(&dir.join("node.pem"))?,
            key_pem: read(&dir.join("node.key"))?,
        };
        let path = dir.join("node.pem");
        let der = identity.cert_der(&path)?;
        match node_of_certificate(&der) {
            Some(id) if id == expected => Ok(identity),
            Some(id) => Err(TlsError::Invalid {
                path,
                message: format!("the certificate is node {id}'s, not node {expected}'s"),
            }),
            None => Err(TlsError::Invalid {
                path,
                message: "the certificate names no optiprism node".into(),
            }),
        }
    }

    fn cert_der(&self, path: &Path) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| invalid(path, "certificate", e))
    }

    fn parts(
        &self,
    ) -> Result<
        (
            Arc<rustls::RootCertStore>,
            CertificateDer<'static>,
            PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| invalid(Path::new("ca.pem"), "certificate", e))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        let cert = self.cert_der(Path::new("node.pem"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| invalid(Path::new("node.key"), "private key", e))?;
        Ok((Arc::new(roots), cert, key))
    }

    /// The server side: presents this node's certificate and requires a client certificate
    /// signed by the cluster CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let (roots, cert, key) = self.parts()?;
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }

    /// The client side: trusts only the cluster CA and presents this node's certificate.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let (roots, cert, key) = self.parts()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Connection settings shared by both sides: keep-alives well inside the idle timeout, so a
/// quiet connection between live nodes never times out, while a dead peer is noticed in seconds.
fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(5)).expect("5 s fits"),
    ));
    // One stream per RPC: room for every group's heartbeats and appends at once.
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    transport
}

fn invalid(path: &Path, what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        message: format!("no readable {what}: {e}"),
    }
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write;
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(io)
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_node_and_survive_a_round_trip_through_files() {
        let ca = ClusterCa::generate("test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = ca.issue(7).unwrap();
        node.save(dir.path()).unwrap();
        let back = NodeIdentity::load(dir.path(), 7).unwrap();
        let der = back.cert_der(Path::new("node.pem")).unwrap();
        assert_eq!(node_of_certificate(&der), Some(7));
        let wrong = NodeIdentity::load(dir.path(), 8).unwrap_err().to_string();
        assert!(wrong.contains("node 7's, not node 8's"), "{wrong}");
        back.server_config().unwrap();
        back.client_config().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("node.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is the owner's only");
        }
    }
}
