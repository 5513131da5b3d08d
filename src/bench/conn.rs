//! One keep-alive HTTP/1.1 connection to one KV endpoint, used by one sequential client.
//!
//! The benchmark talks to hyper's connection-level API directly instead of a pooled client: with
//! `--conns N` there are exactly N TCP connections, each carrying one request at a time, which is
//! the load model of etcd's `benchmark` tool. `TCP_NODELAY` is set because every request is a
//! small write followed by a wait for the answer; Nagle's algorithm would add delay to each one.
//!
//! A connection that fails (refused, reset, timed out) is dropped and dialled again on the next
//! request, so one bad moment on a node costs one failed request, not the whole client.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HOST;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::BenchError;

/// The header that asks our port to answer a PUT only after it was committed and applied.
pub const LINEARIZABLE_HEADER: &str = "x-linearizable";

/// A KV endpoint, as given on the command line (`http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as the user wrote it, for reports.
    pub url: String,
    /// `host:port`, used both to dial and as the `Host` header.
    pub authority: String,
}

impl Endpoint {
    /// Parses `http://host:port`; a trailing `/` is allowed, any other path is not.
    ///
    /// # Errors
    /// `BenchError::InvalidEndpoint` naming the URL and what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        let invalid = |reason: &str| BenchError::InvalidEndpoint {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid("only http:// is supported"));
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.port_u16().is_none() {
            return Err(invalid("no port"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                "must not have a path; keys are appended by the tool",
            ));
        }
        Ok(Self {
            url: url.to_owned(),
            authority: authority.as_str().to_owned(),
        })
    }
}

/// Why one request did not produce an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Dialling the endpoint failed.
    #[error("connect: {0}")]
    Connect(std::io::ErrorKind),
    /// The connection broke while sending or receiving.
    #[error("transport: {0}")]
    Transport(String),
    /// No complete answer within the request timeout.
    #[error("timeout")]
    Timeout,
}

/// An HTTP answer: status and the whole body.
#[derive(Debug)]
pub struct Answer {
    /// The response status.
    pub status: StatusCode,
    /// The response body, read to the end (which is what lets the connection be reused).
    pub body: Bytes,
}

/// A sequential client on one keep-alive connection.
pub struct Conn {
    endpoint: Endpoint,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    /// A client for `endpoint`; it dials lazily, on the first request.
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        Self {
            endpoint,
            timeout,
            sender: None,
        }
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `PUT key` with `value` as the body.
    ///
    /// # Errors
    /// See [`RequestError`]; the connection is dropped and redialled on the next request.
    pub async fn put(
        &mut self,
        key: &str,
        value: Bytes,
        linearizable: bool,
    ) -> Result<Answer, RequestError> {
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(key)
            .header(HOST, &self.endpoint.authority);
        if linearizable {
            req = req.header(LINEARIZABLE_HEADER, "true");
        }
        // hyper sets Content-Length from the `Full` body's exact size.
        self.send_with_body(req, value).await
    }

    /// `GET key`.
    ///
    /// # Errors
    /// See [`RequestError`].
    pub async fn get(&mut self, key: &str) -> Result<Answer, RequestError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(key)
            .header(HOST, &self.endpoint.authority);
        self.send_with_body(req, Bytes::new()).await
    }

    async fn send_with_body(
        &mut self,
        req: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<Answer, RequestError> {
        let result = tokio::time::timeout(self.timeout, self.exchange(req, body)).await;
        let result = result.unwrap_or(Err(RequestError::Timeout));
        if result.is_err() {
            // The connection's state is unknown now (half-sent request, unread answer): start over.
            self.sender = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        req: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<Answer, RequestError> {
        let req = req
            .body(Full::new(body))
            .map_err(|e| RequestError::Transport(format!("building request: {e}")))?;
        let sender = self.ready_sender().await?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(transport)?;
        Ok(Answer {
            status,
            body: body.to_bytes(),
        })
    }

    /// The open connection, dialled first if there is none or the server closed the old one.
    async fn ready_sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, RequestError> {
        if let Some(sender) = &mut self.sender
            && sender.ready().await.is_err()
        {
            self.sender = None;
        }
        if self.sender.is_none() {
            self.sender = Some(self.dial().await?);
        }
        self.sender
            .as_mut()
            .ok_or_else(|| RequestError::Transport("invariant: sender was just set".to_owned()))
    }

    async fn dial(&self) -> Result<SendRequest<Full<Bytes>>, RequestError> {
        let stream = TcpStream::connect(&self.endpoint.authority)
            .await
            .map_err(|e| RequestError::Connect(e.kind()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| RequestError::Connect(e.kind()))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(transport)?;
        // The connection task ends when `sender` is dropped or the peer closes; its error, if any,
        // surfaces on the next `send_request`, so there is nothing to do with it here.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "bench connection closed");
            }
        });
        Ok(sender)
    }
}

fn transport(e: hyper::Error) -> RequestError {
    RequestError::Transport(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let e = Endpoint::parse("http://127.0.0.1:12380").unwrap();
        assert_eq!(e.authority, "127.0.0.1:12380");
        assert_eq!(e.url, "http://127.0.0.1:12380");
        assert_eq!(
            Endpoint::parse("http://localhost:1/").unwrap().authority,
            "localhost:1"
        );
        for bad in [
            "127.0.0.1:12380",
            "https://127.0.0.1:1",
            "http://127.0.0.1",
            "http://127.0.0.1:1/x",
            "http://127.0.0.1:1/?a=b",
            "",
        ] {
            assert!(
                matches!(
                    Endpoint::parse(bad),
                    Err(BenchError::InvalidEndpoint { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
    }
}
