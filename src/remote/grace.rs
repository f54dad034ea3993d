//! The grace record of a remote: the collection grace period its writers
//! rely on, one number for every uploader and every collector.
//!
//! ```text
//! <prefix>/gc-grace.json  {"format":"cairn-gc-grace","version":1,"grace_ms":86400000}
//! ```
//!
//! An uploader relies on a chunk object it finds only while the object is
//! younger than half the grace, and a collector deletes an unreferenced one
//! only once it is older than the grace: that argument needs both to use
//! the same grace. The first writer or collector to reach a remote records
//! the grace it uses (a create-only put, so every party reads one value; a
//! collector records the longer of the grace it was asked for and its
//! store's `gc_grace`, so a one-off short collection cannot set the
//! remote's policy and with it every later upload's deadline);
//! from then on a collection with a shorter grace is refused, and uploads
//! use the shorter of their own grace and the recorded one, read again by
//! every upload. The record never changes: a remote whose writers should
//! rely on a shorter grace is given one by deleting the object while no
//! upload or collection runs; the next to reach the remote records its
//! own.

use super::{Created, RemoteStore};
use crate::error::{Error, Result};
use object_store::path::Path as ObjPath;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Name of the grace record under a remote's prefix.
pub const GRACE_RECORD: &str = "gc-grace.json";

/// Largest grace record read.
const MAX_RECORD_LEN: u64 = 4096;

/// `format` of a grace record.
const RECORD_FORMAT: &str = "cairn-gc-grace";

/// `version` of a grace record.
const RECORD_VERSION: u32 = 1;

/// The record's body.
/// Unknown fields are ignored: a later version adds fields under a new
/// `version` only if older readers must not go on.
#[derive(Debug, Serialize, Deserialize)]
struct GraceRecord {
    format: String,
    version: u32,
    grace_ms: u64,
}

impl RemoteStore {
    /// Path of the grace record.
    pub fn grace_record_path(&self) -> ObjPath {
        self.prefix.child(GRACE_RECORD)
    }

    /// Where the grace record is, as a URL under the store's own (for
    /// messages).
    fn grace_record_location(&self) -> String {
        format!("{}/{GRACE_RECORD}", self.url.trim_end_matches('/'))
    }

    /// The recorded grace, or `None` when the remote has no record yet.
    async fn read_grace_record(&self) -> Result<Option<Duration>> {
        let path = self.grace_record_path();
        let at = self.grace_record_location();
        let bad = |reason: String| Error::invalid(format!("grace record {at}"), reason);
        let r = self
            .retry(|| async {
                let op = "get grace record";
                let r = self
                    .inner
                    .get(&path)
                    .await
                    .map_err(|e| Error::remote(op, &path, e))?;
                if r.meta.size > MAX_RECORD_LEN {
                    return Err(bad(format!("larger than {MAX_RECORD_LEN} bytes")));
                }
                r.bytes().await.map_err(|e| Error::remote(op, &path, e))
            })
            .await;
        let Some(body) = super::found(r)? else {
            return Ok(None);
        };
        if body.len() as u64 > MAX_RECORD_LEN {
            return Err(bad(format!("larger than {MAX_RECORD_LEN} bytes")));
        }
        let rec: GraceRecord =
            serde_json::from_slice(&body).map_err(|e| bad(format!("does not parse: {e}")))?;
        if rec.format != RECORD_FORMAT {
            return Err(bad(format!("format is {:?}", rec.format)));
        }
        if rec.version != RECORD_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "grace record",
                path: at.into(),
                found: rec.version.into(),
                supported: RECORD_VERSION.into(),
            });
        }
        if rec.grace_ms == 0 {
            return Err(bad("grace_ms is 0".into()));
        }
        Ok(Some(Duration::from_millis(rec.grace_ms)))
    }

    /// The recorded grace; when there is none, record `grace` (create-only:
    /// of two parties racing, both end up with the winner's).
    async fn ensure_grace_record(&self, grace: Duration) -> Result<Duration> {
        if let Some(g) = self.read_grace_record().await? {
            return Ok(g);
        }
        let path = self.grace_record_path();
        let body = serde_json::to_vec(&GraceRecord {
            format: RECORD_FORMAT.into(),
            version: RECORD_VERSION,
            grace_ms: grace.as_millis().max(1) as u64,
        })
        .map_err(|e| Error::Internal(format!("encode grace record: {e}")))?;
        // Refused: another party's record (read again, or put again while
        // a racing put is not visible yet).
        let read = || self.read_grace_record();
        match self
            .put_create_only_or_read(&path, body.into(), "put grace record", read)
            .await?
        {
            Created::New => Ok(grace),
            Created::Existing(g) => Ok(g),
        }
    }

    /// The grace recorded at this remote, `None` if none is yet (blocking).
    pub fn recorded_gc_grace(&self) -> Result<Option<Duration>> {
        self.block_on(self.read_grace_record())?
    }

    /// The grace this store's uploads rely on: the shorter of its
    /// `gc_grace` and the remote's record, which is made with `gc_grace`
    /// when absent. Read again by every upload (one small GET), so a
    /// record replaced while a long-running process waits between uploads
    /// is followed; blocking.
    pub fn upload_grace(&self) -> Result<Duration> {
        let own = self.opts.gc_grace;
        let recorded = self.block_on(self.ensure_grace_record(own))??;
        let g = own.min(recorded);
        *self.grace.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
        Ok(g)
    }

    /// The grace a collection through this store uses: its `gc_grace`, or
    /// the recorded one where that is longer (a shorter one is refused).
    /// Blocking.
    pub fn collection_grace(&self) -> Result<Duration> {
        let own = self.opts.gc_grace;
        Ok(self.recorded_gc_grace()?.map_or(own, |r| r.max(own)))
    }

    /// The grace of [`RemoteStore::upload_grace`] once it was read, else
    /// the store's own `gc_grace`.
    pub(crate) fn reuse_grace(&self) -> Duration {
        self.grace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(self.opts.gc_grace)
    }

    /// Check a collection's grace against the record (made, when absent,
    /// with the longer of `grace` and the store's `gc_grace`; a dry run
    /// only reads): shorter is refused, since uploads rely on chunks up to
    /// half the recorded grace old.
    pub(crate) fn check_collection_grace(&self, grace: Duration, dry_run: bool) -> Result<()> {
        let recorded = if dry_run {
            self.block_on(self.read_grace_record())??
        } else {
            // A one-off short `grace` does not set the remote's policy: a
            // collector records the longer of it and its store's gc_grace.
            let policy = grace.max(self.opts.gc_grace);
            Some(self.block_on(self.ensure_grace_record(policy))??)
        };
        match recorded {
            Some(r) if grace < r => Err(Error::invalid(
                "remote gc grace",
                format!(
                    "{} is shorter than the {} that uploads to {} rely on (recorded in {}): collect with a grace of {} or longer",
                    humantime::format_duration(grace),
                    humantime::format_duration(r),
                    self.url,
                    self.grace_record_location(),
                    humantime::format_duration(r),
                ),
            )),
            _ => Ok(()),
        }
    }
}
