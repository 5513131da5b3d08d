//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Installs a test-friendly tracing subscriber once (RUST_LOG respected).
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reply: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// One HTTP request with a 10 s limit. `Err` on connection failure or time-out.
pub async fn http(method: &str, url: &str, body: &[u8]) -> Result<Reply, String> {
    http_with_headers(method, url, body, &[]).await
}

/// As [`http`], with extra headers.
pub async fn http_with_headers(
    method: &str,
    url: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply { status, body })
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("{method} {url} timed out"))?
}

/// GETs `url` until it answers 200 with `want`, within `timeout`.
pub async fn wait_for_value(url: &str, want: &[u8], timeout: Duration) {
    poll_until(
        timeout,
        &format!("GET {url} == {:?}", String::from_utf8_lossy(want)),
        || async {
            match http("GET", url, b"").await {
                Ok(r) if r.status == 200 && r.body == want => Some(()),
                _ => None,
            }
        },
    )
    .await
}

/// A free TCP port for a node process to bind, never the same one twice in this test run.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), so neither
/// a `bind(port 0)` elsewhere in the suite nor the local end of an outgoing connection can
/// take one between this probe and the node's bind, or while a node is down for a restart.
/// (Picking with port 0 raced exactly that way: two picks in one cluster once got the same
/// port.) Each candidate is probed by binding `0.0.0.0`, which fails if anything listens
/// on it on any address. The start is spread by pid so concurrent suites rarely overlap.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = pickable_range();
    let span = hi - lo;
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (lo + offset) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {lo}..{hi}");
}

/// `[lo, hi)`: the ports below the ephemeral range, from 10000 (above well-known
/// services); or, if the ephemeral range starts low, the ports above it.
fn pickable_range() -> (u32, u32) {
    let ephemeral: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match ephemeral[..] {
        [lo, _] if lo >= 20000 => (10000, lo),
        [_, hi] if hi <= 64000 => (hi + 1, 65536),
        _ => (10000, 32768),
    }
}

/// PUTs `key-{i}` = `val-{i}` for every `i` in `range` to `base` (e.g. `http://127.0.0.1:1`),
/// over `conns` concurrent keep-alive clients. Panics if any PUT is not answered 204.
pub async fn put_range(base: &str, prefix: &str, range: std::ops::Range<u64>, conns: u64) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let client = client.clone();
        let base = base.to_string();
        let prefix = prefix.to_string();
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = range.start + c;
            while i < range.end {
                let req = hyper::Request::put(format!("{base}/{prefix}-{i}"))
                    .body(Full::new(Bytes::from(format!("val-{i}"))))
                    .expect("request");
                let resp = client.request(req).await.expect("PUT answered");
                assert_eq!(resp.status().as_u16(), 204, "PUT {prefix}-{i}");
                i += conns;
            }
        }));
    }
    for t in tasks {
        t.await.expect("PUT task");
    }
}

/// The keys of `range` that `base` does not (yet) serve with the right value.
pub async fn missing_keys(base: &str, prefix: &str, range: std::ops::Range<u64>) -> Vec<u64> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let conns = 16;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let client = client.clone();
        let base = base.to_string();
        let prefix = prefix.to_string();
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let mut missing = Vec::new();
            let mut i = range.start + c;
            while i < range.end {
                let req = hyper::Request::get(format!("{base}/{prefix}-{i}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let ok = match client.request(req).await {
                    Ok(resp) if resp.status() == 200 => resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes() == format!("val-{i}").as_bytes())
                        .unwrap_or(false),
                    _ => false,
                };
                if !ok {
                    missing.push(i);
                }
                i += conns;
            }
            missing
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("GET task"));
    }
    all.sort_unstable();
    all
}

/// Waits until `base` serves every key of `range`, re-checking only the missing ones.
pub async fn wait_all_keys(
    base: &str,
    prefix: &str,
    range: std::ops::Range<u64>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let mut missing = missing_keys(base, prefix, range).await;
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{base}: {} keys still missing after {timeout:?}, e.g. {prefix}-{}",
            missing.len(),
            missing[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut still = Vec::new();
        for chunk in missing.chunks(1) {
            let i = chunk[0];
            if missing_keys(base, prefix, i..i + 1).await.contains(&i) {
                still.push(i);
            }
        }
        missing = still;
    }
}

/// A metric's value from a node's `/metrics` (0 if absent).
pub async fn metric(raft_url: &str, name: &str) -> f64 {
    let Ok(r) = http("GET", &format!("{raft_url}/metrics"), b"").await else {
        return 0.0;
    };
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
