//! The raft transport between real transports on loopback (etcd's
//! `functional_test.go`, plus the failure cases): every message type over streams,
//! the pipeline fallback, snapshots, reconnection after a restart, hostile requests
//! on the raft port, and bounded queues for a dead peer.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use protobuf::ProtobufEnum;
use raft::SnapshotStatus;
use raft::eraftpb::{Entry, Message, MessageType};
use raftexample::rafthttp::msg_codec::{Decoded, Decoder, MessageDecoder};
use raftexample::rafthttp::msgappv2_codec::MsgAppV2Decoder;
use raftexample::rafthttp::{ProcessError, Raft, Transport, TransportConfig, serve};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};

use crate::support::free_port;

const CLUSTER: u64 = 0x1000;
const DEADLINE: Duration = Duration::from_secs(20);

/// Records what the transport hands to raft.
pub struct FakeRaft {
    tx: mpsc::UnboundedSender<Message>,
    unreachable: AtomicUsize,
    snapshots: Mutex<Vec<(u64, SnapshotStatus)>>,
    removed: Mutex<HashSet<u64>>,
}

impl Raft for FakeRaft {
    fn process(&self, m: Message) -> BoxFuture<'static, Result<(), ProcessError>> {
        let r = self.tx.send(m).map_err(|_| ProcessError::Stopped);
        Box::pin(async move { r })
    }
    fn is_id_removed(&self, id: u64) -> bool {
        self.removed.lock().unwrap().contains(&id)
    }
    fn report_unreachable(&self, _id: u64) {
        self.unreachable.fetch_add(1, Ordering::Relaxed);
    }
    fn report_snapshot(&self, id: u64, status: SnapshotStatus) {
        self.snapshots.lock().unwrap().push((id, status));
    }
}

/// A transport served on a loopback listener, with what it received.
pub struct Node {
    pub url: String,
    pub addr: SocketAddr,
    pub tr: Transport,
    pub raft: Arc<FakeRaft>,
    pub rx: mpsc::UnboundedReceiver<Message>,
    /// POST /raft requests served (pipeline use).
    pub pipeline_posts: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Node {
    /// On a port from `free_port`: outside the ephemeral range, so a test that stops the
    /// node and binds its address again cannot find it taken by an outgoing connection.
    pub async fn start(id: u64) -> Node {
        let listener = TcpListener::bind(("127.0.0.1", free_port())).await;
        Node::on(id, listener.expect("bind a free port")).await
    }

    pub async fn on(id: u64, listener: TcpListener) -> Node {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let raft = Arc::new(FakeRaft {
            tx,
            unreachable: AtomicUsize::new(0),
            snapshots: Mutex::new(Vec::new()),
            removed: Mutex::new(HashSet::new()),
        });
        let tr = Transport::new(
            TransportConfig {
                id,
                cluster_id: CLUSTER,
            },
            raft.clone(),
        );
        let posts = Arc::new(AtomicUsize::new(0));
        let counter = posts.clone();
        let router = tr.handler().layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                if req.uri().path() == "/raft" {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                next.run(req)
            },
        ));
        let (stx, srx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            raftexample::http_server::Limits::default(),
            async move {
                let _ = srx.await;
            },
        ));
        Node {
            url: format!("http://{addr}"),
            addr,
            tr,
            raft,
            rx,
            pipeline_posts: posts,
            shutdown: Some(stx),
            server: Some(server),
        }
    }

    /// Stops the transport and the server, waiting for the server to finish: this
    /// also proves open streams do not hold up a graceful shutdown.
    pub async fn stop(&mut self) {
        self.tr.stop();
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            timeout(DEADLINE, h)
                .await
                .expect("server shut down")
                .unwrap()
                .unwrap();
        }
    }

    /// Receives one message or fails after the deadline.
    pub async fn recv(&mut self) -> Message {
        timeout(DEADLINE, self.rx.recv())
            .await
            .expect("message arrives")
            .unwrap()
    }
}

