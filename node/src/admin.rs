//! The admin API that `prismctl` drives: this node's view of the cluster, and leader transfer.
//!
//! Every node answers for itself: `GET /admin/v1/status` gives the node, whether it is ready or
//! draining, and every group it holds a replica of, with leader, voters, learners, applied and
//! last log index, and, on groups it leads, how far each replica has replicated. `prismctl`
//! asks every member and puts the answers together. Mutations need `cluster.admin-token`;
//! when it is set, every admin request does. Errors are the JSON bodies of the HTTP API.

use crate::server::{GroupStatus, NodeShared};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use optiprism_consensus::{GroupId, LeaderError};
use optiprism_types::PartitionId;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// The admin routes, to merge into the node's router.
pub fn routes() -> axum::Router<Arc<NodeShared>> {
    axum::Router::new()
        .route("/admin/v1/status", get(status))
        .route("/admin/v1/leader-transfer", post(leader_transfer))
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// Checks the admin token: `mutation` requests need one configured and presented, read-only
/// requests only when one is configured. The refusal, if any.
fn refusal(node: &NodeShared, headers: &HeaderMap, mutation: bool) -> Option<Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (&node.config.cluster.admin_token, presented) {
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
    })
}

async fn status(State(node): State<Arc<NodeShared>>, headers: HeaderMap) -> Response {
    if let Some(denied) = refusal(&node, &headers, false) {
        return denied;
    }
    let groups = node.group_status();
    // The members are the replicas of the metadata group, which every node holds.
    let members: Vec<Value> = groups
        .iter()
        .find(|g| g.group == GroupId::METADATA)
        .map(|g| {
            g.addresses
                .iter()
                .map(
                    |(id, a)| json!({"id": id, "http": a.http, "flight": a.flight, "raft": a.raft}),
                )
                .collect()
        })
        .unwrap_or_default();
    Json(json!({
        "node": node.node_id(),
        "ready": node.is_ready(),
        "draining": node.is_shutting_down(),
        "partitions": node.partition_count(),
        "members": members,
        "groups": groups.iter().map(|g| group_json(&node, g)).collect::<Vec<_>>(),
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
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(denied) = refusal(&node, &headers, true) {
        return denied;
    }
    let request: TransferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    };
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
