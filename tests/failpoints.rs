//! Fail points at every commit edge: a save (raw and zstd) or a copy into a
//! local store stopped at each named point of its manifest publication,
//! with the simulated disk losing power right there; a copy to a remote
//! stopped before its manifest commit and just after the put; and the
//! flush daemon stopped between the remote manifest put and the local
//! upload marker. Each test asserts that its point was hit, then that the
//! outcome is the old state or the new one, never a mix.
//!
//! Planted bugs these tests catch (each seen failing, then removed):
//! - `write_tmp_synced_on` without its `sync_data`: a power cut after the
//!   directory fsync leaves an empty manifest published
//!   (`local_saves_stop_at_every_publish_point`, point
//!   `publish.after_dir_sync`);
//! - the save commit without its fsync of the touched chunk directories:
//!   the published manifest references chunks lost at the power cut;
//! - `Store::upload_to` writing the upload marker before the copy: the
//!   daemon stopped there leaves a marker for a checkpoint the remote lacks
//!   (`daemon_stopped_between_remote_commit_and_marker`).

use cairn::testing::{failpoints, SimDisk};
use cairn::{
    CodecChoice, DType, ErrorKind, RemoteOptions, RemoteStore, SaveState, StepSel, Store,
    StoreOptions, TensorFilter,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Fail points are process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|p| p.into_inner());
    failpoints::reset();
    g
}

const PUBLISH_POINTS: [&str; 5] = [
    "publish.before_tmp",
    "publish.after_tmp_sync",
    "publish.before_link",
    "publish.after_link",
    "publish.after_dir_sync",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
}

/// A training state: a few f32 tensors over several chunks, one shared
/// with every step (deduplicated), the rest different per step.
struct State {
    tensors: Vec<(String, Vec<u8>)>,
}

impl State {
    fn new(step: u64) -> State {
        let mut tensors = Vec::new();
        let shared: Vec<u8> = (0..150_000u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        tensors.push(("embed.weight".to_string(), shared));
        let mut r = Rng(step * 7919 + 1);
        for i in 0..4 {
            let n = 40_000 + (r.next() % 60_000) as usize;
            let data: Vec<u8> = (0..n).map(|_| (r.next() % 7) as u8).collect();
            tensors.push((format!("layers.{i}.weight"), data));
        }
        State { tensors }
    }

    fn view(&self) -> SaveState<'_> {
        let mut s = SaveState::new();
        for (n, d) in &self.tensors {
            s = s.tensor(n.clone(), DType::U8, &[d.len() as u64], d);
        }
        s.metadata(serde_json::json!({"k": 1}))
    }

    fn check(&self, r: &cairn::Restored, what: &str) {
        assert_eq!(r.tensors.len(), self.tensors.len(), "{what}");
        for (got, (name, data)) in r.tensors.iter().zip(&self.tensors) {
            assert_eq!(&got.name, name, "{what}");
            assert!(&got.data == data, "{what}: bytes of {name} differ");
        }
    }
}

fn opts(codec: CodecChoice) -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 1 << 20,
        codec,
        ..StoreOptions::default()
    }
}

/// Arm `point` to cut the disk's power there: the operation fails, as does
/// every later one. Returns the hit counter of this arming.
fn cut_power_at(point: &str, disk: &Arc<SimDisk>) -> Arc<AtomicU64> {
    let hits = Arc::new(AtomicU64::new(0));
    let (d, h) = (disk.clone(), hits.clone());
    let name = point.to_string();
    failpoints::set(point, move || {
        h.fetch_add(1, Ordering::SeqCst);
        d.crash_at(d.ops());
        Some(std::io::Error::other(format!("power cut at {name}")))
    });
    hits
}

/// After the power cut: step 1 restores, step 2 is absent (old state) or
/// restores whole (new state), and nothing else is listed; verify is clean.
/// Returns whether step 2 is there.
fn check_old_or_new(root: &Path, o: &StoreOptions, what: &str) -> bool {
    let store = Store::open(root, o.clone()).unwrap();
    let steps = store.steps("r").unwrap();
    let r1 = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap_or_else(|e| panic!("{what}: step 1 does not restore: {e}"));
    State::new(1).check(&r1, what);
    let new = match store.restore("r", StepSel::Step(2), &TensorFilter::All) {
        Ok(r2) => {
            State::new(2).check(&r2, what);
            true
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::NotFound, "{what}: step 2 is torn: {e}");
            false
        }
    };
    let want: Vec<u64> = if new { vec![1, 2] } else { vec![1] };
    assert_eq!(steps, want, "{what}: listed steps");
    let report = store.verify(None, None).unwrap();
    assert!(report.ok(), "{what}: {:?}", report.problems);
    if !new {
        // The old state is a usable store: the step saves again.
        let s2 = State::new(2);
        store.save("r", 2, &s2.view()).unwrap().wait().unwrap();
        let r2 = store
            .restore("r", StepSel::Step(2), &TensorFilter::All)
            .unwrap();
        s2.check(&r2, what);
    }
    new
}

