//! A store lists its chunk files once when it opens and then writes a
//! chunk absent from that account without looking its name up. These
//! tests hold the account against what is really on disk: chunks stored
//! before the store opened are reused, and chunks stored or removed
//! behind its back (another handle, a hand) still end in a checkpoint
//! that restores bit-exact and verifies clean.

mod common;

use cairn::{StepSel, Store, TensorFilter};
use common::*;
use std::time::{Duration, Instant};

/// Open `dir` and wait until its pipeline has listed the chunk files.
fn open_listed(dir: &std::path::Path) -> Store {
    let store = open(dir);
    let t = Instant::now();
    while !store.chunk_listing_done() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "chunk listing not done"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    store
}

fn check(store: &Store, run: &str, step: u64, s: &OwnedState) {
    let r = store
        .restore(run, StepSel::Step(step), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&r, s);
    let v = store.verify(None, None).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

#[test]
fn chunks_stored_before_the_store_opened_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = state_for_step(1, 20, 200_000);
    {
        let first = open(dir.path());
        first.save("k", 1, &s.view()).unwrap().wait().unwrap();
    }
    let store = open_listed(dir.path());
    let files_before = chunk_files(dir.path()).len();
    let rep = store.save("k", 2, &s.view()).unwrap().wait().unwrap();
    assert_eq!((rep.chunks_written, rep.bytes_written), (0, 0), "{rep:?}");
    assert_eq!(rep.bytes_deduped, s.logical_bytes());
    assert_eq!(chunk_files(dir.path()).len(), files_before);
    check(&store, "k", 2, &s);
}

#[test]
fn a_chunk_removed_after_the_listing_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = state_for_step(2, 20, 200_000);
    open(dir.path())
        .save("k", 1, &s.view())
        .unwrap()
        .wait()
        .unwrap();
    let store = open_listed(dir.path());
    let victim = chunk_files(dir.path()).into_iter().next().unwrap();
    std::fs::remove_file(&victim).unwrap();
    let rep = store.save("k", 2, &s.view()).unwrap().wait().unwrap();
    assert_eq!(rep.chunks_written, 1, "{rep:?}");
    assert!(victim.is_file(), "{} not written again", victim.display());
    check(&store, "k", 2, &s);
    check(&store, "k", 1, &s);
}

#[test]
fn chunks_stored_by_another_handle_after_the_listing_are_written_over_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_listed(dir.path());
    let other = open(dir.path());
    let s = state_for_step(3, 20, 200_000);
    let by_other = other.save("k", 1, &s.view()).unwrap().wait().unwrap();
    assert!(by_other.chunks_written > 0);
    let sorted = |mut v: Vec<std::path::PathBuf>| {
        v.sort();
        v
    };
    let files = sorted(chunk_files(dir.path()));
    // The same bytes saved through the handle that listed before they
    // existed: written again under the same names, nothing else changes.
    let rep = store.save("k", 2, &s.view()).unwrap().wait().unwrap();
    assert_eq!(rep.chunks_written, by_other.chunks_written, "{rep:?}");
    assert_eq!(sorted(chunk_files(dir.path())), files);
    check(&store, "k", 1, &s);
    check(&other, "k", 2, &s);
    // Written once by this handle, the chunks are its own: reused now.
    let again = store.save("k", 3, &s.view()).unwrap().wait().unwrap();
    assert_eq!(again.chunks_written, 0, "{again:?}");
}

#[test]
fn garbage_planted_at_a_chunk_name_after_the_listing_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = state_for_step(4, 20, 200_000);
    // Learn the chunk names from a save in a scratch store.
    let scratch = tempfile::tempdir().unwrap();
    open(scratch.path())
        .save("k", 1, &s.view())
        .unwrap()
        .wait()
        .unwrap();
    let names: Vec<_> = chunk_files(scratch.path())
        .into_iter()
        .map(|p| p.strip_prefix(scratch.path()).unwrap().to_path_buf())
        .collect();
    let store = open_listed(dir.path());
    // A truncated file at one chunk's final name, after the listing.
    let planted = dir.path().join(&names[0]);
    std::fs::write(&planted, b"not a chunk").unwrap();
    store.save("k", 1, &s.view()).unwrap().wait().unwrap();
    assert!(std::fs::metadata(&planted).unwrap().len() > 11);
    check(&store, "k", 1, &s);
}
