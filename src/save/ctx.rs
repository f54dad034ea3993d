//! Per-save shared state: which chunk each staged buffer became, counters,
//! the first error, and the plan of the manifest to commit.

use super::handle::SaveReport;
use crate::chunk_id::ChunkId;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::manifest::{PartInfo, ShardInfo};
use crate::layout::Layout;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A chunk being written by some save; others that need the same chunk
/// wait for it before they commit. If the writer fails, each waiter fails
/// with an equivalent of the writer's error, so its kind (an I/O failure,
/// a closed pipeline) tells the waiter's caller what to do.
pub(crate) struct Inflight {
    state: Mutex<Option<std::result::Result<(), Error>>>,
    cv: Condvar,
}

impl Inflight {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Inflight {
            state: Mutex::new(None),
            cv: Condvar::new(),
        })
    }

    /// The writer is done: `Ok` if the chunk is durable, else why not.
    pub(crate) fn complete(&self, result: std::result::Result<(), &Error>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(result.map_err(peer_error));
        self.cv.notify_all();
    }

    /// Wait for the writer: `Ok` if the chunk is durable, else the
    /// writer's error.
    pub(crate) fn wait(&self) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*s {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(peer_error(e)),
                None => {}
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// An equivalent of `e` for a save that waited on the chunk `e` kept from
/// being written: the same variant and fields, so the same
/// [`Error::kind`]. (An I/O error's source keeps its kind and message.)
fn peer_error(e: &Error) -> Error {
    match e {
        Error::Io { op, path, source } => Error::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Closed => Error::Closed,
        Error::DeadlineExceeded { what, took, limit } => Error::DeadlineExceeded {
            what: what.clone(),
            took: *took,
            limit: *limit,
        },
        Error::InvalidInput { what, reason } => Error::InvalidInput {
            what: what.clone(),
            reason: reason.clone(),
        },
        Error::CorruptChunk {
            chunk,
            path,
            reason,
            tensors,
        } => Error::CorruptChunk {
            chunk: chunk.clone(),
            path: path.clone(),
            reason: reason.clone(),
            tensors: tensors.clone(),
        },
        Error::NotFound { what } => Error::NotFound { what: what.clone() },
        e => Error::Internal(e.to_string()),
    }
}

/// A tensor or blob as staged: its chunk slices refer to staging sequence
/// numbers until the pipeline has hashed them.
pub(crate) struct PlannedEntry {
    pub name: String,
    /// `None` for blobs.
    pub tensor: Option<(DType, Vec<u64>, Option<ShardInfo>)>,
    pub len: u64,
    /// `(seq, offset, len)`.
    pub slices: Vec<(usize, u64, u64)>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub chunks: AtomicU64,
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_written_uncompressed: AtomicU64,
    pub bytes_deduped: AtomicU64,
    pub bytes_discarded: AtomicU64,
    pub hash_ns: AtomicU64,
    pub encode_ns: AtomicU64,
    pub write_ns: AtomicU64,
    pub sync_ns: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    pub fn add_time(c: &AtomicU64, since: Instant) {
        c.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

pub(crate) struct SaveCtx {
    pub layout: Layout,
    pub run: String,
    pub step: u64,
    pub chunk_size: u64,
    pub metadata: serde_json::Value,
    /// Training metrics for the manifest.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Set for a part of a sharded step: the save publishes a part
    /// manifest instead of the step's record.
    pub part: Option<PartInfo>,
    pub started: Instant,
    pub logical_bytes: u64,
    /// seq -> (id, uncompressed length).
    ids: Mutex<Vec<Option<(ChunkId, u64)>>>,
    pub plan: Mutex<Vec<PlannedEntry>>,
    /// Outstanding work items, plus one while staging is still running.
    pending: AtomicUsize,
    error: Mutex<Option<Error>>,
    pub deps: Mutex<Vec<Arc<Inflight>>>,
    touched: Mutex<[bool; 256]>,
    pub counters: Counters,
    pub stall: Mutex<Duration>,
    /// Shared collection lock, held until the save commits or fails.
    pub gc_lock: Mutex<Option<crate::local::GcLock>>,
    done: Mutex<Option<oneshot::Sender<Result<SaveReport>>>>,
}

impl SaveCtx {
    pub fn new(
        layout: Layout,
        run: String,
        step: u64,
        chunk_size: u64,
        metadata: serde_json::Value,
        logical_bytes: u64,
        done: oneshot::Sender<Result<SaveReport>>,
    ) -> Self {
        SaveCtx {
            layout,
            run,
            step,
            chunk_size,
            metadata,
            metrics: Default::default(),
            part: None,
            started: Instant::now(),
            logical_bytes,
            ids: Mutex::new(Vec::new()),
            plan: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(1),
            error: Mutex::new(None),
            deps: Mutex::new(Vec::new()),
            touched: Mutex::new([false; 256]),
            counters: Counters::default(),
            stall: Mutex::new(Duration::ZERO),
            gc_lock: Mutex::new(None),
            done: Mutex::new(Some(done)),
        }
    }

    /// Reserve a sequence number for a staged buffer.
    pub fn next_seq(&self) -> usize {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.push(None);
        ids.len() - 1
    }

    /// Count one more work item in flight.
    pub fn add_pending(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    pub fn set_id(&self, seq: usize, id: ChunkId, len: u64) {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())[seq] = Some((id, len));
    }

    pub fn id_of(&self, seq: usize) -> Option<(ChunkId, u64)> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())[seq]
    }

    pub fn touch(&self, id: &ChunkId) {
        self.touched.lock().unwrap_or_else(|p| p.into_inner())[id.0[0] as usize] = true;
    }

    pub fn touched_prefixes(&self) -> Vec<u8> {
        let t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        (0..=255u8).filter(|&p| t[p as usize]).collect()
    }

    pub fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    pub fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Mark one work item done; true if it was the last, and the save is
    /// ready to commit.
    pub fn finish_one(&self) -> bool {
        self.pending.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub fn resolve(&self, r: Result<SaveReport>) {
        self.gc_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A save waiting on a chunk that another save failed to write fails
    /// with the writer's error, not an internal one.
    #[test]
    fn a_peer_failure_reaches_the_waiter_with_its_kind() {
        let w = Inflight::new();
        let waiter = {
            let w = w.clone();
            std::thread::spawn(move || w.wait())
        };
        let cause = Error::io(
            "write chunk",
            "/store/chunks/ab/abcd",
            std::io::Error::from_raw_os_error(28), // ENOSPC
        );
        w.complete(Err(&cause));
        let e = waiter.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        match &e {
            Error::Io { op, path, source } => {
                assert_eq!(*op, "write chunk");
                assert_eq!(path, std::path::Path::new("/store/chunks/ab/abcd"));
                assert_eq!(source.raw_os_error(), None);
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
            }
            other => panic!("expected the writer's I/O error, got {other:?}"),
        }
        // A late waiter sees the same.
        assert_eq!(w.wait().unwrap_err().kind(), ErrorKind::Unavailable);
        let closed = Inflight::new();
        closed.complete(Err(&Error::Closed));
        assert_eq!(closed.wait().unwrap_err().kind(), ErrorKind::Closed);
        let ok = Inflight::new();
        ok.complete(Ok(()));
        assert!(ok.wait().is_ok());
    }
}
