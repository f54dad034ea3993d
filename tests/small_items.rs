//! Small behaviours users rely on: a chunk corrupt on both tiers is a
//! clear error; a `Store` dropped with saves not waited on commits them or
//! fails them cleanly; non-ASCII tensor and blob names round-trip, and
//! non-ASCII run names are refused as the format requires.

mod common;

use cairn::{
    DType, Error, ErrorKind, RemoteOptions, RemoteStore, SaveState, StepSel, Store, StoreOptions,
    TensorFilter,
};
use common::*;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

/// A chunk corrupt locally and at the attached remote: the restore fails
/// with `CorruptChunk` (kind `Data`) naming the chunk and its tensor, and
/// neither copy is used.
///
/// Planted bug this catches: the remote copy not verified (the decode
/// result ignored in the remote tier's `read_chunk_object` and in the
/// repair path): the restore then returns the remote's bad bytes.
#[test]
fn a_chunk_corrupt_on_both_tiers_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = s3::new_bucket("both");
    let url = format!("s3://{bucket}/ckpt");
    let remote = RemoteStore::open(&url, &s3::options(), RemoteOptions::default()).unwrap();
    let mut store = Store::open(dir.path(), opts()).unwrap();
    store.attach_remote(remote.clone());
    let s = state_for_step(8, 4, 300_000);
    store.save("b", 1, &s.view()).unwrap().wait().unwrap();
    store.upload("b", 1).unwrap();
    let (id, _) = store.manifest("b", 1).unwrap().distinct_chunks()[0];
    // Local: flip a byte of the payload.
    let path = store.chunk_path(&id);
    let mut b = std::fs::read(&path).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&path, &b).unwrap();
    // Remote: a different flipped byte.
    let mut rb = b.clone();
    rb[n - 1] ^= 1;
    rb[n - 2] ^= 1;
    remote
        .block_on(remote.put_object(&remote.chunk_path(&id), rb.into()))
        .unwrap()
        .unwrap();
    let e = store
        .restore("b", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    match &e {
        Error::CorruptChunk { chunk, tensors, .. } => {
            assert_eq!(chunk, &id.to_hex(), "{e}");
            assert!(!tensors.is_empty(), "names no tensor: {e}");
        }
        other => panic!("not a corrupt-chunk error: {other}"),
    }
    // The local file was not replaced by the bad remote copy.
    assert_eq!(std::fs::read(&path).unwrap(), b);
}

/// Saves handed to the pipeline and never waited on, then the store
/// dropped: each save's handle reports success or `Closed`, every save
/// that reported success is listed and restores bit-exact, nothing else
/// is listed, and the store verifies clean.
///
/// Planted bug this catches: a commit that reports success without
/// publishing its manifest (for every other step): those handles say `Ok`
/// but the steps are not listed.
#[test]
fn a_store_dropped_with_saves_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let states: Vec<OwnedState> = (0..6).map(|s| state_for_step(s, 8, 200_000)).collect();
    let mut handles = Vec::new();
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        for (step, s) in states.iter().enumerate() {
            handles.push(store.save("d", step as u64, &s.view()).unwrap());
        }
    }
    let mut ok = Vec::new();
    for (step, h) in handles.into_iter().enumerate() {
        match h.wait() {
            Ok(_) => ok.push(step as u64),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Closed, "step {step}: {e}"),
        }
    }
    let store = Store::open_read_only(dir.path(), opts()).unwrap();
    assert_eq!(store.steps("d").unwrap(), ok);
    for &step in &ok {
        let got = store
            .restore("d", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &states[step as usize]);
    }
    let report = store.verify(None, None).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    eprintln!("dropped store: {} of 6 saves committed", ok.len());
}

/// Non-ASCII tensor and blob names (CJK, accents, an emoji) round-trip
/// through a local save, an upload to S3 and a remote restore; a
/// non-ASCII run name is refused as invalid input, naming it.
///
/// Planted bug this catches: `validate_entry_name` refusing non-ASCII
/// characters.
#[test]
fn non_ascii_names_where_the_format_allows_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let names = ["层.0.权重", "émbed/ü", "poids_🙂", "Ωmega.bias"];
    let data: Vec<Vec<u8>> = (0..names.len())
        .map(|i| {
            (0..4000u32)
                .map(|j| (j as u8).wrapping_mul(i as u8 + 3))
                .collect()
        })
        .collect();
    let mut s = SaveState::new();
    for (n, d) in names.iter().zip(&data) {
        s = s.tensor(*n, DType::U8, &[d.len() as u64], d);
    }
    let blob = b"g\xc3\xa9n\xc3\xa9rateur";
    s = s.blob("état_du_générateur", blob);
    store.save("names", 1, &s).unwrap().wait().unwrap();
    let check = |got: &cairn::Restored| {
        for (n, d) in names.iter().zip(&data) {
            let t = got.tensor(n).unwrap_or_else(|| {
                panic!(
                    "{n} missing: {:?}",
                    got.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
                )
            });
            assert_eq!(&t.data, d, "{n}");
        }
        assert_eq!(got.blob("état_du_générateur"), Some(&blob[..]));
    };
    check(
        &store
            .restore("names", StepSel::Step(1), &TensorFilter::All)
            .unwrap(),
    );
    let only = store
        .restore(
            "names",
            StepSel::Step(1),
            &TensorFilter::names(["层.0.权重"]),
        )
        .unwrap();
    assert_eq!(only.tensors.len(), 1);

    let remote = s3::remote("names", RemoteOptions::default());
    store.upload_to(&remote, "names", 1).unwrap();
    check(
        &remote
            .restore("names", StepSel::Step(1), &TensorFilter::All)
            .unwrap(),
    );

    let e = store.save("实验", 1, &s).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("实验"), "{e}");
}
