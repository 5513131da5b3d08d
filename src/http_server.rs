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
//!   after that long. A request whose header has arrived is not limited: raft's stream
//!   responses and large snapshot bodies take as long as they take.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Descriptors each server leaves to the rest of the node when sizing its connection cap:
/// WAL segments, snapshot files, directories, the runtime's own, and outgoing peer
/// connections.
const RESERVED_FDS: u64 = 256;

/// How long a client has to send a request header (and how long a keep-alive connection may
/// sit idle). Generous: a slow client on a bad link still gets through.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to pause accepting after an error such as "too many open files", so the loop does
/// not spin while descriptors are short.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What one server allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    /// The caps for a process allowed 1024 descriptors, the common default soft limit.
    fn default() -> Limits {
        Limits::for_fd_limit(1024).1
    }
}

impl Limits {
    /// The (client API, raft port) limits for a process allowed `fd_limit` descriptors: a
    /// reserve for the node's own files, then a quarter of the rest for peers (a handful of
    /// connections per peer) and three quarters for clients.
    pub fn for_fd_limit(fd_limit: u64) -> (Limits, Limits) {
        let reserve = (fd_limit / 4).clamp(64, RESERVED_FDS);
        let budget = fd_limit.saturating_sub(reserve);
        let raft = (budget / 4).max(16);
        let kv = budget.saturating_sub(raft).max(16);
        let limits = |n: u64| Limits {
            max_connections: usize::try_from(n).unwrap_or(usize::MAX),
            header_read_timeout: HEADER_READ_TIMEOUT,
        };
        (limits(kv), limits(raft))
    }
}

/// Raises the soft limit on open descriptors to the hard limit and returns the limit now in
/// force (the hard limit is the most an unprivileged process may ask for). If the limit
/// cannot be read, assumes 1024.
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
    let slots = std::sync::Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first, then a connection: at the cap, clients wait in the accept queue.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = std::sync::Arc::clone(&slots).acquire_owned() => {
                slot.expect("invariant: the semaphore is never closed")
            }
        };
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        tap(&tcp);
        let service = TowerToHyperService::new(router.clone());
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

    fn hello() -> Router {
        Router::new().route("/", get(|| async { "hello" }))
    }

    /// Reads until a whole `hello` response has arrived.
    async fn read_response(c: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"hello") {
            let n = c.read(&mut buf).await.expect("read");
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
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(200),
        };
        let (addr, _stop) = start(hello(), limits).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: te")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let ended = tokio::time::timeout(DEADLINE, async {
            loop {
                match slow.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // an error response, then the close
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the slow connection is still open");

        // A client that sends its request promptly is served.
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(GET).await.expect("write");
        let resp = tokio::time::timeout(DEADLINE, read_response(&mut c))
            .await
            .expect("answered");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_waits_until_one_closes() {
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(60),
        };
        let (addr, _stop) = start(hello(), limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(GET).await.expect("write");
            tokio::time::timeout(DEADLINE, read_response(&mut c))
                .await
                .expect("answered");
            held.push(c); // keep-alive: the connection stays open and holds its slot
        }
        // The third is queued by the kernel, not refused, and not served while both are open.
        let mut third = TcpStream::connect(addr).await.expect("connect");
        third.write_all(GET).await.expect("write");
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
        assert!(early.is_err(), "served beyond the cap: {early:?}");

        drop(held.remove(0));
        let resp = tokio::time::timeout(DEADLINE, read_response(&mut third))
            .await
            .expect("served once a slot is free");
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
        let resp = tokio::time::timeout(DEADLINE, read_response(&mut c))
            .await
            .expect("answered");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        tokio::time::timeout(DEADLINE, server)
            .await
            .expect("the server returns")
            .expect("no panic")
            .expect("no error");
    }

    #[test]
    fn the_caps_leave_descriptors_for_the_node() {
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
        assert_eq!(lim.current, lim.maximum);
        assert_eq!(lim.current.unwrap_or(u64::MAX), now);
    }
}
