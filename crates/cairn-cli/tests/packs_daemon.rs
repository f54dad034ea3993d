//! The flush daemon uploading into a remote that packs small chunks
//! (`--remote-option pack_threshold=...`), on the loopback S3 server:
//! SIGKILLed at each edge of a packed upload (after a pack, after the pack
//! map, before the manifest) and at random while a trainer saves, it never
//! leaves a listed checkpoint that does not restore, a restart completes
//! the upload, and no pack is uploaded twice.

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::{ChunkTier, RemoteOptions, RemoteStore};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// Every chunk packed, about 1 MiB of chunks per pack.
const PACK_OPTIONS: [(&str, &str); 2] = [("pack_threshold", "1MiB"), ("pack_size", "1MiB")];

fn remote_options() -> RemoteOptions {
    RemoteOptions {
        pack_threshold: 1 << 20,
        pack_size: 1 << 20,
        ..RemoteOptions::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the daemon listening on `port` has finished a cycle (so it
/// handles SIGTERM).
fn cycled(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(b).ok())
        .is_some_and(|v| v["cycles"].as_u64() > Some(0))
}

/// The port a daemon started with `args` listens on.
fn port_of(args: &[String]) -> u16 {
    args.last()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn daemon_args(local: &Path, url: &str) -> Vec<String> {
    let mut args = vec![
        "daemon".to_string(),
        local.display().to_string(),
        "--remote".into(),
        url.into(),
    ];
    for (k, v) in s3::options()
        .into_iter()
        .chain(PACK_OPTIONS.map(|(k, v)| (k.to_string(), v.to_string())))
    {
        args.push("--remote-option".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(["--poll-interval", "50ms", "--gc-interval", "0s"].map(String::from));
    args.extend(["--listen".to_string(), format!("127.0.0.1:{}", free_port())]);
    args
}

fn spawn(args: &[String], log: &Path, pause: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(args)
        .env("CAIRN_LOG", "cairn=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(p) = pause {
        cmd.env("CAIRN_FAILPOINT_PAUSE", p);
    }
    cmd.spawn().expect("spawn cairn daemon")
}

fn sigterm(child: &mut Child) {
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "daemon exited with {st:?} on SIGTERM");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, logs: &[PathBuf], mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > Duration::from_secs(120) {
            let text: Vec<String> = logs
                .iter()
                .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .collect();
            panic!(
                "timed out waiting for {what}; logs:\n{}",
                text.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pack ids in the "uploaded pack" lines of `logs`.
fn uploaded_packs(logs: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap();
        for line in text.lines().filter(|l| l.contains("uploaded pack")) {
            let id = line
                .split("pack=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap()
                .to_string();
            out.push(id);
        }
    }
    out
}

fn check_remote(url: &str, run: &str, when: &str) -> Vec<u64> {
    // A new handle each time: nothing learned from earlier reads.
    let remote = RemoteStore::open(url, &s3::options(), remote_options()).unwrap();
    let steps = remote.block_on(remote.steps(run)).unwrap().unwrap();
    for &s in &steps {
        let got = remote
            .restore(run, StepSel::Step(s), &TensorFilter::All)
            .unwrap_or_else(|e| panic!("{when}: listed remote step {s} does not restore: {e}"));
        assert_restored_eq(&got, &state(s));
    }
    steps
}

/// Stopped and SIGKILLed after its first pack (no pack map yet), or after
/// its pack map (no manifest yet): the remote lists no checkpoint; a
/// restart completes the upload, which restores bit-exact from packs
/// alone, without putting any pack the killed daemon had put.
#[test]
fn a_daemon_killed_at_each_edge_of_a_packed_upload_leaves_nothing_listed_and_a_restart_completes_it(
) {
    for pause in ["pack.after_put", "copy.before_commit"] {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        let store = Store::open(&local, opts()).unwrap();
        store
            .save("d", 0, &state(0).view())
            .unwrap()
            .wait()
            .unwrap();
        let url = format!("s3://{}/ckpt", s3::new_bucket("packd"));
        let remote = RemoteStore::open(&url, &s3::options(), remote_options()).unwrap();

        let first = dir.path().join("first.log");
        let mut child = spawn(&daemon_args(&local, &url), &first, Some(pause));
        let line = format!("paused at fail point {pause}");
        wait_for(&line, std::slice::from_ref(&first), || {
            std::fs::read_to_string(&first).is_ok_and(|t| t.contains(&line))
        });
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            remote
                .block_on(remote.steps("d"))
                .unwrap()
                .unwrap()
                .is_empty(),
            "{pause}: a checkpoint is listed before its manifest"
        );
        let packs = remote.block_on(remote.list_packs()).unwrap().unwrap();
        assert!(!packs.is_empty(), "{pause}: a pack was put before the kill");
        // No manifest yet: the map is found by listing (it is named by the
        // hash of the manifest it goes with).
        let maps = remote.block_on(remote.list_pack_maps()).unwrap().unwrap();
        assert_eq!(
            maps.iter()
                .any(|(run, step, _, _)| run == "d" && *step == 0),
            pause == "copy.before_commit",
            "{pause}: the pack map is put after the packs, before the manifest"
        );

        let second = dir.path().join("second.log");
        let args = daemon_args(&local, &url);
        let mut child = spawn(&args, &second, None);
        let logs = [first.clone(), second.clone()];
        wait_for("a daemon cycle", &logs, || cycled(port_of(&args)));
        wait_for("the restarted upload", &logs, || {
            remote.block_on(remote.steps("d")).unwrap().unwrap() == vec![0]
        });
        wait_for("the upload marker", &logs, || {
            store.is_uploaded("d", 0, &url)
        });
        sigterm(&mut child);
        assert_eq!(check_remote(&url, "d", pause), vec![0]);
        assert!(
            ChunkTier::list_chunks(&remote).unwrap().is_empty(),
            "{pause}: every chunk is in a pack"
        );
        let ups = uploaded_packs(&logs);
        let distinct: HashSet<_> = ups.iter().collect();
        assert_eq!(
            distinct.len(),
            ups.len(),
            "{pause}: a pack uploaded twice: {ups:?}"
        );
        if pause == "copy.before_commit" {
            assert!(
                uploaded_packs(std::slice::from_ref(&second)).is_empty(),
                "the restart found every pack in place"
            );
        }
    }
}

/// SIGKILLed at random points while a trainer keeps saving, restarted each
/// time: after every kill each listed remote checkpoint restores bit-exact
/// from its packs; the last run drains everything; no pack is uploaded
/// twice across all runs.
#[test]
fn a_packing_daemon_sigkilled_at_random_never_exposes_a_partial_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    let url = format!("s3://{}/ckpt", s3::new_bucket("packk"));
    let mut next_step = 0u64;
    for _ in 0..3 {
        store
            .save("d", next_step, &state(next_step).view())
            .unwrap()
            .wait()
            .unwrap();
        next_step += 1;
    }
    let mut rng = Rng(11);
    let mut logs = Vec::new();
    for round in 0..6 {
        let log = dir.path().join(format!("daemon-{round}.log"));
        let mut child = spawn(&daemon_args(&local, &url), &log, None);
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
        check_remote(&url, "d", &format!("after kill {round}"));
    }
    let log = dir.path().join("daemon-final.log");
    let args = daemon_args(&local, &url);
    let mut child = spawn(&args, &log, None);
    logs.push(log);
    wait_for("a daemon cycle", &logs, || cycled(port_of(&args)));
    let local_steps = store.steps("d").unwrap();
    let remote = RemoteStore::open(&url, &s3::options(), remote_options()).unwrap();
    wait_for("the daemon to drain", &logs, || {
        remote.block_on(remote.steps("d")).unwrap().unwrap() == local_steps
            && local_steps.iter().all(|&s| store.is_uploaded("d", s, &url))
    });
    sigterm(&mut child);
    assert_eq!(check_remote(&url, "d", "after draining"), local_steps);
    let ups = uploaded_packs(&logs);
    assert!(!ups.is_empty());
    let distinct: HashSet<_> = ups.iter().collect();
    assert_eq!(distinct.len(), ups.len(), "a pack uploaded twice");
}
