//! An in-process cluster of raft nodes wired by their channels (Go: `raftexample_test.go`'s
//! `cluster`). Each node has pre-bound listeners, so there is no port race.

use std::time::Duration;

use raft::eraftpb::ConfChange;
use raftexample::kvstore::ReadIndexRequest;
use raftexample::raft_node::{self, Commit, Config, NodeError, NodeInputs};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// One node's channels.
pub struct Node {
    pub id: u64,
    /// *proposeC*; `None` once closed.
    pub propose_tx: Option<mpsc::Sender<Vec<u8>>>,
    pub conf_change_tx: Option<mpsc::Sender<ConfChange>>,
    pub read_index_tx: mpsc::Sender<ReadIndexRequest>,
    pub commit_rx: Option<mpsc::Receiver<Commit>>,
    pub error_rx: Option<oneshot::Receiver<Result<(), NodeError>>>,
    pub handle_stop: tokio_util::sync::CancellationToken,
}

pub struct Cluster {
    pub dir: TempDir,
    pub peers: Vec<String>,
    pub nodes: Vec<Node>,
}

/// Binds `n` raft listeners on free loopback ports (see `free_port`) and returns them
/// with their URLs.
pub async fn bind_peers(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let mut listeners = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..n {
        let l = TcpListener::bind(("127.0.0.1", super::free_port()))
            .await
            .expect("bind a free port");
        urls.push(format!("http://{}", l.local_addr().expect("addr")));
        listeners.push(l);
    }
    (listeners, urls)
}

/// A config for node `id` of `peers` in `dir`, with a short tick so tests run fast.
pub fn test_config(id: u64, peers: &[String], dir: &std::path::Path) -> Config {
    let mut cfg = Config::new(id, peers.to_vec());
    cfg.data_dir = dir.to_path_buf();
    cfg.tick_interval = Duration::from_millis(20);
    cfg
}

/// Starts node `cfg.id` on `listener`; the node's snapshots are empty (these tests do not
/// snapshot unless they set a snapshot count and their own source).
pub async fn start_node(
    cfg: Config,
    listener: TcpListener,
    get_snapshot: raft_node::GetSnapshot,
) -> Node {
    let (ptx, propose_rx) = mpsc::channel(16);
    let (ctx, conf_change_rx) = mpsc::channel(16);
    let (rtx, read_index_rx) = mpsc::channel(16);
    let id = cfg.id;
    let inputs = NodeInputs {
        propose_rx,
        conf_change_rx,
        read_index_rx,
    };
    let h = raft_node::start(cfg, listener, inputs, get_snapshot)
        .await
        .expect("node starts");
    Node {
        id,
        propose_tx: Some(ptx),
        conf_change_tx: Some(ctx),
        read_index_tx: rtx,
        commit_rx: Some(h.commit_rx),
        error_rx: Some(h.error_rx),
        handle_stop: h.stop,
    }
}

impl Cluster {
    /// Starts an `n`-node cluster in a fresh temp dir.
    pub async fn new(n: usize) -> Cluster {
        super::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let (listeners, peers) = bind_peers(n).await;
        let mut nodes = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let cfg = test_config(i as u64 + 1, &peers, dir.path());
            nodes.push(start_node(cfg, l, std::sync::Arc::new(|_| {})).await);
        }
        Cluster { dir, peers, nodes }
    }

    /// Closes every proposer, drains the commit channels so the nodes can finish, and returns
    /// each node's result (Go: `cluster.Close`).
    pub async fn close(mut self) -> Vec<Result<(), NodeError>> {
        let mut drains = Vec::new();
        for n in &mut self.nodes {
            if let Some(mut rx) = n.commit_rx.take() {
                drains.push(tokio::spawn(async move {
                    while let Some(c) = rx.recv().await {
                        if let Commit::Entries { apply_done, .. } = c {
                            let _ = apply_done.send(());
                        }
                    }
                }));
            }
            n.propose_tx = None;
        }
        let mut results = Vec::new();
        for n in &mut self.nodes {
            if let Some(rx) = n.error_rx.take() {
                let r = tokio::time::timeout(Duration::from_secs(20), rx)
                    .await
                    .expect("node stops within 20 s after its proposer closed")
                    .unwrap_or(Ok(()));
                results.push(r);
            }
        }
        for d in drains {
            let _ = d.await;
        }
        results
    }

    /// [`Cluster::close`], asserting every node stopped cleanly.
    pub async fn close_no_errors(self) {
        for (i, r) in self.close().await.into_iter().enumerate() {
            if let Err(e) = r {
                panic!("node {} stopped with an error: {e}", i + 1);
            }
        }
    }
}
