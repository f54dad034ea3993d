//! The object-storage tier against a real S3-compatible server on loopback
//! (started by scripts/test) and against file:// URLs.

mod common;

use cairn::testing::{FaultConfig, FaultyObjectStore};
use cairn::{ErrorKind, StepSel, Store, StoreOptions, TensorFilter};
use cairn::{RemoteOptions, RemoteStore, RetryPolicy};
use common::*;
use std::sync::Arc;
use std::time::Duration;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

fn file_remote(dir: &std::path::Path) -> RemoteStore {
    let url = format!("file://{}", dir.join("bucket").display());
    RemoteStore::open(&url, &[], RemoteOptions::default()).unwrap()
}

fn upload_restore_round_trip(remote: RemoteStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path().join("local"), opts()).unwrap();
    store.attach_remote(remote.clone());
    let mut s = state_for_step(1, 30, 300_000);
    store.save("r", 1, &s.view()).unwrap().wait().unwrap();
    let first = store.upload("r", 1).unwrap();
    assert!(first.chunks_uploaded > 0 && !first.already_committed);
    assert_eq!(first.chunks_uploaded, first.chunks);

    // ~10% of tensors change: about 10% of the bytes go up.
    let mut rng = Rng(8);
    for i in (0..30).step_by(10) {
        let n = s.tensors[i].data.len();
        s.tensors[i].data = rng.bytes(n);
    }
    store.save("r", 2, &s.view()).unwrap().wait().unwrap();
    let second = store.upload("r", 2).unwrap();
    let frac = second.bytes_uploaded as f64 / first.bytes_uploaded as f64;
    assert!(frac < 0.25, "second upload sent {frac} of the first");
    assert!(second.chunks_skipped > 0);

    // Uploading again exposes nothing new.
    let again = store.upload("r", 2).unwrap();
    assert!(again.already_committed);
    assert_eq!(again.chunks_uploaded, 0);
    assert!(store.is_uploaded("r", 2, remote.url()));

    assert_eq!(
        remote.block_on(remote.steps("r")).unwrap().unwrap(),
        vec![1, 2]
    );
    // Local tier wiped: restore straight from the remote.
    drop(store);
    std::fs::remove_dir_all(dir.path().join("local")).unwrap();
    let got = remote
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &s);
    assert_eq!(got.report.step, 2);
    let e = remote
        .restore("r", StepSel::Step(9), &TensorFilter::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn s3_upload_dedup_and_restore_with_local_wiped() {
    upload_restore_round_trip(s3::remote("rt", RemoteOptions::default()));
}

#[test]
fn file_url_upload_dedup_and_restore_with_local_wiped() {
    let dir = tempfile::tempdir().unwrap();
    upload_restore_round_trip(file_remote(dir.path()));
}

#[test]
fn large_chunks_go_up_in_parts() {
    let remote = s3::remote(
        "mp",
        RemoteOptions {
            multipart_threshold: 6 << 20,
            part_size: 5 << 20,
            ..RemoteOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 12 << 20,
            staging_bytes: 32 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.attach_remote(remote.clone());
    let mut r = Rng(4);
    let s = OwnedState {
        tensors: vec![OwnedTensor {
            name: "embed".into(),
            dtype: cairn::DType::BF16,
            shape: vec![6 << 20],
            data: r.bytes(12 << 20),
        }],
        ..Default::default()
    };
    store.save("mp", 1, &s.view()).unwrap().wait().unwrap();
    let rep = store.upload("mp", 1).unwrap();
    assert_eq!(rep.chunks_uploaded, 1);
    assert!(rep.bytes_uploaded > 12 << 20);
    let got = remote
        .restore("mp", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &s);
}

#[test]
fn corrupt_or_missing_local_chunks_are_repaired_from_the_remote() {
    for remote in [
        s3::remote("repair", RemoteOptions::default()),
        file_remote(tempfile::tempdir().unwrap().keep().as_path()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), opts()).unwrap();
        store.attach_remote(remote);
        let s = state_for_step(5, 12, 400_000);
        store.save("r", 5, &s.view()).unwrap().wait().unwrap();
        store.upload("r", 5).unwrap();
        let files = chunk_files(dir.path());
        // One chunk corrupted, one missing.
        let mut b = std::fs::read(&files[0]).unwrap();
        let n = b.len();
        b[n / 2] ^= 0x40;
        std::fs::write(&files[0], &b).unwrap();
        std::fs::remove_file(&files[1]).unwrap();
        assert!(!store.verify(None, None).unwrap().ok());
        let got = store
            .restore("r", StepSel::Step(5), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &s);
        assert_eq!(got.report.repaired, 2);
        // The local tier is whole again.
        assert!(store.verify(None, None).unwrap().ok());
    }
}

#[test]
fn uploads_and_restores_survive_a_faulty_remote() {
    let base = s3::remote("fault", RemoteOptions::default());
    let faulty = Arc::new(FaultyObjectStore::new(
        base.object_store().clone(),
        FaultConfig {
            fail_before: 0.2,
            fail_after: 0.1,
            max_delay: Duration::from_millis(20),
            seed: 42,
        },
    ));
    let remote = RemoteStore::new(
        faulty.clone(),
        "ckpt".into(),
        base.url(),
        RemoteOptions {
            retry: RetryPolicy {
                max_attempts: 30,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(20),
                ..RetryPolicy::default()
            },
            ..RemoteOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts()).unwrap();
    store.attach_remote(remote.clone());
    let mut states = Vec::new();
    for step in 0..4 {
        let s = state_for_step(step, 16, 300_000);
        store.save("f", step, &s.view()).unwrap().wait().unwrap();
        store.upload("f", step).unwrap();
        states.push(s);
    }
    assert!(faulty.injected() > 10, "only {} faults", faulty.injected());
    assert!(remote.metrics().snapshot().retries > 0);
    for (step, s) in states.iter().enumerate() {
        // Through the faulty store, and through a clean one.
        let got = remote
            .restore("f", StepSel::Step(step as u64), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, s);
        let got = base
            .restore("f", StepSel::Step(step as u64), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, s);
    }
}

#[test]
fn remote_manifests_are_create_only() {
    let remote = s3::remote("create", RemoteOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts()).unwrap();
    store.attach_remote(remote.clone());
    let s = state_for_step(1, 3, 1000);
    store.save("c", 1, &s.view()).unwrap().wait().unwrap();
    store.upload("c", 1).unwrap();
    let same = store.manifest_bytes("c", 1).unwrap();
    assert!(!remote
        .block_on(remote.put_manifest("c", 1, same.clone().into()))
        .unwrap()
        .unwrap());
    // A valid manifest of the same step with other content.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(dir2.path(), opts()).unwrap();
    let s2 = state_for_step(2, 3, 1000);
    store2.save("c", 1, &s2.view()).unwrap().wait().unwrap();
    let other = store2.manifest_bytes("c", 1).unwrap();
    assert_ne!(other, same);
    let e = remote
        .block_on(remote.put_manifest("c", 1, other.into()))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    // Junk, or a manifest naming another step, is refused before any put.
    let junk = cairn::format::manifest::encode_envelope(b"{}");
    let e = remote
        .block_on(remote.put_manifest("c", 9, junk.into()))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    let e = remote
        .block_on(remote.put_manifest("c", 9, store2.manifest_bytes("c", 1).unwrap().into()))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    assert_eq!(
        remote.block_on(remote.steps("c")).unwrap().unwrap(),
        vec![1]
    );
    let got = remote
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &s);
}

#[test]
fn bad_remote_urls_and_options_are_clear_errors() {
    for url in ["not a url", "ftp://x/y", "s3://"] {
        let e = RemoteStore::open(url, &[], RemoteOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{url}: {e}");
    }
    let e = RemoteStore::open(
        "s3://bucket/p",
        &[("no_such_option".into(), "1".into())],
        RemoteOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no_such_option"), "{e}");
}
