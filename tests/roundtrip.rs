//! Round trips through real files: every byte restored equals the byte
//! saved, for any dtype, shape and size.

mod common;

use cairn::{DType, ErrorKind, StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use proptest::prelude::*;

fn arb_state() -> impl Strategy<Value = OwnedState> {
    let tensor = (
        proptest::sample::select(DType::ALL.to_vec()),
        proptest::collection::vec(0u64..6, 0..3),
        prop_oneof![3 => 0u64..64, 1 => 0u64..40_000],
        any::<u64>(),
    );
    (
        proptest::collection::vec(tensor, 0..24),
        proptest::collection::vec(0usize..3000, 0..3),
        any::<u64>(),
    )
        .prop_map(|(ts, blobs, seed)| {
            let mut r = Rng(seed);
            let mut s = OwnedState::default();
            for (i, (dtype, mut shape, last, tseed)) in ts.into_iter().enumerate() {
                shape.push(last);
                let n: u64 = shape.iter().product::<u64>() * dtype.size() as u64;
                let mut tr = Rng(tseed);
                s.tensors.push(OwnedTensor {
                    name: format!("t{i}/{dtype}"),
                    dtype,
                    shape,
                    data: tr.bytes(n as usize),
                });
            }
            for (i, n) in blobs.into_iter().enumerate() {
                s.blobs.push((format!("blob{i}"), r.bytes(n)));
            }
            s.metadata = serde_json::json!({"seed": seed, "note": "prop"});
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_states_round_trip(state in arb_state(), zstd in any::<bool>(), direct in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small_opts();
        opts.direct_io = direct;
        if zstd {
            opts.codec = cairn::CodecChoice::Zstd { level: 1 };
        }
        let store = Store::open(dir.path(), opts).unwrap();
        let rep = store.save("prop", 1, &state.view()).unwrap().wait().unwrap();
        prop_assert_eq!(rep.logical_bytes, state.logical_bytes());
        let r = store.restore("prop", StepSel::Latest, &TensorFilter::All).unwrap();
        assert_restored_eq(&r, &state);
        // Reopen from disk and restore again.
        drop(store);
        let store = Store::open_read_only(dir.path(), small_opts()).unwrap();
        let r = store.restore("prop", StepSel::Step(1), &TensorFilter::All).unwrap();
        assert_restored_eq(&r, &state);
        prop_assert!(store.verify(None, None).unwrap().ok());
    }
}

#[test]
fn tensors_larger_than_a_chunk_and_empty_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut r = Rng(5);
    let big = r.bytes(1_000_003 * 2);
    let state = OwnedState {
        tensors: vec![
            OwnedTensor {
                name: "big".into(),
                dtype: DType::BF16,
                shape: vec![1_000_003],
                data: big,
            },
            OwnedTensor {
                name: "empty".into(),
                dtype: DType::F32,
                shape: vec![0, 7],
                data: vec![],
            },
            OwnedTensor {
                name: "scalar".into(),
                dtype: DType::I64,
                shape: vec![],
                data: r.bytes(8),
            },
        ],
        ..Default::default()
    };
    store.save("r", 0, &state.view()).unwrap().wait().unwrap();
    let got = store
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &state);
    let m = store.manifest("r", 0).unwrap();
    assert!(m.tensors[0].chunks.len() >= 31, "2 MB in 64 KiB chunks");
}

#[test]
fn thousands_of_small_tensors_are_packed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut r = Rng(9);
    let mut state = OwnedState::default();
    for i in 0..5000 {
        let n = r.below(64) + 1;
        state.tensors.push(OwnedTensor {
            name: format!("model.layers.{i}.norm.weight"),
            dtype: DType::F16,
            shape: vec![n],
            data: r.bytes(n as usize * 2),
        });
    }
    store.save("r", 3, &state.view()).unwrap().wait().unwrap();
    let got = store
        .restore("r", StepSel::Step(3), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &state);
    let chunks = store.manifest("r", 3).unwrap().distinct_chunks().len();
    assert!(chunks < 20, "{chunks} chunks for ~330 KB of small tensors");
}

