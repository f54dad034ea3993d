//! Retention and garbage collection on both tiers, with saves and uploads
//! running at the same time.

mod common;

use cairn::{RemoteOptions, RemoteStore};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 2 << 20,
        ..StoreOptions::default()
    }
}

/// A state where step `s` shares most tensors with step `s - 1`.
fn rolling_state(step: u64) -> OwnedState {
    let mut s = OwnedState::default();
    for i in 0..16u64 {
        // Tensor i changes every (i % 4 + 1) steps.
        let version = step / (i % 4 + 1);
        let mut r = Rng(i * 1000 + version);
        s.tensors.push(OwnedTensor {
            name: format!("w{i}"),
            dtype: cairn::DType::F32,
            shape: vec![40_000],
            data: r.bytes(160_000),
        });
    }
    s
}

fn referenced(store: &Store) -> HashSet<String> {
    let mut out = HashSet::new();
    for run in store.runs().unwrap() {
        for step in store.steps(&run).unwrap() {
            for (id, _) in store.manifest(&run, step).unwrap().distinct_chunks() {
                out.insert(id.to_hex());
            }
        }
    }
    out
}

#[test]
fn local_gc_during_saves_keeps_every_referenced_chunk_and_reclaims_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let done = AtomicBool::new(false);
    let mut collections = 0;
    std::thread::scope(|s| {
        let saver = s.spawn(|| {
            for step in 0..30u64 {
                let st = rolling_state(step);
                store.save("g", step, &st.view()).unwrap().wait().unwrap();
                // Keep the last three: older ones become garbage.
                if step >= 3 {
                    store.delete("g", step - 3).unwrap();
                }
            }
            done.store(true, Ordering::Relaxed);
        });
        // Stop collecting when the saver is done (or has panicked).
        while !done.load(Ordering::Relaxed) && !saver.is_finished() {
            store.gc(Duration::ZERO, false).unwrap();
            collections += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    assert!(collections > 3, "gc ran only {collections} times");
    // Every committed checkpoint is whole.
    let report = store.verify(None, None).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    for step in store.steps("g").unwrap() {
        let got = store
            .restore("g", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &rolling_state(step));
    }
    // Nothing unreferenced is left after a final collection.
    let r = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!(r.referenced_chunks as usize, referenced(&store).len());
    let on_disk: HashSet<String> = chunk_files(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(on_disk, referenced(&store));
}

#[test]
fn gc_dry_run_and_grace_period_delete_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    for step in 0..3 {
        store
            .save("g", step, &rolling_state(step * 10).view())
            .unwrap()
            .wait()
            .unwrap();
    }
    store.delete("g", 0).unwrap();
    let before = chunk_files(dir.path()).len();
    let dry = store.gc(Duration::ZERO, true).unwrap();
    assert!(dry.chunks_deleted > 0 && dry.bytes_reclaimed > 0);
    assert_eq!(chunk_files(dir.path()).len(), before);
    let graced = store.gc(Duration::from_secs(3600), false).unwrap();
    assert_eq!(graced.chunks_deleted, 0);
    assert_eq!(graced.chunks_in_grace, dry.chunks_deleted);
    assert_eq!(chunk_files(dir.path()).len(), before);
    let real = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!(real.chunks_deleted, dry.chunks_deleted);
    assert_eq!(
        chunk_files(dir.path()).len(),
        before - dry.chunks_deleted as usize
    );
    assert!(store.verify(None, None).unwrap().ok());
}

#[test]
fn local_retention_only_drops_checkpoints_durable_remotely() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path().join("local"), opts()).unwrap();
    let remote = RemoteStore::open(
        &format!("file://{}", dir.path().join("remote").display()),
        &[],
        RemoteOptions::default(),
    )
    .unwrap();
    store.attach_remote(remote.clone());
    for step in 0..6 {
        store
            .save("r", step, &rolling_state(step).view())
            .unwrap()
            .wait()
            .unwrap();
    }
    for step in [0, 1, 3] {
        store.upload("r", step).unwrap();
    }
    let deleted = store.apply_local_retention(2, &remote).unwrap();
    // Steps 0..=3 are beyond the newest two; only uploaded ones go, and
    // step 3, the newest durable one, stays.
    assert_eq!(deleted, vec![("r".to_string(), 0), ("r".to_string(), 1)]);
    assert_eq!(store.steps("r").unwrap(), vec![2, 3, 4, 5]);
}

