//! `raftexample-bench`: see `raftexample::bench` for what it measures and how.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use raftexample::bench::{self, cli::Args};

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let json = args.json;
    let show_progress = !json && std::io::stderr().is_terminal();
    let cfg = match args.into_config(show_progress) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("raftexample-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftexample-bench: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(bench::run(&cfg)) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            ExitCode::from(bench::exit_status(&report))
        }
        Err(e) => {
            eprintln!("raftexample-bench: {e}");
            ExitCode::from(2)
        }
    }
}
