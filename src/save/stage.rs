//! The part of a save the caller waits for: validate the state, copy every
//! byte into the staging pool, and queue the chunks for the pipeline.
//!
//! Large tensors are cut into chunks of their own at fixed offsets, so an
//! unchanged tensor always yields the same chunks; small tensors and blobs
//! are packed together afterwards. Nothing staged is held back while
//! waiting for more staging space, so back-pressure cannot deadlock.

use super::ctx::{PlannedEntry, SaveCtx};
use super::handle::SaveHandle;
use super::pipeline::{ChunkJob, Pipeline};
use super::state::SaveState;
use crate::dtype::byte_len;
use crate::error::{Error, Result};
use crate::layout::{validate_entry_name, validate_run_name, Layout};
use crate::staging::{StagingBuf, StagingPool};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Entries of at least this many bytes (or a quarter chunk, if smaller)
/// get chunks of their own; smaller ones are packed.
pub const PACK_THRESHOLD: usize = 1 << 20;

/// Refuse metadata that alone would make the manifest larger than readers
/// accept, before anything is staged (the commit checks the whole manifest).
fn check_metadata_size(metadata: &serde_json::Value) -> Result<()> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, metadata).map_err(|e| Error::Internal(e.to_string()))?;
    let limit = crate::format::manifest::MAX_MANIFEST_LEN;
    if n.0 > limit {
        return Err(Error::invalid(
            "metadata",
            format!(
                "serializes to {} bytes, over the {limit}-byte manifest limit readers accept",
                n.0
            ),
        ));
    }
    Ok(())
}

/// Check a state before anything is staged.
/// `part` with the attempt `state` names ([`SaveState::attempt`]): 1 to 64
/// ASCII letters, digits, `-` or `_`, and only on a part.
pub(crate) fn with_attempt(
    part: Option<crate::format::manifest::PartInfo>,
    state: &SaveState<'_>,
) -> Result<Option<crate::format::manifest::PartInfo>> {
    let Some(attempt) = &state.attempt else {
        return Ok(part);
    };
    let Some(mut part) = part else {
        return Err(Error::invalid(
            "attempt",
            format!(
                "{attempt:?}: only a part of a sharded step (a save with a rank) names an attempt"
            ),
        ));
    };
    validate_attempt(attempt)?;
    part.attempt = Some(attempt.clone());
    Ok(Some(part))
}

/// An attempt name: 1 to 64 ASCII letters, digits, `-` or `_`.
pub(crate) fn validate_attempt(attempt: &str) -> Result<()> {
    let ok = (1..=64).contains(&attempt.len())
        && attempt
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "attempt",
            format!("{attempt:?}: expected 1 to 64 ASCII letters, digits, '-' or '_'"),
        ))
    }
}

pub(crate) fn validate(state: &SaveState<'_>) -> Result<()> {
    let mut names = HashSet::new();
    for t in &state.tensors {
        validate_entry_name("tensor", &t.name)?;
        if !names.insert(("t", t.name.as_str())) {
            return Err(Error::invalid(
                "tensor name",
                format!("{:?} appears twice", t.name),
            ));
        }
        let want = byte_len(t.dtype, &t.shape).ok_or_else(|| {
            Error::invalid(
                format!("shape of tensor {:?}", t.name),
                format!("{:?} overflows", t.shape),
            )
        })?;
        if want != t.data.len() as u64 {
            return Err(Error::invalid(
                format!("data of tensor {:?}", t.name),
                format!(
                    "shape {:?} of {} needs {want} bytes, got {}",
                    t.shape,
                    t.dtype,
                    t.data.len()
                ),
            ));
        }
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
    }
    check_metadata_size(&state.metadata)?;
    crate::metrics::validate_metrics(&state.metrics)?;
    for (name, _) in &state.blobs {
        validate_entry_name("blob", name)?;
        if !names.insert(("b", name.as_str())) {
            return Err(Error::invalid(
                "blob name",
                format!("{name:?} appears twice"),
            ));
        }
    }
    Ok(())
}

