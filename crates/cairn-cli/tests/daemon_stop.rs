//! The flush daemon as operators meet it: the real `cairn daemon` binary
//! against the loopback S3-compatible server, stopped with SIGTERM while an
//! upload goes through a slow or unresponsive network path; its remote
//! error counter on a healthy server; a config file that does not parse;
//! and a local store that disappears under it.

#[path = "../../../tests/common/mod.rs"]
mod common;
mod daemon_proc;

use cairn::{RemoteOptions, RemoteStore};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use daemon_proc::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

/// About 24 MiB in 256 KiB chunks: long enough to upload through the slow
/// path below that a stop always finds it in flight.
fn big_state(step: u64) -> OwnedState {
    state_for_step(step, 48, 1 << 20)
}

/// A TCP relay in front of the S3 server that slows the request direction
/// down (`delay` before forwarding each read) and can stop forwarding
/// altogether (`hang`): connections stay open, nothing more is answered,
/// as with a remote that went unreachable mid-upload.
struct SlowPath {
    addr: String,
    hang: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
}

fn slow_path(upstream: &str, delay: Duration) -> SlowPath {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hang = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::new(AtomicU64::new(0));
    let upstream = upstream.trim_start_matches("http://").to_string();
    let (h, f) = (hang.clone(), forwarded.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream, slow: bool| {
                let (h, f) = (h.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if slow {
                            std::thread::sleep(delay);
                        }
                        while h.load(Ordering::Relaxed) {
                            // Hold the connection open; answer nothing.
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if slow {
                            f.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                true,
            );
            pipe(server, client, false);
        }
    });
    SlowPath {
        addr,
        hang,
        forwarded,
    }
}

fn daemon_args(local: &Path, bucket: &str, endpoint: &str, port: u16) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "daemon".into(),
        local.display().to_string(),
        "--remote".into(),
        format!("s3://{bucket}/ckpt"),
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
    args.extend(["--poll-interval", "50ms", "--gc-interval", "0s", "--listen"].map(String::from));
    args.push(format!("127.0.0.1:{port}"));
    args
}

fn remote_for(bucket: &str) -> RemoteStore {
    RemoteStore::open(
        &format!("s3://{bucket}/ckpt"),
        &s3::options(),
        RemoteOptions::default(),
    )
    .unwrap()
}

