//! Arrow Flight and Flight SQL for Optiprism.
//!
//! One gRPC service answers three kinds of client: a plain Flight `DoGet` whose ticket is the
//! JSON of an insight query (pyarrow), Flight SQL statements and prepared statements over the
//! `events` and `persons` tables (ADBC, JDBC), and Flight SQL metadata calls (BI tools). This
//! crate holds no business logic: it authenticates with the bearer token, calls a
//! [`FlightBackend`], and maps its errors to gRPC status codes in one exhaustive `match`.

pub mod backend;
pub mod server;

pub use backend::{BackendError, FlightBackend};
pub use server::{FlightService, serve};
