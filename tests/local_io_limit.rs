//! The local write and restore paths run toward the disk's limit without
//! giving up durability or verification:
//! - an I/O thread writes several chunk files before it `fdatasync`s them;
//!   every chunk still reaches its final name only once durable, so a save
//!   commits every chunk it wrote, a failed `fdatasync` in the middle of a
//!   batch fails the save, and a power cut at any operation of a save with
//!   many chunks leaves only complete chunk files and restorable steps;
//! - a chunk spread over several destinations (small tensors packed
//!   together) is read with O_DIRECT into a page-aligned scratch buffer,
//!   not through the page cache, and still verified.
//!
//! Stores live under the build's temporary directory (a real disk, where
//! O_DIRECT works) or, for the simulated disk, on tmpfs.

use cairn::testing::SimDisk;
use cairn::{DType, Error, ErrorKind, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Named byte tensors.
struct State(Vec<(String, Vec<u8>)>);

impl State {
    fn new(seed: u64, sizes: &[usize]) -> Self {
        let mut r = Rng(seed);
        State(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| (format!("t{i:02}"), r.bytes(n)))
                .collect(),
        )
    }

    fn view(&self) -> SaveState<'_> {
        let mut s = SaveState::new();
        for (name, data) in &self.0 {
            s = s.tensor(name.clone(), DType::U8, &[data.len() as u64], data);
        }
        s
    }

    fn assert_restores(&self, store: &Store, run: &str, step: u64, what: &str) {
        let got = store
            .restore(run, StepSel::Step(step), &TensorFilter::All)
            .unwrap_or_else(|e| panic!("{what}: {run}/{step} does not restore: {e}"));
        assert_eq!(got.tensors.len(), self.0.len(), "{what}");
        for (name, data) in &self.0 {
            let t = got
                .tensor(name)
                .unwrap_or_else(|| panic!("{what}: {name} missing"));
            assert!(t.data == *data, "{what}: bytes of {name} differ");
        }
    }
}

/// A fresh directory on the build's disk (not tmpfs: O_DIRECT needs a
/// real file system).
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory")
}

/// Every chunk file under `root/chunks`.
fn chunk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root.join("chunks")).unwrap().flatten() {
        if d.path().is_dir() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// Files left in the store's `tmp/`.
fn tmp_files(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Pages of `path` resident in the page cache, and its pages in all.
fn resident_pages(path: &Path) -> (usize, usize) {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    // SAFETY: a read-only shared mapping of an open file, unmapped below;
    // no page of it is dereferenced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap {}", path.display());
    let mut vec = vec![0u8; pages];
    // SAFETY: p maps len bytes; vec has one byte per page.
    let rc = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: p and len are what mmap returned and mapped.
    unsafe { libc::munmap(p, len) };
    assert_eq!(rc, 0, "mincore {}", path.display());
    (vec.iter().filter(|&&b| b & 1 == 1).count(), pages)
}

/// Drop `path`'s clean pages from the page cache.
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

fn direct_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 4 << 20,
        staging_bytes: 64 << 20,
        direct_io: true,
        ..StoreOptions::default()
    }
}

/// Eight small tensors (under the 1 MiB from which entries get chunks of
/// their own) packed into one 4 MiB chunk, the last one ending inside a
/// block (so the chunk has a buffered tail).
fn packed_state() -> State {
    let mut sizes = vec![512 << 10; 7];
    sizes.push((512 << 10) - 1000);
    State::new(7, &sizes)
}