/// Start a daemon on a store holding one big checkpoint through a slow
/// path, stop it with SIGTERM mid-upload (`hang`: the path stops answering
/// at that moment), and check the stop: prompt, clean, nothing committed;
/// then a daemon on a direct path completes the upload.
fn stop_mid_upload(tag: &str, hang: bool) {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("local");
    let store = Store::open(&local_dir, opts()).unwrap();
    store
        .save("d", 0, &big_state(0).view())
        .unwrap()
        .wait()
        .unwrap();
    drop(store);
    let bucket = s3::new_bucket(tag);
    let remote = remote_for(&bucket);
    let path = slow_path(&s3::endpoint(), Duration::from_millis(150));
    let log = dir.path().join("daemon.log");
    let port = free_port();
    let mut child = spawn(
        &daemon_args(&local_dir, &bucket, &format!("http://{}", path.addr), port),
        &log,
    );
    // The upload is under way: chunk bodies are going through.
    wait_for("upload in flight", &log, || {
        (path.forwarded.load(Ordering::Relaxed) > 2 << 20).then_some(())
    });
    if hang {
        path.hang.store(true, Ordering::Relaxed);
    }
    let (st, took) = sigterm_logged(&mut child, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("stopped in {took:?} with {st}");
    assert!(!text.contains("panicked"), "the stop panicked:\n{text}");
    assert!(st.success(), "exit status {st}; log:\n{text}");
    assert!(text.contains("cairn daemon stopping"), "{text}");
    // Abandoned before its remote commit: the step is not listed.
    let steps = remote.block_on(remote.steps("d")).unwrap().unwrap();
    assert!(steps.is_empty(), "committed despite the stop: {steps:?}");
    assert!(
        !local_dir.join("runs/d").read_dir().unwrap().any(|e| e
            .unwrap()
            .path()
            .join("remote.json")
            .exists()),
        "an upload marker was written"
    );

    // A later daemon, on a direct path, completes it.
    let log2 = dir.path().join("daemon2.log");
    let port2 = free_port();
    let mut child2 = spawn(
        &daemon_args(&local_dir, &bucket, &s3::endpoint(), port2),
        &log2,
    );
    wait_for("step 0 remote after restart", &log2, || {
        let r = remote.block_on(remote.steps("d")).unwrap().unwrap();
        (r == vec![0]).then_some(())
    });
    let got = remote
        .restore("d", StepSel::Step(0), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &big_state(0));
    let (st2, _) = sigterm_logged(&mut child2, &log2);
    assert!(st2.success());
}

#[test]
fn sigterm_during_a_slow_upload_stops_promptly_and_abandons_it() {
    stop_mid_upload("stop-slow", false);
}

#[test]
fn sigterm_while_the_remote_stopped_answering_stops_promptly() {
    stop_mid_upload("stop-hang", true);
}

#[test]
fn not_found_probes_are_not_counted_as_remote_errors() {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("local");
    let store = Store::open(&local_dir, opts()).unwrap();
    store
        .save("d", 0, &state_for_step(0, 8, 400_000).view())
        .unwrap()
        .wait()
        .unwrap();
    let bucket = s3::new_bucket("errors");
    let remote = remote_for(&bucket);
    let port = free_port();
    let log = dir.path().join("daemon.log");
    let mut child = spawn(
        &daemon_args(&local_dir, &bucket, &s3::endpoint(), port),
        &log,
    );
    let s = wait_for("step 0 uploaded", &log, || {
        let s = status(port)?;
        (s["checkpoints_uploaded"] == 1 && s["cycles"].as_u64()? >= 2).then_some(s)
    });
    assert_eq!(
        remote.block_on(remote.steps("d")).unwrap().unwrap(),
        vec![0]
    );
    // Every chunk was probed first and found absent: answers, not errors.
    assert!(s["remote_metrics"]["chunks_uploaded"].as_u64().unwrap() > 0);
    assert_eq!(s["remote_metrics"]["errors"], 0, "{s:#}");
    let (_, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(metric(&m, "cairn_remote_errors_total"), Some(0), "{m}");
    assert_eq!(metric(&m, "cairn_errors_total"), Some(0), "{m}");
    let (st, _) = sigterm_logged(&mut child, &log);
    assert!(st.success());
}

#[test]
fn a_config_that_does_not_parse_is_located_without_echoing_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c4.toml");
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    std::fs::write(
        &cfg,
        format!(
            "local = \"/tmp/nowhere\"\nremote = \"s3://b/p\"\n\n[remote_options]\n\
             access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"{secret}\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["daemon", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("c4.toml"), "{err}");
    assert!(err.contains("line 6"), "{err}");
    assert!(err.contains("column"), "{err}");
    assert!(!err.contains("wJalr"), "the secret was echoed: {err}");
    assert!(!err.contains("AKIAEXAMPLE"), "{err}");
}

#[test]
fn a_local_store_that_disappears_is_an_error_and_turns_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("l10");
    let store = Store::open(&local_dir, opts()).unwrap();
    store
        .save("d", 0, &state_for_step(0, 4, 100_000).view())
        .unwrap()
        .wait()
        .unwrap();
    drop(store);
    let bucket = s3::new_bucket("vanish");
    let port = free_port();
    let log = dir.path().join("daemon.log");
    let mut args = daemon_args(&local_dir, &bucket, &s3::endpoint(), port);
    args.extend(["--unhealthy-after", "1s"].map(String::from));
    let mut child = spawn(&args, &log);
    wait_for("step 0 uploaded", &log, || {
        let s = status(port)?;
        (s["checkpoints_uploaded"] == 1 && s["queue_depth"] == 0).then_some(())
    });
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);

    std::fs::remove_dir_all(&local_dir).unwrap();
    let s = wait_for("an error naming the store", &log, || {
        let s = status(port)?;
        (s["errors"].as_u64()? > 0).then_some(s)
    });
    let last = s["last_error"].as_str().unwrap();
    assert!(last.contains(&*local_dir.to_string_lossy()), "{s:#}");
    let (_, body) = wait_for("/healthz 503", &log, || {
        let (code, body) = http_get(port, "/healthz")?;
        (code == 503).then_some((code, body))
    });
    assert!(body.contains(&*local_dir.to_string_lossy()), "{body}");
    let (_, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(metric(&m, "cairn_healthy"), Some(0), "{m}");
    assert!(metric(&m, "cairn_errors_total").unwrap() > 0, "{m}");
    let (st, _) = sigterm_logged(&mut child, &log);
    assert!(st.success());
}