/// Stage `state` and hand it to the pipeline. Returns once every byte is
/// copied into staging.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_save(
    layout: &Layout,
    pool: &StagingPool,
    pipeline: &Pipeline,
    chunk_size: usize,
    run: &str,
    step: u64,
    state: &SaveState<'_>,
    part: Option<crate::format::manifest::PartInfo>,
) -> Result<SaveHandle> {
    validate_run_name(run)?;
    if let Some(p) = &part {
        if p.world_size == 0 || p.rank >= p.world_size {
            return Err(Error::invalid(
                "part",
                format!("rank {} of world size {}", p.rank, p.world_size),
            ));
        }
    }
    let part = with_attempt(part, state)?;
    validate(state)?;
    layout.check_dirs(Some(run), Some(step))?;
    if layout.manifest_path(run, step).exists() {
        return Err(Error::AlreadyExists {
            run: run.to_string(),
            step,
        });
    }
    // Held until commit: no collection runs while this save is in flight.
    let gc_lock = crate::local::GcLock::shared(layout.root())?;
    let (tx, rx) = oneshot::channel();
    let mut ctx = SaveCtx::new(
        layout.clone(),
        run.to_string(),
        step,
        chunk_size as u64,
        state.metadata.clone(),
        state.logical_bytes(),
        tx,
    );
    ctx.metrics = state.metrics.clone();
    ctx.part = part;
    let ctx = Arc::new(ctx);
    *ctx.gc_lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(gc_lock);
    let res = stage_entries(pool, pipeline, chunk_size, &ctx, state);
    let stall = ctx.started.elapsed();
    *ctx.stall.lock().unwrap_or_else(|p| p.into_inner()) = stall;
    if let Err(e) = &res {
        ctx.fail(Error::Internal(format!("staging failed: {e}")));
    }
    pipeline.staging_done(ctx);
    res?;
    Ok(SaveHandle {
        run: run.to_string(),
        step,
        stall,
        rx,
    })
}

pub(crate) fn stage_entries(
    pool: &StagingPool,
    pipeline: &Pipeline,
    chunk_size: usize,
    ctx: &Arc<SaveCtx>,
    state: &SaveState<'_>,
) -> Result<()> {
    let threshold = PACK_THRESHOLD.min(chunk_size / 4).max(1);
    // (entry, bytes, byte-group width)
    let mut items: Vec<(PlannedEntry, &[u8], u8)> = Vec::new();
    for t in &state.tensors {
        let width = if t.dtype.is_wide_float() {
            t.dtype.size() as u8
        } else {
            0
        };
        items.push((
            PlannedEntry {
                name: t.name.clone(),
                tensor: Some((t.dtype, t.shape.clone(), t.shard.clone())),
                len: t.data.len() as u64,
                slices: Vec::new(),
            },
            t.data,
            width,
        ));
    }
    for (name, data) in &state.blobs {
        items.push((
            PlannedEntry {
                name: name.clone(),
                tensor: None,
                len: data.len() as u64,
                slices: Vec::new(),
            },
            data,
            0,
        ));
    }

    // Large entries: chunks of their own, numbered in order here and
    // copied by several threads.
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    for (entry, data, width) in items.iter_mut().filter(|i| i.1.len() >= threshold) {
        for (index, piece) in data.chunks(chunk_size).enumerate() {
            let seq = ctx.next_seq();
            entry.slices.push((seq, 0, piece.len() as u64));
            pieces.push(Piece {
                data: piece,
                seq,
                width: *width,
                position: position_of(ctx, &entry.name, entry.tensor.is_some(), index),
            });
        }
    }
    copy_pieces(pool, pipeline, ctx, &pieces)?;

    // Small entries: packed.
    let mut small_left: usize = items
        .iter()
        .filter(|i| i.1.len() < threshold)
        .map(|i| i.1.len())
        .sum();
    let mut pack: Option<(StagingBuf, usize, usize)> = None; // (buf, seq, fill)
    for (entry, data, _) in items.iter_mut().filter(|i| i.1.len() < threshold) {
        if data.is_empty() {
            continue;
        }
        if pack
            .as_ref()
            .is_some_and(|(b, _, fill)| b.len() - fill < data.len())
        {
            submit_pack(pipeline, ctx, pack.take())?;
        }
        if pack.is_none() {
            let buf = pool.alloc(chunk_size.min(small_left))?;
            let seq = ctx.next_seq();
            pack = Some((buf, seq, 0));
        }
        let (buf, seq, fill) = pack
            .as_mut()
            .ok_or_else(|| Error::Internal("no pack".into()))?;
        buf[*fill..*fill + data.len()].copy_from_slice(data);
        entry.slices.push((*seq, *fill as u64, data.len() as u64));
        *fill += data.len();
        small_left -= data.len();
    }
    submit_pack(pipeline, ctx, pack.take())?;

    *ctx.plan.lock().unwrap_or_else(|p| p.into_inner()) =
        items.into_iter().map(|(e, _, _)| e).collect();
    Ok(())
}

