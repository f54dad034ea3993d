//! I/O errors under a local store, injected through the simulated disk
//! (`cairn::testing::SimDisk`):
//! - disk full (`ENOSPC`) during a save, at every point of its writes, and
//!   a failed fsync at every fsync of a save: a clear error naming the
//!   file, earlier checkpoints intact, no partial step listed, the staging
//!   pool fully released, no temporary file left, and the next save
//!   succeeds once space returns (and survives a power loss);
//! - `EIO` reading a local chunk: a restore repairs it from the attached
//!   remote (a `file://` one, or the S3 server when `CAIRN_TEST_S3_ENDPOINT`
//!   is set), and without a remote the error names the chunk;
//! - an old entry of `tmp/` that cannot be removed (`EACCES`): gc names it
//!   and goes on.

use cairn::testing::SimDisk;
use cairn::{
    DType, Error, ErrorKind, RemoteOptions, RemoteStore, SaveState, StepSel, Store, StoreOptions,
    TensorFilter,
};
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

/// Four tensors of 40 KiB (ten 4 KiB chunks each) and a blob.
struct State {
    tensors: Vec<(String, Vec<u8>)>,
    blob: Vec<u8>,
}

fn state(step: u64) -> State {
    let mut r = Rng(step * 31 + 5);
    State {
        tensors: (0..4)
            .map(|i| (format!("layers.{i}.weight"), r.bytes(40 << 10)))
            .collect(),
        blob: r.bytes(300),
    }
}

impl State {
    fn view(&self) -> SaveState<'_> {
        let mut s = SaveState::new();
        for (n, d) in &self.tensors {
            s = s.tensor(n.clone(), DType::U8, &[d.len() as u64], d);
        }
        s.blob("rng", &self.blob)
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 4096,
        staging_bytes: 64 << 10,
        direct_io: false,
        ..StoreOptions::default()
    }
}

fn assert_restores(store: &Store, run: &str, step: u64) -> cairn::Restored {
    let want = state(step);
    let got = store
        .restore(run, StepSel::Step(step), &TensorFilter::All)
        .unwrap_or_else(|e| panic!("run {run} step {step} does not restore: {e}"));
    assert_eq!(got.tensors.len(), want.tensors.len());
    for (g, (name, data)) in got.tensors.iter().zip(&want.tensors) {
        assert_eq!(&g.name, name);
        assert!(g.data == *data, "bytes of {run}/{step} {name} differ");
    }
    assert_eq!(got.blob("rng"), Some(&want.blob[..]));
    got
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path().join("store");
    std::fs::create_dir(&root).expect("store directory");
    (dir, root)
}

fn tmp_files(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn disk_full_during_a_save_fails_cleanly_and_the_next_save_succeeds() {
    let (_dir, root) = scratch();
    let disk = SimDisk::new(&root).unwrap();
    let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    store
        .save("r", 1, &state(1).view())
        .unwrap()
        .wait()
        .unwrap();
    let pool = store.staging_pool().unwrap();

    // Run out of space after 0, 1000, 2000, ... bytes of step 2's writes, so
    // that every chunk write and the manifest's in turn hits ENOSPC. Chunks
    // an earlier failed attempt stored are reused by the next one.
    let mut failures = 0;
    let mut budget = 0u64;
    loop {
        disk.set_space_left(Some(budget));
        let res = store.save("r", 2, &state(2).view()).and_then(|h| h.wait());
        disk.set_space_left(None);
        let Err(e) = res else { break };
        failures += 1;
        match &e {
            Error::Io { path, source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{e}");
                assert!(path.starts_with(&root), "{e} names {}", path.display());
            }
            other => panic!("disk full: expected an I/O error, got {other:?}"),
        }
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("No space left on device"), "{e}");
        assert_eq!(store.steps("r").unwrap(), vec![1], "after: {e}");
        assert!(store
            .restore("r", StepSel::Step(2), &TensorFilter::All)
            .is_err());
        assert_restores(&store, "r", 1);
        assert_eq!(released(|| pool.in_use()), 0, "staging held after: {e}");
        assert!(pool.high_water() <= pool.capacity());
        assert_eq!(tmp_files(&root), Vec::<PathBuf>::new(), "after: {e}");
        budget += 1000;
        assert!(budget < 1 << 20, "the save never succeeded");
    }
    println!("disk full: {failures} failed attempts before space sufficed ({budget} bytes)");
    assert!(failures >= 10, "only {failures} failed attempts");
    assert_eq!(store.steps("r").unwrap(), vec![1, 2]);
    assert_restores(&store, "r", 1);
    assert_restores(&store, "r", 2);
    store
        .save("r", 3, &state(3).view())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(pool.in_use(), 0);

    // What the failed attempts left (chunks reused by the successful
    // save) was made durable by it.
    drop(store);
    disk.power_loss().unwrap();
    let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    assert_eq!(store.steps("r").unwrap(), vec![1, 2, 3]);
    for step in 1..=3 {
        assert_restores(&store, "r", step);
    }
}

