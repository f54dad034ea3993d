//! `cairn bench`.

use super::size::{human, parse_size};
use cairn::{CodecChoice, StoreOptions};
use cairn_cli::bench::raw::IoShape;
use cairn_cli::bench::remote::{run_remote_bench, RemoteBenchReport};
use cairn_cli::bench::synthetic::Precision;
use cairn_cli::bench::{run_bench, BenchConfig, BenchReport, MIN_SIZE};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchArgs {
    /// Store directory (created if missing); checkpoints are left there.
    store: PathBuf,
    /// Size of the synthetic training state (weights + Adam states), at
    /// least 1 MiB; the bench holds about three copies of it in memory.
    #[arg(long, default_value = "1GiB", value_parser = parse_bench_size)]
    size: u64,
    /// Measured iterations (at least 1); medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    iterations: usize,
    /// Save the state once before the measured iterations and report its
    /// time apart (`first_save_durable_s`): the first save into a new
    /// store is slower than the ones after it.
    #[arg(long)]
    warmup: bool,
    /// Chunk size (4 KiB to 1 GiB).
    #[arg(long, default_value = "16MiB", value_parser = parse_chunk_size)]
    chunk_size: u64,
    /// Staging budget, at least one chunk: a size, or a percentage of
    /// `--size` such as `25%` (default: enough for the whole state).
    #[arg(long, value_parser = parse_staging)]
    staging: Option<Staging>,
    /// Threads that copy the state into staging (default: four).
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=cairn::MAX_THREADS as u64))]
    copy_threads: usize,
    /// Threads that hash (and encode) staged chunks (default: one per
    /// core).
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=cairn::MAX_THREADS as u64))]
    workers: usize,
    /// Of the workers, how many run at the bench's own priority while the
    /// rest run ten nice steps lower (default: the store's default, none).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=cairn::MAX_THREADS as u64))]
    lead_workers: Option<usize>,
    /// Threads that write, fsync and publish chunk files: the write queue
    /// depth (default: the store's default, 16; at most one per two chunks
    /// of the staging pool).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=cairn::MAX_THREADS as u64))]
    sync_threads: Option<usize>,
    /// Threads that read chunks during the restore (default: the store's
    /// default).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=cairn::MAX_THREADS as u64))]
    read_threads: Option<usize>,
    /// Make chunk files durable with one `syncfs` per run of files written
    /// with O_DIRECT, instead of an `fdatasync` each (the store's
    /// `batch_sync`).
    #[arg(long)]
    batch_sync: bool,
    /// Hash every chunk before writing it, as with the store's
    /// `early_write` off (by default a chunk likely to be new is written
    /// as soon as it is staged).
    #[arg(long)]
    no_early_write: bool,
    /// Local-tier codec: raw, zstd or zstd:LEVEL.
    #[arg(long, default_value = "raw")]
    codec: CodecChoice,
    /// Precision of the synthetic state: fp32 (weights and Adam moments),
    /// bf16 (all of it), or mixed (bf16 weights with fp32 master weights
    /// and Adam moments).
    #[arg(long, default_value = "fp32")]
    dtype: Precision,
    /// Measure the remote tier at this URL instead of the disk: upload and
    /// restore against a plain multipart put and a plain concurrent ranged
    /// get of the same bytes, and the bytes each tier stores. The store
    /// directory is the local tier; `--remote-option` configures the
    /// remote (`codec=zstd:3`, `compress_threads=N`, `concurrency=N`, and
    /// the object store's keys).
    #[arg(long, value_name = "URL")]
    remote: Option<String>,
    /// Run name for the checkpoints.
    #[arg(long, default_value = "bench", value_parser = super::parse_run)]
    run: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `--size`: a size of at least [`MIN_SIZE`].
fn parse_bench_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v < MIN_SIZE {
        return Err(format!(
            "{s:?} is too small: the state must be at least {} MiB",
            MIN_SIZE >> 20
        ));
    }
    Ok(v)
}

/// `--staging`: bytes, or a share of the state.
#[derive(Clone, Copy, Debug)]
pub enum Staging {
    /// A size in bytes.
    Bytes(u64),
    /// Percent of `--size` (1 to 100).
    Percent(u64),
}

impl Staging {
    fn bytes(self, size: u64) -> u64 {
        match self {
            Staging::Bytes(b) => b,
            // Multiplied first: 25% of 64 MiB is 16 MiB, one chunk.
            Staging::Percent(p) => (u128::from(size) * u128::from(p) / 100) as u64,
        }
    }
}

