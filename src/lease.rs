//! Leased saves: the caller fills slices of the staging pool itself.
//!
//! [`Store::save`] copies tensors from caller memory into the staging pool.
//! A caller whose bytes are not in host memory yet (a GPU copying
//! device-to-host, a loader filling buffers) can skip that copy: it opens a
//! [`LeasedSave`] with the tensors' names, dtypes and shapes, takes
//! [`Lease`]s (chunk-aligned slices of the pool, each naming which bytes of
//! which tensors belong where), fills them, and hands each back with
//! [`LeasedSave::submit`]; the pipeline hashes and writes it from there.
//! [`LeasedSave::finish`] returns the usual [`SaveHandle`].
//!
//! The chunks are the ones [`Store::save`] would cut (large tensors at
//! multiples of the chunk size, small ones packed), so a leased save
//! deduplicates against ordinary ones. Back-pressure is the pool's: a
//! lease waits for space, or with `wait = false` reports [`NextLease::Full`]
//! so a caller holding filled leases can hand them back first. A lease
//! dropped without being handed back frees its space; the save then fails
//! at [`LeasedSave::finish`] with [`Error::InvalidInput`] naming it, and
//! nothing is committed. [`Store::staging_region`] gives the pool's base
//! address and length once, for registering it with a device driver.

use crate::dtype::{byte_len, DType};
use crate::error::{Error, Result};
use crate::format::manifest::{PartInfo, ShardInfo};
use crate::layout::{validate_entry_name, validate_run_name};
use crate::local::tmp_files::StagingGuard;
use crate::save::{
    position_of, sample_of, stage_entries, validate, ChunkJob, PlannedEntry, SaveCtx, SaveHandle,
    SaveState, Submitter, PACK_THRESHOLD,
};
use crate::staging::{StagingBuf, StagingPool};
use crate::store::Store;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

/// A tensor whose bytes the caller writes into leases.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedTensor {
    /// Name in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (of this shard, for a shard).
    pub shape: Vec<u64>,
    /// Where the data sits in its global tensor, for a shard.
    pub shard: Option<ShardInfo>,
}

/// Where some bytes of one tensor go in a lease: bytes
/// `tensor_offset..tensor_offset + len` of tensor number `tensor` (in the
/// order given to [`Store::lease_save`], C order) belong at
/// `lease_offset..lease_offset + len` of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index of the tensor.
    pub tensor: usize,
    /// First byte within the tensor.
    pub tensor_offset: u64,
    /// First byte within the lease.
    pub lease_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// One chunk as planned: what goes in it.
struct Planned {
    segments: Vec<Segment>,
    len: usize,
    seq: usize,
    width: u8,
    /// Where a chunk of one large tensor sits in the state
    /// (`save::position_of`), for early writes; `None` for a pack.
    position: Option<u64>,
}

/// A slice of the staging pool lent to the caller for one chunk. Fill
/// every segment, then hand it back with [`LeasedSave::submit`]. Dropping
/// it instead frees its space and makes the save fail at
/// [`LeasedSave::finish`].
pub struct Lease {
    index: usize,
    buf: Option<StagingBuf>,
    segments: Vec<Segment>,
    ctx: Arc<SaveCtx>,
    held: Arc<AtomicUsize>,
}

impl Lease {
    /// Which lease of its save this is (0, 1, ... in the order taken).
    pub fn index(&self) -> usize {
        self.index
    }

    /// What goes where in this lease.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// True if zero-length (never: a lease holds at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lease's memory, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => &mut b[..],
            None => &mut [],
        }
    }

    /// Address of the first byte (page-aligned), for callers that fill
    /// the lease from elsewhere (a device-to-host copy). Valid, and
    /// writable by the holder alone, until the lease is handed back or
    /// dropped.
    pub fn addr(&mut self) -> usize {
        self.as_mut_slice().as_mut_ptr() as usize
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`LeasedSave::lease`] found.
pub enum NextLease {
    /// The next slice to fill.
    Lease(Lease),
    /// The pool has no room now (only with `wait = false`): hand filled
    /// leases back, then ask again.
    Full,
    /// Every lease of the save has been taken.
    Done,
}

