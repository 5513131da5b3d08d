//! `raftexample-bench`: a load generator and replication checker for the KV HTTP API.
//!
//! In the spirit of etcd's `tools/benchmark`: `--conns` keep-alive connections, each a sequential
//! client, write `--total` unique keys (round-robin over the endpoints, or all to the first), and
//! the tool reports accepted PUTs per second, errors by cause and latency percentiles from an HDR
//! histogram. raftexample acknowledges a PUT before it is committed, so throughput alone says
//! little; the tool therefore reads every acknowledged key back from every node and reports how
//! long it took until all were readable everywhere, and which ones never were.
//!
//! ```text
//!   run ─ load::put_phase ──► PutOutcome (acked indexes, errors, histogram)
//!       └ verify::replication_phase(acked) ──► ReplicationReport (per node: readable, lost)
//!       └ report::Report ──► text or JSON
//! ```
//!
//! Modules: [`cli`] (arguments), [`keys`] (key/value naming), [`conn`] (one HTTP/1.1 keep-alive
//! connection on hyper), [`load`] (PUT phase), [`verify`] (replication check), [`report`].

pub mod cli;
pub mod conn;
pub mod keys;
pub mod load;
pub mod report;
pub mod verify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use conn::Endpoint;
use keys::KeySpace;
use report::{Latency, PutReport, Report, Settings};
use verify::VerifySettings;

/// Which endpoints the PUT connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Every connection to the first endpoint.
    One,
    /// Connection `i` to endpoint `i mod n`.
    RoundRobin,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::One => "one",
            Target::RoundRobin => "round-robin",
        }
    }
}

/// Errors that stop a run (lost keys are a result, not an error: see [`Report::lost_keys`]).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An `--endpoints` entry is not `http://host:port`.
    #[error("invalid endpoint {url:?}: {reason}")]
    InvalidEndpoint {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key prefix holds a character that would need escaping in a URI.
    #[error(
        "invalid --key-prefix {prefix:?}: {bad:?} is not allowed (use letters, digits, '-', '_', '.')"
    )]
    InvalidPrefix {
        /// The prefix as given.
        prefix: String,
        /// The first character not allowed.
        bad: char,
    },
    /// Some other argument is out of range.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// A client task died (a bug in the tool); the counts would be incomplete.
    #[error("benchmark worker failed: {0}")]
    Worker(String),
}

/// Everything a run needs, checked (see [`cli::Args::into_config`]).
#[derive(Debug, Clone)]
pub struct Config {
    /// KV endpoints; never empty.
    pub endpoints: Vec<Endpoint>,
    /// Where PUT connections go.
    pub target: Target,
    /// Number of PUT connections; at least 1.
    pub conns: usize,
    /// Number of PUTs.
    pub total: u64,
    /// Key and value naming (prefix, value size).
    pub keys: KeySpace,
    /// Send `X-Linearizable: true` with every PUT.
    pub linearizable: bool,
    /// Run the replication check.
    pub verify: bool,
    /// GET connections per endpoint in the replication check.
    pub verify_conns: usize,
    /// How long after the PUT phase acknowledged keys may take to appear everywhere.
    pub replication_timeout: Duration,
    /// Bound on one request.
    pub request_timeout: Duration,
    /// Draw progress bars on stderr.
    pub show_progress: bool,
}

/// Runs the PUT phase and then (unless disabled) the replication check.
///
/// # Errors
/// Only if a worker task fails; unreachable nodes and lost keys are reported in the [`Report`].
pub async fn run(cfg: &Config) -> Result<Report, BenchError> {
    let keys = Arc::new(cfg.keys.clone());
    let bar = progress_bar(cfg.show_progress, cfg.total, "PUT   ");
    let put = load::put_phase(cfg, &keys, &bar).await?;
    let put_ended = Instant::now();
    bar.finish_and_clear();

    let accepted = put.acked.len() as u64;
    let put_secs = put.duration.as_secs_f64();
    let put_report = PutReport {
        requests: put.requests,
        accepted,
        duration_secs: put_secs,
        accepted_per_sec: if put_secs > 0.0 {
            accepted as f64 / put_secs
        } else {
            0.0
        },
        errors: put.errors,
        latency_ms: Latency::from_micros(&put.latency_us),
        latency_ms_by_endpoint: put
            .latency_us_by_endpoint
            .iter()
            .filter_map(|(url, h)| Some((url.clone(), Latency::from_micros(h)?)))
            .collect(),
    };

    let replication = if cfg.verify {
        let settings = VerifySettings {
            endpoints: cfg.endpoints.clone(),
            conns_per_node: cfg.verify_conns,
            timeout: cfg.replication_timeout,
            request_timeout: cfg.request_timeout,
        };
        let checks = accepted * cfg.endpoints.len() as u64;
        let bar = progress_bar(cfg.show_progress, checks, "VERIFY");
        let r = verify::replication_phase(
            &settings,
            &keys,
            Arc::new(put.acked),
            put_ended,
            put.duration,
            &bar,
        )
        .await?;
        bar.finish_and_clear();
        Some(r)
    } else {
        None
    };

    Ok(Report {
        settings: Settings {
            conns: cfg.conns,
            total: cfg.total,
            val_size: cfg.keys.value(0).len(),
            endpoints: cfg.endpoints.iter().map(|e| e.url.clone()).collect(),
            target: cfg.target.name().to_owned(),
            linearizable: cfg.linearizable,
            key_prefix: cfg.keys.prefix().to_owned(),
        },
        put: put_report,
        replication,
    })
}

/// The process exit status for a finished run: 1 if an acknowledged key was lost, 3 if PUTs were
/// sent but none was accepted, else 0. (2 is for bad arguments and failed runs, set by the binary.)
pub fn exit_status(report: &Report) -> u8 {
    if report.lost_keys() > 0 {
        1
    } else if report.put.requests > 0 && report.put.accepted == 0 {
        3
    } else {
        0
    }
}

fn progress_bar(show: bool, len: u64, label: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    // The template is a constant; if indicatif ever rejects it, fall back to its default style.
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {rate} eta {eta}",
    ) {
        bar.set_style(style.with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        ));
    }
    bar.set_prefix(label.to_owned());
    bar
}