#[test]
fn remote_retention_and_gc_with_concurrent_uploads() {
    let grace = Duration::from_secs(8);
    let remote = s3::remote(
        "gc",
        RemoteOptions {
            gc_grace: grace,
            ..RemoteOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts()).unwrap();
    store.attach_remote(remote.clone());
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let uploader = s.spawn(|| {
            for step in 0..8u64 {
                store
                    .save("g", step, &rolling_state(step).view())
                    .unwrap()
                    .wait()
                    .unwrap();
                // An upload that outlives its safety window is refused; retry.
                let mut tries = 0;
                while let Err(e) = store.upload("g", step) {
                    tries += 1;
                    assert!(tries < 10, "upload keeps failing: {e}");
                }
                remote
                    .block_on(remote.apply_retention(2, Some(3)))
                    .unwrap()
                    .unwrap();
            }
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) && !uploader.is_finished() {
            remote.gc(grace, false).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let steps = remote.block_on(remote.steps("g")).unwrap().unwrap();
    assert_eq!(steps, vec![0, 3, 6, 7], "keep the last 2 and every 3rd");
    for &step in &steps {
        let got = remote
            .restore("g", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &rolling_state(step));
    }
    // After the grace period, unreferenced chunks go and referenced stay.
    std::thread::sleep(grace + Duration::from_millis(200));
    let r = remote.gc(grace, false).unwrap();
    assert!(r.chunks_deleted > 0, "{r:?}");
    let left: HashSet<String> = remote
        .block_on(remote.list_chunks())
        .unwrap()
        .unwrap()
        .iter()
        .map(|c| c.0.to_hex())
        .collect();
    let mut want = HashSet::new();
    for &step in &steps {
        let m = remote
            .block_on(remote.manifest("g", step))
            .unwrap()
            .unwrap();
        want.extend(m.distinct_chunks().iter().map(|c| c.0.to_hex()));
    }
    assert_eq!(left, want);
    for &step in &steps {
        let got = remote
            .restore("g", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &rolling_state(step));
    }
}

/// Leftovers in `tmp/`: a killed save's temporary chunk file and a killed
/// bench's sweep directory stay while younger than `TMP_MIN_AGE` (counted
/// as kept, whatever the grace), then go, the directory with its files; a
/// link there is removed without touching its target; committed
/// checkpoints stay readable throughout.
#[test]
fn gc_reports_young_temporaries_and_removes_old_ones_directories_included() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts()).unwrap();
    let clock = cairn::ManualClock::new();
    store.set_clock(std::sync::Arc::new(clock.clone()));
    let state = rolling_state(3);
    store.save("t", 0, &state.view()).unwrap().wait().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::write(tmp.join("chunk.1234.tmp"), b"half a chunk").unwrap();
    let sweep = tmp.join("bench-sweep.99.tmp");
    std::fs::create_dir(&sweep).unwrap();
    for i in 0..3 {
        std::fs::write(sweep.join(format!("part.{i}")), vec![7u8; 4096]).unwrap();
    }
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("precious");
    std::fs::write(&target, b"not the store's").unwrap();
    std::os::unix::fs::symlink(&target, tmp.join("link.tmp")).unwrap();

    let young = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!(young.temporaries_in_grace, 3, "{young:?}");
    assert_eq!(young.leftovers_removed, 0, "{young:?}");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 3);

    clock.advance(cairn::TMP_MIN_AGE + Duration::from_secs(1));
    let dry = store.gc(Duration::ZERO, true).unwrap();
    assert_eq!((dry.leftovers_removed, dry.temporaries_in_grace), (3, 0));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 3);
    let old = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!((old.leftovers_removed, old.temporaries_in_grace), (3, 0));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "tmp/ emptied");
    assert_eq!(std::fs::read(&target).unwrap(), b"not the store's");

    let restored = store
        .restore("t", StepSel::Step(0), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&restored, &state);
    assert!(store.verify(None, None).unwrap().ok());
}
