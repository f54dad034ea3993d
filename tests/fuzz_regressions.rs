//! Regressions found by the fuzz targets in `fuzz/` (`scripts/fuzz`): each
//! test replays what a target found, through the public API, against real
//! objects where the input came from a store.

use cairn::object_store::path::Path as ObjPath;
use cairn::{ChunkId, ManualClock, RemoteOptions, RemoteStore};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The loopback S3-compatible server started by `scripts/test`.
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

/// A remote store on a fresh bucket of the S3 server.
fn s3_remote(tag: &str) -> RemoteStore {
    static N: AtomicU64 = AtomicU64::new(0);
    let bucket = format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let ep = endpoint();
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to S3 server");
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    RemoteStore::open(
        &format!("s3://{bucket}/ckpt"),
        &s3_options(),
        RemoteOptions::default(),
    )
    .expect("open s3 remote")
}

fn path(s: &str) -> ObjPath {
    ObjPath::parse(s).unwrap()
}

/// remote_keys: a chunk id's name under the wrong fan-out directory, or at
/// any other depth below `chunks/`, is not a chunk object.
#[test]
fn listed_chunk_keys_must_be_the_path_of_their_id() {
    let id = ChunkId::of(b"fuzz");
    let hex = id.to_hex();
    let chunks = path("p/chunks");
    let good = chunks.child(id.prefix()).child(hex.as_str());
    assert_eq!(cairn::listed_chunk_id(&chunks, &good), Some(id));
    let wrong_fan_out = if id.prefix() == "00" { "01" } else { "00" };
    for stray in [
        format!("p/chunks/{hex}"),
        format!("p/chunks/{wrong_fan_out}/{hex}"),
        format!("p/chunks/{}/x/{hex}", id.prefix()),
        format!("p/chunks/{}/{hex}", &hex[..3]),
        format!("p/other/{}/{hex}", id.prefix()),
        format!("q/chunks/{}/{hex}", id.prefix()),
    ] {
        assert_eq!(
            cairn::listed_chunk_id(&chunks, &path(&stray)),
            None,
            "{stray} is not the chunk object of {id}"
        );
    }
    // The input remote_keys found: a store at the bucket root, and a chunk
    // name under `chunka/s2/` (outside `chunks/`).
    let found = "chunka/s2/a2eec19c6b9fa9d13c8e71e40dc7805c12350dde24ecb2700c456fb33908944e";
    assert_eq!(cairn::listed_chunk_id(&path("chunks"), &path(found)), None);
}

/// remote_keys: only `<step:020>/manifest.cairn` right under the run's
/// prefix commits a step.
#[test]
fn listed_manifest_keys_must_be_the_path_of_their_step() {
    let run = path("p/runs/r");
    let good = path("p/runs/r/00000000000000000042/manifest.cairn");
    assert_eq!(cairn::listed_manifest_step(&run, &good), Some(42));
    for stray in [
        "p/runs/r/42/manifest.cairn",
        "p/runs/r/00000000000000000042/manifest.cairn/x",
        "p/runs/r/x/00000000000000000042/manifest.cairn",
        "p/runs/r/99999999999999999999/manifest.cairn",
        "p/runs/r/0000000000000000004a/manifest.cairn",
        "p/runs/rr/00000000000000000042/manifest.cairn",
        "p/runs/r/00000000000000000042/manifest.json",
    ] {
        assert_eq!(
            cairn::listed_manifest_step(&run, &path(stray)),
            None,
            "{stray} commits no step"
        );
    }
}

