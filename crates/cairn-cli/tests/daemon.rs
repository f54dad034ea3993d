//! The flush daemon as users run it: the `cairn daemon` binary against a
//! loopback S3-compatible server, killed with SIGKILL and restarted.

#[path = "../../../tests/common/mod.rs"]
mod common;
mod daemon_proc;

use cairn::{RemoteOptions, RemoteStore};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use daemon_proc::*;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

fn state(step: u64) -> OwnedState {
    state_for_step(step, 16, 400_000)
}

fn remote_args(bucket: &str) -> Vec<String> {
    let mut v = vec!["--remote".to_string(), format!("s3://{bucket}/ckpt")];
    for (k, val) in s3::options() {
        v.push("--remote-option".into());
        v.push(format!("{k}={val}"));
    }
    v
}

fn remote_for(bucket: &str) -> RemoteStore {
    RemoteStore::open(
        &format!("s3://{bucket}/ckpt"),
        &s3::options(),
        RemoteOptions::default(),
    )
    .unwrap()
}

/// Every listed remote checkpoint restores bit-exact: none is partial.
fn check_remote(remote: &RemoteStore, when: &str) -> Vec<u64> {
    let steps = remote.block_on(remote.steps("d")).unwrap().unwrap();
    for &s in &steps {
        let got = remote
            .restore("d", StepSel::Step(s), &TensorFilter::All)
            .unwrap_or_else(|e| panic!("{when}: listed remote step {s} does not restore: {e}"));
        assert_restored_eq(&got, &state(s));
    }
    steps
}

