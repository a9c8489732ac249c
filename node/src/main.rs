//! `prism`: the Optiprism node binary. Parses the command line, sets up logging and calls
//! `optiprism_node::run`.

use clap::{Args, Parser, Subcommand};

// glibc's allocator spent a third of ingestion's CPU in malloc/free across the runtime threads
// (measured with perf); mimalloc's per-thread heaps remove most of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use optiprism_node::config::{DEFAULT_FLIGHT, DEFAULT_HTTP, NodeConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Optiprism: self-hosted product analytics.
#[derive(Debug, Parser)]
#[command(name = "prism", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a single node with embedded defaults (no config file needed).
    ///
    /// Creates the data directory, a default project with its write key and API token, and a
    /// single-node cluster, then prints the addresses and keys. Ctrl-C stops it in order; every
    /// acknowledged event is there after a restart.
    Up(UpArgs),
    /// Start a node from a `cluster.toml` (flags and environment override the file).
    Node(NodeArgs),
    /// Validate a `cluster.toml` and print it with every default filled in.
    CheckConfig {
        /// The file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
struct Overrides {
    /// Data directory (the Raft log, sled and chunk files live here).
    #[arg(long, env = "OPTIPRISM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address (ingestion, JSON queries, health) [default: 127.0.0.1:8088].
    #[arg(long, env = "OPTIPRISM_HTTP")]
    http: Option<String>,
    /// Arrow Flight listen address [default: 127.0.0.1:8815].
    #[arg(long, env = "OPTIPRISM_FLIGHT")]
    flight: Option<String>,
    /// Raft (QUIC) listen address of a cluster node that is not an initial member (one added
    /// later with `prismctl node add`) [default: 127.0.0.1:8089].
    #[arg(long, env = "OPTIPRISM_RAFT")]
    raft: Option<String>,
    /// Write key of the default project (generated on first start if not given).
    #[arg(long, env = "OPTIPRISM_WRITE_KEY")]
    write_key: Option<String>,
    /// API token of the default project (generated on first start if not given).
    #[arg(long, env = "OPTIPRISM_API_TOKEN")]
    api_token: Option<String>,
    /// Number of partitions (only when creating the data directory).
    #[arg(long, env = "OPTIPRISM_PARTITIONS")]
    partitions: Option<u32>,
    /// Log filter, e.g. `info` or `optiprism_node=debug`.
    #[arg(long, env = "OPTIPRISM_LOG", default_value = "info,openraft=warn")]
    log: String,
    /// Log format on stderr: `text` for people, `json` (one object per line, with every field
    /// of the event) for log collectors.
    #[arg(long, env = "OPTIPRISM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Let the kernel back this process's memory with transparent huge pages. Off by default:
    /// ingestion grows the heap steadily, and each 2 MiB page first touched is cleared in one
    /// go while the thread that touched it waits (on a virtual machine often for milliseconds,
    /// the host backing it too), which held up acknowledgements and cost a third of a
    /// three-node cluster's CPU in our benchmark. Large query-only nodes on bare metal may
    /// prefer them.
    #[arg(long, env = "OPTIPRISM_HUGE_PAGES")]
    huge_pages: bool,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Optional config file; flags and environment override it.
    #[arg(long, short, env = "OPTIPRISM_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// The cluster configuration file.
    #[arg(long, short, env = "OPTIPRISM_CONFIG")]
    config: PathBuf,
    /// This node's id (overrides `node.id`).
    #[arg(long)]
    id: Option<u64>,
    #[command(flatten)]
    overrides: Overrides,
}

fn apply(mut config: NodeConfig, o: &Overrides) -> NodeConfig {
    if let Some(d) = &o.data_dir {
        config.node.data_dir = d.clone();
    }
    if let Some(h) = &o.http {
        config.node.http_listen = h.clone();
    }
    if let Some(f) = &o.flight {
        config.node.flight_listen = f.clone();
    }
    if let Some(r) = &o.raft {
        config.node.raft_listen = r.clone();
    }
    if let Some(p) = o.partitions {
        config.cluster.partitions = p;
    }
    config.bootstrap.write_key = o.write_key.clone();
    config.bootstrap.api_token = o.api_token.clone();
    config
}

fn init_tracing(o: &Overrides) {
    let filter = tracing_subscriber::EnvFilter::try_new(&o.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match o.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
}

/// Opts this process out of transparent huge pages (see `--huge-pages`), when the kernel
/// allows it; without the call the system's policy applies. The one `unsafe` of the
/// workspace: libc's `prctl` is variadic, so no safe wrapper of it exists in our dependencies.
#[allow(unsafe_code)]
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match &cli.command {
        Command::Up(args) => Some(&args.overrides),
        Command::Node(args) => Some(&args.overrides),
        Command::CheckConfig { .. } => None,
    };
    if overrides.is_some_and(|o| !o.huge_pages) {
        disable_transparent_huge_pages();
    }
    let result = match cli.command {
        Command::Up(args) => {
            init_tracing(&args.overrides);
            let base = match &args.config {
                Some(path) => NodeConfig::from_file(path),
                None => Ok(NodeConfig::default()),
            };
            base.map_err(anyhow::Error::from)
                .map(|mut c| {
                    c.resolve_node();
                    apply(c, &args.overrides)
                })
                .and_then(optiprism_node::run)
        }
        Command::Node(args) => {
            init_tracing(&args.overrides);
            NodeConfig::from_file(&args.config)
                .map_err(anyhow::Error::from)
                .map(|mut c| {
                    if let Some(id) = args.id {
                        c.node.id = id;
                    }
                    c.resolve_node();
                    apply(c, &args.overrides)
                })
                .and_then(optiprism_node::run)
        }
        Command::CheckConfig { config } => NodeConfig::from_file(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| {
                c.validate()?;
                print!("{}", toml::to_string(&c)?);
                Ok(())
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(dead_code)]
const _DEFAULTS_DOCUMENTED: (&str, &str) = (DEFAULT_HTTP, DEFAULT_FLIGHT);
