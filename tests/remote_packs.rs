//! Small chunks packed into larger remote objects, on the real S3 server:
//! a checkpoint of many small chunks goes up in few PUTs and comes back
//! bit-exact in few GETs; a flipped byte inside a pack is caught naming
//! its chunk and tensor; a second step reuses the packs of the first
//! (uploading about the changed share); remote collection keeps a pack
//! while any checkpoint's pack map names it and deletes it only once none
//! does and the grace has passed; a local tier repairs from packs.

use cairn::object_store::path::Path as ObjPath;
use cairn::object_store::{ObjectStore, PutPayload};
use cairn::testing::{FaultConfig, FaultyObjectStore, OpHook};
use cairn::{
    ChunkTier, DType, Error, ErrorKind, ManualClock, RemoteOptions, RemoteStore, SaveState,
    StepSel, Store, StoreOptions, TensorFilter,
};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Chunks of 256 KiB, packed up to 1 MiB each into packs of 4 MiB.
fn packing() -> RemoteOptions {
    RemoteOptions {
        pack_threshold: 1 << 20,
        pack_size: 4 << 20,
        ..RemoteOptions::default()
    }
}

fn open_remote(bucket: &str, opts: RemoteOptions) -> RemoteStore {
    RemoteStore::open(&format!("s3://{bucket}/ckpt"), &s3_options(), opts).unwrap()
}