#[test]
fn buffers_overwritten_after_save_returns_do_not_leak_into_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 256 << 10,
            staging_bytes: 32 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut state = state_for_step(1, 40, 400_000);
    let original = state.clone();
    let handle = store.save("iso", 1, &state.view()).unwrap();
    // The trainer's next step overwrites its buffers immediately.
    for t in state.tensors.iter_mut() {
        t.data.fill(0xAB);
    }
    handle.wait().unwrap();
    let got = store
        .restore("iso", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&got, &original);
}

#[test]
fn filtered_restore_reads_only_needed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let state = state_for_step(2, 12, 300_000);
    store.save("f", 2, &state.view()).unwrap().wait().unwrap();
    let want = ["layers.3.weight", "layers.7.weight"];
    let r = store
        .restore("f", StepSel::Step(2), &TensorFilter::names(want))
        .unwrap();
    assert_eq!(r.tensors.len(), 2);
    for t in &r.tensors {
        let orig = state.tensors.iter().find(|o| o.name == t.name).unwrap();
        assert_eq!(t.data, orig.data);
    }
    let m = store.manifest("f", 2).unwrap();
    let mut needed = std::collections::HashSet::new();
    for t in m.tensors.iter().filter(|t| want.contains(&t.name.as_str())) {
        needed.extend(t.chunks.iter().map(|c| c.id));
    }
    for b in &m.blobs {
        needed.extend(b.chunks.iter().map(|c| c.id));
    }
    assert_eq!(r.report.chunks_read as usize, needed.len());
    assert!(needed.len() < m.distinct_chunks().len());

    // Into caller buffers.
    let mut a = vec![0u8; state.tensors[5].data.len()];
    let rep = store
        .restore_into("f", StepSel::Latest, &mut [("layers.5.weight", &mut a[..])])
        .unwrap();
    assert_eq!(a, state.tensors[5].data);
    assert_eq!(rep.logical_bytes, a.len() as u64);
    let mut wrong = [0u8; 3];
    let e = store
        .restore_into(
            "f",
            StepSel::Latest,
            &mut [("layers.5.weight", &mut wrong[..])],
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let e = store
        .restore("f", StepSel::Latest, &TensorFilter::names(["nope"]))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn list_latest_delete_and_immutability() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for step in [10u64, 2, 7] {
        let s = state_for_step(step, 3, 1000);
        store.save("a", step, &s.view()).unwrap().wait().unwrap();
    }
    store
        .save("b", 1, &state_for_step(1, 1, 10).view())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(store.runs().unwrap(), vec!["a", "b"]);
    assert_eq!(store.steps("a").unwrap(), vec![2, 7, 10]);
    assert_eq!(store.latest("a").unwrap(), Some(10));
    let e = store
        .save("a", 7, &state_for_step(7, 3, 1000).view())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    store.delete("a", 10).unwrap();
    assert_eq!(store.latest("a").unwrap(), Some(7));
    let r = store
        .restore("a", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&r, &state_for_step(7, 3, 1000));
    assert_eq!(
        store.delete("a", 10).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store
            .restore("a", StepSel::Step(10), &TensorFilter::All)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn concurrent_saves_of_shared_chunks_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let state = state_for_step(4, 20, 200_000);
    std::thread::scope(|s| {
        for step in 0..4u64 {
            let (store, state) = (&store, &state);
            s.spawn(move || {
                store
                    .save("c", step, &state.view())
                    .unwrap()
                    .wait()
                    .unwrap()
            });
        }
    });
    for step in 0..4 {
        let r = store
            .restore("c", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_eq!(r.tensors.len(), state.tensors.len());
        for (g, w) in r.tensors.iter().zip(&state.tensors) {
            assert_eq!(g.data, w.data);
        }
    }
    assert!(store.verify(Some("c"), None).unwrap().ok());
}

#[tokio::test]
async fn handle_can_be_awaited() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let s = state_for_step(3, 4, 10_000);
    let rep = store
        .save("aw", 3, &s.view())
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert_eq!(rep.step, 3);
    assert_eq!(store.latest("aw").unwrap(), Some(3));
}

/// A state large enough that several threads copy it into staging, with
/// a staging pool of a single chunk, so every copy thread waits for
/// space over and over: the save neither deadlocks nor mixes up chunks,
/// and buffers overwritten once `save` returns do not leak in.
#[test]
fn parallel_staging_copy_under_back_pressure() {
    for (copy_threads, staging) in [(4, 256 << 10), (3, 8 << 20), (1, 256 << 10)] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            StoreOptions {
                chunk_size: 256 << 10,
                staging_bytes: staging,
                copy_threads,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let mut state = state_for_step(7, 40, 4 << 20);
        assert!(
            state.logical_bytes() > 40 << 20,
            "above the parallel-copy floor"
        );
        let original = state.clone();
        let handle = store.save("par", 7, &state.view()).unwrap();
        for t in state.tensors.iter_mut() {
            t.data.fill(0x5A);
        }
        handle.wait().unwrap();
        let got = store
            .restore("par", StepSel::Step(7), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &original);
    }
}

#[test]
fn a_manifest_read_once_restores_in_parts_and_a_changed_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small_opts()).unwrap();
    let state = state_for_step(4, 12, 300_000);
    store.save("r", 4, &state.view()).unwrap().wait().unwrap();
    let m = store.manifest("r", 4).unwrap();
    for t in &state.tensors {
        let got = store
            .restore_from_manifest(m.clone(), &TensorFilter::names([t.name.clone()]))
            .unwrap();
        assert_eq!(got.tensors.len(), 1);
        assert_eq!(got.tensors[0].data, t.data, "{}", t.name);
        assert_eq!(got.blobs.len(), state.blobs.len());
    }
    // A slice longer than its tensor: refused, naming the manifest.
    let mut bad = m.clone();
    bad.tensors[0].chunks[0].len += 1 << 40;
    let e = store
        .restore_from_manifest(bad, &TensorFilter::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("restore_from_manifest"), "{e}");
}

