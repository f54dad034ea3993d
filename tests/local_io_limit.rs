//! The restore path runs toward the disk's read limit without giving up
//! verification: a chunk spread over several destinations (small tensors
//! packed together) is read with O_DIRECT into a page-aligned scratch
//! buffer, not through the page cache, and still verified.
//!
//! Stores live under the build's temporary directory, a real disk where
//! O_DIRECT works.

use cairn::{DType, Error, ErrorKind, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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

#[test]
fn tensors_restored_into_unaligned_buffers_bypass_the_page_cache() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), direct_opts()).unwrap();
    // Two tensors with chunks of their own: one a whole 4 MiB chunk, one
    // of two chunks, the second ending inside a block.
    let s = State::new(11, &[4 << 20, (6 << 20) - 1000]);
    store.save("u", 1, &s.view()).unwrap().wait().unwrap();
    let files = chunk_files(dir.path());
    assert_eq!(files.len(), 3, "each tensor's chunks are its own");
    for f in &files {
        evict(f);
    }

    // Caller buffers one byte past a page boundary (where a `Vec` from
    // the allocator usually starts too: a few bytes past one).
    let mut backing: Vec<Vec<u8>> = s.0.iter().map(|(_, d)| vec![0u8; d.len() + 4097]).collect();
    let mut targets: Vec<(&str, &mut [u8])> =
        s.0.iter()
            .zip(backing.iter_mut())
            .map(|((n, d), b)| {
                let skip = 4096 - (b.as_ptr() as usize % 4096) + 1;
                (n.as_str(), &mut b[skip..skip + d.len()])
            })
            .collect();
    for (_, t) in &targets {
        assert_ne!(t.as_ptr() as usize % 4096, 0, "the target is unaligned");
    }
    store
        .restore_into("u", StepSel::Step(1), &mut targets)
        .unwrap();
    for ((name, want), (_, got)) in s.0.iter().zip(targets.iter()) {
        assert!(got[..] == want[..], "restore_into: bytes of {name} differ");
    }

    // The payloads were read with O_DIRECT (into the read thread's
    // aligned buffer), not through the page cache.
    for f in &files {
        let (after, pages) = resident_pages(f);
        assert!(
            after * 4 < pages,
            "{after} of {pages} pages of {} are in the page cache after a restore \
             into unaligned buffers: it was read through it",
            f.display()
        );
    }
}

#[test]
fn a_flipped_bit_is_caught_on_a_restore_into_an_unaligned_buffer() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), direct_opts()).unwrap();
    let s = State::new(12, &[4 << 20]);
    store.save("u", 1, &s.view()).unwrap().wait().unwrap();
    let chunk = chunk_files(dir.path()).remove(0);
    let mut b = std::fs::read(&chunk).unwrap();
    let at = b.len() - (1 << 20);
    b[at] ^= 0x01;
    std::fs::write(&chunk, &b).unwrap();
    evict(&chunk);
    let mut backing = vec![0u8; (4 << 20) + 1];
    let mut targets: Vec<(&str, &mut [u8])> = vec![("t00", &mut backing[1..])];
    let e = store
        .restore_into("u", StepSel::Step(1), &mut targets)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    match &e {
        Error::CorruptChunk { path, tensors, .. } => {
            assert_eq!(path, &chunk);
            assert!(tensors.iter().any(|t| t == "t00"), "{tensors:?}");
        }
        other => panic!("expected a corrupt chunk, got {other:?}"),
    }
}