fn open_local(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            chunk_size: 256 << 10,
            staging_bytes: 32 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// fp32 weights drawn like real ones (normal, small spread).
fn weights(seed: u64, bytes: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u1 = ((x >> 40) as f32 + 1.0) / 16_777_217.0;
        let u2 = (x & 0xFF_FFFF) as f32 / 16_777_216.0;
        let v = (-2.0 * u1.ln()).sqrt() * 0.02 * (std::f32::consts::TAU * u2).cos();
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// `n` tensors of 1 MiB (four chunks each); tensor `i` drawn from seed
/// `seeds[i]`.
fn tensors(seeds: &[u64]) -> Vec<(String, Vec<u8>)> {
    seeds
        .iter()
        .enumerate()
        .map(|(i, &s)| (format!("layer{i:02}.weight"), weights(s, 1 << 20)))
        .collect()
}

fn save(store: &Store, step: u64, t: &[(String, Vec<u8>)]) {
    let mut s = SaveState::new();
    for (name, data) in t {
        s = s.tensor(name.clone(), DType::F32, &[data.len() as u64 / 4], data);
    }
    store.save("r", step, &s).unwrap().wait().unwrap();
}

fn assert_same(r: &cairn::Restored, t: &[(String, Vec<u8>)]) {
    assert_eq!(r.tensors.len(), t.len());
    for (got, (name, data)) in r.tensors.iter().zip(t) {
        assert_eq!(&got.name, name);
        assert!(&got.data == data, "bytes of {name} differ");
    }
}

fn verify(remote: RemoteStore) -> cairn::VerifyReport {
    cairn::Tier::Remote(remote).verify(None, None).unwrap()
}

fn pack_ids(remote: &RemoteStore) -> BTreeSet<cairn::ChunkId> {
    remote
        .block_on(remote.list_packs())
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect()
}

/// Sixty-four chunks of 256 KiB go up as four packs: four pack PUTs, the
/// pack map and the manifest, against one PUT per chunk without packing;
/// nothing is stored at `chunks/`. A restore through a new handle (no map
/// read before) is bit-exact with one ranged GET per pack, and a remote
/// verify reads every chunk and finds nothing wrong.
#[test]
fn small_chunks_go_up_in_few_puts_and_come_back_bit_exact_in_few_gets() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&(0..16).collect::<Vec<_>>());
    save(&store, 1, &t);
    let chunks = store.manifest("r", 1).unwrap().distinct_chunks().len() as u64;
    assert_eq!(chunks, 64);

    // Packs off: one PUT per chunk.
    let plain = open_remote(&new_bucket("packs-off"), RemoteOptions::default());
    store.upload_to(&plain, "r", 1).unwrap();
    let plain_puts = plain.metrics().snapshot().put_requests;
    assert!(plain_puts > chunks, "{plain_puts} PUTs without packs");

    let bucket = new_bucket("packs");
    let remote = open_remote(&bucket, packing());
    let up = store.upload_to(&remote, "r", 1).unwrap();
    assert_eq!(up.chunks_uploaded, chunks);
    let m = remote.metrics().snapshot();
    let packs = pack_ids(&remote);
    assert_eq!(packs.len(), 4, "16 MiB of chunks in packs of 4 MiB");
    assert_eq!(m.packs_uploaded, 4);
    assert_eq!(
        m.put_requests, 7,
        "four packs, the pack map, the manifest and the grace record of a new remote: {m:?}"
    );
    assert!(
        ChunkTier::list_chunks(&remote).unwrap().is_empty(),
        "no chunk object of its own"
    );
    assert_eq!(up.bytes_uploaded, m.bytes_uploaded);

    // A new handle: nothing learned by the upload.
    let reader = open_remote(&bucket, packing());
    let r = reader
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
    let gets = reader.metrics().snapshot().get_requests;
    assert!(
        gets <= packs.len() as u64,
        "{gets} GETs for {chunks} chunks in {} packs",
        packs.len()
    );
    let plain_reader =
        RemoteStore::open(plain.url(), &s3_options(), RemoteOptions::default()).unwrap();
    let r = plain_reader
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
    assert!(plain_reader.metrics().snapshot().get_requests >= chunks);

    // A filtered restore reads only the selected tensor's chunks.
    let one = open_remote(&bucket, packing());
    let r = one
        .restore(
            "r",
            StepSel::Latest,
            &TensorFilter::names(["layer05.weight"]),
        )
        .unwrap();
    assert_eq!(r.tensors[0].data, t[5].1);

    let v = verify(open_remote(&bucket, packing()));
    assert_eq!(v.chunks_checked, chunks);
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// One byte flipped inside a pack: the restore fails with `CorruptChunk`
/// naming that chunk, its tensor and the pack; verify reports it the same
/// way; every other chunk still reads.
#[test]
fn a_flipped_byte_inside_a_pack_is_caught_naming_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&(100..108).collect::<Vec<_>>());
    save(&store, 1, &t);
    let bucket = new_bucket("packs-flip");
    let remote = open_remote(&bucket, packing());
    store.upload_to(&remote, "r", 1).unwrap();
    let map = remote
        .block_on(remote.pack_map("r", 1))
        .unwrap()
        .unwrap()
        .unwrap();
    // The third chunk of layer01 (tensor 1: chunks 4..8 of the manifest).
    let m = store.manifest("r", 1).unwrap();
    let victim = m.distinct_chunks()[6].0;
    let (pack, off, len) = map
        .packs
        .iter()
        .flat_map(|p| p.chunks.iter().map(move |c| (p.pack, c)))
        .find(|(_, c)| c.id == victim)
        .map(|(p, c)| (p, c.offset, c.len))
        .unwrap();
    let path: ObjPath = remote.pack_path(&pack);
    let os = remote.object_store().clone();
    let mut bytes = remote
        .block_on(async { os.get(&path).await.unwrap().bytes().await.unwrap() })
        .unwrap()
        .to_vec();
    bytes[(off + len / 2) as usize] ^= 0x40;
    remote
        .block_on(async {
            os.put(&path, PutPayload::from(bytes)).await.unwrap();
        })
        .unwrap();

    let reader = open_remote(&bucket, packing());
    let err = reader
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Data, "{err}");
    match &err {
        Error::CorruptChunk {
            chunk,
            path,
            tensors,
            ..
        } => {
            assert_eq!(chunk, &victim.to_hex());
            assert!(tensors.iter().any(|n| n == "layer01.weight"), "{tensors:?}");
            assert!(
                path.to_string_lossy().contains(&pack.to_hex()),
                "{path:?} names the pack"
            );
        }
        e => panic!("expected CorruptChunk, got {e:?}"),
    }
    let v = verify(open_remote(&bucket, packing()));
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert_eq!(
        v.problems[0].chunk.as_deref(),
        Some(victim.to_hex().as_str())
    );
    // The other tensors still come back.
    let r = open_remote(&bucket, packing())
        .restore(
            "r",
            StepSel::Latest,
            &TensorFilter::names(["layer00.weight", "layer05.weight"]),
        )
        .unwrap();
    assert_eq!(r.tensors[0].data, t[0].1);
    assert_eq!(r.tensors[1].data, t[5].1);
}

