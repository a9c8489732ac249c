//! Shared types of Optiprism.
//!
//! Everything here is plain data and pure functions, with no I/O, so that every other crate
//! (consensus, flight, node, the operator CLI) can agree on ids, the event model, the public
//! query format and its answers without depending on each other.

pub mod answer;
pub mod event;
pub mod formula;
pub mod generator;
pub mod ids;
pub mod insight;
pub mod query;
pub mod stats;
pub mod time;

pub use ids::{NodeId, PartitionId, PersonId, ProjectId};
