//! The concurrent ranged-GET download path (objects larger than four
//! parts) against the real S3 server: a clean restore, a range whose bytes
//! are corrupt, and a range that comes back short.
//!
//! A thin object-store wrapper in this file counts ranged GETs and mangles
//! the body of chosen ones, the way a faulty proxy or disk would.
//!
//! `a_short_range_is_retried` is the regression test of a defect it
//! found: a ranged body that came back short was concatenated as it came,
//! and the restore failed, calling a good chunk corrupt ("file is N bytes,
//! header declares M"); now each body's length is checked and a mismatch
//! retried as transient (`check_body_len`). The planted bug for the other
//! tests: ranges reassembled in completion order instead of offset order
//! (`buffer_unordered`), which the clean restore catches.

use async_trait::async_trait;
use cairn::object_store::path::Path as ObjPath;
use cairn::object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use cairn::{
    DType, Error, ErrorKind, RemoteOptions, RemoteStore, RetryPolicy, SaveState, StepSel, Store,
    StoreOptions, TensorFilter,
};
use futures::stream::BoxStream;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Remote range size: a 256 KiB chunk object takes 16 ranged GETs.
const PART: usize = 16 << 10;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mangle {
    /// Flip one byte in the middle of the body.
    Corrupt,
    /// Return the first half of the body only.
    Short,
}

/// Counts ranged GETs of chunk objects; mangles the next `times` of them.
#[derive(Debug)]
struct Mangler {
    inner: Arc<dyn ObjectStore>,
    ranged: AtomicU64,
    armed: Mutex<Option<(Mangle, u64)>>,
    mangled: AtomicU64,
}

impl Mangler {
    fn arm(&self, m: Mangle, times: u64) {
        *self.armed.lock().unwrap() = Some((m, times));
    }