/// A second step that changes two of twenty tensors (10% of the bytes)
/// reuses the packs of the first for the rest: it uploads about a tenth
/// of the bytes in one new pack, and restores bit-exact. Run again after
/// the commit, the upload finds everything in place.
#[test]
fn a_second_step_reuses_the_packs_of_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let seeds: Vec<u64> = (200..220).collect();
    let t1 = tensors(&seeds);
    save(&store, 1, &t1);
    let mut seeds2 = seeds.clone();
    seeds2[3] = 900;
    seeds2[14] = 901;
    let t2 = tensors(&seeds2);
    save(&store, 2, &t2);
    let bucket = new_bucket("packs-dedup");
    let remote = open_remote(&bucket, packing());
    let up1 = store.upload_to(&remote, "r", 1).unwrap();
    let packs1 = pack_ids(&remote);
    let up2 = store.upload_to(&remote, "r", 2).unwrap();
    let share = up2.bytes_uploaded as f64 / up1.bytes_uploaded as f64;
    eprintln!(
        "step 1: {} bytes in {} packs; step 2: {} bytes ({share:.3}), {} chunks reused",
        up1.bytes_uploaded,
        packs1.len(),
        up2.bytes_uploaded,
        up2.chunks_skipped
    );
    assert_eq!(up2.chunks_skipped, 72, "18 unchanged tensors of 4 chunks");
    assert_eq!(up2.chunks_uploaded, 8);
    assert!(
        (0.05..=0.15).contains(&share),
        "step 2 uploaded {share:.3} of step 1's bytes"
    );
    assert_eq!(pack_ids(&remote).len(), packs1.len() + 1, "one new pack");
    let r = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t2);
    let again = store.upload_to(&remote, "r", 2).unwrap();
    assert!(again.already_committed);
    assert_eq!(again.bytes_uploaded, 0);
}

/// Remote collection and packs, on a `ManualClock` over real server
/// times: a pack stays while any committed checkpoint's pack map names it
/// (past the grace too); once the only checkpoint naming it is deleted, it
/// stays until the grace has passed, then goes, while the packs the other
/// checkpoint names stay and it still restores bit-exact. With every
/// checkpoint gone, every pack and pack map goes.
#[test]
fn collection_deletes_a_pack_only_when_no_checkpoint_references_it() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = ManualClock::at_ms(now_ms);
    let grace = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    // Step 2 changes the first four tensors: exactly the first pack of
    // step 1 (4 MiB of chunks), which only step 1 then names.
    let seeds: Vec<u64> = (300..312).collect();
    let t1 = tensors(&seeds);
    save(&store, 1, &t1);
    let mut seeds2 = seeds.clone();
    for s in seeds2.iter_mut().take(4) {
        *s += 1000;
    }
    let t2 = tensors(&seeds2);
    save(&store, 2, &t2);
    let bucket = new_bucket("packs-gc");
    let opts = RemoteOptions {
        gc_grace: grace,
        ..packing()
    };
    let remote = open_remote(&bucket, opts.clone()).with_clock(Arc::new(clock.clone()));
    store.upload_to(&remote, "r", 1).unwrap();
    let packs1 = pack_ids(&remote);
    let map1 = remote
        .block_on(remote.pack_map("r", 1))
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(packs1.len(), 3);
    store.upload_to(&remote, "r", 2).unwrap();
    let map2 = remote
        .block_on(remote.pack_map("r", 2))
        .unwrap()
        .unwrap()
        .unwrap();
    let named2: BTreeSet<_> = map2.packs.iter().map(|p| p.pack).collect();
    let only1: Vec<_> = packs1.difference(&named2).copied().collect();
    assert_eq!(
        only1.len(),
        1,
        "one pack of step 1 holds only changed chunks"
    );
    assert_eq!(only1[0], map1.packs[0].pack);
    let all = pack_ids(&remote);
    assert_eq!(all.len(), 4);

    // Both checkpoints live, everything past the grace: nothing goes.
    clock.advance(grace * 2);
    let g = remote.gc(grace, false).unwrap();
    assert_eq!(g.packs_deleted, 0, "{g:?}");
    assert_eq!(g.referenced_packs, 4);
    assert_eq!(pack_ids(&remote), all);

    // Step 1 deleted: its pack map is no longer that of a committed
    // checkpoint (the map object stays until a collection past the grace).
    clock.set_ms(now_ms);
    remote
        .block_on(remote.delete_checkpoint("r", 1))
        .unwrap()
        .unwrap();
    assert!(remote
        .block_on(remote.pack_map("r", 1))
        .unwrap()
        .unwrap()
        .is_none());
    // Within the grace the unreferenced pack stays.
    let g = remote.gc(grace, false).unwrap();
    assert_eq!((g.packs_deleted, g.packs_in_grace), (0, 1), "{g:?}");
    assert_eq!(pack_ids(&remote), all);
    // A dry run past the grace names it and deletes nothing.
    clock.advance(grace * 2);
    let g = remote.gc(grace, true).unwrap();
    assert_eq!(g.packs_deleted, 1);
    assert_eq!(pack_ids(&remote), all);
    // Past the grace it goes; step 2's packs stay and it restores.
    let known = remote.packed_chunks_known();
    let g = remote.gc(grace, false).unwrap();
    assert_eq!(g.packs_deleted, 1, "{g:?}");
    let left = pack_ids(&remote);
    assert_eq!(left, named2);
    assert!(!left.contains(&only1[0]));
    // The store no longer remembers chunks in the deleted pack (a daemon
    // that runs for weeks would otherwise hold every packed chunk it ever
    // uploaded).
    let in2: usize = map2.packs.iter().map(|p| p.chunks.len()).sum();
    let in_only1 = map1.packs[0].chunks.len();
    assert_eq!(known, in2 + in_only1);
    assert_eq!(remote.packed_chunks_known(), in2);
    let r = open_remote(&bucket, opts.clone())
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t2);

    // Every checkpoint gone: every pack goes, past the grace.
    remote
        .block_on(remote.delete_checkpoint("r", 2))
        .unwrap()
        .unwrap();
    let g = remote.gc(grace, false).unwrap();
    assert_eq!(g.packs_deleted, 3, "{g:?}");
    assert!(pack_ids(&remote).is_empty());
    assert_eq!(remote.packed_chunks_known(), 0);
}