#[test]
fn thread_counts_past_the_limit_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path());
    type Set = fn(&mut StoreOptions);
    let cases: [(&str, Set); 5] = [
        ("workers", |o| o.workers = 100_000),
        ("lead_workers", |o| o.lead_workers = 4096),
        ("sync_threads", |o| o.sync_threads = 100_000),
        ("copy_threads", |o| o.copy_threads = 1025),
        ("read_threads", |o| o.read_threads = usize::MAX),
    ];
    for (what, set) in cases {
        let mut o = small_opts();
        set(&mut o);
        let e = Store::open(dir.path(), o.clone()).err().expect(what);
        assert_eq!(e.kind(), ErrorKind::Invalid, "{what}: {e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
        let e = Store::open_read_only(dir.path(), o).err().expect(what);
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    let mut o = small_opts();
    o.read_threads = cairn::MAX_THREADS;
    Store::open_read_only(dir.path(), o).unwrap();
}

#[test]
fn a_directory_of_other_files_is_not_made_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("tmp")).unwrap();
    std::fs::write(home.join("notes.txt"), b"mine").unwrap();
    std::fs::write(home.join("tmp").join("draft"), b"also mine").unwrap();
    let e = Store::open(&home, small_opts())
        .err()
        .expect("a user's directory");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(
        e.to_string().contains("notes.txt") && e.to_string().contains("new or empty"),
        "{e}"
    );
    let names: Vec<_> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "nothing was added: {names:?}");
    assert_eq!(
        std::fs::read(home.join("tmp").join("draft")).unwrap(),
        b"also mine"
    );
    // An empty directory, a new one, one holding only a file system's
    // lost+found, and an existing store (with files beside its own) open.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let mount = dir.path().join("mount");
    std::fs::create_dir_all(mount.join("lost+found")).unwrap();
    // A marker left half-published by a process killed making the store
    // (or being published by another one opening it at the same moment).
    let half = dir.path().join("half");
    std::fs::create_dir_all(half.join("runs")).unwrap();
    std::fs::write(half.join("publish.4242.0.tmp"), b"{").unwrap();
    for root in [empty, dir.path().join("new"), mount, half] {
        drop(open(&root));
        std::fs::write(root.join("model.safetensors"), b"x").unwrap();
        drop(open(&root));
    }
}
