//! Small chunks packed into larger remote objects, on the real S3 server:
//! a checkpoint of many small chunks goes up in few PUTs and comes back
//! bit-exact in few GETs; a flipped byte inside a pack is caught naming
//! its chunk and tensor; a second step reuses the packs of the first
//! (uploading about the changed share); remote collection keeps a pack
//! while any checkpoint's pack map names it and deletes it only once none
//! does and the grace has passed; a local tier repairs from packs.

use cairn::object_store::path::Path as ObjPath;
use cairn::object_store::{ObjectStore, PutPayload};
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
        m.put_requests, 6,
        "four packs, the pack map and the manifest: {m:?}"
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

    // Step 1 deleted: its pack map goes with its manifest.
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
    let g = remote.gc(grace, false).unwrap();
    assert_eq!(g.packs_deleted, 1, "{g:?}");
    let left = pack_ids(&remote);
    assert_eq!(left, named2);
    assert!(!left.contains(&only1[0]));
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
    assert!(remote
        .block_on(remote.pack_map("r", 1))
        .unwrap()
        .unwrap()
        .is_none());
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
