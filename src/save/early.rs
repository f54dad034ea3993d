//! Early writes: a chunk likely to be new is written by an early writer
//! while a worker hashes it.
//!
//! The two halves of such a chunk ([`Split`]) run at once on different
//! threads: the early writer writes the payload with O_DIRECT to a
//! temporary file (the disk starts as soon as the chunk is staged, while
//! the caller's copy still holds the cores), and a worker hashes the same
//! staged bytes. Whichever half ends second carries the chunk on
//! ([`super::pipeline::dispatch`]): its header block written and the file
//! made durable and renamed, or the file removed if the chunk is stored
//! already. Neither half waits for the other, so the disk never waits on a
//! hash, and a chunk is ready to be named as soon as both are done.

use super::ctx::{Counters, SaveCtx};
use super::pipeline::{dispatch, ChunkJob, Hashed, PanicGuard, Payload, Shared, SyncJob, Writing};
use crate::chunk_id::ChunkId;
use crate::codec::Encoder;
use crate::error::Error;
use crate::local::EarlyChunk;
use crate::staging::StagingBuf;
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A chunk being written early and hashed at once.
pub(crate) struct Split {
    pub(super) ctx: Arc<SaveCtx>,
    seq: usize,
    width: u8,
    pub(super) buf: StagingBuf,
    halves: Mutex<Halves>,
}

/// What the halves of a [`Split`] have done so far.
#[derive(Default)]
struct Halves {
    /// The hash, once the worker is done (`Some(None)`: the worker
    /// failed, and so has the save).
    hashed: Option<Option<ChunkId>>,
    /// The early write, once done (`Some(None)`: it failed, and the chunk
    /// is written the usual way).
    written: Option<Option<EarlyChunk>>,
}

/// Both halves of a [`Split`], for whichever ended second.
type Both = (Option<ChunkId>, Option<EarlyChunk>);

impl Split {
    pub(super) fn new(job: ChunkJob) -> Arc<Split> {
        Arc::new(Split {
            ctx: job.ctx,
            seq: job.seq,
            width: job.width,
            buf: job.buf,
            halves: Mutex::new(Halves::default()),
        })
    }

    /// The worker's half is done: both halves if the write is done too.
    fn hashed(&self, id: Option<ChunkId>) -> Option<Both> {
        let mut h = self.halves.lock().unwrap_or_else(|p| p.into_inner());
        match h.written.take() {
            Some(written) => Some((id, written)),
            None => {
                h.hashed = Some(id);
                None
            }
        }
    }

    /// The early writer's half is done: both halves if the hash is done
    /// too.
    fn written(&self, written: Option<EarlyChunk>) -> Option<Both> {
        let mut h = self.halves.lock().unwrap_or_else(|p| p.into_inner());
        match h.hashed.take() {
            Some(id) => Some((id, written)),
            None => {
                h.written = Some(written);
                None
            }
        }
    }

    /// No early writer took this chunk (the pipeline is closing): its
    /// half counts as done with nothing written, before the worker's half
    /// is queued, so the worker carries the chunk on.
    pub(super) fn write_lost(&self) {
        let none = self.written(None);
        debug_assert!(none.is_none(), "hashed before it was queued");
    }

    /// No worker will hash this chunk (the pipeline is closing): the save
    /// fails, and the early writer, or this call if it is done, counts the
    /// chunk's work item done.
    pub(super) fn hash_lost(self: &Arc<Self>, shared: &Shared) {
        self.ctx.fail(Error::Closed);
        if let Some((_, written)) = self.hashed(None) {
            drop(written);
            shared.finish_one(self.ctx.clone());
        }
    }
}

/// Which half of a [`Split`] a thread runs.
#[derive(Clone, Copy)]
enum Half {
    Hash,
    Write,
}

/// Ends a half of a [`Split`] whose processing panicked: the save fails,
/// and the chunk's work item is counted done here if the other half is
/// done, else by the other half.
struct HalfGuard<'a> {
    shared: &'a Shared,
    split: Option<Arc<Split>>,
    half: Half,
}

impl Drop for HalfGuard<'_> {
    fn drop(&mut self) {
        let Some(split) = self.split.take() else {
            return;
        };
        split
            .ctx
            .fail(Error::Internal("a pipeline thread panicked".into()));
        let both = match self.half {
            Half::Hash => split.hashed(None),
            Half::Write => split.written(None),
        };
        if let Some((_, written)) = both {
            drop(written);
            self.shared.finish_one(split.ctx.clone());
        }
    }
}

/// Carry a split chunk on once both halves are done.
fn carry(
    split: &Arc<Split>,
    (id, written): Both,
    sync_tx: &Sender<SyncJob>,
    shared: &Shared,
    encoder: &mut Encoder,
) {
    let ctx = split.ctx.clone();
    let mut guard = PanicGuard {
        shared,
        ctx: Some(ctx.clone()),
        claimed: None,
    };
    let Some(id) = id else {
        // The hash half failed, and has failed the save.
        drop(written);
        guard.disarm();
        shared.finish_one(ctx);
        return;
    };
    let hashed = Hashed {
        ctx,
        seq: split.seq,
        id,
        payload: Payload::Split(split.clone()),
        width: split.width,
    };
    dispatch(hashed, written, sync_tx, shared, encoder, &mut guard);
}

/// A worker's half of a split chunk: hash it.
pub(super) fn hash_half(
    split: Arc<Split>,
    sync_tx: &Sender<SyncJob>,
    shared: &Shared,
    encoder: &mut Encoder,
) {
    let mut guard = HalfGuard {
        shared,
        split: Some(split.clone()),
        half: Half::Hash,
    };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // An error here only counts the hit: a test's action may hold
        // the hash back, so that the write ends first.
        let _ = crate::failpoint::hit("chunk.early_hash");
        let t = Instant::now();
        let id = ChunkId::of(&split.buf);
        Counters::add_time(&split.ctx.counters.hash_ns, t);
        guard.split = None;
        if let Some(both) = split.hashed(Some(id)) {
            carry(&split, both, sync_tx, shared, encoder);
        }
    }));
}

/// An early writer: writes each split chunk's payload with O_DIRECT from
/// staging while a worker hashes it. A chunk whose early write fails takes
/// the usual path once hashed, which reports the error if it persists.
pub(super) fn early_loop(
    rx: Receiver<Arc<Split>>,
    sync_tx: Sender<SyncJob>,
    shared: Arc<Shared>,
    mut encoder: Encoder,
) {
    for split in rx {
        let mut guard = HalfGuard {
            shared: &shared,
            split: Some(split.clone()),
            half: Half::Write,
        };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let t = Instant::now();
            // Taken whatever happens next: unused, the file is removed.
            let made = shared.tmp_files.as_ref().and_then(|f| f.take());
            // Counted in `Shared::writing`: a batched sync waits for it,
            // as its file reaches the barrier soon after.
            let written = {
                let _writing = Writing::start(&shared.writing);
                crate::failpoint::hit("chunk.early_write")
                    .map_err(|e| Error::io("write chunk early", "<failpoint>", e))
                    .and_then(|()| shared.chunks.write_payload_early(&split.buf, made))
            };
            Counters::add_time(&split.ctx.counters.write_ns, t);
            guard.split = None;
            if let Some(both) = split.written(written.ok().flatten()) {
                carry(&split, both, &sync_tx, &shared, &mut encoder);
            }
        }));
    }
}
