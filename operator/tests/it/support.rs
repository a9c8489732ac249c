//! What the prismctl tests share: running the binary against a cluster.

use optiprism_testkit::{ADMIN_TOKEN, API_TOKEN};
use std::process::Output;

/// Runs `prismctl` against `endpoints` with the cluster's admin token and the API token.
pub(crate) fn prismctl(endpoints: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_prismctl"))
        .args(["--endpoints", endpoints])
        .args(args)
        .env("PRISM_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("OPTIPRISM_API_TOKEN", API_TOKEN)
        .output()
        .expect("run prismctl")
}
