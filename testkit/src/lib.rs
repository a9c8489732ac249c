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
/// The admin token (`cluster.admin-token`) of every test cluster.
pub const ADMIN_TOKEN: &str = "adm_test_0123456789";

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

/// The HTTP client test nodes are driven with.
fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("addr")
        .port()
}

/// How a test node is started.
#[derive(Debug, Clone)]
enum Launch {
    /// `prism up` on fresh ports each start.
    Up,
    /// `prism node --config <file> --id <id>`: a cluster member on its configured addresses.
    Member { config: PathBuf, id: u64 },
}

/// A running `prism` process: `prism up`, or a member of a [`TestCluster`].
#[derive(Debug)]
pub struct TestNode {
    child: Option<Child>,
    launch: Launch,
    /// `http://127.0.0.1:<port>`.
    pub http: String,
    /// `127.0.0.1:<port>` of Arrow Flight.
    pub flight: String,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    /// The largest file the process may write, in 512-byte blocks (`ulimit -f`), if limited.
    file_size_limit: Option<u64>,
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
        TestNode::start_up(extra, None)
    }

    /// Starts a node whose writes past `blocks` 512-byte blocks of any one file fail with
    /// `EFBIG` (`ulimit -f`, `SIGXFSZ` ignored): a disk that refuses writes, for the real
    /// process and its real error paths. [`TestNode::set_file_size_limit`] lifts it for the
    /// next start.
    pub fn start_with_file_size_limit(extra: &[&str], blocks: u64) -> TestNode {
        TestNode::start_up(extra, Some(blocks))
    }

    fn start_up(extra: &[&str], file_size_limit: Option<u64>) -> TestNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut node = TestNode {
            child: None,
            launch: Launch::Up,
            http: String::new(),
            flight: String::new(),
            data_dir: tmp.path().join("data"),
            log: tmp.path().join("prism.log"),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            file_size_limit,
            _tmp: tmp,
            client: http_client(),
        };
        node.spawn();
        node
    }

    /// The file size limit of the next start (see [`TestNode::start_with_file_size_limit`]).
    pub fn set_file_size_limit(&mut self, blocks: Option<u64>) {
        self.file_size_limit = blocks;
    }

    fn spawn(&mut self) {
        // A port `free_port` found free can be taken by another process before prism binds
        // it; `prism up` then exits at once saying so, and starts again on fresh ports.
        for _ in 0..2 {
            self.spawn_process();
            match self.ready_or_exited() {
                Ok(()) => return,
                Err(log)
                    if matches!(self.launch, Launch::Up)
                        && log.contains("Address already in use") =>
                {
                    self.child = None;
                }
                Err(log) => panic!("{log}"),
            }
        }
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = match self.file_size_limit {
            None => Command::new(prism_binary()),
            Some(blocks) => {
                // An ignored signal stays ignored across `exec`, and so does the limit.
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    "trap '' XFSZ; ulimit -f \"$1\" || exit 1; shift; exec \"$@\"",
                    "sh",
                    &blocks.to_string(),
                ])
                .arg(prism_binary());
                sh
            }
        };
        match &self.launch {
            Launch::Up => {
                let (http, flight) = (free_port(), free_port());
                self.http = format!("http://127.0.0.1:{http}");
                self.flight = format!("127.0.0.1:{flight}");
                command
                    .arg("up")
                    .arg("--data-dir")
                    .arg(&self.data_dir)
                    .args([
                        "--http",
                        &format!("127.0.0.1:{http}"),
                        "--flight",
                        &format!("127.0.0.1:{flight}"),
                    ]);
            }
            Launch::Member { config, id } => {
                command
                    .arg("node")
                    .arg("--config")
                    .arg(config)
                    .args(["--id", &id.to_string()]);
            }
        }
        let child = command
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
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (not killed or stopped by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// GETs a path; returns the status and the body as text.
    pub fn get(&self, path: &str) -> (u16, String) {
        match self.client.get(format!("{}{path}", self.http)).send() {
            Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the node answers `/readyz` (panics with its log after two minutes, or if
    /// it exits).
    pub fn wait_ready(&mut self) {
        if let Err(message) = self.ready_or_exited() {
            panic!("{message}");
        }
    }

    /// Waits until the node answers `/readyz`; fails with its log if it exits first (panics
    /// after two minutes).
    fn ready_or_exited(&mut self) -> Result<(), String> {
        self.starting_until("was not ready", |node| {
            node.client
                .get(format!("{}/readyz", node.http))
                .send()
                .is_ok_and(|r| r.status().is_success())
        })
    }

    /// Waits until a node outside the initial members has its ports and waits to be added (it
    /// serves HTTP only once added, so its log says when); fails with its log if it exits first
    /// (panics after two minutes).
    fn waiting_to_join_or_exited(&mut self) -> Result<(), String> {
        self.starting_until("did not wait to be added", |node| {
            node.log().contains("is not a member yet")
        })
    }

    /// Polls `started` until it holds while the process still runs; `Err` with the log once the
    /// process has exited, a panic saying the node `failed_to` after two minutes.
    fn starting_until(
        &mut self,
        failed_to: &str,
        started: impl Fn(&TestNode) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done = started(self);
            // Checked after asking: another test's node on a port this one failed to take can
            // answer too, and only a child still running counts.
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "prism exited with {status} while starting:\n{}",
                    self.log()
                ));
            }
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!("prism {failed_to} within 120 s:\n{}", self.log());
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

    /// Starts the process again on the same data directory (new ports for `prism up`, the
    /// configured ones for a cluster member).
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
        self.post_json(path, body, |r| r.basic_auth(WRITE_KEY, Some("")))
    }

    /// POSTs a JSON body to an admin path with the cluster's admin token.
    pub fn post_admin(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.post_json(path, body, |r| r.bearer_auth(ADMIN_TOKEN))
    }

    /// POSTs a JSON body with the credentials `auth` adds; returns the status and the JSON
    /// answer (or Null).
    fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        auth: impl FnOnce(reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder,
    ) -> (u16, serde_json::Value) {
        let request = auth(self.client.post(format!("{}{path}", self.http)))
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

/// A port on `ip` that was free a moment ago for both TCP and UDP (QUIC uses UDP).
pub fn free_port_on(ip: &str) -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind((ip, 0)).expect("bind tcp :0");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// A cluster of real `prism node` processes, member `i` (from 1) listening on `127.0.0.i` on
/// ports chosen free at run time, sharing one cluster CA, all killed when dropped.
#[derive(Debug)]
pub struct TestCluster {
    /// The members, `nodes[i - 1]` being node `i`.
    pub nodes: Vec<TestNode>,
    /// The cluster's `cluster.toml`.
    pub config: PathBuf,
    _tmp: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `members` nodes with `partitions` partitions, replicated on every member, and
    /// waits until every one is ready.
    pub fn start(members: u64, partitions: u32) -> TestCluster {
        TestCluster::start_with(members, partitions, "")
    }

    /// [`TestCluster::start`] with more `[consensus]` settings (TOML lines).
    pub fn start_with(members: u64, partitions: u32, consensus: &str) -> TestCluster {
        TestCluster::start_placed(members, partitions, members as u32, consensus)
    }

    /// [`TestCluster::start_with`] with each partition on `replication_factor` members.
    pub fn start_placed(
        members: u64,
        partitions: u32,
        replication_factor: u32,
        consensus: &str,
    ) -> TestCluster {
        // A port `free_port_on` found free can be taken by another test's process before a
        // member binds it; the member then exits saying so, and the whole cluster starts again
        // on fresh ports (the members' addresses are in their shared `cluster.toml`).
        let mut attempts = 0;
        loop {
            attempts += 1;
            match TestCluster::try_start_placed(members, partitions, replication_factor, consensus)
            {
                Ok(cluster) => return cluster,
                Err(log) if attempts < 3 && log.contains("Address already in use") => {}
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// One attempt of [`TestCluster::start_placed`]: `Err` with the log of a member that exited
    /// while starting (the members started are killed as they drop).
    fn try_start_placed(
        members: u64,
        partitions: u32,
        replication_factor: u32,
        consensus: &str,
    ) -> Result<TestCluster, String> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut toml = format!(
            "[node]\ndata-dir = \"{data}/node-{{id}}\"\n\n[cluster]\npartitions = {partitions}\nreplication-factor = {replication_factor}\nca-dir = \"{data}/ca\"\nadmin-token = \"{ADMIN_TOKEN}\"\n\n[consensus]\nheartbeat-interval = \"200ms\"\nelection-timeout-min = \"1000ms\"\nelection-timeout-max = \"2000ms\"\n{consensus}\n",
            data = tmp.path().display()
        );
        let mut nodes = Vec::new();
        for id in 1..=members {
            let ip = format!("127.0.0.{id}");
            let (raft, http, flight) = (free_port_on(&ip), free_port_on(&ip), free_port_on(&ip));
            toml.push_str(&format!(
                "\n[[cluster.initial-members]]\nid = {id}\nraft = \"{ip}:{raft}\"\nhttp = \"{ip}:{http}\"\nflight = \"{ip}:{flight}\"\n"
            ));
            nodes.push(TestNode {
                child: None,
                launch: Launch::Member {
                    config: tmp.path().join("cluster.toml"),
                    id,
                },
                http: format!("http://{ip}:{http}"),
                flight: format!("{ip}:{flight}"),
                data_dir: tmp.path().join(format!("node-{id}")),
                log: tmp.path().join(format!("node-{id}.log")),
                extra_args: Vec::new(),
                file_size_limit: None,
                _tmp: tempfile::tempdir().expect("tempdir"),
                client: http_client(),
            });
        }
        let config = tmp.path().join("cluster.toml");
        std::fs::write(&config, toml).expect("write cluster.toml");
        // All at once: each waits for a quorum of the others before it is ready.
        nodes.iter_mut().for_each(TestNode::spawn_process);
        for node in &mut nodes {
            node.ready_or_exited()?;
        }
        Ok(TestCluster {
            nodes,
            config,
            _tmp: tmp,
        })
    }

    /// Starts node `id` (the next id after the members) on `127.0.0.{id}`, outside the initial
    /// members: it waits to be added (`prismctl node add`) and is not ready before. Returns once
    /// it waits so, with its raft, HTTP and Flight addresses; it becomes `node(id)`.
    pub fn start_joining(&mut self, id: u64) -> [String; 3] {
        assert_eq!(
            id as usize,
            self.nodes.len() + 1,
            "joining nodes take the next id"
        );
        // As for the initial members: a port found free can be taken by another test's process
        // before the node binds it, and then the node starts again on fresh ports.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (addrs, mut node) = self.joining_node(id);
            node.spawn_process();
            match node.waiting_to_join_or_exited() {
                Ok(()) => {
                    self.nodes.push(node);
                    return addrs;
                }
                Err(log) if attempts < 3 && log.contains("Address already in use") => {}
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// Node `id` on fresh ports of `127.0.0.{id}`, not started.
    fn joining_node(&self, id: u64) -> ([String; 3], TestNode) {
        let dir = self.config.parent().expect("cluster dir").to_path_buf();
        let ip = format!("127.0.0.{id}");
        let addrs = [
            format!("{ip}:{}", free_port_on(&ip)),
            format!("{ip}:{}", free_port_on(&ip)),
            format!("{ip}:{}", free_port_on(&ip)),
        ];
        let node = TestNode {
            child: None,
            launch: Launch::Member {
                config: self.config.clone(),
                id,
            },
            http: format!("http://{}", addrs[1]),
            flight: addrs[2].clone(),
            data_dir: dir.join(format!("node-{id}")),
            log: dir.join(format!("node-{id}.log")),
            extra_args: vec![
                "--raft".into(),
                addrs[0].clone(),
                "--http".into(),
                addrs[1].clone(),
                "--flight".into(),
                addrs[2].clone(),
            ],
            file_size_limit: None,
            _tmp: tempfile::tempdir().expect("tempdir"),
            client: http_client(),
        };
        (addrs, node)
    }

    /// Member `id` (from 1).
    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[id as usize - 1]
    }

    /// Member `id` (from 1), to kill or restart.
    pub fn node_mut(&mut self, id: u64) -> &mut TestNode {
        &mut self.nodes[id as usize - 1]
    }

    /// The running member that leads the most groups, by its `/metrics`.
    pub fn busiest_leader(&self) -> u64 {
        let led = |node: &TestNode| {
            node.get("/metrics")
                .1
                .lines()
                .filter(|l| l.starts_with("optiprism_consensus_is_leader{") && l.ends_with(" 1"))
                .count()
        };
        (1..=self.nodes.len() as u64)
            .filter(|&id| self.node(id).is_running())
            .max_by_key(|&id| led(self.node(id)))
            .expect("a running member")
    }

    /// A per-group gauge of member `id`'s `/metrics` (`None` when absent or unreachable).
    pub fn gauge(&self, id: u64, name: &str, group: &str) -> Option<u64> {
        let prefix = format!("{name}{{group=\"{group}\"}} ");
        self.node(id)
            .get("/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
    }

    /// Every member's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {} ---\n{}", i + 1, n.log()))
            .collect()
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

/// Batch `b` of `n` events with message ids `{tag}{b}-{i}`, each with a property of 96 hex
/// digits that neither the dictionaries nor LZ4 shrink much: for filling a node's files.
pub fn incompressible_batch(
    tag: &str,
    b: usize,
    n: usize,
) -> (Vec<String>, Vec<serde_json::Value>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}{b}-{i}")).collect();
    let events = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let pad: String = (1..=6u64)
                .map(|k| {
                    let x = (b * n + i) as u64 + k;
                    format!("{:016x}", x.wrapping_mul(0x9e37_79b9_7f4a_7c15 ^ k))
                })
                .collect();
            serde_json::json!({"type": "track", "userId": format!("u{}", i % 50), "event": "tick",
                   "messageId": id, "timestamp": "2024-02-01T10:00:00Z", "properties": {"pad": pad}})
        })
        .collect();
    (ids, events)
}

/// Polls `done` every 200 ms until it holds; panics with `what` after a minute. For conditions
/// that a node reaches on its own (a retry, an election), not for timing anything.
pub fn eventually(what: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("not after a minute: {}", what());
}

/// A node's chunk directory replaced by a plain file, so every seal's write fails while the
/// Raft log (elsewhere in the data directory) works: a disk that refuses one kind of write.
#[derive(Debug)]
pub struct UnwritableChunks {
    chunks: PathBuf,
    partition_dirs: Vec<std::ffi::OsString>,
}

impl UnwritableChunks {
    /// Replaces `data_dir`'s `chunks` directory (and the partitions' directories in it) by a
    /// file.
    pub fn make(data_dir: &Path) -> UnwritableChunks {
        let chunks = data_dir.join("chunks");
        let partition_dirs = std::fs::read_dir(&chunks)
            .expect("list the chunks directory")
            .map(|d| d.expect("list the chunks directory").file_name())
            .collect();
        std::fs::remove_dir_all(&chunks).expect("remove the chunks directory");
        std::fs::write(&chunks, b"not a directory").expect("put a file in its place");
        UnwritableChunks {
            chunks,
            partition_dirs,
        }
    }

    /// Puts the directories back, empty, as a disk that takes writes again.
    pub fn restore(&self) {
        std::fs::remove_file(&self.chunks).expect("remove the file");
        for dir in &self.partition_dirs {
            std::fs::create_dir_all(self.chunks.join(dir)).expect("recreate the chunks directory");
        }
    }

    /// The chunks directory.
    pub fn path(&self) -> &Path {
        &self.chunks
    }
}
