//! The README flows, on real processes: replication, fault tolerance, restarts.

use std::time::Duration;

use crate::support::process::ProcessCluster;
use crate::support::{http, poll_until, wait_for_value};

const T: Duration = Duration::from_secs(30);

/// PUTs `key = val` on node `via` (retrying while the cluster elects its first leader).
async fn put(c: &mut ProcessCluster, via: u64, key: &str, val: &str) {
    let url = c.node(via).url(key);
    poll_until(T, &format!("PUT {url}"), || async {
        matches!(http("PUT", &url, val.as_bytes()).await, Ok(r) if r.status == 204).then_some(())
    })
    .await;
}

async fn wait_everywhere(c: &mut ProcessCluster, key: &str, val: &str) {
    for i in 0..c.nodes.len() {
        let url = c.nodes[i].url(key);
        if c.nodes[i].is_running() {
            wait_for_value(&url, val.as_bytes(), T).await;
        }
    }
}

/// A PUT on any node is readable from every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_every_put() {
    let mut c = ProcessCluster::start(3, &[]);
    for via in 1..=3 {
        let key = format!("/key-via-{via}");
        put(&mut c, via, &key, &format!("value-{via}")).await;
    }
    for via in 1..=3 {
        wait_everywhere(&mut c, &format!("/key-via-{via}"), &format!("value-{via}")).await;
    }
    // The rest of the API, on a live node.
    let r = http("GET", &c.node(2).url("/absent"), b"")
        .await
        .expect("GET");
    assert_eq!(r.status, 404);
    let r = http("PATCH", &c.node(2).url("/k"), b"")
        .await
        .expect("PATCH");
    assert_eq!(r.status, 405);
}

/// The Go README's fault-tolerance flow: stop node 2, write via 1, read via 3, restart 2 and
/// read the new value from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_tolerance_as_in_the_readme() {
    let mut c = ProcessCluster::start(3, &[]);
    put(&mut c, 1, "/my-key", "foo").await;
    wait_everywhere(&mut c, "/my-key", "foo").await;

    c.node(2).kill9();
    put(&mut c, 1, "/my-key", "bar").await;
    wait_for_value(&c.node(3).url("/my-key"), b"bar", T).await;

    c.node(2).start();
    wait_for_value(&c.node(2).url("/my-key"), b"bar", T).await;
}