/// A save whose bytes the caller writes into the staging pool; see the
/// module docs. While one is open, dropping its [`Store`] waits for it to
/// be finished or dropped.
pub struct LeasedSave {
    ctx: Option<Arc<SaveCtx>>,
    rx: Option<oneshot::Receiver<Result<crate::save::SaveReport>>>,
    submitter: Submitter,
    /// Temporary files kept made ahead while the caller fills leases.
    files: Option<StagingGuard>,
    pool: StagingPool,
    plans: Vec<Planned>,
    names: Vec<String>,
    next: usize,
    submitted: Vec<bool>,
    held: Arc<AtomicUsize>,
    run: String,
    step: u64,
}

impl Store {
    /// The staging pool's memory as `(base address, length)`: where every
    /// [`Lease`] lies, for registering it once with a device driver
    /// (`cudaHostRegister`) so device-to-host copies into leases run at
    /// pinned-memory speed. `None` on a read-only store.
    pub fn staging_region(&self) -> Option<(usize, usize)> {
        self.staging_pool().map(StagingPool::region)
    }

    /// Open a save of checkpoint `(run, step)` whose `tensors` the caller
    /// writes into leases of the staging pool; `rest` holds blobs,
    /// metadata, metrics and any tensors the store copies as
    /// [`Store::save`] does (staged before this returns). Fails as `save`
    /// does for invalid names, shapes or an existing checkpoint.
    pub fn lease_save(
        &self,
        run: &str,
        step: u64,
        tensors: Vec<LeasedTensor>,
        rest: &SaveState<'_>,
    ) -> Result<LeasedSave> {
        self.open_leased(run, step, tensors, rest, None)
    }

    /// As [`Store::lease_save`], for rank `rank`'s part of sharded step
    /// `(run, step)` (see [`Store::save_part`]).
    pub fn lease_save_part(
        &self,
        run: &str,
        step: u64,
        rank: u32,
        world_size: u32,
        tensors: Vec<LeasedTensor>,
        rest: &SaveState<'_>,
    ) -> Result<LeasedSave> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::invalid(
                "part",
                format!("rank {rank} of world size {world_size}"),
            ));
        }
        self.open_leased(
            run,
            step,
            tensors,
            rest,
            Some(PartInfo {
                rank,
                world_size,
                attempt: None,
            }),
        )
    }

    fn open_leased(
        &self,
        run: &str,
        step: u64,
        tensors: Vec<LeasedTensor>,
        rest: &SaveState<'_>,
        part: Option<PartInfo>,
    ) -> Result<LeasedSave> {
        let (pool, pipeline) = self.writer_parts()?;
        let chunk_size = self.options().chunk_size;
        validate_run_name(run)?;
        let part = crate::save::with_attempt(part, rest)?;
        validate(rest)?;
        let lens = validate_leased(&tensors, rest)?;
        self.layout.check_dirs(Some(run), Some(step))?;
        if self.layout.manifest_path(run, step).exists() {
            return Err(Error::AlreadyExists {
                run: run.to_string(),
                step,
            });
        }
        let submitter = pipeline.submitter()?;
        let gc_lock = crate::local::GcLock::shared(self.layout.root())?;
        let (tx, rx) = oneshot::channel();
        let logical = rest.logical_bytes() + lens.iter().sum::<u64>();
        let mut ctx = SaveCtx::new(
            self.layout.clone(),
            run.to_string(),
            step,
            chunk_size as u64,
            rest.metadata.clone(),
            logical,
            tx,
        );
        ctx.metrics = rest.metrics.clone();
        ctx.part = part;
        let ctx = Arc::new(ctx);
        *ctx.gc_lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(gc_lock);

        let (entries, plans) = plan_leases(&ctx, &tensors, &lens, chunk_size);
        if let Err(e) = stage_entries(pool, pipeline, chunk_size, &ctx, rest) {
            ctx.fail(Error::Internal(format!("staging failed: {e}")));
            pipeline.staging_done(ctx);
            return Err(e);
        }
        {
            let mut plan = ctx.plan.lock().unwrap_or_else(|p| p.into_inner());
            let staged = std::mem::take(&mut *plan);
            *plan = entries.into_iter().chain(staged).collect();
        }
        let n = plans.len();
        Ok(LeasedSave {
            ctx: Some(ctx),
            rx: Some(rx),
            files: submitter.staging_files(),
            submitter,
            pool: pool.clone(),
            plans,
            names: tensors.into_iter().map(|t| t.name).collect(),
            next: 0,
            submitted: vec![false; n],
            held: Arc::new(AtomicUsize::new(0)),
            run: run.to_string(),
            step,
        })
    }
}

