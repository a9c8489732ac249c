//! The admin API that `prismctl` drives: this node's view of the cluster, leader transfer,
//! moving replicas, adding, removing and draining nodes.
//!
//! Every node answers for itself: `GET /admin/v1/status` gives the node, whether it is ready or
//! draining, and every group it holds a replica of, with leader, voters, learners, applied and
//! last log index, and, on groups it leads, how far each replica has replicated. `prismctl`
//! asks every member and puts the answers together. Mutations need `cluster.admin-token`;
//! when it is set, every admin request does. Errors are the JSON bodies of the HTTP API.

use crate::http::{bearer, error};
use crate::placement::MoveError;
use crate::server::{GroupStatus, NodeShared};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use optiprism_consensus::{GroupId, LeaderError, NodeAddr};
use optiprism_types::PartitionId;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// The admin routes, to merge into the node's router.
pub fn routes() -> axum::Router<Arc<NodeShared>> {
    axum::Router::new()
        .route("/admin/v1/status", get(status))
        .route("/admin/v1/leader-transfer", post(leader_transfer))
        .route("/admin/v1/partitions/move", post(move_replica))
        .route("/admin/v1/nodes", post(add_node))
        .route("/admin/v1/nodes/remove", post(remove_node))
        .route("/admin/v1/drain", post(drain))
}

