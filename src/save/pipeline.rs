//! The background pipeline that makes staged chunks durable.
//!
//! ```text
//! save() --Chunk--> workers (hash, dedup, encode, write tmp file, release staging)
//!   '--Split--> early writers (O_DIRECT payload write) and workers (hash), at once
//!                      |--Sync--> syncers (O_DIRECT write; fdatasync, rename into chunks/)
//!                      |             '--Barrier--> barrier (one syncfs per batch,
//!                      |                           rename the batch into chunks/)
//!                      '--------> committer (wait for shared chunks, fsync dirs,
//!                                            publish the manifest)
//! ```
//!
//! Workers are CPU-bound (one per core); syncers block in writes and
//! fsync, so there are several to keep the disk queue full; a single
//! committer publishes manifests.
//!
//! Early writes: a raw chunk whose position in the state (run, entry,
//! offset) held other bytes when last staged by this store, or was never
//! staged by it, is likely new, so an early writer writes its payload with
//! O_DIRECT to a temporary file as soon as it is staged, while a worker
//! hashes it (`super::early`); the file was usually created ahead, off the
//! writer's thread ([`TmpFileSupply`]), so the writer does not wait on the
//! file system's journal before its data goes out. The disk then works while the caller's copy
//! still holds the cores (the workers run at a lower priority, so hashing
//! waits for the copy). Whichever of the two ends second either has the
//! 4 KiB header block written and the file made durable and renamed as any
//! other, or, if the chunk is stored already, removes the file: the bytes
//! were written for nothing but the checkpoint is the same. A chunk whose position held the
//! same sample of bytes last time is hashed first, so an unchanged tensor
//! is never rewritten. With batched syncs
//! (`StoreOptions::batch_sync`, for chunks written with O_DIRECT), a
//! syncer hands each chunk file it wrote to the barrier thread instead of
//! `fdatasync`ing it: the barrier gathers the files handed to it until no
//! write is in progress, makes them durable with one `syncfs` of the
//! store's file system, and only then renames them to their final names,
//! while the syncers go on writing the next batch. A save commits once all
//! its chunks are durable, including chunks it shares with a concurrent
//! save that is still writing them.

use super::ctx::{Counters, Inflight, SaveCtx};
use super::early::{early_loop, hash_half, Split};
use super::handle::SaveReport;
use super::known::KnownChunks;
use crate::chunk_id::ChunkId;
use crate::codec::{CodecChoice, Encoder};
use crate::error::{Error, Result};
use crate::format::chunk::{ChunkHeader, Codec, HEADER_LEN};
use crate::format::manifest::{encode_manifest, BlobEntry, ChunkRef, Manifest, TensorEntry};
use crate::format::FORMAT_VERSION;
use crate::local::chunk_store::sync_prefix_dirs_of;
use crate::local::durable::{create_dir_chain_durable_on, publish_new_on};
use crate::local::tmp_files::StagingGuard;
use crate::local::{EarlyChunk, LocalChunkStore, PendingChunk, TmpFileSupply};
use crate::staging::StagingBuf;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A staged chunk for a worker.
pub(crate) struct ChunkJob {
    pub ctx: Arc<SaveCtx>,
    pub seq: usize,
    pub buf: StagingBuf,
    /// Element width for byte-grouping (0: none).
    pub width: u8,
    /// Write the payload while it is hashed, if the pipeline writes early
    /// (see [`Shared::likely_new`]).
    pub write_first: bool,
}

/// Work for a worker.
pub(super) enum Work {
    /// Hash a chunk, then have it written (or found stored).
    Chunk(ChunkJob),
    /// Hash a chunk an early writer is writing at the same time.
    Hash(Arc<Split>),
}

/// A chunk's staged bytes, owned by one job or shared by the two halves
/// of an early-written chunk.
pub(super) enum Payload {
    Own(StagingBuf),
    Split(Arc<Split>),
}

impl std::ops::Deref for Payload {
    type Target = StagingBuf;
    fn deref(&self) -> &StagingBuf {
        match self {
            Payload::Own(b) => b,
            Payload::Split(s) => &s.buf,
        }
    }
}

/// How a chunk reaches disk.
enum WriteKind {
    /// Already in a temporary file (encoded payloads): fsync and publish.
    Pending(PendingChunk),
    /// Raw payload still in staging: write it with O_DIRECT, then publish.
    Direct { header: ChunkHeader, buf: Payload },
    /// Raw payload written early: write its header block, then publish.
    Early {
        header: ChunkHeader,
        early: EarlyChunk,
    },
}

/// A chunk file written by an I/O thread, for the barrier to make durable
/// and publish.
struct BarrierJob {
    ctx: Arc<SaveCtx>,
    id: ChunkId,
    len: u64,
    pending: PendingChunk,
    inflight: Arc<Inflight>,
}

/// A chunk for the I/O threads.
pub(super) struct SyncJob {
    ctx: Arc<SaveCtx>,
    id: ChunkId,
    len: u64,
    write: WriteKind,
    inflight: Arc<Inflight>,
}

