//! The node's side of the Flight server: authentication and queries on the query runtime.

use crate::metadata::Project;
use crate::query::{QueryFailure, sql};
use crate::remote::{ScanTicket, answer_scan};
use crate::server::NodeShared;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use optiprism_flight::{BackendError, FlightBackend};
use std::future::Future;
use std::sync::Arc;

/// Flight backend over a running node.
#[derive(Debug, Clone)]
pub struct NodeFlightBackend {
    node: Arc<NodeShared>,
}

impl NodeFlightBackend {
    /// The backend of `node`.
    pub fn new(node: Arc<NodeShared>) -> NodeFlightBackend {
        NodeFlightBackend { node }
    }

    /// Runs `f` on the query runtime, away from Raft's, once this node has caught up with what
    /// the cluster acknowledged.
    async fn on_query_runtime<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, QueryFailure>> + Send + 'static,
    ) -> Result<T, BackendError> {
        let started = std::time::Instant::now();
        let result = async {
            self.node
                .read_barrier()
                .await
                .map_err(|e| BackendError::Unavailable(e.to_string()))?;
            match self.node.query_runtime.spawn(f).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(failure(e)),
                Err(e) => Err(BackendError::Internal(format!("query task failed: {e}"))),
            }
        }
        .await;
        self.node
            .metrics
            .record_query(started.elapsed(), result.is_ok());
        result
    }
}

fn failure(e: QueryFailure) -> BackendError {
    match e {
        QueryFailure::Invalid(e) => BackendError::InvalidArgument(e.to_string()),
        QueryFailure::Sql(m) => BackendError::InvalidArgument(format!("invalid SQL: {m}")),
        QueryFailure::Unavailable(m) => BackendError::Unavailable(m),
        QueryFailure::Internal(m) => BackendError::Internal(m),
    }
}

#[async_trait::async_trait]
impl FlightBackend for NodeFlightBackend {
    type Session = Project;

    fn authenticate(&self, token: &str) -> Result<Project, BackendError> {
        self.node
            .metadata
            .read(|m| m.project_by_token(token).cloned())
            .ok_or_else(|| BackendError::Unauthenticated("unknown API token".into()))
    }

    async fn insight(
        &self,
        project: &Project,
        query: Vec<u8>,
    ) -> Result<RecordBatch, BackendError> {
        let node = Arc::clone(&self.node);
        let project = project.clone();
        // Another node reading a partition held here (see `remote`): it waits for that
        // partition's read index only.
        if let Ok(ticket) = serde_json::from_slice::<ScanTicket>(&query) {
            return match node
                .query_runtime
                .clone()
                .spawn(async move { answer_scan(&node, &project, &ticket.scan).await })
                .await
            {
                Ok(result) => result.map_err(failure),
                Err(e) => Err(BackendError::Internal(format!("scan task failed: {e}"))),
            };
        }
        self.on_query_runtime(
            async move { node.query.insight(&project, &query).await.map(|a| a.batch) },
        )
        .await
    }

    async fn sql_schema(&self, project: &Project, text: String) -> Result<SchemaRef, BackendError> {
        let node = Arc::clone(&self.node);
        let project = project.clone();
        self.on_query_runtime(async move { sql::schema(&node.query, &project, &text).await })
            .await
    }

    async fn sql(
        &self,
        project: &Project,
        text: String,
        params: Option<RecordBatch>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError> {
        let node = Arc::clone(&self.node);
        let project = project.clone();
        self.on_query_runtime(async move {
            sql::run(&node.query, &project, &text, params.as_ref()).await
        })
        .await
    }

    async fn tables(&self, project: &Project) -> Result<Vec<(String, SchemaRef)>, BackendError> {
        let node = Arc::clone(&self.node);
        let project = project.clone();
        self.on_query_runtime(async move { sql::tables(&node.query, &project).await })
            .await
    }
}
