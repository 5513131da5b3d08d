//! The replication check: read every acknowledged key back from every node.
//!
//! raftexample answers a PUT before the write is committed, so a 204 is a promise, not a fact.
//! This phase keeps the promise honest: for each node it GETs every acknowledged key (several
//! keep-alive connections per node, all nodes at once), drops the keys that came back with the
//! value written, and goes round again over the rest until none is left or the replication timeout
//! (counted from the end of the PUT phase) has passed. Keys still missing then are *lost* and are
//! reported with the last answer the node gave for them; the tool never hides them.
//!
//! The wait it reports is an upper bound on the replication lag: it includes the time the checker
//! itself needs to read every key (about `keys x nodes / GET rate`). A node finished in one round
//! had every key by the time it was read, so its lag is at most that one pass; more rounds mean
//! the node really was behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use indicatif::ProgressBar;

use super::BenchError;
use super::conn::{Conn, Endpoint};
use super::keys::KeySpace;
use super::report::{NodeReport, ReplicationReport};

/// How many lost keys each node lists by name.
pub const LOST_SAMPLE: usize = 10;

/// Pause between two rounds over a node's missing keys, so a lagging node is not hammered.
const ROUND_PAUSE: Duration = Duration::from_millis(20);

/// Settings of the replication check.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// Every node's KV endpoint.
    pub endpoints: Vec<Endpoint>,
    /// Concurrent GET connections per node.
    pub conns_per_node: usize,
    /// Give up on keys not readable this long after the PUT phase ended.
    pub timeout: Duration,
    /// Bound on one GET.
    pub request_timeout: Duration,
}

/// Why a key was not (yet) accepted as replicated on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Miss {
    NotFound,
    WrongValue,
    Status(u16),
    Failed(String),
    NotChecked,
}

impl Miss {
    fn label(&self) -> String {
        match self {
            Miss::NotFound => "404".to_owned(),
            Miss::WrongValue => "wrong value".to_owned(),
            Miss::Status(s) => format!("status {s}"),
            Miss::Failed(e) => e.clone(),
            Miss::NotChecked => "not checked before the deadline".to_owned(),
        }
    }
}

/// What the check found on one node.
struct NodeOutcome {
    readable: u64,
    done_at: Option<Instant>,
    rounds: u32,
    missing: Vec<(u64, Miss)>,
}

/// Checks every key in `acked` (ascending indexes) on every node.
///
/// # Errors
/// `BenchError::Worker` if a checker task panicked.
pub async fn replication_phase(
    settings: &VerifySettings,
    keys: &Arc<KeySpace>,
    acked: Arc<Vec<u64>>,
    put_ended: Instant,
    put_duration: Duration,
    bar: &ProgressBar,
) -> Result<ReplicationReport, BenchError> {
    let deadline = put_ended + settings.timeout;
    let mut tasks = Vec::new();
    for endpoint in &settings.endpoints {
        tasks.push(tokio::spawn(check_node(
            endpoint.clone(),
            settings.clone(),
            Arc::clone(keys),
            Arc::clone(&acked),
            deadline,
            bar.clone(),
        )));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(
            task.await
                .map_err(|e| BenchError::Worker(format!("replication checker: {e}")))??,
        );
    }

    let acknowledged = acked.len() as u64;
    let mut lost_anywhere: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.missing.iter().map(|(i, _)| *i))
        .collect();
    lost_anywhere.sort_unstable();
    lost_anywhere.dedup();
    let readable_everywhere = acknowledged - lost_anywhere.len() as u64;
    let all_readable = lost_anywhere.is_empty();
    let finished = if all_readable {
        outcomes
            .iter()
            .filter_map(|o| o.done_at)
            .max()
            .unwrap_or(put_ended)
    } else {
        Instant::now()
    };
    let wait = finished.saturating_duration_since(put_ended);
    let basis = (put_duration + wait).as_secs_f64();
    let nodes = settings
        .endpoints
        .iter()
        .zip(outcomes)
        .map(|(endpoint, o)| node_report(endpoint, o, keys, put_ended))
        .collect();
    Ok(ReplicationReport {
        acknowledged,
        readable_everywhere,
        all_readable,
        wait_secs: wait.as_secs_f64(),
        keys_per_sec: if basis > 0.0 {
            readable_everywhere as f64 / basis
        } else {
            0.0
        },
        nodes,
    })
}

