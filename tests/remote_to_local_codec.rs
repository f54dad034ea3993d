//! What a chunk object fetched from the remote becomes on the local tier,
//! on the real S3 server. The remote stores raw chunks as byte-grouped
//! zstd; a local store whose codec is raw (the default) must hold them raw,
//! laid out as its own saves write them, so later local restores pay no
//! decoding: after `copy_checkpoint` from the remote (`cairn restore URL
//! --to DIR`) and after a restore repairs a local chunk from an attached
//! remote. A local store configured with zstd holds what its own saves
//! would write: compressed objects as they are, raw ones compressed when
//! that pays. The object's name, the hash of its uncompressed bytes, never
//! changes.

use cairn::{
    copy_checkpoint, ChunkId, ChunkTier, CodecChoice, CopyOptions, DType, RemoteOptions,
    RemoteStore, SaveState, StepSel, Store, StoreOptions, TensorFilter,
};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const CHUNK: usize = 1 << 20;

fn endpoint() -> String {
    std::env::var("CAIRN_TEST_S3_ENDPOINT").expect(
        "CAIRN_TEST_S3_ENDPOINT is not set: run the suite with scripts/test, \
         which starts a loopback S3-compatible server",
    )
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

/// A remote on a fresh bucket; `codec` is a remote option (`raw`, `zstd:1`).
fn remote(tag: &str, codec: &str) -> RemoteStore {
    let mut o = s3_options();
    o.push(("codec".into(), codec.into()));
    RemoteStore::open(
        &format!("s3://{}/ckpt", new_bucket(tag)),
        &o,
        RemoteOptions::default(),
    )
    .unwrap()
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

struct Tensor {
    name: String,
    data: Vec<u8>,
}

/// Four fp32 weights drawn like real ones, 1.5 MiB each (a full chunk and
/// a half one each, so chunks of two lengths), plus a small blob.
fn model(seed: u64) -> Vec<Tensor> {
    (0..4)
        .map(|i| {
            let mut r = Rng(seed * 100 + i);
            let n = CHUNK * 3 / 2 / 4;
            Tensor {
                name: format!("layer{i}.weight"),
                data: (0..n).flat_map(|_| r.normal(0.02).to_le_bytes()).collect(),
            }
        })
        .collect()
}

fn state(tensors: &[Tensor]) -> SaveState<'_> {
    let mut s = SaveState::new();
    for t in tensors {
        s = s.tensor(
            t.name.clone(),
            DType::F32,
            &[t.data.len() as u64 / 4],
            &t.data,
        );
    }
    s.blob("rng", b"seed 42")
}

fn open(dir: &Path, codec: CodecChoice) -> Store {
    Store::open(
        dir,
        StoreOptions {
            chunk_size: CHUNK,
            staging_bytes: 8 << 20,
            codec,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// A store as `cairn restore --to DIR` opens its target: default options,
/// the smallest staging pool.
fn open_copy_target(dir: &Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            staging_bytes: StoreOptions::default().chunk_size,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn assert_restores(store: &Store, tensors: &[Tensor]) {
    let r = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_eq!(r.tensors.len(), tensors.len());
    for (got, want) in r.tensors.iter().zip(tensors) {
        assert_eq!(got.name, want.name);
        assert!(got.data == want.data, "bytes of {} differ", want.name);
    }
    assert_eq!(r.blobs.len(), 1);
    assert_eq!(r.blobs[0].1, b"seed 42");
}

/// The chunks of step 1 of run `r`.
fn chunks(t: &dyn ChunkTier) -> Vec<(ChunkId, u64)> {
    t.manifest("r", 1).unwrap().distinct_chunks()
}

/// (codec, filter, payload offset) of a chunk object's header.
fn header(object: &[u8]) -> (u8, u8, u32) {
    (
        object[10],
        object[11],
        u32::from_le_bytes(object[12..16].try_into().unwrap()),
    )
}

/// A raw local store holding a saved step uploaded to a compressing remote,
/// with every tensor chunk's remote object checked to be zstd (what makes
/// the tests below mean something; the packed 7-byte blob stays raw).
fn saved_and_uploaded(dir: &Path, remote: &RemoteStore, tensors: &[Tensor]) -> Store {
    let mut store = open(dir, CodecChoice::Raw);
    store.attach_remote(remote.clone());
    store.save("r", 1, &state(tensors)).unwrap().wait().unwrap();
    store.upload("r", 1).unwrap();
    for (id, len) in chunks(remote) {
        let object = ChunkTier::read_chunk_object(remote, &id, len).unwrap();
        if len >= 4096 {
            assert_eq!(header(&object).0, 1, "remote chunk {id} is zstd");
        }
    }
    store
}

/// `cairn restore s3://... --to DIR` into a new (raw) store: every chunk
/// file is raw and byte for byte what a save of the same state writes
/// (header, alignment, payload), the copy reports the bytes it stored, a
/// second copy finds everything present and sound, and the local copy
/// restores bit-exact on its own.
#[test]
fn restore_to_a_raw_local_directory_stores_chunks_raw() {
    let tensors = model(1);
    let src_dir = tempfile::tempdir().unwrap();
    let remote = remote("to-local", "zstd:1");
    let src = saved_and_uploaded(src_dir.path(), &remote, &tensors);

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = open_copy_target(dst_dir.path());
    let opts = CopyOptions {
        verify_present: true,
        ..CopyOptions::default()
    };
    let report = copy_checkpoint(&remote, &dst, "r", 1, &opts).unwrap();
    assert_eq!(report.chunks_copied, report.chunks);
    let mut stored = 0;
    for (id, _) in chunks(&dst) {
        let got = std::fs::read(dst.chunk_path(&id)).unwrap();
        let (codec, filter, _) = header(&got);
        assert_eq!((codec, filter), (0, 0), "local chunk {id} is raw");
        let saved = std::fs::read(src.chunk_path(&id)).unwrap();
        assert_eq!(
            header(&got),
            header(&saved),
            "chunk {id} has the header a save writes"
        );
        assert!(got == saved, "chunk {id} is stored as a save stores it");
        stored += got.len() as u64;
    }
    assert_eq!(report.bytes_copied, stored, "bytes_copied: as stored");

    let again = copy_checkpoint(&remote, &dst, "r", 1, &opts).unwrap();
    assert_eq!(again.chunks_skipped, again.chunks);
    assert_eq!(again.chunks_repaired, 0);
    assert!(again.already_present);

    drop(dst);
    let dst = open(dst_dir.path(), CodecChoice::Raw);
    assert_restores(&dst, &tensors);
    let v = dst.verify(None, None).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// A restore that repairs local chunks (one corrupt, one missing) from a
/// compressing remote writes them back raw, byte for byte as the save had
/// stored them; the store then restores them on its own.
#[test]
fn repair_from_a_compressed_remote_writes_raw_chunks() {
    let tensors = model(2);
    let dir = tempfile::tempdir().unwrap();
    let remote = remote("repair", "zstd:1");
    let store = saved_and_uploaded(dir.path(), &remote, &tensors);
    let ids: Vec<ChunkId> = chunks(&store).iter().map(|c| c.0).collect();
    assert!(ids.len() >= 4, "{} chunks", ids.len());
    let (bad, gone) = (ids[0], ids[2]);
    let saved_bad = std::fs::read(store.chunk_path(&bad)).unwrap();
    let saved_gone = std::fs::read(store.chunk_path(&gone)).unwrap();
    let mut b = saved_bad.clone();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(store.chunk_path(&bad), &b).unwrap();
    std::fs::remove_file(store.chunk_path(&gone)).unwrap();

    let r = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_eq!(r.report.repaired, 2);
    for (id, saved) in [(bad, &saved_bad), (gone, &saved_gone)] {
        let got = std::fs::read(store.chunk_path(&id)).unwrap();
        assert_eq!(header(&got).0, 0, "repaired chunk {id} is raw");
        assert!(
            got == *saved,
            "repaired chunk {id} is stored as the save stored it"
        );
    }
    drop(store);
    let alone = open(dir.path(), CodecChoice::Raw);
    assert_restores(&alone, &tensors);
}

/// A local store configured with zstd holds what its saves would write: a
/// raw remote object is compressed on the way in, a compressed one is kept
/// as it is; both restore bit-exact. A store saved with zstd copied into a
/// raw one ends up raw.
#[test]
fn local_stores_follow_their_own_codec() {
    let tensors = model(3);
    let src_dir = tempfile::tempdir().unwrap();
    let zstd_remote = remote("keep", "zstd:1");
    let src = saved_and_uploaded(src_dir.path(), &zstd_remote, &tensors);
    let raw_remote = remote("raw", "raw");
    copy_checkpoint(&src, &raw_remote, "r", 1, &CopyOptions::default()).unwrap();
    for (id, len) in chunks(&raw_remote) {
        let object = ChunkTier::read_chunk_object(&raw_remote, &id, len).unwrap();
        assert_eq!(header(&object).0, 0, "raw remote chunk {id} is raw");
    }

    // From the raw remote into a zstd store: compressed, as its save would.
    let z1_dir = tempfile::tempdir().unwrap();
    let z1 = open(z1_dir.path(), CodecChoice::Zstd { level: 1 });
    let report = copy_checkpoint(&raw_remote, &z1, "r", 1, &CopyOptions::default()).unwrap();
    let mut stored = 0;
    for (id, len) in chunks(&z1) {
        let got = std::fs::read(z1.chunk_path(&id)).unwrap();
        stored += got.len() as u64;
        if len < 4096 {
            continue;
        }
        let (codec, filter, offset) = header(&got);
        assert_eq!(codec, 1, "chunk {id} is compressed in the zstd store");
        assert!(matches!(filter, 2 | 4), "chunk {id} filter {filter}");
        assert_eq!(offset, 64, "a compressed payload follows its header");
        assert!((got.len() as u64) < len, "chunk {id} shrank");
    }
    assert_eq!(report.bytes_copied, stored);
    assert_restores(&z1, &tensors);

    // From the compressing remote into a zstd store: kept as it is.
    let z2_dir = tempfile::tempdir().unwrap();
    let z2 = open(z2_dir.path(), CodecChoice::Zstd { level: 1 });
    copy_checkpoint(&zstd_remote, &z2, "r", 1, &CopyOptions::default()).unwrap();
    for (id, len) in chunks(&z2) {
        let got = std::fs::read(z2.chunk_path(&id)).unwrap();
        let up = ChunkTier::read_chunk_object(&zstd_remote, &id, len).unwrap();
        assert!(got == up, "chunk {id} is kept as the remote holds it");
    }
    assert_restores(&z2, &tensors);

    // From that zstd store into a raw one: raw again, as a raw save writes.
    let raw_dir = tempfile::tempdir().unwrap();
    let raw = open_copy_target(raw_dir.path());
    copy_checkpoint(&z2, &raw, "r", 1, &CopyOptions::default()).unwrap();
    for (id, _) in chunks(&raw) {
        let got = std::fs::read(raw.chunk_path(&id)).unwrap();
        let saved = std::fs::read(src.chunk_path(&id)).unwrap();
        assert!(got == saved, "chunk {id} is stored as a raw save stores it");
    }
    drop(raw);
    assert_restores(&open(raw_dir.path(), CodecChoice::Raw), &tensors);
}