fn parse_staging(s: &str) -> Result<Staging, String> {
    match s.strip_suffix('%') {
        Some(p) => match p.trim().parse::<u64>() {
            Ok(p) if (1..=100).contains(&p) => Ok(Staging::Percent(p)),
            _ => Err(format!("{s:?} must be a percentage from 1% to 100%")),
        },
        None => parse_size(s).map(Staging::Bytes),
    }
}

/// `--chunk-size`: 4 KiB to 1 GiB.
fn parse_chunk_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    let max = cairn::format::chunk::MAX_CHUNK_LEN;
    if !(4096..=max).contains(&v) {
        return Err(format!("{s:?} must be between 4 KiB and {}", human(max)));
    }
    Ok(v)
}

impl BenchArgs {
    /// Checks across arguments: the staging budget holds at least a chunk.
    pub fn check(&self) -> Result<(), String> {
        match self.staging.map(|st| st.bytes(self.size)) {
            Some(st) if st < self.chunk_size => Err(format!(
                "--staging {} is smaller than one chunk (--chunk-size {})",
                human(st),
                human(self.chunk_size)
            )),
            _ => Ok(()),
        }
    }
}

pub fn run(a: BenchArgs, remote_options: &[String]) -> cairn::Result<i32> {
    let defaults = StoreOptions::default();
    if let Some(url) = &a.remote {
        let remote = cairn::RemoteStore::open(
            url,
            &super::open::remote_options(remote_options)?,
            cairn::RemoteOptions::default(),
        )?;
        eprintln!(
            "cairn bench: {} {} state against {url}, {} iterations",
            human(a.size),
            a.dtype,
            a.iterations
        );
        let r = run_remote_bench(
            a.store,
            remote,
            a.size,
            a.iterations,
            StoreOptions {
                chunk_size: a.chunk_size as usize,
                staging_bytes: a.staging.map_or(0, |st| st.bytes(a.size)) as usize,
                codec: a.codec,
                ..defaults
            },
            a.dtype,
        )?;
        if a.json {
            super::open::print_json(&r)?;
        } else {
            print_remote(&r)?;
        }
        return Ok(0);
    }
    let cfg = BenchConfig {
        store: a.store,
        run: a.run,
        size: a.size,
        iterations: a.iterations,
        warmup: a.warmup,
        precision: a.dtype,
        options: StoreOptions {
            chunk_size: a.chunk_size as usize,
            staging_bytes: a.staging.map_or(0, |st| st.bytes(a.size)) as usize,
            copy_threads: a.copy_threads,
            workers: a.workers,
            lead_workers: a.lead_workers.unwrap_or(defaults.lead_workers),
            sync_threads: a.sync_threads.unwrap_or(defaults.sync_threads),
            read_threads: a.read_threads.unwrap_or(defaults.read_threads),
            codec: a.codec,
            batch_sync: a.batch_sync,
            early_write: !a.no_early_write,
            ..defaults
        },
    };
    let json = a.json;
    let r = run_bench(&cfg, |msg| eprintln!("cairn bench: {msg}"))?;
    if json {
        super::open::print_json(&r)?;
    } else {
        print_human(&r)?;
    }
    Ok(0)
}

fn print_remote(r: &RemoteBenchReport) -> cairn::Result<()> {
    outln!(
        "state: {} {} against {} (remote codec {}); medians of {} iterations",
        human(r.logical_bytes),
        r.dtype,
        r.remote,
        r.remote_codec,
        r.iterations.len()
    );
    outln!(
        "stored / logical  local {:.3}   remote {:.3}",
        r.local_stored_ratio,
        r.remote_stored_ratio
    );
    outln!(
        "upload            {:.3} GB/s   plain multipart put {:.3} GB/s   ratio {:.2} (range {:.2}-{:.2})",
        r.upload_gbps,
        r.raw_put_gbps,
        r.upload_ratio,
        r.upload_ratio_range.0,
        r.upload_ratio_range.1
    );
    outln!(
        "restore           {:.3} GB/s   plain ranged get    {:.3} GB/s   ratio {:.2} (range {:.2}-{:.2})",
        r.download_gbps,
        r.raw_get_gbps,
        r.download_ratio,
        r.download_ratio_range.0,
        r.download_ratio_range.1
    );
    outln!(
        "                                 plain single GET    {:.3} GB/s   ratio {:.2}",
        r.raw_single_get_gbps,
        r.download_vs_single_get
    );
    outln!(
        "dedup: next checkpoint (~10% changed) uploaded {:.1}% of the first",
        100.0 * r.second_upload_fraction
    );
    Ok(())
}

