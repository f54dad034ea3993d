//! Restore: read a checkpoint's chunks in parallel, verify every byte, and
//! place them in freshly allocated or caller-provided buffers.
//!
//! A [`RestorePlan`] groups the requested entries' slices by chunk so each
//! chunk is read once. When a chunk maps whole onto one destination (the
//! common case for large tensors), it is read straight into the
//! destination and hashed there: no intermediate copy.

use crate::chunk_id::ChunkId;
use crate::codec::decode_chunk_object;
use crate::codec::Decoder;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::manifest::{EntryRef, Manifest, ShardInfo};
use crate::local::chunk_store::DIRECT_READ_MIN;
use crate::remote::RemoteStore;
use crate::store::{StepSel, Store};
use crate::tier::ChunkTier;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Which tensors to restore.
#[derive(Debug, Clone, Default)]
pub enum TensorFilter {
    /// Every tensor.
    #[default]
    All,
    /// Exactly these names; a name not in the checkpoint is an error.
    Names(BTreeSet<String>),
    /// Names starting with this prefix.
    Prefix(String),
}

impl TensorFilter {
    /// A filter for exactly these names.
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        TensorFilter::Names(names.into_iter().map(Into::into).collect())
    }

    /// Whether `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            TensorFilter::All => true,
            TensorFilter::Names(n) => n.contains(name),
            TensorFilter::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// A restored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Where the shard sits in its global tensor, if it is one.
    pub shard: Option<ShardInfo>,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Figures of one restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// The step restored.
    pub step: u64,
    /// Bytes placed in destinations.
    pub logical_bytes: u64,
    /// Chunks read.
    pub chunks_read: u64,
    /// Bytes read from disk (headers included).
    pub bytes_read: u64,
    /// Chunks fetched from a higher tier because the local copy was
    /// missing or corrupt, and written back.
    pub repaired: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Of which planning which chunk slices fill which bytes (region
    /// restores: index and intersect the shards).
    pub planned: Duration,
}

/// A restored checkpoint.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The manifest.
    pub manifest: Manifest,
    /// Selected tensors, in manifest order.
    pub tensors: Vec<RestoredTensor>,
    /// All blobs.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// Figures.
    pub report: RestoreReport,
}

impl Restored {
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&RestoredTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The blob called `name`.
    pub fn blob(&self, name: &str) -> Option<&[u8]> {
        self.blobs
            .iter()
            .find(|b| b.0 == name)
            .map(|b| b.1.as_slice())
    }
}

/// A destination for part of one chunk: the chunk's bytes from
/// `chunk_off` fill `dest` exactly.
struct Placement<'a> {
    chunk_off: u64,
    dest: &'a mut [u8],
}

/// One chunk to read and the destination slices it fills.
struct ChunkTask<'a> {
    id: ChunkId,
    chunk_len: u64,
    placements: Vec<Placement<'a>>,
    names: Vec<String>,
}

/// The chunks to read for a set of destinations. Each destination buffer
/// is cut into disjoint slices, one per chunk reference, so the tasks own
/// their slices and can run on any thread.
pub(crate) struct RestorePlan<'a> {
    tasks: Vec<ChunkTask<'a>>,
    by_id: HashMap<ChunkId, usize>,
}

impl<'a> RestorePlan<'a> {
    /// Add one destination slice: chunk `id`'s bytes from `chunk_off` fill
    /// `dest`, which belongs to entry `name`.
    pub(crate) fn place(
        &mut self,
        id: ChunkId,
        chunk_len: u64,
        chunk_off: u64,
        dest: &'a mut [u8],
        name: &str,
    ) {
        let tasks = &mut self.tasks;
        let idx = *self.by_id.entry(id).or_insert_with(|| {
            tasks.push(ChunkTask {
                id,
                chunk_len,
                placements: Vec::new(),
                names: Vec::new(),
            });
            tasks.len() - 1
        });
        let t = &mut self.tasks[idx];
        t.placements.push(Placement { chunk_off, dest });
        if t.names.last().map(String::as_str) != Some(name) {
            t.names.push(name.to_string());
        }
    }