/// Polls `f` until it holds, failing after the deadline.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn msg(t: MessageType, from: u64, to: u64, index: u64) -> Message {
    let mut m = Message::new();
    (m.msg_type, m.from, m.to, m.term, m.index, m.log_term) = (t, from, to, 1, index, 1);
    m
}

/// Two nodes that know each other, with all four streams attached.
async fn connected_pair() -> (Node, Node) {
    let a = Node::start(1).await;
    let b = Node::start(2).await;
    a.tr.add_peer(2, std::slice::from_ref(&b.url));
    b.tr.add_peer(1, std::slice::from_ref(&a.url));
    for (n, peer) in [(&a, 2), (&b, 1)] {
        wait_until("streams attach", || {
            n.tr.peer_status(peer)
                .is_some_and(|s| s.msgapp_stream && s.message_stream)
        })
        .await;
    }
    (a, b)
}

#[tokio::test]
async fn streams_carry_every_message_type() {
    let (mut a, mut b) = connected_pair().await;
    assert!(a.tr.active_since(2).is_some());
    let types: Vec<MessageType> = MessageType::values()
        .iter()
        .copied()
        .filter(|t| *t != MessageType::MsgSnapshot)
        .collect();
    let mut sent = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let mut m = msg(*t, 1, 2, i as u64);
        if *t == MessageType::MsgAppend {
            let mut e = Entry::new();
            (e.term, e.index, e.data) = (1, i as u64 + 1, Bytes::from_static(b"put"));
            m.entries.push(e);
        }
        sent.push(m);
    }
    a.tr.send(sent.clone());
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        got.push(b.recv().await);
    }
    // Two streams: order is kept per stream, not across them.
    let key = |m: &Message| (m.msg_type.value(), m.index);
    let mut want = sent.clone();
    want.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, want);
    assert_eq!(
        b.pipeline_posts.load(Ordering::Relaxed),
        0,
        "nothing went over the pipeline"
    );

    // And the other direction.
    b.tr.send(vec![msg(MessageType::MsgHeartbeatResponse, 2, 1, 0)]);
    assert_eq!(a.recv().await.msg_type, MessageType::MsgHeartbeatResponse);
    // A message to an unknown peer or to 0 is skipped without harm.
    a.tr.send(vec![
        msg(MessageType::MsgHeartbeat, 1, 9, 0),
        msg(MessageType::MsgHeartbeat, 1, 0, 0),
    ]);

    wait_until("a probe round trip is recorded", || {
        a.tr.peer_status(2).is_some_and(|s| s.last_rtt.is_some())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn falls_back_to_pipeline_without_streams() {
    // B does not know A, so it never dials A's streams: A must use the pipeline.
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    a.tr.add_peer(2, std::slice::from_ref(&b.url));
    let mut app = msg(MessageType::MsgAppend, 1, 2, 5);
    app.entries.push(Entry::new());
    a.tr.send(vec![app.clone(), msg(MessageType::MsgHeartbeat, 1, 2, 0)]);
    let got: BTreeSet<i32> = [b.recv().await, b.recv().await]
        .iter()
        .map(|m| m.msg_type.value())
        .collect();
    assert_eq!(
        got,
        [
            MessageType::MsgAppend.value(),
            MessageType::MsgHeartbeat.value()
        ]
        .into()
    );
    assert_eq!(b.pipeline_posts.load(Ordering::Relaxed), 2);
    // (A's stream dials keep failing with 404 since B does not know A, so A's view
    // of B flips between active and inactive, as in etcd.)
    let s = a.tr.peer_status(2).unwrap();
    assert!(!s.msgapp_stream && !s.message_stream);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn snapshot_goes_in_its_own_request() {
    let (mut a, mut b) = connected_pair().await;
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    let mut m = msg(MessageType::MsgSnapshot, 1, 2, 0);
    m.mut_snapshot().data = Bytes::from(data.clone());
    m.mut_snapshot().mut_metadata().index = 42;
    a.tr.send(vec![m]);
    let got = b.recv().await;
    assert_eq!(got.msg_type, MessageType::MsgSnapshot);
    assert_eq!(got.get_snapshot().get_metadata().index, 42);
    assert!(
        got.get_snapshot().data == data,
        "snapshot data arrives intact"
    );
    wait_until("sender reports Finish", || {
        a.raft
            .snapshots
            .lock()
            .unwrap()
            .contains(&(2, SnapshotStatus::Finish))
    })
    .await;

    // To a stopped peer: Failure, and unreachable.
    b.stop().await;
    let mut m = msg(MessageType::MsgSnapshot, 1, 2, 0);
    m.mut_snapshot().data = Bytes::from_static(b"x");
    a.tr.send(vec![m]);
    wait_until("sender reports Failure", || {
        a.raft
            .snapshots
            .lock()
            .unwrap()
            .contains(&(2, SnapshotStatus::Failure))
    })
    .await;
    assert!(a.raft.unreachable.load(Ordering::Relaxed) > 0);
    a.stop().await;
}

#[tokio::test]
async fn restarted_peer_is_reconnected() {
    let (mut a, mut b) = connected_pair().await;
    a.tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 0)]);
    b.recv().await;

    let addr = b.addr;
    b.stop().await;
    wait_until("a sees its streams to b drop", || {
        a.tr.peer_status(2)
            .is_some_and(|s| !s.msgapp_stream && !s.message_stream)
    })
    .await;
    wait_until("a marks b inactive", || a.tr.active_since(2).is_none()).await;
    // Sending meanwhile fails (pipeline to a closed port) and is reported.
    a.tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 0)]);
    wait_until("unreachable reported", || {
        a.raft.unreachable.load(Ordering::Relaxed) > 0
    })
    .await;

    // Same address, new process state.
    let mut b = Node::on(2, TcpListener::bind(addr).await.unwrap()).await;
    b.tr.add_peer(1, std::slice::from_ref(&a.url));
    wait_until("a's streams to b re-attach", || {
        a.tr.peer_status(2)
            .is_some_and(|s| s.msgapp_stream && s.message_stream)
    })
    .await;
    let mut app = msg(MessageType::MsgAppend, 1, 2, 7);
    app.entries.push(Entry::new());
    a.tr.send(vec![app]);
    let got = b.recv().await;
    assert_eq!((got.msg_type, got.index), (MessageType::MsgAppend, 7));
    assert_eq!(
        b.pipeline_posts.load(Ordering::Relaxed),
        0,
        "went over the stream"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn dead_peer_queues_stay_bounded() {
    let mut a = Node::start(1).await;
    // A port nobody listens on (and nobody in this suite will: see `free_port`).
    let dead = format!("127.0.0.1:{}", free_port());
    a.tr.add_peer(3, &[format!("http://{dead}")]);
    let n = 50_000;
    for chunk in 0..50 {
        let batch = (0..n / 50)
            .map(|i| msg(MessageType::MsgHeartbeat, 1, 3, chunk * 1000 + i))
            .collect();
        a.tr.send(batch);
    }
    let s = a.tr.peer_status(3).unwrap();
    assert!(
        s.queued <= 64,
        "only the pipeline queue holds messages: {}",
        s.queued
    );
    let dropped = a.raft.unreachable.load(Ordering::Relaxed);
    assert!(
        dropped as u64 >= n - 64 - 4,
        "drops reported to raft: {dropped}"
    );
    a.stop().await;
}

/// A raw HTTP client for hostile requests.
fn raw_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: Vec<u8>,
}

