//! Batched syncs (`StoreOptions::batch_sync`, for chunks written with O_DIRECT):
//! chunk files written with O_DIRECT are made durable by one `syncfs` per
//! batch and only then renamed to their final names. Held at the fail
//! point before that sync, a save has no chunk at a final name; a failed
//! sync fails the save, publishes none of its chunks, leaves no temporary
//! file and loses nothing committed before; batched and per-file syncs
//! store the same files.
//!
//! Stores live under the build's temporary directory, a real disk where
//! O_DIRECT works.

mod common;

use cairn::testing::failpoints;
use cairn::{Store, StoreOptions};
use common::{assert_step_restores, byte_tensors, disk_dir, wait_until};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const POINT: &str = "chunk.batch_sync";

/// Fail points are process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|p| p.into_inner());
    failpoints::reset();
    g
}

fn opts(batch_sync: bool) -> StoreOptions {
    StoreOptions {
        chunk_size: 1 << 20,
        staging_bytes: 32 << 20,
        direct_io: true,
        batch_sync,
        // Whatever else the machine is writing (a build beside the tests),
        // the batch tests take the `syncfs` path unless they force
        // otherwise.
        batch_sync_max_dirty: u64::MAX,
        ..StoreOptions::default()
    }
}

/// Every file under `root/<sub>`, one level of directories down or not.
fn files_under(root: &Path, sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root.join(sub)) else {
        return out;
    };
    for d in rd.flatten() {
        let p = d.path();
        if p.is_dir() {
            out.extend(std::fs::read_dir(&p).unwrap().flatten().map(|f| f.path()));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Chunk temporary files in `root/tmp`: named after a 64-hex chunk id,
/// or `early.*` for a payload written before its hash was known
/// (`StoreOptions::early_write`).
fn chunk_tmp_files(root: &Path) -> Vec<PathBuf> {
    files_under(root, "tmp")
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name.len() > 64 && name[..64].bytes().all(|b| b.is_ascii_hexdigit()))
                || name.starts_with("early.")
        })
        .collect()
}

/// The [`chunk_tmp_files`] that hold bytes: not the empty files made ahead
/// for early writes to come.
fn written_tmp_files(root: &Path) -> Vec<PathBuf> {
    chunk_tmp_files(root)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .collect()
}

/// Sets its flag when dropped.
struct ReleaseOnDrop(Arc<AtomicBool>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn chunks_reach_their_final_names_only_after_the_batch_sync() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let state = byte_tensors(1, 6);
    // The first batch's sync waits until the test has looked.
    let release = Arc::new(AtomicBool::new(false));
    // Declared after the store, so dropped before it: a failed assertion
    // lets the held sync go before the store's threads are joined.
    let _release_on_unwind = ReleaseOnDrop(release.clone());
    let r = release.clone();
    failpoints::set(POINT, move || {
        while !r.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    });
    let handle = store.save("job", 1, &state.view()).unwrap();
    wait_until("the batch sync", || failpoints::hits(POINT) >= 1);
    // Give the writers time to write (and wrongly publish) the rest.
    wait_until("every chunk written", || {
        written_tmp_files(dir.path()).len() == 12
    });
    assert_eq!(
        files_under(dir.path(), "chunks"),
        Vec::<PathBuf>::new(),
        "a chunk reached its final name before the sync that makes it durable"
    );
    release.store(true, Ordering::Release);
    handle.wait().unwrap();
    failpoints::reset();
    assert_eq!(files_under(dir.path(), "chunks").len(), 12);
    assert_eq!(chunk_tmp_files(dir.path()), Vec::<PathBuf>::new());
    assert_step_restores(&store, "job", 1, &state);
}

#[test]
fn a_failed_batch_sync_fails_the_save_and_loses_nothing_committed() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let first = byte_tensors(2, 4);
    store.save("job", 1, &first.view()).unwrap().wait().unwrap();
    let before = files_under(dir.path(), "chunks");
    assert_eq!(before.len(), 8);

    failpoints::set(POINT, || Some(std::io::Error::from_raw_os_error(libc::EIO)));
    let second = byte_tensors(3, 4);
    let err = store
        .save("job", 2, &second.view())
        .unwrap()
        .wait()
        .expect_err("a save whose chunk files could not be made durable committed");
    let msg = err.to_string();
    assert!(msg.contains("syncfs"), "the error names the sync: {msg}");
    assert!(failpoints::hits(POINT) >= 1);
    failpoints::reset();
    assert_eq!(
        files_under(dir.path(), "chunks"),
        before,
        "a chunk of the failed save was published"
    );
    assert_eq!(chunk_tmp_files(dir.path()), Vec::<PathBuf>::new());
    assert_eq!(store.steps("job").unwrap(), vec![1]);
    assert_step_restores(&store, "job", 1, &first);

    // The same save again, once the sync works, commits.
    store
        .save("job", 2, &second.view())
        .unwrap()
        .wait()
        .unwrap();
    assert_step_restores(&store, "job", 2, &second);
    assert_step_restores(&store, "job", 1, &first);
}

#[test]
fn batched_and_per_file_syncs_store_the_same_files() {
    let _g = serial();
    let state = byte_tensors(4, 5);
    let mut stored = Vec::new();
    for batch in [true, false] {
        let dir = disk_dir();
        let store = Store::open(dir.path(), opts(batch)).unwrap();
        store.save("job", 1, &state.view()).unwrap().wait().unwrap();
        assert_eq!(
            failpoints::hits(POINT) > 0,
            batch,
            "batch_sync {batch}: the barrier's sync ran or not"
        );
        failpoints::reset();
        let files: Vec<(String, Vec<u8>)> = files_under(dir.path(), "chunks")
            .into_iter()
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().to_string(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        assert_eq!(files.len(), 10);
        assert_step_restores(&store, "job", 1, &state);
        stored.push(files);
    }
    assert!(
        stored[0] == stored[1],
        "batched and per-file syncs stored different files"
    );
}

/// With the machine holding much dirty page cache (forced here at the
/// barrier's check), `syncfs` would write it all back at the save's
/// expense: the batch is made durable file by file instead, and the save
/// still stores every chunk whole, with no temporary file left.
#[test]
fn with_much_dirty_data_a_batch_is_synced_file_by_file() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    failpoints::set("chunk.batch_dirty", || {
        Some(std::io::Error::other("much dirty data"))
    });
    let state = byte_tensors(5, 6);
    store.save("job", 1, &state.view()).unwrap().wait().unwrap();
    assert!(failpoints::hits("chunk.batch_dirty") >= 1);
    assert_eq!(failpoints::hits(POINT), 0, "syncfs ran");
    failpoints::reset();
    assert_eq!(files_under(dir.path(), "chunks").len(), 12);
    assert_eq!(chunk_tmp_files(dir.path()), Vec::<PathBuf>::new());
    assert_step_restores(&store, "job", 1, &state);
}
