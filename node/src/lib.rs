//! The `prism` node: configuration, start-up and ordered shutdown, HTTP ingestion, partitions
//! and their state machines, columnar event storage, and query planning on DataFusion.
//!
//! `main.rs` only parses the command line; [`run`] does the rest.

pub mod admin;
pub mod config;
pub mod flight_backend;
pub mod http;
pub mod ingest;
pub mod metadata;
pub mod placement;
pub mod query;
pub mod remote;
pub mod server;
pub mod storage;

use config::{DEFAULT_PROJECT, NodeConfig};
use std::sync::Arc;

/// What `prism up` prints once the node is ready.
pub fn banner(config: &NodeConfig, write_key: &str, api_token: &str) -> String {
    format!(
        "optiprism node {id} is ready\n  data dir   {data}\n  partitions {parts} (replication factor {rf})\n  HTTP       http://{http}  (ingestion: Segment /v1/batch, PostHog /batch/; queries: /api/v1/projects/{project}/query)\n  Flight     grpc://{flight}  (Arrow Flight and Flight SQL)\n  project    {project}\n  write key  {write_key}   (public: SDKs send events with it)\n  API token  {api_token}   (secret: `Authorization: Bearer` for queries)\n",
        id = config.node.id,
        data = config.node.data_dir.display(),
        parts = config.cluster.partitions,
        rf = config.cluster.replication_factor,
        http = config.node.http_listen,
        flight = config.node.flight_listen,
        project = DEFAULT_PROJECT,
    )
}

/// Runs a node until Ctrl-C or SIGTERM, then shuts it down in order.
pub fn run(config: NodeConfig) -> anyhow::Result<()> {
    config.validate()?;
    let query_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.query.threads)
        .thread_name("query")
        .enable_all()
        .build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.node.threads)
        .thread_name("prism")
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(config, query_runtime.handle().clone()));
    query_runtime.shutdown_background();
    result
}

async fn serve(config: NodeConfig, query_runtime: tokio::runtime::Handle) -> anyhow::Result<()> {
    use anyhow::Context;
    // Bind first: a port in use should fail before any storage is touched.
    let http_listener = tokio::net::TcpListener::bind(config.http_addr())
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {} (`--http`)",
                config.node.http_listen
            )
        })?;
    let flight_listener = tokio::net::TcpListener::bind(config.flight_addr())
        .await
        .with_context(|| {
            format!(
                "cannot listen for Flight on {} (`--flight`)",
                config.node.flight_listen
            )
        })?;
    let node = server::start(config, query_runtime).await?;
    let project = node
        .project(DEFAULT_PROJECT)
        .context("default project missing after start-up")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let http = {
        let app = http::router(Arc::clone(&node));
        let stop = wait_stop(stop_rx.clone());
        // TCP_NODELAY: acknowledgements are small and latency-sensitive.
        let listener = axum::serve::ListenerExt::tap_io(http_listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        })
    };
    let flight = {
        let backend = Arc::new(flight_backend::NodeFlightBackend::new(Arc::clone(&node)));
        let stop = wait_stop(stop_rx.clone());
        tokio::spawn(optiprism_flight::serve(backend, flight_listener, stop))
    };
    let sealer = server::spawn_sealer(Arc::clone(&node));
    let failure_watch = server::spawn_failure_watch(Arc::clone(&node));
    let placement = placement::spawn_placement_watcher(Arc::clone(&node));
    print!(
        "{}",
        banner(&node.config, &project.write_key, &project.api_token)
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(node_id = node.config.node.id, "node ready");
    shutdown_signal().await;
    tracing::info!("shutting down: draining, then stopping front ends");
    node.begin_drain();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let _ = http.await;
        let _ = flight.await;
    })
    .await;
    sealer.abort();
    failure_watch.abort();
    placement.abort();
    tracing::info!("sealing partitions and stopping raft groups");
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