fn good_headers(from: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("x-server-from", from),
        ("x-server-version", "3.4.23"),
        ("x-min-cluster-version", "3.0.0"),
        ("x-etcd-cluster-id", "1000"),
    ]
}

async fn call(node: &Node, r: Req<'_>) -> (u16, String) {
    let mut b = hyper::Request::builder()
        .method(r.method)
        .uri(format!("{}{}", node.url, r.path));
    for (k, v) in r.headers {
        b = b.header(k, v);
    }
    let resp = raw_client()
        .request(b.body(Full::new(Bytes::from(r.body))).unwrap())
        .await
        .unwrap();
    let code = resp.status().as_u16();
    if code == 200 && r.path.starts_with("/raft/stream") {
        return (code, String::new()); // the body never ends
    }
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_the_transport_keeps_working() {
    let (mut a, mut b) = connected_pair().await;
    b.raft.removed.lock().unwrap().insert(7);
    let hb = {
        use protobuf::Message as _;
        msg(MessageType::MsgHeartbeat, 1, 2, 0)
            .write_to_bytes()
            .unwrap()
    };
    let with = |mut h: Vec<(&'static str, &'static str)>, k: &'static str, v: &'static str| {
        h.retain(|(n, _)| *n != k);
        h.push((k, v));
        h
    };
    let stream_headers = with(good_headers("1"), "x-raft-to", "2");
    // 2^18 + 1 empty entries: 512 KiB on the wire, 27 MB decoded (a 512 MiB body, 27 GB).
    let entry_flood = [0x3a, 0x00].repeat((1 << 18) + 1);
    let cases: Vec<(Req, u16, &str)> = vec![
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: good_headers("1"),
                body: entry_flood,
            },
            400,
            "error unmarshalling raft message\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: good_headers("1"),
                body: b"\xff\xff\xff garbage".to_vec(),
            },
            400,
            "error unmarshalling raft message\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: with(good_headers("1"), "x-etcd-cluster-id", "1001"),
                body: hb.clone(),
            },
            412,
            "cluster ID mismatch\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: with(good_headers("1"), "x-server-version", "not-semver"),
                body: hb.clone(),
            },
            412,
            "incompatible version\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: with(good_headers("1"), "x-server-version", "2.3.0"),
                body: hb.clone(),
            },
            412,
            "incompatible version\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: vec![("x-etcd-cluster-id", "1000")],
                body: hb.clone(),
            },
            412,
            "incompatible version\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft",
                headers: with(good_headers("1"), "content-length", "99999999999"),
                body: Vec::new(),
            },
            413,
            "raft message too large\n",
        ),
        (
            Req {
                method: "GET",
                path: "/raft",
                headers: good_headers("1"),
                body: Vec::new(),
            },
            405,
            "",
        ),
        (
            Req {
                method: "GET",
                path: "/raft/stream/message/9",
                headers: with(stream_headers.clone(), "x-server-from", "9"),
                body: Vec::new(),
            },
            404,
            "error sender not found\n",
        ),
        (
            Req {
                method: "GET",
                path: "/raft/stream/message/zz",
                headers: stream_headers.clone(),
                body: Vec::new(),
            },
            404,
            "invalid from\n",
        ),
        (
            Req {
                method: "GET",
                path: "/raft/stream/msgappv2/1",
                headers: stream_headers.clone(),
                body: Vec::new(),
            },
            404,
            "invalid path\n",
        ),
        (
            Req {
                method: "GET",
                path: "/raft/stream/message/1",
                headers: with(stream_headers.clone(), "x-raft-to", "3"),
                body: Vec::new(),
            },
            412,
            "to field mismatch\n",
        ),
        (
            Req {
                method: "GET",
                path: "/raft/stream/message/1",
                headers: with(stream_headers.clone(), "x-etcd-cluster-id", "1"),
                body: Vec::new(),
            },
            412,
            "cluster ID mismatch\n",
        ),
        (
            Req {
                method: "GET",
                path: "/raft/stream/message/7",
                headers: stream_headers.clone(),
                body: Vec::new(),
            },
            410,
            "removed member\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft/snapshot",
                headers: good_headers("1"),
                body: b"\x00\x00\x00\x00\x00\x00\x00\x02\x08\x08".to_vec(),
            },
            400,
            "wrong raft message type\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft/snapshot",
                headers: good_headers("1"),
                body: b"\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
            },
            413,
            "snapshot too large\n",
        ),
        (
            Req {
                method: "POST",
                path: "/raft/snapshot",
                headers: good_headers("1"),
                body: b"\x00\x00".to_vec(),
            },
            400,
            "failed to decode raft message (unexpected EOF)\n",
        ),
        (
            Req {
                method: "GET",
                path: "/nope",
                headers: Vec::new(),
                body: Vec::new(),
            },
            404,
            "",
        ),
    ];
    for (req, code, body) in cases {
        let what = format!("{} {} {:?}", req.method, req.path, req.headers.last());
        let got = call(&b, req).await;
        assert_eq!(got, (code, body.to_string()), "{what}");
    }
    // A removed sender's post is refused with 403.
    {
        use protobuf::Message as _;
        let from_removed = msg(MessageType::MsgHeartbeat, 7, 2, 0)
            .write_to_bytes()
            .unwrap();
        let req = Req {
            method: "POST",
            path: "/raft",
            headers: good_headers("7"),
            body: from_removed,
        };
        assert_eq!(call(&b, req).await, (403, "removed member\n".to_string()));
    }
    // A valid post works, and the probe endpoint answers Go's JSON.
    let ok = Req {
        method: "POST",
        path: "/raft",
        headers: good_headers("1"),
        body: hb.clone(),
    };
    assert_eq!(call(&b, ok).await.0, 204);
    assert_eq!(b.recv().await.msg_type, MessageType::MsgHeartbeat);
    let (code, body) = call(
        &b,
        Req {
            method: "GET",
            path: "/raft/probing",
            headers: Vec::new(),
            body: Vec::new(),
        },
    )
    .await;
    assert_eq!(code, 200);
    assert!(body.starts_with("{\"OK\":true,\"Now\":\""), "{body}");

    // Nothing above disturbed the real streams (a hijacked stream would have
    // replaced one; wait for it to re-attach).
    wait_until("streams attached", || {
        a.tr.peer_status(2)
            .is_some_and(|s| s.msgapp_stream && s.message_stream)
    })
    .await;
    a.tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 3)]);
    assert_eq!(b.recv().await.index, 3);

    // Once B considers A removed, A's stream dials get 410 and A learns it.
    let mut removed = a.tr.member_removed();
    assert!(!*removed.borrow());
    b.raft.removed.lock().unwrap().insert(1);
    b.tr.remove_peer(1); // ends A's current streams, so A redials
    timeout(DEADLINE, removed.wait_for(|r| *r))
        .await
        .expect("A learns it was removed")
        .unwrap();
    a.stop().await;
    b.stop().await;
}