#[test]
fn sigkilled_daemon_restarts_and_finishes_without_reuploading_or_exposing_partials() {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("local");
    let store = Store::open(&local_dir, opts()).unwrap();
    let mut next_step = 0u64;
    for _ in 0..4 {
        store
            .save("d", next_step, &state(next_step).view())
            .unwrap()
            .wait()
            .unwrap();
        next_step += 1;
    }
    let bucket = s3::new_bucket("daemon");
    let remote = remote_for(&bucket);
    let mut args = vec!["daemon".to_string(), local_dir.display().to_string()];
    args.extend(remote_args(&bucket));
    args.extend(["--poll-interval", "50ms", "--gc-interval", "0s"].map(String::from));
    let mut rng = Rng(99);
    let mut logs = Vec::new();
    let kills = 12;
    for round in 0..kills {
        let port = free_port();
        let mut a = args.clone();
        a.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
        let log = dir.path().join(format!("daemon-{round}.log"));
        let mut child = spawn(&a, &log);
        logs.push(log);
        // A trainer keeps saving while the daemon drains.
        store
            .save("d", next_step, &state(next_step).view())
            .unwrap()
            .wait()
            .unwrap();
        next_step += 1;
        std::thread::sleep(Duration::from_millis(50 + rng.below(600)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        check_remote(&remote, &format!("after kill {round}"));
    }

    // A last run drains everything; then SIGTERM stops it cleanly.
    let port = free_port();
    let mut a = args.clone();
    a.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
    let log = dir.path().join("daemon-final.log");
    let mut child = spawn(&a, &log);
    logs.push(log.clone());
    let local_steps = store.steps("d").unwrap();
    let t = Instant::now();
    loop {
        let remote_steps = remote.block_on(remote.steps("d")).unwrap().unwrap();
        let st = status(port);
        if remote_steps == local_steps
            && st
                .as_ref()
                .is_some_and(|s| s["queue_depth"] == 0 && s["cycles"].as_u64() > Some(0))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "daemon did not drain: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = http_get(port, "/metrics").unwrap().1;
    for m in [
        "cairn_bytes_uploaded_total",
        "cairn_chunks_uploaded_total",
        "cairn_queue_depth 0",
        "cairn_retries_total",
        "cairn_errors_total",
        "cairn_newest_step{run=\"d\",tier=\"remote\"}",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics:\n{metrics}");
    }
    let exit = sigterm_logged(&mut child, &log).0;
    assert!(exit.success(), "daemon exited with {exit:?} on SIGTERM");

    let steps = check_remote(&remote, "after draining");
    assert_eq!(steps, local_steps);
    for &s in &steps {
        assert!(store.is_uploaded("d", s, remote.url()));
    }
    // No chunk went up twice across all the restarts.
    let mut seen = HashSet::new();
    let mut uploads = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        for line in text.lines().filter(|l| l.contains("uploaded chunk")) {
            let id = line
                .split("chunk=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap()
                .to_string();
            uploads += 1;
            assert!(seen.insert(id.clone()), "chunk {id} uploaded twice");
        }
    }
    assert!(uploads > 0);
}

#[test]
fn config_file_retention_gc_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("local");
    let store = Store::open(&local_dir, opts()).unwrap();
    for step in 0..8 {
        store
            .save("d", step, &state(step).view())
            .unwrap()
            .wait()
            .unwrap();
    }
    let bucket = s3::new_bucket("cfg");
    let remote = remote_for(&bucket);
    let port = free_port();
    let mut toml = format!(
        "local = {:?}\nremote = \"s3://{bucket}/ckpt\"\npoll_interval = \"50ms\"\nlisten = \"127.0.0.1:{port}\"\n\n[remote_options]\n",
        local_dir.display().to_string()
    );
    for (k, v) in s3::options() {
        toml.push_str(&format!("{k} = {v:?}\n"));
    }
    toml.push_str(
        "\n[retention]\nlocal_keep_last = 2\nremote_keep_last = 2\nremote_keep_every = 4\n\n[gc]\ninterval = \"100ms\"\nlocal_grace = \"0s\"\n\n[remote_tuning]\ngc_grace = \"1h\"\n",
    );
    let cfg = dir.path().join("cairn-daemon.toml");
    std::fs::write(&cfg, toml).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn(
        &[
            "daemon".to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ],
        &log,
    );
    let t = Instant::now();
    loop {
        let r = remote.block_on(remote.steps("d")).unwrap().unwrap();
        let l = store.steps("d").unwrap();
        let gc_done =
            status(port).is_some_and(|s| s["last_local_gc"]["chunks_deleted"].as_u64() > Some(0));
        if r == vec![0, 4, 6, 7] && l == vec![6, 7] && gc_done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "remote {r:?}, local {l:?}, log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = status(port).unwrap();
    assert_eq!(s["newest_remote"]["d"], 7);
    assert!(s["retention_deleted_local"].as_u64().unwrap() >= 6);
    assert!(s["retention_deleted_remote"].as_u64().unwrap() >= 4);
    assert!(sigterm_logged(&mut child, &log).0.success());
    // What is left locally is whole, and local GC left no garbage behind.
    drop(store);
    let store = Store::open_read_only(&local_dir, opts()).unwrap();
    assert!(store.verify(None, None).unwrap().ok());
    let mut referenced = HashSet::new();
    for step in store.steps("d").unwrap() {
        let m = store.manifest("d", step).unwrap();
        referenced.extend(m.distinct_chunks().iter().map(|c| c.0.to_hex()));
    }
    let on_disk: HashSet<String> = chunk_files(&local_dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(on_disk, referenced);
    for step in [0, 4, 6, 7] {
        let got = remote
            .restore("d", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &state(step));
    }
}

#[test]
fn bad_daemon_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["daemon"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--remote"));
    let missing = dir.path().join("none");
    let o = run(&[
        "daemon",
        missing.to_str().unwrap(),
        "--remote",
        "file:///tmp/x",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
    Store::open(dir.path().join("s"), opts()).unwrap();
    let s = dir.path().join("s");
    let o = run(&[
        "daemon",
        s.to_str().unwrap(),
        "--remote",
        "file:///tmp/x",
        "--listen",
        "0.0.0.0:9999",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"));
    // A file:// remote that is the local store, or lies among its files:
    // the upload would copy the store onto itself, and local retention
    // would then delete its checkpoints as durable remotely.
    for remote in [s.clone(), s.join("tmp/remote"), dir.path().to_path_buf()] {
        let url = format!("file://{}", remote.display());
        let o = run(&["daemon", s.to_str().unwrap(), "--remote", &url]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains("overlaps"), "{url}: {err}");
    }
    assert!(!s.join("tmp/remote").exists());
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "local = 3\n").unwrap();
    let o = run(&["daemon", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.toml"));
}