/// A pack map left by an upload that never committed is no root: its
/// packs and the map itself are collected past the grace, never before.
#[test]
fn an_uncommitted_pack_map_is_no_root_and_is_collected_past_the_grace() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = ManualClock::at_ms(now_ms);
    let grace = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    save(&store, 1, &tensors(&[7, 8, 9, 10]));
    let bucket = new_bucket("packs-orphan");
    let opts = RemoteOptions {
        gc_grace: grace,
        ..packing()
    };
    let remote = open_remote(&bucket, opts).with_clock(Arc::new(clock.clone()));
    store.upload_to(&remote, "r", 1).unwrap();
    // As if the upload stopped between its pack map and its manifest.
    let os = remote.object_store().clone();
    let manifest = remote.manifest_path("r", 1);
    remote
        .block_on(async { os.delete(&manifest).await.unwrap() })
        .unwrap();
    assert!(ChunkTier::steps(&remote, "r").unwrap().is_empty());
    let g = remote.gc(grace, false).unwrap();
    assert_eq!((g.packs_deleted, g.leftovers_removed), (0, 0), "{g:?}");
    clock.advance(grace * 2);
    let g = remote.gc(grace, false).unwrap();
    assert_eq!(g.packs_deleted, 1, "{g:?}");
    assert_eq!(g.leftovers_removed, 1, "the orphaned pack map");
    assert!(pack_map_objects(&remote).is_empty());
    assert!(pack_ids(&remote).is_empty());
}

/// A local store backed by a packing remote repairs a corrupt local chunk
/// from its pack, through a remote handle that has read no pack map yet.
#[test]
fn the_local_tier_repairs_from_a_pack() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_local(dir.path());
    let t = tensors(&[40, 41, 42]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-repair");
    store
        .upload_to(&open_remote(&bucket, packing()), "r", 1)
        .unwrap();
    let victim = store.manifest("r", 1).unwrap().distinct_chunks()[5].0;
    let file = dir
        .path()
        .join("chunks")
        .join(victim.prefix())
        .join(victim.to_hex());
    let mut b = std::fs::read(&file).unwrap();
    let n = b.len();
    b[n - 10] ^= 1;
    std::fs::write(&file, b).unwrap();
    store.attach_remote(open_remote(&bucket, packing()));
    let r = store
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert_eq!(r.report.repaired, 1);
    assert_same(&r, &t);
}

