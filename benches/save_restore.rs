//! Save/restore throughput against the raw disk and memcpy, measured in
//! the same run. Prints figures; asserts nothing about timings.
//!
//! ```sh
//! cargo bench --bench save_restore            # 1 GiB, raw and zstd codecs
//! CAIRN_BENCH_SIZE=4GiB CAIRN_BENCH_ITERS=5 cargo bench --bench save_restore
//! ```

use cairn::{CodecChoice, StoreOptions};
use cairn_cli::bench::{run_bench, BenchConfig};

fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (n, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else {
        (s, 1)
    };
    n.parse::<u64>()
        .expect("CAIRN_BENCH_SIZE like 1GiB or 512MiB")
        * mult
}

fn main() {
    // `cargo test --benches` runs bench targets with --bench absent; skip.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let size = parse_size(&std::env::var("CAIRN_BENCH_SIZE").unwrap_or_else(|_| "1GiB".into()));
    let iterations: usize = std::env::var("CAIRN_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!("codec    chunk  stall/memcpy  durable GB/s  vs buffered  vs O_DIRECT  restore GB/s  vs raw read  stored ratio");
    for (codec, chunk) in [
        (CodecChoice::Raw, 4usize << 20),
        (CodecChoice::Raw, 16 << 20),
        (CodecChoice::Raw, 64 << 20),
        (CodecChoice::Zstd { level: 1 }, 16 << 20),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = BenchConfig {
            store: dir.path().join("store"),
            run: "bench".into(),
            size,
            iterations,
            warmup: false,
            precision: Default::default(),
            options: StoreOptions {
                chunk_size: chunk,
                staging_bytes: 0,
                codec,
                ..StoreOptions::default()
            },
        };
        let r = run_bench(&cfg, |_| {}).expect("bench");
        println!(
            "{:<8} {:>4}M  {:>12.2}  {:>12.2}  {:>11.2}  {:>11.2}  {:>12.2}  {:>11.2}  {:>12.3}",
            match codec {
                CodecChoice::Raw => "raw".to_string(),
                CodecChoice::Zstd { level } => format!("zstd:{level}"),
            },
            chunk >> 20,
            r.stall_ratio,
            r.durable_gbps,
            r.durable_ratio,
            r.durable_vs_direct_ratio,
            r.restore_gbps,
            r.restore_ratio,
            r.compression_ratio
        );
    }
}
