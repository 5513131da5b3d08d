//! The accept loop both HTTP servers run (the client API and the raft port), with the limits
//! Go's `net/http` server goes without.
//!
//! raftexample's Go servers accept every connection and wait forever for its request line.
//! Each connection holds a file descriptor, and so does every WAL segment and snapshot the
//! node creates: a flood of idle connections (no request, no authentication needed) used to
//! use up the process's descriptors, and the next snapshot failed with "Too many open files",
//! which stops the node. Here:
//!
//! - at startup the soft descriptor limit is raised to the hard one (Go's runtime does the
//!   same since Go 1.19), see [`raise_fd_limit`];
//! - each server holds at most [`Limits::max_connections`] connections, sized so that the
//!   node always keeps descriptors for its own files (see [`Limits::for_fd_limit`]); beyond
//!   that, new connections wait in the kernel's accept queue until one closes, they are not
//!   refused;
//! - a connection that does not send a whole request header within
//!   [`Limits::header_read_timeout`] is closed, which also ends idle keep-alive connections
//!   after that long;
//! - a request body that stops arriving for that long fails ([`BodyStalled`]): the handler
//!   answers an error and the connection closes. A body that keeps coming is not limited in
//!   time (a large snapshot on a slow link), and neither are responses (raft's streams).
//!
//! Go peers keep idle connections to us open with no time limit; when we close one after
//! 30 s, a pipeline message sent at that very moment fails once and raft sends it again.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// Descriptors each server leaves to the rest of the node when sizing its connection cap:
/// WAL segments, snapshot files, directories, the runtime's own, and outgoing peer
/// connections.
const RESERVED_FDS: u64 = 256;

/// The most connections a server holds, whatever the descriptor limit.
const MAX_CONNECTIONS: usize = 1 << 20;

/// How long a client has to send a request header (and how long a keep-alive connection may
/// sit idle). Generous: a slow client on a bad link still gets through.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Pauses after an accept error such as "too many open files", so the loop does not spin
/// while descriptors are short: from the first, doubling up to the last (Go's `net/http`).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// What one server allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    /// The raft port's limits in a process allowed 1024 descriptors, the common default soft
    /// limit.
    fn default() -> Limits {
        Limits::for_fd_limit(1024).1
    }
}

impl Limits {
    /// The (client API, raft port) limits for a process allowed `fd_limit` descriptors: a
    /// reserve for the node's own files, then a quarter of the rest for peers (a handful of
    /// connections per peer) and three quarters for clients. Below about 160 descriptors the
    /// floor of 16 connections per port eats into the reserve: run a node with more.
    pub fn for_fd_limit(fd_limit: u64) -> (Limits, Limits) {
        let reserve = (fd_limit / 4).clamp(64, RESERVED_FDS);
        let budget = fd_limit.saturating_sub(reserve);
        let raft = (budget / 4).max(16);
        let kv = budget.saturating_sub(raft).max(16);
        let limits = |n: u64| Limits {
            // An unlimited process still gets a finite cap (and one a semaphore can hold).
            max_connections: usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(MAX_CONNECTIONS),
            header_read_timeout: HEADER_READ_TIMEOUT,
        };
        (limits(kv), limits(raft))
    }
}