    /// Plan reading `entries` into `dests` (same order, each exactly the
    /// entry's length).
    pub(crate) fn new(entries: &[EntryRef<'_>], dests: Vec<&'a mut [u8]>) -> Result<Self> {
        let mut plan = RestorePlan {
            tasks: Vec::new(),
            by_id: HashMap::new(),
        };
        for (e, dest) in entries.iter().zip(dests) {
            if dest.len() as u64 != e.len {
                return Err(Error::Internal(format!(
                    "restore buffer of {:?} is {} bytes, the entry is {}",
                    e.name,
                    dest.len(),
                    e.len
                )));
            }
            let mut rest = dest;
            for c in e.chunks {
                let len = usize::try_from(c.len)
                    .ok()
                    .filter(|&l| l <= rest.len())
                    .ok_or_else(|| {
                        Error::Internal(format!(
                            "chunk slices of {:?} overrun its length {}",
                            e.name, e.len
                        ))
                    })?;
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                plan.place(c.id, c.chunk_len, c.offset, head, e.name);
            }
        }
        Ok(plan)
    }
}

impl Store {
    /// The tiers a restore reads from: local chunks, then the attached
    /// remote, repairing the local tier.
    pub(crate) fn chunk_source(&self) -> TieredSource<'_> {
        TieredSource::new(self, self.remote().map(|r| r as &dyn ChunkTier))
    }

    /// Restore a checkpoint into new buffers. `filter` selects tensors;
    /// blobs are always restored. Every chunk is verified; with a remote
    /// attached, a chunk missing or corrupt locally is fetched from it,
    /// verified, and written back to the local tier.
    pub fn restore(&self, run: &str, step: StepSel, filter: &TensorFilter) -> Result<Restored> {
        let t0 = Instant::now();
        let step = self.resolve(run, step)?;
        let mut r = self.restore_read(self.manifest(run, step)?, filter)?;
        r.report.elapsed = t0.elapsed();
        Ok(r)
    }

    /// [`Store::restore`] of the checkpoint `manifest` describes, as read
    /// before by [`Store::manifest`]: a caller restoring one checkpoint in
    /// parts reads its manifest once.
    pub fn restore_from_manifest(
        &self,
        manifest: Manifest,
        filter: &TensorFilter,
    ) -> Result<Restored> {
        check_given(&manifest)?;
        self.restore_read(manifest, filter)
    }

    /// Restore from a manifest read (and so checked) by this store.
    fn restore_read(&self, manifest: Manifest, filter: &TensorFilter) -> Result<Restored> {
        let source = self.chunk_source();
        let mut r = restore_manifest(manifest, filter, &source, self.opts.read_threads)?;
        r.report.repaired = source.repaired();
        Ok(r)
    }

