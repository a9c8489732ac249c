//! What the Flight server needs from the node.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

/// A failure of the backend, classified for gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Bad query, SQL or parameters: `InvalidArgument`.
    #[error("{0}")]
    InvalidArgument(String),
    /// Missing or unknown token: `Unauthenticated`.
    #[error("{0}")]
    Unauthenticated(String),
    /// Try again later (no leader, shutting down): `Unavailable`.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or broken storage: `Internal`.
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for tonic::Status {
    fn from(e: BackendError) -> tonic::Status {
        match e {
            BackendError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            BackendError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            BackendError::Unavailable(m) => tonic::Status::unavailable(m),
            BackendError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

/// The node side of the Flight server.
#[async_trait::async_trait]
pub trait FlightBackend: Send + Sync + 'static {
    /// An authenticated caller (the project of the token).
    type Session: Clone + Send + Sync + 'static;

    /// Checks an API token.
    fn authenticate(&self, token: &str) -> Result<Self::Session, BackendError>;

    /// Answers a JSON insight query as one Arrow batch.
    async fn insight(
        &self,
        session: &Self::Session,
        query: Vec<u8>,
    ) -> Result<RecordBatch, BackendError>;

    /// Plans SQL and returns its result schema without running it.
    async fn sql_schema(
        &self,
        session: &Self::Session,
        sql: String,
    ) -> Result<SchemaRef, BackendError>;

    /// Runs SQL with optional positional parameters (one row).
    async fn sql(
        &self,
        session: &Self::Session,
        sql: String,
        params: Option<RecordBatch>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError>;

    /// Tables and their schemas.
    async fn tables(
        &self,
        session: &Self::Session,
    ) -> Result<Vec<(String, SchemaRef)>, BackendError>;
}