/// Packs older than half the grace are not relied on: a later step with
/// the same chunks packs them again, which makes the same packs (the same
/// chunks in the same order), so it puts them again over the old ones,
/// renewing them, and counts them as renewed.
#[test]
fn packs_older_than_half_the_grace_are_renewed_not_relied_on() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = ManualClock::at_ms(now_ms);
    let grace = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&[60, 61, 62, 63, 64, 65]);
    save(&store, 1, &t);
    save(&store, 2, &t);
    let bucket = new_bucket("packs-renew");
    let opts = RemoteOptions {
        gc_grace: grace,
        ..packing()
    };
    let remote = open_remote(&bucket, opts.clone()).with_clock(Arc::new(clock.clone()));
    let up1 = store.upload_to(&remote, "r", 1).unwrap();
    let packs = pack_ids(&remote);
    assert_eq!(packs.len(), 2);
    // Young: step 2 relies on them.
    let up2 = store.upload_to(&remote, "r", 2).unwrap();
    assert_eq!((up2.chunks_skipped, up2.bytes_uploaded), (24, 0));
    save(&store, 3, &t);
    clock.advance(grace / 2 + Duration::from_secs(60));
    let up3 = store.upload_to(&remote, "r", 3).unwrap();
    assert_eq!(up3.chunks_skipped, 0, "stale packs are not relied on");
    assert_eq!(up3.chunks_renewed, 2, "both packs put again");
    assert_eq!(up3.bytes_uploaded, up1.bytes_uploaded);
    assert_eq!(pack_ids(&remote), packs, "the same packs");
    let r = open_remote(&bucket, opts)
        .restore("r", StepSel::Step(3), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
}

/// `pack_threshold` and `pack_size` are remote options with sizes; a
/// value that is not a size is refused naming the option.
#[test]
fn pack_options_parse_sizes_and_refuse_others() {
    let bucket = new_bucket("packs-opts");
    let url = format!("s3://{bucket}/ckpt");
    let mut o = s3_options();
    o.push(("pack_threshold".into(), "4MiB".into()));
    o.push(("pack_size".into(), "32M".into()));
    let r = RemoteStore::open(&url, &o, RemoteOptions::default()).unwrap();
    assert_eq!(r.options().pack_threshold, 4 << 20);
    assert_eq!(r.options().pack_size, 32 << 20);
    assert_eq!(RemoteOptions::default().pack_threshold, 0, "off by default");
    for (k, v) in [("pack_threshold", "4 parsecs"), ("pack_size", "0")] {
        let mut o = s3_options();
        o.push((k.into(), v.into()));
        let e = RemoteStore::open(&url, &o, RemoteOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains(k), "{e}");
    }
}

// ---- Races and leftovers around pack maps ----

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Whether `path` is that of a pack map (`runs/<run>/<step>/packs…json`).
fn is_pack_map(path: &ObjPath) -> bool {
    path.filename()
        .is_some_and(|f| f.starts_with("packs") && f.ends_with(".json"))
}

/// Every pack map object of run `r` step 1: path, bytes, last-modified
/// (ms).
fn pack_map_objects(remote: &RemoteStore) -> Vec<(ObjPath, Vec<u8>, i64)> {
    let os = remote.object_store().clone();
    remote
        .block_on(async move {
            let dir = ObjPath::from("ckpt/runs/r/00000000000000000001");
            let listed = os.list_with_delimiter(Some(&dir)).await.unwrap();
            let mut out = Vec::new();
            for m in listed
                .objects
                .into_iter()
                .filter(|m| is_pack_map(&m.location))
            {
                let b = os.get(&m.location).await.unwrap().bytes().await.unwrap();
                out.push((m.location, b.to_vec(), m.last_modified.timestamp_millis()));
            }
            out
        })
        .unwrap()
}

fn delete_objects(remote: &RemoteStore, paths: Vec<ObjPath>) {
    let os = remote.object_store().clone();
    remote
        .block_on(async move {
            for p in paths {
                os.delete(&p).await.unwrap();
            }
        })
        .unwrap()
}

/// The S3 remote of `bucket` behind `hook` (no faults).
fn hooked(bucket: &str, opts: RemoteOptions, hook: OpHook) -> RemoteStore {
    let url = format!("s3://{bucket}/ckpt");
    let base = RemoteStore::open(&url, &s3_options(), opts.clone()).unwrap();
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
    RemoteStore::new(Arc::new(faulty), ObjPath::from("ckpt"), &url, opts)
}

