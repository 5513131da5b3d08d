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

/// A free TCP port on loopback (bound, then released: the caller binds it right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
