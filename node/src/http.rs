//! The HTTP front end (axum): SDK ingestion, the JSON query API, health and metrics (and the
//! admin API of [`crate::admin`]).
//!
//! Every error is a JSON body `{"error": {"code", "message", "events"?}}` with a 4xx status for
//! the client's mistakes (401 unknown key, 400 malformed or invalid events, 413 too large) and
//! 503 with `Retry-After` when the node cannot commit right now. CORS is open so browsers can
//! send events (including `text/plain` bodies, which avoid preflights).

use crate::ingest::{IngestError, Ingestor, ParseContext, Parsed, posthog, segment};
use crate::query::QueryFailure;
use crate::server::{GroupStatus, NodeShared};
use crate::storage::partition::{SEAL_RETRY_FIRST, SEAL_RETRY_LONGEST};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tower_http::cors::CorsLayer;

#[derive(Clone)]
struct AppState {
    node: Arc<NodeShared>,
    ingestor: Ingestor,
}

/// The router of the node's HTTP API.
pub fn router(node: Arc<NodeShared>) -> Router {
    let admin = crate::admin::routes().with_state(Arc::clone(&node));
    let state = AppState {
        ingestor: Ingestor::new(Arc::clone(&node)),
        node,
    };
    let segment_paths = [
        "/v1/batch",
        "/v1/b",
        "/v1/track",
        "/v1/t",
        "/v1/identify",
        "/v1/i",
        "/v1/page",
        "/v1/p",
        "/v1/screen",
        "/v1/s",
        "/v1/group",
        "/v1/g",
        "/v1/alias",
        "/v1/a",
    ];
    let posthog_paths = [
        "/batch",
        "/batch/",
        "/e",
        "/e/",
        "/i/v0/e",
        "/i/v0/e/",
        "/capture",
        "/capture/",
    ];
    let mut app = Router::new();
    for p in segment_paths {
        app = app.route(p, post(segment_handler));
    }
    for p in posthog_paths {
        app = app.route(p, post(posthog_handler));
    }
    app.route("/api/v1/projects/{project}/query", post(query_handler))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {}", uri.path()),
            )
        })
        .layer(DefaultBodyLimit::disable())
        .layer(CorsLayer::permissive())
        .with_state(state)
        .merge(admin)
}

use axum::Json;

