//! The GCS and Azure tiers against their emulators (`scripts/test` starts
//! them next to the S3 server): create-only manifest commits have exactly
//! one winner among racing committers on every service (and a refused
//! create with no manifest there yet is tried again), ranged reads and
//! listings agree, and a missing bucket or container and a wrong
//! credential fail at once with errors that name them.

mod common;

#[path = "common/azure.rs"]
mod azure;
#[path = "common/gcs.rs"]
mod gcs;

use cairn::object_store::path::Path as ObjPath;
use cairn::object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use cairn::{ChunkTier, Error, ErrorKind, RemoteOptions, RemoteStore};
use common::{open, state_for_step};
use futures::stream::BoxStream;
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

/// Answers the first create-only manifest puts the way services may while
/// another writer's put of the same manifest is in flight, without storing
/// anything: Azure's 412 (object_store's `Precondition`), then S3's 409
/// `ConditionalRequestConflict` (object_store's `AlreadyExists`).
#[derive(Debug)]
struct Contended {
    inner: Arc<dyn ObjectStore>,
    refusals: std::sync::Mutex<Vec<&'static str>>,
}

impl std::fmt::Display for Contended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Contended({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Contended {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if matches!(opts.mode, PutMode::Create) {
            if let Some(code) = self.refusals.lock().unwrap().pop() {
                let source = format!("injected {code}").into();
                let path = location.to_string();
                return Err(match code {
                    "412" => object_store::Error::Precondition { path, source },
                    _ => object_store::Error::AlreadyExists { path, source },
                });
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &ObjPath) -> object_store::Result<()> {
        self.inner.delete(location).await
    }
    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &ObjPath, to: &ObjPath) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &ObjPath, to: &ObjPath) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// `remote` (prefix `ckpt`) behind [`Contended`], its first two
/// create-only puts refused (412, then 409).
fn contended(remote: &RemoteStore) -> RemoteStore {
    RemoteStore::new(
        Arc::new(Contended {
            inner: remote.object_store().clone(),
            refusals: std::sync::Mutex::new(vec!["409", "412"]),
        }),
        ObjPath::from("ckpt"),
        remote.url(),
        RemoteOptions::default(),
    )
}

/// A create-only commit refused while no manifest is there yet (a racing
/// writer's put still in flight, or failed) is tried again and creates the
/// manifest, on each service: it neither fails nor reports someone else's
/// commit.
#[test]
fn a_refused_create_with_no_manifest_there_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = &contenders(dir.path())[0][0];
    for remote in [
        common::s3::remote("contended", RemoteOptions::default()),
        gcs::remote("contended", RemoteOptions::default()),
        azure::remote("contended", RemoteOptions::default()),
    ] {
        let url = remote.url().to_string();
        let wrapped = contended(&remote);
        let r = ChunkTier::commit_manifest(&wrapped, "race", 0, bytes);
        assert!(matches!(r, Ok(true)), "{url}: {r:?}");
        assert_eq!(
            &ChunkTier::manifest_bytes(&remote, "race", 0).unwrap(),
            bytes,
            "{url}"
        );
    }
}

/// The same for the other create-only puts: a rank's part manifest and
/// the remote's grace record, refused while nothing is there (412, then
/// 409) are put again, on each service; before, a part failed at once and
/// the record after a second and a half of reads, with a restorable
/// checkpoint and a new remote left without them.
#[test]
fn a_refused_create_of_a_part_or_grace_record_with_nothing_there_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let part = cairn::SaveState::new().shard(
        "w",
        cairn::DType::U8,
        &[8, 512],
        &data,
        cairn::ShardInfo {
            global_shape: vec![8, 512],
            offsets: vec![0, 0],
        },
    );
    store
        .save_part("p", 1, 0, 1, &part)
        .unwrap()
        .wait()
        .unwrap();
    let remotes = |tag: &str| {
        [
            common::s3::remote(tag, RemoteOptions::default()),
            gcs::remote(tag, RemoteOptions::default()),
            azure::remote(tag, RemoteOptions::default()),
        ]
    };
    let cases = remotes("contended-part").map(|r| ("part", r));
    let cases = cases
        .into_iter()
        .chain(remotes("contended-grace").map(|r| ("grace", r)));
    for (name, remote) in cases {
        let url = remote.url().to_string();
        if name == "part" {
            // The grace record is there already: the part's put is the
            // first create-only put of the upload.
            remote.upload_grace().unwrap();
        }
        let wrapped = contended(&remote);
        if name == "grace" {
            let g = wrapped.upload_grace();
            assert_eq!(
                g.as_ref().ok(),
                Some(&RemoteOptions::default().gc_grace),
                "{url}: {g:?}"
            );
            assert_eq!(
                remote.recorded_gc_grace().unwrap(),
                Some(RemoteOptions::default().gc_grace),
                "{url}"
            );
            continue;
        }
        let up = store.upload_parts(&wrapped, "p", 1, 1);
        let up = up.unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(up.committed.is_some_and(|c| c.created), "{url}");
        assert_eq!(up.parts, 1, "{url}");
        let mut out = vec![0u8; data.len()];
        remote
            .restore_region(
                "p",
                cairn::StepSel::Step(1),
                "w",
                &[0, 0],
                &[8, 512],
                &mut out,
            )
            .unwrap();
        assert!(out == data, "{url}: restored bytes differ");
    }
}

/// Two stores under different prefixes of one Azure container are
/// disjoint, and each keeps its objects under its own prefix: `az://c/a/b`
/// is container `c`, prefix `a/b`.
#[test]
fn azure_prefixes_keep_stores_apart() {
    let container = azure::new_container("prefix");
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let st = state_for_step(1, 1, 1 << 10);
    store.save("r", 1, &st.view()).unwrap().wait().unwrap();
    let bytes = ChunkTier::manifest_bytes(&store, "r", 1).unwrap();
    let open_az = |prefix: &str| {
        RemoteStore::open(
            &format!("az://{container}/{prefix}"),
            &azure::options(),
            RemoteOptions::default(),
        )
        .unwrap()
    };
    let a = open_az("team-a/llama");
    let b = open_az("team-b/llama");
    assert!(ChunkTier::commit_manifest(&a, "r", 1, &bytes).unwrap());
    assert_eq!(ChunkTier::runs(&a).unwrap(), vec!["r"]);
    assert!(
        ChunkTier::runs(&b).unwrap().is_empty(),
        "a store under another prefix sees nothing of it"
    );
    let listed: Vec<String> = a
        .block_on(async {
            use futures::TryStreamExt;
            a.object_store()
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect::<Vec<_>>()
                .await
        })
        .unwrap()
        .unwrap();
    assert_eq!(
        listed,
        vec!["team-a/llama/runs/r/00000000000000000001/manifest.cairn".to_string()]
    );
}
