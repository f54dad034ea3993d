//! The interleavings the collection protocol exists for, driven on
//! purpose: a manual clock stands in for time, and a hook on the object
//! store acts at the exact step where a concurrent collector or a slow
//! network would. Nothing here sleeps.

mod common;

use cairn::object_store::memory::InMemory;
use cairn::object_store::path::Path as ObjPath;
use cairn::object_store::ObjectStore;
use cairn::testing::{FaultConfig, FaultyObjectStore, OpHook};
use cairn::{
    copy_checkpoint, ChunkTier, CopyOptions, Error, ErrorKind, ManualClock, RemoteOptions,
    RemoteStore, StepSel, TensorFilter,
};
use common::{assert_restored_eq, open, state_for_step, OwnedState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(3600);

/// An in-memory remote behind the fault injector (no faults, only the
/// hook), on a manual clock. Returns the remote and the raw inner store.
fn remote(clock: &ManualClock, hook: OpHook) -> (RemoteStore, Arc<InMemory>) {
    let inner = Arc::new(InMemory::new());
    let faulty = FaultyObjectStore::new(
        inner.clone(),
        FaultConfig {
            fail_before: 0.0,
            fail_after: 0.0,
            max_delay: Duration::ZERO,
            seed: 1,
        },
    )
    .with_hook(hook);
    let opts = RemoteOptions {
        gc_grace: GRACE,
        ..RemoteOptions::default()
    };
    let r = RemoteStore::new(
        Arc::new(faulty),
        ObjPath::from("ckpt"),
        "memory:///ckpt",
        opts,
    )
    .with_clock(Arc::new(clock.clone()));
    (r, inner)
}

/// A hook that can be switched in after the store is built.
#[derive(Clone, Default)]
struct Switch(Arc<Mutex<Option<OpHook>>>);

impl Switch {
    fn hook(&self) -> OpHook {
        let me = self.clone();
        Arc::new(move |op, path| {
            let h = me.0.lock().unwrap().clone();
            if let Some(h) = h {
                h(op, path);
            }
        })
    }
    fn set(&self, h: OpHook) {
        *self.0.lock().unwrap() = Some(h);
    }
    fn clear(&self) {
        *self.0.lock().unwrap() = None;
    }
}

/// Step 2 of the fixture: step 1 with one tensor changed, so most chunks
/// are shared.
fn step2(s1: &OwnedState) -> OwnedState {
    let mut s2 = s1.clone();
    s2.tensors[0].data.iter_mut().for_each(|b| *b ^= 0xA5);
    s2
}

/// Planted bug this catches: dropping the post-commit re-check in
/// `copy_checkpoint` (the renewed chunk stays deleted and step 2 no longer
/// restores).
#[test]
fn renewal_racing_a_collectors_delete_is_repaired_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let local = open(&dir.path().join("local"));
    let clock = ManualClock::new();
    let switch = Switch::default();
    let (remote, inner) = remote(&clock, switch.hook());
    let s1 = state_for_step(1, 6, 200 << 10);
    local.save("r", 1, &s1.view()).unwrap().wait().unwrap();
    local.upload_to(&remote, "r", 1).unwrap();
    // Retention drops step 1 remotely; its chunks are now unreferenced
    // there, and the clock moves past the grace period.
    ChunkTier::delete_manifest(&remote, "r", 1).unwrap();
    clock.advance(GRACE + Duration::from_secs(600));
    let s2 = step2(&s1);
    local.save("r", 2, &s2.view()).unwrap().wait().unwrap();
    // The collector listed the old chunks and HEADed one just before the
    // uploader renewed it; its DELETE lands after the renewal, just before
    // the manifest commit.
    let step1: std::collections::HashSet<_> = local
        .manifest("r", 1)
        .unwrap()
        .distinct_chunks()
        .into_iter()
        .map(|c| c.0)
        .collect();
    let shared: Vec<_> = local
        .manifest("r", 2)
        .unwrap()
        .distinct_chunks()
        .into_iter()
        .map(|c| c.0)
        .filter(|id| step1.contains(id))
        .collect();
    assert!(!shared.is_empty(), "steps 1 and 2 share chunks");
    let victim = remote.chunk_path(&shared[0]);
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (inner, victim, fired) = (inner.clone(), victim.clone(), fired.clone());
        switch.set(Arc::new(move |op, path| {
            if op == "put"
                && path.as_ref().ends_with("manifest.cairn")
                && !fired.swap(true, Ordering::SeqCst)
            {
                let (inner, victim) = (inner.clone(), victim.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(inner.delete(&victim)).unwrap();
                })
                .join()
                .unwrap();
            }
        }));
    }
    let rep = copy_checkpoint(&local, &remote, "r", 2, &CopyOptions::default()).unwrap();
    switch.clear();
    assert!(fired.load(Ordering::SeqCst), "the collector's delete ran");
    assert!(
        rep.chunks_renewed > 0,
        "old shared chunks were renewed: {rep:?}"
    );
    assert_eq!(rep.chunks_skipped, 0, "nothing old was relied on: {rep:?}");
    assert_eq!(
        rep.chunks_restored_after_commit, 1,
        "the deleted renewed chunk was put back: {rep:?}"
    );
    let back = remote
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&back, &s2);
}

