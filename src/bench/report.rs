//! What a benchmark run found, as data (serialised for `--json`) and as text for people.
//!
//! JSON shape (all durations in seconds, latencies in milliseconds):
//!
//! ```text
//! { "settings":    { conns, total, val_size, endpoints: [url], target, linearizable, key_prefix },
//!   "put":         { requests, accepted, duration_secs, accepted_per_sec,
//!                    errors: { "<status N | connect: .. | transport: .. | timeout>": count },
//!                    latency_ms: { p50, p90, p99, p99_9, max, mean } | null,
//!                    latency_ms_by_endpoint: { "<url>": { p50, p90, ... } } },
//!   "replication": { acknowledged, readable_everywhere, all_readable, wait_secs, keys_per_sec,
//!                    nodes: [ { endpoint, readable, all_readable_after_secs | null, rounds, lost,
//!                               lost_sample: [key], lost_by_last_answer: { "<answer>": count } } ] }
//!                  | null  (with --no-verify) }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The whole result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What was run.
    pub settings: Settings,
    /// The PUT phase.
    pub put: PutReport,
    /// The replication check; `None` with `--no-verify`.
    pub replication: Option<ReplicationReport>,
}

/// The parameters of the run, repeated in the report so a saved JSON file explains itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Number of keep-alive connections (sequential clients).
    pub conns: usize,
    /// Number of PUTs.
    pub total: u64,
    /// Bytes per value.
    pub val_size: usize,
    /// The KV endpoints, as given.
    pub endpoints: Vec<String>,
    /// `one` or `round-robin`.
    pub target: String,
    /// Whether PUTs carried `X-Linearizable: true`.
    pub linearizable: bool,
    /// The prefix of every key written.
    pub key_prefix: String,
}

/// The PUT phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutReport {
    /// PUTs sent.
    pub requests: u64,
    /// PUTs answered with a 2xx status.
    pub accepted: u64,
    /// Wall time from the first PUT to the last answer.
    pub duration_secs: f64,
    /// `accepted / duration_secs`.
    pub accepted_per_sec: f64,
    /// Failed PUTs by cause (`status 503`, `connect: ConnectionRefused`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Latency of the accepted PUTs; `None` if none was accepted.
    pub latency_ms: Option<Latency>,
    /// The same per endpoint URL (endpoints that accepted no PUT are left out).
    #[serde(default)]
    pub latency_ms_by_endpoint: BTreeMap<String, Latency>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Slowest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Latency {
    /// Percentiles of a histogram of microseconds; `None` if it is empty.
    pub fn from_micros(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        })
    }
}

/// The replication check: every acknowledged key read back from every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationReport {
    /// Keys whose PUT was acknowledged (2xx), i.e. the keys checked.
    pub acknowledged: u64,
    /// Acknowledged keys that were readable with the right value on every node.
    pub readable_everywhere: u64,
    /// `readable_everywhere == acknowledged`.
    pub all_readable: bool,
    /// From the end of the PUT phase until the checker had seen every acknowledged key on every
    /// node (or until the replication timeout, if some never appeared).
    pub wait_secs: f64,
    /// `readable_everywhere / (put.duration_secs + wait_secs)`: throughput counted on durable,
    /// replicated keys rather than on optimistic acknowledgements.
    pub keys_per_sec: f64,
    /// One entry per endpoint, in the order given.
    pub nodes: Vec<NodeReport>,
}

/// The replication check on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node's KV endpoint.
    pub endpoint: String,
    /// Acknowledged keys readable with the right value here.
    pub readable: u64,
    /// When (after the PUT phase) the last acknowledged key was seen here; `None` if some never were.
    pub all_readable_after_secs: Option<f64>,
    /// Passes over the node's missing keys: 1 means every key was there when first read, so the
    /// wait measured for this node is the checker's own reading time, not replication lag.
    pub rounds: u32,
    /// Acknowledged keys never readable here within the timeout.
    pub lost: u64,
    /// The first few lost keys, in write order.
    pub lost_sample: Vec<String>,
    /// Lost keys by the last answer the node gave for them (`404`, `wrong value`, ...).
    pub lost_by_last_answer: BTreeMap<String, u64>,
}

impl Report {
    /// Acknowledged keys missing on at least one node (0 with `--no-verify`).
    pub fn lost_keys(&self) -> u64 {
        self.replication
            .as_ref()
            .map_or(0, |r| r.acknowledged - r.readable_everywhere)
    }

