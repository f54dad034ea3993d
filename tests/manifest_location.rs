//! A manifest stored under another checkpoint's location is refused by
//! every reader, including the raw-bytes reader that copies and uploads
//! use, on a local store and on the S3-compatible server.

mod common;

use cairn::{ChunkTier, ErrorKind};
use common::*;

fn manifest_file(root: &std::path::Path, step: u64) -> std::path::PathBuf {
    root.join("runs")
        .join("d")
        .join(format!("{step:020}"))
        .join("manifest.cairn")
}

#[test]
fn manifest_bytes_refuses_a_manifest_naming_another_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for step in [1, 2] {
        store
            .save("d", step, &state_for_step(step, 4, 100_000).view())
            .unwrap()
            .wait()
            .unwrap();
    }
    // Step 1's manifest, copied over step 2's.
    std::fs::copy(manifest_file(dir.path(), 1), manifest_file(dir.path(), 2)).unwrap();
    let e = store.manifest("d", 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    let e = store.manifest_bytes("d", 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    assert!(e.to_string().contains("names run d step 1"), "{e}");
    let e = ChunkTier::manifest_bytes(&store, "d", 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    // The checkpoint where it belongs still reads.
    assert!(store.manifest_bytes("d", 1).is_ok());
    // Nothing of the misplaced checkpoint reaches a remote.
    let remote = s3::remote("mloc", cairn::RemoteOptions::default());
    let e = store.upload_to(&remote, "d", 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    assert!(remote
        .block_on(remote.steps("d"))
        .unwrap()
        .unwrap()
        .is_empty());
    assert!(!store.is_uploaded("d", 2, remote.url()));
}

#[test]
fn remote_manifest_bytes_refuses_a_manifest_naming_another_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .save("d", 1, &state_for_step(1, 4, 100_000).view())
        .unwrap()
        .wait()
        .unwrap();
    // A file:// remote whose step 2 holds step 1's manifest.
    let rdir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", rdir.path().display());
    let remote = cairn::RemoteStore::open(&url, &[], cairn::RemoteOptions::default()).unwrap();
    store.upload_to(&remote, "d", 1).unwrap();
    let src = walk(rdir.path())
        .into_iter()
        .find(|p| p.ends_with(format!("{:020}/manifest.cairn", 1)))
        .expect("remote manifest of step 1");
    let dst = src
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join(format!("{:020}", 2));
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(&src, dst.join("manifest.cairn")).unwrap();
    let e = ChunkTier::manifest_bytes(&remote, "d", 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Data, "{e}");
    assert!(ChunkTier::manifest_bytes(&remote, "d", 1).is_ok());
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
