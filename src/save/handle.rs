//! The handle `save` returns and the report it resolves to.

use crate::error::{Error, Result};
use serde::Serialize;
use std::time::Duration;
use tokio::sync::oneshot;

/// What one save did, stage by stage.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// Bytes of tensors and blobs.
    pub logical_bytes: u64,
    /// Chunks the checkpoint references (with repeats within the save).
    pub chunks: u64,
    /// Chunks this save wrote to disk.
    pub chunks_written: u64,
    /// Bytes this save wrote for chunks (headers included).
    pub bytes_written: u64,
    /// Uncompressed bytes of chunks that were already stored or in flight.
    pub bytes_deduped: u64,
    /// Uncompressed bytes of the chunks this save wrote.
    pub bytes_written_uncompressed: u64,
    /// Payload bytes written early (before hashing, see
    /// `StoreOptions::early_write`) for chunks that turned out to be
    /// stored already, and removed again: written to disk, but not part of
    /// `bytes_written`.
    pub bytes_discarded: u64,
    /// Time `save` blocked the caller (the staging copy).
    pub stall: Duration,
    /// Time from the `save` call to the manifest commit.
    pub durable: Duration,
    /// Thread time spent hashing.
    pub hash_busy: Duration,
    /// Thread time spent compressing.
    pub encode_busy: Duration,
    /// Thread time spent writing chunk files into the page cache.
    pub write_busy: Duration,
    /// Thread time spent in fsync and rename of chunk files.
    pub sync_busy: Duration,
    /// Time to write and publish the manifest.
    pub commit: Duration,
}

/// Returned by `save` once every byte is staged: the caller may reuse its
/// buffers. Wait on it for "durable on local disk".
#[derive(Debug)]
pub struct SaveHandle {
    pub(crate) run: String,
    pub(crate) step: u64,
    pub(crate) stall: Duration,
    pub(crate) rx: oneshot::Receiver<Result<SaveReport>>,
}

impl SaveHandle {
    /// The run being saved.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The step being saved.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// How long `save` blocked the caller.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// Block until the checkpoint is committed on local disk (or failed).
    /// Must not be called from inside an async runtime; use
    /// [`SaveHandle::durable`] there.
    pub fn wait(self) -> Result<SaveReport> {
        self.rx.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// Await the local commit.
    pub async fn durable(self) -> Result<SaveReport> {
        self.rx.await.map_err(|_| Error::Closed)?
    }
}
