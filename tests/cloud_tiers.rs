//! The GCS and Azure tiers against their emulators (`scripts/test` starts
//! them next to the S3 server): create-only manifest commits have exactly
//! one winner among racing committers on every service, ranged reads and
//! listings agree, and a missing bucket or container and a wrong
//! credential fail at once with errors that name them.

mod common;

#[path = "common/azure.rs"]
mod azure;
#[path = "common/gcs.rs"]
mod gcs;

use cairn::{ChunkTier, Error, ErrorKind, RemoteOptions, RemoteStore};
use common::{open, state_for_step};
use std::sync::{Arc, Barrier};

const COMMITTERS: usize = 6;
const ROUNDS: u64 = 5;

/// `COMMITTERS` different manifests for each step `0..ROUNDS` of run
/// `race`, each from its own local store.
fn contenders(dir: &std::path::Path) -> Vec<Vec<Vec<u8>>> {
    (0..COMMITTERS)
        .map(|i| {
            let store = open(&dir.join(format!("s{i}")));
            (0..ROUNDS)
                .map(|step| {
                    let st = state_for_step(step * 100 + i as u64 + 1, 2, 8 << 10);
                    store
                        .save("race", step, &st.view())
                        .unwrap()
                        .wait()
                        .unwrap();
                    ChunkTier::manifest_bytes(&store, "race", step).unwrap()
                })
                .collect()
        })
        .collect()
}