/// remote_keys, on a real bucket: a stray copy of a chunk object at a path
/// that is not its own is neither listed as the chunk nor counted by
/// collection, which would report it deleted while only the real object
/// goes.
#[test]
fn stray_chunk_objects_are_not_listed_or_collected() {
    let clock = ManualClock::new();
    let remote = s3_remote("fuzz-keys").with_clock(Arc::new(clock.clone()));
    let data = bytes::Bytes::from_static(b"not referenced by any checkpoint");
    let id = ChunkId::of(&data);
    let real = remote.chunk_path(&id);
    let hex = id.to_hex();
    let wrong_fan_out = if id.prefix() == "00" { "01" } else { "00" };
    let base = path("ckpt/chunks");
    let strays = [
        base.child(hex.as_str()),
        base.child(wrong_fan_out).child(hex.as_str()),
        base.child(id.prefix()).child("x").child(hex.as_str()),
    ];
    remote
        .block_on(remote.put_object(&real, data.clone()))
        .unwrap()
        .unwrap();
    for s in &strays {
        remote
            .block_on(remote.put_object(s, bytes::Bytes::from_static(b"stray")))
            .unwrap()
            .unwrap();
    }

    let listed = remote.block_on(remote.list_chunks()).unwrap().unwrap();
    assert_eq!(listed.len(), 1, "only the real chunk object: {listed:?}");
    assert_eq!(listed[0].0, id);
    assert_eq!(listed[0].2, data.len() as u64, "the real object's size");

    // Two days on, past the default grace the collection records.
    clock.advance(Duration::from_secs(2 * 86400));
    let report = remote.gc(Duration::from_secs(86400), false).unwrap();
    assert_eq!(report.chunks_deleted, 1, "{report:?}");
    assert_eq!(report.bytes_reclaimed, data.len() as u64, "{report:?}");
    assert_eq!(report.chunks_in_grace, 0, "{report:?}");
    assert!(remote
        .block_on(remote.head_chunk(&id))
        .unwrap()
        .unwrap()
        .is_none());
}

/// The local tier's listing follows the same rule as the remote one: a
/// file named like a chunk counts only in its own fan-out directory, so a
/// stray copy elsewhere is neither listed nor collected. (Without the
/// fan-out check, the stray copy was listed as a second entry for the id.)
#[test]
fn stray_local_chunk_files_are_not_listed() {
    use cairn::{ChunkTier, DType, SaveState, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let data = vec![7u8; 4096];
    store
        .save(
            "r",
            1,
            &SaveState::new().tensor("w", DType::U8, &[4096], &data),
        )
        .unwrap()
        .wait()
        .unwrap();
    let listed = ChunkTier::list_chunks(&store).unwrap();
    assert_eq!(listed.len(), 1);
    let id = listed[0].id;
    // A copy of the chunk file in another fan-out directory.
    let wrong = format!("{:02x}", id.0[0].wrapping_add(1));
    let stray_dir = dir.path().join("chunks").join(&wrong);
    std::fs::create_dir_all(&stray_dir).unwrap();
    std::fs::copy(store.chunk_path(&id), stray_dir.join(id.to_hex())).unwrap();
    let listed = ChunkTier::list_chunks(&store).unwrap();
    assert_eq!(listed.len(), 1, "the stray copy is not a chunk: {listed:?}");
    assert_eq!(listed[0].id, id);
}

/// Found by the manifest fuzz target: a float in user metadata came back
/// one unit in the last place off (a 40-digit number parsed, written as
/// 6.888888888888891e+39, read back as 6.88888888888889e+39), because
/// JSON floats were not parsed round-trip exact. Metadata (learning rates, losses) must restore bit for bit.
#[test]
fn metadata_floats_round_trip_exactly() {
    use cairn::{DType, SaveState, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    // Metadata as a trainer gets it: parsed from JSON text, here with more
    // digits than an f64 holds (the fuzzer's input).
    let meta: serde_json::Value = serde_json::from_str(
        r#"{"values": [6888888888888888888888888888888888888884, 0.30000000000000004, 3e-4, 2.2250738585072014e-308, 0.3333333333333333]}"#,
    )
    .unwrap();
    let floats: Vec<f64> = meta["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let data = [0u8; 4];
    store
        .save(
            "r",
            1,
            &SaveState::new()
                .tensor("w", DType::U8, &[4], &data)
                .metadata(meta),
        )
        .unwrap()
        .wait()
        .unwrap();
    let m = store.manifest("r", 1).unwrap();
    let back: Vec<f64> = m.metadata["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (a, b) in floats.iter().zip(&back) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a:e} came back as {b:e}");
    }
}
