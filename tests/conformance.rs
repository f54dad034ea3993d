//! One conformance suite for every tier. The same checks run unchanged
//! against a local directory (`Store`), a `file://` remote, object_store's
//! `InMemory`, and the loopback S3, GCS and Azure emulators `scripts/test`
//! starts: whatever a copy, an upload, a restore, a verification or a
//! collection relies on from [`ChunkTier`] must hold on each of them.

mod common;

use cairn::object_store::memory::InMemory;
use cairn::object_store::path::Path as ObjPath;
use cairn::{
    copy_checkpoint, ChunkId, ChunkTier, CopyOptions, ErrorKind, RemoteOptions, RemoteStore,
    ReuseRule, StepSel, Store,
};
use common::{open, state_for_step, OwnedState};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A source store holding `run` step 1 and step 2 (different bytes) and,
/// in a second store, a different checkpoint under the same `(run, 1)`.
struct Source {
    _dir: tempfile::TempDir,
    store: Store,
    other: Store,
    state1: OwnedState,
}

fn source() -> Source {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("src"));
    let other = open(&dir.path().join("other"));
    let state1 = state_for_step(1, 6, 200 << 10);
    store.save("r", 1, &state1.view()).unwrap().wait().unwrap();
    let state2 = state_for_step(2, 6, 200 << 10);
    store.save("r", 2, &state2.view()).unwrap().wait().unwrap();
    let state_other = state_for_step(99, 3, 50 << 10);
    other
        .save("r", 1, &state_other.view())
        .unwrap()
        .wait()
        .unwrap();
    Source {
        _dir: dir,
        store,
        other,
        state1,
    }
}

