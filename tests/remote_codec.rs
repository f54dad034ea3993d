//! The remote tier's codec, on the real S3 server: raw local chunks go up
//! as byte-grouped zstd when that pays, under the same names; restores,
//! verification, dedup and repair read either form, and a remote written
//! raw still reads.

use cairn::{
    ChunkTier, DType, ErrorKind, RemoteOptions, RemoteStore, SaveState, StepSel, Store,
    StoreOptions, TensorFilter,
};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

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

fn url(bucket: &str) -> String {
    format!("s3://{bucket}/ckpt")
}

/// splitmix64 with a normal sampler (Box-Muller).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    fn normal(&mut self, std: f32) -> f32 {
        let r = self.next();
        let u1 = ((r >> 40) as f32 + 1.0) / 16_777_217.0;
        let u2 = (r & 0xFF_FFFF) as f32 / 16_777_216.0;
        (-2.0 * u1.ln()).sqrt() * std * (std::f32::consts::TAU * u2).cos()
    }
}

/// Weights drawn like real ones: N(0, std), in fp32 or bf16 bytes.
fn weights(seed: u64, n: usize, std: f32, dtype: DType) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut out = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        let v = r.normal(std);
        match dtype {
            DType::BF16 => out.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes()),
            _ => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
    out
}

struct Tensor {
    name: String,
    dtype: DType,
    data: Vec<u8>,
}

fn state(tensors: &[Tensor]) -> SaveState<'_> {
    let mut s = SaveState::new();
    for t in tensors {
        let n = (t.data.len() / t.dtype.size()) as u64;
        s = s.tensor(t.name.clone(), t.dtype, &[n], &t.data);
    }
    s
}

/// Two weights and two Adam-like moments per dtype, 1 MiB each.
fn model(seed: u64, dtype: DType) -> Vec<Tensor> {
    let n = (1 << 20) / dtype.size();
    let mut v = Vec::new();
    for (i, std) in [0.02f32, 0.05, 1e-3].into_iter().enumerate() {
        v.push(Tensor {
            name: format!("w{i}"),
            dtype,
            data: weights(seed + i as u64, n, std, dtype),
        });
    }
    // A second moment: positive and small.
    let mut sq = weights(seed + 9, n, 1e-3, DType::F32);
    for c in sq.chunks_exact_mut(4) {
        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        c.copy_from_slice(&(x * x).to_le_bytes());
    }
    if dtype == DType::BF16 {
        sq = sq.chunks_exact(4).flat_map(|c| [c[2], c[3]]).collect();
    }
    v.push(Tensor {
        name: "w.exp_avg_sq".into(),
        dtype,
        data: sq,
    });
    v
}

fn open_local(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            chunk_size: 1 << 20,
            staging_bytes: 8 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn stored_bytes(t: &dyn ChunkTier) -> u64 {
    t.list_chunks().unwrap().iter().map(|c| c.size).sum()
}

fn ids(t: &dyn ChunkTier) -> BTreeSet<cairn::ChunkId> {
    t.list_chunks().unwrap().iter().map(|c| c.id).collect()
}

fn assert_same(r: &cairn::Restored, tensors: &[Tensor]) {
    assert_eq!(r.tensors.len(), tensors.len());
    for (got, want) in r.tensors.iter().zip(tensors) {
        assert_eq!(got.name, want.name);
        assert!(got.data == want.data, "bytes of {} differ", want.name);
    }
}

/// The default remote stores fp32 and bf16 chunks compressed (fp32 to at
/// most 0.9 of the logical bytes, bf16 to at most 0.8), under the same
/// names as the local tier, and restores them byte for byte.
#[test]
fn default_remote_stores_float_chunks_compressed_under_the_same_names() {
    for (dtype, limit) in [(DType::F32, 0.90), (DType::BF16, 0.80)] {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_local(dir.path());
        let bucket = new_bucket("codec");
        let remote =
            RemoteStore::open(&url(&bucket), &s3_options(), RemoteOptions::default()).unwrap();
        store.attach_remote(remote.clone());
        let tensors = model(1, dtype);
        let logical: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        store
            .save("r", 1, &state(&tensors))
            .unwrap()
            .wait()
            .unwrap();
        let up = store.upload("r", 1).unwrap();
        let local_bytes = stored_bytes(&store);
        let remote_bytes = stored_bytes(&remote);
        let ratio = remote_bytes as f64 / logical as f64;
        assert!(
            ratio <= limit,
            "{dtype:?}: remote stores {remote_bytes} of {logical} logical bytes ({ratio:.3})"
        );
        assert!(local_bytes >= logical, "the local tier stays raw");
        assert_eq!(
            up.bytes_uploaded, remote_bytes,
            "the upload reports the bytes the remote stores"
        );
        assert_eq!(ids(&store), ids(&remote), "chunk names are the same");
        // Every object names its chunk and decodes to its hash.
        let m = ChunkTier::manifest(&remote, "r", 1).unwrap();
        for (id, len) in m.distinct_chunks() {
            let object = ChunkTier::read_chunk_object(&remote, &id, len).unwrap();
            assert_eq!(object[10], 1, "{dtype:?}: chunk {id} is zstd");
            assert!(
                matches!(object[11], 2 | 4),
                "{dtype:?}: chunk {id} is byte-grouped (filter {})",
                object[11]
            );
        }
        let r = remote
            .restore("r", StepSel::Step(1), &TensorFilter::All)
            .unwrap();
        assert_same(&r, &tensors);
        let problems = cairn::Tier::Remote(remote.clone())
            .verify(None, None)
            .unwrap();
        assert!(problems.problems.is_empty(), "{:?}", problems.problems);
    }
}

/// Unchanged chunks of the next step are found in the remote under their
/// names and not sent again.
#[test]
fn dedup_across_steps_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_local(dir.path());
    let remote = RemoteStore::open(
        &url(&new_bucket("dedup")),
        &s3_options(),
        RemoteOptions::default(),
    )
    .unwrap();
    store.attach_remote(remote.clone());
    let mut tensors = model(2, DType::F32);
    store
        .save("r", 1, &state(&tensors))
        .unwrap()
        .wait()
        .unwrap();
    let first = store.upload("r", 1).unwrap();
    tensors[0].data = weights(77, tensors[0].data.len() / 4, 0.02, DType::F32);
    store
        .save("r", 2, &state(&tensors))
        .unwrap()
        .wait()
        .unwrap();
    let second = store.upload("r", 2).unwrap();
    assert_eq!(first.chunks_uploaded, first.chunks);
    assert_eq!(second.chunks_uploaded, 1, "only the changed chunk goes up");
    assert_eq!(second.chunks_skipped, second.chunks - 1);
    let r = remote
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &tensors);
}

