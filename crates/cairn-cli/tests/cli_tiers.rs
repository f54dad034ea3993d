//! End-to-end tests of the operator commands (ls, inspect, restore,
//! export, diff, gc, verify) on local directories and S3 URLs.

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::RemoteOptions;
use cairn::{Store, StoreOptions};
use common::*;
use std::process::{Command, Output};
use std::time::Duration;

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let o = cairn(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn s3_flags() -> Vec<String> {
    s3::options()
        .into_iter()
        .flat_map(|(k, v)| ["--remote-option".to_string(), format!("{k}={v}")])
        .collect()
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

#[test]
fn ls_inspect_diff_gc_verify_on_a_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = Store::open(&root, opts()).unwrap();
    let a = state_for_step(1, 10, 300_000);
    let mut b = a.clone();
    b.tensors[2].data = Rng(5).bytes(b.tensors[2].data.len());
    b.tensors.remove(7);
    b.tensors.push(OwnedTensor {
        name: "new.weight".into(),
        dtype: cairn::DType::F16,
        shape: vec![8],
        data: vec![1; 16],
    });
    store.save("r", 10, &a.view()).unwrap().wait().unwrap();
    store.save("r", 20, &b.view()).unwrap().wait().unwrap();
    store
        .save("other", 1, &state_for_step(9, 2, 100).view())
        .unwrap()
        .wait()
        .unwrap();
    let s = root.to_str().unwrap();

    let ls = ok_json(&["ls", s, "--json"]);
    let rows = ls.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for key in [
        "run",
        "step",
        "created",
        "tensors",
        "logical_bytes",
        "stored_bytes",
        "new_stored_bytes",
        "dedup_ratio",
        "compression_ratio",
        "tiers",
    ] {
        assert!(!rows[0][key].is_null(), "ls row lacks {key}: {}", rows[0]);
    }
    let r20 = rows
        .iter()
        .find(|r| r["run"] == "r" && r["step"] == 20)
        .unwrap();
    assert!(r20["new_stored_bytes"].as_u64().unwrap() < r20["stored_bytes"].as_u64().unwrap());
    assert_eq!(r20["tiers"][0], "local");
    let only = ok_json(&["ls", s, "--run", "other", "--json"]);
    assert_eq!(only.as_array().unwrap().len(), 1);

    let ins = ok_json(&["inspect", s, "--run", "r", "--step", "latest", "--json"]);
    assert_eq!(ins["step"], 20);
    assert_eq!(ins["tensors"].as_array().unwrap().len(), b.tensors.len());
    assert_eq!(ins["blobs"][0]["name"], "rng");
    assert_eq!(ins["metadata"]["step"], 1);
    let some = ok_json(&[
        "inspect",
        s,
        "--run",
        "r",
        "--step",
        "10",
        "--tensor",
        "layers.?.weight",
        "--json",
    ]);
    assert_eq!(some["tensors"].as_array().unwrap().len(), 10);
    let t0 = &some["tensors"][0];
    assert_eq!(t0["dtype"], "F32");
    assert!(t0["bytes"].as_u64().unwrap() > 0 && t0["chunks"].as_u64().unwrap() >= 1);
    let human = cairn(&["inspect", s, "--run", "r", "--step", "10"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("layers.0.weight"));

    let d = ok_json(&["diff", s, "--run", "r", "10", "20", "--json"]);
    assert_eq!(d["added"], serde_json::json!(["new.weight"]));
    assert_eq!(d["removed"], serde_json::json!(["layers.7.weight"]));
    let changed: Vec<&str> = d["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(changed, vec!["layers.2.weight"]);
    assert_eq!(d["unchanged"], 8);
    // A step may be named `latest`, as everywhere else.
    let latest = ok_json(&["diff", s, "--run", "r", "10", "latest", "--json"]);
    assert_eq!(latest, d, "step 20 is the latest");

    // Garbage: delete step 10; its unique chunks become reclaimable.
    store.delete("r", 10).unwrap();
    drop(store);
    let dry = ok_json(&["gc", s, "--dry-run", "--grace", "0s", "--json"]);
    assert!(dry["chunks_deleted"].as_u64().unwrap() > 0);
    assert_eq!(dry["dry_run"], true);
    let real = ok_json(&["gc", s, "--grace", "0s", "--json"]);
    assert_eq!(real["chunks_deleted"], dry["chunks_deleted"]);
    let again = ok_json(&["gc", s, "--grace", "0s", "--json"]);
    assert_eq!(again["chunks_deleted"], 0);
    let v = ok_json(&["verify", s, "--json"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);

    // Errors: unknown step and run, bad step syntax, missing --run.
    let o = cairn(&["inspect", s, "--run", "r", "--step", "999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
    let o = cairn(&["inspect", s, "--run", "ghost", "--step", "latest"]);
    assert_eq!(o.status.code(), Some(1));
    let o = cairn(&["inspect", s, "--run", "r", "--step", "soon"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cairn(&["inspect", s, "--step", "1"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cairn(&["diff", s, "--run", "r", "10", "20"]);
    assert_eq!(o.status.code(), Some(1), "step 10 was deleted");
    let o = cairn(&["completions", "bash"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("cairn"));
}

#[test]
fn restore_between_tiers_and_verify_urls() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("local");
    let mut store = Store::open(&root, opts()).unwrap();
    let remote = s3::remote("cli", RemoteOptions::default());
    store.attach_remote(remote.clone());
    let st = state_for_step(3, 12, 300_000);
    store.save("job", 7, &st.view()).unwrap().wait().unwrap();
    store.upload("job", 7).unwrap();
    drop(store);
    let url = remote.url().to_string();
    let flags = s3_flags();
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|s| s.to_string())
            .chain(flags.iter().cloned())
            .collect()
    };
    let run = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(&args)
            .output()
            .unwrap()
    };

    let o = run(with(&["ls", &url, "--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ls[0]["step"], 7);
    assert_eq!(ls[0]["tiers"][0], "remote");
    let local_ls = ok_json(&["ls", root.to_str().unwrap(), "--json"]);
    assert!(local_ls[0]["tiers"][1]
        .as_str()
        .unwrap()
        .starts_with("remote"));

    // Object storage -> a fresh local directory, then verify it.
    let target = dir.path().join("restored");
    let o = run(with(&[
        "restore",
        &url,
        "--run",
        "job",
        "--step",
        "latest",
        "--to",
        target.to_str().unwrap(),
        "--json",
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["chunks_copied"], rep["chunks"]);
    let v = ok_json(&["verify", target.to_str().unwrap(), "--json"]);
    assert!(v["problems"].as_array().unwrap().is_empty());
    let restored = Store::open_read_only(&target, opts()).unwrap();
    let got = restored
        .restore("job", cairn::StepSel::Step(7), &cairn::TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &st);
    // Again: nothing to copy.
    let o = run(with(&[
        "restore",
        &url,
        "--run",
        "job",
        "--step",
        "7",
        "--to",
        target.to_str().unwrap(),
        "--json",
    ]));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["chunks_copied"], 0);
    assert_eq!(rep["already_present"], true);

    // A partial restore of some tensors into another directory.
    let part = dir.path().join("part");
    let o = run(with(&[
        "restore",
        &url,
        "--run",
        "job",
        "--step",
        "7",
        "--to",
        part.to_str().unwrap(),
        "--tensor",
        "layers.1*",
        "--json",
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ins = ok_json(&[
        "inspect",
        part.to_str().unwrap(),
        "--run",
        "job",
        "--step",
        "7",
        "--json",
    ]);
    let names: Vec<&str> = ins["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["layers.1.weight", "layers.10.weight", "layers.11.weight"]
    );

    // verify on the URL, then with a corrupted remote chunk.
    let o = run(with(&["verify", &url]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let m = remote.block_on(remote.manifest("job", 7)).unwrap().unwrap();
    let id = m.tensors[0].chunks[0].id;
    let mut obj = remote
        .block_on(remote.fetch_chunk_object(&id, m.tensors[0].chunks[0].chunk_len))
        .unwrap()
        .unwrap()
        .to_vec();
    let n = obj.len();
    obj[n - 1] ^= 1;
    remote
        .block_on(remote.put_object(&remote.chunk_path(&id), obj.into()))
        .unwrap()
        .unwrap();
    let o = run(with(&["verify", &url, "--json"]));
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["problems"][0]["chunk"], id.to_hex());
    assert_eq!(v["problems"][0]["tensors"][0], "layers.0.weight");
    let bad_target = dir.path().join("bad");
    let o = run(with(&[
        "restore",
        &url,
        "--run",
        "job",
        "--step",
        "7",
        "--to",
        bad_target.to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&id.to_hex()));
    let o = run(with(&["ls", "s3://", "--json"]));
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn sigkilled_restore_resumes_without_recopying() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("local");
    let mut store = Store::open(&root, opts()).unwrap();
    let remote = s3::remote("resume", RemoteOptions::default());
    store.attach_remote(remote.clone());
    let st = state_for_step(11, 48, 2_000_000);
    store.save("big", 1, &st.view()).unwrap().wait().unwrap();
    store.upload("big", 1).unwrap();
    drop(store);
    let url = remote.url().to_string();
    let mut args: Vec<String> = ["restore", &url, "--run", "big", "--step", "1", "--to"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(s3_flags());
    let mut rng = Rng(3);
    let mut interrupted = None;
    for attempt in 0..12 {
        let target = dir.path().join(format!("t{attempt}"));
        let mut a = args.clone();
        a.insert(7, target.display().to_string());
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(&a)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 + rng.below(200)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let manifest = target.join("runs/big/00000000000000000001/manifest.cairn");
        let copied = if target.join("chunks").exists() {
            chunk_files(&target).len()
        } else {
            0
        };
        if !manifest.exists() && copied > 0 {
            interrupted = Some((a, target, copied));
            break;
        }
    }
    let (a, target, copied_before) = interrupted.expect("no kill landed mid-restore in 12 tries");
    // Nothing partial is visible.
    let o = cairn(&["ls", target.to_str().unwrap(), "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let mut a2 = a.clone();
    a2.push("--json".into());
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(&a2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        rep["chunks_skipped"].as_u64().unwrap() as usize,
        copied_before
    );
    assert_eq!(
        rep["chunks_copied"].as_u64().unwrap() + rep["chunks_skipped"].as_u64().unwrap(),
        rep["chunks"].as_u64().unwrap()
    );
    let v = ok_json(&["verify", target.to_str().unwrap(), "--json"]);
    assert!(v["problems"].as_array().unwrap().is_empty());
    let got = Store::open_read_only(&target, opts())
        .unwrap()
        .restore("big", cairn::StepSel::Step(1), &cairn::TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &st);
}
