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

/// Operate an Optiprism cluster: its state and health, members, partitions and leaders,
/// queries, and load.
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
    /// Members: add, drain, decommission, remove.
    #[command(subcommand)]
    Node(NodeCommand),
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
    /// group for about one election timeout); with `--replicas`, first even out how many
    /// partitions each member holds by moving replicas (after adding a node).
    Balance {
        /// Move replicas too, not only leaders.
        #[arg(long)]
        replicas: bool,
        /// Print the plan without carrying it out.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move one replica of a partition to another node: the new node catches up as a learner,
    /// then replaces the old one in the partition's Raft group; the old node drops its copy.
    Move {
        /// The partition.
        #[arg(long)]
        partition: u32,
        /// The node giving up its replica.
        #[arg(long)]
        from: u64,
        /// The node taking it.
        #[arg(long)]
        to: u64,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Add a running node that is not yet a member (started with `prism node --config
    /// cluster.toml --id <id> --raft … --http … --flight …`): it joins the metadata group as a
    /// learner, then as a voter; it holds no partitions until replicas move to it.
    Add {
        /// Its id (not used by any member).
        #[arg(long)]
        id: u64,
        /// Its Raft (QUIC) address, e.g. 127.0.0.4:8089.
        #[arg(long)]
        raft: String,
        /// Its HTTP address.
        #[arg(long)]
        http: String,
        /// Its Flight address.
        #[arg(long)]
        flight: String,
    },
    /// Take a node out of service before maintenance: `/readyz` turns unready and its
    /// leaderships move to other replicas (`--undo` puts it back).
    Drain {
        /// The node.
        #[arg(long)]
        id: u64,
        /// Make it ready again.
        #[arg(long)]
        undo: bool,
    },
    /// Move every replica off a node, then remove it from the cluster. Refused when the other
    /// members cannot hold every partition's replicas.
    Decommission {
        /// The node.
        #[arg(long)]
        id: u64,
    },
    /// Remove a node that holds no replicas (a decommissioned or dead one). Refused while it
    /// holds replicas, when fewer members than the replication factor would remain, or when
    /// the remaining members answering would not be a quorum.
    Remove {
        /// The node.
        #[arg(long)]
        id: u64,
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
        Command::Partitions(PartitionsCommand::Balance { replicas, dry_run }) => {
            let endpoints = endpoints()?;
            runtime()?
                .block_on(async {
                    if replicas {
                        cluster_cmd::balance_replicas(&endpoints, output, dry_run).await
                    } else {
                        cluster_cmd::balance(&endpoints, output, dry_run).await
                    }
                })
                .map(|()| 0)
        }
        Command::Partitions(PartitionsCommand::Move {
            partition,
            from,
            to,
        }) => runtime()?
            .block_on(cluster_cmd::move_replica(
                &endpoints()?,
                partition,
                from,
                to,
                output,
            ))
            .map(|()| 0),
        Command::Node(NodeCommand::Add {
            id,
            raft,
            http,
            flight,
        }) => runtime()?
            .block_on(cluster_cmd::add_node(
                &endpoints()?,
                id,
                &raft,
                &http,
                &flight,
                output,
            ))
            .map(|()| 0),
        Command::Node(NodeCommand::Drain { id, undo }) => runtime()?
            .block_on(cluster_cmd::drain(&endpoints()?, id, undo, output))
            .map(|()| 0),
        Command::Node(NodeCommand::Decommission { id }) => runtime()?
            .block_on(cluster_cmd::decommission(&endpoints()?, id, output))
            .map(|()| 0),
        Command::Node(NodeCommand::Remove { id }) => runtime()?
            .block_on(cluster_cmd::remove_node(&endpoints()?, id, output))
            .map(|()| 0),
        Command::Leader(LeaderCommand::Transfer { group, to }) => runtime()?
            .block_on(cluster_cmd::transfer(&endpoints()?, &group, to, output))
            .map(|()| 0),
        Command::Query(args) => runtime()?
            .block_on(query_cmd::run(&endpoints()?, args, output))
            .map(|()| 0),
    }
}
