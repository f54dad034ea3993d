//! `cairn bench`.

use super::size::{human, parse_size};
use cairn::{CodecChoice, StoreOptions};
use cairn_cli::bench::{run_bench, BenchConfig, BenchReport};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchArgs {
    /// Store directory (created if missing); checkpoints are left there.
    store: PathBuf,
    /// Size of the synthetic training state (weights + Adam states).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Measured iterations; medians are reported.
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// Chunk size.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Staging budget (default: enough for the whole state).
    #[arg(long, value_parser = parse_size)]
    staging: Option<u64>,
    /// Local-tier codec: raw, zstd or zstd:LEVEL.
    #[arg(long, default_value = "raw")]
    codec: CodecChoice,
    /// Run name for the checkpoints.
    #[arg(long, default_value = "bench")]
    run: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> cairn::Result<i32> {
    let cfg = BenchConfig {
        store: a.store,
        run: a.run,
        size: a.size,
        iterations: a.iterations,
        options: StoreOptions {
            chunk_size: a.chunk_size as usize,
            staging_bytes: a.staging.unwrap_or(0) as usize,
            codec: a.codec,
            ..StoreOptions::default()
        },
    };
    let json = a.json;
    let r = run_bench(&cfg, |msg| eprintln!("cairn bench: {msg}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print_human(&r);
    }
    Ok(0)
}

fn print_human(r: &BenchReport) {
    let gb = r.logical_bytes as f64 / 1e9;
    println!(
        "state: {} in {} tensors; chunk {}, staging {}, codec {:?}; medians of {} iterations",
        human(r.logical_bytes),
        r.tensors,
        human(r.chunk_size as u64),
        human(r.staging_bytes as u64),
        r.codec,
        r.iterations.len()
    );
    println!(
        "save stall        {:>8.3} s   memcpy {:>8.3} s   stall/memcpy {:.2}x",
        r.stall_s, r.memcpy_s, r.stall_ratio
    );
    println!(
        "local durable     {:>8.3} s  ({:.2} GB/s)   buffered write+fsync {:.3} s ({:.2} GB/s)   ratio {:.2}",
        r.durable_s,
        gb / r.durable_s,
        r.raw_write_fsync_s,
        gb / r.raw_write_fsync_s,
        r.durable_ratio
    );
    println!(
        "                                          O_DIRECT write       {:.3} s ({:.2} GB/s)   ratio {:.2}",
        r.raw_direct_write_s,
        gb / r.raw_direct_write_s,
        r.durable_vs_direct_ratio
    );
    println!(
        "cold restore      {:>8.3} s  ({:.2} GB/s)   raw cold read        {:.3} s ({:.2} GB/s)   ratio {:.2}   [{}]",
        r.restore_s,
        gb / r.restore_s,
        r.raw_cold_read_s,
        gb / r.raw_cold_read_s,
        r.restore_ratio,
        r.cold_method
    );
    println!(
        "dedup: {:.1}% of bytes changed -> {:.1}% written",
        100.0 * r.dedup_changed_fraction,
        100.0 * r.dedup_written_fraction
    );
    println!(
        "compression: stored ratio {:.3}; probe zstd-1 {:.3} ({:.2} GB/s/thread), byte-grouped {:.3} ({:.2} GB/s/thread); blake3 {:.2} GB/s/thread",
        r.compression_ratio,
        r.compression.zstd1_ratio,
        r.compression.zstd1_gbps,
        r.compression.zstd1_grouped_ratio,
        r.compression.zstd1_grouped_gbps,
        r.compression.blake3_gbps
    );
    println!(
        "peak RSS {} (state, staging and restore buffers)",
        human(r.peak_rss_bytes)
    );
    println!("checkpoints left in {} (run {})", r.store.display(), r.run);
}