/// Committers with their own clients race to commit different manifests
/// under the same step: exactly one creates it, every other one gets
/// `AlreadyExists`, and the stored manifest is the winner's.
fn race(open_remote: impl Fn() -> RemoteStore) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = contenders(dir.path());
    let remotes: Vec<RemoteStore> = (0..COMMITTERS).map(|_| open_remote()).collect();
    let url = remotes[0].url().to_string();
    for step in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(COMMITTERS));
        let results: Vec<cairn::Result<bool>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..COMMITTERS)
                .map(|i| {
                    let barrier = barrier.clone();
                    let remote = &remotes[i];
                    let b = &bytes[i][step as usize];
                    s.spawn(move || {
                        barrier.wait();
                        ChunkTier::commit_manifest(remote, "race", step, b)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = (0..COMMITTERS)
            .filter(|&i| matches!(results[i], Ok(true)))
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "{url} step {step}: exactly one committer creates the manifest: {results:?}"
        );
        for (i, r) in results.iter().enumerate() {
            if i != winners[0] {
                match r {
                    Err(e) => assert_eq!(
                        e.kind(),
                        ErrorKind::AlreadyExists,
                        "{url} step {step}: loser {i}: {e}"
                    ),
                    Ok(v) => panic!("{url} step {step}: loser {i} got Ok({v})"),
                }
            }
        }
        let stored = ChunkTier::manifest_bytes(&remotes[0], "race", step).unwrap();
        assert_eq!(
            stored, bytes[winners[0]][step as usize],
            "{url} step {step}: the stored manifest is the winner's"
        );
    }
    assert_eq!(
        remotes[0]
            .block_on(remotes[0].steps("race"))
            .unwrap()
            .unwrap(),
        (0..ROUNDS).collect::<Vec<_>>()
    );
}

#[test]
fn racing_manifest_commits_have_one_winner_on_s3() {
    let bucket = common::s3::new_bucket("race");
    race(|| {
        RemoteStore::open(
            &format!("s3://{bucket}/ckpt"),
            &common::s3::options(),
            RemoteOptions::default(),
        )
        .unwrap()
    });
}

#[test]
fn racing_manifest_commits_have_one_winner_on_gcs() {
    let bucket = gcs::new_bucket("race");
    race(|| {
        RemoteStore::open(
            &format!("gs://{bucket}/ckpt"),
            &gcs::options(),
            RemoteOptions::default(),
        )
        .unwrap()
    });
}

#[test]
fn racing_manifest_commits_have_one_winner_on_azure() {
    let container = azure::new_container("race");
    race(|| {
        RemoteStore::open(
            &format!("az://{container}/ckpt"),
            &azure::options(),
            RemoteOptions::default(),
        )
        .unwrap()
    });
}

/// Ranged reads return exactly the bytes asked for, and listings come
/// back in the same (sorted) order, on each service.
fn ranges_and_listing(t: &RemoteStore) {
    let url = t.url().to_string();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let path = cairn::object_store::path::Path::from("ckpt/misc/blob");
    t.block_on(t.put_object(&path, bytes::Bytes::from(data.clone())))
        .unwrap()
        .unwrap();
    for (a, b) in [
        (0usize, 1usize),
        (1, 4097),
        (65_536, 100_000),
        (99_999, 100_000),
    ] {
        let got = t
            .block_on(t.get_range(&path, a as u64..b as u64))
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &data[a..b], "{url}: range {a}..{b}");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Steps committed out of order list sorted; runs too.
    for (run, step) in [("b", 30), ("a", 2), ("b", 4), ("a", 100), ("a", 7)] {
        let st = state_for_step(step, 1, 1 << 10);
        store.save(run, step, &st.view()).unwrap().wait().unwrap();
        let bytes = ChunkTier::manifest_bytes(&store, run, step).unwrap();
        assert!(ChunkTier::commit_manifest(t, run, step, &bytes).unwrap());
    }
    assert_eq!(ChunkTier::runs(t).unwrap(), vec!["a", "b"], "{url}");
    assert_eq!(ChunkTier::steps(t, "a").unwrap(), vec![2, 7, 100], "{url}");
    assert_eq!(ChunkTier::steps(t, "b").unwrap(), vec![4, 30], "{url}");
}

#[test]
fn ranged_reads_and_listings_on_gcs_and_azure() {
    ranges_and_listing(&gcs::remote("ranges", RemoteOptions::default()));
    ranges_and_listing(&azure::remote("ranges", RemoteOptions::default()));
}

fn expect_err<T: std::fmt::Debug>(r: cairn::Result<T>) -> Error {
    r.expect_err("expected an error")
}

#[test]
fn a_missing_bucket_or_container_is_not_found_naming_it() {
    let bucket = gcs::bucket_name("missing");
    let t = RemoteStore::open(
        &format!("gs://{bucket}/ckpt"),
        &gcs::options(),
        RemoteOptions::default(),
    )
    .unwrap();
    for e in [
        expect_err(ChunkTier::runs(&t)),
        expect_err(ChunkTier::manifest_bytes(&t, "r", 1)),
    ] {
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(
            e.to_string().contains(&format!("bucket \"{bucket}\"")),
            "{e}"
        );
    }
    let container = azure::container_name("missing");
    let t = RemoteStore::open(
        &format!("az://{container}/ckpt"),
        &azure::options(),
        RemoteOptions::default(),
    )
    .unwrap();
    for e in [
        expect_err(ChunkTier::runs(&t)),
        expect_err(ChunkTier::manifest_bytes(&t, "r", 1)),
    ] {
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(
            e.to_string()
                .contains(&format!("container \"{container}\"")),
            "{e}"
        );
    }
}

#[test]
fn a_wrong_azure_key_is_refused_naming_the_credential() {
    let container = azure::new_container("badkey");
    let mut opts = azure::options();
    for (k, v) in opts.iter_mut() {
        if k == "access_key" {
            // Valid base64, wrong key.
            *v = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5".into();
        }
    }
    let t = RemoteStore::open(
        &format!("az://{container}/ckpt"),
        &opts,
        RemoteOptions::default(),
    )
    .unwrap();
    let e = expect_err(ChunkTier::runs(&t));
    assert!(matches!(e, Error::RemoteRefused { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let msg = e.to_string();
    // Azure answers AuthenticationFailed, Azurite AuthorizationFailure.
    assert!(msg.contains("credentials were rejected (HTTP 403"), "{msg}");
    assert!(msg.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{msg}");
    assert!(msg.contains("access_key"), "{msg}");
}

#[test]
fn a_bad_gcs_service_account_fails_at_open_naming_it() {
    let bucket = gcs::new_bucket("badkey");
    let url = format!("gs://{bucket}/ckpt");
    // A key whose private key is not a PEM key.
    let key = r#"{"client_email":"x@y","private_key":"not a key","private_key_id":"k"}"#;
    let e = RemoteStore::open(
        &url,
        &[("service_account_key".into(), key.into())],
        RemoteOptions::default(),
    )
    .expect_err("a broken key is refused");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("service account key"), "{msg}");
    assert!(msg.contains("GOOGLE_SERVICE_ACCOUNT_KEY"), "{msg}");
    // A service-account file that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("sa.json");
    let e = RemoteStore::open(
        &url,
        &[("service_account".into(), missing.display().to_string())],
        RemoteOptions::default(),
    )
    .expect_err("a missing file is refused");
    let msg = e.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("GOOGLE_SERVICE_ACCOUNT"), "{msg}");
}