/// Check the leased tensors (names unique, also against `rest`; shapes
/// that fit in memory; shards inside their global shapes); their byte
/// lengths.
fn validate_leased(tensors: &[LeasedTensor], rest: &SaveState<'_>) -> Result<Vec<u64>> {
    let mut tensor_names: HashSet<&str> = rest.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut lens = Vec::with_capacity(tensors.len());
    for t in tensors {
        validate_entry_name("tensor", &t.name)?;
        if !tensor_names.insert(t.name.as_str()) {
            return Err(Error::invalid(
                "tensor name",
                format!("{:?} appears twice", t.name),
            ));
        }
        let len = byte_len(t.dtype, &t.shape)
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| {
                Error::invalid(
                    format!("shape of tensor {:?}", t.name),
                    format!("{:?} overflows", t.shape),
                )
            })?;
        if let Some(s) = &t.shard {
            let fits = s.global_shape.len() == t.shape.len()
                && s.offsets.len() == t.shape.len()
                && (0..t.shape.len()).all(|i| {
                    s.offsets[i]
                        .checked_add(t.shape[i])
                        .is_some_and(|e| e <= s.global_shape[i])
                });
            if !fits {
                return Err(Error::invalid(
                    format!("shard of tensor {:?}", t.name),
                    "offsets + shape must fit inside the global shape, with equal ranks",
                ));
            }
        }
        lens.push(len);
    }
    Ok(lens)
}

/// Cut the leased tensors into chunks as `save` would: large tensors into
/// chunks of their own, small ones packed. The manifest entries (slices
/// by sequence number) and one plan per lease.
fn plan_leases(
    ctx: &SaveCtx,
    tensors: &[LeasedTensor],
    lens: &[u64],
    chunk_size: usize,
) -> (Vec<PlannedEntry>, Vec<Planned>) {
    let threshold = PACK_THRESHOLD.min(chunk_size / 4).max(1) as u64;
    let chunk = chunk_size as u64;
    let mut entries = Vec::with_capacity(tensors.len());
    let mut plans = Vec::new();
    for (i, (t, &len)) in tensors.iter().zip(lens).enumerate() {
        let width = if t.dtype.is_wide_float() {
            t.dtype.size() as u8
        } else {
            0
        };
        let mut entry = PlannedEntry {
            name: t.name.clone(),
            tensor: Some((t.dtype, t.shape.clone(), t.shard.clone())),
            len,
            slices: Vec::new(),
        };
        if len >= threshold {
            let mut off = 0;
            while off < len {
                let piece = chunk.min(len - off);
                let seq = ctx.next_seq();
                entry.slices.push((seq, 0, piece));
                plans.push(Planned {
                    segments: vec![Segment {
                        tensor: i,
                        tensor_offset: off,
                        lease_offset: 0,
                        len: piece,
                    }],
                    len: piece as usize,
                    seq,
                    width,
                    position: Some(position_of(ctx, &t.name, true, (off / chunk) as usize)),
                });
                off += piece;
            }
        }
        entries.push(entry);
    }
    // Small tensors: packed, in order, into chunks of at most chunk_size.
    let mut pack: Option<Planned> = None;
    for (i, &len) in lens.iter().enumerate() {
        if len >= threshold || len == 0 {
            continue;
        }
        if pack.as_ref().is_some_and(|p| p.len as u64 + len > chunk) {
            plans.extend(pack.take());
        }
        let p = pack.get_or_insert_with(|| Planned {
            segments: Vec::new(),
            len: 0,
            seq: ctx.next_seq(),
            width: 0,
            position: None,
        });
        entries[i].slices.push((p.seq, p.len as u64, len));
        p.segments.push(Segment {
            tensor: i,
            tensor_offset: 0,
            lease_offset: p.len as u64,
            len,
        });
        p.len += len as usize;
    }
    plans.extend(pack);
    (entries, plans)
}

impl LeasedSave {
    /// The run being saved.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The step being saved.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// How many leases the save needs in all.
    pub fn lease_count(&self) -> usize {
        self.plans.len()
    }