#[test]
fn packed_chunks_are_restored_with_direct_reads() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), direct_opts()).unwrap();
    let s = packed_state();
    store.save("p", 1, &s.view()).unwrap().wait().unwrap();
    let files = chunk_files(dir.path());
    assert_eq!(files.len(), 1, "the eight tensors share one chunk");
    let chunk = &files[0];
    evict(chunk);
    let (before, pages) = resident_pages(chunk);
    assert!(
        before * 8 < pages,
        "eviction left {before} of {pages} pages"
    );

    // Into new buffers, and into caller buffers at odd addresses.
    s.assert_restores(&store, "p", 1, "restore");
    let mut backing: Vec<Vec<u8>> = s.0.iter().map(|(_, d)| vec![0u8; d.len() + 1]).collect();
    let mut targets: Vec<(&str, &mut [u8])> =
        s.0.iter()
            .zip(backing.iter_mut())
            .map(|((n, _), b)| (n.as_str(), &mut b[1..]))
            .collect();
    store
        .restore_into("p", StepSel::Step(1), &mut targets)
        .unwrap();
    for ((name, want), (_, got)) in s.0.iter().zip(targets.iter()) {
        assert!(got[..] == want[..], "restore_into: bytes of {name} differ");
    }

    // The payload bypassed the page cache: only the header's block and
    // the tail (with what readahead brings around them) were cached.
    let (after, _) = resident_pages(chunk);
    assert!(
        after * 4 < pages,
        "{after} of the chunk's {pages} pages are in the page cache after restore: \
         the packed chunk was read through it"
    );
}

#[test]
fn a_flipped_bit_in_a_packed_chunk_is_caught_on_the_direct_path() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), direct_opts()).unwrap();
    let s = packed_state();
    store.save("p", 1, &s.view()).unwrap().wait().unwrap();
    let chunk = chunk_files(dir.path()).remove(0);
    let mut b = std::fs::read(&chunk).unwrap();
    // Inside the payload's O_DIRECT bulk.
    let at = b.len() - (2 << 20);
    b[at] ^= 0x10;
    std::fs::write(&chunk, &b).unwrap();
    evict(&chunk);
    let e = store
        .restore("p", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    match &e {
        Error::CorruptChunk {
            path,
            reason,
            tensors,
            ..
        } => {
            assert_eq!(path, &chunk);
            assert!(reason.contains("hash"), "{reason}");
            for (name, _) in &s.0 {
                assert!(tensors.contains(name), "{name} not named in {tensors:?}");
            }
        }
        other => panic!("expected a corrupt chunk, got {other:?}"),
    }
}

/// Many chunks, one I/O thread: its queue is always full, so it writes
/// whole batches before syncing them.
fn batch_opts(direct_io: bool) -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        workers: 2,
        sync_threads: 1,
        read_threads: 2,
        direct_io,
        ..StoreOptions::default()
    }
}

/// 40 distinct 64 KiB chunks, and one tensor that ends inside a block.
fn many_chunks(seed: u64) -> State {
    let mut sizes = vec![64 << 10; 39];
    sizes.push((64 << 10) - 333);
    State::new(seed, &sizes)
}

#[test]
fn batched_syncs_commit_every_chunk_written() {
    for direct_io in [true, false] {
        let what = if direct_io { "O_DIRECT" } else { "buffered" };
        let dir = disk_dir();
        let store = Store::open(dir.path(), batch_opts(direct_io)).unwrap();
        for step in 1..=3u64 {
            let s = many_chunks(step);
            let r = store.save("b", step, &s.view()).unwrap().wait().unwrap();
            assert_eq!(r.chunks_written, 40, "{what}: step {step}");
            assert!(
                tmp_files(dir.path()).is_empty(),
                "{what}: temporary files left after step {step}: {:?}",
                tmp_files(dir.path())
            );
        }
        assert_eq!(chunk_files(dir.path()).len(), 120, "{what}");
        let report = store.verify(None, None).unwrap();
        assert!(report.ok(), "{what}: {:?}", report.problems);
        drop(store);
        let store = Store::open(dir.path(), batch_opts(direct_io)).unwrap();
        for step in 1..=3u64 {
            many_chunks(step).assert_restores(&store, "b", step, what);
        }
    }
}

/// A fresh empty directory for one simulated disk, on tmpfs if there is one.
fn sim_scratch() -> (tempfile::TempDir, PathBuf) {
    let base = Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir(&root).unwrap();
    (dir, root)
}

