//! The flush daemon isolates failures: the real `cairn daemon` binary
//! against the loopback S3-compatible server, with one checkpoint it cannot
//! upload. Also: a missing local store at start, and `import` of a file
//! that another process truncates.

#[path = "../../../tests/common/mod.rs"]
mod common;
mod daemon_proc;

use cairn::{RemoteOptions, RemoteStore};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use daemon_proc::*;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

fn state(step: u64) -> OwnedState {
    state_for_step(step, 8, 400_000)
}

/// A chunk file of step `step` that no other step references.
fn chunk_only_in(store: &Store, root: &Path, step: u64, others: &[u64]) -> PathBuf {
    let mut shared = HashSet::new();
    for &o in others {
        for (id, _) in store.manifest("d", o).unwrap().distinct_chunks() {
            shared.insert(id.to_hex());
        }
    }
    let own = store.manifest("d", step).unwrap().distinct_chunks();
    let (id, _) = own
        .iter()
        .find(|(id, _)| !shared.contains(&id.to_hex()))
        .expect("step has a chunk of its own");
    let hex = id.to_hex();
    chunk_files(root)
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str() == Some(hex.as_str()))
        .expect("chunk file")
}

#[test]
fn an_unuploadable_checkpoint_fails_alone_and_heals_when_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("local");
    let store = Store::open(&local_dir, opts()).unwrap();
    for step in 1..=3 {
        store
            .save("d", step, &state(step).view())
            .unwrap()
            .wait()
            .unwrap();
    }
    // Corrupt a chunk only step 1 uses: step 1 cannot be uploaded.
    let bad = chunk_only_in(&store, &local_dir, 1, &[2, 3]);
    let original = std::fs::read(&bad).unwrap();
    let mut corrupt = original.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    corrupt[mid + 1] ^= 0x55;
    std::fs::write(&bad, &corrupt).unwrap();

    let bucket = s3::new_bucket("isolate");
    let remote = RemoteStore::open(
        &format!("s3://{bucket}/ckpt"),
        &s3::options(),
        RemoteOptions::default(),
    )
    .unwrap();
    let port = free_port();
    let mut args: Vec<String> = vec![
        "daemon".into(),
        local_dir.display().to_string(),
        "--remote".into(),
        format!("s3://{bucket}/ckpt"),
    ];
    for (k, v) in s3::options() {
        args.push("--remote-option".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(
        [
            "--poll-interval",
            "50ms",
            "--gc-interval",
            "0s",
            "--unhealthy-after",
            "2s",
            "--max-retry-backoff",
            "200ms",
            "--local-keep-last",
            "1",
            "--remote-keep-last",
            "3",
            "--listen",
        ]
        .map(String::from),
    );
    args.push(format!("127.0.0.1:{port}"));
    let log = dir.path().join("daemon.log");
    let mut child = spawn(&args, &log);
    let t0 = Instant::now();

    // Steps 2 and 3 reach the remote although step 1, older, fails.
    wait_for("steps 2 and 3 remote", &log, || {
        let r = remote.block_on(remote.steps("d")).unwrap().unwrap();
        (r == vec![2, 3]).then_some(())
    });
    eprintln!("steps 2 and 3 remote after {:?}", t0.elapsed());
    for step in [2, 3] {
        let got = remote
            .restore("d", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &state(step));
    }

    // /status names it, with the reason and a growing attempt count.
    let failing = wait_for("step 1 listed as failing twice", &log, || {
        let s = status(port)?;
        let f = s["failing"].as_array()?.first()?.clone();
        (f["attempts"].as_u64()? >= 2).then_some((s, f))
    });
    let (st, f) = failing;
    assert_eq!(st["failing"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(f["run"], "d");
    assert_eq!(f["step"], 1);
    assert_eq!(f["kind"], "Data", "{f:#}");
    let reason = f["reason"].as_str().unwrap();
    assert!(reason.contains("corrupt chunk"), "{reason}");
    assert!(
        reason.contains(bad.file_name().unwrap().to_str().unwrap()),
        "{reason}"
    );
    assert!(st["upload_failures"].as_u64().unwrap() >= 2);

    // /metrics counts it.
    let (code, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(metric(&m, "cairn_checkpoints_failing"), Some(1), "{m}");
    assert!(
        metric(&m, "cairn_upload_failures_total").unwrap() >= 2,
        "{m}"
    );

    // Retention still runs: step 2 is durable remotely and older than the
    // newest durable step, so it goes; step 1, not uploaded, stays.
    wait_for("local retention", &log, || {
        (store.steps("d").unwrap() == vec![1, 3]).then_some(())
    });

    // Once the configured time passes with no upload and work pending,
    // /healthz answers 503 with the reason.
    let body = wait_for("/healthz 503", &log, || {
        let (code, body) = http_get(port, "/healthz")?;
        (code == 503).then_some(body)
    });
    eprintln!("/healthz 503 after {:?}: {body}", t0.elapsed());
    assert!(body.contains("run d step 1"), "{body}");
    assert!(body.contains("corrupt chunk"), "{body}");
    assert!(body.contains("pending"), "{body}");
    let s = status(port).unwrap();
    assert_eq!(s["healthy"], false);
    assert!(s["unhealthy_reason"]
        .as_str()
        .unwrap()
        .contains("run d step 1"));
    let (_, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(metric(&m, "cairn_healthy"), Some(0), "{m}");

    // Repair the chunk: the next attempt uploads step 1 and health returns.
    std::fs::write(&bad, &original).unwrap();
    let repaired = Instant::now();
    wait_for("/healthz 200 after repair", &log, || {
        let (code, body) = http_get(port, "/healthz")?;
        (code == 200 && body == "ok\n").then_some(())
    });
    wait_for("step 1 remote", &log, || {
        let r = remote.block_on(remote.steps("d")).unwrap().unwrap();
        r.contains(&1).then_some(())
    });
    eprintln!(
        "healthy and step 1 remote {:?} after the repair",
        repaired.elapsed()
    );
    let got = remote
        .restore("d", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &state(1));
    let s = wait_for("failing list empty", &log, || {
        let s = status(port)?;
        (s["failing"].as_array()?.is_empty() && s["queue_depth"] == 0).then_some(s)
    });
    assert_eq!(s["healthy"], true);
    eprintln!("failed attempts in all: {}", s["upload_failures"]);
    let (_, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(metric(&m, "cairn_checkpoints_failing"), Some(0), "{m}");
    assert_eq!(metric(&m, "cairn_healthy"), Some(1), "{m}");
    // And retention, now free to, removes step 1 locally.
    wait_for("local retention of step 1", &log, || {
        (store.steps("d").unwrap() == vec![3]).then_some(())
    });
    assert!(sigterm_logged(&mut child, &log).0.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("checkpoint upload failed"), "{text}");
}

#[test]
fn a_missing_local_store_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-store");
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "daemon",
            missing.to_str().unwrap(),
            "--remote",
            &format!("file://{}", dir.path().join("remote").display()),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("local store"), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("not found"), "{err}");
    // Nothing was created, and nothing listens.
    assert!(!missing.exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // An empty directory is no store either.
    std::fs::create_dir(&missing).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "daemon",
            missing.to_str().unwrap(),
            "--remote",
            &format!("file://{}", dir.path().join("remote").display()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("local store"), "{err}");
}

/// Write a safetensors file with one U8 tensor of `n` bytes.
fn write_safetensors(path: &Path, n: usize) {
    let header = format!("{{\"w\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[0,{n}]}}}}");
    let mut pad = header.into_bytes();
    while pad.len() % 8 != 0 {
        pad.push(b' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(pad.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&pad).unwrap();
    let mut r = Rng(5);
    let mut left = n;
    while left > 0 {
        let k = left.min(1 << 20);
        f.write_all(&r.bytes(k)[..k]).unwrap();
        left -= k;
    }
}

#[test]
fn import_of_a_file_truncated_meanwhile_fails_cleanly_instead_of_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.safetensors");
    let store = dir.path().join("store");
    let n = 96 << 20;
    let mut outcomes = Vec::new();
    for round in 0..6u64 {
        write_safetensors(&input, n);
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args([
                "import",
                store.to_str().unwrap(),
                "--run",
                "imp",
                "--step",
                &round.to_string(),
                input.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Another process cuts the file short while the import runs.
        std::thread::sleep(Duration::from_millis(20 * round));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&input)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            None,
            "import was killed by a signal (round {round}): {err}"
        );
        // Either it read the whole file first, or it read the short file
        // and refused it with a clear error.
        match out.status.code() {
            Some(0) => outcomes.push("imported"),
            Some(1) => {
                assert!(err.contains("model.safetensors"), "{err}");
                outcomes.push("refused");
            }
            other => panic!("exit {other:?}: {err}"),
        }
    }
    eprintln!("import outcomes: {outcomes:?}");
    // Whatever was committed is whole.
    if let Ok(s) = Store::open_read_only(&store, opts()) {
        assert!(s.verify(None, None).unwrap().ok());
    }
}
