//! Node configuration: `cluster.toml`, environment variables and flags, validated before start.
//!
//! Precedence is file < environment < flag. Every section rejects unknown keys and checks its
//! values, and errors name the key (`consensus.election-timeout-min must be greater than ...`),
//! so a typo stops start-up instead of being ignored. `prism up` needs no file at all: the
//! defaults are a single node with replication factor 1 on loopback.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default HTTP address (ingestion, JSON queries, health).
pub const DEFAULT_HTTP: &str = "127.0.0.1:8088";
/// Default Arrow Flight address.
pub const DEFAULT_FLIGHT: &str = "127.0.0.1:8815";
/// Default Raft transport address.
pub const DEFAULT_RAFT: &str = "127.0.0.1:8089";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./prism-data";
/// The project created on first start.
pub const DEFAULT_PROJECT: &str = "default";

/// A configuration error that names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and line.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("`{key}`: {message}")]
    Invalid {
        /// The key, as written in `cluster.toml`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A human-readable duration in the file (`"250ms"`, `"10s"`, `"30d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{s}`: {e} (examples: 250ms, 10s, 30d)"
                ))
            })
    }
}

/// A human-readable size in the file (`"32KiB"`, `"64MiB"`, or a number of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"32KiB"`, `"1 MB"`, `"512"`.
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(1 << 20) && self.0 > 0 {
            s.serialize_str(&format!("{}MiB", self.0 >> 20))
        } else if self.0.is_multiple_of(1 << 10) && self.0 > 0 {
            s.serialize_str(&format!("{}KiB", self.0 >> 10))
        } else {
            s.serialize_str(&self.0.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size `{s}` (examples: 32KiB, 64MiB, 500000)"
                ))
            }),
        }
    }
}

/// `[node]`: who this node is and where it listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeSection {
    /// This node's id (unique in the cluster, > 0).
    pub id: u64,
    /// Where this node keeps its Raft log (`raft-wal/`), sled (`sled/`) and chunk bodies (`chunks/`).
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub http_listen: String,
    /// HTTP address other nodes and clients use (defaults to the listen address).
    pub http_advertise: Option<String>,
    /// Arrow Flight listen address.
    pub flight_listen: String,
    /// Arrow Flight address to advertise.
    pub flight_advertise: Option<String>,
    /// Raft (QUIC) listen address.
    pub raft_listen: String,
    /// Raft address to advertise.
    pub raft_advertise: Option<String>,
    /// Worker threads of the runtime that runs Raft, the transport, ingestion and HTTP (queries
    /// have their own, `query.threads`). Defaults to the number of cores.
    pub threads: usize,
}

impl Default for NodeSection {
    fn default() -> NodeSection {
        NodeSection {
            id: 1,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            http_listen: DEFAULT_HTTP.into(),
            http_advertise: None,
            flight_listen: DEFAULT_FLIGHT.into(),
            flight_advertise: None,
            raft_listen: DEFAULT_RAFT.into(),
            raft_advertise: None,
            threads: available_cores(),
        }
    }
}

/// The cores this process may run on (2 when that cannot be read).
fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// One member of the initial cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MemberConfig {
    /// Node id.
    pub id: u64,
    /// Its Raft address.
    pub raft: String,
    /// Its HTTP address.
    pub http: String,
    /// Its Flight address.
    pub flight: String,
}

/// `[cluster]`: partitioning and replication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterSection {
    /// Number of event partitions (Raft groups besides the metadata group). Default: 8 for a
    /// node alone, 16 when the file names several `initial-members`.
    pub partitions: u32,
    /// Replicas per partition. Default: 1 for a node alone; with several `initial-members`, 3
    /// (or every member, when fewer).
    pub replication_factor: u32,
    /// The nodes that form the cluster at initialization; empty means just this node.
    pub initial_members: Vec<MemberConfig>,
    /// Where the cluster's certificate authority lives (certificate and key). The first node
    /// to start creates it; every node issues its own certificate from it into
    /// `{data-dir}/tls/` on first start. Unused by a single node.
    pub ca_dir: PathBuf,
    /// The secret `prismctl` presents (`Authorization: Bearer`) to the admin API: required for
    /// every `/admin` request when set; without it, only read-only admin requests are allowed.
    pub admin_token: Option<String>,
}

/// `cluster.partitions` of a cluster whose file leaves it out: twice a node alone's, so three to
/// five members each lead several partitions and a moved partition is a small share of the data.
const CLUSTER_PARTITIONS: u32 = 16;