/// Raises the soft limit on open descriptors to the hard limit and returns the limit now in
/// force (the hard limit is the most an unprivileged process may ask for); `u64::MAX` when
/// unlimited.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    let Some(current) = lim.current else {
        return u64::MAX; // unlimited
    };
    if let Some(max) = lim.maximum.filter(|max| *max > current) {
        lim.current = Some(max);
        match setrlimit(Resource::Nofile, lim) {
            Ok(()) => return max,
            Err(e) => tracing::warn!(
                current,
                max,
                error = %e,
                "could not raise the open-file limit; raise it with `ulimit -n`"
            ),
        }
    }
    current
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then finishes the
/// requests in flight and closes idle connections (a long-running response, such as a raft
/// stream, ends when its own producer stops). `tap` sees every accepted connection first
/// (socket options).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tap: fn(&TcpStream),
) -> std::io::Result<()> {
    let slots = std::sync::Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, MAX_CONNECTIONS),
    ));
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        // A free slot first, then a connection: at the cap, clients wait in the accept queue.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = std::sync::Arc::clone(&slots).acquire_owned() => {
                slot.expect("invariant: the semaphore is never closed")
            }
        };
        let tcp = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    backoff = ACCEPT_BACKOFF.0;
                    tcp
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            },
        };
        tap(&tcp);
        let idle = limits.header_read_timeout;
        let service = TowerToHyperService::new(router.clone().map_request(
            move |req: hyper::Request<Incoming>| {
                req.map(|body| Body::new(StallGuard::new(body, idle)))
            },
        ));
        let closing = closing.clone();
        connections.spawn(async move {
            let _slot = slot;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = closing.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // A client that went away or sent garbage; nothing the server can do.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Refuse new connections from here on, instead of leaving them in the queue unserved.
    drop(listener);
    closing.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors that concern one connection only (the client gave up during the handshake).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// `tap` for servers that need no socket options.
pub fn no_tap(_: &TcpStream) {}

/// A request body stopped arriving: no data for [`Limits::header_read_timeout`] while the
/// handler was waiting for it.
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving for {0:?}")]
pub struct BodyStalled(pub Duration);

impl BodyStalled {
    /// Whether `e`, or an error in its source chain, is a stalled body (handlers answer 408).
    pub fn is_cause_of(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if err.is::<BodyStalled>() {
                return true;
            }
            cur = err.source();
        }
        false
    }
}

/// A request body that fails with [`BodyStalled`] once the handler has waited `idle` for the
/// next piece. The clock runs only while the handler waits: a handler busy between two reads
/// (writing a snapshot chunk to disk) does not use up the client's time.
struct StallGuard {
    inner: Incoming,
    idle: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    fn new(inner: Incoming, idle: Duration) -> StallGuard {
        StallGuard {
            inner,
            idle,
            waiting: None,
        }
    }
}

impl hyper::body::Body for StallGuard {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .waiting
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyStalled(idle).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    const DEADLINE: Duration = Duration::from_secs(10);
    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

    async fn start(router: Router, limits: Limits) -> (std::net::SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        tokio::spawn(serve(listener, router, limits, stop, no_tap));
        (addr, stop_tx)
    }

    fn caps(max_connections: usize, header_read_timeout_ms: u64) -> Limits {
        Limits {
            max_connections,
            header_read_timeout: Duration::from_millis(header_read_timeout_ms),
        }
    }

    fn hello() -> Router {
        Router::new().route("/", get(|| async { "hello" }))
    }

    /// Reads until what arrived ends with `end` (a response body), within the deadline.
    async fn read_until(c: &mut TcpStream, end: &[u8]) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(end) {
            let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
                .await
                .expect("answered in time")
                .expect("read");
            assert!(
                n > 0,
                "connection closed after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_header_is_disconnected() {
        let limits = caps(4, 200);
        let (addr, _stop) = start(hello(), limits).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: te")
            .await
            .expect("write");
        read_to_close(&mut slow).await;

        // A client that sends its request promptly is served.
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(GET).await.expect("write");
        let resp = read_until(&mut c, b"hello").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_waits_until_one_closes() {
        let limits = caps(2, 60000);
        let (addr, _stop) = start(hello(), limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(GET).await.expect("write");
            read_until(&mut c, b"hello").await;
            held.push(c); // keep-alive: the connection stays open and holds its slot
        }
        // The third is queued by the kernel, not refused, and not served while both are open.
        let mut third = TcpStream::connect(addr).await.expect("connect");
        third.write_all(GET).await.expect("write");
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
        assert!(early.is_err(), "served beyond the cap: {early:?}");

        drop(held.remove(0));
        let resp = read_until(&mut third, b"hello").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn shutdown_finishes_the_request_in_flight_then_returns() {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
        let (entered_tx, entered_rx) = oneshot::channel::<()>();
        let entered_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(entered_tx)));
        let router = Router::new().route(
            "/",
            get(move || async move {
                if let Some(tx) = entered_tx.lock().expect("lock").take() {
                    let _ = tx.send(());
                }
                if let Some(rx) = release_rx.lock().await.take() {
                    let _ = rx.await;
                }
                "hello"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            Limits::default(),
            async move {
                let _ = stop_rx.await;
            },
            no_tap,
        ));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(GET).await.expect("write");
        tokio::time::timeout(DEADLINE, entered_rx)
            .await
            .expect("the handler runs")
            .expect("entered");

        stop_tx.send(()).expect("server running");
        // New connections are no longer served...
        let refused = async {
            let mut n = TcpStream::connect(addr).await?;
            n.write_all(GET).await?;
            let mut buf = [0u8; 64];
            n.read(&mut buf).await
        };
        let late = tokio::time::timeout(Duration::from_millis(300), refused).await;
        assert!(
            !matches!(late, Ok(Ok(n)) if n > 0),
            "a connection made after the shutdown was served"
        );
        assert!(!server.is_finished(), "returned with a request in flight");
        // ...but the one in flight gets its answer, and then the server returns.
        release_tx.send(()).expect("handler waiting");
        let resp = read_until(&mut c, b"hello").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        tokio::time::timeout(DEADLINE, server)
            .await
            .expect("the server returns")
            .expect("no panic")
            .expect("no error");
    }

    /// Answers 200 with the body's length, or 408 if it stalled.
    fn echo_len() -> Router {
        Router::new().route(
            "/",
            axum::routing::put(|body: Body| async move {
                match axum::body::to_bytes(body, usize::MAX).await {
                    Ok(b) => (axum::http::StatusCode::OK, format!("len {}", b.len())),
                    Err(e) if BodyStalled::is_cause_of(&e) => {
                        (axum::http::StatusCode::REQUEST_TIMEOUT, "stalled".into())
                    }
                    Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()),
                }
            }),
        )
    }

    /// Reads until the connection closes (or fails); what arrived.
    async fn read_to_close(c: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, c.read_to_end(&mut got))
            .await
            .expect("the server closes the connection");
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_408_and_the_connection_closes() {
        let limits = caps(4, 200);
        let (addr, _stop) = start(echo_len(), limits).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .expect("write");
        let resp = read_to_close(&mut c).await;
        assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    }

    #[tokio::test]
    async fn a_body_that_keeps_coming_is_not_cut_off() {
        let limits = caps(4, 300);
        let (addr, _stop) = start(echo_len(), limits).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n")
            .await
            .expect("write");
        // Eight pieces 100 ms apart: the whole body takes well over the 300 ms limit, but it
        // never pauses that long. (The pacing is the load under test, not a wait for a state.)
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(b"x").await.expect("write");
        }
        let resp = read_until(&mut c, b"len 8").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
        let limits = caps(4, 200);
        let (addr, _stop) = start(hello(), limits).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(GET).await.expect("write");
        read_until(&mut c, b"hello").await;
        assert_eq!(
            read_to_close(&mut c).await,
            "",
            "closed without another answer"
        );
    }

    #[test]
    fn the_caps_leave_descriptors_for_the_node() {
        let (kv, raft) = Limits::for_fd_limit(u64::MAX);
        assert_eq!(
            (kv.max_connections, raft.max_connections),
            (MAX_CONNECTIONS, MAX_CONNECTIONS)
        );
        for fd_limit in [160, 1024, 20_000, 1 << 20] {
            let (kv, raft) = Limits::for_fd_limit(fd_limit);
            let used = (kv.max_connections + raft.max_connections) as u64;
            assert!(used + 64 <= fd_limit, "{fd_limit}: {kv:?} {raft:?}");
            assert!(raft.max_connections >= 16 && kv.max_connections > raft.max_connections);
        }
    }

    #[test]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, getrlimit};
        let now = raise_fd_limit();
        let lim = getrlimit(Resource::Nofile);
        // `None` is unlimited; an unlimited hard limit (not on Linux) is left alone.
        if lim.maximum.is_some() {
            assert_eq!(lim.current, lim.maximum);
        }
        assert_eq!(lim.current.unwrap_or(u64::MAX), now);
    }
}