    /// Restore tensors into caller buffers: each `(name, buffer)` is filled
    /// with that tensor's bytes; the buffer must be exactly its length. Only
    /// the chunks of the named tensors are read. A tensor of a sharded step
    /// is filled whole (its global shape), assembled from its shards.
    pub fn restore_into(
        &self,
        run: &str,
        step: StepSel,
        targets: &mut [(&str, &mut [u8])],
    ) -> Result<RestoreReport> {
        let t0 = Instant::now();
        let step = self.resolve(run, step)?;
        let manifest = self.manifest(run, step)?;
        let by_name: HashMap<&str, EntryRef<'_>> = manifest
            .entries()
            .take(manifest.tensors.len())
            .map(|e| (e.name, e))
            .collect();
        let mut entries = Vec::with_capacity(targets.len());
        let mut dests = Vec::with_capacity(targets.len());
        let mut seen = std::collections::HashSet::new();
        // Tensors of a sharded step are assembled whole from their shards.
        let mut whole: Vec<(crate::shard::TensorIndex<'_>, &mut [u8])> = Vec::new();
        for (name, buf) in targets.iter_mut() {
            if let Some(t) = manifest.sharded.iter().find(|t| t.name == *name) {
                if !seen.insert(*name) {
                    return Err(Error::invalid(
                        "restore target",
                        format!("{name:?} named twice"),
                    ));
                }
                whole.push((crate::shard::TensorIndex::new(t), &mut **buf));
                continue;
            }
            let e = by_name.get(name).ok_or_else(|| Error::NotFound {
                what: format!("tensor {name:?} in run {run} step {step}"),
            })?;
            if !seen.insert(*name) {
                return Err(Error::invalid(
                    "restore target",
                    format!("{name:?} named twice"),
                ));
            }
            if buf.len() as u64 != e.len {
                return Err(Error::invalid(
                    format!("buffer for tensor {name:?}"),
                    format!("is {} bytes, the tensor is {}", buf.len(), e.len),
                ));
            }
            entries.push(*e);
            dests.push(&mut **buf);
        }
        let mut plan = RestorePlan::new(&entries, dests)?;
        let mut logical: u64 = entries.iter().map(|e| e.len).sum();
        for (index, buf) in whole {
            logical += buf.len() as u64;
            let shape = index.shape().to_vec();
            index.plan_region(&vec![0; shape.len()], &shape, buf, &mut plan)?;
        }
        let source = self.chunk_source();
        let mut report = execute(plan, &source, self.opts.read_threads)?;
        report.repaired = source.repaired();
        report.step = step;
        report.logical_bytes = logical;
        report.elapsed = t0.elapsed();
        Ok(report)
    }
}

/// Read every chunk of `plan` from `source` with `threads` threads.
pub(crate) fn execute(
    plan: RestorePlan<'_>,
    source: &dyn ChunkSource,
    threads: usize,
) -> Result<RestoreReport> {
    let chunks = plan.tasks.len() as u64;
    let order: Vec<(ChunkId, u64)> = plan.tasks.iter().map(|t| (t.id, t.chunk_len)).collect();
    source.prepare(&order);
    let bytes_read = AtomicU64::new(0);
    crate::parallel::try_for_each(
        plan.tasks.into_iter(),
        threads,
        || Ok((Vec::new(), ChunkScratch::new(), Decoder::new()?)),
        |(scratch, whole, decoder), mut task| {
            let n = read_task(source, &mut task, scratch, whole, decoder)
                .map_err(|e| with_tensors(e, &task.names))?;
            bytes_read.fetch_add(n, Ordering::Relaxed);
            Ok(())
        },
    )?;
    Ok(RestoreReport {
        chunks_read: chunks,
        bytes_read: bytes_read.into_inner(),
        ..Default::default()
    })
}

fn read_task(
    source: &dyn ChunkSource,
    task: &mut ChunkTask<'_>,
    scratch: &mut Vec<u8>,
    whole: &mut ChunkScratch,
    decoder: &mut Decoder,
) -> Result<u64> {
    if let [p] = task.placements.as_mut_slice() {
        // A whole chunk into a buffer that does not start on a page would
        // be read through the page cache (O_DIRECT needs aligned memory),
        // at several times the kernel time of a direct read and a copy:
        // where the source reads directly, it goes through the thread's
        // aligned buffer below instead.
        let bounce = source.reads_direct()
            && p.dest.len() >= DIRECT_READ_MIN
            && (p.dest.as_ptr() as usize) % crate::staging::ALIGN != 0;
        if p.chunk_off == 0 && p.dest.len() as u64 == task.chunk_len && !bounce {
            return source.read_chunk(
                &task.id,
                task.chunk_len,
                Some(&mut *p.dest),
                &mut Vec::new(),
                scratch,
                decoder,
            );
        }
    }
    // A chunk spread over several destinations (small tensors packed
    // together), or one whole chunk into an unaligned buffer, is read whole
    // into the thread's page-aligned scratch, so that its payload too is
    // read with O_DIRECT, then copied out.
    let whole = whole.get(task.chunk_len, &task.id)?;
    let n = source.read_chunk(
        &task.id,
        task.chunk_len,
        Some(&mut *whole),
        &mut Vec::new(),
        scratch,
        decoder,
    )?;
    for p in &mut task.placements {
        let start = p.chunk_off as usize;
        let src = start
            .checked_add(p.dest.len())
            .and_then(|end| whole.get(start..end))
            .ok_or_else(|| Error::Internal(format!("slice outside chunk {}", task.id)))?;
        p.dest.copy_from_slice(src);
    }
    Ok(n)
}

/// A read thread's buffer for chunks spread over several destinations:
/// page-aligned anonymous memory, mapped on first use and grown as needed,
/// so that a chunk's payload is read into it with O_DIRECT rather than
/// through the page cache. Its pages are touched only as chunks are read.
pub(crate) struct ChunkScratch {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the mapping is owned by this value alone and only reached
// through `&mut self`.
unsafe impl Send for ChunkScratch {}

impl ChunkScratch {
    pub(crate) fn new() -> Self {
        ChunkScratch {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// The first `len` bytes, mapping a larger region first if needed.
    fn get(&mut self, len: u64, id: &ChunkId) -> Result<&mut [u8]> {
        let too_large = || {
            Error::invalid(
                format!("chunk {id}"),
                format!("cannot map {len} bytes to read it into"),
            )
        };
        let n = usize::try_from(len).map_err(|_| too_large())?;
        if n == 0 {
            return Ok(&mut []);
        }
        if n > self.cap {
            self.unmap();
            let cap = n.checked_next_multiple_of(4096).ok_or_else(too_large)?;
            // SAFETY: a fresh private anonymous mapping; no memory is passed.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(too_large());
            }
            self.ptr = p.cast();
            self.cap = cap;
        }
        // SAFETY: ptr maps cap >= n bytes, readable and writable (zeroed
        // by the kernel when first touched), borrowed exclusively.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, n) })
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr and cap are exactly what mmap returned and mapped.
            unsafe { libc::munmap(self.ptr.cast(), self.cap) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for ChunkScratch {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// Restore the entries of `manifest` selected by `filter` (blobs always)
/// from `source` into new buffers.
pub(crate) fn restore_manifest(
    manifest: Manifest,
    filter: &TensorFilter,
    source: &dyn ChunkSource,
    threads: usize,
) -> Result<Restored> {
    let t0 = Instant::now();
    check_names_exist(&manifest, filter)?;
    let mut tensors = Vec::new();
    let mut entries: Vec<EntryRef<'_>> = Vec::new();
    for (t, e) in manifest.tensors.iter().zip(manifest.entries()) {
        if filter.matches(&t.name) {
            tensors.push(RestoredTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                shard: t.shard.clone(),
                data: alloc_zeroed(t.len, &t.name)?,
            });
            entries.push(e);
        }
    }
    let mut blobs = Vec::new();
    for e in manifest.entries().skip(manifest.tensors.len()) {
        blobs.push((e.name.to_string(), alloc_zeroed(e.len, e.name)?));
        entries.push(e);
    }
    let plain = tensors.len();
    // Sharded tensors (format v2) are assembled whole from their shards.
    let mut indexes = Vec::new();
    for t in &manifest.sharded {
        if filter.matches(&t.name) {
            let index = crate::shard::TensorIndex::new(t);
            tensors.push(RestoredTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                shard: None,
                data: alloc_zeroed(index.byte_len(), &t.name)?,
            });
            indexes.push(index);
        }
    }
    let (plain_tensors, sharded_tensors) = tensors.split_at_mut(plain);
    let dests: Vec<&mut [u8]> = plain_tensors
        .iter_mut()
        .map(|t| t.data.as_mut_slice())
        .chain(blobs.iter_mut().map(|b| b.1.as_mut_slice()))
        .collect();
    let mut plan = RestorePlan::new(&entries, dests)?;
    let mut logical: u64 = entries.iter().map(|e| e.len).sum();
    for (index, t) in indexes.iter().zip(sharded_tensors.iter_mut()) {
        logical += t.data.len() as u64;
        let shape = t.shape.clone();
        let zeros = vec![0u64; shape.len()];
        index.plan_region(&zeros, &shape, &mut t.data, &mut plan)?;
    }
    let mut report = execute(plan, source, threads)?;
    report.step = manifest.step;
    report.logical_bytes = logical;
    report.elapsed = t0.elapsed();
    drop(entries);
    Ok(Restored {
        manifest,
        tensors,
        blobs,
        report,
    })
}

/// Where a restore reads chunks from: a tier, or tiers in order.
pub trait ChunkSource: Sync {
    /// Read chunk `id` (`len` bytes uncompressed), verified, into `out` when
    /// given (exactly `len` bytes), else into `buf`, which is sized only
    /// after the chunk's header has been validated. Returns the bytes read
    /// from the tier.
    fn read_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        out: Option<&mut [u8]>,
        buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64>;

    /// Chunks this source repaired in a lower tier so far.
    fn repaired(&self) -> u64 {
        0
    }

    /// Called once before the reads with every chunk to be read, in the
    /// order they are handed out (a remote source plans ranged reads of
    /// packs from it). Nothing by default.
    fn prepare(&self, _chunks: &[(ChunkId, u64)]) {}

    /// Whether a chunk read into a page-aligned buffer is read with
    /// O_DIRECT ([`ChunkTier::reads_direct`]). False by default.
    fn reads_direct(&self) -> bool {
        false
    }
}

/// Every tier reads its own chunks, verified.
impl<T: ChunkTier + ?Sized> ChunkSource for T {
    fn read_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        out: Option<&mut [u8]>,
        buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64> {
        ChunkTier::read_chunk(self, id, len, out, buf, scratch, decoder)
    }

    fn prepare(&self, chunks: &[(ChunkId, u64)]) {
        ChunkTier::prepare_reads(self, chunks)
    }

    fn reads_direct(&self) -> bool {
        ChunkTier::reads_direct(self)
    }
}

/// A near tier backed by a far one: a chunk missing or corrupt in the near
/// tier is fetched from the far one, verified, used, and written back.
pub struct TieredSource<'a> {
    near: &'a dyn ChunkTier,
    far: Option<&'a dyn ChunkTier>,
    repaired: AtomicU64,
}

impl<'a> TieredSource<'a> {
    /// `near` first, then `far` if given.
    pub fn new(near: &'a dyn ChunkTier, far: Option<&'a dyn ChunkTier>) -> Self {
        TieredSource {
            near,
            far,
            repaired: AtomicU64::new(0),
        }
    }
}

impl ChunkSource for TieredSource<'_> {
    fn read_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        out: Option<&mut [u8]>,
        buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64> {
        let mut out = out;
        let near_err =
            match self
                .near
                .read_chunk(id, len, out.as_deref_mut(), buf, scratch, decoder)
            {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
        let Some(far) = self.far else {
            return Err(near_err);
        };
        // A corrupt chunk, or one the disk fails to read (EIO on a bad
        // sector): the far tier has a good copy.
        let unreadable = matches!(
            &near_err,
            Error::Io {
                op: "read chunk",
                ..
            }
        );
        if near_err.kind() != crate::error::ErrorKind::Data && !unreadable {
            return Err(near_err);
        }
        tracing::warn!(chunk = %id, error = %near_err, "chunk unusable in {}; fetching it from {}", self.near.location(), far.location());
        let object = far.read_chunk_object(id, len)?;
        let target = match out {
            Some(o) => o,
            None => {
                buf.resize(len as usize, 0);
                &mut buf[..]
            }
        };
        decode_chunk_object(&object, id, target, decoder, &far.chunk_location(id))?;
        let n = object.len() as u64;
        self.near.put_chunk_object(id, object)?;
        self.repaired.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }

    fn repaired(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    fn prepare(&self, chunks: &[(ChunkId, u64)]) {
        self.near.prepare_reads(chunks)
    }

    fn reads_direct(&self) -> bool {
        self.near.reads_direct()
    }
}

impl RemoteStore {
    /// Restore a checkpoint straight from the remote, with no local copy:
    /// [`RemoteStore::restore_readers`] chunks in flight at once, within the
    /// store's read budget, each decoded and verified as it arrives;
    /// neighbouring chunks of one pack come in one ranged GET.
    /// Blocking; call it from a plain thread or `spawn_blocking`.
    pub fn restore(&self, run: &str, step: StepSel, filter: &TensorFilter) -> Result<Restored> {
        let t0 = Instant::now();
        let step = ChunkTier::resolve(self, run, step)?;
        let manifest = ChunkTier::manifest(self, run, step)?;
        let source = crate::remote::pack::PackedReader::new(self);
        let mut r = restore_manifest(manifest, filter, &source, self.restore_readers())?;
        r.report.elapsed = t0.elapsed();
        Ok(r)
    }

    /// [`RemoteStore::restore`] of the checkpoint `manifest` describes, as
    /// read before from this store: a caller restoring one checkpoint in
    /// parts reads its manifest once.
    pub fn restore_from_manifest(
        &self,
        manifest: Manifest,
        filter: &TensorFilter,
    ) -> Result<Restored> {
        check_given(&manifest)?;
        let source = crate::remote::pack::PackedReader::new(self);
        restore_manifest(manifest, filter, &source, self.restore_readers())
    }
}

/// Check a manifest a caller hands to `restore_from_manifest` as one read
/// from a tier is checked, so a changed one is an invalid input naming
/// what is wrong, not a wrong plan.
fn check_given(manifest: &Manifest) -> Result<()> {
    manifest
        .validate(std::path::Path::new("(given)"))
        .map_err(|e| match e {
            Error::CorruptManifest { reason, .. } => Error::invalid(
                format!(
                    "manifest of run {} step {} given to restore_from_manifest",
                    manifest.run, manifest.step
                ),
                reason,
            ),
            e => e,
        })
}

/// Allocate `len` zeroed bytes lazily (calloc), failing cleanly instead of
/// aborting when the system refuses.
fn alloc_zeroed(len: u64, name: &str) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| {
        Error::invalid(
            format!("size of {name:?}"),
            format!("{len} bytes do not fit in memory"),
        )
    })?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(n).map_err(|_| {
        Error::invalid(
            format!("size of {name:?}"),
            format!("{len} bytes do not fit in memory"),
        )
    })?;
    // SAFETY: layout has non-zero size; on success the pointer owns n
    // zeroed bytes with the alignment of u8, as Vec<u8> requires.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        if p.is_null() {
            return Err(Error::invalid(
                format!("size of {name:?}"),
                format!("cannot allocate {len} bytes to restore it"),
            ));
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

fn check_names_exist(m: &Manifest, filter: &TensorFilter) -> Result<()> {
    if let TensorFilter::Names(names) = filter {
        let present: std::collections::HashSet<&str> = m
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .chain(m.sharded.iter().map(|t| t.name.as_str()))
            .collect();
        for n in names {
            if !present.contains(n.as_str()) {
                return Err(Error::NotFound {
                    what: format!("tensor {n:?} in run {} step {}", m.run, m.step),
                });
            }
        }
    }
    Ok(())
}

/// Attach the names of the entries a corrupt chunk hits.
pub(crate) fn with_tensors(e: Error, names: &[String]) -> Error {
    match e {
        Error::CorruptChunk {
            chunk,
            path,
            reason,
            ..
        } => Error::CorruptChunk {
            chunk,
            path,
            reason,
            tensors: names.to_vec(),
        },
        other => other,
    }
}
