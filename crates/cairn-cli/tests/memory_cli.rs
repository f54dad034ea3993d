//! Peak memory of the commands that move whole checkpoints: `cairn
//! restore --to DIR` (local to local), `cairn restore --to s3://` (an
//! upload), `cairn restore s3:// --to DIR` (a download), `cairn export`,
//! and `cairn daemon` draining a store. Each runs as its own process on a
//! checkpoint of 128 MiB in 1 MiB chunks (made by `cairn bench` in another
//! process, so that this one stays small: a child's peak RSS counts its
//! parent's memory until it execs), and its peak RSS (from `wait4`'s
//! resource usage; for the daemon, its own `VmHWM` read while it runs,
//! since its `wait4` figure after SIGTERM came out far above both) must
//! stay under a bound made of the chunks a copy keeps
//! in flight (its configured concurrency, never the core count), the
//! export's batch (it restores a shard's tensors in batches of at most
//! 32 MiB, a larger tensor alone, as it writes the file) and a fixed
//! allowance for the binary and its runtimes: well under the checkpoint's
//! size, so a command that holds the checkpoint, or an export that holds
//! a whole shard (the default `--max-shard-size` of 5 GiB puts this
//! checkpoint in one), fails.
//!
//! `restore --to DIR` and the download failed the bound before their fix:
//! the local target was opened with a 64 MiB pre-faulted staging pool that
//! a copy never uses (peaks of 88 to 97 MiB); it now gets the smallest pool
//! a store accepts. The export held a whole shard before its fix (a peak
//! of 145 MiB for the one-file export here; 47 MiB after).

#[path = "../../../tests/common/mod.rs"]
mod common;

use common::s3;

use cairn::{Store, StoreOptions};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHUNK: u64 = 1 << 20;
const STATE: u64 = 128 << 20;
/// Chunks in flight: the copies' default concurrency (8), each buffered
/// at most twice (the object read and its decoded or written form).
const IN_FLIGHT: u64 = 2 * 8 * CHUNK;
/// The binary, its tokio runtimes, the HTTP client, the smallest staging
/// pool of a writable local store (one default 16 MiB chunk), allocator
/// slack.
const FIXED: u64 = 48 << 20;
/// The export's shard size, for the sharded export.
const SHARD: u64 = 16 << 20;
/// The most tensor bytes an export restores at once (its batch).
const EXPORT_BATCH: u64 = 32 << 20;

/// Wait for `child` and return its exit status and peak RSS in bytes.
fn wait_peak(child: Child) -> (i32, u64) {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid with valid pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(r, child.id() as i32, "wait4");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    (code, ru.ru_maxrss as u64 * 1024)
}

fn run(args: &[&str]) -> u64 {
    let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (code, peak) = wait_peak(child);
    assert_eq!(code, 0, "cairn {args:?} failed");
    peak
}

fn remote_args() -> Vec<String> {
    let mut v = Vec::new();
    for (k, val) in s3::options() {
        v.push("--remote-option".to_string());
        v.push(format!("{k}={val}"));
    }
    v
}

fn check(what: &str, peak: u64, extra: u64) {
    let bound = IN_FLIGHT + FIXED + extra;
    eprintln!(
        "peak RSS of {what}: {:.1} MiB (bound {:.0} MiB)",
        peak as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert!(
        peak <= bound,
        "{what}: peak RSS {peak} bytes over the bound {bound} for a {STATE}-byte checkpoint"
    );
}

#[test]
fn whole_checkpoint_commands_stay_within_a_fixed_bound() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    run(&[
        "bench",
        local.to_str().unwrap(),
        "--size",
        "128MiB",
        "--iterations",
        "1",
        "--chunk-size",
        "1MiB",
        "--staging",
        "32MiB",
    ]);
    let opts = StoreOptions::default();
    let (logical, largest_tensor) = {
        let store = Store::open_read_only(&local, opts.clone()).unwrap();
        let m = store.manifest("bench", 0).unwrap();
        let logical: u64 = m.tensors.iter().map(|t| t.len).sum();
        assert!(logical > STATE - STATE / 50, "{logical}");
        assert!(m.distinct_chunks().len() as u64 >= STATE / CHUNK);
        (logical, m.tensors.iter().map(|t| t.len).max().unwrap())
    };
    let l = local.to_str().unwrap();

    let copy = dir.path().join("copy");
    let peak = run(&[
        "restore",
        l,
        "--run",
        "bench",
        "--step",
        "0",
        "--to",
        copy.to_str().unwrap(),
    ]);
    check("restore --to DIR", peak, 0);

    let export = |out: &std::path::Path, extra: &[&str]| {
        let base = ["export", l, "--run", "bench", "--step", "0"];
        run(&[&base[..], &["--out", out.to_str().unwrap()], extra].concat())
    };
    let out = dir.path().join("m.safetensors");
    let peak = export(
        &out,
        &["--format", "safetensors", "--max-shard-size", "16MiB"],
    );
    check("export", peak, SHARD.min(EXPORT_BATCH + largest_tensor));
    let exported: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(exported > STATE, "{exported}");
    // One file of the whole checkpoint (the default --max-shard-size).
    let single = dir.path().join("one.safetensors");
    let peak = export(&single, &[]);
    check("export to one file", peak, EXPORT_BATCH + largest_tensor);
    assert!(std::fs::metadata(&single).unwrap().len() > logical);

    let url = format!("s3://{}/ckpt", s3::new_bucket("mem"));
    let ra = remote_args();
    let mut args: Vec<&str> = vec!["restore", l, "--run", "bench", "--step", "0", "--to", &url];
    args.extend(ra.iter().map(String::as_str));
    check("restore --to s3:// (upload)", run(&args), 0);

    let down = dir.path().join("down");
    let mut args: Vec<&str> = vec!["restore", &url, "--run", "bench", "--step", "0", "--to"];
    let d = down.to_str().unwrap().to_string();
    args.push(&d);
    args.extend(ra.iter().map(String::as_str));
    check("restore s3:// --to DIR (download)", run(&args), 0);

    // The daemon drains the store to a fresh bucket, then stops on SIGTERM.
    let url2 = format!("s3://{}/ckpt", s3::new_bucket("memd"));
    let mut args: Vec<String> = vec![
        "daemon".into(),
        l.into(),
        "--remote".into(),
        url2.clone(),
        "--poll-interval".into(),
        "50ms".into(),
        "--gc-interval".into(),
        "0s".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(ra.iter().cloned());
    let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = Store::open_read_only(&local, opts).unwrap();
    let t = Instant::now();
    while !store.is_uploaded("bench", 0, &url2) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the daemon did not upload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The running daemon's own high-water mark (its mm's, exact).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (code, _) = wait_peak(child);
    assert_eq!(code, 0, "the daemon did not stop cleanly");
    check("daemon", peak, 0);
}