    /// The report as JSON (see the module docs for the shape).
    pub fn to_json(&self) -> String {
        // Serialising plain structs of numbers, strings and string-keyed maps cannot fail.
        serde_json::to_string_pretty(self).expect("invariant: report is always serialisable")
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String never fails; the `let _` keeps that out of every line.
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        let s = &self.settings;
        let p = &self.put;
        writeln!(
            out,
            "PUT: {} x {} B values over {} conn(s) to {} endpoint(s) ({}{}), keys /{}-*",
            s.total,
            s.val_size,
            s.conns,
            s.endpoints.len(),
            s.target,
            if s.linearizable { ", linearizable" } else { "" },
            s.key_prefix,
        )?;
        writeln!(
            out,
            "  accepted    {} of {} in {:.3} s = {:.0} PUT/s",
            p.accepted, p.requests, p.duration_secs, p.accepted_per_sec
        )?;
        if p.errors.is_empty() {
            writeln!(out, "  errors      none")?;
        } else {
            let list: Vec<String> = p.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            writeln!(out, "  errors      {}", list.join(", "))?;
        }
        match &p.latency_ms {
            Some(l) => writeln!(
                out,
                "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
                l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
            )?,
            None => writeln!(out, "  latency ms  - (no PUT accepted)")?,
        }
        if p.latency_ms_by_endpoint.len() > 1 {
            for (url, l) in &p.latency_ms_by_endpoint {
                writeln!(
                    out,
                    "    {url}  p50 {:.3}  p99 {:.3}  max {:.3}",
                    l.p50, l.p99, l.max
                )?;
            }
        }
        let Some(r) = &self.replication else {
            return writeln!(out, "replication: not checked (--no-verify)");
        };
        if r.all_readable {
            writeln!(
                out,
                "replication: all {} acknowledged keys readable on all {} nodes {:.3} s after the last PUT",
                r.acknowledged,
                r.nodes.len(),
                r.wait_secs
            )?;
        } else {
            writeln!(
                out,
                "replication: {} of {} acknowledged keys readable on all {} nodes; gave up after {:.3} s",
                r.readable_everywhere,
                r.acknowledged,
                r.nodes.len(),
                r.wait_secs
            )?;
        }
        writeln!(
            out,
            "  keys/s      {:.0} (readable everywhere / (PUT phase + replication wait))",
            r.keys_per_sec
        )?;
        for n in &r.nodes {
            match n.all_readable_after_secs {
                Some(t) => writeln!(
                    out,
                    "  {}  {}/{} readable, all by +{:.3} s ({} round{})",
                    n.endpoint,
                    n.readable,
                    r.acknowledged,
                    t,
                    n.rounds,
                    if n.rounds == 1 { "" } else { "s" }
                )?,
                None => writeln!(
                    out,
                    "  {}  {}/{} readable, LOST {}",
                    n.endpoint, n.readable, r.acknowledged, n.lost
                )?,
            }
        }
        let lost = self.lost_keys();
        if lost > 0 {
            writeln!(
                out,
                "LOST: {lost} acknowledged key(s) never became readable on every node:"
            )?;
            for n in r.nodes.iter().filter(|n| n.lost > 0) {
                let why: Vec<String> = n
                    .lost_by_last_answer
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                writeln!(
                    out,
                    "  {}: {} lost (last answer {}); first: {}",
                    n.endpoint,
                    n.lost,
                    why.join(", "),
                    n.lost_sample.join(" ")
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles that are all multiples of `x`.
    fn lat(x: f64) -> Latency {
        Latency {
            p50: x,
            p90: 2.0 * x,
            p99: 3.0 * x,
            p99_9: 4.0 * x,
            max: 5.0 * x,
            mean: 1.5 * x,
        }
    }

    fn sample(lost: bool) -> Report {
        let node = |url: &str, lost_n: u64| NodeReport {
            endpoint: url.to_owned(),
            readable: 10 - lost_n,
            all_readable_after_secs: (lost_n == 0).then_some(0.25),
            rounds: 1,
            lost: lost_n,
            lost_sample: (0..lost_n).map(|i| format!("/p-{i:08}")).collect(),
            lost_by_last_answer: if lost_n > 0 {
                BTreeMap::from([("404".to_owned(), lost_n)])
            } else {
                BTreeMap::new()
            },
        };
        let lost_n = if lost { 2 } else { 0 };
        Report {
            settings: Settings {
                conns: 4,
                total: 12,
                val_size: 128,
                endpoints: vec!["http://a:1".into(), "http://b:2".into()],
                target: "round-robin".into(),
                linearizable: false,
                key_prefix: "p".into(),
            },
            put: PutReport {
                requests: 12,
                accepted: 10,
                duration_secs: 0.5,
                accepted_per_sec: 20.0,
                errors: BTreeMap::from([("status 503".to_owned(), 2)]),
                latency_ms: Some(lat(1.0)),
                latency_ms_by_endpoint: BTreeMap::from([
                    ("http://a:1".to_owned(), lat(0.5)),
                    ("http://b:2".to_owned(), lat(2.0)),
                ]),
            },
            replication: Some(ReplicationReport {
                acknowledged: 10,
                readable_everywhere: 10 - lost_n,
                all_readable: !lost,
                wait_secs: 0.5,
                keys_per_sec: (10 - lost_n) as f64,
                nodes: vec![node("http://a:1", 0), node("http://b:2", lost_n)],
            }),
        }
    }

    #[test]
    fn latency_percentiles_from_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000 {
            h.record(us * 10).unwrap();
        }
        let l = Latency::from_micros(&h).unwrap();
        assert!((l.p50 - 5.0).abs() < 0.01, "{l:?}");
        assert!((l.p90 - 9.0).abs() < 0.01, "{l:?}");
        assert!((l.p99 - 9.9).abs() < 0.01, "{l:?}");
        assert!((l.max - 10.0).abs() < 0.01, "{l:?}");
        assert!((l.mean - 5.005).abs() < 0.01, "{l:?}");
        let empty = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        assert_eq!(Latency::from_micros(&empty), None);
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_str(&sample(true).to_json()).unwrap();
        assert_eq!(v["settings"]["conns"], 4);
        assert_eq!(v["put"]["accepted"], 10);
        assert_eq!(v["put"]["errors"]["status 503"], 2);
        for p in ["p50", "p90", "p99", "p99_9", "max", "mean"] {
            assert!(v["put"]["latency_ms"][p].is_number(), "{p}");
        }
        assert_eq!(v["put"]["latency_ms_by_endpoint"]["http://b:2"]["p99"], 6.0);
        let r = &v["replication"];
        assert_eq!(r["acknowledged"], 10);
        assert_eq!(r["readable_everywhere"], 8);
        assert_eq!(r["all_readable"], false);
        assert_eq!(r["nodes"][1]["lost"], 2);
        assert_eq!(r["nodes"][1]["lost_sample"][0], "/p-00000000");
        assert_eq!(r["nodes"][1]["lost_by_last_answer"]["404"], 2);
        assert!(r["nodes"][1]["all_readable_after_secs"].is_null());
        assert_eq!(r["nodes"][0]["rounds"], 1);
        // And it reads back into the same report.
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample(true));
    }

    #[test]
    fn text_lists_lost_keys() {
        let ok = sample(false);
        assert_eq!(ok.lost_keys(), 0);
        let text = ok.to_text();
        assert!(
            text.contains("accepted    10 of 12 in 0.500 s = 20 PUT/s"),
            "{text}"
        );
        assert!(text.contains("status 503: 2"), "{text}");
        assert!(text.contains("p99.9 4.000"), "{text}");
        assert!(
            text.contains("http://b:2  p50 2.000  p99 6.000  max 10.000"),
            "{text}"
        );
        assert!(
            text.contains("all 10 acknowledged keys readable on all 2 nodes"),
            "{text}"
        );
        assert!(!text.contains("LOST"), "{text}");
        assert!(
            text.contains("10/10 readable, all by +0.250 s (1 round)"),
            "{text}"
        );

        let bad = sample(true);
        assert_eq!(bad.lost_keys(), 2);
        let text = bad.to_text();
        assert!(
            text.contains("8 of 10 acknowledged keys readable"),
            "{text}"
        );
        assert!(
            text.contains(
                "http://b:2: 2 lost (last answer 404: 2); first: /p-00000000 /p-00000001"
            ),
            "{text}"
        );
    }

    #[test]
    fn text_without_verification() {
        let mut r = sample(false);
        r.replication = None;
        r.put.latency_ms = None;
        assert_eq!(r.lost_keys(), 0);
        let text = r.to_text();
        assert!(text.contains("not checked (--no-verify)"), "{text}");
        assert!(text.contains("no PUT accepted"), "{text}");
    }
}
