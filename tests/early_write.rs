//! Early writes (`StoreOptions::early_write`, on by default): a raw chunk
//! likely to be new is written with O_DIRECT as soon as it is staged,
//! while it is hashed. What a user relies on: every save restores bit-exact
//! whichever way its chunks went; an unchanged state is still deduplicated
//! (hashed first, nothing written); a chunk written early that turns out to
//! be stored already leaves no file behind and is reported as discarded; a
//! change that the position's sample misses is still saved; and a failed
//! early write falls back to the usual path.
//!
//! Stores live under the build's temporary directory, a real disk where
//! O_DIRECT works.

mod common;

use cairn::testing::failpoints;
use cairn::{SaveReport, Store, StoreOptions};
use common::{assert_step_restores, byte_tensors, chunk_files, disk_dir, wait_until, OwnedState};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Fail points are process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|p| p.into_inner());
    failpoints::reset();
    g
}

fn opts(early_write: bool) -> StoreOptions {
    StoreOptions {
        chunk_size: 1 << 20,
        staging_bytes: 32 << 20,
        direct_io: true,
        early_write,
        ..StoreOptions::default()
    }
}

fn save(store: &Store, run: &str, step: u64, s: &OwnedState) -> SaveReport {
    store
        .save(run, step, &s.view())
        .unwrap_or_else(|e| panic!("save {run}/{step}: {e}"))
        .wait()
        .unwrap_or_else(|e| panic!("save {run}/{step} did not commit: {e}"))
}

/// Save through leases, as the Python binding does: the caller fills
/// slices of the staging pool itself.
fn save_leased(store: &Store, run: &str, step: u64, s: &OwnedState) -> SaveReport {
    let mut save = store
        .lease_save(run, step, common::leased_specs(s), &cairn::SaveState::new())
        .unwrap_or_else(|e| panic!("lease save {run}/{step}: {e}"));
    let data: Vec<&[u8]> = s.tensors.iter().map(|t| &t.data[..]).collect();
    common::fill_leases(&mut save, &data);
    save.finish()
        .unwrap()
        .wait()
        .unwrap_or_else(|e| panic!("lease save {run}/{step} did not commit: {e}"))
}

/// Everything left in `root/tmp`.
fn tmp_files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn an_unchanged_state_is_hashed_first_and_writes_nothing() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let a = byte_tensors(1, 4);
    let first = save(&store, "job", 1, &a);
    assert_eq!(first.bytes_written_uncompressed, a.logical_bytes());
    assert_eq!(first.bytes_discarded, 0);
    let again = save(&store, "job", 2, &a);
    assert_eq!(
        (again.bytes_written, again.bytes_discarded),
        (0, 0),
        "an unchanged state was written again"
    );
    assert_eq!(again.bytes_deduped, a.logical_bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    assert_step_restores(&store, "job", 1, &a);
    assert_step_restores(&store, "job", 2, &a);
}

#[test]
fn a_chunk_written_early_that_is_stored_already_leaves_no_file() {
    let _g = serial();
    let dir = disk_dir();
    let (a, b) = (byte_tensors(2, 4), byte_tensors(3, 4));
    {
        let store = Store::open(dir.path(), opts(true)).unwrap();
        save(&store, "job", 1, &a);
        save(&store, "job", 2, &b);
        // Every position held B's bytes last: A's chunks look new, are
        // written early, and are found stored once hashed.
        let back = save(&store, "job", 3, &a);
        assert_eq!(back.bytes_written, 0);
        assert_eq!(back.bytes_deduped, a.logical_bytes());
        assert_eq!(back.bytes_discarded, a.logical_bytes());
        assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
        assert_eq!(chunk_files(dir.path()).len(), 16);
        assert_step_restores(&store, "job", 3, &a);
    }
    // A store opened anew has no memory of positions: the same happens.
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let reopened = save(&store, "job", 4, &b);
    assert_eq!(reopened.bytes_written, 0);
    assert_eq!(reopened.bytes_discarded, b.logical_bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    for (state, step) in [(&a, 1), (&b, 2), (&a, 3), (&b, 4)] {
        assert_step_restores(&store, "job", step, state);
    }
    let report = store.verify(Some("job"), Some(4)).unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn with_early_writes_off_every_chunk_is_hashed_first() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(false)).unwrap();
    let (a, b) = (byte_tensors(4, 3), byte_tensors(5, 3));
    let first = save(&store, "job", 1, &a);
    assert_eq!(first.bytes_written_uncompressed, a.logical_bytes());
    save(&store, "job", 2, &b);
    let back = save(&store, "job", 3, &a);
    assert_eq!((back.bytes_written, back.bytes_discarded), (0, 0));
    assert_step_restores(&store, "job", 3, &a);
}