pub(super) struct Shared {
    pub(super) chunks: LocalChunkStore,
    /// Chunks known to be stored: a chunk surely absent is written
    /// without a lookup of its name.
    known: Arc<KnownChunks>,
    /// O_DIRECT writes in progress, early ones included (the barrier waits
    /// for them to fill its batch).
    pub(super) writing: AtomicUsize,
    /// Re-hash a stored chunk before reusing it (not only its header).
    verify_reused: bool,
    inflight: Mutex<HashMap<ChunkId, Arc<Inflight>>>,
    commit_tx: Sender<Arc<SaveCtx>>,
    /// Whether raw chunks likely to be new are written while they are
    /// hashed (`StoreOptions::early_write`, with O_DIRECT and the raw
    /// codec).
    early_write: bool,
    /// A sample of what each chunk position held when last staged, by a
    /// hash of the position (see [`Pipeline::likely_new`]).
    last_staged: Mutex<HashMap<u64, u64>>,
    /// Temporary files created ahead for early writes (with early writes
    /// on): one requested per chunk queued for an early writer, taken by
    /// it.
    pub(super) tmp_files: Option<Arc<TmpFileSupply>>,
}

/// Positions [`Shared::last_staged`] remembers at most; past it the
/// memory starts over (a state of 16 MiB chunks this large is 16 TiB).
const MAX_POSITIONS: usize = 1 << 20;

enum Claim {
    Stored,
    Wait(Arc<Inflight>),
    Write(Arc<Inflight>),
}

impl Shared {
    /// Whether the chunk at `position` (a hash of run, rank, entry and
    /// chunk index) whose bytes give `sample` (`stage::sample_of`) is
    /// likely new, so worth writing while it is hashed: the pipeline
    /// writes early, and this store never staged that position or staged
    /// other bytes there last time. A chunk judged new that is stored
    /// after all costs a write and a removal; one judged old is hashed
    /// first, as with early writes off. Remembers `sample` for the
    /// position either way.
    fn likely_new(&self, position: u64, sample: u64) -> bool {
        if !self.early_write {
            return false;
        }
        let mut last = self.last_staged.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= MAX_POSITIONS && !last.contains_key(&position) {
            last.clear();
        }
        last.insert(position, sample) != Some(sample)
    }

    /// Decide who writes chunk `id` of `len` bytes. A stored chunk is
    /// reused only if it checks out (header and size; with
    /// `verify_reused`, its hash too); otherwise it is written again over
    /// the bad file. The check runs outside the lock: at worst a chunk
    /// that another save has just finished is written twice, identically.
    fn claim(&self, id: ChunkId, len: u64) -> Claim {
        {
            let map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(w) = map.get(&id) {
                return Claim::Wait(w.clone());
            }
        }
        let stored =
            !self.known.surely_absent(&id) && self.chunks.is_reusable(&id, len, self.verify_reused);
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = map.get(&id) {
            return Claim::Wait(w.clone());
        }
        if stored {
            self.known.record(id);
            return Claim::Stored;
        }
        let w = Inflight::new();
        map.insert(id, w.clone());
        Claim::Write(w)
    }

    fn release(&self, id: &ChunkId, w: &Inflight, result: std::result::Result<(), &Error>) {
        w.complete(result);
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// One work item of `ctx` is done; hand it to the committer if last.
    pub(super) fn finish_one(&self, ctx: Arc<SaveCtx>) {
        if ctx.finish_one() {
            if let Err(e) = self.commit_tx.send(ctx) {
                e.0.resolve(Err(Error::Closed));
            }
        }
    }
}

/// Submits chunks of a save staged outside one call (see
/// [`Pipeline::submitter`]).
pub(crate) struct Submitter {
    tx: Sender<Work>,
    early_tx: Sender<Arc<Split>>,
    shared: Arc<Shared>,
}

impl Submitter {
    /// As [`Pipeline::staging_files`].
    pub fn staging_files(&self) -> Option<StagingGuard> {
        self.shared.tmp_files.as_ref().map(|f| f.staging())
    }

    /// As [`Pipeline::submit`].
    pub fn submit(&self, job: ChunkJob) -> Result<()> {
        send_job(&self.tx, &self.early_tx, &self.shared, job)
    }

    /// As [`Pipeline::likely_new`].
    pub fn likely_new(&self, position: u64, sample: u64) -> bool {
        self.shared.likely_new(position, sample)
    }