/// A JSON error answer (with `Retry-After` when it is 503).
pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let mut response = (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = match &self {
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::Malformed(_) | IngestError::InvalidEvents(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge { .. } | IngestError::TooLargeForAnEntry(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        if let IngestError::InvalidEvents(events) = &self {
            body["error"]["events"] = json!(events);
        }
        let mut response = (status, Json(body)).into_response();
        if self.is_retryable() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Reads the body, gunzipping it when it is gzip (with or without `Content-Encoding`), and
/// enforcing the batch size limit on the decompressed bytes.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    uri: &Uri,
    limit: u64,
) -> Result<Vec<u8>, IngestError> {
    let raw: Bytes = axum::body::to_bytes(body, limit as usize + 1)
        .await
        .map_err(|_| IngestError::TooLarge { limit })?;
    if raw.len() as u64 > limit {
        return Err(IngestError::TooLarge { limit });
    }
    let declared_gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
        || uri.query().is_some_and(|q| q.contains("compression=gzip"));
    let looks_gzip = raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b;
    if !(declared_gzip || looks_gzip) {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::Malformed(format!("body is not valid gzip: {e}")))?;
    if out.len() as u64 > limit {
        return Err(IngestError::TooLarge { limit });
    }
    Ok(out)
}

fn basic_auth_user(headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split(':').next()?.to_string();
    (!user.is_empty()).then_some(user)
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

fn context(node: &NodeShared) -> ParseContext {
    ParseContext {
        received_ms: chrono::Utc::now().timestamp_millis(),
        limits: node.config.ingest.clone(),
    }
}

async fn ingest(
    state: &AppState,
    parsed: Result<Parsed, IngestError>,
    header_key: Option<String>,
) -> Response {
    let result = async {
        let parsed = parsed?;
        let key = header_key.or_else(|| parsed.write_key.clone());
        let project = state.ingestor.project(key.as_deref())?;
        state.ingestor.ingest(&project, parsed).await
    }
    .await;
    match result {
        Ok(summary) => Json(json!({
            "success": true,
            "status": 1,
            "accepted": summary.accepted,
            "duplicates": summary.duplicates,
        }))
        .into_response(),
        Err(e) => {
            if !e.is_retryable() {
                state
                    .node
                    .metrics
                    .ingest_rejected
                    .fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        }
    }
}

async fn segment_handler(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = context(&state.node);
    let parsed = match read_body(body, &headers, &uri, ctx.limits.max_batch_size.0).await {
        Ok(bytes) => segment::parse(&bytes, segment::type_of_path(uri.path()), &ctx),
        Err(e) => Err(e),
    };
    ingest(&state, parsed, basic_auth_user(&headers)).await
}

async fn posthog_handler(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = context(&state.node);
    let parsed = match read_body(body, &headers, &uri, ctx.limits.max_batch_size.0).await {
        Ok(bytes) => posthog::parse(&bytes, &ctx),
        Err(e) => Err(e),
    };
    ingest(&state, parsed, None).await
}

async fn query_handler(
    State(state): State<AppState>,
    Path(project_name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <api token>`",
        );
    };
    let Some(project) = state
        .node
        .metadata
        .read(|m| m.project_by_token(token).cloned())
    else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown API token",
        );
    };
    if project.name != project_name {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token does not grant access to project `{project_name}`"),
        );
    }
    let node = Arc::clone(&state.node);
    if let Err(e) = node.read_barrier().await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        );
    }
    let started = std::time::Instant::now();
    let run = node.query_runtime.spawn({
        let node = Arc::clone(&node);
        async move { node.query.insight(&project, &body).await }
    });
    let result = run.await;
    node.metrics
        .record_query(started.elapsed(), matches!(result, Ok(Ok(_))));
    match result {
        Ok(Ok(answer)) => Json(answer.json).into_response(),
        Ok(Err(failure)) => {
            let status = match &failure {
                QueryFailure::Invalid(_) | QueryFailure::Sql(_) => StatusCode::BAD_REQUEST,
                QueryFailure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                QueryFailure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let mut body =
                json!({"error": {"code": failure.code(), "message": failure.to_string()}});
            if let QueryFailure::Invalid(e) = &failure {
                body["error"]["field"] = json!(e.field);
            }
            (status, Json(body)).into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("query task failed: {e}"),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.node.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else if let Some(message) = failed_groups_message(&state) {
        error(StatusCode::SERVICE_UNAVAILABLE, "failed", &message)
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "not every partition has a leader, or the node is shutting down",
        )
    }
}

/// Alive unless an error stopped one of the node's Raft groups or a partition cannot seal. A
/// stopped group needs a restart, so a supervisor that restarts on a failed liveness check
/// (Kubernetes does) recovers the node once the cause (a full or failing disk) is fixed. A
/// partition that cannot seal keeps its rows in memory and in the Raft log, both growing, and
/// retries the seal on its own; this answers 200 again once a retry has written them, and a
/// restart meanwhile loses nothing (the log replays them).
async fn livez(State(state): State<AppState>) -> Response {
    let seals = state.node.failed_seals();
    let seals = (!seals.is_empty() && !state.node.is_shutting_down()).then(|| {
        format!(
            "sealing failed and is retried (after {} s, doubling up to every {} s); the rows wait in memory and in the raft log ({})",
            SEAL_RETRY_FIRST.as_secs(),
            SEAL_RETRY_LONGEST.as_secs(),
            listed(&seals)
        )
    });
    let problems: Vec<String> = failed_groups_message(&state)
        .into_iter()
        .chain(seals)
        .collect();
    if problems.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            problems.join(". "),
        )
    }
}

/// What stopped the node's failed groups, if any did.
fn failed_groups_message(state: &AppState) -> Option<String> {
    let failed = state.node.failed_groups();
    if failed.is_empty() {
        return None;
    }
    Some(format!(
        "raft groups stopped on an error and take no writes until the node restarts ({})",
        listed(&failed)
    ))
}

/// Failures by group as `group: error; group: error`.
fn listed(failures: &[(optiprism_consensus::GroupId, String)]) -> String {
    let listed: Vec<String> = failures
        .iter()
        .map(|(group, why)| format!("{group}: {why}"))
        .collect();
    listed.join("; ")
}

async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.node.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        ));
    };
    counter(
        "optiprism_node_ingest_accepted_total",
        "Events stored.",
        m.ingest_accepted.load(Ordering::Relaxed),
    );
    counter(
        "optiprism_node_ingest_duplicate_total",
        "Events dropped as duplicates.",
        m.ingest_duplicates.load(Ordering::Relaxed),
    );
    counter(
        "optiprism_node_ingest_rejected_total",
        "Ingestion requests rejected.",
        m.ingest_rejected.load(Ordering::Relaxed),
    );
    counter(
        "optiprism_node_ingest_keys_over_limit_total",
        "New property keys of requests left out of a project schema that holds ingest.max-property-keys keys (their values are stored as text).",
        m.ingest_keys_over_limit.load(Ordering::Relaxed),
    );
    counter(
        "optiprism_node_queries_total",
        "Queries answered.",
        m.queries.load(Ordering::Relaxed),
    );
    counter(
        "optiprism_node_queries_failed_total",
        "Queries failed.",
        m.queries_failed.load(Ordering::Relaxed),
    );
    counter(
        "optiprism_node_proposals_failed_total",
        "Proposals (ingestion or metadata) that did not commit.",
        m.proposals_failed.load(Ordering::Relaxed),
    );
    let (buckets, count, sum) = m.query_histogram();
    let name = "optiprism_node_query_duration_seconds";
    out.push_str(&format!(
        "# HELP {name} Query latency (JSON insights and SQL, HTTP and Flight).\n# TYPE {name} histogram\n"
    ));
    for (upper, n) in buckets {
        out.push_str(&format!("{name}_bucket{{le=\"{upper}\"}} {n}\n"));
    }
    out.push_str(&format!(
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}\n"
    ));
    let name = "optiprism_consensus_leader_changes_total";
    out.push_str(&format!(
        "# HELP {name} Leader changes this node saw per group since it started.\n# TYPE {name} counter\n"
    ));
    for (group, n) in m.leader_changes() {
        out.push_str(&format!("{name}{{group=\"{group}\"}} {n}\n"));
    }
    let status = state.node.group_status();
    let mut gauge = |name: &str, help: &str, value: &dyn Fn(&GroupStatus) -> Option<u64>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for g in &status {
            if let Some(v) = value(g) {
                out.push_str(&format!("{name}{{group=\"{}\"}} {v}\n", g.group));
            }
        }
    };
    gauge(
        "optiprism_consensus_is_leader",
        "Whether this node leads the group.",
        &|g| Some(u64::from(g.is_leader)),
    );
    gauge(
        "optiprism_consensus_has_leader",
        "Whether the group has a known leader.",
        &|g| Some(u64::from(g.leader.is_some())),
    );
    gauge(
        "optiprism_consensus_failed",
        "Whether an error stopped the group here (it takes no writes until the node restarts).",
        &|g| Some(u64::from(g.failed.is_some())),
    );
    gauge(
        "optiprism_storage_seal_failed",
        "Whether a seal of the partition failed here (it seals nothing until a retry writes it).",
        &|g| {
            g.group
                .as_partition()
                .map(|_| u64::from(g.seal_failed.is_some()))
        },
    );
    gauge(
        "optiprism_consensus_apply_lag",
        "Log entries held here but not yet applied.",
        &|g| Some(g.last_log.saturating_sub(g.applied)),
    );
    gauge(
        "optiprism_consensus_applied_index",
        "Last log index applied here.",
        &|g| Some(g.applied),
    );
    gauge(
        "optiprism_consensus_purged_index",
        "Log purged up to this index (older entries live only in snapshots).",
        &|g| g.purged,
    );
    gauge(
        "optiprism_consensus_snapshot_index",
        "Index of the snapshot held here.",
        &|g| g.snapshot,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
