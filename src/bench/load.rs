//! The PUT phase: `conns` sequential clients share one counter of keys still to write.
//!
//! Each client takes the next key index, PUTs it, records the latency of a 2xx answer in its own
//! HDR histogram (merged at the end, so clients never contend on a lock), and remembers the index
//! as acknowledged. The phase ends when `total` PUTs have been sent and answered (or failed), so
//! it always stops by itself: every request is bounded by the request timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;

use super::conn::{Conn, Endpoint};
use super::keys::KeySpace;
use super::{BenchError, Config, Target};

/// What the PUT phase saw.
#[derive(Debug)]
pub struct PutOutcome {
    /// PUTs sent.
    pub requests: u64,
    /// Indexes of the keys whose PUT got a 2xx answer, ascending.
    pub acked: Vec<u64>,
    /// Failed PUTs by cause.
    pub errors: BTreeMap<String, u64>,
    /// Latency of acknowledged PUTs in microseconds.
    pub latency_us: Histogram<u64>,
    /// The same, per endpoint URL: shows whether one node (often the leader) is the slow one.
    pub latency_us_by_endpoint: BTreeMap<String, Histogram<u64>>,
    /// From the start of the first PUT to the end of the last.
    pub duration: Duration,
}

/// A latency histogram in microseconds, 1 µs to 1 h, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .expect("invariant: constant histogram bounds are valid")
}

/// The endpoint the `client`-th connection talks to.
pub fn endpoint_for(endpoints: &[Endpoint], target: Target, client: usize) -> &Endpoint {
    match target {
        Target::One => &endpoints[0],
        Target::RoundRobin => &endpoints[client % endpoints.len()],
    }
}

/// Runs the PUT phase.
///
/// # Errors
/// `BenchError::Worker` if a client task panicked.
pub async fn put_phase(
    cfg: &Config,
    keys: &Arc<KeySpace>,
    bar: &ProgressBar,
) -> Result<PutOutcome, BenchError> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.conns);
    for client in 0..cfg.conns {
        let endpoint = endpoint_for(&cfg.endpoints, cfg.target, client).clone();
        let conn = Conn::new(endpoint, cfg.request_timeout);
        tasks.push(tokio::spawn(client_loop(
            conn,
            Arc::clone(keys),
            Arc::clone(&next),
            cfg.total,
            cfg.linearizable,
            bar.clone(),
        )));
    }
    let mut out = PutOutcome {
        requests: 0,
        acked: Vec::with_capacity(usize::try_from(cfg.total).unwrap_or(0)),
        errors: BTreeMap::new(),
        latency_us: new_histogram(),
        latency_us_by_endpoint: BTreeMap::new(),
        duration: Duration::ZERO,
    };
    for task in tasks {
        let part = task
            .await
            .map_err(|e| BenchError::Worker(format!("PUT client: {e}")))?;
        out.requests += part.requests;
        out.acked.extend(part.acked);
        for (cause, n) in part.errors {
            *out.errors.entry(cause).or_default() += n;
        }
        let merge_error = |e| BenchError::Worker(format!("merging latency histograms: {e:?}"));
        out.latency_us.add(&part.latency_us).map_err(merge_error)?;
        for (url, h) in part.latency_us_by_endpoint {
            out.latency_us_by_endpoint
                .entry(url)
                .or_insert_with(new_histogram)
                .add(&h)
                .map_err(merge_error)?;
        }
    }
    out.duration = started.elapsed();
    out.acked.sort_unstable();
    Ok(out)
}

async fn client_loop(
    mut conn: Conn,
    keys: Arc<KeySpace>,
    next: Arc<AtomicU64>,
    total: u64,
    linearizable: bool,
    bar: ProgressBar,
) -> PutOutcome {
    let mut out = PutOutcome {
        requests: 0,
        acked: Vec::new(),
        errors: BTreeMap::new(),
        latency_us: new_histogram(),
        latency_us_by_endpoint: BTreeMap::new(),
        duration: Duration::ZERO,
    };
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= total {
            // A client talks to one endpoint, so its whole histogram is that endpoint's.
            out.latency_us_by_endpoint
                .insert(conn.endpoint().url.clone(), out.latency_us.clone());
            return out;
        }
        let key = keys.key(index);
        let value = Bytes::from(keys.value(index));
        let sent = Instant::now();
        let result = conn.put(&key, value, linearizable).await;
        let took = sent.elapsed();
        out.requests += 1;
        match result {
            Ok(answer) if answer.status.is_success() => {
                let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                out.latency_us.saturating_record(micros.max(1));
                out.acked.push(index);
            }
            Ok(answer) => {
                *out.errors
                    .entry(format!("status {}", answer.status.as_u16()))
                    .or_default() += 1;
            }
            Err(e) => {
                tracing::debug!(endpoint = %conn.endpoint().url, %key, error = %e, "PUT failed");
                *out.errors.entry(e.to_string()).or_default() += 1;
            }
        }
        bar.inc(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_round_robin() {
        let eps: Vec<Endpoint> = ["http://a:1", "http://b:2", "http://c:3"]
            .iter()
            .map(|u| Endpoint::parse(u).unwrap())
            .collect();
        let picked: Vec<&str> = (0..5)
            .map(|c| endpoint_for(&eps, Target::RoundRobin, c).authority.as_str())
            .collect();
        assert_eq!(picked, ["a:1", "b:2", "c:3", "a:1", "b:2"]);
        assert!((0..5).all(|c| endpoint_for(&eps, Target::One, c).authority == "a:1"));
    }
}