    /// As [`Pipeline::staging_done`].
    pub fn staging_done(&self, ctx: Arc<SaveCtx>) {
        self.shared.finish_one(ctx);
    }
}

/// The pipeline threads of one store.
pub(crate) struct Pipeline {
    tx: Option<Sender<Work>>,
    early_tx: Option<Sender<Arc<Split>>>,
    shared: Option<Arc<Shared>>,
    threads: Vec<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
    /// Threads that copy a large state into staging.
    copy_threads: usize,
}

/// How many of each kind of pipeline thread a store runs.
pub(crate) struct PipelineThreads {
    /// Workers that hash (and encode) staged chunks.
    pub workers: usize,
    /// Of the workers, how many run at the priority of the thread that
    /// opened the store (the rest run [`WORKER_NICE`] steps lower).
    pub lead_workers: usize,
    /// I/O threads that write, sync and rename chunk files.
    pub syncers: usize,
    /// Threads that copy a large state into staging.
    pub copy_threads: usize,
}

impl Pipeline {
    pub fn start(
        chunks: LocalChunkStore,
        codec: CodecChoice,
        threads: PipelineThreads,
        verify_reused: bool,
        batch_sync: bool,
        max_dirty: u64,
        early_write: bool,
    ) -> Result<Self> {
        let PipelineThreads {
            workers,
            lead_workers,
            syncers,
            copy_threads,
        } = threads;
        let (tx, rx) = unbounded::<Work>();
        let (sync_tx, sync_rx) = unbounded::<SyncJob>();
        // Only O_DIRECT writes are batched: their data is on the device
        // when the write returns, so one syncfs covers them.
        let batch_sync = (batch_sync && chunks.direct_io()).then_some(max_dirty);
        let (commit_tx, commit_rx) = unbounded::<Arc<SaveCtx>>();
        let known = Arc::new(KnownChunks::default());
        let early_write = early_write && chunks.direct_io() && codec == CodecChoice::Raw;
        let tmp_files = if early_write {
            Some(Arc::new(TmpFileSupply::start(chunks.layout().tmp_dir())?))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            early_write,
            tmp_files: tmp_files.clone(),
            last_staged: Mutex::new(HashMap::new()),
            writing: AtomicUsize::new(0),
            known: known.clone(),
            chunks: chunks.clone(),
            verify_reused,
            inflight: Mutex::new(HashMap::new()),
            commit_tx,
        });
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| Error::Internal(format!("spawn pipeline thread: {e}")))
        };
        threads.push(spawn(
            "cairn-list".into(),
            Box::new(move || known.load(&chunks)),
        )?);
        for i in 0..workers.max(1) {
            let (rx, sync_tx, shared) = (rx.clone(), sync_tx.clone(), shared.clone());
            let encoder = Encoder::new(codec)?;
            let nice = if i < lead_workers { 0 } else { WORKER_NICE };
            threads.push(spawn(
                format!("cairn-worker-{i}"),
                Box::new(move || worker_loop(nice, rx, sync_tx, shared, encoder)),
            )?);
        }
        // Early writers, as workers, hand chunks to the I/O threads: those
        // end after both, once the pipeline's own senders are dropped.
        let (early_tx, early_rx) = unbounded::<Arc<Split>>();
        if early_write {
            for i in 0..syncers.max(1) {
                let (rx, sync_tx, shared) = (early_rx.clone(), sync_tx.clone(), shared.clone());
                let encoder = Encoder::new(codec)?;
                threads.push(spawn(
                    format!("cairn-early-{i}"),
                    Box::new(move || early_loop(rx, sync_tx, shared, encoder)),
                )?);
            }
        }
        drop(early_rx);
        drop(sync_tx);
        let (barrier_tx, barrier_rx) = unbounded::<BarrierJob>();
        for i in 0..syncers.max(1) {
            let (rx, shared) = (sync_rx.clone(), shared.clone());
            let barrier = batch_sync.map(|_| barrier_tx.clone());
            threads.push(spawn(
                format!("cairn-sync-{i}"),
                Box::new(move || sync_loop(rx, shared, barrier)),
            )?);
        }
        // The syncers hold the only senders: the barrier ends after them.
        drop(barrier_tx);
        if let Some(max_dirty) = batch_sync {
            let (shared, queued) = (shared.clone(), sync_rx.clone());
            threads.push(spawn(
                "cairn-barrier".into(),
                Box::new(move || barrier_loop(barrier_rx, queued, shared, max_dirty)),
            )?);
        }
        let committer = spawn(
            "cairn-commit".into(),
            Box::new(move || commit_loop(commit_rx, max_dirty, tmp_files)),
        )?;
        Ok(Pipeline {
            tx: Some(tx),
            early_tx: Some(early_tx),
            shared: Some(shared),
            threads,
            committer: Some(committer),
            copy_threads: copy_threads.max(1),
        })
    }

    /// Whether the pipeline has listed the store's chunk files.
    #[cfg(feature = "test-util")]
    pub fn chunks_listed(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.known.listed())
    }

    /// Threads that copy a large state into staging.
    pub fn copy_threads(&self) -> usize {
        self.copy_threads
    }

    pub fn submit(&self, job: ChunkJob) -> Result<()> {
        let (Some(tx), Some(early_tx), Some(shared)) = (&self.tx, &self.early_tx, &self.shared)
        else {
            return Err(Error::Closed);
        };
        send_job(tx, early_tx, shared, job)
    }

    /// Whether the chunk at `position` (a hash of run, entry and offset)
    /// whose bytes give `sample` is likely new: see [`Shared::likely_new`].
    pub fn likely_new(&self, position: u64, sample: u64) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.likely_new(position, sample))
    }

    /// A handle that submits chunks and ends staging after the caller's
    /// call has returned (leased saves, `crate::lease`). While one is
    /// alive, shutting the pipeline down waits for it to be dropped.
    pub fn submitter(&self) -> Result<Submitter> {
        match (&self.tx, &self.shared) {
            (Some(tx), Some(shared)) => Ok(Submitter {
                tx: tx.clone(),
                early_tx: self.early_tx.clone().ok_or(Error::Closed)?,
                shared: shared.clone(),
            }),
            _ => Err(Error::Closed),
        }
    }

    /// Called by the stager once every chunk of `ctx` is submitted.
    pub fn staging_done(&self, ctx: Arc<SaveCtx>) {
        match &self.shared {
            Some(shared) => shared.finish_one(ctx),
            None => ctx.resolve(Err(Error::Closed)),
        }
    }

    /// While the returned guard lives, a save is copying chunks into
    /// staging: temporary files for early writes are kept made ahead
    /// ([`TmpFileSupply::staging`]). `None` without early writes.
    pub fn staging_files(&self) -> Option<StagingGuard> {
        self.shared
            .as_ref()?
            .tmp_files
            .as_ref()
            .map(|f| f.staging())
    }

    /// Drain all queued work, commit what completes, and stop the threads.
    pub fn shutdown(&mut self) {
        // Workers exit once the chunk queue is drained, syncers once every
        // worker (their only senders) is gone. The committer exits when the
        // last `Shared`, which owns its sender, is dropped.
        self.tx.take();
        self.early_tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(files) = self.shared.as_ref().and_then(|s| s.tmp_files.as_ref()) {
            files.close();
        }
        self.shared.take();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Cleans up after a job whose processing panicked: the chunk it claimed
/// is released as failed (so no other save waits on it forever), the save
/// fails, and its work item is counted done so its handle resolves.
pub(super) struct PanicGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) ctx: Option<Arc<SaveCtx>>,
    pub(super) claimed: Option<(ChunkId, Arc<Inflight>)>,
}

