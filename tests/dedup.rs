//! Content addressing: unchanged bytes are not written again.

mod common;

use cairn::{StepSel, TensorFilter};
use common::*;

#[test]
fn unchanged_resave_writes_no_chunk_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let s = state_for_step(1, 20, 200_000);
    let first = store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    assert!(first.bytes_written > 0);
    let files_before = chunk_files(dir.path()).len();
    let second = store.save("d", 2, &s.view()).unwrap().wait().unwrap();
    assert_eq!(second.chunks_written, 0);
    assert_eq!(second.bytes_written, 0);
    assert_eq!(second.bytes_deduped, s.logical_bytes());
    assert_eq!(chunk_files(dir.path()).len(), files_before);
    let r = store
        .restore("d", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&r, &s);
}

#[test]
fn ten_percent_changed_writes_about_ten_percent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut r = Rng(77);
    let mut s = OwnedState::default();
    for i in 0..40 {
        s.tensors.push(OwnedTensor {
            name: format!("w{i}"),
            dtype: cairn::DType::F32,
            shape: vec![65_536],
            data: r.bytes(262_144),
        });
    }
    store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    for i in (0..40).step_by(10) {
        s.tensors[i].data = r.bytes(262_144);
    }
    let rep = store.save("d", 2, &s.view()).unwrap().wait().unwrap();
    let frac = rep.bytes_written_uncompressed as f64 / s.logical_bytes() as f64;
    assert!((0.09..0.12).contains(&frac), "wrote {frac} of the bytes");
    let got = store
        .restore("d", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &s);
}

#[test]
fn identical_tensors_within_one_save_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut r = Rng(3);
    let data = r.bytes(300_000);
    let mut s = OwnedState::default();
    for i in 0..4 {
        s.tensors.push(OwnedTensor {
            name: format!("replica{i}"),
            dtype: cairn::DType::U8,
            shape: vec![300_000],
            data: data.clone(),
        });
    }
    let rep = store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    assert!(
        rep.bytes_written_uncompressed <= 300_000,
        "{}",
        rep.bytes_written_uncompressed
    );
    let got = store
        .restore("d", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &s);
}
