//! Command-line arguments of `raftexample-bench` and their checks.

use std::time::Duration;

use clap::Parser;

use super::conn::Endpoint;
use super::keys::{KeySpace, default_prefix};
use super::{BenchError, Config, Target};

/// Load generator for raftexample's KV HTTP API (PUT /key, GET /key), after etcd's `benchmark`.
///
/// Writes `--total` unique keys over `--conns` keep-alive connections, then reads every
/// acknowledged key back from every endpoint until all are there or the replication timeout
/// passes.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "raftexample-bench",
    after_help = "Exit status: 0 all acknowledged keys replicated; 1 some acknowledged key was lost; \
                  2 bad arguments or the run failed; 3 no PUT was accepted."
)]
pub struct Args {
    /// Keep-alive connections, each a sequential client (one request in flight).
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// PUT requests in total.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 128)]
    pub val_size: usize,
    /// KV endpoints, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:12380,http://127.0.0.1:22380,http://127.0.0.1:32380"
    )]
    pub endpoints: Vec<String>,
    /// Which endpoints the PUT connections go to: the first only, or spread round-robin.
    #[arg(long, value_enum, default_value_t = Target::RoundRobin)]
    pub target: Target,
    /// Prefix of the keys written (default: `bench-` + current time, so reruns never collide).
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Send `X-Linearizable: true`: the server answers only after commit and apply.
    #[arg(long)]
    pub linearizable: bool,
    /// Print the report as JSON on stdout (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// How long after the PUT phase to keep looking for acknowledged keys (e.g. 60s, 500ms, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub replication_timeout: Duration,
    /// Bound on a single request.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Skip the replication check.
    #[arg(long)]
    pub no_verify: bool,
    /// GET connections per endpoint during the replication check.
    #[arg(long, default_value_t = 8)]
    pub verify_conns: usize,
}

impl Args {
    /// Checks the arguments and turns them into a run configuration.
    ///
    /// # Errors
    /// `BenchError::InvalidArgs`, `InvalidEndpoint` or `InvalidPrefix`, naming the argument.
    pub fn into_config(self, show_progress: bool) -> Result<Config, BenchError> {
        if self.conns == 0 {
            return Err(BenchError::InvalidArgs("--conns must be at least 1".into()));
        }
        if self.verify_conns == 0 {
            return Err(BenchError::InvalidArgs(
                "--verify-conns must be at least 1".into(),
            ));
        }
        let endpoints = self
            .endpoints
            .iter()
            .filter(|e| !e.is_empty())
            .map(|e| Endpoint::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(BenchError::InvalidArgs(
                "--endpoints needs at least one URL".into(),
            ));
        }
        let prefix = self.key_prefix.unwrap_or_else(default_prefix);
        let keys =
            KeySpace::new(&prefix, self.val_size).map_err(|c| BenchError::InvalidPrefix {
                prefix: prefix.clone(),
                bad: c,
            })?;
        Ok(Config {
            endpoints,
            target: self.target,
            conns: self.conns,
            total: self.total,
            keys,
            linearizable: self.linearizable,
            verify: !self.no_verify,
            verify_conns: self.verify_conns,
            replication_timeout: self.replication_timeout,
            request_timeout: self.request_timeout,
            show_progress,
        })
    }
}

/// Parses `250ms`, `60s`, `2m` or a bare number of seconds (`60`, `0.5`).
///
/// # Errors
/// A message for clap to show next to the argument.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit_secs) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 60s, 500ms, 2m)"))?;
    Duration::try_from_secs_f64(n * unit_secs)
        .map_err(|_| format!("{s:?} is not a non-negative duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("raftexample-bench").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let cfg = parse(&[]).unwrap().into_config(false).unwrap();
        assert_eq!(cfg.conns, 1);
        assert_eq!(cfg.total, 10_000);
        assert_eq!(cfg.keys.value(0).len(), 128);
        assert_eq!(cfg.target, Target::RoundRobin);
        let urls: Vec<&str> = cfg.endpoints.iter().map(|e| e.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:12380",
                "http://127.0.0.1:22380",
                "http://127.0.0.1:32380"
            ]
        );
        assert!(cfg.keys.prefix().starts_with("bench-"));
        assert!(!cfg.linearizable);
        assert!(cfg.verify);
        assert_eq!(cfg.replication_timeout, Duration::from_secs(60));
    }

    #[test]
    fn all_flags() {
        let a = parse(&[
            "--conns",
            "64",
            "--total",
            "50000",
            "--val-size",
            "16",
            "--endpoints",
            "http://127.0.0.1:1,http://localhost:2",
            "--target",
            "one",
            "--key-prefix",
            "run1",
            "--linearizable",
            "--json",
            "--replication-timeout",
            "500ms",
            "--no-verify",
        ])
        .unwrap();
        assert!(a.json);
        let cfg = a.into_config(true).unwrap();
        assert_eq!((cfg.conns, cfg.total), (64, 50_000));
        assert_eq!(cfg.keys.key(3), "/run1-00000003");
        assert_eq!(cfg.keys.value(3).len(), 16);
        assert_eq!(cfg.endpoints.len(), 2);
        assert_eq!(cfg.endpoints[1].authority, "localhost:2");
        assert_eq!(cfg.target, Target::One);
        assert!(cfg.linearizable && !cfg.verify && cfg.show_progress);
        assert_eq!(cfg.replication_timeout, Duration::from_millis(500));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--target", "all"]).is_err());
        assert!(parse(&["--total", "-1"]).is_err());
        assert!(parse(&["--replication-timeout", "soon"]).is_err());
        let bad = |args: &[&str]| parse(args).unwrap().into_config(false).unwrap_err();
        assert!(matches!(bad(&["--conns", "0"]), BenchError::InvalidArgs(_)));
        assert!(matches!(
            bad(&["--endpoints", "127.0.0.1:1"]),
            BenchError::InvalidEndpoint { .. }
        ));
        assert!(matches!(
            bad(&["--key-prefix", "a/b"]),
            BenchError::InvalidPrefix { bad: '/', .. }
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("x").is_err());
    }
}