impl PanicGuard<'_> {
    /// The job accounted for itself.
    pub(super) fn disarm(&mut self) {
        self.ctx = None;
        self.claimed = None;
    }
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if let Some((id, w)) = self.claimed.take() {
            let e = Error::Internal("a pipeline thread panicked".into());
            self.shared.release(&id, &w, Err(&e));
        }
        if let Some(ctx) = self.ctx.take() {
            ctx.fail(Error::Internal("a pipeline thread panicked".into()));
            self.shared.finish_one(ctx);
        }
    }
}

fn worker_loop(
    nice: i32,
    rx: Receiver<Work>,
    sync_tx: Sender<SyncJob>,
    shared: Arc<Shared>,
    mut encoder: Encoder,
) {
    if nice > 0 {
        lower_thread_priority(nice);
    }
    for work in rx {
        match work {
            Work::Chunk(job) => {
                let mut guard = PanicGuard {
                    shared: &shared,
                    ctx: Some(job.ctx.clone()),
                    claimed: None,
                };
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    process_chunk(job, &sync_tx, &shared, &mut encoder, &mut guard)
                }));
            }
            Work::Hash(split) => hash_half(split, &sync_tx, &shared, &mut encoder),
        }
    }
}

/// How many nice steps below the thread that opened the store the
/// workers other than the lead workers run: while a caller copies its
/// state into staging (the stall a trainer waits on), hashing the chunks
/// already staged must not take its cores. The lead workers
/// (`StoreOptions::lead_workers`, none by default) keep the priority of
/// the opening thread, so chunks are hashed and the disk can start
/// writing while the copy goes on.
const WORKER_NICE: i32 = 10;

/// Lower the calling thread's CPU priority by `by` nice steps (on Linux a
/// nice value is per thread). Best effort: failures are ignored.
fn lower_thread_priority(by: i32) {
    // SAFETY: plain syscalls on the calling thread's own id; errno is
    // thread-local.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let cur = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 {
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid, (cur + by).min(19));
        }
    }
}

fn process_chunk(
    job: ChunkJob,
    sync_tx: &Sender<SyncJob>,
    shared: &Shared,
    encoder: &mut Encoder,
    guard: &mut PanicGuard<'_>,
) {
    let ChunkJob {
        ctx,
        seq,
        buf,
        width,
        ..
    } = job;
    let t = Instant::now();
    let id = ChunkId::of(&buf);
    Counters::add_time(&ctx.counters.hash_ns, t);
    let payload = Payload::Own(buf);
    dispatch(
        Hashed {
            ctx,
            seq,
            id,
            payload,
            width,
        },
        None,
        sync_tx,
        shared,
        encoder,
        guard,
    );
}

/// A hashed chunk, for [`dispatch`].
pub(super) struct Hashed {
    pub ctx: Arc<SaveCtx>,
    pub seq: usize,
    pub id: ChunkId,
    pub payload: Payload,
    /// Element width for byte-grouping (0: none).
    pub width: u8,
}

