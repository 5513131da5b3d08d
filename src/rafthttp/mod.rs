//! TEMPORARY stand-in for the transport (replaced by the real one on merge).
#![allow(missing_docs)]
use raft::SnapshotStatus;
use raft::eraftpb::Message;
use std::sync::Arc;
pub trait Raft: Send + Sync + 'static {
    fn process(&self, m: Message) -> futures::future::BoxFuture<'static, Result<(), ProcessError>>;
    fn is_id_removed(&self, id: u64) -> bool;
    fn report_unreachable(&self, id: u64);
    fn report_snapshot(&self, id: u64, status: SnapshotStatus);
}
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("member removed")]
    MemberRemoved,
    #[error("raft node stopped")]
    Stopped,
}
pub struct TransportConfig {
    pub id: u64,
    pub cluster_id: u64,
}
#[derive(Clone)]
pub struct Transport {
    _raft: Arc<dyn Raft>,
}
impl Transport {
    pub fn new(_cfg: TransportConfig, raft: Arc<dyn Raft>) -> Transport {
        Transport { _raft: raft }
    }
    pub fn handler(&self) -> axum::Router {
        axum::Router::new()
    }
    pub fn send(&self, _m: Vec<Message>) {}
    pub fn add_peer(&self, _id: u64, _u: &[String]) {}
    pub fn remove_peer(&self, _id: u64) {}
    pub fn update_peer(&self, _id: u64, _u: &[String]) {}
    pub fn active_since(&self, _id: u64) -> Option<std::time::SystemTime> {
        None
    }
    pub fn stop(&self) {}
}
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
