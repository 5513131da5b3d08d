//! `raftexample-bench` against an in-process fake KV cluster: axum servers on 127.0.0.1:0 that
//! share writes the way a healthy raftexample cluster would, except where a test tells a node to
//! drop some keys (acknowledge, never store) or to refuse some PUTs with 503.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use clap::Parser;
use raftexample::bench::{self, cli::Args};
use tokio_util::sync::CancellationToken;

/// Decides, per (node number, key index), what a fake node does.
type Rule = fn(usize, u64) -> bool;

#[derive(Clone)]
struct Node {
    id: usize,
    maps: Arc<Vec<Mutex<HashMap<String, Bytes>>>>,
    /// Keys this node acknowledges but never stores (the replica "loses" them).
    loses: Rule,
    /// Keys whose PUT any node refuses with 503.
    refuses: Rule,
}

struct FakeCluster {
    urls: Vec<String>,
    stop: CancellationToken,
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn index_of(key: &str) -> u64 {
    key.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

async fn handle(
    State(node): State<Node>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> (StatusCode, Bytes) {
    let key = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let index = index_of(&key);
    match method {
        Method::PUT if (node.refuses)(node.id, index) => {
            (StatusCode::SERVICE_UNAVAILABLE, Bytes::new())
        }
        Method::PUT => {
            for (id, map) in node.maps.iter().enumerate() {
                if !(node.loses)(id, index) {
                    map.lock().unwrap().insert(key.clone(), body.clone());
                }
            }
            (StatusCode::NO_CONTENT, Bytes::new())
        }
        Method::GET => match node.maps[node.id].lock().unwrap().get(&key) {
            Some(v) => (StatusCode::OK, v.clone()),
            None => (
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"Failed to GET\n"),
            ),
        },
        _ => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
    }
}

async fn start_cluster(n: usize, loses: Rule, refuses: Rule) -> FakeCluster {
    let maps = Arc::new(
        (0..n)
            .map(|_| Mutex::new(HashMap::new()))
            .collect::<Vec<_>>(),
    );
    let stop = CancellationToken::new();
    let mut urls = Vec::new();
    for id in 0..n {
        let node = Node {
            id,
            maps: Arc::clone(&maps),
            loses,
            refuses,
        };
        let app = Router::new().fallback(handle).with_state(node);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("http://{}", listener.local_addr().unwrap()));
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
    }
    FakeCluster { urls, stop }
}

fn config(cluster: &FakeCluster, extra: &[&str]) -> bench::Config {
    let endpoints = cluster.urls.join(",");
    let mut argv = vec!["raftexample-bench", "--endpoints", &endpoints];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv)
        .unwrap()
        .into_config(false)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_puts_and_confirms_replication() {
    let cluster = start_cluster(3, |_, _| false, |_, _| false).await;
    let cfg = config(
        &cluster,
        &[
            "--conns",
            "4",
            "--total",
            "200",
            "--key-prefix",
            "it-ok",
            "--val-size",
            "64",
        ],
    );
    let report = bench::run(&cfg).await.unwrap();

    assert_eq!(report.put.requests, 200);
    assert_eq!(report.put.accepted, 200);
    assert!(report.put.errors.is_empty(), "{:?}", report.put.errors);
    assert!(report.put.accepted_per_sec > 0.0);
    let lat = report.put.latency_ms.unwrap();
    assert!(lat.p50 <= lat.p99 && lat.p99 <= lat.max, "{lat:?}");

    let r = report.replication.as_ref().unwrap();
    assert_eq!((r.acknowledged, r.readable_everywhere), (200, 200));
    assert!(r.all_readable);
    assert_eq!(r.nodes.len(), 3);
    for n in &r.nodes {
        assert_eq!((n.readable, n.lost), (200, 0), "{n:?}");
        assert!(n.all_readable_after_secs.is_some());
        // The fake stores synchronously, so the first pass finds everything.
        assert_eq!(n.rounds, 1, "{n:?}");
    }
    assert_eq!(report.lost_keys(), 0);
    assert_eq!(bench::exit_status(&report), 0);
    // The values really were the ones the tool generates, on every node.
    assert_eq!(report.settings.val_size, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_lost_keys_and_refused_puts() {
    // Node 1 acknowledges keys 7, 27, ..., 187 (via any node) but never stores them;
    // every node refuses keys 49, 99, 149, 199 with 503.
    let cluster = start_cluster(3, |node, i| node == 1 && i % 20 == 7, |_, i| i % 50 == 49).await;
    let cfg = config(
        &cluster,
        &[
            "--conns",
            "4",
            "--total",
            "200",
            "--key-prefix",
            "it-lossy",
            "--replication-timeout",
            "300ms",
        ],
    );
    let report = bench::run(&cfg).await.unwrap();

    assert_eq!(report.put.requests, 200);
    assert_eq!(report.put.accepted, 196);
    assert_eq!(report.put.errors.get("status 503"), Some(&4));

    let r = report.replication.as_ref().unwrap();
    assert_eq!(r.acknowledged, 196);
    assert_eq!(r.readable_everywhere, 186);
    assert!(!r.all_readable);
    assert_eq!(report.lost_keys(), 10);
    assert_eq!(r.nodes[0].lost, 0);
    assert_eq!(r.nodes[2].lost, 0);
    let lossy = &r.nodes[1];
    assert_eq!((lossy.readable, lossy.lost), (186, 10));
    assert!(lossy.all_readable_after_secs.is_none());
    assert!(r.wait_secs >= 0.3, "kept looking until the deadline: {r:?}");
    let expected: Vec<String> = (0..10)
        .map(|k| format!("/it-lossy-{:08}", 20 * k + 7))
        .collect();
    assert_eq!(lossy.lost_sample, expected);
    assert_eq!(lossy.lost_by_last_answer.get("404"), Some(&10));
    assert_eq!(bench::exit_status(&report), 1);

    let text = report.to_text();
    assert!(text.contains("LOST: 10 acknowledged key(s)"), "{text}");
    assert!(text.contains("/it-lossy-00000007"), "{text}");
}