/// Incompressible chunks are stored exactly as the local tier holds them.
#[test]
fn incompressible_chunks_stay_raw() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_local(dir.path());
    let remote = RemoteStore::open(
        &url(&new_bucket("noise")),
        &s3_options(),
        RemoteOptions::default(),
    )
    .unwrap();
    store.attach_remote(remote.clone());
    let mut r = Rng(5);
    let noise: Vec<u8> = (0..(1 << 20) / 8)
        .flat_map(|_| r.next().to_le_bytes())
        .collect();
    let tensors = vec![Tensor {
        name: "noise".into(),
        dtype: DType::F32,
        data: noise,
    }];
    store
        .save("r", 1, &state(&tensors))
        .unwrap()
        .wait()
        .unwrap();
    store.upload("r", 1).unwrap();
    for (id, len) in store.manifest("r", 1).unwrap().distinct_chunks() {
        let local = ChunkTier::read_chunk_object(&store, &id, len).unwrap();
        let up = ChunkTier::read_chunk_object(&remote, &id, len).unwrap();
        assert_eq!(up[10], 0, "raw codec");
        assert!(
            up == local,
            "chunk {id} is stored as the local tier holds it"
        );
    }
}

/// A remote written raw (`codec=raw`, as every remote was before the
/// codec) reads, verifies and restores through a store that compresses,
/// and chunks it already holds are not sent again.
#[test]
fn raw_remotes_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_local(dir.path());
    let bucket = new_bucket("raw");
    let mut raw_opts = s3_options();
    raw_opts.push(("codec".into(), "raw".into()));
    let raw = RemoteStore::open(&url(&bucket), &raw_opts, RemoteOptions::default()).unwrap();
    assert_eq!(raw.options().codec, cairn::CodecChoice::Raw);
    store.attach_remote(raw.clone());
    let tensors = model(3, DType::BF16);
    let logical: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    store
        .save("r", 1, &state(&tensors))
        .unwrap()
        .wait()
        .unwrap();
    store.upload("r", 1).unwrap();
    assert!(stored_bytes(&raw) >= logical, "raw objects");

    let zstd = RemoteStore::open(&url(&bucket), &s3_options(), RemoteOptions::default()).unwrap();
    let r = zstd
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &tensors);
    assert!(cairn::Tier::Remote(zstd.clone())
        .verify(None, None)
        .unwrap()
        .problems
        .is_empty());
    // A second step of the same bytes through the compressing store
    // re-sends nothing.
    store.attach_remote(zstd.clone());
    store
        .save("r", 2, &state(&tensors))
        .unwrap()
        .wait()
        .unwrap();
    let up = store.upload("r", 2).unwrap();
    assert_eq!(up.chunks_uploaded, 0);
}

/// A local chunk gone bad is repaired from the compressed remote object;
/// the local tier then reads it on its own.
#[test]
fn local_repair_from_a_compressed_remote() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_local(dir.path());
    let remote = RemoteStore::open(
        &url(&new_bucket("repair")),
        &s3_options(),
        RemoteOptions::default(),
    )
    .unwrap();
    store.attach_remote(remote.clone());
    let tensors = model(4, DType::F32);
    store
        .save("r", 1, &state(&tensors))
        .unwrap()
        .wait()
        .unwrap();
    store.upload("r", 1).unwrap();
    let (id, _) = store.manifest("r", 1).unwrap().distinct_chunks()[0];
    let path = store.chunk_path(&id);
    let mut b = std::fs::read(&path).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(&path, &b).unwrap();
    let r = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &tensors);
    assert_eq!(r.report.repaired, 1);
    drop(store);
    let store = open_local(dir.path());
    let r = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &tensors);
}

/// The codec and compression threads come from the remote options; a bad
/// value is an InvalidInput naming the option.
#[test]
fn codec_options() {
    let bucket = new_bucket("opts");
    let mut o = s3_options();
    o.push(("codec".into(), "zstd:3".into()));
    o.push(("compress_threads".into(), "2".into()));
    let r = RemoteStore::open(&url(&bucket), &o, RemoteOptions::default()).unwrap();
    assert_eq!(r.options().codec, cairn::CodecChoice::Zstd { level: 3 });
    assert_eq!(r.options().compress_threads, 2);
    for (k, v) in [
        ("codec", "lz4"),
        ("codec", "zstd:40"),
        ("compress_threads", "x"),
    ] {
        let mut o = s3_options();
        o.push((k.into(), v.into()));
        let e = RemoteStore::open(&url(&bucket), &o, RemoteOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{k}={v}: {e}");
        assert!(e.to_string().contains(k), "{k}={v}: {e}");
    }
}
