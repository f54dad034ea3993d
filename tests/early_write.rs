//! Early writes (`StoreOptions::early_write`, on by default): a raw chunk
//! likely to be new is written with O_DIRECT as soon as it is staged and
//! hashed afterwards. What a user relies on: every save restores bit-exact
//! whichever way its chunks went; an unchanged state is still deduplicated
//! (hashed first, nothing written); a chunk written early that turns out to
//! be stored already leaves no file behind and is reported as discarded; a
//! change that the position's sample misses is still saved; and a failed
//! early write falls back to the usual path.
//!
//! Stores live under the build's temporary directory, a real disk where
//! O_DIRECT works.

use cairn::testing::failpoints;
use cairn::{
    DType, LeasedTensor, NextLease, SaveReport, SaveState, StepSel, Store, StoreOptions,
    TensorFilter,
};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Fail points are process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|p| p.into_inner());
    failpoints::reset();
    g
}

/// A fresh directory on the build's disk (not tmpfs: O_DIRECT needs a
/// real file system).
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory")
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

/// Named byte tensors: `n` of 1.5 MiB (two chunks each), from `seed`.
#[derive(Clone)]
struct State(Vec<(String, Vec<u8>)>);

impl State {
    fn new(seed: u64, n: usize) -> Self {
        let mut x = seed;
        State(
            (0..n)
                .map(|i| {
                    let data = (0..(3 << 19) / 8)
                        .flat_map(|_| {
                            x = x.wrapping_add(0x9E3779B97F4A7C15);
                            let mut z = x;
                            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                            (z ^ (z >> 31)).to_le_bytes()
                        })
                        .collect();
                    (format!("layers.{i}.weight"), data)
                })
                .collect(),
        )
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(|(_, d)| d.len() as u64).sum()
    }

    fn save(&self, store: &Store, run: &str, step: u64) -> SaveReport {
        let mut s = SaveState::new();
        for (name, data) in &self.0 {
            s = s.tensor(name.clone(), DType::U8, &[data.len() as u64], data);
        }
        store
            .save(run, step, &s)
            .unwrap_or_else(|e| panic!("save {run}/{step}: {e}"))
            .wait()
            .unwrap_or_else(|e| panic!("save {run}/{step} did not commit: {e}"))
    }

    /// Save through leases, as the Python binding does: the caller fills
    /// slices of the staging pool itself.
    fn save_leased(&self, store: &Store, run: &str, step: u64) -> SaveReport {
        let specs = self
            .0
            .iter()
            .map(|(name, data)| LeasedTensor {
                name: name.clone(),
                dtype: DType::U8,
                shape: vec![data.len() as u64],
                shard: None,
            })
            .collect();
        let mut save = store
            .lease_save(run, step, specs, &SaveState::new())
            .unwrap_or_else(|e| panic!("lease save {run}/{step}: {e}"));
        loop {
            match save.lease(true).unwrap() {
                NextLease::Done => break,
                NextLease::Full => panic!("a waiting lease reported a full pool"),
                NextLease::Lease(mut l) => {
                    let segs = l.segments().to_vec();
                    let buf = l.as_mut_slice();
                    for g in segs {
                        let src = &self.0[g.tensor].1[g.tensor_offset as usize..][..g.len as usize];
                        buf[g.lease_offset as usize..][..g.len as usize].copy_from_slice(src);
                    }
                    save.submit(l).unwrap();
                }
            }
        }
        save.finish()
            .unwrap()
            .wait()
            .unwrap_or_else(|e| panic!("lease save {run}/{step} did not commit: {e}"))
    }

    fn assert_restores(&self, store: &Store, run: &str, step: u64) {
        let got = store
            .restore(run, StepSel::Step(step), &TensorFilter::All)
            .unwrap_or_else(|e| panic!("{run}/{step} does not restore: {e}"));
        assert_eq!(got.tensors.len(), self.0.len());
        for (name, data) in &self.0 {
            let t = got.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(t.data == *data, "bytes of {name} in step {step} differ");
        }
    }
}

/// Everything left in `root/tmp`.
fn tmp_files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Chunk files at their final names.
fn chunk_files(root: &Path) -> usize {
    let mut n = 0;
    for d in std::fs::read_dir(root.join("chunks")).unwrap().flatten() {
        if d.path().is_dir() {
            n += std::fs::read_dir(d.path()).unwrap().count();
        }
    }
    n
}

