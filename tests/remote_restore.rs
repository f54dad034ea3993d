//! Restores straight from the remote (the real S3 server), watched through
//! a thin object-store wrapper: many chunks in flight at once, no more
//! chunk bytes in flight than the store's read budget, every chunk
//! verified, and the same fetch repairing the local tier.

use async_trait::async_trait;
use cairn::object_store::path::Path;
use cairn::object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result as OsResult,
};
use cairn::{
    DType, ErrorKind, RemoteOptions, RemoteStore, SaveState, StepSel, Store, StoreOptions,
    TensorFilter,
};
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn endpoint() -> String {
    std::env::var("CAIRN_TEST_S3_ENDPOINT")
        .expect("CAIRN_TEST_S3_ENDPOINT is not set: run with the loopback S3 server")
}

fn s3_options() -> Vec<(String, String)> {
    [
        ("endpoint", endpoint()),
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
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let ep = endpoint();
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to S3 server");
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    name
}

/// Counts the chunk objects being fetched at once (a GET holds its object
/// from the request for a short delay, so overlaps show).
#[derive(Debug)]
struct Watch {
    inner: Arc<dyn ObjectStore>,
    now: Mutex<HashMap<Path, usize>>,
    max_objects: AtomicU64,
    gets: AtomicU64,
}

impl std::fmt::Display for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watch({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Watch {
    async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> OsResult<PutResult> {
        self.inner.put_opts(l, p, o).await
    }

    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> OsResult<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }

    async fn get_opts(&self, l: &Path, o: GetOptions) -> OsResult<GetResult> {
        let chunk = l.as_ref().contains("/chunks/");
        if chunk {
            self.gets.fetch_add(1, Ordering::Relaxed);
            let mut now = self.now.lock().unwrap();
            *now.entry(l.clone()).or_default() += 1;
            self.max_objects
                .fetch_max(now.len() as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(if chunk { 40 } else { 0 })).await;
        let r = self.inner.get_opts(l, o).await;
        if chunk {
            let mut now = self.now.lock().unwrap();
            let n = now.get_mut(l).unwrap();
            *n -= 1;
            if *n == 0 {
                now.remove(l);
            }
        }
        r
    }

    async fn delete(&self, l: &Path) -> OsResult<()> {
        self.inner.delete(l).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, OsResult<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> OsResult<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> OsResult<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> OsResult<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// splitmix64 floats, so chunks compress as real weights do.
fn weights(seed: u64, n: usize) -> Vec<u8> {
    let mut z = seed;
    (0..n)
        .flat_map(|_| {
            z = z.wrapping_add(0x9E3779B97F4A7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
            x ^= x >> 31;
            let u = (x >> 40) as f32 / 16_777_216.0 - 0.5;
            (u * 0.04).to_le_bytes()
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    url: String,
    tensors: Vec<(String, Vec<u8>)>,
}

/// A local store with one checkpoint of `n` tensors of `chunk` bytes each
/// (one chunk each), uploaded to a fresh bucket.
fn fixture(tag: &str, n: usize, chunk: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: chunk,
            staging_bytes: 4 * chunk * n,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let url = format!("s3://{}/ckpt", new_bucket(tag));
    store.attach_remote(RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap());
    let tensors: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("t{i:02}"), weights(i as u64 + 1, chunk / 4)))
        .collect();
    let mut s = SaveState::new();
    for (name, data) in &tensors {
        s = s.tensor(name.clone(), DType::F32, &[(data.len() / 4) as u64], data);
    }
    store.save("r", 1, &s).unwrap().wait().unwrap();
    store.upload("r", 1).unwrap();
    Fixture {
        _dir: dir,
        store,
        url,
        tensors,
    }
}

/// The remote of `f` seen through a [`Watch`], with `opts`.
fn watched(f: &Fixture, opts: RemoteOptions) -> (RemoteStore, Arc<Watch>) {
    let plain = RemoteStore::open(&f.url, &s3_options(), opts.clone()).unwrap();
    let watch = Arc::new(Watch {
        inner: plain.object_store().clone(),
        now: Mutex::new(HashMap::new()),
        max_objects: AtomicU64::new(0),
        gets: AtomicU64::new(0),
    });
    let r = RemoteStore::new(watch.clone(), Path::from("ckpt"), &f.url, opts);
    (r, watch)
}

fn check(r: &cairn::Restored, tensors: &[(String, Vec<u8>)]) {
    assert_eq!(r.tensors.len(), tensors.len());
    for (got, (name, data)) in r.tensors.iter().zip(tensors) {
        assert_eq!(&got.name, name);
        assert!(&got.data == data, "bytes of {name} differ");
    }
}

/// Small chunks: more chunks in flight than `concurrency` (twice it), one
/// GET each, every byte restored.
#[test]
fn small_chunks_are_fetched_many_at_once() {
    let f = fixture("many", 32, 64 << 10);
    let opts = RemoteOptions {
        concurrency: 4,
        part_size: 1 << 20,
        ..RemoteOptions::default()
    };
    let (remote, watch) = watched(&f, opts);
    let r = remote
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    check(&r, &f.tensors);
    let max = watch.max_objects.load(Ordering::Relaxed);
    assert!(
        max > 4,
        "at most {max} chunks were in flight at once, not more than concurrency 4"
    );
    assert!(
        max <= 8,
        "{max} chunks in flight, more than 2 x concurrency"
    );
    assert_eq!(watch.gets.load(Ordering::Relaxed), 32, "one GET per chunk");
}

/// Larger chunks: no more chunk bytes in flight than the read budget (2 x
/// concurrency x part_size), whatever the number of reader threads.
#[test]
fn chunk_bytes_in_flight_stay_within_the_read_budget() {
    let f = fixture("budget", 12, 2 << 20);
    // Budget: 2 x 2 x 1 MiB = 4 MiB, so at most two 2 MiB chunks at once
    // (the four reader threads could hold four).
    let opts = RemoteOptions {
        concurrency: 2,
        part_size: 1 << 20,
        ..RemoteOptions::default()
    };
    let (remote, watch) = watched(&f, opts);
    let r = remote
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    check(&r, &f.tensors);
    let max = watch.max_objects.load(Ordering::Relaxed);
    assert!(
        max <= 2,
        "{max} chunks of 2 MiB in flight, over the 4 MiB budget"
    );
    assert!(max >= 2, "chunks were fetched one at a time");
}

/// A corrupt remote chunk is an error naming the chunk and its tensor,
/// not data.
#[test]
fn a_corrupt_remote_chunk_is_caught_as_it_arrives() {
    let f = fixture("corrupt", 6, 64 << 10);
    let plain = RemoteStore::open(&f.url, &s3_options(), RemoteOptions::default()).unwrap();
    let (id, _) = f.store.manifest("r", 1).unwrap().distinct_chunks()[3];
    let path = plain.chunk_path(&id);
    plain
        .block_on(async {
            let b = plain
                .object_store()
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let mut v = b.to_vec();
            let i = v.len() - 1;
            v[i] ^= 0x40;
            plain.object_store().put(&path, v.into()).await.unwrap();
        })
        .unwrap();
    let e = plain
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    assert!(e.to_string().contains(&id.to_hex()), "{e}");
}

/// The local tier is repaired through the same fetch: a local chunk that
/// is gone is fetched, verified, used and written back.
#[test]
fn the_same_fetch_repairs_the_local_tier() {
    let f = fixture("repair", 8, 64 << 10);
    let (remote, watch) = watched(&f, RemoteOptions::default());
    let mut store = Store::open(
        f.store.root(),
        StoreOptions {
            chunk_size: 64 << 10,
            staging_bytes: 1 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.attach_remote(remote);
    let chunks = store.manifest("r", 1).unwrap().distinct_chunks();
    for (id, _) in &chunks[..3] {
        std::fs::remove_file(store.chunk_path(id)).unwrap();
    }
    let r = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    check(&r, &f.tensors);
    assert_eq!(r.report.repaired, 3);
    assert_eq!(watch.gets.load(Ordering::Relaxed), 3);
    for (id, _) in &chunks[..3] {
        assert!(store.chunk_path(id).exists(), "chunk {id} written back");
    }
}