/// Record a hashed chunk in its save and decide its fate: reused if
/// stored, waited for if another save is writing it, else handed to the
/// I/O threads (`written`: its payload, written early, which is removed
/// if the chunk turns out stored).
pub(super) fn dispatch(
    hashed: Hashed,
    written: Option<EarlyChunk>,
    sync_tx: &Sender<SyncJob>,
    shared: &Shared,
    encoder: &mut Encoder,
    guard: &mut PanicGuard<'_>,
) {
    {
        let Hashed {
            ctx,
            seq,
            id,
            payload: buf,
            width,
        } = hashed;
        let c = &ctx.counters;
        let len = buf.len() as u64;
        ctx.set_id(seq, id, len);
        ctx.touch(&id);
        Counters::add(&c.chunks, 1);
        let claim = shared.claim(id, len);
        if !matches!(claim, Claim::Write(_)) {
            Counters::add(&c.bytes_deduped, len);
            // Written early for nothing; the file goes with `written`.
            if written.is_some() {
                Counters::add(&c.bytes_discarded, len);
            }
        }
        match (claim, written) {
            (Claim::Stored, _) => {}
            (Claim::Wait(w), _) => {
                ctx.deps.lock().unwrap_or_else(|p| p.into_inner()).push(w);
            }
            (Claim::Write(w), Some(early)) => {
                guard.claimed = Some((id, w.clone()));
                drop(buf);
                let header = ChunkHeader {
                    codec: Codec::Raw,
                    filter: 0,
                    uncompressed_len: len,
                    stored_len: len,
                    payload_offset: HEADER_LEN as u32,
                    id,
                };
                let job = SyncJob {
                    ctx: ctx.clone(),
                    id,
                    len,
                    write: WriteKind::Early { header, early },
                    inflight: w.clone(),
                };
                guard.disarm();
                if sync_tx.send(job).is_err() {
                    shared.release(&id, &w, Err(&Error::Closed));
                    ctx.fail(Error::Closed);
                } else {
                    return;
                }
            }
            (Claim::Write(w), None) => {
                guard.claimed = Some((id, w.clone()));
                let t = Instant::now();
                let (write, header) = {
                    let (codec, filter, payload) = encoder.encode(&buf, width);
                    let header = ChunkHeader {
                        codec,
                        filter,
                        uncompressed_len: len,
                        stored_len: payload.len() as u64,
                        payload_offset: HEADER_LEN as u32,
                        id,
                    };
                    Counters::add_time(&c.encode_ns, t);
                    if codec == Codec::Raw && shared.chunks.direct_io() {
                        (None, header)
                    } else {
                        // Encoded payloads live in the encoder: write them
                        // to the page cache now and free the staging space.
                        let t = Instant::now();
                        let res = shared.chunks.begin_write(&header, payload);
                        Counters::add_time(&c.write_ns, t);
                        (Some(res), header)
                    }
                };
                let write = match write {
                    None => WriteKind::Direct { header, buf },
                    Some(Ok(pending)) => {
                        drop(buf);
                        WriteKind::Pending(pending)
                    }
                    Some(Err(e)) => {
                        drop(buf);
                        guard.disarm();
                        shared.release(&id, &w, Err(&e));
                        ctx.fail(e);
                        shared.finish_one(ctx);
                        return;
                    }
                };
                let job = SyncJob {
                    ctx: ctx.clone(),
                    id,
                    len,
                    write,
                    inflight: w.clone(),
                };
                guard.disarm();
                if let Err(e) = sync_tx.send(job) {
                    if let WriteKind::Pending(p) = e.0.write {
                        p.abandon();
                    }
                    shared.release(&id, &w, Err(&Error::Closed));
                    ctx.fail(Error::Closed);
                } else {
                    return;
                }
            }
        }
        guard.disarm();
        shared.finish_one(ctx);
    }
}

/// Queue `job` of a save: a chunk to be written first, if the pipeline
/// writes early, goes both to an early writer and to a worker, which
/// write and hash it at once ([`Split`]); any other to a worker.
fn send_job(
    tx: &Sender<Work>,
    early_tx: &Sender<Arc<Split>>,
    shared: &Shared,
    mut job: ChunkJob,
) -> Result<()> {
    let ctx = job.ctx.clone();
    ctx.add_pending();
    job.buf.zero_padding();
    let work = if job.write_first && shared.early_write {
        let split = Split::new(job);
        if let Some(files) = &shared.tmp_files {
            files.request();
        }
        if early_tx.send(split.clone()).is_err() {
            // The file requested for it goes unused.
            drop(shared.tmp_files.as_ref().and_then(|f| f.take()));
            // No early writer: its half is done, unwritten, and the worker
            // writes the chunk the usual way once hashed.
            split.write_lost();
        }
        Work::Hash(split)
    } else {
        Work::Chunk(job)
    };
    tx.send(work).map_err(|e| {
        if let Work::Hash(split) = e.0 {
            // The early writer settles the chunk (and fails the save).
            split.hash_lost(shared);
            return Error::Closed;
        }
        // The stager still holds its own token, so this cannot be last.
        ctx.finish_one();
        Error::Closed
    })
}