/// Planted bug this catches: removing the deadline check before each
/// delete in `RemoteStore::gc` (the stalled collector then deletes a chunk
/// an upload may rely on).
#[test]
fn collector_stalled_between_head_and_delete_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local = open(&dir.path().join("local"));
    let clock = ManualClock::new();
    let switch = Switch::default();
    let (remote, _inner) = remote(&clock, switch.hook());
    let s1 = state_for_step(1, 6, 200 << 10);
    local.save("r", 1, &s1.view()).unwrap().wait().unwrap();
    local.upload_to(&remote, "r", 1).unwrap();
    ChunkTier::delete_manifest(&remote, "r", 1).unwrap();
    clock.advance(GRACE * 2);
    let before = chunk_ids(&remote);
    assert!(!before.is_empty());
    // The collector stalls in its re-check HEAD for longer than a quarter
    // of the grace period.
    let heads = Arc::new(AtomicU64::new(0));
    {
        let (clock, heads) = (clock.clone(), heads.clone());
        switch.set(Arc::new(move |op, path| {
            if op == "get" && path.as_ref().contains("/chunks/") {
                heads.fetch_add(1, Ordering::SeqCst);
                clock.advance(GRACE / 4 + Duration::from_secs(1));
            }
        }));
    }
    let e = remote
        .gc(GRACE, false)
        .expect_err("a stalled collection stops");
    switch.clear();
    assert!(heads.load(Ordering::SeqCst) >= 1, "the re-check HEAD ran");
    assert!(matches!(e, Error::DeadlineExceeded { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(chunk_ids(&remote), before, "nothing was deleted");
    // Unstalled, the same collection reclaims the garbage.
    let rep = remote.gc(GRACE, false).unwrap();
    assert_eq!(rep.chunks_deleted, before.len() as u64);
    assert!(chunk_ids(&remote).is_empty());
}

/// Planted bug this catches: removing the commit deadline from
/// `copy_checkpoint` (a slow upload then commits a manifest whose skipped
/// chunks a collector may already have deleted).
#[test]
fn uploader_that_outlives_its_deadline_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local = open(&dir.path().join("local"));
    let clock = ManualClock::new();
    let switch = Switch::default();
    let (remote, _inner) = remote(&clock, switch.hook());
    let s1 = state_for_step(1, 6, 200 << 10);
    local.save("r", 1, &s1.view()).unwrap().wait().unwrap();
    // Every chunk PUT takes a tenth of the grace period.
    {
        let clock = clock.clone();
        switch.set(Arc::new(move |op, path| {
            if op == "put" && path.as_ref().contains("/chunks/") {
                clock.advance(GRACE / 10);
            }
        }));
    }
    let e = local
        .upload_to(&remote, "r", 1)
        .expect_err("a slow upload is refused");
    switch.clear();
    assert!(matches!(e, Error::DeadlineExceeded { .. }), "{e}");
    assert!(
        ChunkTier::steps(&remote, "r").unwrap().is_empty(),
        "no manifest was committed"
    );
    assert!(local.uploaded_to("r", 1).is_none(), "not marked uploaded");
    // The next attempt starts over and commits.
    let rep = local.upload_to(&remote, "r", 1).unwrap();
    assert!(!rep.already_committed);
    let back = remote
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&back, &s1);
}

/// Planted bug this catches: local GC reading the system clock instead of
/// the store's (the advanced clock would then not reclaim anything).
#[test]
fn local_grace_follows_the_stores_clock() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = open(&dir.path().join("local"));
    let clock = ManualClock::new();
    local.set_clock(Arc::new(clock.clone()));
    let s1 = state_for_step(1, 6, 200 << 10);
    local.save("r", 1, &s1.view()).unwrap().wait().unwrap();
    let n = local.manifest("r", 1).unwrap().distinct_chunks().len() as u64;
    local.delete("r", 1).unwrap();
    let kept = local.gc(GRACE, false).unwrap();
    assert_eq!(kept.chunks_deleted, 0);
    assert_eq!(kept.chunks_in_grace, n);
    clock.advance(GRACE + Duration::from_secs(1));
    let swept = local.gc(GRACE, false).unwrap();
    assert_eq!(swept.chunks_deleted, n);
}

/// The chunk ids a remote holds, sorted.
fn chunk_ids(r: &RemoteStore) -> Vec<cairn::ChunkId> {
    let mut v: Vec<_> = ChunkTier::list_chunks(r)
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    v.sort();
    v
}