/// Two writers upload different checkpoints of the same run and step: the
/// one that loses the commit race (its manifest put is refused) leaves the
/// winner whole. The winner restores bit-exact from a fresh handle and
/// verifies clean, also after a collection past the grace, which keeps
/// every pack the winner's map names.
#[test]
fn a_writer_that_loses_the_commit_race_leaves_the_winners_checkpoint_whole() {
    let clock = ManualClock::at_ms(now_ms());
    let grace = Duration::from_secs(3600);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open_local(da.path()), open_local(db.path()));
    let ta = tensors(&[500, 501, 502, 503, 504, 505]);
    let tb = tensors(&[600, 601, 602, 603, 604, 605]);
    save(&a, 1, &ta);
    save(&b, 1, &tb);
    let bucket = new_bucket("packs-race");
    let opts = RemoteOptions {
        gc_grace: grace,
        ..packing()
    };
    a.upload_to(&open_remote(&bucket, opts.clone()), "r", 1)
        .unwrap();
    let e = b
        .upload_to(&open_remote(&bucket, opts.clone()), "r", 1)
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");
    let r = open_remote(&bucket, opts.clone())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &ta);
    let v = verify(open_remote(&bucket, opts.clone()));
    assert!(v.problems.is_empty(), "{v:?}");
    // Past the grace, a collection keeps what the winner's map names.
    clock.advance(grace * 2);
    let gc = open_remote(&bucket, opts.clone()).with_clock(Arc::new(clock.clone()));
    gc.gc(grace, false).unwrap();
    let r = open_remote(&bucket, opts.clone())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &ta);
}

/// A packing upload stopped between its pack map and its manifest; its
/// packs are collected; the same checkpoint is then uploaded without
/// packing and commits. Reads do not trust the stale map over the chunk
/// objects the later upload put: the checkpoint restores bit-exact and
/// verifies clean, and still does when a map naming the missing packs is
/// put back next to it (as a writer that does not know pack maps would
/// leave it).
#[test]
fn a_stale_pack_map_is_not_trusted_over_the_chunk_objects_of_a_later_upload() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&[700, 701, 702, 703]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-stale");
    let remote = open_remote(&bucket, packing());
    store.upload_to(&remote, "r", 1).unwrap();
    // As if the upload stopped before its manifest, and a collection then
    // removed its packs.
    delete_objects(&remote, vec![remote.manifest_path("r", 1)]);
    let maps = pack_map_objects(&remote);
    assert_eq!(maps.len(), 1);
    let packs: Vec<ObjPath> = pack_ids(&remote)
        .iter()
        .map(|id| remote.pack_path(id))
        .collect();
    assert!(!packs.is_empty());
    delete_objects(&remote, packs);
    // Uploaded again without packing: every chunk at chunks/.
    store
        .upload_to(&open_remote(&bucket, RemoteOptions::default()), "r", 1)
        .unwrap();
    let r = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
    let v = verify(open_remote(&bucket, packing()));
    assert!(v.problems.is_empty(), "{v:?}");
    // The stale map back in place: reads fall back to chunks/.
    let (path, bytes, _) = maps.into_iter().next().unwrap();
    let os = remote.object_store().clone();
    remote
        .block_on(async move { os.put(&path, PutPayload::from(bytes)).await.unwrap() })
        .unwrap();
    let r = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
    let v = verify(open_remote(&bucket, packing()));
    assert!(v.problems.is_empty(), "{v:?}");
}