    /// Leases taken and neither handed back nor dropped yet.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The next lease, in order. With `wait`, blocks until the pipeline
    /// frees room for it; a save still holding leases cannot wait (the
    /// room may be the one its own leases take) and gets
    /// [`Error::InvalidInput`] instead when the pool is full, so hand
    /// them back first. Without `wait`, a full pool gives
    /// [`NextLease::Full`].
    pub fn lease(&mut self, wait: bool) -> Result<NextLease> {
        let ctx = self.ctx.clone().ok_or(Error::Closed)?;
        let Some(plan) = self.plans.get(self.next) else {
            return Ok(NextLease::Done);
        };
        let mut buf = self.pool.try_alloc(plan.len)?;
        if buf.is_none() && wait {
            let held = self.held();
            if held > 0 {
                return Err(Error::invalid(
                    "staging lease",
                    format!(
                        "the staging pool is full and {held} leases of this save are \
                         still held: hand them back before waiting for room"
                    ),
                ));
            }
            buf = Some(self.pool.alloc(plan.len)?);
        }
        let Some(buf) = buf else {
            return Ok(NextLease::Full);
        };
        let index = self.next;
        self.next += 1;
        self.held.fetch_add(1, Ordering::AcqRel);
        Ok(NextLease::Lease(Lease {
            index,
            buf: Some(buf),
            segments: plan.segments.clone(),
            ctx,
            held: self.held.clone(),
        }))
    }

    /// Hand a filled lease back: its chunk goes to the pipeline to be
    /// hashed and written. The caller must not touch its memory after.
    pub fn submit(&mut self, mut lease: Lease) -> Result<()> {
        let ctx = self.ctx.clone().ok_or(Error::Closed)?;
        if !Arc::ptr_eq(&ctx, &lease.ctx) {
            return Err(Error::invalid(
                "staging lease",
                format!(
                    "lease {} belongs to another save than {} step {}",
                    lease.index, self.run, self.step
                ),
            ));
        }
        let plan = &self.plans[lease.index];
        let buf = lease
            .buf
            .take()
            .ok_or_else(|| Error::Internal("lease without a buffer".into()))?;
        // As `save` does: a chunk whose position held other bytes last
        // time is written before it is hashed.
        let write_first = plan
            .position
            .is_some_and(|pos| self.submitter.likely_new(pos, sample_of(&buf)));
        self.submitter.submit(ChunkJob {
            ctx,
            seq: plan.seq,
            buf,
            width: plan.width,
            write_first,
        })?;
        self.submitted[lease.index] = true;
        Ok(())
    }

    /// Describe lease `i` for an error message.
    fn describe(&self, i: usize) -> String {
        let p = &self.plans[i];
        let names: Vec<String> = p
            .segments
            .iter()
            .map(|s| {
                format!(
                    "{:?} bytes {}..{}",
                    self.names[s.tensor],
                    s.tensor_offset,
                    s.tensor_offset + s.len
                )
            })
            .collect();
        format!("lease {i} ({})", names.join(", "))
    }

    /// End staging: every lease must have been handed back. Returns the
    /// [`SaveHandle`] to wait on. If a lease was never taken, or dropped
    /// without being handed back, fails with [`Error::InvalidInput`]
    /// naming it; the save is abandoned (nothing is committed, its space
    /// in the pool is free) and the step can be saved again.
    pub fn finish(mut self) -> Result<SaveHandle> {
        let ctx = self.ctx.take().ok_or(Error::Closed)?;
        let missing = self.submitted.iter().position(|s| !s);
        if let Some(i) = missing {
            let why = if i >= self.next {
                "was never taken"
            } else {
                "was dropped without being handed back"
            };
            let what = self.describe(i);
            ctx.fail(Error::invalid("leased save", format!("{what} {why}")));
            self.files.take();
            self.submitter.staging_done(ctx);
            return Err(Error::invalid("leased save", format!("{what} {why}")));
        }
        let stall = ctx.started.elapsed();
        *ctx.stall.lock().unwrap_or_else(|p| p.into_inner()) = stall;
        self.files.take();
        self.submitter.staging_done(ctx);
        let rx = self.rx.take().ok_or(Error::Closed)?;
        Ok(SaveHandle {
            run: self.run.clone(),
            step: self.step,
            stall,
            rx,
        })
    }
}

impl Drop for LeasedSave {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            ctx.fail(Error::invalid(
                "leased save",
                "dropped before finish; nothing was committed",
            ));
            self.files.take();
            self.submitter.staging_done(ctx);
        }
    }
}