#[test]
fn a_failed_fsync_during_a_save_fails_cleanly_at_every_point() {
    // The commit syncs step 2's ~37 fan-out directories one by one
    // (`batch_sync_max_dirty` 0), then with one sync of the file system
    // (no limit), whatever the machine's dirty page cache.
    for max_dirty in [0, u64::MAX] {
        fsync_failures_at_every_point(StoreOptions {
            batch_sync_max_dirty: max_dirty,
            ..opts()
        });
    }
}

fn fsync_failures_at_every_point(opts: StoreOptions) {
    let opts = || opts.clone();
    let (_dir, root) = scratch();
    let disk = SimDisk::new(&root).unwrap();
    let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    store
        .save("r", 1, &state(1).view())
        .unwrap()
        .wait()
        .unwrap();
    let pool = store.staging_pool().unwrap();

    // Fail the first fsync of step 2's save, then the second, ...: chunk
    // files, fan-out directories, the step directory's parent, the
    // manifest's temporary file and its directory in turn.
    let mut failures = 0u64;
    loop {
        disk.fail_sync_after(failures, libc::ENOSPC);
        let res = store.save("r", 2, &state(2).view()).and_then(|h| h.wait());
        let fired = disk.clear_sync_fault();
        let Err(e) = res else {
            assert!(!fired, "the save succeeded over a failed fsync");
            break;
        };
        assert!(fired, "failed with no fault: {e}");
        failures += 1;
        match &e {
            Error::Io { path, source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{e}");
                assert!(path.starts_with(&root), "{e} names {}", path.display());
            }
            other => panic!("failed fsync: expected an I/O error, got {other:?}"),
        }
        assert_eq!(store.steps("r").unwrap(), vec![1], "after: {e}");
        assert_restores(&store, "r", 1);
        assert_eq!(released(|| pool.in_use()), 0, "staging held after: {e}");
        assert_eq!(tmp_files(&root), Vec::<PathBuf>::new(), "after: {e}");
        assert!(failures < 1000, "the save never succeeded");
    }
    println!("failed fsync: {failures} failed attempts before the save went through");
    assert!(failures >= 5, "only {failures} failed attempts");
    assert_eq!(store.steps("r").unwrap(), vec![1, 2]);
    assert_restores(&store, "r", 2);
    drop(store);
    disk.power_loss().unwrap();
    let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    assert_eq!(store.steps("r").unwrap(), vec![1, 2]);
    assert_restores(&store, "r", 1);
    assert_restores(&store, "r", 2);
}

/// The first chunk of `(run, step)`'s first tensor.
fn first_chunk(store: &Store, run: &str, step: u64) -> cairn::ChunkId {
    store.manifest(run, step).unwrap().tensors[0].chunks[0].id
}

fn eio_repaired_from(remote: RemoteStore) {
    let (_dir, root) = scratch();
    let disk = SimDisk::new(&root).unwrap();
    let mut store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    store.attach_remote(remote);
    store
        .save("r", 1, &state(1).view())
        .unwrap()
        .wait()
        .unwrap();
    store.upload("r", 1).unwrap();
    let id = first_chunk(&store, "r", 1);
    let path = store.chunk_path(&id);
    disk.fail_reads_of(&path);
    let r = assert_restores(&store, "r", 1);
    assert_eq!(r.report.repaired, 1, "one chunk fetched from the remote");
    // The repaired chunk was written back: a fresh file at the same name.
    disk.clear_read_failures();
    let again = assert_restores(&store, "r", 1);
    assert_eq!(again.report.repaired, 0);
}

#[test]
fn eio_reading_a_local_chunk_is_repaired_from_a_file_remote() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("bucket").display());
    eio_repaired_from(RemoteStore::open(&url, &[], RemoteOptions::default()).unwrap());
}