/// A collection finds an orphaned pack map older than the grace (an
/// upload stopped before its manifest, long ago); before it deletes the
/// map, the same checkpoint is uploaded again, which puts the map anew and
/// commits. The collection leaves the renewed map alone, so the committed
/// checkpoint restores bit-exact afterwards.
#[test]
fn collection_leaves_a_pack_map_that_an_upload_renewed_meanwhile() {
    let grace = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_local(dir.path()));
    let t = tensors(&[800, 801, 802, 803]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-map-race");
    let opts = RemoteOptions {
        gc_grace: grace,
        ..packing()
    };
    let remote = open_remote(&bucket, opts.clone());
    store.upload_to(&remote, "r", 1).unwrap();
    delete_objects(&remote, vec![remote.manifest_path("r", 1)]);
    let maps = pack_map_objects(&remote);
    assert_eq!(maps.len(), 1);
    let first_put = maps[0].2;
    std::thread::sleep(Duration::from_secs(3));
    // By this clock the orphaned map (and its packs) are just past the
    // grace; anything put from now on is within it.
    let clock = ManualClock::at_ms(first_put + grace.as_millis() as i64 + 1500);
    let uploader = Arc::new(open_remote(&bucket, opts.clone()).with_clock(Arc::new(clock.clone())));
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook: OpHook = {
        let (store, uploader, fired) = (store.clone(), uploader.clone(), fired.clone());
        Arc::new(move |op: &'static str, path: &ObjPath| {
            if (op == "get" || op == "delete")
                && is_pack_map(path)
                && !fired.swap(true, Ordering::SeqCst)
            {
                let (store, uploader) = (store.clone(), uploader.clone());
                std::thread::spawn(move || store.upload_to(&uploader, "r", 1).unwrap())
                    .join()
                    .unwrap();
            }
        })
    };
    let gc = hooked(&bucket, opts.clone(), hook).with_clock(Arc::new(clock.clone()));
    gc.gc(grace, false).unwrap();
    assert!(
        fired.load(Ordering::SeqCst),
        "the collection looked at the map"
    );
    assert_eq!(ChunkTier::steps(&remote, "r").unwrap(), vec![1]);
    assert!(remote
        .block_on(remote.pack_map("r", 1))
        .unwrap()
        .unwrap()
        .is_some());
    let r = open_remote(&bucket, opts)
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
}

/// A collector removes the pack map between an upload's put of it and the
/// upload's commit (it had found an old map of the same manifest and was
/// stalled before its delete): the upload finds its map gone after the
/// commit and puts it back, so the checkpoint restores bit-exact.
#[test]
fn an_upload_puts_back_a_pack_map_removed_before_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&[900, 901, 902, 903]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-map-back");
    let plain = Arc::new(open_remote(&bucket, packing()));
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook: OpHook = {
        let (plain, fired) = (plain.clone(), fired.clone());
        Arc::new(move |op: &'static str, path: &ObjPath| {
            if op == "put"
                && path.filename() == Some("manifest.cairn")
                && !fired.swap(true, Ordering::SeqCst)
            {
                let plain = plain.clone();
                std::thread::spawn(move || {
                    let maps = pack_map_objects(&plain);
                    assert_eq!(maps.len(), 1);
                    delete_objects(&plain, maps.into_iter().map(|m| m.0).collect());
                })
                .join()
                .unwrap();
            }
        })
    };
    store
        .upload_to(&hooked(&bucket, packing(), hook), "r", 1)
        .unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(pack_map_objects(&plain).len(), 1, "the map is back");
    let r = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
}

/// A pack put that meets another object at the pack's name (another
/// writer's put in flight, which may yet fail) does not count as stored
/// unseen: the upload puts its own bytes there, and the checkpoint
/// restores bit-exact.
#[test]
fn a_pack_put_does_not_rely_on_another_writers_object_at_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&[1000, 1001, 1002, 1003]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-put-race");
    let plain = Arc::new(open_remote(&bucket, packing()));
    let fired = Arc::new(AtomicU64::new(0));
    let hook: OpHook = {
        let (plain, fired) = (plain.clone(), fired.clone());
        Arc::new(move |op: &'static str, path: &ObjPath| {
            if op.starts_with("put") && path.as_ref().contains("/packs/") {
                fired.fetch_add(1, Ordering::SeqCst);
                let (plain, path) = (plain.clone(), path.clone());
                std::thread::spawn(move || {
                    let os = plain.object_store().clone();
                    plain
                        .block_on(async move {
                            os.put(&path, PutPayload::from(vec![0u8; 4096]))
                                .await
                                .unwrap()
                        })
                        .unwrap();
                })
                .join()
                .unwrap();
            }
        })
    };
    store
        .upload_to(&hooked(&bucket, packing(), hook), "r", 1)
        .unwrap();
    assert!(fired.load(Ordering::SeqCst) > 0);
    let r = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
}