/// One chunk of a large entry, to be copied into staging.
struct Piece<'a> {
    data: &'a [u8],
    seq: usize,
    width: u8,
    /// Where in the state it sits ([`position_of`]).
    position: u64,
}

/// A hash of where a chunk sits in a state: run, rank (for a part), entry
/// and chunk index, for [`Pipeline::likely_new`].
pub(crate) fn position_of(ctx: &SaveCtx, name: &str, tensor: bool, index: usize) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(ctx.run.as_bytes());
    h.update(&[0, tensor as u8]);
    if let Some(p) = &ctx.part {
        h.update(&p.rank.to_le_bytes());
    }
    h.update(&[0]);
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(&(index as u64).to_le_bytes());
    first_u64(&h)
}

/// The first eight bytes of `h`'s digest.
fn first_u64(h: &blake3::Hasher) -> u64 {
    let d = h.finalize();
    u64::from_le_bytes(d.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Bytes [`sample_of`] reads from a chunk: eight windows of 512 bytes.
const SAMPLE_WINDOWS: usize = 8;
const SAMPLE_WINDOW: usize = 512;

/// A hash of a few spread-out windows of `data` and its length: cheap to
/// take while the chunk is hot in cache. Bytes that changed almost
/// anywhere in a trained tensor (every element an optimizer step moves)
/// change it; equal samples say the chunk is probably unchanged.
pub(crate) fn sample_of(data: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&(data.len() as u64).to_le_bytes());
    if data.len() <= SAMPLE_WINDOWS * SAMPLE_WINDOW {
        h.update(data);
    } else {
        let stride = (data.len() - SAMPLE_WINDOW) / (SAMPLE_WINDOWS - 1);
        for i in 0..SAMPLE_WINDOWS {
            let at = i * stride;
            h.update(&data[at..at + SAMPLE_WINDOW]);
        }
    }
    first_u64(&h)
}

/// Below this many bytes the copy runs on the caller's thread alone: a
/// thread start costs more than it saves.
const PARALLEL_COPY_MIN: usize = 32 << 20;

/// Copy `pieces` into staging and queue each for the pipeline as soon as
/// it is copied, on up to `pipeline.copy_threads()` threads (the shared
/// parallel loop; the caller waits for them). Each thread holds at most
/// one unqueued buffer while it waits for staging space, so back-pressure
/// cannot deadlock; the first error stops the others.
fn copy_pieces(
    pool: &StagingPool,
    pipeline: &Pipeline,
    ctx: &Arc<SaveCtx>,
    pieces: &[Piece<'_>],
) -> Result<()> {
    let copy_one = |p: &Piece<'_>| -> Result<()> {
        let mut buf = pool.alloc(p.data.len())?;
        buf.copy_from_slice(p.data);
        let write_first = pipeline.likely_new(p.position, sample_of(&buf));
        pipeline.submit(ChunkJob {
            ctx: ctx.clone(),
            seq: p.seq,
            buf,
            width: p.width,
            write_first,
        })
    };
    let _files = pipeline.staging_files();
    let total: usize = pieces.iter().map(|p| p.data.len()).sum();
    let threads = pipeline.copy_threads().min(pieces.len());
    if threads <= 1 || total < PARALLEL_COPY_MIN {
        return pieces.iter().try_for_each(copy_one);
    }
    crate::parallel::try_for_each(pieces.iter(), threads, || Ok(()), |_, p| copy_one(p))
}

fn submit_pack(
    pipeline: &Pipeline,
    ctx: &Arc<SaveCtx>,
    pack: Option<(StagingBuf, usize, usize)>,
) -> Result<()> {
    if let Some((mut buf, seq, fill)) = pack {
        buf.truncate(fill);
        pipeline.submit(ChunkJob {
            ctx: ctx.clone(),
            seq,
            buf,
            width: 0,
            write_first: false,
        })?;
    }
    Ok(())
}
