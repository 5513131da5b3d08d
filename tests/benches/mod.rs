//! Benchmarks: plain `fn main` programs that print figures for the README.
//! Run with `cargo bench --bench benches` (optionally a filter: `-- transport`).

mod transport;

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if wants("transport") {
        transport::run();
    }
}
