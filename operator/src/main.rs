//! `prismctl`: the operator CLI of Optiprism.
//!
//! Flags are parsed by clap, checked into a plan, then run; errors print one line and exit
//! non-zero (1: the operation failed, 2: bad usage, as clap does).

mod gen_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Operate an Optiprism cluster.
#[derive(Debug, Parser)]
#[command(name = "prismctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate realistic events: send them to a node over HTTP, or write them to a file.
    ///
    /// Power-law activity per person, about 50 event types, sessions and typed properties,
    /// deterministic for a seed. `--target` sends Segment batches and reports events/s and
    /// acknowledgement latency; `--out` writes an Arrow IPC file for other engines.
    Gen(gen_cmd::GenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen(args) => gen_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
