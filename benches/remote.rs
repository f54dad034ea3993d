//! Remote-tier throughput against a plain object_store multipart put and
//! get of the same bytes, measured in the same run, against the S3
//! endpoint in CAIRN_TEST_S3_ENDPOINT (scripts/bench-remote starts one).
//! Prints figures; asserts nothing about timings.

use cairn::StoreOptions;
use cairn::{RemoteOptions, RemoteStore};
use cairn_cli::bench::remote::run_remote_bench;
use std::io::{Read, Write};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Ok(endpoint) = std::env::var("CAIRN_TEST_S3_ENDPOINT") else {
        eprintln!("set CAIRN_TEST_S3_ENDPOINT (scripts/bench-remote starts a loopback server)");
        return;
    };
    let size: u64 = std::env::var("CAIRN_BENCH_SIZE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
        << 20;
    let iterations = std::env::var("CAIRN_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let bucket = format!("cairn-bench-{}", std::process::id());
    let hostport = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect");
    write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let options: Vec<(String, String)> = [
        ("endpoint", endpoint.as_str()),
        ("allow_http", "true"),
        ("region", "us-east-1"),
        ("access_key_id", "bench"),
        ("secret_access_key", "bench"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut ropts = RemoteOptions::default();
    if let Some(c) = std::env::var("CAIRN_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        ropts.concurrency = c;
    }
    let remote =
        RemoteStore::open(&format!("s3://{bucket}/ckpt"), &options, ropts).expect("open remote");
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_remote_bench(
        dir.path().join("local"),
        remote,
        size,
        iterations,
        StoreOptions {
            staging_bytes: 0,
            ..StoreOptions::default()
        },
        std::env::var("CAIRN_BENCH_DTYPE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default(),
    )
    .expect("remote bench");
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    println!(
        "state {} MiB: upload {:.3} GB/s vs plain multipart put {:.3} GB/s (ratio {:.2}); \
         remote stored/logical {:.3}; \
         download {:.3} GB/s vs plain ranged get {:.3} GB/s (ratio {:.2}); \
         second checkpoint (~10% changed) uploaded {:.1}% of the first",
        r.logical_bytes >> 20,
        r.upload_gbps,
        r.raw_put_gbps,
        r.upload_ratio,
        r.remote_stored_ratio,
        r.download_gbps,
        r.raw_get_gbps,
        r.download_ratio,
        100.0 * r.second_upload_fraction
    );
}