#[test]
fn a_change_the_sample_misses_is_still_saved() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let a = byte_tensors(6, 2);
    save(&store, "job", 1, &a);
    // One byte inside the first chunk of the first tensor, away from the
    // sampled windows (at 1/7 of a 1 MiB chunk plus 2 KiB): its position
    // looks unchanged, so it is hashed first, found new and written.
    let mut changed = a.clone();
    let at = (1 << 20) / 7 + 2048;
    changed.tensors[0].data[at] ^= 0x5A;
    let rep = save(&store, "job", 2, &changed);
    assert_eq!(rep.bytes_written_uncompressed, 1 << 20);
    assert_eq!(rep.bytes_discarded, 0);
    assert_step_restores(&store, "job", 2, &changed);
    assert_step_restores(&store, "job", 1, &a);
}

#[test]
fn a_failed_early_write_falls_back_to_the_usual_path() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    failpoints::set("chunk.early_write", || {
        Some(std::io::Error::from_raw_os_error(libc::EIO))
    });
    let a = byte_tensors(7, 3);
    let rep = save(&store, "job", 1, &a);
    let hits = failpoints::hits("chunk.early_write");
    failpoints::reset();
    assert_eq!(hits, 6, "not every chunk was tried early");
    assert_eq!(rep.bytes_written_uncompressed, a.logical_bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    assert_step_restores(&store, "job", 1, &a);
}

#[test]
fn leased_saves_write_early_too_and_dedup_the_same() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let (a, b) = (byte_tensors(8, 3), byte_tensors(9, 3));
    let first = save_leased(&store, "job", 1, &a);
    assert_eq!(first.bytes_written_uncompressed, a.logical_bytes());
    // Unchanged: hashed first, nothing written or discarded.
    let again = save_leased(&store, "job", 2, &a);
    assert_eq!((again.bytes_written, again.bytes_discarded), (0, 0));
    save_leased(&store, "job", 3, &b);
    // The positions held B's bytes: A's chunks are written early, found
    // stored, and removed. A leased and an ordinary save share positions.
    let back = save_leased(&store, "job", 4, &a);
    assert_eq!(back.bytes_written, 0);
    assert_eq!(back.bytes_discarded, a.logical_bytes());
    let plain = save(&store, "job", 5, &b);
    assert_eq!(plain.bytes_discarded, b.logical_bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    for (state, step) in [(&a, 1), (&a, 2), (&b, 3), (&a, 4), (&b, 5)] {
        assert_step_restores(&store, "job", step, state);
    }
}

/// Hold every hit of fail point `name` back for `ms` milliseconds.
fn delay(name: &str, ms: u64) {
    failpoints::set(name, move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        None
    });
}