/// Opens a raw stream as member `from` would, returning the open response body.
async fn raw_stream(
    node: &Node,
    kind: &str,
    from: &'static str,
    to: &'static str,
) -> hyper::body::Incoming {
    let mut b = hyper::Request::builder().uri(format!("{}/raft/stream/{kind}/{from}", node.url));
    for (k, v) in good_headers(from) {
        b = b.header(k, v);
    }
    b = b.header("x-raft-to", to);
    let resp = raw_client()
        .request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-server-version"], "3.4.23");
    assert_eq!(resp.headers()["x-etcd-cluster-id"], "1000");
    resp.into_body()
}

/// Reads frames from a raw stream body until `f` has seen what it wants.
async fn read_frames(
    body: &mut hyper::body::Incoming,
    dec: &mut dyn Decoder,
    mut done: impl FnMut(&Message) -> bool,
) -> Vec<Message> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        while let Decoded::Message(m) = dec.decode(&mut buf).unwrap() {
            let stop = done(&m);
            out.push(m);
            if stop {
                return out;
            }
        }
        let frame = timeout(DEADLINE, body.frame())
            .await
            .expect("frame in time");
        let data = frame
            .expect("stream still open")
            .unwrap()
            .into_data()
            .unwrap();
        buf.extend_from_slice(&data);
    }
}