/// `cluster.replication-factor` of a cluster whose file leaves it out: a quorum of two survives
/// losing any one member.
const CLUSTER_REPLICATION_FACTOR: u32 = 3;

impl Default for ClusterSection {
    fn default() -> ClusterSection {
        ClusterSection {
            partitions: 8,
            replication_factor: 1,
            initial_members: Vec::new(),
            ca_dir: PathBuf::from("./data/cluster-ca"),
            admin_token: None,
        }
    }
}

/// `[consensus]`: Raft timing and log retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsensusSection {
    /// Leader heartbeat period.
    pub heartbeat_interval: HumanDuration,
    /// Minimum election timeout.
    pub election_timeout_min: HumanDuration,
    /// Maximum election timeout.
    pub election_timeout_max: HumanDuration,
    /// Log entries between snapshots (each group on each node takes its own count, from this
    /// to half as many again, so they do not all snapshot at once).
    pub snapshot_every_entries: u64,
    /// Log entries kept behind a snapshot.
    pub keep_entries_after_snapshot: u64,
}

impl Default for ConsensusSection {
    fn default() -> ConsensusSection {
        let d = optiprism_consensus::GroupConfig::default();
        ConsensusSection {
            heartbeat_interval: HumanDuration(d.heartbeat_interval),
            election_timeout_min: HumanDuration(d.election_timeout_min),
            election_timeout_max: HumanDuration(d.election_timeout_max),
            snapshot_every_entries: d.snapshot_every_entries,
            keep_entries_after_snapshot: d.keep_entries_after_snapshot,
        }
    }
}

/// `[ingest]`: limits of the HTTP ingestion API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct IngestSection {
    /// Largest accepted event (its JSON).
    pub max_event_size: ByteSize,
    /// Largest accepted request body (after decompression).
    pub max_batch_size: ByteSize,
    /// Oldest accepted event timestamp, relative to the time of receipt.
    pub max_event_age: HumanDuration,
    /// How far in the future an event may be.
    pub max_future_skew: HumanDuration,
    /// Differences between `sentAt` and the receive time smaller than this are network delay,
    /// not a client clock error, and are not corrected.
    pub clock_skew_threshold: HumanDuration,
    /// How long a partition that keeps receiving requests holds a proposal open for the next
    /// ones to join, while the next is due at the recent pace before it ends (a partition that
    /// has been idle proposes at once). Every Raft entry costs the same fixed CPU on every
    /// member, so at moderate load larger entries leave the cores room: at half load, a linger
    /// took about a fifth off three members' CPU and halved the p99 (`bench/notes.md`). A
    /// proposal stops lingering at three requests (unless they hold fewer than 256 events, as
    /// an SDK's small requests do), so this is a ceiling for slow paces: the
    /// default, 25 ms, gathers two more requests at 6 ms apart (a partition's pace at half load
    /// on the faster machine the benchmark has run on), and one at 12 to 25 ms apart (half load
    /// on the slower one), where a shorter linger gathered none and left the cores full. `0s`
    /// turns it off.
    pub linger: HumanDuration,
    /// Property keys a project's schema holds at most. A key first seen once the schema is full
    /// is not added: its values are still stored, as text, and queried like any other key's,
    /// and `/metrics` counts it. Write keys are public in browser SDKs, and a client sending
    /// made-up keys (an id used as a name) would otherwise grow the schema, which every member
    /// of the cluster keeps in memory and rewrites on each change, without end. Concurrent
    /// requests may each add up to the limit, so it can be passed by a few requests' keys.
    pub max_property_keys: u32,
}

impl Default for IngestSection {
    fn default() -> IngestSection {
        IngestSection {
            max_event_size: ByteSize(32 << 10),
            max_batch_size: ByteSize(500 << 10),
            max_event_age: HumanDuration(Duration::from_secs(10 * 366 * 86_400)),
            max_future_skew: HumanDuration(Duration::from_secs(86_400)),
            clock_skew_threshold: HumanDuration(Duration::from_secs(1)),
            linger: HumanDuration(Duration::from_millis(25)),
            max_property_keys: 10_000,
        }
    }
}

/// `[storage]`: when applied events are sealed into columnar chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StorageSection {
    /// Seal a partition's unsealed events once this many have accumulated.
    pub seal_rows: usize,
    /// Seal at least this often (bounds the Raft log and replay time). Shorter means smaller
    /// seals: each is a burst of CPU that held acknowledgements up on shared cores, so 5 s
    /// rather than 10 s halved the slow acknowledgements at half load of three members.
    pub seal_interval: HumanDuration,
}