fn sync_loop(rx: Receiver<SyncJob>, shared: Arc<Shared>, barrier: Option<Sender<BarrierJob>>) {
    for job in rx {
        let mut guard = PanicGuard {
            shared: &shared,
            ctx: Some(job.ctx.clone()),
            claimed: Some((job.id, job.inflight.clone())),
        };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process_sync(job, &shared, barrier.as_ref(), &mut guard)
        }));
    }
}

fn process_sync(
    job: SyncJob,
    shared: &Shared,
    barrier: Option<&Sender<BarrierJob>>,
    guard: &mut PanicGuard<'_>,
) {
    let SyncJob {
        ctx,
        id,
        len,
        write,
        inflight,
    } = job;
    let c = &ctx.counters;
    let (pending, direct) = match write {
        WriteKind::Pending(p) => (Ok(p), false),
        WriteKind::Direct { header, buf } => {
            let t = Instant::now();
            let res = {
                let _writing = Writing::start(&shared.writing);
                shared.chunks.write_direct(&header, &buf)
            };
            Counters::add_time(&c.write_ns, t);
            (res, true)
        }
        WriteKind::Early { header, early } => {
            let t = Instant::now();
            let res = {
                let _writing = Writing::start(&shared.writing);
                early.finish(&header)
            };
            Counters::add_time(&c.write_ns, t);
            (res, true)
        }
    };
    let pending = match (pending, barrier) {
        // Written with O_DIRECT: the barrier makes it durable with the
        // rest of its batch and publishes it.
        (Ok(p), Some(barrier)) if direct => {
            guard.disarm();
            let job = BarrierJob {
                ctx: ctx.clone(),
                id,
                len,
                pending: p,
                inflight: inflight.clone(),
            };
            match barrier.send(job) {
                Ok(()) => return,
                Err(e) => {
                    e.0.pending.abandon();
                    Err(Error::Closed)
                }
            }
        }
        (p, _) => p,
    };
    let t = Instant::now();
    let res = pending.and_then(|p| {
        let stored = p.stored_bytes;
        p.finish().map(|()| stored)
    });
    Counters::add_time(&c.sync_ns, t);
    guard.disarm();
    settle(shared, ctx, id, len, &inflight, res);
}

/// Account for chunk `id` of `ctx` (`len` bytes uncompressed) once it is
/// durable under its final name (`Ok` with its stored bytes) or has
/// failed, and count the chunk's work item done.
fn settle(
    shared: &Shared,
    ctx: Arc<SaveCtx>,
    id: ChunkId,
    len: u64,
    inflight: &Inflight,
    res: Result<u64>,
) {
    let c = &ctx.counters;
    match res {
        Ok(stored) => {
            Counters::add(&c.chunks_written, 1);
            Counters::add(&c.bytes_written, stored);
            Counters::add(&c.bytes_written_uncompressed, len);
            // Recorded before the in-flight entry goes, so that a claim
            // in between cannot take the chunk for new.
            shared.known.record(id);
            shared.release(&id, inflight, Ok(()));
        }
        Err(e) => {
            shared.release(&id, inflight, Err(&e));
            ctx.fail(e);
        }
    }
    shared.finish_one(ctx);
}

