//! Beyond the Go original: linearizable requests, `/health` `/status` `/metrics`, graceful
//! shutdown, and the extra flags, as a user sees them on real processes.

use std::time::{Duration, Instant};

use crate::support::process::{BIN, NodeProcess, ProcessCluster};
use crate::support::{
    free_port, http, http_with_headers, metric, poll_until, put_range, wait_all_keys,
};

const T: Duration = Duration::from_secs(30);
const LIN: [(&str, &str); 1] = [("X-Linearizable", "true")];

async fn status(raft_url: &str) -> Option<serde_json::Value> {
    let r = http("GET", &format!("{raft_url}/status"), b"").await.ok()?;
    serde_json::from_slice(&r.body).ok()
}

/// The leader's id once every running node agrees on one.
async fn agreed_leader(raft_urls: &[String]) -> u64 {
    poll_until(T, "a leader every node agrees on", || async {
        let mut leader = None;
        for u in raft_urls {
            let l = status(u).await?.get("leader")?.as_u64()?;
            if l == 0 || leader.is_some_and(|x| x != l) {
                return None;
            }
            leader = Some(l);
        }
        leader
    })
    .await
}

/// A linearizable PUT, once answered, is seen by a linearizable GET on every node at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_put_is_read_everywhere_immediately() {
    let mut c = ProcessCluster::start(3, &[]);
    agreed_leader(&c.peers).await;
    for round in 0..5 {
        let via = round % 3 + 1;
        let val = format!("v{round}");
        let r = http_with_headers("PUT", &c.node(via).url("/lin"), val.as_bytes(), &LIN)
            .await
            .expect("PUT");
        assert_eq!(r.status, 204, "{r:?}");
        for id in 1..=3 {
            let r = http_with_headers("GET", &c.node(id).url("/lin"), b"", &LIN)
                .await
                .expect("GET");
            assert_eq!((r.status, &r.body[..]), (200, val.as_bytes()), "node {id}");
        }
    }
}

/// With 2 of 3 nodes down there is no quorum: linearizable requests get 503 within the
/// request timeout, never hang; plain GETs still answer from the local map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_linearizable_requests_get_503() {
    let mut c = ProcessCluster::start(3, &["--request-timeout", "1s"]);
    agreed_leader(&c.peers).await;
    let r = http_with_headers("PUT", &c.node(1).url("/k"), b"v", &LIN)
        .await
        .expect("PUT");
    assert_eq!(r.status, 204);
    c.node(2).kill9();
    c.node(3).kill9();
    for method in ["PUT", "GET"] {
        let started = Instant::now();
        let r = http_with_headers(method, &c.node(1).url("/k"), b"v2", &LIN)
            .await
            .expect("answered");
        assert_eq!(r.status, 503, "{method}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{method} took {:?}",
            started.elapsed()
        );
        assert!(!r.body.is_empty(), "503 says why");
    }
    let r = http("GET", &c.node(1).url("/k"), b"").await.expect("GET");
    assert_eq!((r.status, &r.body[..]), (200, &b"v"[..]));
    // check_quorum: the isolated node stops calling itself healthy.
    poll_until(T, "node 1 unhealthy without a quorum", || async {
        let r = http("GET", &format!("{}/health", c.peers[0]), b"")
            .await
            .ok()?;
        (r.status == 503).then_some(())
    })
    .await;
}

/// /health, /status and /metrics report the leader and advance as writes happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_follow_the_cluster() {
    let mut c = ProcessCluster::start(3, &[]);
    let leader = agreed_leader(&c.peers).await;
    let raft1 = c.peers[0].clone();
    let r = http("GET", &format!("{raft1}/health"), b"")
        .await
        .expect("health");
    let health: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        (r.status, &health),
        (200, &serde_json::json!({"health": "true"}))
    );

    let before = status(&raft1).await.expect("status");
    assert_eq!(before["id"], 1);
    assert_eq!(before["leader"], leader);
    assert!(["leader", "follower"].contains(&before["state"].as_str().expect("state")));
    let peers = before["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert_eq!(p["active"], true, "{p}");
        assert!(
            p["url"]
                .as_str()
                .expect("url")
                .starts_with("http://127.0.0.1:")
        );
    }
    // The transport probes peers every few seconds and keeps the round-trip time.
    poll_until(T, "a probed round-trip time", || async {
        let st = status(&raft1).await?;
        st["peers"][0]["last_rtt_ms"].as_f64()
    })
    .await;
    let applied_before = before["applied"].as_u64().expect("applied");
    let metric_before = metric(&raft1, "raftexample_applied_index").await;

    put_range(&c.node(2).url(""), "ops", 0..20, 2).await;
    wait_all_keys(&c.node(1).url(""), "ops", 0..20, T).await;
    let after = status(&raft1).await.expect("status");
    assert!(
        after["applied"].as_u64().expect("applied") >= applied_before + 20,
        "{after}"
    );
    assert!(after["commit"].as_u64() >= after["applied"].as_u64());
    assert!(after["wal_bytes"].as_u64().expect("wal") > 0);
    assert!(metric(&raft1, "raftexample_applied_index").await >= metric_before + 20.0);
    let leader_url = c.peers[leader as usize - 1].clone();
    assert_eq!(metric(&leader_url, "raftexample_is_leader").await, 1.0);
    let r = http("GET", &format!("{raft1}/metrics"), b"")
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&r.body);
    for name in [
        "raftexample_proposals_accepted_total",
        "raftexample_wal_fsync_duration_seconds_bucket",
        "raftexample_ready_batch_entries_bucket",
        "raftexample_http_requests_total",
        "raftexample_leader_changes_total",
        "raftexample_peer_messages_sent_total{peer=\"2\"}",
        "raftexample_peer_stream_reconnects_total{peer=\"3\"}",
    ] {
        assert!(text.contains(name), "/metrics has {name}");
    }
}

