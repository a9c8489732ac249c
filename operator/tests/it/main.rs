//! Integration tests of `prismctl` against real `prism` processes.

mod support;
mod t10_cluster_ops;
mod t20_membership;
mod t30_gen;
mod t40_single_node;