fn sim_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 4096,
        staging_bytes: 256 << 10,
        workers: 1,
        sync_threads: 1,
        read_threads: 1,
        direct_io: false,
        ..StoreOptions::default()
    }
}

/// Twelve distinct 4 KiB chunks.
fn sim_state(seed: u64) -> State {
    State::new(seed, &[4096; 12])
}

#[test]
fn a_failed_fdatasync_inside_a_batch_fails_the_save() {
    // Each save syncs its 12 chunk files, then directories and the
    // manifest; fail each of the first chunk syncs in turn, so the
    // failure falls first, inside and last in a batch.
    for after in 0..12u64 {
        let (_dir, root) = sim_scratch();
        let disk = SimDisk::new(&root).unwrap();
        let store = Store::open_with_fs(&root, sim_opts(), disk.clone()).unwrap();
        let s = sim_state(after);
        disk.fail_sync_after(after, libc::EIO);
        let res = store.save("f", 1, &s.view()).and_then(|h| h.wait());
        assert!(disk.clear_sync_fault(), "sync fault {after} never fired");
        let e = res.expect_err("a save whose chunk fsync failed committed");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "fault {after}: {e}");
        assert!(
            matches!(&e, Error::Io { op, .. } if op.contains("fsync")),
            "fault {after}: {e:?}"
        );
        assert!(
            store.steps("f").unwrap_or_default().is_empty(),
            "fault {after}: the failed save is listed"
        );
        // The same save again succeeds, and survives a power cut.
        store.save("f", 1, &s.view()).unwrap().wait().unwrap();
        drop(store);
        disk.power_loss().unwrap();
        let store = Store::open_with_fs(&root, sim_opts(), disk.clone()).unwrap();
        s.assert_restores(&store, "f", 1, &format!("fault {after}"));
    }
}

#[test]
fn power_loss_at_every_operation_of_a_batched_save() {
    let first = sim_state(1);
    let second = sim_state(2);
    let run = |disk: &Arc<SimDisk>, root: &Path| -> (bool, bool) {
        let Ok(store) = Store::open_with_fs(root, sim_opts(), disk.clone()) else {
            return (false, false);
        };
        let one = store
            .save("w", 1, &first.view())
            .and_then(|h| h.wait())
            .is_ok();
        let two = one
            && store
                .save("w", 2, &second.view())
                .and_then(|h| h.wait())
                .is_ok();
        (one, two)
    };
    let total = {
        let (_dir, root) = sim_scratch();
        let disk = SimDisk::new(&root).unwrap();
        assert_eq!(run(&disk, &root), (true, true));
        disk.ops()
    };
    assert!(total > 50, "only {total} operations");
    for n in 0..=total {
        let what = format!("power cut at operation {n} of {total}");
        let (_dir, root) = sim_scratch();
        let disk = SimDisk::new(&root).unwrap();
        disk.crash_at(n);
        let (one, two) = run(&disk, &root);
        disk.power_loss().unwrap();
        let Ok(store) = Store::open_with_fs(&root, sim_opts(), disk.clone()) else {
            assert!(!one, "{what}: a committed store does not reopen");
            continue;
        };
        let steps = store.steps("w").unwrap_or_default();
        if one {
            assert!(steps.contains(&1), "{what}: committed step 1 not listed");
        }
        if two {
            assert!(steps.contains(&2), "{what}: committed step 2 not listed");
        }
        // Every chunk file at its final name is complete, whether or not
        // its save committed.
        for f in chunk_files(&root) {
            let id: cairn::ChunkId = f.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let b = std::fs::read(&f).unwrap();
            assert!(b.len() >= 4096, "{what}: {} is torn", f.display());
            assert_eq!(
                cairn::ChunkId::of(&b[b.len() - 4096..]),
                id,
                "{what}: {} is not whole",
                f.display()
            );
        }
        for (step, s) in [(1, &first), (2, &second)] {
            if steps.contains(&step) {
                s.assert_restores(&store, "w", step, &what);
            }
        }
        let report = store.verify(None, None).unwrap();
        assert!(report.ok(), "{what}: {:?}", report.problems);
    }
}