fn node_report(endpoint: &Endpoint, o: NodeOutcome, keys: &KeySpace, t0: Instant) -> NodeReport {
    let mut by_answer = BTreeMap::new();
    for (_, miss) in &o.missing {
        *by_answer.entry(miss.label()).or_default() += 1;
    }
    NodeReport {
        endpoint: endpoint.url.clone(),
        readable: o.readable,
        all_readable_after_secs: o
            .done_at
            .map(|t| t.saturating_duration_since(t0).as_secs_f64()),
        rounds: o.rounds,
        lost: o.missing.len() as u64,
        lost_sample: o
            .missing
            .iter()
            .take(LOST_SAMPLE)
            .map(|(i, _)| keys.key(*i))
            .collect(),
        lost_by_last_answer: by_answer,
    }
}

/// Rounds over one node's missing keys until none is left or the deadline passes.
async fn check_node(
    endpoint: Endpoint,
    settings: VerifySettings,
    keys: Arc<KeySpace>,
    acked: Arc<Vec<u64>>,
    deadline: Instant,
    bar: ProgressBar,
) -> Result<NodeOutcome, BenchError> {
    let mut conns: Vec<Conn> = (0..settings.conns_per_node.max(1))
        .map(|_| Conn::new(endpoint.clone(), settings.request_timeout))
        .collect();
    let mut pending: Vec<u64> = acked.to_vec();
    let mut missing: Vec<(u64, Miss)> = Vec::new();
    // The first round checks every key whatever the clock says, so each lost key has an answer.
    let mut round_deadline = None;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let round = Arc::new(std::mem::take(&mut pending));
        let workers = conns.len();
        let mut tasks = Vec::with_capacity(workers);
        for (w, conn) in conns.drain(..).enumerate() {
            tasks.push(tokio::spawn(check_keys(
                conn,
                Arc::clone(&keys),
                Arc::clone(&round),
                w,
                workers,
                round_deadline,
                bar.clone(),
            )));
        }
        let previous = std::mem::take(&mut missing);
        for task in tasks {
            // A failed worker leaves its share of keys unknown: fail the run rather than guess.
            let (conn, miss) = task.await.map_err(|e| {
                BenchError::Worker(format!("replication check of {}: {e}", endpoint.url))
            })?;
            conns.push(conn);
            missing.extend(miss);
        }
        missing.sort_unstable_by_key(|(i, _)| *i);
        // A key skipped for lack of time keeps the answer it got in the previous round.
        for (index, miss) in &mut missing {
            if *miss == Miss::NotChecked
                && let Ok(p) = previous.binary_search_by_key(index, |(i, _)| *i)
            {
                *miss = previous[p].1.clone();
            }
        }
        let readable = acked.len() - missing.len();
        if missing.is_empty() {
            return Ok(NodeOutcome {
                readable: readable as u64,
                done_at: Some(Instant::now()),
                rounds,
                missing,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(NodeOutcome {
                readable: readable as u64,
                done_at: None,
                rounds,
                missing,
            });
        }
        tokio::time::sleep(ROUND_PAUSE.min(deadline - now)).await;
        pending = missing.iter().map(|(i, _)| *i).collect();
        round_deadline = Some(deadline);
    }
}

/// GETs every `workers`-th key of `round`, starting at `first`; returns the keys not yet right.
async fn check_keys(
    mut conn: Conn,
    keys: Arc<KeySpace>,
    round: Arc<Vec<u64>>,
    first: usize,
    workers: usize,
    deadline: Option<Instant>,
    bar: ProgressBar,
) -> (Conn, Vec<(u64, Miss)>) {
    let mut missing = Vec::new();
    for &index in round.iter().skip(first).step_by(workers) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            missing.push((index, Miss::NotChecked));
            continue;
        }
        let miss = match conn.get(&keys.key(index)).await {
            Ok(a) if a.status == StatusCode::OK && a.body == keys.value(index) => None,
            Ok(a) if a.status == StatusCode::OK => Some(Miss::WrongValue),
            Ok(a) if a.status == StatusCode::NOT_FOUND => Some(Miss::NotFound),
            Ok(a) => Some(Miss::Status(a.status.as_u16())),
            Err(e) => Some(Miss::Failed(e.to_string())),
        };
        match miss {
            None => bar.inc(1),
            Some(m) => missing.push((index, m)),
        }
    }
    (conn, missing)
}
