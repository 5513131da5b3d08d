//! The `raftexample` binary: flags, then the wiring of `main.go`.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::process::ExitCode;

use clap::Parser;
use raftexample::cli::{Args, LogFormat};
use raftexample::kvstore::KvStore;
use raftexample::{httpapi, raft_node};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Proposals the raft loop has not picked up yet; beyond this, PUTs wait (back-pressure).
const PROPOSE_QUEUE: usize = 4096;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("raftexample: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let cfg = args.node_config()?;
    let raft_addr = args.raft_listen_addr()?;
    let raft_listener = TcpListener::bind(&raft_addr).await.map_err(|e| {
        format!("cannot listen for raft peers on {raft_addr}: {e} (is another node running?)")
    })?;
    let kv_listener = TcpListener::bind(("0.0.0.0", args.port))
        .await
        .map_err(|e| format!("cannot listen for clients on port {}: {e}", args.port))?;

    // The two input channels of the raft node (Go: proposeC, confChangeC).
    let (propose_tx, propose_rx) = mpsc::channel(PROPOSE_QUEUE);
    let (conf_change_tx, conf_change_rx) = mpsc::channel(16);

    // The store exists before the node so the node can ask it for snapshots.
    let kvs = KvStore::new(propose_tx);
    let snapshot_source = kvs.clone();
    let node = raft_node::start(
        cfg,
        raft_listener,
        propose_rx,
        conf_change_rx,
        Box::new(move || snapshot_source.get_snapshot()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let raft_node::RaftNodeHandle {
        commit_rx,
        error_rx,
        ..
    } = node;
    let stop_node = CancellationToken::new();

    // commitC feeds the store.
    let mut applier = tokio::spawn(kvs.clone().read_commits(commit_rx));

    let http_stop = CancellationToken::new();
    let http = tokio::spawn(httpapi::serve(
        kv_listener,
        httpapi::router(kvs, conf_change_tx),
        http_stop.clone().cancelled_owned(),
    ));
    tracing::info!(port = args.port, raft = %raft_addr, "serving");

    // Run until the node stops (error, or removed from the cluster) or a signal arrives.
    let mut error_rx = error_rx;
    let outcome = tokio::select! {
        r = &mut error_rx => r.unwrap_or(Ok(())).map_err(|e| e.to_string()),
        r = &mut applier => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the key-value store task failed: {e}")),
        },
        _ = shutdown_signal() => {
            tracing::info!("signal received, shutting down");
            stop_node.cancel();
            Ok(())
        }
    };
    let _ = stop_node;
    http_stop.cancel();
    let _ = http.await;
    outcome
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
