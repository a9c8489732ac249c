//! Test harness: real `prism` processes on free loopback ports, Flight clients, and a Python
//! virtual environment with the real SDKs and Arrow clients.
//!
//! A [`TestNode`] binds nothing itself: it picks free ports, starts the binary, waits for
//! `/readyz`, and kills the process when dropped, so a failing test never leaves a node behind.

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The write key every test node uses.
pub const WRITE_KEY: &str = "wk_test_0123456789";
/// The API token every test node uses.
pub const API_TOKEN: &str = "pat_test_0123456789";

/// The `prism` binary: `$OPTIPRISM_PRISM_BIN`, else next to the running test's target dir.
pub fn prism_binary() -> PathBuf {
    if let Ok(p) = std::env::var("OPTIPRISM_PRISM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/prism
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("prism")
}

/// The directory of the crate whose tests are running. Read when the test runs, not when it
/// was compiled: a shared target directory may hold a test binary built from another clone
/// (CI builds each run in a fresh one), whose compile-time path no longer exists.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .expect("cargo sets CARGO_MANIFEST_DIR when it runs tests")
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `prism up` process.
#[derive(Debug)]
pub struct TestNode {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub http: String,
    /// `127.0.0.1:<port>` of Arrow Flight.
    pub flight: String,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    _tmp: tempfile::TempDir,
    client: reqwest::blocking::Client,
}

impl TestNode {
    /// Starts a node with a fresh data directory.
    pub fn start() -> TestNode {
        TestNode::start_with(&[])
    }

    /// Starts a node with extra `prism up` arguments.
    pub fn start_with(extra: &[&str]) -> TestNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut node = TestNode {
            child: None,
            http: String::new(),
            flight: String::new(),
            data_dir: tmp.path().join("data"),
            log: tmp.path().join("prism.log"),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp,
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let (http, flight) = (free_port(), free_port());
        self.http = format!("http://127.0.0.1:{http}");
        self.flight = format!("127.0.0.1:{flight}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(prism_binary())
            .arg("up")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--http",
                &format!("127.0.0.1:{http}"),
                "--flight",
                &format!("127.0.0.1:{flight}"),
            ])
            .args(["--write-key", WRITE_KEY, "--api-token", API_TOKEN])
            .args(&self.extra_args)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (build it with `cargo build --bin prism`)",
                    prism_binary().display()
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("prism exited with {status} while starting:\n{}", self.log());
            }
            if let Ok(r) = self.client.get(format!("{}/readyz", self.http)).send()
                && r.status().is_success()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("prism was not ready within 120 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`: no shutdown, no flush beyond what acknowledged writes already did.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the ordered shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("prism did not stop within 60 s of SIGTERM:\n{}", self.log());
        }
    }

    /// Starts the process again on the same data directory (new ports).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// POSTs raw bytes to a path; returns the status and the JSON body (or Null).
    pub fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let mut request = self.client.post(format!("{}{path}", self.http)).body(body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().expect("request");
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// POSTs JSON with the write key as Basic auth.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let request = self
            .client
            .post(format!("{}{path}", self.http))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .expect("request");
        let status = request.status().as_u16();
        (status, request.json().unwrap_or(serde_json::Value::Null))
    }

    /// Runs a JSON query over HTTP.
    pub fn query(&self, query: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(format!("{}/api/v1/projects/default/query", self.http))
            .bearer_auth(API_TOKEN)
            .json(query)
            .send()
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(serde_json::Value::Null))
    }

    /// Runs SQL over Flight SQL.
    pub fn sql(&self, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
        flight_sql(&self.flight, API_TOKEN, sql)
    }

    /// Runs a JSON insight query over a plain Flight `DoGet`.
    pub fn flight_query(&self, query: &serde_json::Value) -> anyhow::Result<Vec<RecordBatch>> {
        flight_ticket(&self.flight, API_TOKEN, serde_json::to_vec(query)?)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn channel(addr: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    )
}

/// Runs SQL over Flight SQL (statement, not prepared).
pub fn flight_sql(addr: &str, token: &str, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    use futures::TryStreamExt;
    runtime().block_on(async {
        let mut client =
            arrow_flight::sql::client::FlightSqlServiceClient::new(channel(addr).await?);
        client.set_token(token.to_string());
        let info = client.execute(sql.to_string(), None).await?;
        let mut out = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.context("endpoint without ticket")?;
            let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
            out.extend(batches);
        }
        Ok(out)
    })
}

/// Redeems a raw ticket with `DoGet`.
pub fn flight_ticket(addr: &str, token: &str, ticket: Vec<u8>) -> anyhow::Result<Vec<RecordBatch>> {
    use futures::TryStreamExt;
    runtime().block_on(async {
        let inner =
            arrow_flight::flight_service_client::FlightServiceClient::new(channel(addr).await?);
        let mut client = arrow_flight::FlightClient::new_from_inner(inner);
        client.add_header("authorization", &format!("Bearer {token}"))?;
        let stream = client.do_get(arrow_flight::Ticket::new(ticket)).await?;
        Ok(stream.try_collect().await?)
    })
}

/// The Python interpreter of a virtual environment holding `requirements.txt`, created on first
/// use (under `$OPTIPRISM_VENV`, default `~/.cache/optiprism/venv`) and shared by test processes.
pub fn python() -> anyhow::Result<PathBuf> {
    let venv = std::env::var("OPTIPRISM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
            PathBuf::from(home).join(".cache/optiprism/venv")
        });
    let python = venv.join("bin/python");
    let requirements = include_str!("../requirements.txt");
    let stamp = venv.join(".optiprism-requirements");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(requirements) {
        return Ok(python);
    }
    std::fs::create_dir_all(venv.parent().unwrap_or(Path::new("/tmp")))?;
    // Test processes race to create it: a lock directory serializes them.
    let lock = venv.with_extension("lock");
    let deadline = Instant::now() + Duration::from_secs(900);
    while std::fs::create_dir(&lock).is_err() {
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {} (remove it if no test is running)",
                lock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let result = (|| {
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(requirements) {
            return Ok(());
        }
        if !python.exists() {
            let status = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .context("python3 -m venv")?;
            if !status.success() {
                bail!("python3 -m venv {} failed", venv.display());
            }
        }
        let req_file = venv.join("requirements.txt");
        std::fs::write(&req_file, requirements)?;
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&req_file)
            .status()
            .context("pip install")?;
        if !status.success() {
            bail!("pip install -r {} failed", req_file.display());
        }
        std::fs::write(&stamp, requirements)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir(&lock);
    result.map(|()| python)
}

/// Runs a Python script with the venv's interpreter; returns stdout, failing with stderr.
pub fn run_python(script: &str, args: &[&str]) -> anyhow::Result<String> {
    let python = python()?;
    let output = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!(
            "python failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}
