//! Corruption and bad input: every flipped byte is caught and named, bad
//! input gets a clear error, and nothing is written outside the store.

mod common;

use cairn::format::chunk::HEADER_LEN;
use cairn::format::manifest::{encode_envelope, encode_manifest_file};
use cairn::{ChunkId, DType, Error, ErrorKind, SaveState, StepSel, Store, TensorFilter};
use common::*;
use std::path::{Path, PathBuf};

fn saved_store() -> (tempfile::TempDir, PathBuf, OwnedState) {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("store");
    let store = open(&root);
    let s = state_for_step(1, 10, 150_000);
    store.save("c", 1, &s.view()).unwrap().wait().unwrap();
    (parent, root, s)
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at % b.len();
    b[i] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn a_flipped_byte_in_any_chunk_is_caught_and_named() {
    let (_parent, root, _s) = saved_store();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let m = store.manifest("c", 1).unwrap();
    let files = chunk_files(&root);
    assert!(files.len() >= 5);
    let mut rng = Rng(11);
    for (i, f) in files.iter().enumerate() {
        let original = std::fs::read(f).unwrap();
        // Alternate header and payload positions.
        let at = if i % 3 == 0 {
            rng.below(HEADER_LEN as u64) as usize
        } else {
            HEADER_LEN + rng.below((original.len() - HEADER_LEN) as u64) as usize
        };
        flip(f, at);
        let id = f.file_name().unwrap().to_str().unwrap().to_string();
        let users: Vec<String> = m
            .entries()
            .filter(|e| e.chunks.iter().any(|c| c.id.to_hex() == id))
            .map(|e| e.name.to_string())
            .collect();
        assert!(!users.is_empty());
        match store.restore("c", StepSel::Step(1), &TensorFilter::All) {
            Err(Error::CorruptChunk { chunk, tensors, .. }) => {
                assert_eq!(chunk, id, "byte {at} of {}", f.display());
                assert!(
                    tensors.iter().any(|t| users.contains(t)),
                    "{tensors:?} vs {users:?}"
                );
            }
            Err(e @ (Error::UnsupportedVersion { .. } | Error::UnknownCodec { .. })) => {
                assert!(e.to_string().contains(&id), "{e}");
            }
            other => panic!("flip at {at} in {} not caught: {other:?}", f.display()),
        }
        let report = store.verify(None, None).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        let p = &report.problems[0];
        assert_eq!(p.chunk.as_deref(), Some(id.as_str()));
        assert_eq!(p.tensors, users);
        std::fs::write(f, &original).unwrap();
    }
    assert!(store.verify(None, None).unwrap().ok());
}

#[test]
fn a_flipped_byte_in_the_manifest_is_caught() {
    let (_parent, root, s) = saved_store();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let path = root.join("runs/c/00000000000000000001/manifest.cairn");
    let original = std::fs::read(&path).unwrap();
    let mut rng = Rng(5);
    for _ in 0..40 {
        let at = rng.below(original.len() as u64) as usize;
        flip(&path, at);
        let e = store
            .restore("c", StepSel::Step(1), &TensorFilter::All)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Data, "flip at {at}: {e}");
        let report = store.verify(None, None).unwrap();
        assert!(!report.ok(), "verify missed a flip at {at}");
        std::fs::write(&path, &original).unwrap();
    }
    let r = store
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&r, &s);
}

