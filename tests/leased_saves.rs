//! Leased saves through real files: the caller fills slices of the staging
//! pool itself and hands them back; the checkpoint is the one `save` would
//! have written, byte for byte and chunk for chunk.

mod common;

use cairn::{
    DType, ErrorKind, LeasedSave, LeasedTensor, NextLease, SaveState, StepSel, Store, StoreOptions,
    TensorFilter,
};

const CHUNK: usize = 1 << 20;

fn store(dir: &std::path::Path, pool: usize) -> Store {
    Store::open(
        dir,
        StoreOptions {
            chunk_size: CHUNK,
            staging_bytes: pool,
            ..Default::default()
        },
    )
    .unwrap()
}

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// (name, dtype, shape, data) of a state with large, small and empty tensors.
fn tensors() -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    let specs: [(&str, DType, Vec<u64>); 5] = [
        ("big", DType::F32, vec![3 * CHUNK as u64 / 4 + 123]),
        ("bf16", DType::BF16, vec![700, 1001]),
        ("small", DType::I64, vec![1000]),
        ("tiny", DType::U8, vec![3, 5]),
        ("empty", DType::F32, vec![0, 4]),
    ];
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (n, dt, shape))| {
            let len = shape.iter().product::<u64>() as usize * dt.size();
            (n.to_string(), dt, shape, bytes(len, i as u64 + 1))
        })
        .collect()
}

fn specs(ts: &[(String, DType, Vec<u64>, Vec<u8>)]) -> Vec<LeasedTensor> {
    ts.iter()
        .map(|(n, dt, shape, _)| LeasedTensor {
            name: n.clone(),
            dtype: *dt,
            shape: shape.clone(),
            shard: None,
        })
        .collect()
}

/// Take every lease (waiting for room), fill it from `ts`, hand it back.
fn fill_all(s: &mut LeasedSave, ts: &[(String, DType, Vec<u64>, Vec<u8>)]) {
    let data: Vec<&[u8]> = ts.iter().map(|t| &t.3[..]).collect();
    common::fill_leases(s, &data);
}

#[test]
fn a_leased_save_round_trips_and_dedups_against_an_ordinary_save() {
    let dir = tempfile::tempdir().unwrap();
    // A 2 MiB pool for a 5+ MiB state: leases wait for the disk.
    let st = store(dir.path(), 2 * CHUNK);
    let ts = tensors();
    let rest = SaveState::new()
        .blob("b", b"blob bytes")
        .metadata(serde_json::json!({"k": 1}));
    let mut s = st.lease_save("r", 1, specs(&ts), &rest).unwrap();
    assert_eq!(s.lease_count(), 3 + 3 + 1); // big: 3 chunks, bf16: 3, one pack
    fill_all(&mut s, &ts);
    let report = s.finish().unwrap().wait().unwrap();
    assert_eq!(
        report.logical_bytes,
        ts.iter().map(|t| t.3.len() as u64).sum::<u64>() + 10
    );
    let r = st
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    for (n, dt, shape, data) in &ts {
        let t = r.tensor(n).unwrap_or_else(|| panic!("{n} missing"));
        assert_eq!((&t.dtype, &t.shape, &t.data), (dt, shape, data), "{n}");
    }
    assert_eq!(r.blob("b").unwrap(), b"blob bytes");
    // An ordinary save of the large tensors cuts the same chunks.
    let mut plain = SaveState::new();
    for (n, dt, shape, data) in &ts[..2] {
        plain = plain.tensor(n.clone(), *dt, shape, data);
    }
    let rep = st.save("r", 2, &plain).unwrap().wait().unwrap();
    assert_eq!(rep.chunks_written, 0);
    assert_eq!(rep.bytes_deduped, (ts[0].3.len() + ts[1].3.len()) as u64);
}

#[test]
fn a_full_pool_is_reported_and_a_holder_cannot_wait_on_itself() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path(), 2 * CHUNK);
    let spec = |i: usize| LeasedTensor {
        name: format!("t{i}"),
        dtype: DType::U8,
        shape: vec![CHUNK as u64],
        shard: None,
    };
    let mut s = st
        .lease_save("r", 1, (0..3).map(spec).collect(), &SaveState::new())
        .unwrap();
    let NextLease::Lease(a) = s.lease(false).unwrap() else {
        panic!("no first lease")
    };
    let NextLease::Lease(_b) = s.lease(false).unwrap() else {
        panic!("no second lease")
    };
    assert!(matches!(s.lease(false).unwrap(), NextLease::Full));
    let e = s.lease(true).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("2 leases"), "{e}");
    drop(a);
    assert_eq!(s.held(), 1);
}

#[test]
fn a_dropped_lease_fails_the_save_names_it_and_frees_its_space() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path(), 2 * CHUNK);
    let ts = tensors();
    let mut s = st
        .lease_save("r", 1, specs(&ts), &SaveState::new())
        .unwrap();
    let NextLease::Lease(l) = s.lease(true).unwrap() else {
        panic!("no lease")
    };
    drop(l);
    let e = s.finish().err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(
        e.to_string()
            .contains("lease 0 (\"big\" bytes 0..1048576) was dropped"),
        "{e}"
    );
    assert!(st.steps("r").unwrap().is_empty());
    assert_eq!(st.staging_pool().unwrap().in_use(), 0);
    // The step can be saved again, in full.
    let mut s = st
        .lease_save("r", 1, specs(&ts), &SaveState::new())
        .unwrap();
    fill_all(&mut s, &ts);
    s.finish().unwrap().wait().unwrap();
    assert_eq!(st.steps("r").unwrap(), vec![1]);
    // A session dropped before finish commits nothing either.
    let s = st
        .lease_save("r", 2, specs(&ts), &SaveState::new())
        .unwrap();
    drop(s);
    assert_eq!(st.steps("r").unwrap(), vec![1]);
}

#[test]
fn leased_saves_are_validated_before_any_lease() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path(), 2 * CHUNK);
    let ts = tensors();
    let mut twice = specs(&ts);
    twice.push(twice[0].clone());
    let e = st
        .lease_save("r", 1, twice, &SaveState::new())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let (base, len) = st.staging_region().unwrap();
    assert_eq!((base % 4096, len), (0, 2 * CHUNK));
    let mut s = st
        .lease_save("r", 1, specs(&ts), &SaveState::new())
        .unwrap();
    fill_all(&mut s, &ts);
    s.finish().unwrap().wait().unwrap();
    let e = st
        .lease_save("r", 1, specs(&ts), &SaveState::new())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
}