impl Default for StorageSection {
    fn default() -> StorageSection {
        StorageSection {
            seal_rows: 131_072,
            seal_interval: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// `[query]`: the query engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuerySection {
    /// Threads of the query runtime (kept apart from the Raft and HTTP runtime).
    pub threads: usize,
}

impl Default for QuerySection {
    fn default() -> QuerySection {
        QuerySection {
            threads: available_cores(),
        }
    }
}

/// The whole node configuration (`cluster.toml`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// `[node]`.
    pub node: NodeSection,
    /// `[cluster]`.
    pub cluster: ClusterSection,
    /// `[consensus]`.
    pub consensus: ConsensusSection,
    /// `[ingest]`.
    pub ingest: IngestSection,
    /// `[storage]`.
    pub storage: StorageSection,
    /// `[query]`.
    pub query: QuerySection,
    /// Keys of the default project: pinned by flags, else generated on first start.
    #[serde(skip)]
    pub bootstrap: BootstrapKeys,
}

/// Keys of the default project given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootstrapKeys {
    /// Public write key for ingestion.
    pub write_key: Option<String>,
    /// Secret API token for queries.
    pub api_token: Option<String>,
}

/// The dotted key (`section.key`) whose value starts at byte `offset` of `text`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line = before.rsplit('\n').next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() {
        return None;
    }
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address (expected host:port, e.g. 127.0.0.1:8088)"),
        )
    })
}

