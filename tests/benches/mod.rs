//! Benchmarks: plain `fn main` that prints figures (no harness).
//!
//! Run: `cargo bench --bench benches` (optionally `-- <dir>` to benchmark another disk; the
//! default is a temporary directory under `$TMPDIR`).

mod wal;

fn main() {
    let base = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    wal::run(base.as_deref().map(std::path::Path::new));
}
