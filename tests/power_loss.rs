//! Power loss, not just SIGKILL: a store runs on a simulated disk
//! (`cairn::testing::SimDisk`) that, at a crash point, loses every write,
//! rename, link, removal and directory entry not made durable by an fsync
//! of the file or its directory. For fixed sequences of saves, deletes and
//! collections (a fixed seed), the test crashes at every I/O operation in
//! turn, cuts the power, reopens the store and checks that
//! - every listed checkpoint restores bit-exact (no torn step is visible),
//!   before and after a collection on the recovered store;
//! - every checkpoint whose save returned before the crash point, and was
//!   not being deleted, is listed (the last one committed included); none
//!   whose delete returned is;
//! - a new save succeeds, and survives a second power loss.
//!
//! It catches a missing fsync. Planted bug: the fsync of the chunk fan-out
//! directories before the manifest is published removed (the loop over
//! `touched_prefixes` in `save::pipeline::commit`). A committed checkpoint
//! whose chunk renames were lost is then listed and fails to restore ("does
//! not restore: corrupt chunk ... missing from the store"), already at the
//! power cut after the uncrashed sequence. Removing the directory fsync
//! after the manifest's hard link (`local::durable::publish_new_on`) fails
//! it too ("committed but not listed").

use cairn::testing::SimDisk;
use cairn::{DType, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sequences: one per seed.
const SEEDS: [u64; 5] = [0x5eed, 0xc0ffee, 0xbadc0de, 0xfeed, 0xdecade];
/// Operations per sequence.
const OPS: usize = 11;

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

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
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

/// The state saved as `(run, step)`: a tensor shared by every step (its
/// chunks are deduplicated), one of 1 to 3 chunks of its own, and a blob.
struct State {
    tensors: Vec<(String, Vec<u64>, Vec<u8>)>,
    blob: Vec<u8>,
}

fn content(run: &str, step: u64) -> State {
    let shared = Rng(7).bytes(2 * 4096);
    let mut r = Rng(step.wrapping_mul(1_000_003) ^ run.len() as u64 ^ 0xabc);
    let own = 4 * (1 + r.below(3 * 1024)) as usize;
    let own_bytes = r.bytes(own);
    let blob_len = 1 + r.below(200) as usize;
    State {
        tensors: vec![
            ("shared".into(), vec![2 * 1024], shared),
            ("own".into(), vec![own as u64 / 4], own_bytes),
        ],
        blob: r.bytes(blob_len),
    }
}

impl State {
    fn view(&self) -> SaveState<'_> {
        let mut s = SaveState::new();
        for (n, shape, d) in &self.tensors {
            s = s.tensor(n.clone(), DType::F32, shape, d);
        }
        s.blob("rng", &self.blob)
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 4096,
        staging_bytes: 64 << 10,
        workers: 1,
        sync_threads: 1,
        read_threads: 1,
        direct_io: false,
        ..StoreOptions::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Save(&'static str, u64),
    Delete(&'static str, u64),
    Gc,
}

/// A sequence of saves (two runs, rising steps), deletes of committed
/// checkpoints and collections.
fn sequence(seed: u64) -> Vec<Op> {
    let mut r = Rng(seed);
    let mut next = [1u64, 1];
    let mut live: Vec<(&'static str, u64)> = Vec::new();
    let mut ops = Vec::new();
    while ops.len() < OPS {
        match r.below(10) {
            0..=5 => {
                let i = r.below(2) as usize;
                let run = ["a", "b"][i];
                ops.push(Op::Save(run, next[i]));
                live.push((run, next[i]));
                next[i] += 1 + r.below(2);
            }
            6 | 7 if !live.is_empty() => {
                let (run, step) = live.remove(r.below(live.len() as u64) as usize);
                ops.push(Op::Delete(run, step));
            }
            8 | 9 => ops.push(Op::Gc),
            _ => {}
        }
    }
    ops
}

type Key = (String, u64);

/// What replaying up to the crash established.
struct Outcome {
    /// Saves that returned and whose delete had not started.
    must: BTreeSet<Key>,
    /// Everything that may be listed: `must`, and saves or deletes that
    /// were in flight at the crash.
    may: BTreeSet<Key>,
    /// The checkpoint committed last before the crash.
    last: Option<Key>,
}

fn replay(root: &Path, disk: &Arc<SimDisk>, ops: &[Op]) -> Outcome {
    let mut out = Outcome {
        must: BTreeSet::new(),
        may: BTreeSet::new(),
        last: None,
    };
    let Ok(store) = Store::open_with_fs(root, opts(), disk.clone()) else {
        return out;
    };
    for op in ops {
        match op {
            Op::Save(run, step) => {
                let key = (run.to_string(), *step);
                out.may.insert(key.clone());
                let s = content(run, *step);
                let res = store
                    .save(run, *step, &s.view())
                    .and_then(|h| h.wait().map(|_| ()));
                if res.is_err() {
                    break;
                }
                out.must.insert(key.clone());
                out.last = Some(key);
            }
            Op::Delete(run, step) => {
                let key = (run.to_string(), *step);
                out.must.remove(&key);
                if store.delete(run, *step).is_err() {
                    break;
                }
                out.may.remove(&key);
            }
            Op::Gc => {
                if store.gc(Duration::ZERO, false).is_err() {
                    break;
                }
            }
        }
    }
    out
}

fn listed(store: &Store) -> BTreeSet<Key> {
    let mut out = BTreeSet::new();
    for run in store.runs().expect("list runs") {
        for step in store.steps(&run).expect("list steps") {
            out.insert((run.clone(), step));
        }
    }
    out
}

fn assert_restores(store: &Store, run: &str, step: u64, what: &str) {
    let want = content(run, step);
    let got = store
        .restore(run, StepSel::Step(step), &TensorFilter::All)
        .unwrap_or_else(|e| panic!("{what}: listed run {run} step {step} does not restore: {e}"));
    assert_eq!(
        got.tensors.len(),
        want.tensors.len(),
        "{what}: {run}/{step}"
    );
    for (g, (name, shape, data)) in got.tensors.iter().zip(&want.tensors) {
        assert_eq!(&g.name, name, "{what}: {run}/{step}");
        assert_eq!(&g.shape, shape, "{what}: {run}/{step}");
        assert!(
            g.data == *data,
            "{what}: bytes of {run}/{step} {name} differ"
        );
    }
    assert_eq!(
        got.blob("rng"),
        Some(&want.blob[..]),
        "{what}: {run}/{step} blob"
    );
}

/// Cut the power, reopen, and check every invariant.
fn check_after_power_loss(root: &Path, disk: &Arc<SimDisk>, out: &Outcome, what: &str) {
    disk.power_loss().expect("power loss");
    let store = Store::open_with_fs(root, opts(), disk.clone())
        .unwrap_or_else(|e| panic!("{what}: reopening after power loss: {e}"));
    let seen = listed(&store);
    if let Some(last) = &out.last {
        if out.must.contains(last) {
            assert!(
                seen.contains(last),
                "{what}: last committed {last:?} not listed"
            );
        }
    }
    let missing: Vec<_> = out.must.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{what}: committed but not listed: {missing:?}"
    );
    let extra: Vec<_> = seen.difference(&out.may).collect();
    assert!(
        extra.is_empty(),
        "{what}: listed but never committed or deleted: {extra:?}"
    );
    for (run, step) in &seen {
        assert_restores(&store, run, *step, what);
    }
    store
        .gc(Duration::ZERO, false)
        .unwrap_or_else(|e| panic!("{what}: gc after power loss: {e}"));
    for (run, step) in &seen {
        assert_restores(&store, run, *step, &format!("{what}, after gc"));
    }
    let s = content("after", 1);
    store
        .save("after", 1, &s.view())
        .and_then(|h| h.wait())
        .unwrap_or_else(|e| panic!("{what}: a new save after power loss: {e}"));
    assert_restores(&store, "after", 1, what);
    drop(store);
    disk.power_loss().expect("second power loss");
    let store = Store::open_with_fs(root, opts(), disk.clone())
        .unwrap_or_else(|e| panic!("{what}: reopening after the second power loss: {e}"));
    assert_restores(&store, "after", 1, &format!("{what}, second power loss"));
    for (run, step) in &seen {
        assert_restores(&store, run, *step, &format!("{what}, second power loss"));
    }
}

/// A fresh empty directory for one simulated disk, on tmpfs if there is one.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let base = Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");
    let root = dir.path().join("store");
    std::fs::create_dir(&root).expect("store directory");
    (dir, root)
}

#[test]
fn crash_at_every_io_operation() {
    let t0 = Instant::now();
    let mut points = 0u64;
    for seed in SEEDS {
        let ops = sequence(seed);
        // The whole sequence without a crash: how many operations it does.
        let (_dir, root) = scratch();
        let disk = SimDisk::new(&root).unwrap();
        let full = replay(&root, &disk, &ops);
        let total = disk.ops();
        assert!(!disk.crashed());
        let saves = ops.iter().filter(|o| matches!(o, Op::Save(..))).count();
        let deletes = ops.iter().filter(|o| matches!(o, Op::Delete(..))).count();
        assert_eq!(full.must.len(), saves - deletes, "seed {seed:#x}: {ops:?}");
        check_after_power_loss(&root, &disk, &full, &format!("seed {seed:#x}, no crash"));
        for n in 0..total {
            let (_dir, root) = scratch();
            let disk = SimDisk::new(&root).unwrap();
            disk.crash_at(n);
            let out = replay(&root, &disk, &ops);
            assert!(
                disk.crashed(),
                "seed {seed:#x}: crash point {n} not reached"
            );
            let what = format!("seed {seed:#x}, crash at operation {n} of {total} ({ops:?})");
            check_after_power_loss(&root, &disk, &out, &what);
            points += 1;
        }
        println!("seed {seed:#x}: {total} crash points, {ops:?}");
    }
    println!(
        "power loss: {points} crash points over {} sequences in {:.1?}",
        SEEDS.len(),
        t0.elapsed()
    );
    assert!(points >= 2000, "only {points} crash points");
}

/// A state of `n` chunks of random bytes.
fn wide(n: usize) -> Vec<u8> {
    Rng(0x003d_d1e5).bytes(n * 4096)
}

/// A save whose chunks fill more fan-out directories than the commit
/// syncs one by one: their names are made durable by one sync of the
/// file system. Crashing at every operation of that save, then cutting
/// the power, a checkpoint is listed only if it restores bit-exact, and
/// is listed if its save returned. Planted bug: the commit's
/// `sync_filesystem` call skipped (`sync_chunk_names` returning `Ok`
/// instead) fails it ("did not sync the file system"; without that check,
/// at the crash after the whole save: "listed but does not restore ...
/// missing from the store").
#[test]
fn crash_during_a_save_whose_chunk_names_sync_as_one() {
    let data = wide(48);
    let save = |store: &Store| {
        let s = SaveState::new().tensor("wide", DType::U8, &[data.len() as u64], &data);
        store.save("wide", 1, &s).and_then(|h| h.wait())
    };
    // Whatever the machine's dirty page cache, which otherwise decides.
    let opts = || StoreOptions {
        batch_sync_max_dirty: u64::MAX,
        ..opts()
    };
    let (_dir, root) = scratch();
    let disk = SimDisk::new(&root).unwrap();
    let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    let (start, syncs) = (disk.ops(), disk.filesystem_syncs());
    save(&store).expect("save without a crash");
    let total = disk.ops() - start;
    assert!(
        disk.filesystem_syncs() > syncs,
        "the commit of a 48-chunk save did not sync the file system"
    );
    drop(store);
    for point in 0..=total {
        let (_dir, root) = scratch();
        let disk = SimDisk::new(&root).unwrap();
        let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
        disk.crash_at(disk.ops() + point);
        let returned = save(&store).is_ok();
        drop(store);
        disk.power_loss().expect("power loss");
        let store = Store::open_with_fs(&root, opts(), disk.clone())
            .unwrap_or_else(|e| panic!("crash at {point}: reopening: {e}"));
        let listed = store.steps("wide").unwrap_or_default().contains(&1);
        assert!(
            listed || !returned,
            "crash at {point}: the save returned but is not listed"
        );
        if listed {
            let got = store
                .restore("wide", StepSel::Step(1), &TensorFilter::All)
                .unwrap_or_else(|e| panic!("crash at {point}: listed but does not restore: {e}"));
            assert!(
                got.tensors[0].data == data,
                "crash at {point}: restored bytes differ"
            );
        }
    }
}
