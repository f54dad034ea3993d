//! The flush daemon against the GCS and Azure emulators `scripts/test`
//! starts: the `cairn daemon` binary, killed with SIGKILL at random points
//! while a trainer keeps saving, restarted each time; no listed remote
//! checkpoint is ever partial, and the last run drains everything without
//! uploading any chunk twice.

#[path = "../../../tests/common/mod.rs"]
mod common;
mod daemon_proc;

#[path = "../../../tests/common/azure.rs"]
mod azure;
#[path = "../../../tests/common/gcs.rs"]
mod gcs;

use cairn::{RemoteOptions, RemoteStore};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use daemon_proc::*;
use std::collections::HashSet;
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

/// The kill-and-restart scenario against the store at `url`.
fn sigkilled_daemon(url: &str, options: &[(String, String)]) {
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
    let remote = RemoteStore::open(url, options, RemoteOptions::default()).unwrap();
    let mut args = vec![
        "daemon".to_string(),
        local_dir.display().to_string(),
        "--remote".into(),
        url.into(),
    ];
    for (k, v) in options {
        args.push("--remote-option".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(["--poll-interval", "50ms", "--gc-interval", "0s"].map(String::from));
    let mut rng = Rng(7);
    let mut logs = Vec::new();
    for round in 0..10 {
        let port = free_port();
        let mut a = args.clone();
        a.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
        let log = dir.path().join(format!("daemon-{round}.log"));
        let mut child = spawn(&a, &log);
        logs.push(log);
        store
            .save("d", next_step, &state(next_step).view())
            .unwrap()
            .wait()
            .unwrap();
        next_step += 1;
        std::thread::sleep(Duration::from_millis(50 + rng.below(600)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        check_remote(&remote, &format!("{url}: after kill {round}"));
    }

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
            "{url}: daemon did not drain: {st:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let exit = sigterm_logged(&mut child, &log).0;
    assert!(exit.success(), "daemon exited with {exit:?} on SIGTERM");

    let steps = check_remote(&remote, &format!("{url}: after draining"));
    assert_eq!(steps, local_steps);
    for &s in &steps {
        assert!(store.is_uploaded("d", s, remote.url()));
    }
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
            assert!(seen.insert(id.clone()), "{url}: chunk {id} uploaded twice");
        }
    }
    assert!(uploads > 0);
}

#[test]
fn sigkilled_daemon_on_gcs_finishes_without_reuploading_or_exposing_partials() {
    let bucket = gcs::new_bucket("daemon");
    sigkilled_daemon(&format!("gs://{bucket}/ckpt"), &gcs::options());
}

#[test]
fn sigkilled_daemon_on_azure_finishes_without_reuploading_or_exposing_partials() {
    let container = azure::new_container("daemon");
    sigkilled_daemon(&format!("az://{container}/ckpt"), &azure::options());
}