/// Pack maps that cannot be used stop nothing: an unreadable map of the
/// previous step only costs the next upload its reuse of packs (it still
/// commits and restores bit-exact), and a stray map object under a name
/// that is no valid run is passed over by collection.
#[test]
fn unreadable_or_stray_pack_maps_stop_neither_uploads_nor_collections() {
    let clock = ManualClock::at_ms(now_ms());
    let grace = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t1 = tensors(&[1100, 1101, 1102, 1103]);
    let t2 = tensors(&[1100, 1101, 1102, 1199]);
    save(&store, 1, &t1);
    save(&store, 2, &t2);
    let bucket = new_bucket("packs-badmap");
    let opts = RemoteOptions {
        gc_grace: grace,
        ..packing()
    };
    let remote = open_remote(&bucket, opts.clone()).with_clock(Arc::new(clock.clone()));
    store.upload_to(&remote, "r", 1).unwrap();
    let maps = pack_map_objects(&remote);
    assert_eq!(maps.len(), 1);
    let (path, good, _) = maps.into_iter().next().unwrap();
    let put = |bytes: Vec<u8>, path: ObjPath| {
        let os = remote.object_store().clone();
        remote
            .block_on(async move { os.put(&path, PutPayload::from(bytes)).await.unwrap() })
            .unwrap();
    };
    put(b"{not a pack map".to_vec(), path.clone());
    let up = store.upload_to(&remote, "r", 2).unwrap();
    assert_eq!(
        up.chunks_skipped, 0,
        "nothing reused through an unreadable map"
    );
    let r = open_remote(&bucket, opts.clone())
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t2);
    put(good, path);
    put(
        b"{}".to_vec(),
        ObjPath::from(format!(
            "ckpt/runs/bad+run/00000000000000000001/packs.{}.json",
            "0".repeat(64)
        )),
    );
    clock.advance(grace * 2);
    remote.gc(grace, false).unwrap();
    for (step, t) in [(1, &t1), (2, &t2)] {
        let r = open_remote(&bucket, opts.clone())
            .restore("r", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_same(&r, t);
    }
}

/// A pack shorter than its map says (bytes lost at the end) is a
/// `CorruptChunk` naming the chunk and the pack, found at once, not a
/// transient error retried until the budget runs out.
#[test]
fn a_pack_shorter_than_its_map_is_a_corrupt_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&[1200, 1201, 1202, 1203]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-short");
    let remote = open_remote(&bucket, packing());
    store.upload_to(&remote, "r", 1).unwrap();
    let ids = pack_ids(&remote);
    assert_eq!(ids.len(), 1);
    let path = remote.pack_path(ids.iter().next().unwrap());
    let os = remote.object_store().clone();
    remote
        .block_on(async move {
            let b = os.get(&path).await.unwrap().bytes().await.unwrap();
            let half = b.slice(..b.len() / 2);
            os.put(&path, PutPayload::from(half)).await.unwrap();
        })
        .unwrap();
    let t0 = std::time::Instant::now();
    let e = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    match &e {
        Error::CorruptChunk { reason, path, .. } => {
            assert!(reason.contains("shorter than its pack map"), "{e:?}");
            assert!(path.to_string_lossy().contains("packs/"), "{e:?}");
        }
        e => panic!("not a CorruptChunk: {e:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::Data);
    eprintln!("short pack found in {:?}", t0.elapsed());
}

/// `copy_checkpoint` with `verify_present` (what `restore --to` sets)
/// does not rely on a pack of the same name that is already there but
/// does not read back whole: it puts the pack again, so the copy repairs
/// it.
#[test]
fn a_verifying_copy_repairs_a_corrupt_pack_already_present() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_local(dir.path());
    let t = tensors(&[1300, 1301, 1302, 1303]);
    save(&store, 1, &t);
    let bucket = new_bucket("packs-verify");
    let remote = open_remote(&bucket, packing());
    store.upload_to(&remote, "r", 1).unwrap();
    let ids = pack_ids(&remote);
    let path = remote.pack_path(ids.iter().next().unwrap());
    let os = remote.object_store().clone();
    remote
        .block_on(async move {
            let mut b = os.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
            let n = b.len();
            b[n - 100] ^= 1;
            os.put(&path, PutPayload::from(b)).await.unwrap();
        })
        .unwrap();
    // Deleted remotely with its map, copied again with verification: the
    // same chunks make the same pack, found present.
    let mut gone = vec![remote.manifest_path("r", 1)];
    gone.extend(pack_map_objects(&remote).into_iter().map(|m| m.0));
    delete_objects(&remote, gone);
    let opts = cairn::CopyOptions {
        verify_present: true,
        ..Default::default()
    };
    let target = open_remote(&bucket, packing());
    cairn::copy_checkpoint(&store, &target, "r", 1, &opts).unwrap();
    let r = open_remote(&bucket, packing())
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_same(&r, &t);
}