    fn take(&self) -> Option<Mangle> {
        let mut g = self.armed.lock().unwrap();
        match *g {
            Some((m, n)) if n > 0 => {
                *g = Some((m, n - 1));
                Some(m)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Mangler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mangler({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Mangler {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> cairn::object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> cairn::object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> cairn::object_store::Result<GetResult> {
        let ranged = options.range.is_some() && location.as_ref().contains("/chunks/");
        let r = self.inner.get_opts(location, options).await?;
        if !ranged {
            return Ok(r);
        }
        self.ranged.fetch_add(1, Ordering::SeqCst);
        let Some(m) = self.take() else {
            return Ok(r);
        };
        self.mangled.fetch_add(1, Ordering::SeqCst);
        let (meta, range, attributes) = (r.meta.clone(), r.range.clone(), r.attributes.clone());
        let mut body = r.bytes().await?.to_vec();
        match m {
            Mangle::Corrupt => {
                let mid = body.len() / 2;
                body[mid] ^= 0x5A;
            }
            Mangle::Short => body.truncate(body.len() / 2),
        }
        let b = bytes::Bytes::from(body);
        Ok(GetResult {
            payload: GetResultPayload::Stream(Box::pin(futures::stream::once(
                async move { Ok(b) },
            ))),
            meta,
            range,
            attributes,
        })
    }

    async fn delete(&self, location: &ObjPath) -> cairn::object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, cairn::object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> cairn::object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &ObjPath, to: &ObjPath) -> cairn::object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(
        &self,
        from: &ObjPath,
        to: &ObjPath,
    ) -> cairn::object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
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

struct Fixture {
    _dir: tempfile::TempDir,
    tensors: Vec<(String, Vec<u8>)>,
    remote: RemoteStore,
    mangler: Arc<Mangler>,
    chunks: u64,
}

/// Two tensors of four 256 KiB chunks each, saved locally, uploaded to a
/// fresh bucket, and the local copy removed.
fn fixture(tag: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<(String, Vec<u8>)> = (0..2u64)
        .map(|i| {
            let mut x = i + 1;
            let data: Vec<u8> = (0..(1usize << 20))
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect();
            (format!("layer.{i}.weight"), data)
        })
        .collect();
    let store = Store::open(
        dir.path().join("local"),
        StoreOptions {
            chunk_size: 256 << 10,
            staging_bytes: 4 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut s = SaveState::new();
    for (n, d) in &tensors {
        s = s.tensor(n.clone(), DType::U8, &[d.len() as u64], d);
    }
    store.save("r", 1, &s).unwrap().wait().unwrap();
    let url = format!("s3://{}/ckpt", new_bucket(tag));
    let opts = RemoteOptions {
        part_size: PART,
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..RemoteOptions::default()
    };
    let base = RemoteStore::open(&url, &s3_options(), opts.clone()).unwrap();
    let mangler = Arc::new(Mangler {
        inner: base.object_store().clone(),
        ranged: AtomicU64::new(0),
        armed: Mutex::new(None),
        mangled: AtomicU64::new(0),
    });
    let remote = RemoteStore::new(mangler.clone(), ObjPath::from("ckpt"), &url, opts);
    store.upload_to(&remote, "r", 1).unwrap();
    let chunks = store.manifest("r", 1).unwrap().distinct_chunks().len() as u64;
    drop(store);
    std::fs::remove_dir_all(dir.path().join("local")).unwrap();
    Fixture {
        _dir: dir,
        tensors,
        remote,
        mangler,
        chunks,
    }
}

fn restore(f: &Fixture) -> cairn::Result<cairn::Restored> {
    f.remote.restore("r", StepSel::Step(1), &TensorFilter::All)
}

fn check(f: &Fixture, r: &cairn::Restored) {
    assert_eq!(r.tensors.len(), f.tensors.len());
    for (g, (n, d)) in r.tensors.iter().zip(&f.tensors) {
        assert_eq!(&g.name, n);
        assert!(&g.data == d, "bytes of {n} differ");
    }
}

/// Chunk objects of 256 KiB with 16 KiB ranges download in ranged GETs
/// (16 per chunk) and restore bit-exact.
#[test]
fn large_objects_download_in_ranged_gets() {
    let f = fixture("rg");
    assert_eq!(f.chunks, 8);
    let r = restore(&f).unwrap();
    check(&f, &r);
    let ranged = f.mangler.ranged.load(Ordering::SeqCst);
    assert!(
        ranged >= f.chunks * (256 << 10) as u64 / PART as u64,
        "only {ranged} ranged GETs for {} chunks",
        f.chunks
    );
}

/// A range whose bytes are corrupt (every time it is fetched): the restore
/// fails with a corrupt-chunk error naming the chunk and its tensor, and
/// never returns the wrong bytes.
#[test]
fn a_corrupt_range_is_a_corrupt_chunk() {
    let f = fixture("rgc");
    f.mangler.arm(Mangle::Corrupt, u64::MAX);
    let e = restore(&f).unwrap_err();
    assert!(f.mangler.mangled.load(Ordering::SeqCst) >= 1);
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    match &e {
        Error::CorruptChunk { chunk, tensors, .. } => {
            assert_eq!(chunk.len(), 64, "{e}");
            assert!(
                tensors.iter().any(|t| t.starts_with("layer.")),
                "names no tensor: {e}"
            );
        }
        other => panic!("not a corrupt-chunk error: {other}"),
    }
    // Once the corruption is gone, the same restore succeeds.
    f.mangler.arm(Mangle::Corrupt, 0);
    check(&f, &restore(&f).unwrap());
}

/// A ranged GET whose body comes back short once is a transient fault: it
/// is retried and the restore succeeds bit-exact. Short every time, the
/// restore fails as unavailable (retries exhausted), not as corrupt data.
#[test]
fn a_short_range_is_retried() {
    let f = fixture("rgs");
    f.mangler.arm(Mangle::Short, 1);
    let r = restore(&f).unwrap_or_else(|e| panic!("a short read failed the restore: {e}"));
    check(&f, &r);
    assert_eq!(f.mangler.mangled.load(Ordering::SeqCst), 1);
    assert!(f.remote.metrics().snapshot().retries >= 1);

    f.mangler.arm(Mangle::Short, u64::MAX);
    let e = restore(&f).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("/chunks/"), "names no object: {e}");
}
