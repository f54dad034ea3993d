//! Sharded steps on the remote tier, against the loopback S3 server: the
//! remote commit chooses each rank's part by the local commit's rule, and
//! a process restoring many small regions that share chunks downloads
//! each chunk once.

use cairn::{
    ChunkTier, DType, Error, RegionTarget, RemoteOptions, RemoteStore, SaveState, ShardInfo,
    StepSel, Store, StoreOptions,
};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

/// Deterministic bytes for `name`.
fn gen_bytes(name: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ name.bytes().fold(7u64, |h, b| h * 131 + b as u64);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn s3_options() -> Vec<(String, String)> {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT");
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

/// A fresh bucket; returns the remote URL.
fn s3_bucket(tag: &str) -> String {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT");
    let name = format!("cairn-{tag}-{}", std::process::id());
    let hostport = ep.trim_start_matches("http://");
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
    format!("s3://{name}/ckpt")
}

fn open_remote(url: &str) -> RemoteStore {
    RemoteStore::open(url, &s3_options(), RemoteOptions::default()).unwrap()
}

/// Rank `rank` of 2 of a `[8, 512]` U8 tensor `w`, row-sharded, holding
/// `data` (its 4 rows).
fn save_half(store: &Store, step: u64, rank: u32, data: &[u8]) {
    let s = SaveState::new().shard(
        "w",
        DType::U8,
        &[4, 512],
        data,
        ShardInfo {
            global_shape: vec![8, 512],
            offsets: vec![4 * rank as u64, 0],
        },
    );
    store
        .save_part("r", step, rank, 2, &s)
        .unwrap()
        .wait()
        .unwrap();
}

/// The part files of `rank` under `(r, step)`.
fn files_of(store: &Store, step: u64, rank: u32) -> Vec<String> {
    store
        .parts("r", step)
        .unwrap()
        .into_iter()
        .filter(|p| p.rank == rank)
        .map(|p| p.file)
        .collect()
}

#[test]
fn remote_commit_chooses_each_ranks_part_as_the_local_commit_does() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let url = s3_bucket("sharded-attempts");
    let remote = open_remote(&url);

    // Step 1: rank 1 saved twice with different contents (a retried save
    // after the state changed). The local commit refuses; so must the
    // remote one, naming the same two files, and publish nothing.
    let (a, b, b2) = (
        gen_bytes("a", 2048),
        gen_bytes("b", 2048),
        gen_bytes("b2", 2048),
    );
    save_half(&store, 1, 0, &a);
    save_half(&store, 1, 1, &b);
    save_half(&store, 1, 1, &b2);
    let attempts = files_of(&store, 1, 1);
    assert_eq!(attempts.len(), 2, "two attempts of rank 1");
    let local = store.commit("r", 1, 2).unwrap_err();
    let Error::PartsDisagree {
        first: lf,
        other: lo,
        ..
    } = &local
    else {
        panic!("local commit: expected PartsDisagree, got {local}");
    };
    let up = store.upload_parts(&remote, "r", 1, 2);
    let e = remote.commit("r", 1, 2).unwrap_err();
    match &e {
        Error::PartsDisagree {
            what,
            first_rank: 1,
            other_rank: 1,
            first,
            other,
            ..
        } => {
            assert_eq!(*what, "part");
            assert_eq!((first, other), (lf, lo), "remote: {e}; local: {local}");
        }
        _ => panic!("remote commit: expected PartsDisagree like the local one ({local}), got {e}"),
    }
    assert_eq!(e.kind(), local.kind());
    // The uploader reports the refusal too, and nothing became visible.
    match up {
        Err(Error::PartsDisagree { .. }) => {}
        other => panic!("upload_parts: expected PartsDisagree, got {other:?}"),
    }
    assert_eq!(remote.parts("r", 1).unwrap().len(), 3);
    assert!(ChunkTier::steps(&remote, "r").unwrap().is_empty());

    // Step 2: rank 1 saved twice with the same contents (parts differ in
    // their save time only). Both commits accept and build the same
    // record, byte for byte, from the same parts.
    save_half(&store, 2, 0, &a);
    save_half(&store, 2, 1, &b);
    std::thread::sleep(Duration::from_millis(5));
    save_half(&store, 2, 1, &b);
    assert_eq!(files_of(&store, 2, 1).len(), 2, "two attempts of rank 1");
    let lr = store.commit("r", 2, 2).unwrap();
    let rr = store
        .upload_parts(&remote, "r", 2, 2)
        .unwrap()
        .committed
        .expect("every rank is on the remote");
    assert!(rr.created);
    assert_eq!((lr.parts, rr.parts), (3, 3));
    assert_eq!(
        ChunkTier::manifest_bytes(&remote, "r", 2).unwrap(),
        store.manifest_bytes("r", 2).unwrap(),
        "the remote record differs from the local one"
    );
    let mut out = vec![0u8; 8 * 512];
    remote
        .restore_region("r", StepSel::Step(2), "w", &[0, 0], &[8, 512], &mut out)
        .unwrap();
    assert!(out[..2048] == a[..] && out[2048..] == b[..]);
}

#[test]
fn remote_restore_of_many_small_regions_downloads_each_shared_chunk_once() {
    const WORLD: u32 = 4;
    const TENSORS: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let url = s3_bucket("sharded-fetch");
    // Small tensors [16, 96] F32, row-sharded over 4 ranks (4 rows, 1.5 KiB
    // a shard): each rank's shards are packed into shared chunks.
    let shape = [16u64, 96];
    let globals: Vec<Vec<u8>> = (0..TENSORS)
        .map(|t| gen_bytes(&format!("t{t}"), (shape[0] * shape[1] * 4) as usize))
        .collect();
    let row = (shape[1] * 4) as usize;
    for rank in 0..WORLD {
        let rows = 4 * rank as usize..4 * (rank as usize + 1);
        let mut s = SaveState::new();
        for (t, g) in globals.iter().enumerate() {
            s = s.shard(
                format!("t{t}"),
                DType::F32,
                &[4, shape[1]],
                &g[rows.start * row..rows.end * row],
                ShardInfo {
                    global_shape: shape.to_vec(),
                    offsets: vec![rows.start as u64, 0],
                },
            );
        }
        store
            .save_part("m", 1, rank, WORLD, &s)
            .unwrap()
            .wait()
            .unwrap();
    }
    store.commit("m", 1, WORLD).unwrap();
    let uploader = open_remote(&url);
    store.upload_to(&uploader, "m", 1).unwrap();
    let m = store.manifest("m", 1).unwrap();
    let chunks: BTreeSet<String> = m
        .distinct_chunks()
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    let shards: usize = m.sharded.iter().map(|t| t.shards.len()).sum();
    assert_eq!(shards, TENSORS * WORLD as usize);
    assert!(
        chunks.len() * 4 <= shards,
        "shards are not packed: {} chunks for {shards} shards",
        chunks.len()
    );

    // A restoring process of another layout: rows 5..11 of every tensor
    // (crossing three ranks' shards), all in one call.
    let (off, rshape) = ([5u64, 0], [6u64, shape[1]]);
    let mut outs: Vec<Vec<u8>> = vec![vec![0u8; 6 * row]; TENSORS];
    let names: Vec<String> = (0..TENSORS).map(|t| format!("t{t}")).collect();
    let reader = open_remote(&url);
    let mut targets: Vec<RegionTarget<'_>> = outs
        .iter_mut()
        .zip(&names)
        .map(|(out, name)| RegionTarget {
            name,
            offsets: &off,
            shape: &rshape,
            out,
        })
        .collect();
    let rep = reader
        .restore_regions("m", StepSel::Step(1), &mut targets)
        .unwrap();
    drop(targets);
    for (t, g) in globals.iter().enumerate() {
        assert!(outs[t] == g[5 * row..11 * row], "t{t} differs");
    }
    let got = reader.metrics().snapshot();
    // Rows 5..11 live in ranks 1 and 2's shards: those ranks' chunks are
    // needed, each downloaded once, whatever the number of regions.
    let needed: BTreeSet<String> = m
        .sharded
        .iter()
        .flat_map(|t| t.shards.iter())
        .filter(|s| s.offsets[0] < 11 && s.offsets[0] + s.shape[0] > 5)
        .flat_map(|s| s.chunks.iter().map(|c| c.id.to_string()))
        .collect();
    assert_eq!(
        got.chunks_downloaded,
        needed.len() as u64,
        "{TENSORS} regions sharing {} chunks: {got:?}",
        needed.len()
    );
    assert_eq!(rep.chunks_read, needed.len() as u64);

    // For the record: the same regions read one call each.
    let one_by_one = open_remote(&url);
    for name in &names {
        let mut out = vec![0u8; 6 * row];
        one_by_one
            .restore_region("m", StepSel::Step(1), name, &off, &rshape, &mut out)
            .unwrap();
    }
    let each = one_by_one.metrics().snapshot();
    eprintln!(
        "{TENSORS} regions over {} shared chunks: one call downloaded {} chunks ({} bytes); one call per region {} chunks ({} bytes)",
        needed.len(),
        got.chunks_downloaded,
        got.bytes_downloaded,
        each.chunks_downloaded,
        each.bytes_downloaded
    );
}