/// A restore and a verify look up every chunk file before reading any:
/// a chunk replaced by a FIFO is not opened blocking, by that look-up or
/// by the read, and a chunk moved out of the store with a link left in
/// its place is not followed, though the file it leads to is the chunk
/// itself: each is named as a problem. Run in a thread so that a hang
/// fails the test instead of stalling it. Planted bugs this catches:
/// looking chunks up by opening them blocking; following the link.
#[test]
fn fifos_and_links_in_place_of_chunks_are_named_not_followed() {
    let (parent, root, _s) = saved_store();
    let files = chunk_files(&root);
    let (fifo, link) = (&files[0], &files[1]);
    std::fs::remove_file(fifo).unwrap();
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let outside = parent.path().join("outside");
    std::fs::rename(link, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, link).unwrap();
    let moved = std::fs::read(&outside).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let r = root.clone();
    std::thread::spawn(move || {
        let store = Store::open_read_only(&r, small_opts()).unwrap();
        let restored = store.restore("c", StepSel::Step(1), &TensorFilter::All);
        let verified = store.verify(Some("c"), Some(1));
        let _ = tx.send((restored.map(|_| ()), verified));
    });
    let (restored, verified) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("restore or verify hung on a FIFO in place of a chunk");
    let e = restored.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    let names = |f: &PathBuf| f.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        e.to_string().contains(&names(fifo)) || e.to_string().contains(&names(link)),
        "{e}"
    );
    let report = verified.unwrap();
    let named: Vec<&str> = report
        .problems
        .iter()
        .filter_map(|p| p.chunk.as_deref())
        .collect();
    for f in [fifo, link] {
        let name = names(f);
        assert!(named.contains(&name.as_str()), "{name} not in {named:?}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), moved);
}

#[test]
fn truncated_and_missing_files_get_clear_errors() {
    let (_parent, root, _s) = saved_store();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let files = chunk_files(&root);
    let f = &files[0];
    let original = std::fs::read(f).unwrap();
    for len in [0, 10, HEADER_LEN, original.len() - 1] {
        std::fs::write(f, &original[..len]).unwrap();
        let e = store
            .restore("c", StepSel::Step(1), &TensorFilter::All)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Data, "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    std::fs::remove_file(f).unwrap();
    let e = store
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::write(f, &original).unwrap();

    let mpath = root.join("runs/c/00000000000000000001/manifest.cairn");
    let m = std::fs::read(&mpath).unwrap();
    for len in [0, 30, m.len() / 2, m.len() - 1] {
        std::fs::write(&mpath, &m[..len]).unwrap();
        let e = store.manifest("c", 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    }
    std::fs::write(&mpath, &m).unwrap();
}

#[test]
fn garbage_and_hostile_manifests_are_rejected() {
    let (_parent, root, _s) = saved_store();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let mpath = root.join("runs/c/00000000000000000001/manifest.cairn");
    let good = store.manifest("c", 1).unwrap();

    let mut rng = Rng(1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", rng.bytes(4000)),
        (
            "valid envelope, not JSON",
            encode_envelope(b"\x00\xffnot json"),
        ),
        (
            "valid envelope, wrong JSON",
            encode_envelope(br#"{"hello": 1}"#),
        ),
        ("absurd envelope length", {
            let mut b = encode_manifest_file(&good);
            b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("future version", {
            let mut b = encode_manifest_file(&good);
            b[8] = 2;
            b
        }),
    ];
    let mut hostile = Vec::new();
    for name in ["../../x", "/abs", "a\0b"] {
        let mut m = good.clone();
        m.tensors[0].name = name.to_string();
        hostile.push(m);
    }
    let mut m = good.clone();
    m.tensors[0].shape = vec![1 << 40, 1 << 40];
    hostile.push(m);
    let mut m = good.clone();
    m.tensors[0].chunks[0].chunk_len = u64::MAX;
    hostile.push(m);
    let mut m = good.clone();
    m.tensors[0].chunks[0].offset = u64::MAX - 1;
    hostile.push(m);
    let mut m = good.clone();
    m.run = "other".into();
    hostile.push(m);
    for (what, bytes) in cases.into_iter().chain(
        hostile
            .iter()
            .map(|m| ("hostile manifest", encode_manifest_file(m))),
    ) {
        std::fs::write(&mpath, &bytes).unwrap();
        let e = store
            .restore("c", StepSel::Step(1), &TensorFilter::All)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Data, "{what}: {e}");
        assert!(!store.verify(None, None).unwrap().ok(), "{what}");
    }
}

#[test]
fn huge_declared_sizes_do_not_exhaust_memory() {
    let (_parent, root, _s) = saved_store();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let mpath = root.join("runs/c/00000000000000000001/manifest.cairn");
    let mut m = store.manifest("c", 1).unwrap();
    // 512 GiB made of references to a 1 GiB chunk that does not exist: a
    // valid-looking manifest whose restore must fail cleanly.
    let id = ChunkId::of(b"absent");
    let t = &mut m.tensors[0];
    t.dtype = DType::U8;
    t.shape = vec![512 << 30];
    t.len = 512 << 30;
    t.chunks = (0..512)
        .map(|_| cairn::format::manifest::ChunkRef {
            id,
            chunk_len: 1 << 30,
            offset: 0,
            len: 1 << 30,
        })
        .collect();
    std::fs::write(&mpath, encode_manifest_file(&m)).unwrap();
    let e = store
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Invalid | ErrorKind::Data),
        "{e}"
    );

    // A chunk header declaring an absurd length.
    let f = &chunk_files(&root)[0];
    let mut b = std::fs::read(f).unwrap();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(f, &b).unwrap();
    let report = store.verify(None, None).unwrap();
    assert!(!report.ok());
}

#[test]
fn unknown_chunk_version_and_codec_are_rejected() {
    let (_parent, root, _s) = saved_store();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let f = &chunk_files(&root)[0];
    let original = std::fs::read(f).unwrap();
    let mut b = original.clone();
    b[8] = 7;
    std::fs::write(f, &b).unwrap();
    let e = store
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedVersion { found: 7, .. }),
        "{e}"
    );
    let mut b = original.clone();
    b[10] = 9;
    std::fs::write(f, &b).unwrap();
    let e = store
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert!(matches!(e, Error::UnknownCodec { value: 9, .. }), "{e}");
}

#[test]
fn hostile_names_and_bad_state_are_refused_without_writing_outside() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("store");
    let store = open(&root);
    let before = listing(parent.path());
    let data = vec![0u8; 16];
    for name in ["../../x", "/abs", "a\0b", "", "a/../b", "a//b"] {
        let s = SaveState::new().tensor(name, DType::F32, &[4], &data);
        let e = store.save("r", 1, &s).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{name:?}");
        let s = SaveState::new().blob(name, &data);
        assert_eq!(
            store.save("r", 1, &s).unwrap_err().kind(),
            ErrorKind::Invalid
        );
    }
    let ok = SaveState::new().tensor("w", DType::F32, &[4], &data);
    for run in ["../x", "/abs", "a/b", "..", "", "a\0"] {
        let e = store.save(run, 1, &ok).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{run:?}");
        let e = store
            .restore(run, StepSel::Latest, &TensorFilter::All)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{run:?}");
    }
    // Length does not match the shape; shape overflows; duplicate names.
    let s = SaveState::new().tensor("w", DType::F32, &[5], &data);
    assert_eq!(
        store.save("r", 1, &s).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let s = SaveState::new().tensor("w", DType::F32, &[u64::MAX, 2], &data);
    assert_eq!(
        store.save("r", 1, &s).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let s = SaveState::new()
        .tensor("w", DType::F32, &[4], &data)
        .tensor("w", DType::F32, &[4], &data);
    assert_eq!(
        store.save("r", 1, &s).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(listing(parent.path()), before, "something was written");
    assert!(store.runs().unwrap().is_empty());
    // The store still works.
    store.save("r", 1, &ok).unwrap().wait().unwrap();
    assert_eq!(store.latest("r").unwrap(), Some(1));
}