#[test]
fn an_unchanged_state_is_hashed_first_and_writes_nothing() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let a = State::new(1, 4);
    let first = a.save(&store, "job", 1);
    assert_eq!(first.bytes_written_uncompressed, a.bytes());
    assert_eq!(first.bytes_discarded, 0);
    let again = a.save(&store, "job", 2);
    assert_eq!(
        (again.bytes_written, again.bytes_discarded),
        (0, 0),
        "an unchanged state was written again"
    );
    assert_eq!(again.bytes_deduped, a.bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    a.assert_restores(&store, "job", 1);
    a.assert_restores(&store, "job", 2);
}

#[test]
fn a_chunk_written_early_that_is_stored_already_leaves_no_file() {
    let _g = serial();
    let dir = disk_dir();
    let (a, b) = (State::new(2, 4), State::new(3, 4));
    {
        let store = Store::open(dir.path(), opts(true)).unwrap();
        a.save(&store, "job", 1);
        b.save(&store, "job", 2);
        // Every position held B's bytes last: A's chunks look new, are
        // written early, and are found stored once hashed.
        let back = a.save(&store, "job", 3);
        assert_eq!(back.bytes_written, 0);
        assert_eq!(back.bytes_deduped, a.bytes());
        assert_eq!(back.bytes_discarded, a.bytes());
        assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
        assert_eq!(chunk_files(dir.path()), 16);
        a.assert_restores(&store, "job", 3);
    }
    // A store opened anew has no memory of positions: the same happens.
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let reopened = b.save(&store, "job", 4);
    assert_eq!(reopened.bytes_written, 0);
    assert_eq!(reopened.bytes_discarded, b.bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    for (state, step) in [(&a, 1), (&b, 2), (&a, 3), (&b, 4)] {
        state.assert_restores(&store, "job", step);
    }
    let report = store.verify(Some("job"), Some(4)).unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn with_early_writes_off_every_chunk_is_hashed_first() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(false)).unwrap();
    let (a, b) = (State::new(4, 3), State::new(5, 3));
    let first = a.save(&store, "job", 1);
    assert_eq!(first.bytes_written_uncompressed, a.bytes());
    b.save(&store, "job", 2);
    let back = a.save(&store, "job", 3);
    assert_eq!((back.bytes_written, back.bytes_discarded), (0, 0));
    a.assert_restores(&store, "job", 3);
}

#[test]
fn a_change_the_sample_misses_is_still_saved() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let a = State::new(6, 2);
    a.save(&store, "job", 1);
    // One byte inside the first chunk of the first tensor, away from the
    // sampled windows (at 1/7 of a 1 MiB chunk plus 2 KiB): its position
    // looks unchanged, so it is hashed first, found new and written.
    let mut changed = a.clone();
    let at = (1 << 20) / 7 + 2048;
    changed.0[0].1[at] ^= 0x5A;
    let rep = changed.save(&store, "job", 2);
    assert_eq!(rep.bytes_written_uncompressed, 1 << 20);
    assert_eq!(rep.bytes_discarded, 0);
    changed.assert_restores(&store, "job", 2);
    a.assert_restores(&store, "job", 1);
}

#[test]
fn a_failed_early_write_falls_back_to_the_usual_path() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    failpoints::set("chunk.early_write", || {
        Some(std::io::Error::from_raw_os_error(libc::EIO))
    });
    let a = State::new(7, 3);
    let rep = a.save(&store, "job", 1);
    let hits = failpoints::hits("chunk.early_write");
    failpoints::reset();
    assert_eq!(hits, 6, "not every chunk was tried early");
    assert_eq!(rep.bytes_written_uncompressed, a.bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    a.assert_restores(&store, "job", 1);
}

#[test]
fn leased_saves_write_early_too_and_dedup_the_same() {
    let _g = serial();
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts(true)).unwrap();
    let (a, b) = (State::new(8, 3), State::new(9, 3));
    let first = a.save_leased(&store, "job", 1);
    assert_eq!(first.bytes_written_uncompressed, a.bytes());
    // Unchanged: hashed first, nothing written or discarded.
    let again = a.save_leased(&store, "job", 2);
    assert_eq!((again.bytes_written, again.bytes_discarded), (0, 0));
    b.save_leased(&store, "job", 3);
    // The positions held B's bytes: A's chunks are written early, found
    // stored, and removed. A leased and an ordinary save share positions.
    let back = a.save_leased(&store, "job", 4);
    assert_eq!(back.bytes_written, 0);
    assert_eq!(back.bytes_discarded, a.bytes());
    let plain = b.save(&store, "job", 5);
    assert_eq!(plain.bytes_discarded, b.bytes());
    assert_eq!(tmp_files(dir.path()), Vec::<PathBuf>::new());
    for (state, step) in [(&a, 1), (&a, 2), (&b, 3), (&a, 4), (&b, 5)] {
        state.assert_restores(&store, "job", step);
    }
}
