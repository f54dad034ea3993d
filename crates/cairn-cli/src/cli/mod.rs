//! Command-line interface: argument parsing and the commands.
//!
//! Exit codes: 0 success; 1 the command failed (an error, or `verify`
//! found a bad byte); 2 bad arguments.
//!
//! Arguments are checked while parsing (clap exits 2 by itself); the
//! checks that need more than one argument run in [`check_args`] before any
//! command starts, and exit 2 the same way. Errors from the command itself,
//! bad data in an input file included, exit 1.

#[macro_use]
mod output;

mod bench;
mod daemon;
mod diff;
mod export;
mod gc;
mod inspect;
mod latest;
mod list;
mod open;
mod restore;
mod size;
mod verify;

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
STORE is a directory or an object-store URL (s3://bucket/prefix, gs://..., az://..., file:///path).
Credentials, region and endpoint come from the AWS_*/GOOGLE_*/AZURE_* environment variables and --remote-option.

Exit codes: 0 success; 1 failure (an error, or verify found a bad byte); 2 bad arguments.

Examples:
  cairn bench /tmp/ckpt --size 1GiB
  cairn ls s3://ckpt-bucket/llama --remote-option region=us-east-1
  cairn latest /nvme/ckpt --run llama --where 'loss<2.5'
  cairn inspect /nvme/ckpt --run llama --step latest --tensor 'model.layers.0.*'
  cairn restore s3://ckpt-bucket/llama --run llama --step latest --to /nvme/ckpt
  cairn verify /nvme/ckpt --run llama
  cairn export /nvme/ckpt --run llama --step 1200 --format safetensors --out ./hf-model
  cairn diff /nvme/ckpt --run llama 1100 1200
  cairn gc /nvme/ckpt --dry-run";

/// cairn: a tiered checkpoint store for large-model training.
#[derive(Parser)]
#[command(name = "cairn", version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    /// object_store option for URL stores, KEY=VALUE (repeatable), e.g.
    /// endpoint=http://127.0.0.1:9000, allow_http=true, region=us-east-1.
    #[arg(long = "remote-option", value_name = "KEY=VALUE", global = true, value_parser = parse_remote_option)]
    remote_options: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

/// Conditions on a checkpoint's metrics, e.g. `loss<2.5,grad_norm<=10`.
fn parse_where(s: &str) -> Result<cairn::MetricFilter, String> {
    s.parse().map_err(|e: cairn::Error| e.to_string())
}

fn parse_step(s: &str) -> Result<cairn::StepSel, String> {
    s.parse().map_err(|e: cairn::Error| e.to_string())
}

/// The step of a new checkpoint: a number (`latest` names one that exists).
fn parse_new_step(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a step number (a new checkpoint's step is 0 to 2^64-1)"))
}

/// A run name, checked as the store checks it.
pub(crate) fn parse_run(s: &str) -> Result<String, String> {
    cairn::validate_run_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// `KEY=VALUE` with a non-empty key.
fn parse_remote_option(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Save and restore a synthetic training state; compare with the raw
    /// disk and memcpy measured in the same run.
    ///
    /// Example: cairn bench /tmp/ckpt --size 1GiB --json
    Bench(bench::BenchArgs),
    /// List runs and checkpoints: time, sizes, dedup and compression, tiers.
    ///
    /// Example: cairn ls /nvme/ckpt --run llama --json
    Ls {
        /// Store (directory or URL).
        store: String,
        /// Only this run.
        #[arg(long, value_parser = parse_run)]
        run: Option<String>,
        /// Only checkpoints whose metrics match, e.g. 'loss<2.5,grad_norm<=10'.
        #[arg(long = "where", value_name = "CONDITIONS", value_parser = parse_where)]
        filter: Option<cairn::MetricFilter>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the newest committed step of a run, optionally the newest
    /// whose metrics match (roll back past a loss spike); exit 1 if none.
    ///
    /// Example: cairn latest /nvme/ckpt --run llama --where 'loss<2.5'
    Latest {
        /// Store (directory or URL).
        store: String,
        /// The run.
        #[arg(long, value_parser = parse_run)]
        run: String,
        /// Only steps whose metrics match, e.g. 'loss<2.5,grad_norm<=10'.
        #[arg(long = "where", value_name = "CONDITIONS", value_parser = parse_where)]
        filter: Option<cairn::MetricFilter>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a checkpoint's tensors, blobs and metadata.
    ///
    /// Example: cairn inspect /nvme/ckpt --run llama --step latest --tensor '*.weight'
    Inspect {
        /// Store (directory or URL).
        store: String,
        /// The run.
        #[arg(long, value_parser = parse_run)]
        run: String,
        /// Step number or `latest`.
        #[arg(long, value_parser = parse_step)]
        step: cairn::StepSel,
        /// Only tensors matching this glob (`*`, `?`).
        #[arg(long)]
        tensor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a checkpoint to another store (e.g. object storage to local
    /// disk before a restart): parallel, verified, resumable.
    ///
    /// Example: cairn restore s3://bucket/ckpt --run llama --step latest --to /nvme/ckpt
    Restore {
        /// Source store (directory or URL).
        store: String,
        /// The run.
        #[arg(long, value_parser = parse_run)]
        run: String,
        /// Step number or `latest`.
        #[arg(long, value_parser = parse_step)]
        step: cairn::StepSel,
        /// Target store (directory, created if missing, or URL).
        #[arg(long)]
        to: String,
        /// Only tensors matching this glob (blobs are always copied).
        #[arg(long)]
        tensor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a checkpoint's tensors as safetensors (sharded with a
    /// model.safetensors.index.json when larger than --max-shard-size).
    ///
    /// Example: cairn export /nvme/ckpt --run llama --step 1200 --format safetensors --out model.safetensors
    Export {
        /// Store (directory or URL).
        store: String,
        /// The run.
        #[arg(long, value_parser = parse_run)]
        run: String,
        /// Step number or `latest`.
        #[arg(long, value_parser = parse_step)]
        step: cairn::StepSel,
        /// Output format.
        #[arg(long, default_value = "safetensors", value_parser = ["safetensors"])]
        format: String,
        /// Output file, or directory for sharded output.
        #[arg(long)]
        out: PathBuf,
        /// Largest shard (above zero; a tensor larger than this gets a shard
        /// of its own).
        #[arg(long, default_value = "5GiB", value_parser = size::parse_nonzero_size)]
        max_shard_size: u64,
        /// Only tensors matching this glob.
        #[arg(long)]
        tensor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import a safetensors file (or a sharded model's index.json) as a
    /// checkpoint, with dedup against what the store holds.
    ///
    /// Example: cairn import /nvme/ckpt --run base --step 0 model.safetensors.index.json
    Import {
        /// Local store directory (created if missing).
        store: String,
        /// The run.
        #[arg(long, value_parser = parse_run)]
        run: String,
        /// The step (a number).
        #[arg(long, value_parser = parse_new_step)]
        step: u64,
        /// A .safetensors file or a model.safetensors.index.json.
        input: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every chunk; exit 1 if any byte is bad.
    ///
    /// Example: cairn verify /nvme/ckpt --run llama --step 1200
    Verify {
        /// Store (directory or URL).
        store: String,
        /// Only this run.
        #[arg(long, value_parser = parse_run)]
        run: Option<String>,
        /// Only this step, a number or `latest` (needs --run).
        #[arg(long, requires = "run", value_parser = parse_step)]
        step: Option<cairn::StepSel>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare two steps of a run: tensors added, removed, changed.
    ///
    /// Example: cairn diff /nvme/ckpt --run llama 1100 1200
    Diff {
        /// Store (directory or URL).
        store: String,
        /// The run.
        #[arg(long, value_parser = parse_run)]
        run: String,
        /// Older step (a number or `latest`).
        #[arg(value_parser = parse_step)]
        a: cairn::StepSel,
        /// Newer step (a number or `latest`).
        #[arg(value_parser = parse_step)]
        b: cairn::StepSel,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reclaim chunks no checkpoint references.
    ///
    /// Example: cairn gc /nvme/ckpt --dry-run
    Gc {
        /// Store (directory or URL).
        store: String,
        /// Report what would be reclaimed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced chunks younger than this [default: 1h for a
        /// directory; for an object store, the grace its uploads rely on,
        /// recorded there, else 24h].
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain committed local checkpoints to object storage, apply
    /// retention and garbage collection; status and metrics on loopback.
    ///
    /// Example: cairn daemon /nvme/ckpt --remote s3://bucket/ckpt
    Daemon(daemon::DaemonArgs),
    /// Print a shell completion script.
    ///
    /// Example: cairn completions bash > /etc/bash_completion.d/cairn
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Checks that need several arguments at once; an error is a bad argument.
fn check_args(cli: &Cli) -> Result<(), String> {
    match &cli.command {
        Command::Bench(a) => a.check(),
        Command::Daemon(a) => a.check(),
        _ => Ok(()),
    }
}

/// What clap's parse ended with instead of a command: `--help` and
/// `--version` text, or a usage error (exit 2, on stderr). Help and version
/// go to stdout through [`output::write`] when it is not a terminal, so
/// that a write error fails them as it fails any command's output.
fn parse_failed(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    use std::io::IsTerminal;
    let shown = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    if !shown || std::io::stdout().is_terminal() {
        e.exit()
    }
    match output::write(e.render().to_string().as_bytes()) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err}");
            1
        }
    }
}

/// Parse arguments, run the command, and return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failed(e),
    };
    if let Err(msg) = check_args(&cli) {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    let o = &cli.remote_options;
    let res = match cli.command {
        Command::Bench(args) => bench::run(args, o),
        Command::Daemon(args) => daemon::run(args, o),
        Command::Ls {
            store,
            run,
            filter,
            json,
        } => list::run(&store, run.as_deref(), filter.as_ref(), json, o),
        Command::Latest {
            store,
            run,
            filter,
            json,
        } => latest::run(&store, &run, filter.as_ref(), json, o),
        Command::Inspect {
            store,
            run,
            step,
            tensor,
            json,
        } => inspect::run(&store, &run, step, tensor.as_deref(), json, o),
        Command::Restore {
            store,
            run,
            step,
            to,
            tensor,
            json,
        } => restore::run(&store, &run, step, &to, tensor.as_deref(), json, o),
        Command::Export {
            store,
            run,
            step,
            format: _,
            out,
            max_shard_size,
            tensor,
            json,
        } => export::export(
            &store,
            &run,
            step,
            &out,
            max_shard_size,
            tensor.as_deref(),
            json,
            o,
        ),
        Command::Import {
            store,
            run,
            step,
            input,
            json,
        } => export::import(&store, &run, step, &input, json),
        Command::Verify {
            store,
            run,
            step,
            json,
        } => verify::run(&store, run.as_deref(), step, json, o),
        Command::Diff {
            store,
            run,
            a,
            b,
            json,
        } => diff::run(&store, &run, a, b, json, o),
        Command::Gc {
            store,
            dry_run,
            grace,
            json,
        } => gc::run(&store, dry_run, grace, json, o),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cairn", &mut script);
            output::write(&script).map(|()| 0)
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
