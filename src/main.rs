//! The `raftexample` binary: flags, then the wiring of Go's `main.go`.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use raftexample::cli::{Args, LogFormat};
use raftexample::kvstore::{self, KvStore};
use raftexample::raft_node::{self, NodeInputs};
use raftexample::{http_server, httpapi};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Proposals the raft loop has not picked up yet; beyond this, PUTs wait (back-pressure).
const PROPOSE_QUEUE: usize = 4096;

fn main() -> ExitCode {
    let args = Args::parse_go_style();
    init_tracing(args.log_format);
    let outcome = runtime()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
        .and_then(|rt| rt.block_on(run(args)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            // Once on stderr is enough: the plain line only when the log would not show it.
            if !tracing::enabled!(tracing::Level::ERROR) {
                eprintln!("raftexample: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The runtime for HTTP and the transport. The raft loop has a thread of its own (it fsyncs),
/// so the runtime gets one worker less than there are cores: on a small machine running a
/// whole cluster, extra workers mostly wake each other up. With 3 nodes and the benchmark on
/// 2 cores, 1 worker instead of 2 gave 25-40% more PUT/s with 1 connection and the same
/// with 64 (README, Benchmarks). `TOKIO_WORKER_THREADS` overrides it.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        b.worker_threads(cores.saturating_sub(1).max(1));
    }
    b.build()
}

/// What to check when a port cannot be bound because it is taken.
fn in_use_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        " (is another node, or an old one, still running on it?)"
    } else {
        ""
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Every connection and every file needs a descriptor: take all the system allows, then
    // cap each server's connections so the WAL and snapshots always get theirs.
    let fd_limit = http_server::raise_fd_limit();
    let (kv_limits, raft_limits) = http_server::Limits::for_fd_limit(fd_limit);
    tracing::debug!(
        fd_limit,
        kv_connections = kv_limits.max_connections,
        raft_connections = raft_limits.max_connections,
        "connection caps"
    );
    let mut cfg = args.node_config()?;
    cfg.raft_server_limits = raft_limits;
    // The raft port refuses entries and snapshots the store could not apply.
    cfg.payload_checks = raft_node::PayloadChecks {
        proposal: kvstore::check_proposal,
        snapshot: kvstore::check_snapshot,
    };
    let cluster_id = cfg.cluster_id;
    let raft_addr = args.raft_listen_addr()?;
    let raft_listener = TcpListener::bind(&raft_addr).await.map_err(|e| {
        format!(
            "cannot listen for raft peers on {raft_addr}: {e}{}",
            in_use_hint(&e)
        )
    })?;
    let kv_listener = TcpListener::bind(("0.0.0.0", args.port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen for clients on port {}: {e}{}",
                args.port,
                in_use_hint(&e)
            )
        })?;

    // The input channels of the raft node: proposeC and confChangeC as in Go, and readIndexC
    // for linearizable reads.
    let (propose_tx, propose_rx) = mpsc::channel(PROPOSE_QUEUE);
    let (conf_change_tx, conf_change_rx) = mpsc::channel(16);
    let (read_index_tx, read_index_rx) = mpsc::channel(PROPOSE_QUEUE);

    // The store exists before the node so that the node can ask it for snapshots.
    let kvs = KvStore::new(propose_tx).with_read_index(read_index_tx);
    let snapshot_source = kvs.clone();
    let node = raft_node::start(
        cfg,
        raft_listener,
        NodeInputs {
            propose_rx,
            conf_change_rx,
            read_index_rx,
        },
        Arc::new(move |out| snapshot_source.write_snapshot(out)),
    )
    .await
    .map_err(|e| e.to_string())?;
    let raft_node::RaftNodeHandle {
        commit_rx,
        mut error_rx,
        stop: stop_node,
        status,
        ..
    } = node;

    // commitC feeds the store.
    let mut applier = tokio::spawn(kvs.clone().read_commits(commit_rx));

    let http_stop = CancellationToken::new();
    // Closing an input channel stops the node (Go's contract); on a graceful shutdown the HTTP
    // server goes first, so this clone keeps confChangeC open until the node is told to stop.
    let _conf_change_open = conf_change_tx.clone();
    let mut http = tokio::spawn(httpapi::serve(
        kv_listener,
        httpapi::router(kvs, conf_change_tx, args.request_timeout, Some(status)),
        kv_limits,
        http_stop.clone().cancelled_owned(),
    ));
    tracing::info!(
        port = args.port,
        raft = %raft_addr,
        cluster_id = %format_args!("{cluster_id:x}"),
        "serving"
    );

    // Run until the node stops by itself (an error, or removed from the cluster), or a signal.
    let outcome = tokio::select! {
        r = &mut error_rx => return finish(node_outcome(r), http_stop, http).await,
        r = &mut applier => match r {
            // commitC closed: the node stopped (e.g. removed from the cluster); errorC says why.
            Ok(Ok(())) => return finish(node_outcome(error_rx.await), http_stop, http).await,
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the key-value store task failed: {e}")),
        },
        _ = shutdown_signal() => Ok(()),
    };

    // Graceful shutdown: stop taking requests and finish those in flight, then stop the node
    // (a leader hands over leadership first), which closes the WAL. A second signal exits now.
    tracing::info!("shutting down (a second signal exits immediately)");
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("raftexample: second signal, exiting now");
        std::process::exit(1);
    });
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), &mut http).await;
    stop_node.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), error_rx)
        .await
        .map_err(|_| "the raft node did not stop within 10 s".to_string())?;
    outcome.and(node_outcome(stopped))
}

/// What errorC said: a clean stop, an error, or nothing at all (the loop died without a word).
fn node_outcome(
    r: Result<Result<(), raft_node::NodeError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the raft node stopped without reporting why; see the log above".into()),
    }
}

/// The node stopped by itself: close the HTTP server too.
async fn finish(
    outcome: Result<(), String>,
    http_stop: CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<(), String> {
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), http).await;
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
    // Colours only on a terminal: a log file (a Procfile runner, a test) gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
