//! `prismctl`: the operator CLI of Optiprism.
//!
//! Flags are parsed by clap, checked into a plan, then run. Exit codes: 0 success, 1 the
//! operation failed (one line on stderr), 2 bad usage (as clap does), 3 `cluster health` found
//! the cluster unhealthy.

mod admin;
mod cluster_cmd;
mod gen_cmd;
mod output;
mod query_cmd;

use clap::{Parser, Subcommand};
use output::Output;
use std::path::PathBuf;
use std::process::ExitCode;

/// Operate an Optiprism cluster: its state and health, its leaders, queries, and load.
#[derive(Debug, Parser)]
#[command(name = "prismctl", version, about, long_about = None)]
struct Cli {
    /// HTTP addresses of nodes, comma-separated; the first that answers is asked (it names the
    /// other members).
    #[arg(
        long,
        global = true,
        env = "PRISM_ENDPOINTS",
        default_value = "127.0.0.1:8088"
    )]
    endpoints: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The cluster's admin token (`cluster.admin-token`), for changes such as leader transfer.
    #[arg(long, global = true, env = "PRISM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The cluster as a whole: its CA, status and health.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Partitions (and the metadata group): where they live and who leads them.
    #[command(subcommand)]
    Partitions(PartitionsCommand),
    /// Leadership of a group.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Ask a question: a JSON insight query or SQL, answered over Arrow Flight.
    Query(query_cmd::QueryArgs),
    /// Generate realistic events: send them to a node over HTTP, or write them to a file.
    ///
    /// Power-law activity per person, about 50 event types, sessions and typed properties,
    /// deterministic for a seed. `--target` sends Segment batches and reports events/s and
    /// acknowledgement latency; `--out` writes an Arrow IPC file for other engines.
    Gen(gen_cmd::GenArgs),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Create the cluster CA that nodes issue their certificates from (otherwise the first
    /// node to start creates it).
    Init {
        /// Where to write it; nodes find it through `cluster.ca-dir`.
        #[arg(long, default_value = "./data/cluster-ca")]
        ca_dir: PathBuf,
    },
    /// Every member (reachable, ready, draining, groups led) and every group (leader,
    /// replicas, applied index per replica, replication lag).
    Status,
    /// Exit 0 when every member is ready and every group has a leader and no lagging replica;
    /// exit 3 listing what is wrong otherwise.
    Health,
}

#[derive(Debug, Subcommand)]
enum PartitionsCommand {
    /// Every group with its leader, replicas, applied indexes and lag.
    List,
    /// Spread leaders evenly over the members by leader transfers (each pauses writes to its
    /// group for about one election timeout).
    Balance {
        /// Print the transfers without making them.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LeaderCommand {
    /// Move a group's leadership to a node holding a voting replica of it. Writes to the group
    /// pause for about one election timeout meanwhile.
    Transfer {
        /// The group: a partition number, `partition-<n>` or `metadata`.
        #[arg(long)]
        group: String,
        /// The node to lead it.
        #[arg(long)]
        to: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let output = cli.output;
    let endpoints = || admin::Endpoints::new(&cli.endpoints, cli.admin_token.clone());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    match cli.command {
        Command::Gen(args) => gen_cmd::run(args).map(|()| 0),
        Command::Cluster(ClusterCommand::Init { ca_dir }) => cluster_cmd::init(&ca_dir).map(|()| 0),
        Command::Cluster(ClusterCommand::Status) => runtime()?
            .block_on(cluster_cmd::status(&endpoints()?, output))
            .map(|()| 0),
        Command::Cluster(ClusterCommand::Health) => {
            runtime()?.block_on(cluster_cmd::health(&endpoints()?, output))
        }
        Command::Partitions(PartitionsCommand::List) => runtime()?
            .block_on(cluster_cmd::list(&endpoints()?, output))
            .map(|()| 0),
        Command::Partitions(PartitionsCommand::Balance { dry_run }) => runtime()?
            .block_on(cluster_cmd::balance(&endpoints()?, output, dry_run))
            .map(|()| 0),
        Command::Leader(LeaderCommand::Transfer { group, to }) => runtime()?
            .block_on(cluster_cmd::transfer(&endpoints()?, &group, to, output))
            .map(|()| 0),
        Command::Query(args) => runtime()?
            .block_on(query_cmd::run(&endpoints()?, args, output))
            .map(|()| 0),
    }
}