/// A save, raw and zstd, whose power is cut at each point of its manifest
/// publication: before the point `publish.after_dir_sync` the step is
/// absent after the power loss, from it on the step restores whole.
#[test]
fn local_saves_stop_at_every_publish_point() {
    let _g = serial();
    for codec in [CodecChoice::Raw, CodecChoice::Zstd { level: 1 }] {
        for point in PUBLISH_POINTS {
            let what = format!("{codec:?} save, power cut at {point}");
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("disk");
            std::fs::create_dir(&root).unwrap();
            let disk = SimDisk::new(&root).unwrap();
            let o = opts(codec);
            {
                let store = Store::open_with_fs(&root, o.clone(), disk.clone()).unwrap();
                let s1 = State::new(1);
                store.save("r", 1, &s1.view()).unwrap().wait().unwrap();
                let hits = cut_power_at(point, &disk);
                let s2 = State::new(2);
                let r = store.save("r", 2, &s2.view()).and_then(|h| h.wait());
                failpoints::remove(point);
                assert_eq!(hits.load(Ordering::SeqCst), 1, "{what}: point not hit once");
                assert!(r.is_err(), "{what}: the save reported success");
            }
            disk.power_loss().unwrap();
            let new = check_old_or_new(&root, &o, &what);
            assert_eq!(new, point == "publish.after_dir_sync", "{what}");
        }
    }
}

/// A copy into a local store (what `cairn restore --to DIR` does), its
/// power cut at each point of the manifest commit.
#[test]
fn local_copies_stop_at_every_publish_point() {
    let _g = serial();
    let src_dir = tempfile::tempdir().unwrap();
    let o = opts(CodecChoice::Raw);
    let src = Store::open(src_dir.path(), o.clone()).unwrap();
    for step in 1..=2 {
        let s = State::new(step);
        src.save("r", step, &s.view()).unwrap().wait().unwrap();
    }
    for point in PUBLISH_POINTS {
        let what = format!("copy, power cut at {point}");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("disk");
        std::fs::create_dir(&root).unwrap();
        let disk = SimDisk::new(&root).unwrap();
        {
            let dst = Store::open_with_fs(&root, o.clone(), disk.clone()).unwrap();
            let copts = cairn::CopyOptions::default();
            cairn::copy_checkpoint(&src, &dst, "r", 1, &copts).unwrap();
            let hits = cut_power_at(point, &disk);
            let r = cairn::copy_checkpoint(&src, &dst, "r", 2, &copts);
            failpoints::remove(point);
            assert_eq!(hits.load(Ordering::SeqCst), 1, "{what}: point not hit once");
            assert!(r.is_err(), "{what}: the copy reported success");
        }
        disk.power_loss().unwrap();
        let new = check_old_or_new(&root, &o, &what);
        assert_eq!(new, point == "publish.after_dir_sync", "{what}");
    }
}

