//! Command-line flags (Go: the `flag` calls in `main.go`), and their checks.

use std::path::PathBuf;

use std::ffi::OsString;

use clap::{ArgAction, CommandFactory, Parser, ValueEnum};

use crate::raft_node::{self, Config};

/// A replicated key-value store on raft, a Rust port of etcd's raftexample.
///
/// Node i of the cluster is the i-th URL of --cluster. Data lives in
/// `<data-dir>/raftexample-<id>` (write-ahead log) and `<data-dir>/raftexample-<id>-snap`.
#[derive(Parser, Debug, Clone)]
#[command(name = "raftexample", version)]
pub struct Args {
    /// Comma-separated raft URLs of the cluster's members; node i listens on the i-th.
    #[arg(long, default_value = "http://127.0.0.1:9021")]
    pub cluster: String,
    /// This node's id: its 1-based position in --cluster.
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Port of the key-value HTTP API (all interfaces).
    #[arg(long, default_value_t = 9121)]
    pub port: u16,
    /// Join an existing cluster (add this node first with `POST /<id>` on a member).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = parse_go_bool, default_value = "false")]
    pub join: bool,
    /// Directory holding `raftexample-<id>` and `raftexample-<id>-snap` (created if missing).
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,
    /// Take a snapshot and compact the log after this many applied entries.
    #[arg(long, default_value_t = raft_node::DEFAULT_SNAPSHOT_COUNT)]
    pub snapshot_count: u64,
    /// Entries kept after a compaction so slow followers can catch up without a snapshot.
    #[arg(long, default_value_t = raft_node::DEFAULT_SNAPSHOT_CATCHUP_ENTRIES)]
    pub snapshot_catchup_entries: u64,
    /// How long a linearizable request (header `X-Linearizable: true`) may wait for a quorum
    /// before it gets a 503, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
    /// Keeps clusters apart, like etcd's --initial-cluster-token: peers started with another
    /// token (or none) are refused with 412. Give every member the same token, including the
    /// ones added later; without it the cluster id is raftexample's 1000, as in Go.
    #[arg(long, value_parser = parse_cluster_token)]
    pub cluster_token: Option<String>,
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Args {
    /// Parses the flags as Go's `flag` package would accept them, too: `-id 1` as well as
    /// `--id 1`, `-join=true`, so that the Go original's command lines (and Procfiles) work
    /// unchanged. Exits with clap's message on a bad flag, as `Args::parse` does.
    pub fn parse_go_style() -> Args {
        Args::parse_from(go_style(std::env::args_os()))
    }

    /// The peer URLs of --cluster, checked.
    pub fn peers(&self) -> Result<Vec<String>, String> {
        let peers: Vec<String> = self
            .cluster
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect();
        for p in &peers {
            host_port(p).map_err(|e| format!("--cluster: {e}"))?;
        }
        Ok(peers)
    }

    /// The raft node's configuration.
    pub fn node_config(&self) -> Result<Config, String> {
        let mut cfg = Config::new(self.id, self.peers()?);
        cfg.join = self.join;
        cfg.data_dir = self.data_dir.clone();
        cfg.snapshot_count = self.snapshot_count;
        cfg.snapshot_catchup_entries = self.snapshot_catchup_entries;
        if let Some(token) = &self.cluster_token {
            cfg.cluster_id = raft_node::cluster_id_for(token);
        }
        Ok(cfg)
    }

    /// Where this node's raft transport listens: the host and port of its URL in --cluster.
    pub fn raft_listen_addr(&self) -> Result<String, String> {
        let peers = self.peers()?;
        let url = usize::try_from(self.id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .and_then(|i| peers.get(i))
            .ok_or_else(|| {
                format!(
                    "--id {} has no URL in --cluster ({} given): node i listens on the i-th URL",
                    self.id,
                    peers.len()
                )
            })?;
        host_port(url)
    }
}

/// Rewrites Go's single-dash long flags (`-cluster`, `-id=2`) to clap's `--cluster`,
/// `--id=2`. Only names of our own long flags are touched, and nothing after a bare `--`.
fn go_style(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let cmd = Args::command();
    let known = |name: &str| {
        name == "help"
            || name == "version"
            || cmd.get_arguments().any(|a| a.get_long() == Some(name))
    };
    let mut out = Vec::new();
    let mut flags_done = false;
    for arg in args {
        let rewritten = match arg.to_str() {
            Some("--") => {
                flags_done = true;
                None
            }
            Some(s) if !flags_done && s.len() > 2 && s.starts_with('-') && !s.starts_with("--") => {
                let name = s[1..].split('=').next().unwrap_or_default();
                known(name).then(|| OsString::from(format!("-{s}")))
            }
            _ => None,
        };
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

fn parse_cluster_token(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty (leave the flag out for raftexample's cluster id)".into());
    }
    Ok(s.to_owned())
}

/// Parses a boolean as Go's `strconv.ParseBool` does (`-join=true`, `-join=0`, ...).
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean; write true or false")),
    }
}

/// Parses `5s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 5s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// The `host:port` of an `http://host:port` URL, or why it is not one.
pub fn host_port(url: &str) -> Result<String, String> {
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(s) => return Err(format!("{url:?}: scheme {s} is not supported, use http://")),
        None => {
            return Err(format!(
                "{url:?} has no scheme; write it as http://host:port"
            ));
        }
    }
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    let port = auth
        .port_u16()
        .ok_or_else(|| format!("{url:?} has no port; write it as http://host:port"))?;
    Ok(format!("{}:{port}", auth.host()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        try_parse(args).expect("valid flags")
    }

    fn try_parse(args: &[&str]) -> Result<Args, clap::Error> {
        let argv = std::iter::once("raftexample").chain(args.iter().copied());
        Args::try_parse_from(go_style(argv.map(OsString::from)))
    }

    #[test]
    fn a_cluster_token_gives_the_cluster_its_own_id() {
        let id = |args: &[&str]| parse(args).node_config().expect("config").cluster_id;
        assert_eq!(id(&[]), raft_node::CLUSTER_ID, "Go's 1000 without a token");
        let blue = id(&["--cluster-token", "blue"]);
        assert_eq!(blue, raft_node::cluster_id_for("blue"));
        assert_ne!(blue, raft_node::CLUSTER_ID);
        assert_ne!(blue, id(&["--cluster-token", "green"]));
        assert_eq!(blue, id(&["-cluster-token=blue"]), "Go's spelling too");
        // Every build and platform must agree, or members built apart could not talk (the
        // value is CRC-32C of "blue", and of it continued from 0x52414654, computed apart).
        assert_eq!(raft_node::cluster_id_for("blue"), 0xcef4_35da_bd6b_686a);
        assert!(try_parse(&["--cluster-token", ""]).is_err());
    }

    #[test]
    fn go_style_flags_are_accepted() {
        let a = parse(&[
            "-id",
            "2",
            "-cluster=http://127.0.0.1:1,http://127.0.0.1:2",
            "-port",
            "8",
            "-join",
        ]);
        assert_eq!((a.id, a.port, a.join), (2, 8, true));
        assert_eq!(a.raft_listen_addr().expect("ok"), "127.0.0.1:2");
        for (flag, want) in [
            ("--join=true", true),
            ("-join=false", false),
            ("--join=1", true),
        ] {
            assert_eq!(parse(&[flag]).join, want, "{flag}");
        }
        assert!(try_parse(&["--join=maybe"]).is_err());
        // A bare --join does not swallow the next flag.
        assert_eq!(parse(&["--join", "--id", "3"]).id, 3);
        // Unknown single-dash names are left to clap, which refuses them.
        assert!(try_parse(&["-bogus", "1"]).is_err());
    }

    #[test]
    fn defaults_are_the_go_originals() {
        let a = parse(&[]);
        assert_eq!((a.id, a.port, a.join), (1, 9121, false));
        assert_eq!(a.peers().expect("ok"), vec!["http://127.0.0.1:9021"]);
        assert_eq!(a.raft_listen_addr().expect("ok"), "127.0.0.1:9021");
        let cfg = a.node_config().expect("ok");
        assert_eq!(cfg.wal_dir(), PathBuf::from("./raftexample-1"));
        assert_eq!(cfg.snap_dir(), PathBuf::from("./raftexample-1-snap"));
        assert_eq!(
            (cfg.snapshot_count, cfg.snapshot_catchup_entries),
            (10_000, 10_000)
        );
    }

    #[test]
    fn every_flag_is_read() {
        let a = parse(&[
            "--id",
            "2",
            "--cluster",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--port",
            "8",
            "--join",
            "--data-dir",
            "/tmp/x",
            "--snapshot-count",
            "5",
            "--snapshot-catchup-entries",
            "3",
            "--log-format",
            "json",
        ]);
        assert_eq!(a.raft_listen_addr().expect("ok"), "127.0.0.1:2");
        let cfg = a.node_config().expect("ok");
        assert_eq!(
            (
                cfg.id,
                cfg.join,
                cfg.snapshot_count,
                cfg.snapshot_catchup_entries
            ),
            (2, true, 5, 3)
        );
        assert_eq!(cfg.wal_dir(), PathBuf::from("/tmp/x/raftexample-2"));
        assert_eq!(a.log_format, LogFormat::Json);
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert_eq!(parse_duration("3"), Ok(std::time::Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn bad_cluster_urls_are_explained() {
        for bad in ["127.0.0.1:1", "http://127.0.0.1", "https://a:1", "http://"] {
            let a = parse(&["--cluster", bad]);
            assert!(a.peers().is_err(), "{bad}");
        }
        let a = parse(&["--id", "3", "--cluster", "http://127.0.0.1:1"]);
        assert!(a.raft_listen_addr().expect_err("no URL").contains("--id 3"));
    }
}
