//! Small behaviours of the binary users rely on: the daemon's `/healthz`
//! and `/metrics` values; SIGTERM during an upload; local retention while
//! the remote is down; an export of a corrupt checkpoint.

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::{RemoteOptions, RemoteStore, StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn daemon(local: &Path, url: &str, endpoint: &str, port: u16, extra: &[&str]) -> Child {
    let mut args: Vec<String> = vec![
        "daemon".into(),
        local.display().to_string(),
        "--remote".into(),
        url.into(),
        "--poll-interval".into(),
        "50ms".into(),
        "--gc-interval".into(),
        "0s".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    for (k, v) in s3::options() {
        let v = if k == "endpoint" {
            endpoint.to_string()
        } else {
            v
        };
        args.push("--remote-option".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// (status code, body) of a GET on the daemon's endpoint.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// The metric lines of `/metrics`, by name with labels.
fn metrics(port: u16) -> BTreeMap<String, f64> {
    let (code, body) = get(port, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Once the daemon drained two checkpoints: `/healthz` is 200 `ok`, and
/// `/metrics` counts exactly the distinct chunks and their bytes, two
/// checkpoints and manifests, nothing failing or queued, and the newest
/// step per tier.
///
/// Planted bug this catches: chunks skipped also counted as uploaded in
/// the remote metrics (`cairn_chunks_uploaded_total` was 18 for 10
/// distinct chunks).
#[test]
fn daemon_health_and_metric_values() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    let mut s2 = state_for_step(1, 6, 600_000);
    let s1 = s2.clone();
    s2.tensors[0].data.iter_mut().for_each(|b| *b ^= 0xFF);
    store.save("h", 1, &s1.view()).unwrap().wait().unwrap();
    store.save("h", 2, &s2.view()).unwrap().wait().unwrap();
    let mut chunks = BTreeSet::new();
    for s in [1, 2] {
        for (id, _) in store.manifest("h", s).unwrap().distinct_chunks() {
            chunks.insert(id);
        }
    }
    let bytes: u64 = chunks
        .iter()
        .map(|id| std::fs::metadata(store.chunk_path(id)).unwrap().len())
        .sum();
    let url = format!("s3://{}/ckpt", s3::new_bucket("health"));
    let port = free_port();
    let mut child = daemon(&local, &url, &s3::endpoint(), port, &[]);
    wait_for("both uploaded and reported", || {
        store.is_uploaded("h", 2, &url)
            && store.is_uploaded("h", 1, &url)
            && get(port, "/metrics").is_some_and(|(_, b)| {
                // The remote's newest step is read by the cycle after the
                // upload.
                b.contains("cairn_queue_depth 0")
                    && b.contains("cairn_newest_step{run=\"h\",tier=\"remote\"}")
            })
    });
    let (code, body) = get(port, "/healthz").unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    let m = metrics(port);
    let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing: {m:?}"));
    assert_eq!(v("cairn_chunks_uploaded_total"), chunks.len() as f64);
    assert_eq!(v("cairn_bytes_uploaded_total"), bytes as f64);
    assert_eq!(v("cairn_checkpoints_uploaded_total"), 2.0);
    assert_eq!(v("cairn_manifests_uploaded_total"), 2.0);
    assert_eq!(v("cairn_queue_depth"), 0.0);
    assert_eq!(v("cairn_healthy"), 1.0);
    assert_eq!(v("cairn_checkpoints_failing"), 0.0);
    assert_eq!(v("cairn_upload_failures_total"), 0.0);
    assert_eq!(v("cairn_newest_step{run=\"h\",tier=\"local\"}"), 2.0);
    assert_eq!(v("cairn_newest_step{run=\"h\",tier=\"remote\"}"), 2.0);
    assert!(sigterm(&mut child).success());
}

/// SIGTERM while a checkpoint is uploading: the daemon exits 0, the remote
/// holds no partial checkpoint and the local one is not marked; the next
/// run completes it.
///
/// Planted bug this catches: the SIGTERM handler exiting the process with
/// status 1 instead of stopping between steps.
#[test]
fn sigterm_during_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    let s = state_for_step(3, 48, 2 << 20);
    store.save("t", 1, &s.view()).unwrap().wait().unwrap();
    let url = format!("s3://{}/ckpt", s3::new_bucket("term"));
    let remote = RemoteStore::open(&url, &s3::options(), RemoteOptions::default()).unwrap();
    let port = free_port();
    let mut child = daemon(&local, &url, &s3::endpoint(), port, &[]);
    wait_for("an upload under way", || {
        get(port, "/metrics").is_some_and(|(_, b)| {
            b.lines()
                .find_map(|l| l.strip_prefix("cairn_chunks_uploaded_total "))
                .is_some_and(|n| n.trim() != "0")
        })
    });
    let st = sigterm(&mut child);
    assert!(st.success(), "{st}");
    let steps = remote.block_on(remote.steps("t")).unwrap().unwrap();
    if store.is_uploaded("t", 1, &url) {
        // The upload finished before the signal was seen.
        assert_eq!(steps, vec![1]);
    } else {
        assert_eq!(steps, Vec::<u64>::new(), "a partial checkpoint is listed");
    }
    let mut child = daemon(&local, &url, &s3::endpoint(), free_port(), &[]);
    wait_for("the next run completes it", || {
        store.is_uploaded("t", 1, &url)
    });
    assert!(sigterm(&mut child).success());
    let got = remote
        .restore("t", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &s);
}

/// Local retention while the remote is down deletes nothing: every step
/// was uploaded (its marker names the remote) and `--local-keep-last 1`
/// would leave one, but no deletion may go ahead on the markers alone
/// while the remote cannot confirm that it still holds the checkpoint.
///
/// Planted bug this catches: local retention treating a remote it cannot
/// reach as holding the checkpoint (`durable_now(..).unwrap_or(true)` in
/// `apply_local_retention`); steps 1 to 3 were then deleted.
#[test]
fn local_retention_while_the_remote_is_down_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    let url = format!("s3://{}/ckpt", s3::new_bucket("down"));
    let remote = RemoteStore::open(&url, &s3::options(), RemoteOptions::default()).unwrap();
    for step in 1..=4 {
        let s = state_for_step(step, 3, 100_000);
        store.save("k", step, &s.view()).unwrap().wait().unwrap();
        store.upload_to(&remote, "k", step).unwrap();
        assert!(store.is_uploaded("k", step, &url));
    }
    // The same remote URL, but nothing listens at the endpoint now.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let port = free_port();
    let mut child = daemon(
        &local,
        &url,
        &dead,
        port,
        &["--local-keep-last", "1", "--remote-keep-last", "1"],
    );
    // A retention pass ran and failed to reach the remote.
    wait_for("a failed retention pass", || {
        get(port, "/metrics").is_some_and(|(_, b)| {
            b.lines()
                .find_map(|l| l.strip_prefix("cairn_errors_total "))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n >= 1)
        })
    });
    assert!(sigterm(&mut child).success());
    assert_eq!(store.steps("k").unwrap(), vec![1, 2, 3, 4]);
    for step in 1..=4 {
        let got = store
            .restore("k", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &state_for_step(step, 3, 100_000));
    }
}

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .unwrap()
}

/// An export of a checkpoint with a corrupt chunk fails (exit 1, naming
/// the chunk) and leaves no output file, temporary or final.
///
/// Planted bug this catches: the export creating its output file before
/// reading the checkpoint.
#[test]
fn export_of_a_corrupt_checkpoint_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    let s = state_for_step(5, 4, 400_000);
    store.save("e", 1, &s.view()).unwrap().wait().unwrap();
    let (id, _) = store.manifest("e", 1).unwrap().distinct_chunks()[1];
    let path = store.chunk_path(&id);
    let mut b = std::fs::read(&path).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x40;
    std::fs::write(&path, b).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.safetensors");
    let o = cairn(&[
        "export",
        local.to_str().unwrap(),
        "--run",
        "e",
        "--step",
        "1",
        "--format",
        "safetensors",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&id.to_hex()), "does not name the chunk: {err}");
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "export left {left:?}");
}
