//! A remote collection racing an upload that reuses garbage, on the real
//! S3 server: the chunks of a remotely deleted step are really older than
//! the grace period when a new upload relies on them, so the uploader
//! renews them, and a collector that looked at one before the renewal
//! deletes it after; the uploader's post-commit re-check puts it back.
//! Time is a `ManualClock` frozen during each phase (the grace period is
//! a few seconds of real time, so that objects really age past it), and
//! a hook on each object store holds the collector between its HEAD and
//! its DELETE until the uploader has renewed every chunk.
//!
//! Planted bug this catches (seen failing, then removed): `copy_checkpoint`
//! without its post-commit re-check of renewed chunks: the chunk the
//! collector deleted stays deleted and `chunks_restored_after_commit` is 0.
//! An uploader that relied on old chunks instead of renewing them would
//! fail the `chunks_renewed` assertion (not planted).

use cairn::object_store::path::Path as ObjPath;
use cairn::testing::{FaultConfig, FaultyObjectStore, OpHook};
use cairn::{
    copy_checkpoint, ChunkTier, CopyOptions, DType, ManualClock, RemoteOptions, RemoteStore,
    SaveState, StepSel, Store, StoreOptions, TensorFilter,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Real seconds: step 1's objects are older than this when step 2 uploads.
const GRACE: Duration = Duration::from_secs(4);

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
    let name = format!("cairn-{tag}-{}", std::process::id());
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

/// The S3 remote at `url` behind a hook (no faults), on `clock`.
fn hooked(url: &str, clock: &ManualClock, hook: OpHook) -> RemoteStore {
    let opts = RemoteOptions {
        gc_grace: GRACE,
        ..RemoteOptions::default()
    };
    let base = RemoteStore::open(url, &s3_options(), opts.clone()).unwrap();
    let faulty = FaultyObjectStore::new(
        base.object_store().clone(),
        FaultConfig {
            fail_before: 0.0,
            fail_after: 0.0,
            max_delay: Duration::ZERO,
            seed: 1,
        },
    )
    .with_hook(hook);
    RemoteStore::new(Arc::new(faulty), ObjPath::from("ckpt"), url, opts)
        .with_clock(Arc::new(clock.clone()))
}

fn tensors() -> Vec<(String, Vec<u8>)> {
    (0..5u64)
        .map(|i| {
            let data: Vec<u8> = (0..150_000u64)
                .map(|j| ((j * 31 + i * 7) % 251) as u8)
                .collect();
            (format!("w{i}"), data)
        })
        .collect()
}

fn view(t: &[(String, Vec<u8>)], step: u64) -> SaveState<'_> {
    let mut s = SaveState::new();
    for (n, d) in t {
        s = s.tensor(n.clone(), DType::U8, &[d.len() as u64], d);
    }
    s.metadata(serde_json::json!({ "step": step }))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn collector_deleting_a_renewed_chunk_is_undone_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let local = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 64 << 10,
            staging_bytes: 2 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let t = tensors();
    // Step 2 holds exactly step 1's tensors: every chunk it needs is one
    // only the deleted step 1 referenced.
    local.save("r", 1, &view(&t, 1)).unwrap().wait().unwrap();
    local.save("r", 2, &view(&t, 2)).unwrap().wait().unwrap();
    let url = format!("s3://{}/ckpt", new_bucket("gcrace"));
    let clock = ManualClock::new();

    // The uploader's hook: at its manifest put, release the collector held
    // at its first DELETE, and wait for the collection to finish.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<cairn::GcReport>();
    let done_rx = Mutex::new(done_rx);
    let release_tx = Mutex::new(Some(release_tx));
    let collected = Arc::new(Mutex::new(None));
    let manifest_puts = Arc::new(AtomicU64::new(0));
    let rechecks = Arc::new(AtomicU64::new(0));
    let uploader_hook: OpHook = {
        let (collected, manifest_puts, rechecks) =
            (collected.clone(), manifest_puts.clone(), rechecks.clone());
        Arc::new(move |op, path| {
            let p = path.as_ref();
            if op == "put" && p.ends_with("00000000000000000002/manifest.cairn") {
                manifest_puts.fetch_add(1, Ordering::SeqCst);
                if let Some(tx) = release_tx.lock().unwrap().take() {
                    tx.send(()).unwrap();
                    let rep = done_rx.lock().unwrap().recv().unwrap();
                    *collected.lock().unwrap() = Some(rep);
                }
            } else if op == "get"
                && p.contains("/chunks/")
                && manifest_puts.load(Ordering::SeqCst) > 0
            {
                // A HEAD is a get with the head option.
                rechecks.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let uploader = hooked(&url, &clock, uploader_hook);

    // Step 1 up, then dropped remotely: its chunks are garbage, and really
    // age past the grace period.
    local.upload_to(&uploader, "r", 1).unwrap();
    ChunkTier::delete_manifest(&uploader, "r", 1).unwrap();
    std::thread::sleep(GRACE + Duration::from_millis(1500));
    clock.set_ms(now_ms());

    // The collector: held at its first chunk DELETE (after its HEAD found
    // the chunk old and unreferenced) until released.
    let (at_delete_tx, at_delete_rx) = mpsc::channel::<String>();
    let at_delete_tx = Mutex::new(Some(at_delete_tx));
    let release_rx = Mutex::new(release_rx);
    let collector_hook: OpHook = Arc::new(move |op, path| {
        if op == "delete" && path.as_ref().contains("/chunks/") {
            if let Some(tx) = at_delete_tx.lock().unwrap().take() {
                tx.send(path.to_string()).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
            }
        }
    });
    let collector = hooked(&url, &clock, collector_hook);
    let gc_thread = std::thread::spawn(move || {
        let rep = collector.gc(GRACE, false).unwrap();
        done_tx.send(rep).unwrap();
    });
    let victim = at_delete_rx.recv().unwrap();

    let rep = copy_checkpoint(&local, &uploader, "r", 2, &CopyOptions::default()).unwrap();
    gc_thread.join().unwrap();
    let gc = collected
        .lock()
        .unwrap()
        .clone()
        .expect("the collection ran");
    eprintln!("copy: {rep:?}\ngc: {gc:?}\nvictim: {victim}");
    assert!(gc.chunks_deleted >= 1, "{gc:?}");
    assert_eq!(
        rep.chunks_renewed, rep.chunks,
        "every old chunk renewed: {rep:?}"
    );
    assert_eq!(rep.chunks_skipped, 0, "nothing old was relied on: {rep:?}");
    assert!(
        rechecks.load(Ordering::SeqCst) >= rep.chunks_renewed,
        "the post-commit re-check HEADed every renewed chunk"
    );
    assert_eq!(
        rep.chunks_restored_after_commit, 1,
        "the chunk deleted after its renewal was put back: {rep:?}"
    );
    let got = uploader
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    for (g, (n, d)) in got.tensors.iter().zip(&t) {
        assert_eq!(&g.name, n);
        assert!(&g.data == d, "bytes of {n} differ");
    }
    // A later collection keeps everything step 2 needs.
    let plain = RemoteStore::open(
        &url,
        &s3_options(),
        RemoteOptions {
            gc_grace: GRACE,
            ..RemoteOptions::default()
        },
    )
    .unwrap()
    .with_clock(Arc::new(clock.clone()));
    let again = plain.gc(GRACE, false).unwrap();
    assert_eq!(again.chunks_deleted, 0, "{again:?}");
    let got = plain
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_eq!(got.tensors.len(), t.len());
}