/// Counts an O_DIRECT write in progress while alive.
pub(super) struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    pub(super) fn start(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Writing(n)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The most uncompressed bytes one barrier sync covers: a larger batch
/// waits for no more writes.
const MAX_BATCH_BYTES: u64 = 512 << 20;

/// How long the barrier waits for the next written file of a batch while
/// writes are in progress, at most.
const BATCH_WAIT: Duration = Duration::from_millis(250);

/// The barrier: gathers the chunk files handed to it until no write is in
/// progress or queued for the I/O threads (or the batch holds
/// [`MAX_BATCH_BYTES`]), makes them all durable with one `syncfs`, then
/// renames each to its final name. Each sync is a metadata write-out (a
/// journal commit, or the inode writes on a file system without one) and
/// a cache flush that stalls the disk's queue, so one sync per run of
/// writes, not one per file. With more than `max_dirty` bytes of dirty
/// page cache on the machine, which `syncfs` would write back too, the
/// batch is made durable file by file instead. A chunk reaches its final
/// name only after a sync that began after its write returned; if the
/// sync fails, every chunk of the batch fails and its temporary file is
/// removed.
fn barrier_loop(
    rx: Receiver<BarrierJob>,
    queued: Receiver<SyncJob>,
    shared: Arc<Shared>,
    max_dirty: u64,
) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.len;
        let mut batch = vec![first];
        loop {
            for j in rx.try_iter() {
                bytes += j.len;
                batch.push(j);
            }
            let idle = queued.is_empty() && shared.writing.load(Ordering::Acquire) == 0;
            if idle || bytes >= MAX_BATCH_BYTES {
                break;
            }
            match rx.recv_timeout(BATCH_WAIT) {
                Ok(j) => {
                    bytes += j.len;
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        let t = Instant::now();
        // `syncfs` writes back everything dirty on the file system, not only
        // this batch: with much dirty data on the machine (a data loader's
        // cache, logs), the batch is made durable file by file instead.
        let whole_fs = crate::failpoint::hit("chunk.batch_dirty").is_ok()
            && little_dirty(max_dirty)
            && shared.chunks.syncfs_commits();
        let synced = if whole_fs {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::failpoint::hit("chunk.batch_sync")?;
                shared.chunks.sync_filesystem()
            }))
            .unwrap_or_else(|_| Err(std::io::Error::other("syncfs panicked")))
        } else {
            Ok(())
        };
        // The sync's time, shared among the chunks it made durable.
        let share = t.elapsed().as_nanos() as u64 / batch.len() as u64;
        for job in batch {
            let mut guard = PanicGuard {
                shared: &shared,
                ctx: Some(job.ctx.clone()),
                claimed: Some((job.id, job.inflight.clone())),
            };
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let BarrierJob {
                    ctx,
                    id,
                    len,
                    pending,
                    inflight,
                } = job;
                Counters::add(&ctx.counters.sync_ns, share);
                let stored = pending.stored_bytes;
                let res = match &synced {
                    Ok(()) if whole_fs => pending.publish_synced().map(|()| stored),
                    Ok(()) => {
                        let t = Instant::now();
                        let r = pending.finish().map(|()| stored);
                        Counters::add_time(&ctx.counters.sync_ns, t);
                        r
                    }
                    Err(e) => {
                        let err = Error::io("syncfs chunk", pending.tmp_path(), copy_io_error(e));
                        pending.abandon();
                        Err(err)
                    }
                };
                guard.disarm();
                settle(&shared, ctx, id, len, &inflight, res);
            }));
        }
    }
}

/// Whether the machine's dirty and under-writeback page cache is at most
/// `max_dirty` bytes (0: never), so that a `syncfs`, which writes it back
/// too, is cheap.
fn little_dirty(max_dirty: u64) -> bool {
    max_dirty > 0 && page_cache_dirty_bytes().is_some_and(|d| d <= max_dirty)
}

/// Dirty and under-writeback bytes in the page cache, from
/// `/proc/meminfo`; `None` if it cannot be read.
fn page_cache_dirty_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_dirty_bytes(&text)
}

/// The `Dirty` and `Writeback` fields of a `/proc/meminfo` text, summed,
/// in bytes.
fn parse_dirty_bytes(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let mut words = line[name.len()..].split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        }
    };
    field("Dirty:")?.checked_add(field("Writeback:")?)
}

/// The same error again, for each chunk a failed sync fails.
fn copy_io_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

fn commit_loop(rx: Receiver<Arc<SaveCtx>>, max_dirty: u64, tmp_files: Option<Arc<TmpFileSupply>>) {
    for ctx in rx {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit(&ctx, max_dirty)))
            .unwrap_or_else(|_| Err(Error::Internal("the commit thread panicked".into())));
        // Files made ahead that no write will take go before the caller
        // hears: a save leaves `tmp/` as it found it.
        if let Some(files) = &tmp_files {
            files.trim();
        }
        ctx.resolve(r);
    }
}

/// Fan-out directories above which a commit makes their entries durable
/// with one sync of the file system rather than an fsync each (with
/// little dirty page cache about): a 1 GiB state touches about 100, whose
/// fsyncs took longer than its last chunk's writes.
const SYNCFS_MIN_DIRS: usize = 16;

/// Make durable the names of the chunks in the fan-out directories of
/// `prefixes`: with more than [`SYNCFS_MIN_DIRS`] of them and at most
/// `max_dirty` bytes of dirty page cache on the machine (which a sync of
/// the file system writes back too), one `syncfs`; else, or where the file
/// system has none known to commit its metadata
/// ([`crate::local::fs::syncfs_commits`]), an fsync of each directory.
fn sync_chunk_names(
    layout: &crate::layout::Layout,
    prefixes: Vec<u8>,
    max_dirty: u64,
) -> Result<()> {
    if prefixes.len() > SYNCFS_MIN_DIRS && little_dirty(max_dirty) {
        if let Some(res) = layout.fs().sync_filesystem(&layout.chunks_dir()) {
            return res.map_err(|e| Error::io("syncfs (chunk names)", layout.chunks_dir(), e));
        }
    }
    sync_prefix_dirs_of(layout, prefixes)
}