/// Every committed key survives stopping all nodes, by SIGTERM and by kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_every_key() {
    let mut c = ProcessCluster::start(3, &[]);
    for i in 0..20 {
        put(&mut c, i % 3 + 1, &format!("/k{i}"), &format!("v{i}")).await;
    }
    for i in 0..20 {
        wait_everywhere(&mut c, &format!("/k{i}"), &format!("v{i}")).await;
    }

    for id in 1..=3 {
        let status = c.node(id).terminate(T);
        assert!(status.success(), "node {id} exit after SIGTERM: {status}");
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    for i in 0..20 {
        wait_everywhere(&mut c, &format!("/k{i}"), &format!("v{i}")).await;
    }
    put(&mut c, 2, "/after-sigterm", "yes").await;
    wait_everywhere(&mut c, "/after-sigterm", "yes").await;

    for id in 1..=3 {
        c.node(id).kill9();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    for i in 0..20 {
        wait_everywhere(&mut c, &format!("/k{i}"), &format!("v{i}")).await;
    }
    wait_everywhere(&mut c, "/after-sigterm", "yes").await;
}

/// Posts one raft message to a node's pipeline path, as a peer would.
async fn post_raft(raft_url: &str, m: &raft::eraftpb::Message) -> crate::support::Reply {
    use protobuf::Message as _;
    let headers = [
        ("X-Etcd-Cluster-ID", "1000"),
        ("X-Server-Version", "3.4.23"),
        ("X-Min-Cluster-Version", "3.0.0"),
        ("X-Server-From", "2"),
        ("Content-Type", "application/protobuf"),
    ];
    let body = m.write_to_bytes().expect("encode");
    crate::support::http_with_headers("POST", &format!("{raft_url}/raft"), &body, &headers)
        .await
        .expect("answered")
}

/// Anyone who knows the cluster id (`1000`, the same in every raftexample cluster) can post to
/// the raft port. A forged append that continues node 1's log at a higher term, with data this
/// program cannot apply, would be stored by raft-rs: the node would stop at that entry, and so
/// would every restart. Such appends, and the messages raft-rs panics on, are refused; node 1
/// keeps serving and restarts with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_are_refused_and_never_reach_the_wal() {
    use raft::eraftpb::{Entry, EntryType, Message, MessageType};
    let mut c = ProcessCluster::start(3, &[]);
    put(&mut c, 1, "/before", "1").await;
    wait_everywhere(&mut c, "/before", "1").await;
    let raft1 = c.peers[0].clone();
    // Node 1's term and the end of its log, once it has applied all it has.
    let status_url = format!("{raft1}/status");
    let (term, last) = poll_until(T, "node 1 to settle", || async {
        let r = http("GET", &status_url, b"").await.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let (commit, applied) = (v["commit"].as_u64()?, v["applied"].as_u64()?);
        (commit == applied && v["leader"].as_u64()? != 0).then_some((v["term"].as_u64()?, commit))
    })
    .await;

    let msg = |t: MessageType, from: u64, term: u64| {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.to = 1;
        m.from = from;
        m.term = term;
        m
    };
    let entry = |index: u64, kind: EntryType, data: Vec<u8>| {
        let mut e = Entry {
            index,
            term: term + 1,
            data: data.into(),
            ..Default::default()
        };
        e.set_entry_type(kind);
        e
    };
    // A new leader "2" at the next term, continuing node 1's log and committing the entry.
    let append = |e: Entry| {
        let mut m = msg(MessageType::MsgAppend, 2, term + 1);
        m.index = last;
        m.log_term = term;
        m.commit = e.index;
        m.set_entries(vec![e].into());
        m
    };
    let with_header = |payload: &[u8]| [&[7u8; 16][..], payload].concat();
    let valid = with_header(&raftexample::kvstore::encode("/forged", b"x", 0));
    // Snapshots from a new leader "2", far ahead of node 1.
    let snapshot = |meta_term: u64, data: Vec<u8>| {
        let mut m = msg(MessageType::MsgSnapshot, 2, term + 1);
        let s = m.mut_snapshot();
        s.data = data.into();
        let meta = s.mut_metadata();
        meta.index = last + 10;
        meta.term = meta_term;
        meta.mut_conf_state().voters = vec![1, 2, 3];
        m
    };
    // The raft node's part of a snapshot payload, wrapping `store` as the store's part.
    let snapshot_data = |store: &[u8]| {
        let none = std::collections::BTreeMap::<u64, u64>::new();
        let members = std::collections::BTreeMap::<u64, String>::new();
        let removed = std::collections::BTreeSet::<u64>::new();
        bincode::serialize(&(members, removed, none, serde_bytes::Bytes::new(store)))
            .expect("encode")
    };
    // Each with the reason the answer must give.
    let refused_at_the_door = [
        (
            "no session header",
            append(entry(last + 1, EntryType::EntryNormal, b"garbage".to_vec())),
        ),
        (
            "not a key-value proposal",
            append(entry(
                last + 1,
                EntryType::EntryNormal,
                with_header(b"\xff\xff"),
            )),
        ),
        (
            "not a valid conf change",
            append(entry(last + 1, EntryType::EntryConfChange, vec![0xff; 4])),
        ),
        (
            "non-consecutive entries",
            append(entry(last + 3, EntryType::EntryNormal, valid.clone())),
        ),
        ("a proposal of 4 bytes has no session header", {
            let mut m = msg(MessageType::MsgPropose, 2, 0);
            m.set_entries(vec![entry(0, EntryType::EntryNormal, b"junk".to_vec())].into());
            m
        }),
        ("neither can be 0", snapshot(0, snapshot_data(&[0; 8]))),
        (
            "not a raftexample snapshot",
            snapshot(term + 1, b"junk".to_vec()),
        ),
        (
            "not a key-value snapshot",
            snapshot(term + 1, snapshot_data(&[0xff; 12])),
        ),
        (
            "beyond any real cluster",
            msg(MessageType::MsgHeartbeat, 2, u64::MAX),
        ),
        (
            "claims to come from node 1",
            msg(MessageType::MsgHeartbeat, 1, term),
        ),
    ];
    for (what, m) in &refused_at_the_door {
        let r = post_raft(&raft1, m).await;
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{what}: {body}");
        assert!(body.contains("invalid raft message"), "{what}: {body}");
        assert!(body.contains(what), "{what}: {body}");
    }
    // A snapshot whose header is refused is answered before its data is read: here the data
    // announced never comes, and the answer must not wait for it.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = raftexample::rafthttp::msg_codec::encode_frame(&snapshot(0, Vec::new()))
            .expect("frame");
        let addr = raft1.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "POST /raft/snapshot HTTP/1.1\r\nHost: {addr}\r\nX-Etcd-Cluster-ID: 1000\r\n\
             X-Server-Version: 3.4.23\r\nX-Min-Cluster-Version: 3.0.0\r\nX-Server-From: 2\r\n\
             Content-Length: 1000000000\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).await.expect("write");
        conn.write_all(&head).await.expect("write");
        let mut answer = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("answered without the data")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    // These pass the door and are dropped by the loop, which knows the node's state.
    let mut beyond = msg(MessageType::MsgHeartbeat, 2, term + 1);
    beyond.commit = last + 1000;
    let mut ack = msg(MessageType::MsgAppendResponse, 2, term);
    ack.index = last + 1000;
    let refused_by_the_loop = [
        ("a commit beyond the log", beyond),
        ("an acknowledgement beyond the log", ack),
    ];
    for (what, m) in &refused_by_the_loop {
        let r = post_raft(&raft1, m).await;
        assert_eq!(
            r.status,
            204,
            "{what}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let refusals = (refused_at_the_door.len() + refused_by_the_loop.len()) as f64;
    poll_until(T, "node 1 to count every refusal", || async {
        (crate::support::metric(&raft1, "raftexample_peer_messages_refused_total").await
            >= refusals)
            .then_some(())
    })
    .await;

    assert!(c.node(1).is_running(), "node 1 still runs");
    put(&mut c, 1, "/after", "2").await;
    wait_everywhere(&mut c, "/after", "2").await;
    // Nothing forged reached the WAL: node 1 restarts from it with both writes.
    c.node(1).kill9();
    c.node(1).start();
    wait_for_value(&c.node(1).url("/before"), b"1", T).await;
    wait_for_value(&c.node(1).url("/after"), b"2", T).await;
    let r = http("GET", &c.node(1).url("/forged"), b"")
        .await
        .expect("GET");
    assert_eq!(r.status, 404, "no forged key");
}

/// A cluster started with `--cluster-token` works as any other, and refuses peers that send
/// raftexample's default cluster id (a node of another cluster, pointed at the wrong port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_token_keeps_other_clusters_out() {
    use raft::eraftpb::{Message, MessageType};
    let mut c = ProcessCluster::start(3, &["--cluster-token", "blue"]);
    put(&mut c, 2, "/k", "v").await;
    wait_everywhere(&mut c, "/k", "v").await;
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    (hb.to, hb.from, hb.term) = (1, 2, 1);
    let r = post_raft(&c.peers[0], &hb).await;
    assert_eq!(r.status, 412, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..], b"cluster ID mismatch\n");
}