/// SIGTERM to the leader: it hands leadership over before exiting (0), the others elect no
/// one by timeout but take over at once, and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_leader_hands_over_leadership() {
    let mut c = ProcessCluster::start(3, &[]);
    let leader = agreed_leader(&c.peers).await;
    let others: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    put_range(&c.node(others[0]).url(""), "pre", 0..100, 4).await;

    let status_code = c.node(leader).terminate(T);
    assert!(status_code.success(), "exit after SIGTERM: {status_code}");
    assert!(
        c.node(leader).logs().contains("leadership handed over"),
        "the leader handed over before exiting"
    );
    let rest: Vec<String> = others
        .iter()
        .map(|&i| c.peers[i as usize - 1].clone())
        .collect();
    let new_leader = agreed_leader(&rest).await;
    assert_ne!(new_leader, leader);

    put_range(&c.node(others[1]).url(""), "post", 0..100, 4).await;
    for &id in &others {
        wait_all_keys(&c.node(id).url(""), "pre", 0..100, T).await;
        wait_all_keys(&c.node(id).url(""), "post", 0..100, T).await;
    }
    c.node(leader).start();
    wait_all_keys(&c.node(leader).url(""), "post", 0..100, T).await;
}

/// Every flag beyond the Go original does what `--help` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flag_is_honoured() {
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--cluster",
        "--id",
        "--port",
        "--join",
        "--data-dir",
        "--snapshot-count",
        "--snapshot-catchup-entries",
        "--request-timeout",
        "--cluster-token",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help documents {flag}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let raft = format!("http://127.0.0.1:{}", free_port());
    let kv = free_port();
    let mut n = NodeProcess::spawn(
        1,
        &raft,
        kv,
        dir.path(),
        &[
            "--data-dir",
            "nested/data",
            "--snapshot-count",
            "10",
            "--snapshot-catchup-entries",
            "5",
            "--log-format",
            "json",
            "--request-timeout",
            "2s",
        ],
    );
    put_range(&n.url(""), "f", 0..30, 1).await;
    wait_all_keys(&n.url(""), "f", 0..30, T).await;
    let data = dir.path().join("nested/data");
    assert!(data.join("raftexample-1").is_dir(), "WAL under --data-dir");
    let snap_dir = data.join("raftexample-1-snap");
    let snaps = poll_until(T, "a snapshot after 10 entries", || async {
        let n = std::fs::read_dir(&snap_dir)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
            .count();
        (n > 0).then_some(n)
    })
    .await;
    assert!(snaps > 0);
    // The file is written off the raft loop, which records the snapshot once it is durable.
    poll_until(T, "/status reports the snapshot", || async {
        let st = status(&raft).await?;
        (st["snapshot_index"].as_u64()? >= 10).then_some(())
    })
    .await;
    let logs = n.logs();
    let first = logs.lines().next().expect("a log line");
    serde_json::from_str::<serde_json::Value>(first).expect("--log-format json writes JSON lines");
    // A restart from the snapshot plus the WAL tail keeps every key.
    n.kill9();
    n.start();
    wait_all_keys(&n.url(""), "f", 0..30, T).await;
    // A bad flag value is refused with a message, before anything starts.
    let out = std::process::Command::new(BIN)
        .args(["--request-timeout", "soon"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("request-timeout"));
}

/// One request on an open connection, written and read by hand so that it is sure to use
/// that connection; the status code.
async fn request_on(c: &mut tokio::net::TcpStream, method: &str, path: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).await.expect("write");
    c.write_all(body).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    // Only the status matters: the answer is read up to the end of its header, and a
    // connection is not used again after an answer with a body (the test's last request).
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(T, c.read(&mut buf))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let status = String::from_utf8_lossy(&got[..12.min(got.len())]).into_owned();
    status
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a response: {status:?}"))
}

/// Hundreds of idle connections (no request, nothing to authenticate) used to take every file
/// descriptor the node had; its next snapshot failed with "Too many open files" and the node
/// stopped. Now each server caps its connections below the limit: the node goes on writing
/// snapshots, and the waiting clients are served once the flood goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_does_not_stop_the_node() {
    // The flood needs descriptors in this process too.
    raftexample::http_server::raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = format!("http://127.0.0.1:{}", free_port());
    let mut n = NodeProcess::spawn_with_fd_limit(
        1,
        &raft,
        free_port(),
        dir.path(),
        &["--snapshot-count", "20", "--snapshot-catchup-entries", "5"],
        128,
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], n.kv_port));
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert_eq!(request_on(&mut client, "PUT", "/before", b"v").await, 204);

    // More than the 128 descriptors the node has; those beyond its cap wait in the accept
    // queue (128 long at least), so none of these connects blocks.
    let mut flood = Vec::new();
    for _ in 0..120 {
        flood.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    for i in 0..100 {
        let key = format!("/k-{i}");
        let val = format!("val-{i}");
        assert_eq!(
            request_on(&mut client, "PUT", &key, val.as_bytes()).await,
            204,
            "{key}"
        );
    }
    poll_until(T, "snapshots taken during the flood", || async {
        let s = status(&raft).await?;
        (s.get("snapshot_index")?.as_u64()? >= 80).then_some(())
    })
    .await;
    assert!(n.is_running(), "node stopped:\n{}", n.logs());
    assert_eq!(request_on(&mut client, "GET", "/nope", b"").await, 404);

    drop(flood);
    // New clients are served again; a PUT is answered before it is applied, so poll.
    wait_all_keys(&n.url(""), "k", 0..100, T).await;
    assert!(!n.logs().contains("Too many open files"), "{}", n.logs());
}