fn commit(ctx: &SaveCtx, max_dirty: u64) -> Result<SaveReport> {
    if let Some(e) = ctx.take_error() {
        return Err(e);
    }
    let t = Instant::now();
    let deps = std::mem::take(&mut *ctx.deps.lock().unwrap_or_else(|p| p.into_inner()));
    // A chunk shared with a concurrent save that failed to write it fails
    // this save with that save's error.
    for d in deps {
        d.wait()?;
    }
    let layout_root = &ctx.layout;
    let fs = layout_root.fs();
    // Every fan-out directory holding a chunk of this save, reused ones
    // included (their names may not be durable yet if another writer
    // has not committed), before the manifest names them.
    sync_chunk_names(layout_root, ctx.touched_prefixes(), max_dirty)?;
    let manifest = build_manifest(ctx)?;
    let bytes = encode_manifest(&manifest)?;
    let step_dir = layout_root.step_dir(&ctx.run, ctx.step);
    layout_root.check_dirs(Some(&ctx.run), Some(ctx.step))?;
    if let Some(p) = &ctx.part {
        // A part: create-only under a name of its own bytes, so a retried
        // save of the rank never collides with an earlier attempt, and
        // identical bytes are already published.
        let parts = layout_root.parts_dir(&ctx.run, ctx.step);
        crate::layout::check_store_dir(&parts)?;
        create_dir_chain_durable_on(fs, &layout_root.runs_dir(), &parts)?;
        let dest = parts.join(crate::layout::part_file_name(p.rank, p.world_size, &bytes));
        publish_new_on(fs, &layout_root.tmp_dir(), &dest, &bytes)?;
    } else {
        create_dir_chain_durable_on(fs, &layout_root.runs_dir(), &step_dir)?;
        let dest = layout_root.manifest_path(&ctx.run, ctx.step);
        if !publish_new_on(fs, &layout_root.tmp_dir(), &dest, &bytes)? {
            return Err(Error::AlreadyExists {
                run: ctx.run.clone(),
                step: ctx.step,
            });
        }
    }
    let c = &ctx.counters;
    let ns = |a: &std::sync::atomic::AtomicU64| {
        Duration::from_nanos(a.load(std::sync::atomic::Ordering::Relaxed))
    };
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Ok(SaveReport {
        run: ctx.run.clone(),
        step: ctx.step,
        logical_bytes: ctx.logical_bytes,
        chunks: n(&c.chunks),
        chunks_written: n(&c.chunks_written),
        bytes_written: n(&c.bytes_written),
        bytes_deduped: n(&c.bytes_deduped),
        bytes_written_uncompressed: n(&c.bytes_written_uncompressed),
        bytes_discarded: n(&c.bytes_discarded),
        stall: *ctx.stall.lock().unwrap_or_else(|p| p.into_inner()),
        durable: ctx.started.elapsed(),
        hash_busy: ns(&c.hash_ns),
        encode_busy: ns(&c.encode_ns),
        write_busy: ns(&c.write_ns),
        sync_busy: ns(&c.sync_ns),
        commit: t.elapsed(),
    })
}

fn build_manifest(ctx: &SaveCtx) -> Result<Manifest> {
    let plan = std::mem::take(&mut *ctx.plan.lock().unwrap_or_else(|p| p.into_inner()));
    let mut tensors = Vec::new();
    let mut blobs = Vec::new();
    for e in plan {
        let mut chunks = Vec::with_capacity(e.slices.len());
        for (seq, offset, len) in e.slices {
            let (id, chunk_len) = ctx
                .id_of(seq)
                .ok_or_else(|| Error::Internal(format!("chunk {seq} was never hashed")))?;
            chunks.push(ChunkRef {
                id,
                chunk_len,
                offset,
                len,
            });
        }
        match e.tensor {
            Some((dtype, shape, shard)) => tensors.push(TensorEntry {
                name: e.name,
                dtype,
                shape,
                len: e.len,
                shard,
                chunks,
            }),
            None => blobs.push(BlobEntry {
                name: e.name,
                len: e.len,
                chunks,
            }),
        }
    }
    Ok(Manifest {
        format_version: if ctx.part.is_some() {
            crate::format::SHARDED_FORMAT_VERSION as u32
        } else {
            FORMAT_VERSION as u32
        },
        run: ctx.run.clone(),
        step: ctx.step,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        chunk_size: ctx.chunk_size,
        tensors,
        blobs,
        metadata: ctx.metadata.clone(),
        metrics: ctx.metrics.clone().into(),
        part: ctx.part.clone(),
        world_size: None,
        sharded: Vec::new(),
        attempt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_dirty_bytes;

    #[test]
    fn dirty_bytes_from_meminfo() {
        let text = "MemTotal:       24576000 kB\nDirty:              16 kB\nWriteback:         148 kB\nWritebackTmp:        0 kB\n";
        assert_eq!(parse_dirty_bytes(text), Some((16 + 148) * 1024));
        // A field missing or in an unknown unit: no answer, so no syncfs.
        assert_eq!(parse_dirty_bytes("Dirty: 16 kB\n"), None);
        assert_eq!(parse_dirty_bytes("Dirty: 16 MB\nWriteback: 0 kB\n"), None);
        assert_eq!(parse_dirty_bytes("Dirty: x kB\nWriteback: 0 kB\n"), None);
    }
}
