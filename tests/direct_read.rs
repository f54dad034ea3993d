//! Restores into page-aligned caller buffers read whole blocks of raw
//! chunks with O_DIRECT, straight into the buffer. Those reads must be as
//! exact and as checked as the ones through the page cache: bytes equal,
//! a flipped bit or a truncated chunk caught and named.

mod common;

use cairn::{DType, Error, StepSel, Store, StoreOptions};
use common::*;

/// A page-aligned window of `len` bytes inside `backing`.
fn aligned(backing: &mut Vec<u8>, len: usize) -> &mut [u8] {
    backing.resize(len + 4096, 0);
    let skip = backing.as_ptr().align_offset(4096);
    &mut backing[skip..skip + len]
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 4 << 20,
        staging_bytes: 64 << 20,
        direct_io: true,
        ..StoreOptions::default()
    }
}

/// A tensor of 10 MiB + 1000 bytes: two whole 4 MiB chunks and a third
/// whose payload ends inside a block, so both the direct bulk and the
/// buffered tail are read.
fn state() -> OwnedState {
    let mut r = Rng(77);
    let n = (10 << 20) + 1000;
    OwnedState {
        tensors: vec![OwnedTensor {
            name: "w".into(),
            dtype: DType::U8,
            shape: vec![n as u64],
            data: r.bytes(n),
        }],
        ..Default::default()
    }
}

#[test]
fn aligned_restore_reads_exact_bytes() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts()).unwrap();
    let s = state();
    store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    let want = &s.tensors[0].data;
    let mut backing = Vec::new();
    let buf = aligned(&mut backing, want.len());
    buf.fill(0xEE);
    store
        .restore_into("d", StepSel::Step(1), &mut [("w", &mut *buf)])
        .unwrap();
    assert!(buf[..] == want[..], "aligned restore differs from the save");
    // An unaligned destination (through the page cache) agrees.
    let mut backing2 = vec![0u8; want.len() + 1];
    let buf2 = &mut backing2[1..];
    store
        .restore_into("d", StepSel::Step(1), &mut [("w", buf2)])
        .unwrap();
    assert!(backing2[1..] == want[..]);
}

/// Planted bug this catches: skipping the hash check for direct reads.
#[test]
fn aligned_restore_catches_a_flipped_bit_and_a_truncated_chunk() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts()).unwrap();
    let s = state();
    store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    let m = store.manifest("d", 1).unwrap();
    let first = m.tensors[0].chunks[0].id;
    let second = m.tensors[0].chunks[1].id;
    let len = s.tensors[0].data.len();

    // Flip one bit in the middle of the first chunk's payload.
    let p = store.chunk_path(&first);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&p, &bytes).unwrap();
    let mut backing = Vec::new();
    let e = store
        .restore_into(
            "d",
            StepSel::Step(1),
            &mut [("w", aligned(&mut backing, len))],
        )
        .unwrap_err();
    match e {
        Error::CorruptChunk { chunk, .. } => assert_eq!(chunk, first.to_hex()),
        other => panic!("expected a corrupt chunk, got {other}"),
    }
    bytes[mid] ^= 0x10;
    std::fs::write(&p, &bytes).unwrap();

    // Cut the second chunk short by one block.
    let p = store.chunk_path(&second);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let full = f.metadata().unwrap().len();
    f.set_len(full - 4096).unwrap();
    let e = store
        .restore_into(
            "d",
            StepSel::Step(1),
            &mut [("w", aligned(&mut backing, len))],
        )
        .unwrap_err();
    match e {
        Error::CorruptChunk { chunk, .. } => assert_eq!(chunk, second.to_hex()),
        other => panic!("expected a corrupt chunk, got {other}"),
    }
}

/// Restore into an aligned buffer after `damage` has changed the stored
/// file of `chunk`, and return what went wrong (the damage undone after).
fn restore_after(
    store: &Store,
    chunk: &cairn::ChunkId,
    len: usize,
    damage: &dyn Fn(&mut Vec<u8>),
) -> Error {
    let p = store.chunk_path(chunk);
    let good = std::fs::read(&p).unwrap();
    let mut bad = good.clone();
    damage(&mut bad);
    std::fs::write(&p, &bad).unwrap();
    let mut backing = Vec::new();
    let r = store.restore_into(
        "d",
        StepSel::Step(1),
        &mut [("w", aligned(&mut backing, len))],
    );
    std::fs::write(&p, &good).unwrap();
    r.expect_err("a damaged chunk restored")
}

/// A restore into an aligned buffer checks the chunk's header block
/// before its payload counts: a changed header, a non-zero byte in the
/// block after it and a chunk grown by a block are each caught and named,
/// as is a flipped bit in the tail read through the page cache, and the
/// undamaged store then restores exactly. Planted bug this catches:
/// skipping the check of the zeros after the header.
#[test]
fn aligned_restore_checks_the_header_block_and_the_tail() {
    let dir = disk_dir();
    let store = Store::open(dir.path(), opts()).unwrap();
    let s = state();
    store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    let m = store.manifest("d", 1).unwrap();
    let chunks: Vec<_> = m.tensors[0].chunks.iter().map(|c| c.id).collect();
    let (first, last) = (chunks[0], chunks[2]);
    let len = s.tensors[0].data.len();
    // Written with O_DIRECT: the payload starts on the second block.
    let head = std::fs::read(store.chunk_path(&first)).unwrap();
    assert_eq!(&head[12..16], &4096u32.to_le_bytes(), "payload offset");
    let reason_of = |e: Error, want: &cairn::ChunkId| match e {
        Error::CorruptChunk { chunk, reason, .. } => {
            assert_eq!(chunk, want.to_hex(), "{reason}");
            reason
        }
        other => panic!("expected a corrupt chunk, got {other}"),
    };

    // A byte of the zeros between the header and the payload.
    let e = restore_after(&store, &first, len, &|b| b[1000] = 1);
    let reason = reason_of(e, &first);
    assert!(reason.contains("non-zero bytes"), "{reason}");

    // The header's chunk id (bytes 32..64): another chunk's name.
    let e = restore_after(&store, &first, len, &|b| {
        b[32..64].copy_from_slice(&chunks[1].0);
    });
    let reason = reason_of(e, &first);
    assert!(reason.contains("header names chunk"), "{reason}");

    // One block more than the header declares: the size is checked first.
    let e = restore_after(&store, &first, len, &|b| b.extend_from_slice(&[0; 4096]));
    let reason = reason_of(e, &first);
    assert!(reason.contains("truncated or extended"), "{reason}");

    // The last byte of the last chunk, in its tail read through the cache.
    let e = restore_after(&store, &last, len, &|b| *b.last_mut().unwrap() ^= 1);
    let reason = reason_of(e, &last);
    assert!(reason.contains("hash mismatch"), "{reason}");

    let mut backing = Vec::new();
    let buf = aligned(&mut backing, len);
    store
        .restore_into("d", StepSel::Step(1), &mut [("w", &mut *buf)])
        .unwrap();
    assert!(buf[..] == s.tensors[0].data[..]);
}