impl NodeConfig {
    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        NodeConfig::from_toml(&text, path)
    }

    /// Parses TOML text (`path` only labels errors). Does not validate.
    pub fn from_toml(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let mut config = NodeConfig::parse_toml(text, path)?;
        config.apply_cluster_defaults(text);
        Ok(config)
    }

    /// A file that names several initial members gets a cluster's defaults for the `[cluster]`
    /// keys it leaves out (16 partitions, three replicas), where a node alone keeps 8 and one:
    /// otherwise a cluster whose file omits `replication-factor` would keep one copy of every
    /// event and lose events with any member.
    fn apply_cluster_defaults(&mut self, text: &str) {
        if !self.is_cluster() {
            return;
        }
        // The text parsed as a `NodeConfig` a moment ago, so it parses as a table too.
        let table: toml::Table = text.parse().unwrap_or_default();
        let given = |key: &str| table.get("cluster").and_then(|c| c.get(key)).is_some();
        if !given("partitions") {
            self.cluster.partitions = CLUSTER_PARTITIONS;
        }
        if !given("replication-factor") {
            let members = self.cluster.initial_members.len() as u32;
            self.cluster.replication_factor = CLUSTER_REPLICATION_FACTOR.min(members);
        }
    }

    /// Parses TOML text into a configuration, errors on one line naming the key.
    fn parse_toml(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message spans several lines (with a source excerpt): keep it to one line,
            // "line L, column C: <what>".
            let full = e.to_string();
            let excerpt = |l: &str| {
                l.split_once('|')
                    .is_some_and(|(gutter, _)| gutter.trim().chars().all(|c| c.is_ascii_digit()))
            };
            let what = full
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !excerpt(l))
                .unwrap_or("");
            let at = full
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("TOML parse error at "))
                .unwrap_or("");
            let mut message = if at.is_empty() {
                what.trim().to_string()
            } else {
                format!("{at}: {}", what.trim())
            };
            // A value's own error (bad size, bad duration) does not name its key: add it.
            if let Some(key) = e.span().and_then(|span| key_at(text, span.start))
                && !message.contains(&key)
            {
                message = format!("`{key}`: {message}");
            }
            ConfigError::Parse {
                path: path.into(),
                message,
            }
        })
    }

    /// The parsed HTTP listen address.
    pub fn http_addr(&self) -> SocketAddr {
        parse_addr("node.http-listen", &self.node.http_listen).expect("validated")
    }

    /// The parsed Flight listen address.
    pub fn flight_addr(&self) -> SocketAddr {
        parse_addr("node.flight-listen", &self.node.flight_listen).expect("validated")
    }

    /// Raft group timing derived from `[consensus]`.
    pub fn group_config(&self) -> optiprism_consensus::GroupConfig {
        optiprism_consensus::GroupConfig {
            heartbeat_interval: self.consensus.heartbeat_interval.0,
            election_timeout_min: self.consensus.election_timeout_min.0,
            election_timeout_max: self.consensus.election_timeout_max.0,
            snapshot_every_entries: self.consensus.snapshot_every_entries,
            keep_entries_after_snapshot: self.consensus.keep_entries_after_snapshot,
        }
    }

    /// Makes the file's `[node]` section this node's: `{id}` in `node.data-dir` becomes the
    /// node id, and in a cluster the node listens where its `initial-members` entry says the
    /// others reach it. Run before flags and environment apply, so they still win.
    pub fn resolve_node(&mut self) {
        let id = self.node.id;
        if let Some(path) = self.node.data_dir.to_str()
            && path.contains("{id}")
        {
            self.node.data_dir = PathBuf::from(path.replace("{id}", &id.to_string()));
        }
        if self.cluster.initial_members.len() > 1
            && let Some(m) = self.cluster.initial_members.iter().find(|m| m.id == id)
        {
            self.node.raft_listen = m.raft.clone();
            self.node.http_listen = m.http.clone();
            self.node.flight_listen = m.flight.clone();
        }
    }

    /// Whether this node is one of several initial members (rather than a cluster of one).
    pub fn is_cluster(&self) -> bool {
        self.cluster.initial_members.len() > 1
    }

    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id == 0 {
            return Err(invalid("node.id", "must be greater than 0"));
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(invalid("node.data-dir", "must not be empty"));
        }
        parse_addr("node.http-listen", &self.node.http_listen)?;
        parse_addr("node.flight-listen", &self.node.flight_listen)?;
        parse_addr("node.raft-listen", &self.node.raft_listen)?;
        for (key, value) in [
            ("node.http-advertise", &self.node.http_advertise),
            ("node.flight-advertise", &self.node.flight_advertise),
            ("node.raft-advertise", &self.node.raft_advertise),
        ] {
            if let Some(v) = value {
                parse_addr(key, v)?;
            }
        }
        let c = &self.cluster;
        if !(1..=1024).contains(&c.partitions) {
            return Err(invalid(
                "cluster.partitions",
                format!("{} is out of range 1..=1024", c.partitions),
            ));
        }
        if !(1..=7).contains(&c.replication_factor) {
            return Err(invalid(
                "cluster.replication-factor",
                format!("{} is out of range 1..=7", c.replication_factor),
            ));
        }
        let members = c.initial_members.len().max(1);
        if c.replication_factor as usize > members {
            return Err(invalid(
                "cluster.replication-factor",
                format!(
                    "{} is more than the {} initial member(s)",
                    c.replication_factor, members
                ),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, m) in c.initial_members.iter().enumerate() {
            let key = format!("cluster.initial-members[{i}]");
            if m.id == 0 || !ids.insert(m.id) {
                return Err(invalid(
                    &format!("{key}.id"),
                    format!("{} is zero or a duplicate", m.id),
                ));
            }
            parse_addr(&format!("{key}.raft"), &m.raft)?;
            parse_addr(&format!("{key}.http"), &m.http)?;
            parse_addr(&format!("{key}.flight"), &m.flight)?;
        }
        if c.initial_members.len() > 1 && c.ca_dir.as_os_str().is_empty() {
            return Err(invalid("cluster.ca-dir", "must not be empty"));
        }
        // In a cluster, a node outside the initial members is one joining later (it listens on
        // its [node] addresses and waits for `prismctl node add`).
        if c.initial_members.len() == 1 && !ids.contains(&self.node.id) {
            return Err(invalid(
                "node.id",
                format!("{} is not one of cluster.initial-members", self.node.id),
            ));
        }
        let k = &self.consensus;
        if k.heartbeat_interval.0.is_zero() {
            return Err(invalid(
                "consensus.heartbeat-interval",
                "must be greater than 0",
            ));
        }
        if k.election_timeout_min.0 <= k.heartbeat_interval.0 * 2 {
            return Err(invalid(
                "consensus.election-timeout-min",
                "must be more than twice consensus.heartbeat-interval",
            ));
        }
        if k.election_timeout_max.0 <= k.election_timeout_min.0 {
            return Err(invalid(
                "consensus.election-timeout-max",
                "must be greater than consensus.election-timeout-min",
            ));
        }
        if k.snapshot_every_entries == 0 {
            return Err(invalid(
                "consensus.snapshot-every-entries",
                "must be greater than 0",
            ));
        }
        let i = &self.ingest;
        if i.max_event_size.0 == 0 {
            return Err(invalid("ingest.max-event-size", "must be greater than 0"));
        }
        if i.max_batch_size.0 < i.max_event_size.0 {
            return Err(invalid(
                "ingest.max-batch-size",
                "must be at least ingest.max-event-size",
            ));
        }
        if i.max_batch_size.0 > 256 << 20 {
            return Err(invalid("ingest.max-batch-size", "must be at most 256MiB"));
        }
        if self.storage.seal_rows == 0 {
            return Err(invalid("storage.seal-rows", "must be greater than 0"));
        }
        if self.storage.seal_interval.0.is_zero() {
            return Err(invalid("storage.seal-interval", "must be greater than 0"));
        }
        if self.ingest.linger.0 > Duration::from_secs(1) {
            return Err(invalid("ingest.linger", "must be at most 1s"));
        }
        if self.ingest.max_property_keys == 0 {
            return Err(invalid("ingest.max-property-keys", "must be at least 1"));
        }
        if self.node.threads == 0 || self.node.threads > 256 {
            return Err(invalid("node.threads", "must be between 1 and 256"));
        }
        if self.query.threads == 0 || self.query.threads > 256 {
            return Err(invalid("query.threads", "must be between 1 and 256"));
        }
        if let Some(k) = &self.bootstrap.write_key {
            check_key("--write-key", k)?;
        }
        if let Some(k) = &self.bootstrap.api_token {
            check_key("--api-token", k)?;
        }
        Ok(())
    }
}