#[test]
fn eio_reading_a_local_chunk_is_repaired_from_s3() {
    let Ok(endpoint) = std::env::var("CAIRN_TEST_S3_ENDPOINT") else {
        eprintln!("CAIRN_TEST_S3_ENDPOINT not set; skipping");
        return;
    };
    let bucket = new_bucket(&endpoint, "io-errors-eio");
    let options: Vec<(String, String)> = [
        ("endpoint", endpoint.as_str()),
        ("allow_http", "true"),
        ("region", "us-east-1"),
        ("access_key_id", "cairn-test"),
        ("secret_access_key", "cairn-test-secret"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let url = format!("s3://{bucket}/ckpt");
    eio_repaired_from(RemoteStore::open(&url, &options, RemoteOptions::default()).unwrap());
}

/// Create a fresh bucket on the S3 server at `endpoint`.
fn new_bucket(endpoint: &str, tag: &str) -> String {
    use std::io::{Read, Write};
    let name = format!("cairn-{tag}-{}", std::process::id());
    let hostport = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to S3 server");
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {resp}"
    );
    name
}

#[test]
fn eio_reading_a_local_chunk_without_a_remote_names_the_chunk() {
    let (_dir, root) = scratch();
    let disk = SimDisk::new(&root).unwrap();
    let store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    store
        .save("r", 1, &state(1).view())
        .unwrap()
        .wait()
        .unwrap();
    let id = first_chunk(&store, "r", 1);
    disk.fail_reads_of(store.chunk_path(&id));
    let e = store
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap_err();
    assert!(
        e.to_string().contains(&id.to_hex()),
        "{e} does not name {id}"
    );
    match &e {
        Error::Io { source, path, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::EIO), "{e}");
            assert_eq!(path, &store.chunk_path(&id));
        }
        other => panic!("expected an I/O error naming the chunk, got {other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    // Nothing was changed: once the disk reads again, it restores.
    disk.clear_read_failures();
    assert_restores(&store, "r", 1);
}

/// Staging bytes still in use once a failed save's last in-flight buffers
/// are dropped. `wait` reports the first error while another pipeline job
/// of the same save may still hold its buffer for a moment; give it up to
/// five seconds.
fn released(in_use: impl Fn() -> usize) -> usize {
    let t = std::time::Instant::now();
    while in_use() != 0 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    in_use()
}

/// An entry of `tmp/` old enough to go whose removal fails (`EACCES`):
/// the collection removes the other old leftover, counts the one it could
/// not remove and names it, and every checkpoint still restores; once the
/// removal works again, the next collection takes it.
#[test]
fn gc_names_a_leftover_it_cannot_remove_and_goes_on() {
    let (_dir, root) = scratch();
    let disk = SimDisk::new(&root).unwrap();
    let mut store = Store::open_with_fs(&root, opts(), disk.clone()).unwrap();
    let clock = cairn::ManualClock::new();
    store.set_clock(std::sync::Arc::new(clock.clone()));
    store
        .save("r", 1, &state(1).view())
        .unwrap()
        .wait()
        .unwrap();
    let stuck = root.join("tmp").join("chunk.stuck.tmp");
    let other = root.join("tmp").join("chunk.other.tmp");
    std::fs::write(&stuck, b"half a chunk").unwrap();
    std::fs::write(&other, b"half a chunk").unwrap();
    disk.fail_removals_of(&stuck);
    clock.advance(cairn::TMP_MIN_AGE + std::time::Duration::from_secs(1));

    let g = store.gc(std::time::Duration::ZERO, false).unwrap();
    assert_eq!((g.leftovers_removed, g.leftovers_failed), (1, 1), "{g:?}");
    let why = g.leftover_failure.as_deref().unwrap_or_default();
    assert!(why.contains("chunk.stuck.tmp"), "{why:?} names no entry");
    assert!(why.contains("denied"), "{why:?} gives no reason");
    assert!(stuck.exists() && !other.exists());
    assert_restores(&store, "r", 1);

    disk.clear_removal_failures();
    let g = store.gc(std::time::Duration::ZERO, false).unwrap();
    assert_eq!((g.leftovers_removed, g.leftovers_failed), (1, 0), "{g:?}");
    assert_eq!(g.leftover_failure, None);
    assert!(!stuck.exists());
    assert_restores(&store, "r", 1);
}