fn kind_of<T>(r: cairn::Result<T>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

/// Flip one byte of a chunk object's payload (past the 64-byte header).
fn corrupt(object: &[u8]) -> bytes::Bytes {
    let mut v = object.to_vec();
    let i = v.len() - 1;
    v[i] ^= 0x40;
    bytes::Bytes::from(v)
}

/// The suite. `t` must be an empty tier.
fn conformance(t: &dyn ChunkTier, expect_rule: &str) {
    let src = source();
    let s: &dyn ChunkTier = &src.store;
    let where_ = t.location();

    // An empty tier: nothing listed, lookups are NotFound.
    assert!(
        t.runs().unwrap().is_empty(),
        "{where_}: runs of an empty tier"
    );
    assert!(t.steps("r").unwrap().is_empty(), "{where_}");
    assert!(t.list_chunks().unwrap().is_empty(), "{where_}");
    assert_eq!(
        kind_of(t.resolve("r", StepSel::Latest)),
        ErrorKind::NotFound
    );
    assert_eq!(kind_of(t.manifest("r", 1)), ErrorKind::NotFound);
    let m1 = s.manifest("r", 1).unwrap();
    let chunks = m1.distinct_chunks();
    assert!(chunks.len() > 3, "the fixture spans several chunks");
    let (id0, len0) = chunks[0];
    assert_eq!(t.chunk_info(&id0).unwrap(), None, "{where_}");
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    let mut dec = cairn::Decoder::new().unwrap();
    let e = t
        .read_chunk(&id0, len0, None, &mut buf, &mut scratch, &mut dec)
        .expect_err("a missing chunk reads as an error");
    assert!(
        matches!(e.kind(), ErrorKind::Data | ErrorKind::NotFound),
        "{where_}: missing chunk gave {e}"
    );

    // Chunk objects: put, info, list, read back whole and verified.
    for &(id, len) in &chunks {
        let object = s.read_chunk_object(&id, len).unwrap();
        t.put_chunk_object(&id, object.clone()).unwrap();
        let info = t.chunk_info(&id).unwrap().expect("present after put");
        assert_eq!(info.id, id);
        assert_eq!(info.size, object.len() as u64, "{where_}: stored size");
        assert_eq!(t.read_chunk_object(&id, len).unwrap(), object, "{where_}");
        let n = t
            .read_chunk(&id, len, None, &mut buf, &mut scratch, &mut dec)
            .unwrap();
        assert_eq!(n, object.len() as u64);
        assert_eq!(
            ChunkId::of(&buf),
            id,
            "{where_}: decoded bytes hash to the id"
        );
        // Into a caller's buffer as well.
        let mut out = vec![0u8; len as usize];
        t.read_chunk(&id, len, Some(&mut out), &mut buf, &mut scratch, &mut dec)
            .unwrap();
        assert_eq!(ChunkId::of(&out), id);
    }
    let listed: BTreeSet<ChunkId> = t.list_chunks().unwrap().iter().map(|c| c.id).collect();
    let want: BTreeSet<ChunkId> = chunks.iter().map(|c| c.0).collect();
    assert_eq!(listed, want, "{where_}: list_chunks");

    // Manifests: create-only commit, identical bytes are done, different
    // bytes are AlreadyExists; listing and resolution see the commit.
    let bytes1 = s.manifest_bytes("r", 1).unwrap();
    assert!(
        t.commit_manifest("r", 1, &bytes1).unwrap(),
        "{where_}: created"
    );
    assert!(
        !t.commit_manifest("r", 1, &bytes1).unwrap(),
        "{where_}: identical"
    );
    let other = src.other.manifest_bytes("r", 1).unwrap();
    assert_ne!(other, bytes1);
    for (id, len) in src.other.manifest("r", 1).unwrap().distinct_chunks() {
        let o = src.other.read_chunk_object(&id, len).unwrap();
        t.put_chunk_object(&id, o).unwrap();
    }
    assert_eq!(
        kind_of(t.commit_manifest("r", 1, &other)),
        ErrorKind::AlreadyExists,
        "{where_}: different bytes under a committed step"
    );
    assert_eq!(t.manifest_bytes("r", 1).unwrap(), bytes1, "{where_}");
    assert_eq!(t.runs().unwrap(), vec!["r".to_string()]);
    assert_eq!(t.steps("r").unwrap(), vec![1]);
    assert_eq!(t.resolve("r", StepSel::Latest).unwrap(), 1);
    assert_eq!(t.resolve("r", StepSel::Step(1)).unwrap(), 1);
    assert_eq!(
        kind_of(t.resolve("r", StepSel::Step(2))),
        ErrorKind::NotFound
    );
    assert_eq!(
        t.manifest("r", 1).unwrap().tensors.len(),
        src.state1.tensors.len()
    );
    // A manifest stored under another step's name is refused.
    assert!(t.commit_manifest("r", 5, &bytes1).is_err(), "{where_}");
    assert_eq!(t.steps("r").unwrap(), vec![1], "{where_}");

    // Copy step 2 in with the shared algorithm: only what is missing moves,
    // and every byte restores.
    let rep = copy_checkpoint(s, t, "r", 2, &CopyOptions::default()).unwrap();
    let m2 = s.manifest("r", 2).unwrap();
    assert_eq!(rep.chunks, m2.distinct_chunks().len() as u64);
    assert_eq!(rep.chunks_copied + rep.chunks_skipped, rep.chunks);
    assert!(!rep.already_present);
    assert_eq!(t.steps("r").unwrap(), vec![1, 2]);
    for (id, len) in m2.distinct_chunks() {
        assert_eq!(
            t.read_chunk_object(&id, len).unwrap(),
            s.read_chunk_object(&id, len).unwrap()
        );
    }
    let again = copy_checkpoint(s, t, "r", 2, &CopyOptions::default()).unwrap();
    assert!(
        again.already_present,
        "{where_}: a second copy finds it done"
    );
    assert_eq!(again.chunks_copied, 0, "{where_}: nothing copied twice");

    // A flipped byte is caught on read, naming the chunk; a verified copy
    // repairs it.
    let object = s.read_chunk_object(&id0, len0).unwrap();
    t.put_chunk_object(&id0, corrupt(&object)).unwrap();
    let e = t
        .read_chunk(&id0, len0, None, &mut buf, &mut scratch, &mut dec)
        .expect_err("a flipped byte is caught");
    assert_eq!(e.kind(), ErrorKind::Data, "{where_}: {e}");
    assert!(
        e.to_string().contains(&id0.to_hex()),
        "{where_}: names the chunk: {e}"
    );
    let fixed = copy_checkpoint(
        s,
        t,
        "r",
        1,
        &CopyOptions {
            verify_present: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        fixed.chunks_repaired, 1,
        "{where_}: the corrupt chunk is rewritten"
    );
    assert_eq!(t.read_chunk_object(&id0, len0).unwrap(), object);

    // Deletes: chunks (absent is fine) and manifests.
    let (idl, _) = *chunks.last().unwrap();
    t.delete_chunk(&idl).unwrap();
    assert_eq!(t.chunk_info(&idl).unwrap(), None, "{where_}");
    t.delete_chunk(&idl).unwrap();
    t.delete_manifest("r", 1).unwrap();
    assert_eq!(
        t.steps("r").unwrap(),
        vec![2],
        "{where_}: deleted step unlisted"
    );
    assert_eq!(kind_of(t.manifest("r", 1)), ErrorKind::NotFound);

    // Each tier states how writers may rely on present chunks.
    match (t.reuse_rule(), expect_rule) {
        (ReuseRule::Locked, "locked") => assert!(t.write_guard().unwrap().is_some()),
        (
            ReuseRule::Grace {
                refresh_after,
                commit_within,
            },
            "grace",
        ) => {
            assert!(commit_within < refresh_after);
            assert!(t.write_guard().unwrap().is_none());
        }
        (r, want) => panic!("{where_}: reuse rule {r:?}, expected {want}"),
    }
}

#[test]
fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir.path().join("t"));
    conformance(&t, "locked");
}

#[test]
fn file_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("remote").display());
    let t = RemoteStore::open(&url, &[], RemoteOptions::default()).unwrap();
    conformance(&t, "grace");
}

#[test]
fn in_memory() {
    let t = RemoteStore::new(
        Arc::new(InMemory::new()),
        ObjPath::from("ckpt"),
        "memory:///ckpt",
        RemoteOptions::default(),
    );
    conformance(&t, "grace");
}

#[test]
fn s3_server() {
    let t = common::s3::remote("conformance", RemoteOptions::default());
    conformance(&t, "grace");
}

#[path = "common/gcs.rs"]
mod gcs;

#[path = "common/azure.rs"]
mod azure;

#[test]
fn gcs_emulator() {
    let t = gcs::remote("conformance", RemoteOptions::default());
    conformance(&t, "grace");
}

#[test]
fn azure_emulator() {
    let t = azure::remote("conformance", RemoteOptions::default());
    conformance(&t, "grace");
}