/// Checks the admin token: `mutation` requests need one configured and presented, read-only
/// requests only when one is configured. The refusal, if any.
fn refusal(node: &NodeShared, headers: &HeaderMap, mutation: bool) -> Option<Response> {
    match (&node.config.cluster.admin_token, bearer(headers)) {
        (Some(expected), Some(token)) if token == expected => None,
        (Some(_), Some(_)) => Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong admin token",
        )),
        (Some(_), None) => Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <admin token>` (prismctl: --admin-token or PRISM_ADMIN_TOKEN)",
        )),
        (None, _) if mutation => Some(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this node has no `cluster.admin-token` configured, so it takes no admin changes",
        )),
        (None, _) => None,
    }
}

/// A group's JSON: `partition-3` or `metadata` with its partition number, if any.
fn group_json(node: &NodeShared, g: &GroupStatus) -> Value {
    let lag = g.replication.as_ref().map(|r| {
        r.iter()
            .map(|(id, matched)| (id.to_string(), json!(g.last_log.saturating_sub(*matched))))
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "group": g.group.to_string(),
        "partition": g.group.as_partition().map(|p| p.0),
        "leader": g.leader,
        "is_leader": g.leader == Some(node.node_id()),
        "voters": g.voters,
        "learners": g.learners,
        "applied": g.applied,
        "last_log": g.last_log,
        "purged": g.purged,
        "snapshot": g.snapshot,
        "replication_lag": lag,
        "failed": g.failed,
        "seal_failed": g.seal_failed,
    })
}

async fn status(State(node): State<Arc<NodeShared>>, headers: HeaderMap) -> Response {
    if let Some(denied) = refusal(&node, &headers, false) {
        return denied;
    }
    let groups = node.group_status();
    // The members are the replicas of the metadata group, which every node holds.
    let members: Vec<Value> = node
        .members()
        .iter()
        .map(|(id, a)| json!({"id": id, "http": a.http, "flight": a.flight, "raft": a.raft}))
        .collect();
    Json(json!({
        "node": node.node_id(),
        "ready": node.is_ready(),
        "draining": node.is_shutting_down(),
        "partitions": node.partition_count(),
        "members": members,
        // A replica removed from a group may run on until this node drops it: not a replica.
        "groups": groups
            .iter()
            .filter(|g| {
                g.voters.contains(&node.node_id()) || g.learners.contains(&node.node_id())
            })
            .map(|g| group_json(&node, g))
            .collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `POST /admin/v1/leader-transfer` body: the group by partition number or name, and the node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    partition: Option<u32>,
    group: Option<String>,
    to: u64,
}

fn parse_group(node: &NodeShared, request: &TransferRequest) -> Result<GroupId, String> {
    let group = match (request.partition, request.group.as_deref()) {
        (Some(p), None) => GroupId::partition(PartitionId(p)),
        (None, Some("metadata")) => GroupId::METADATA,
        (None, Some(name)) => {
            let p = name
                .strip_prefix("partition-")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    format!("`group`: `{name}` is neither `metadata` nor `partition-<n>`")
                })?;
            GroupId::partition(PartitionId(p))
        }
        (Some(_), Some(_)) => return Err("give `partition` or `group`, not both".into()),
        (None, None) => return Err("`partition` or `group` is required".into()),
    };
    match group.as_partition() {
        Some(p) if p.0 >= node.partition_count() => Err(format!(
            "`partition`: {} does not exist (the cluster has {})",
            p.0,
            node.partition_count()
        )),
        _ => Ok(group),
    }
}

async fn leader_transfer(
    State(node): State<Arc<NodeShared>>,
    Change(request): Change<TransferRequest>,
) -> Response {
    let group = match parse_group(&node, &request) {
        Ok(g) => g,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_request", message),
    };
    match node.transfer_leader(group, request.to).await {
        Ok(()) => Json(json!({"group": group.to_string(), "leader": request.to})).into_response(),
        Err(e @ LeaderError::Failed(_)) => {
            error(StatusCode::CONFLICT, "transfer_failed", e.to_string())
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// The JSON body of an admin change, from a caller holding the admin token: the extractor
/// answers 401/403 or 400 (naming what is wrong) before a handler runs.
struct Change<T>(T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<Arc<NodeShared>> for Change<T> {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        node: &Arc<NodeShared>,
    ) -> Result<Self, Response> {
        if let Some(denied) = refusal(node, request.headers(), true) {
            return Err(denied);
        }
        let bytes = axum::body::Bytes::from_request(request, node)
            .await
            .map_err(IntoResponse::into_response)?;
        serde_json::from_slice(&bytes)
            .map(Change)
            .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))
    }
}

/// The answer to a failed membership change. A request sent to a node that does not lead the
/// group gets 421 with the leader's id, for the caller to ask it.
fn move_failure(e: MoveError) -> Response {
    match e {
        MoveError::Invalid(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m),
        MoveError::NotLeader { group, leader } => (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({"error": {"code": "not_leader", "leader": leader,
                "message": format!("node {leader:?} leads {group}; send the request to it")}})),
        )
            .into_response(),
        MoveError::Failed(m) => error(StatusCode::CONFLICT, "failed", m),
        MoveError::Propose(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    partition: u32,
    from: u64,
    to: u64,
}

async fn move_replica(
    State(node): State<Arc<NodeShared>>,
    Change(request): Change<MoveRequest>,
) -> Response {
    match node
        .move_replica(request.partition, request.from, request.to)
        .await
    {
        Ok(()) => {
            Json(json!({"partition": request.partition, "from": request.from, "to": request.to}))
                .into_response()
        }
        Err(e) => move_failure(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNodeRequest {
    id: u64,
    raft: String,
    http: String,
    flight: String,
}

async fn add_node(
    State(node): State<Arc<NodeShared>>,
    Change(request): Change<AddNodeRequest>,
) -> Response {
    if request.id == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`id` must be greater than 0",
        );
    }
    let addr = NodeAddr {
        raft: request.raft,
        http: request.http,
        flight: request.flight,
    };
    match node.add_node(request.id, addr).await {
        Ok(()) => Json(json!({"added": request.id})).into_response(),
        Err(e) => move_failure(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNodeRequest {
    id: u64,
}

async fn remove_node(
    State(node): State<Arc<NodeShared>>,
    Change(request): Change<RemoveNodeRequest>,
) -> Response {
    match node.remove_node(request.id).await {
        Ok(()) => Json(json!({"removed": request.id})).into_response(),
        Err(e) => move_failure(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    draining: bool,
}

async fn drain(
    State(node): State<Arc<NodeShared>>,
    Change(request): Change<DrainRequest>,
) -> Response {
    let transfers: Vec<Value> = node
        .drain(request.draining)
        .await
        .into_iter()
        .map(|(group, result)| match result {
            Ok(to) => json!({"group": group.to_string(), "leader": to}),
            Err(e) => json!({"group": group.to_string(), "error": e}),
        })
        .collect();
    Json(json!({"node": node.node_id(), "draining": request.draining, "transfers": transfers}))
        .into_response()
}
