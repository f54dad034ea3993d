//! "Uploaded once", counted at the server: the `cairn daemon` binary
//! uploads through a counting HTTP proxy on loopback in front of the S3
//! server and is SIGKILLed at random moments while a trainer keeps saving.
//! The proxy parses every request and response on each connection and
//! counts, per object key, the PUTs the server answered with success. The
//! protocol permits re-sending a chunk only if no earlier PUT of it
//! succeeded (the next run HEADs it first), and a manifest only as a
//! create-only PUT the server refuses; so every chunk key has exactly one
//! successful PUT and every manifest key exactly one.
//!
//! The same proxy counts GETs: `cairn export` from S3 restores a shard in
//! batches and must read the step's manifest once, not once a batch, and
//! never the step's blobs, which a safetensors file does not hold.
//!
//! Planted bug this catches: the HEAD-before-upload dedup check skipped
//! in `copy_checkpoint` (every chunk treated as missing): a restarted
//! daemon puts chunks the remote already holds, and a chunk key counts two
//! successful PUTs.

#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../../../tests/common/proxy.rs"]
mod proxy;

use cairn::{RemoteOptions, RemoteStore, StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 128 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

fn state(step: u64) -> OwnedState {
    // Half the tensors change per step: later steps reuse earlier chunks.
    let mut s = state_for_step(step, 8, 300_000);
    let base = state_for_step(0, 8, 300_000);
    for i in 0..4 {
        s.tensors[i] = base.tensors[i].clone();
    }
    s
}

fn spawn_daemon(local: &Path, url: &str, proxy: &str, log: &Path) -> Child {
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
        "127.0.0.1:0".into(),
    ];
    for (k, v) in s3::options() {
        let v = if k == "endpoint" {
            format!("http://{proxy}")
        } else {
            v
        };
        args.push("--remote-option".into());
        args.push(format!("{k}={v}"));
    }
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(&args)
        .env("CAIRN_LOG", "cairn=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn cairn daemon")
}

#[test]
fn every_chunk_is_put_once_across_daemon_kills() {
    let running = proxy::start(&s3::endpoint());
    let (counts, proxy) = (&running.counts, &running.addr);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    let bucket = s3::new_bucket("count");
    let url = format!("s3://{bucket}/ckpt");
    let remote = RemoteStore::open(&url, &s3::options(), RemoteOptions::default()).unwrap();
    let mut next = 0u64;
    let mut rng = Rng(7);
    let kills = 8;
    for round in 0..=kills {
        let log = dir.path().join(format!("daemon-{round}.log"));
        let mut child = spawn_daemon(&local, &url, proxy, &log);
        store
            .save("u", next, &state(next).view())
            .unwrap()
            .wait()
            .unwrap();
        next += 1;
        if round < kills {
            std::thread::sleep(Duration::from_millis(50 + rng.below(500)));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            continue;
        }
        // The last run drains everything.
        let t = Instant::now();
        let local_steps = store.steps("u").unwrap();
        while !local_steps.iter().all(|&s| store.is_uploaded("u", s, &url)) {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the daemon did not drain"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let steps = remote.block_on(remote.steps("u")).unwrap().unwrap();
    assert_eq!(steps, (0..next).collect::<Vec<_>>());
    let mut referenced = std::collections::BTreeSet::new();
    for &s in &steps {
        let got = remote
            .restore("u", StepSel::Step(s), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &state(s));
        for (id, _) in store.manifest("u", s).unwrap().distinct_chunks() {
            referenced.insert(id.to_hex());
        }
    }
    let c = counts.lock().unwrap();
    assert!(c.requests > 0);
    let mut chunk_puts = 0;
    for id in &referenced {
        let key = format!("/{bucket}/ckpt/chunks/{}/{id}", &id[..2]);
        let n = c.ok_puts.get(&key).copied().unwrap_or(0);
        assert_eq!(n, 1, "chunk {id}: {n} successful PUTs at the server");
        chunk_puts += n;
    }
    for &s in &steps {
        let key = format!("/{bucket}/ckpt/runs/u/{s:020}/manifest.cairn");
        let n = c.ok_puts.get(&key).copied().unwrap_or(0);
        assert_eq!(n, 1, "manifest of step {s}: {n} successful PUTs");
    }
    for (k, n) in &c.ok_puts {
        assert!(
            *n == 1,
            "{k}: {n} successful PUTs (only one is ever permitted)"
        );
    }
    let refused: u64 = c.refused_puts.values().sum();
    eprintln!(
        "upload count: {} requests, {chunk_puts} chunk PUTs for {} chunks, {refused} refused PUTs ({:?})",
        c.requests,
        referenced.len(),
        c.refused_puts
    );
}

#[test]
fn an_export_from_s3_reads_the_manifest_once_and_no_blob() {
    let running = proxy::start(&s3::endpoint());
    let (counts, proxy) = (&running.counts, &running.addr);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(
        &local,
        StoreOptions {
            chunk_size: 1 << 20,
            ..opts()
        },
    )
    .unwrap();
    // Three tensors of 17 MiB: three batches of the export's 32 MiB.
    let mut rng = Rng(11);
    let tensors: Vec<Vec<u8>> = (0..3).map(|_| rng.bytes(17 << 20)).collect();
    let blob = rng.bytes(2 << 20);
    let mut s = cairn::SaveState::new();
    for (i, d) in tensors.iter().enumerate() {
        s = s.tensor(format!("w.{i}"), cairn::DType::U8, &[d.len() as u64], d);
    }
    store
        .save("r", 3, &s.blob("rng", &blob))
        .unwrap()
        .wait()
        .unwrap();
    let bucket = s3::new_bucket("exportgets");
    let url = format!("s3://{bucket}/ckpt");
    let mut opts_args = Vec::new();
    for (k, v) in s3::options() {
        let v = if k == "endpoint" {
            format!("http://{proxy}")
        } else {
            v
        };
        opts_args.push("--remote-option".to_string());
        opts_args.push(format!("{k}={v}"));
    }
    let cairn = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .args(&opts_args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let l = local.to_str().unwrap();
    cairn(&["restore", l, "--run", "r", "--step", "3", "--to", &url]);
    counts.lock().unwrap().ok_gets.clear();
    let out = dir.path().join("m.safetensors");
    let o = out.to_str().unwrap();
    cairn(&["export", &url, "--run", "r", "--step", "3", "--out", o]);
    // The file holds the tensors' bytes, in order, after its header.
    let file = std::fs::read(&out).unwrap();
    let body: Vec<u8> = tensors.concat();
    assert_eq!(&file[file.len() - body.len()..], &body[..]);
    let c = counts.lock().unwrap();
    let manifest = format!("/{bucket}/ckpt/runs/r/{:020}/manifest.cairn", 3);
    let n = c.ok_gets.get(&manifest).copied().unwrap_or(0);
    assert_eq!(n, 1, "manifest GETs: {:?}", c.ok_gets);
    let m = store.manifest("r", 3).unwrap();
    for id in m.blobs[0].chunks.iter().map(|c| c.id.to_hex()) {
        let key = format!("/{bucket}/ckpt/chunks/{}/{id}", &id[..2]);
        let n = c.ok_gets.get(&key).copied().unwrap_or(0);
        assert_eq!(n, 0, "blob chunk {id} read {n} times by an export");
    }
}
