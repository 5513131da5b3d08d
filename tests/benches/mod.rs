//! Benchmarks: plain `fn main` programs that print figures for the README (no harness).
//!
//! Run: `cargo bench --bench benches [-- FILTER] [-- DIR]`. FILTER picks `wal`, `transport`
//! or `ready`; DIR is where the WAL benchmark writes (default: a temporary directory).

mod ready_loop;
mod transport;
mod wal;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let filter = args
        .iter()
        .find(|a| ["wal", "transport", "ready"].contains(&a.as_str()))
        .cloned();
    let dir = args
        .iter()
        .find(|a| !["wal", "transport", "ready"].contains(&a.as_str()))
        .cloned();
    let wants = |name: &str| filter.as_deref().is_none_or(|f| f == name);
    if wants("wal") {
        wal::run(dir.as_deref().map(std::path::Path::new));
    }
    if wants("transport") {
        transport::run();
    }
    if wants("ready") {
        ready_loop::run();
    }
}