#[tokio::test]
async fn a_new_stream_replaces_the_old_one_and_speaks_etcd_framing() {
    let (mut a, mut b) = connected_pair().await;
    // Take B away so it does not redial and take its streams back.
    b.stop().await;
    wait_until("streams drop", || {
        a.tr.peer_status(2).is_some_and(|s| !s.message_stream)
    })
    .await;

    let mut first = raw_stream(&a, "message", "2", "1").await;
    wait_until("raw stream attached", || {
        a.tr.peer_status(2).is_some_and(|s| s.message_stream)
    })
    .await;
    a.tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 11)]);
    let got = read_frames(&mut first, &mut MessageDecoder::default(), |m| {
        m.index == 11
    })
    .await;
    assert_eq!(got.last().unwrap().msg_type, MessageType::MsgHeartbeat);
    // Idle: a link heartbeat (from 0 to 0) arrives within the heartbeat period.
    let got = read_frames(&mut first, &mut MessageDecoder::default(), |m| {
        m.from == 0 && m.to == 0
    })
    .await;
    assert_eq!(got.last().unwrap().msg_type, MessageType::MsgHeartbeat);

    // A second dial replaces the first: the first response ends.
    let mut second = raw_stream(&a, "message", "2", "1").await;
    loop {
        match timeout(DEADLINE, first.frame())
            .await
            .expect("first stream ends")
        {
            None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("first stream failed instead of ending: {e}"),
        }
    }
    a.tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 12)]);
    read_frames(&mut second, &mut MessageDecoder::default(), |m| {
        m.index == 12
    })
    .await;

    // msgappv2: consecutive appends arrive through the compact encoding.
    let mut app = raw_stream(&a, "msgapp", "2", "1").await;
    wait_until("msgapp attached", || {
        a.tr.peer_status(2).is_some_and(|s| s.msgapp_stream)
    })
    .await;
    let appends: Vec<Message> = (0..3)
        .map(|i| {
            let mut m = msg(MessageType::MsgAppend, 1, 2, i);
            let mut e = Entry::new();
            (e.term, e.index) = (1, i + 1);
            m.entries.push(e);
            m
        })
        .collect();
    a.tr.send(appends.clone());
    let mut dec = MsgAppV2Decoder::new(2, 1);
    let got = read_frames(&mut app, &mut dec, |m| m.index == 2).await;
    let got: Vec<Message> = got
        .into_iter()
        .filter(|m| m.msg_type == MessageType::MsgAppend)
        .collect();
    assert_eq!(got, appends);
    a.stop().await;
}