/// A chunk written early is hashed at the same time, and whichever of the
/// write and the hash ends second carries it on: with either held back,
/// every chunk is written once, named, and restores bit-exact, and no
/// temporary file is left; with the early write failing too, the chunk
/// still takes the usual path from whichever ends second.
#[test]
fn the_write_and_the_hash_of_a_chunk_end_in_either_order() {
    let _g = serial();
    for (held, fails) in [
        ("chunk.early_write", false),
        ("chunk.early_hash", false),
        ("chunk.early_write", true),
        ("chunk.early_hash", true),
    ] {
        failpoints::reset();
        let what = format!("{held} held back, early write failing: {fails}");
        let dir = disk_dir();
        let store = Store::open(dir.path(), opts(true)).unwrap();
        if fails && held == "chunk.early_write" {
            failpoints::set(held, || {
                std::thread::sleep(std::time::Duration::from_millis(30));
                Some(std::io::Error::from_raw_os_error(libc::EIO))
            });
        } else {
            delay(held, 30);
            if fails {
                failpoints::set("chunk.early_write", || {
                    Some(std::io::Error::from_raw_os_error(libc::EIO))
                });
            }
        }
        let a = byte_tensors(11, 3);
        let rep = save(&store, "job", 1, &a);
        let (writes, hashes) = (
            failpoints::hits("chunk.early_write"),
            failpoints::hits("chunk.early_hash"),
        );
        failpoints::reset();
        assert_eq!((writes, hashes), (6, 6), "{what}: chunks split");
        // Each chunk settled once: counted once, written once, none
        // taken for a duplicate of itself.
        assert_eq!(rep.chunks, 6, "{what}");
        assert_eq!(rep.bytes_deduped, 0, "{what}");
        assert_eq!(rep.chunks_written, 6, "{what}");
        assert_eq!(rep.bytes_written_uncompressed, a.logical_bytes(), "{what}");
        assert_eq!(rep.bytes_discarded, 0, "{what}");
        assert_eq!(chunk_files(dir.path()).len(), 6, "{what}");
        assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new(), "{what}");
        assert_step_restores(&store, "job", 1, &a);
        // The same bytes again at new positions: found stored after the
        // early write either way, and the early files removed.
        delay(held, 30);
        let rep = save(&store, "other", 1, &a);
        failpoints::reset();
        assert_eq!(rep.chunks_written, 0, "{what}: stored chunks rewritten");
        assert_eq!(rep.bytes_discarded, a.logical_bytes(), "{what}");
        assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new(), "{what}");
        assert_step_restores(&store, "other", 1, &a);
    }
}

/// Files for early writes are made ahead while a save stages: a leased
/// save abandoned after one early-written lease has files made for leases
/// never filled, and none of them (nor the early file) outlives it; the
/// next save, ordinary or leased, leaves `tmp/` empty when it returns.
#[test]
fn files_made_ahead_do_not_outlive_a_save() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let s = byte_tensors(21, 8);
    {
        let mut leased = store
            .lease_save("job", 1, common::leased_specs(&s), &cairn::SaveState::new())
            .unwrap();
        let cairn::NextLease::Lease(mut l) = leased.lease(true).unwrap() else {
            panic!("no first lease");
        };
        let data: Vec<&[u8]> = s.tensors.iter().map(|t| &t.data[..]).collect();
        common::fill_lease(&mut l, &data);
        leased.submit(l).unwrap();
        // The first lease's chunk is written early and files are made
        // ahead for the rest while the save stays open.
        wait_until("files made ahead", || tmp_files(dir.path()).len() > 1);
    }
    // Dropped: the save fails, and nothing it had made stays.
    wait_until("tmp/ emptied", || tmp_files(dir.path()).is_empty());
    let rep = save(&store, "job", 2, &s);
    // (The abandoned save's one chunk may have been stored already.)
    assert_eq!(
        rep.bytes_written_uncompressed + rep.bytes_deduped,
        s.logical_bytes()
    );
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    let t = byte_tensors(22, 8);
    save_leased(&store, "job", 3, &t);
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    assert_step_restores(&store, "job", 2, &s);
    assert_step_restores(&store, "job", 3, &t);
    assert!(!store.steps("job").unwrap().contains(&1));
}