fn check_key(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.len() < 8
        || value.len() > 128
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(invalid(
            key,
            "must be 8 to 128 characters of letters, digits, `_`, `-` or `.`",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    /// The validation error of the configuration `toml`, which must parse.
    fn invalid_because(toml: &str) -> String {
        NodeConfig::from_toml(toml, Path::new("x.toml"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = NodeConfig::from_toml("[node]\nidd = 1\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `idd`"), "{e}");
        for (toml, key) in [
            ("[node]\nhttp-listen = \"nope\"\n", "node.http-listen"),
            ("[cluster]\npartitions = 0\n", "cluster.partitions"),
            ("[node]\nthreads = 0\n", "node.threads"),
            ("[ingest]\nlinger = \"2s\"\n", "ingest.linger"),
            (
                "[ingest]\nmax-property-keys = 0\n",
                "ingest.max-property-keys",
            ),
            (
                "[consensus]\nheartbeat-interval = \"1s\"\nelection-timeout-min = \"1s\"\n",
                "consensus.election-timeout-min",
            ),
        ] {
            let e = invalid_because(toml);
            assert!(e.contains(key), "{toml}: {e}");
        }
        let e = NodeConfig::from_toml(
            "[ingest]\nmax-event-size = \"12 parsecs\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
    }

    #[test]
    fn a_cluster_file_gets_cluster_defaults_for_the_keys_it_leaves_out() {
        let members = |n: u64| -> String {
            (1..=n)
                .map(|i| {
                    format!(
                        "[[cluster.initial-members]]\nid = {i}\nraft = \"127.0.0.{i}:7001\"\n\
                         http = \"127.0.0.{i}:8080\"\nflight = \"127.0.0.{i}:8081\"\n"
                    )
                })
                .collect()
        };
        let parse = |text: &str| NodeConfig::from_toml(text, Path::new("x.toml")).unwrap();
        let alone = parse("[cluster]\n");
        assert_eq!(
            (alone.cluster.partitions, alone.cluster.replication_factor),
            (8, 1)
        );
        let three = parse(&members(3));
        assert_eq!(
            (three.cluster.partitions, three.cluster.replication_factor),
            (16, 3)
        );
        three.validate().unwrap();
        let two = parse(&members(2));
        assert_eq!(two.cluster.replication_factor, 2);
        let five = parse(&members(5));
        assert_eq!(five.cluster.replication_factor, 3);
        // Keys the file gives win.
        let given = parse(&format!(
            "[cluster]\npartitions = 4\nreplication-factor = 1\n{}",
            members(3)
        ));
        assert_eq!(
            (given.cluster.partitions, given.cluster.replication_factor),
            (4, 1)
        );
    }

    #[test]
    fn sizes_and_durations_round_trip() {
        let config = NodeConfig::default();
        let text = toml::to_string(&config).unwrap();
        let back = NodeConfig::from_toml(&text, Path::new("x.toml")).unwrap();
        assert_eq!(config, back);
        assert_eq!(ByteSize::parse("32KiB"), Some(ByteSize(32768)));
        assert_eq!(ByteSize::parse("bogus"), None);
    }
}
