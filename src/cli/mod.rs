//! Command-line interface: argument parsing and the commands.
//!
//! Exit codes: 0 success; 1 the command failed (an error, or `verify`
//! found a bad byte); 2 bad arguments.

mod bench;
mod daemon;
mod list;
mod size;
mod verify;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// cairn: a tiered checkpoint store for large-model training.
#[derive(Parser)]
#[command(name = "cairn", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Save and restore a synthetic training state; compare with the raw
    /// disk and memcpy measured in the same run.
    ///
    /// Example: cairn bench /tmp/ckpt --size 1GiB --json
    Bench(bench::BenchArgs),
    /// List runs and committed steps.
    ///
    /// Example: cairn ls /tmp/ckpt --json
    Ls {
        /// Store directory.
        store: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain committed local checkpoints to object storage, apply
    /// retention and garbage collection; status and metrics on loopback.
    ///
    /// Example: cairn daemon /nvme/ckpt --remote s3://bucket/ckpt
    Daemon(daemon::DaemonArgs),
    /// Re-read and re-hash every chunk; exit 1 if any byte is bad.
    ///
    /// Example: cairn verify /tmp/ckpt --run bench --step 3
    Verify {
        /// Store directory.
        store: PathBuf,
        /// Only this run.
        #[arg(long)]
        run: Option<String>,
        /// Only this step (needs --run).
        #[arg(long, requires = "run")]
        step: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parse arguments, run the command, and return the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Daemon(args) => daemon::run(args),
        Command::Ls { store, json } => list::run(&store, json),
        Command::Verify {
            store,
            run,
            step,
            json,
        } => verify::run(&store, run.as_deref(), step, json),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
