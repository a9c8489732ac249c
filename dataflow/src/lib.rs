//! Incremental insights on timely and differential dataflow: saved insights and cohorts kept up
//! to date as events are applied, answering reads from arrangements.
//!
//! This crate is part of the workspace layout but holds no operators yet: the batch engine in
//! `optiprism-node` (DataFusion) is the oracle these operators will be checked against, and it
//! comes first. Its dependencies (timely 0.32, differential-dataflow 0.26, pinned exactly) are
//! added with the first operator, so they do not lengthen every build before they are used.
