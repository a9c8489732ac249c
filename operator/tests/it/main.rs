//! Integration tests of `prismctl` against real `prism` processes.

mod t10_cluster_ops;