#[tokio::test]
async fn garbage_on_a_stream_is_survived_and_redials_are_rate_limited() {
    // A fake peer that answers every stream dial with garbage.
    let dials = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let d = dials.clone();
    let fake = axum::Router::new().route(
        "/raft/stream/message/{from}",
        axum::routing::get(move || {
            d.lock().unwrap().push(Instant::now());
            async {
                (
                    [("x-server-version", "3.4.23")],
                    b"\x00\x00\x00\x00\x00\x00\x00\x03\xff\xff\xff".to_vec(),
                )
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, fake).await });

    let (mut a, mut b) = connected_pair().await;
    a.tr.add_peer(5, &[fake_url]);
    wait_until("several redials", || dials.lock().unwrap().len() >= 8).await;
    let t = dials.lock().unwrap().clone();
    let span = t[t.len() - 1] - t[0];
    let allowed = (span.as_millis() / 100) as usize + 2;
    assert!(
        t.len() <= allowed,
        "{} dials in {span:?}: not rate limited",
        t.len()
    );
    // The transport still works for its healthy peer.
    a.tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 21)]);
    assert_eq!(b.recv().await.index, 21);
    a.tr.remove_peer(5);
    assert!(a.tr.peer_status(5).is_none());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn send_and_add_peer_work_from_a_thread_outside_the_runtime() {
    // The raft node calls the transport from its own OS thread (with its own
    // current-thread runtime), not from a worker of the transport's runtime.
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    b.tr.add_peer(1, std::slice::from_ref(&a.url));
    let (tr, url) = (a.tr.clone(), b.url.clone());
    std::thread::spawn(move || {
        tr.add_peer(2, &[url]);
        tr.send(vec![msg(MessageType::MsgHeartbeat, 1, 2, 31)]);
    })
    .join()
    .unwrap();
    assert_eq!(b.recv().await.index, 31);
    let tr = a.tr.clone();
    std::thread::spawn(move || {
        tr.update_peer(2, &[]);
        tr.remove_peer(2);
    })
    .join()
    .unwrap();
    assert!(a.tr.peer_status(2).is_none());
    a.stop().await;
    b.stop().await;
}