fn print_human(r: &BenchReport) -> cairn::Result<()> {
    let gb = r.logical_bytes as f64 / 1e9;
    outln!(
        "state: {} in {} tensors; chunk {}, staging {}, codec {:?}; medians of {} iterations",
        human(r.logical_bytes),
        r.tensors,
        human(r.chunk_size as u64),
        human(r.staging_bytes as u64),
        r.codec,
        r.iterations.len()
    );
    outln!(
        "save stall        {:>8.3} s   memcpy {:>8.3} s   stall/memcpy {:.2}x{}",
        r.stall_s,
        r.memcpy_s,
        r.stall_ratio,
        r.stall_steal_share
            .map(|s| format!("   steal during it {:.0}%", s * 100.0))
            .unwrap_or_default()
    );
    outln!(
        "local durable     {:>8.3} s  ({:.2} GB/s)   buffered write+fsync {:.3} s ({:.2} GB/s)   ratio {:.2}",
        r.durable_s,
        gb / r.durable_s,
        r.raw_write_fsync_s,
        gb / r.raw_write_fsync_s,
        r.durable_ratio
    );
    outln!(
        "                                          O_DIRECT write       {:.3} s ({:.2} GB/s)   ratio {:.2}",
        r.raw_direct_write_s,
        gb / r.raw_direct_write_s,
        r.durable_vs_direct_ratio
    );
    outln!(
        "cold restore      {:>8.3} s  ({:.2} GB/s)   raw cold read        {:.3} s ({:.2} GB/s)   ratio {:.2}   [{}]",
        r.restore_s,
        gb / r.restore_s,
        r.raw_cold_read_s,
        gb / r.raw_cold_read_s,
        r.restore_ratio,
        r.cold_method
    );
    outln!(
        "disk limit        write {:.3} s ({:.2} GB/s, {})   read {:.3} s ({:.2} GB/s, {})",
        r.limit_write_s,
        gb / r.limit_write_s,
        shape(&r.limit_write_shape),
        r.limit_read_s,
        gb / r.limit_read_s,
        shape(&r.limit_read_shape)
    );
    outln!(
        "vs the limit      durable {:.2}   restore {:.2}",
        r.durable_vs_limit,
        r.restore_vs_limit
    );
    if let Some(first) = r.first_save_durable_s {
        outln!(
            "first save        {:>8.3} s  ({:.2} GB/s)   the warm-up save into the store, not in the medians",
            first,
            gb / first
        );
    }
    outln!(
        "save busy         hash {:.3} s   write {:.3} s   fdatasync+rename {:.3} s   commit {:.3} s (summed over threads; I/O threads: {})",
        r.hash_busy_s,
        r.write_busy_s,
        r.sync_busy_s,
        r.commit_s,
        r.io_threads
    );
    if let (Some(b), Some(x)) = (r.overlap_bound_s, r.stall_vs_overlap_bound) {
        outln!(
            "small staging     stall {:.3} s vs bound {:.3} s (unstaged part at the disk limit + memcpy of the staged part): {:.2}x",
            r.stall_s,
            b,
            x
        );
    }
    outln!(
        "dedup: {:.1}% of bytes changed -> {:.1}% written",
        100.0 * r.dedup_changed_fraction,
        100.0 * r.dedup_written_fraction
    );
    outln!(
        "compression: stored ratio {:.3}; probe zstd-1 {:.3} ({:.2} GB/s/thread), byte-grouped {:.3} ({:.2} GB/s/thread); blake3 {:.2} GB/s/thread",
        r.compression_ratio,
        r.compression.zstd1_ratio,
        r.compression.zstd1_gbps,
        r.compression.zstd1_grouped_ratio,
        r.compression.zstd1_grouped_gbps,
        r.compression.blake3_gbps
    );
    outln!(
        "peak RSS {} (state, staging and restore buffers)",
        human(r.peak_rss_bytes)
    );
    outln!("checkpoints left in {} (run {})", r.store.display(), r.run);
    Ok(())
}

/// A limit sweep's shape in words.
fn shape(s: &IoShape) -> String {
    let io = format!("{} x {} in flight", human(s.block as u64), s.depth);
    match s.file_bytes {
        0 => format!("{io}, one file"),
        f => format!("{io}, {} files", human(f as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::Staging;

    /// A share of the state is that share of its bytes, not of its bytes
    /// rounded down to a hundredth (25% of 64 MiB was 16 bytes short of
    /// one 16 MiB chunk, and refused as smaller than a chunk).
    #[test]
    fn a_staging_share_is_exact() {
        assert_eq!(Staging::Percent(25).bytes(64 << 20), 16 << 20);
        assert_eq!(Staging::Percent(25).bytes(1 << 30), 256 << 20);
        assert_eq!(Staging::Percent(100).bytes(u64::MAX), u64::MAX);
        assert_eq!(Staging::Percent(1).bytes(99), 0);
        assert_eq!(Staging::Bytes(5).bytes(1 << 30), 5);
    }
}
