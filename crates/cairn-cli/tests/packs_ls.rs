//! `cairn ls` on a remote whose small chunks live in packs: STORED counts
//! every chunk of a checkpoint, packed or not, with its stored length,
//! so the figures match the same checkpoint uploaded without packs.

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::{RemoteOptions, RemoteStore, Store, StoreOptions};
use common::*;
use std::process::Command;

fn ls_json(url: &str) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(["ls", url, "--json"]);
    for (k, v) in s3::options() {
        cmd.arg("--remote-option").arg(format!("{k}={v}"));
    }
    let o = cmd.output().expect("run cairn ls");
    assert!(
        o.status.success(),
        "cairn ls {url}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Small chunks, zstd on the local tier.
fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        codec: cairn::CodecChoice::Zstd { level: 3 },
        ..StoreOptions::default()
    }
}

/// Upload steps 1 and 2 of one local store to a remote with `remote_opts`
/// and return its `cairn ls --json`.
fn upload_and_list(
    local: &std::path::Path,
    tag: &str,
    remote_opts: RemoteOptions,
) -> Vec<serde_json::Value> {
    let mut store = Store::open(local, opts()).unwrap();
    let url = format!("s3://{}/ckpt", s3::new_bucket(tag));
    let remote = RemoteStore::open(&url, &s3::options(), remote_opts).unwrap();
    store.attach_remote(remote);
    for step in [1, 2] {
        store.upload("job", step).unwrap();
    }
    drop(store);
    ls_json(&url).as_array().unwrap().clone()
}

#[test]
fn ls_counts_packed_chunks_in_stored_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    {
        let store = Store::open(&local, opts()).unwrap();
        let mut s = state_for_step(1, 24, 300_000);
        store.save("job", 1, &s.view()).unwrap().wait().unwrap();
        // Step 2 shares most chunks with step 1.
        let changed = state_for_step(2, 24, 300_000);
        s.tensors[0] = changed.tensors[0].clone();
        store.save("job", 2, &s.view()).unwrap().wait().unwrap();
    }
    let plain = upload_and_list(&local, "ls-plain", RemoteOptions::default());
    let packed = upload_and_list(
        &local,
        "ls-packed",
        RemoteOptions {
            pack_threshold: 1 << 20,
            pack_size: 1 << 20,
            ..RemoteOptions::default()
        },
    );
    assert_eq!(plain.len(), 2);
    assert_eq!(packed.len(), 2);
    for (p, k) in plain.iter().zip(&packed) {
        let (ps, ks) = (
            p["stored_bytes"].as_u64().unwrap(),
            k["stored_bytes"].as_u64().unwrap(),
        );
        assert!(ps > 0, "{p}");
        // Both remotes hold each chunk as the same wire object.
        assert_eq!(ks, ps, "STORED of a packed checkpoint: {k} against {p}");
        assert_eq!(
            k["new_stored_bytes"], p["new_stored_bytes"],
            "NEW of a packed checkpoint: {k} against {p}"
        );
        assert_eq!(k["compression_ratio"], p["compression_ratio"]);
    }
}
