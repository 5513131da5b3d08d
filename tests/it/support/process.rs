//! Real `raftexample` processes, for the README flows. Each node gets free ports, a temp
//! working directory, and its stderr in a file that is printed if the test fails. Nodes are
//! killed when dropped, so a failing test leaves nothing running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The binary under test, built by cargo before the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_raftexample");

pub struct NodeProcess {
    pub id: u64,
    pub kv_port: u16,
    args: Vec<String>,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Run under `ulimit -n` (soft and hard) of this many descriptors.
    fd_limit: Option<u64>,
}

impl NodeProcess {
    /// Starts `raftexample --id <id> --cluster <cluster> --port <kv_port> [extra...]` in `dir`.
    pub fn spawn(id: u64, cluster: &str, kv_port: u16, dir: &Path, extra: &[&str]) -> NodeProcess {
        let mut n = NodeProcess::spawn_stopped(id, cluster, kv_port, dir, extra);
        n.start();
        n
    }

    fn spawn_stopped(
        id: u64,
        cluster: &str,
        kv_port: u16,
        dir: &Path,
        extra: &[&str],
    ) -> NodeProcess {
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--cluster".into(),
            cluster.into(),
            "--port".into(),
            kv_port.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        NodeProcess {
            id,
            kv_port,
            args,
            dir: dir.to_path_buf(),
            log: dir.join(format!("node-{id}.log")),
            child: None,
            fd_limit: None,
        }
    }

    /// As [`NodeProcess::spawn`], allowed at most `fd_limit` open descriptors (through the
    /// shell's `ulimit -n`, so the node cannot raise it).
    pub fn spawn_with_fd_limit(
        id: u64,
        cluster: &str,
        kv_port: u16,
        dir: &Path,
        extra: &[&str],
        fd_limit: u64,
    ) -> NodeProcess {
        let mut n = NodeProcess::spawn_stopped(id, cluster, kv_port, dir, extra);
        n.fd_limit = Some(fd_limit);
        n.start();
        n
    }

    /// (Re)starts the process with the same flags; its log is appended to.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log file");
        let mut cmd = match self.fd_limit {
            None => Command::new(BIN),
            Some(n) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
        };
        let mut child = cmd
            .args(&self.args)
            .current_dir(&self.dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn raftexample");
        // Ready once the KV port accepts connections (the raft port is bound before it).
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.kv_port));
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "node {} exited at start ({status})\n{}",
                    self.id,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not start listening\n{}",
                self.id,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The key-value URL of `key` (which starts with '/').
    pub fn url(&self, key: &str) -> String {
        format!("http://127.0.0.1:{}{key}", self.kv_port)
    }

    /// SIGKILL, as a crash or power cut would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit (SIGKILL after that, and panics).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("node is running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "node {} did not exit within {timeout:?} of SIGTERM\n{}",
                    self.id,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// What the node logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- log of node {} ----\n{}", self.id, self.logs());
        }
    }
}

/// Free raft URLs and KV ports for `n` nodes.
pub fn cluster_ports(n: usize) -> (Vec<String>, Vec<u16>) {
    let raft = (0..n)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let kv = (0..n).map(|_| free_port()).collect();
    (raft, kv)
}

/// `n` nodes of a new cluster, each in its own subdirectory of one temp dir.
pub struct ProcessCluster {
    // Fields drop in order: the nodes (killed, logs printed on failure) before their dir.
    pub nodes: Vec<NodeProcess>,
    pub peers: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl ProcessCluster {
    pub fn start(n: usize, extra: &[&str]) -> ProcessCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (peers, kv) = cluster_ports(n);
        let cluster = peers.join(",");
        let nodes = (0..n)
            .map(|i| {
                let d = dir.path().join(format!("n{}", i + 1));
                std::fs::create_dir_all(&d).expect("node dir");
                NodeProcess::spawn(i as u64 + 1, &cluster, kv[i], &d, extra)
            })
            .collect();
        ProcessCluster { nodes, peers, dir }
    }

    /// The 1-based node `id`.
    pub fn node(&mut self, id: u64) -> &mut NodeProcess {
        &mut self.nodes[id as usize - 1]
    }
}
