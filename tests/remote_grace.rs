//! The collection grace period of a remote is one number for every writer
//! and every collector: the first to reach a remote records the grace it
//! uses there (`gc-grace.json`), a collection with a shorter grace is
//! refused, and an upload relies on a chunk the remote holds only while it
//! is younger than half the shorter of its own grace and the recorded one.
//! Without that, a collector run with a short grace (`cairn gc --grace 1m`)
//! deletes old chunks that a daemon uploading with its default 24-hour
//! grace has just decided to rely on, and the daemon's next checkpoint is
//! committed without them. Run on the S3 server, with a `ManualClock` over
//! real object times.

mod common;

use cairn::{DType, StoreOptions, TensorFilter};
use cairn::{ErrorKind, ManualClock, RemoteOptions, RemoteStore, SaveState, StepSel, Store};
use common::s3;
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn local(dir: &std::path::Path) -> Store {
    let store = Store::open(
        dir,
        StoreOptions {
            chunk_size: 64 << 10,
            staging_bytes: 4 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..512u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for step in [1, 2] {
        let st = SaveState::new().tensor("w", DType::U8, &[data.len() as u64], &data);
        store.save("r", step, &st).unwrap().wait().unwrap();
    }
    store
}

fn open(bucket: &str, grace: Duration, clock: &ManualClock) -> RemoteStore {
    let opts = RemoteOptions {
        gc_grace: grace,
        ..RemoteOptions::default()
    };
    RemoteStore::open(&format!("s3://{bucket}/ckpt"), &s3::options(), opts)
        .unwrap()
        .with_clock(Arc::new(clock.clone()))
}

#[test]
fn a_collection_with_a_shorter_grace_than_the_uploads_rely_on_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    let bucket = s3::new_bucket("grace-refused");
    let clock = ManualClock::at_ms(now_ms());
    // A daemon-like uploader with the default grace (24 hours).
    let uploader = open(&bucket, RemoteOptions::default().gc_grace, &clock);
    let up = store.upload_to(&uploader, "r", 1).unwrap();
    assert!(up.chunks_uploaded > 0);
    // Retention deletes step 1 remotely; its chunks are now unreferenced,
    // and two hours later older than a one-minute grace.
    uploader
        .block_on(uploader.delete_checkpoint("r", 1))
        .unwrap()
        .unwrap();
    clock.advance(2 * HOUR);
    let collector = open(&bucket, Duration::from_secs(60), &clock);
    let e = collector
        .gc(Duration::from_secs(60), false)
        .expect_err("a one-minute collection under uploads relying on 24 hours");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("1m") && msg.contains("1day"), "{msg}");
    // The record is named where a user can find it: under the store's URL.
    let record = format!("{}/gc-grace.json", collector.url().trim_end_matches('/'));
    assert!(msg.contains(&record), "{record} in {msg}");
    // The uploader relies on those chunks (two hours old, within half its
    // grace): step 2 is committed without sending them, and restores.
    let up = store.upload_to(&uploader, "r", 2).unwrap();
    assert_eq!(up.chunks_uploaded, 0, "{up:?}");
    let r = open(&bucket, HOUR * 24, &clock)
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    let want = store
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_eq!(r.tensors[0].data, want.tensors[0].data);
    // A collection with the recorded grace (or longer) runs.
    let g = collector.gc(24 * HOUR, false).unwrap();
    assert_eq!(g.chunks_deleted, 0, "{g:?}");
}

#[test]
fn uploads_rely_on_chunks_only_within_half_the_recorded_grace() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    let bucket = s3::new_bucket("grace-record");
    let clock = ManualClock::at_ms(now_ms());
    // The first to reach the remote is a collector with a one-hour grace.
    let collector = open(&bucket, HOUR, &clock);
    collector.gc(HOUR, false).unwrap();
    // An uploader with the default 24 hours follows the record: forty
    // minutes later, the chunks it finds are past half of one hour, so it
    // sends them again (renewing them) instead of relying on them.
    let uploader = open(&bucket, RemoteOptions::default().gc_grace, &clock);
    let first = store.upload_to(&uploader, "r", 1).unwrap();
    assert!(first.chunks_uploaded > 0);
    clock.advance(Duration::from_secs(40 * 60));
    let again = store.upload_to(&uploader, "r", 2).unwrap();
    assert_eq!(again.chunks_skipped, 0, "{again:?}");
    assert_eq!(again.chunks_renewed, again.chunks, "{again:?}");
    // A collection may not go under the record, whoever asks.
    let e = uploader.gc(HOUR / 2, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert_eq!(uploader.recorded_gc_grace().unwrap(), Some(HOUR));
}

#[test]
fn an_uploader_follows_a_record_replaced_between_its_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    let bucket = s3::new_bucket("grace-replaced");
    let clock = ManualClock::at_ms(now_ms());
    // A long-running uploader with the default grace records it.
    let uploader = open(&bucket, RemoteOptions::default().gc_grace, &clock);
    store.upload_to(&uploader, "r", 1).unwrap();
    assert_eq!(uploader.recorded_gc_grace().unwrap(), Some(24 * HOUR));
    // While it waits, the record is deleted and a one-hour collection
    // records its own.
    uploader
        .block_on(
            uploader
                .object_store()
                .delete(&uploader.grace_record_path()),
        )
        .unwrap()
        .unwrap();
    open(&bucket, HOUR, &clock).gc(HOUR, false).unwrap();
    // Forty minutes on, its next upload relies on nothing past half an
    // hour: it renews the chunks rather than skipping them.
    clock.advance(Duration::from_secs(40 * 60));
    let again = store.upload_to(&uploader, "r", 2).unwrap();
    assert_eq!(again.chunks_skipped, 0, "{again:?}");
    assert_eq!(again.chunks_renewed, again.chunks, "{again:?}");
}

#[test]
fn a_short_collection_on_a_new_remote_records_its_stores_grace_not_its_own() {
    let bucket = s3::new_bucket("grace-first-gc");
    let clock = ManualClock::at_ms(now_ms());
    // `cairn gc s3://... --grace 1m` on a remote nothing has reached yet:
    // its store has the default 24 hours, which becomes the record, and
    // the one-minute collection is refused against it.
    let collector = open(&bucket, RemoteOptions::default().gc_grace, &clock);
    let e = collector.gc(Duration::from_secs(60), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert_eq!(collector.recorded_gc_grace().unwrap(), Some(24 * HOUR));
    // A store configured for a one-minute grace may set it, on a remote
    // without a record.
    let other = s3::new_bucket("grace-first-gc-short");
    let short = open(&other, Duration::from_secs(60), &clock);
    short.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!(
        short.recorded_gc_grace().unwrap(),
        Some(Duration::from_secs(60))
    );
}
