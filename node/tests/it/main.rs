//! Integration tests of the node: real `prism` processes driven over HTTP and Flight, plus
//! in-process property tests against a naive reference.

mod support;
mod t10_spec_cases;
mod t12_insight_cases;
mod t15_trends_math;
mod t16_query_fuzz;
mod t20_bad_input;
mod t30_sdks;
mod t40_restart;
mod t50_exact_uniques;
mod t60_cluster;
mod t70_insight_properties;