fn s3_options() -> Vec<(String, String)> {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect(
        "CAIRN_TEST_S3_ENDPOINT is not set: run the suite with scripts/test, \
         which starts a loopback S3-compatible server",
    );
    [
        ("endpoint", ep),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "cairn-test".into()),
        ("secret_access_key", "cairn-test-secret".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn new_bucket(tag: &str) -> String {
    use std::io::{Read, Write};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").unwrap();
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
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

fn s3_remote(tag: &str) -> RemoteStore {
    let url = format!("s3://{}/ckpt", new_bucket(tag));
    RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap()
}

fn remote_steps(remote: &RemoteStore) -> Vec<u64> {
    remote.block_on(remote.steps("r")).unwrap().unwrap()
}

/// A copy to S3 stopped before its manifest commit leaves no remote
/// checkpoint; stopped just after the put, the checkpoint is whole. Either
/// way the next upload completes it without sending a chunk twice.
#[test]
fn remote_copies_stop_before_and_after_the_manifest_put() {
    let _g = serial();
    for point in ["copy.before_commit", "remote.after_manifest_put"] {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(CodecChoice::Raw);
        let store = Store::open(dir.path(), o).unwrap();
        let remote = s3_remote("fp");
        let s1 = State::new(1);
        store.save("r", 1, &s1.view()).unwrap().wait().unwrap();
        failpoints::fail(point);
        let e = store.upload_to(&remote, "r", 1).unwrap_err();
        failpoints::remove(point);
        assert!(failpoints::hits(point) >= 1, "{point} not hit");
        assert!(e.to_string().contains(point), "{point}: {e}");
        assert_eq!(store.uploaded_to("r", 1), None, "{point}: marker written");
        let before = remote.metrics().snapshot().chunks_uploaded;
        if point == "copy.before_commit" {
            assert_eq!(remote_steps(&remote), Vec::<u64>::new(), "{point}");
            let e = remote
                .restore("r", StepSel::Step(1), &TensorFilter::All)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound, "{point}");
        } else {
            assert_eq!(remote_steps(&remote), vec![1], "{point}");
            let got = remote
                .restore("r", StepSel::Step(1), &TensorFilter::All)
                .unwrap();
            s1.check(&got, point);
        }
        let rep = store.upload_to(&remote, "r", 1).unwrap();
        assert_eq!(rep.chunks_uploaded, 0, "{point}: chunks sent again");
        assert_eq!(remote.metrics().snapshot().chunks_uploaded, before);
        assert_eq!(rep.already_committed, point == "remote.after_manifest_put");
        assert_eq!(store.uploaded_to("r", 1).as_deref(), Some(remote.url()));
        let got = remote
            .restore("r", StepSel::Step(1), &TensorFilter::All)
            .unwrap();
        s1.check(&got, point);
    }
}

/// The flush daemon stopped between the remote manifest put and the local
/// upload marker: the remote checkpoint is whole, the local one is not yet
/// marked (so local retention may not delete it), and the next cycle writes
/// the marker without uploading a chunk again.
#[test]
fn daemon_stopped_between_remote_commit_and_marker() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let o = opts(CodecChoice::Raw);
    let s1 = State::new(1);
    {
        let store = Store::open(&local, o.clone()).unwrap();
        store.save("r", 1, &s1.view()).unwrap().wait().unwrap();
    }
    let remote = s3_remote("fpd");
    let mut cfg = cairn::DaemonConfig::new(local.clone(), remote.url().into());
    cfg.remote_options = s3_options().into_iter().collect();
    cfg.gc.interval = None;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let daemon = cairn::FlushDaemon::new(cfg)
        .unwrap()
        .with_remote(remote.clone());
    let status = daemon.status();
    failpoints::fail("upload.before_marker");
    rt.block_on(daemon.cycle()).unwrap();
    failpoints::remove("upload.before_marker");
    assert_eq!(failpoints::hits("upload.before_marker"), 1);
    let snap = status.snapshot();
    assert_eq!(snap.failing.len(), 1, "{:?}", snap.failing);
    assert!(snap.failing[0].reason.contains("upload.before_marker"));
    assert_eq!(remote_steps(&remote), vec![1]);
    let got = remote
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    s1.check(&got, "remote after the stop");
    let store = Store::open_read_only(&local, o).unwrap();
    assert_eq!(store.uploaded_to("r", 1), None);
    let uploaded = remote.metrics().snapshot().chunks_uploaded;
    assert!(uploaded > 0);
    // The retry waits for its backoff: a fresh daemon (a restart) goes now.
    let mut cfg = cairn::DaemonConfig::new(local.clone(), remote.url().into());
    cfg.remote_options = s3_options().into_iter().collect();
    cfg.gc.interval = None;
    let daemon = cairn::FlushDaemon::new(cfg)
        .unwrap()
        .with_remote(remote.clone());
    rt.block_on(daemon.cycle()).unwrap();
    assert_eq!(store.uploaded_to("r", 1).as_deref(), Some(remote.url()));
    assert_eq!(
        remote.metrics().snapshot().chunks_uploaded,
        uploaded,
        "a chunk was uploaded again"
    );
    assert!(daemon.status().snapshot().failing.is_empty());
}

/// A daemon handed a remote store that was cancelled before (by another
/// daemon's stop, or the program) refuses to run, naming it, instead of
/// ending every cycle at once with nothing reported.
#[test]
fn a_daemon_refuses_a_cancelled_remote_store() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    Store::open(&local, opts(CodecChoice::Raw)).unwrap();
    let remote = s3_remote("cancelled");
    remote.cancel();
    let mut cfg = cairn::DaemonConfig::new(local, remote.url().into());
    cfg.remote_options = s3_options().into_iter().collect();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let daemon = cairn::FlushDaemon::new(cfg)
        .unwrap()
        .with_remote(remote.clone());
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let e = rt
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), daemon.run(rx)).await
        })
        .expect("the daemon ran on with a cancelled store")
        .unwrap_err();
    assert_eq!(e.kind(), cairn::ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
}
