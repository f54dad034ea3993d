//! [`Store`]: a checkpoint store on a local directory.

use crate::clock::{system_clock, SharedClock};
use crate::codec::CodecChoice;
use crate::error::{Error, Result};
use crate::format::manifest::{decode_manifest_file, Manifest};
use crate::format::FORMAT_VERSION;
use crate::layout::{check_store_dir, parse_step_dir_name, validate_run_name, Layout};
use crate::local::durable::{
    create_dir_all_durable_on, create_dir_chain_durable_on, fsync_dir_on, publish_new_on,
};
use crate::local::LocalChunkStore;
use crate::remote::RemoteStore;
use crate::save::{stage_save, Pipeline, PipelineThreads, SaveHandle, SaveState};
use crate::staging::StagingPool;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Settings of a store. Loadable from JSON/TOML through serde; every field
/// has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// Largest chunk in bytes; large tensors are cut at multiples of it.
    pub chunk_size: usize,
    /// Bytes of pre-faulted DRAM staging. `save` blocks the caller only
    /// while a state does not fit in what is free.
    pub staging_bytes: usize,
    /// How chunks written to local disk are encoded.
    pub codec: CodecChoice,
    /// Hash/encode/write threads (0: one per core).
    pub workers: usize,
    /// Of the `workers`, how many run at the priority of the thread that
    /// opened the store (default 0); the others run ten nice steps lower,
    /// so that the copy into staging, which the caller waits for, keeps
    /// the cores. A lead worker hashes chunks while the copy is still
    /// going on, so the disk can start writing them then rather than once
    /// the copy is done, for a longer copy where cores are few. On the
    /// 2-core development machine one lead worker gave no steady gain in
    /// durable time (see the README's Performance section).
    pub lead_workers: usize,
    /// Threads that write, fsync and publish chunk files (default 16; as
    /// many early writers run beside them). Each spends part of its time
    /// waiting in `fdatasync`, so there are more of them than the writes a
    /// disk needs in flight. A store runs at most one per two chunks of its
    /// staging pool ([`StoreOptions::io_threads`]): a chunk being written
    /// holds its staging space, and with more writers than half the pool a
    /// save whose state is larger than the pool finds it all in writes
    /// that end together, so the caller's copy and the disk take turns
    /// instead of overlapping.
    pub sync_threads: usize,
    /// Threads that copy a state into the staging pool during `save` (0:
    /// four; a state under 32 MiB is copied on the caller's thread). The
    /// copy is the part of a save the caller waits for; a single thread
    /// reaches only about half the memory bandwidth of two, and on a
    /// machine with fewer cores than copy threads the extra threads win
    /// the copy a larger share of the cores against the pipeline's
    /// background workers.
    pub copy_threads: usize,
    /// Threads that read chunks during restore and verify (default 16): each
    /// hashes what it read before its next read, and a local disk reads
    /// whole chunks fastest with about sixteen in flight.
    pub read_threads: usize,
    /// Write raw chunks with O_DIRECT from the staging pool, skipping the
    /// page cache, where the file system supports it.
    pub direct_io: bool,
    /// Before a save reuses a chunk already stored, read it back and check
    /// its hash (otherwise only its header and size are checked, which is
    /// enough on the trainer's save path). A chunk that fails is written
    /// again. `cairn import` turns this on.
    pub verify_reused_chunks: bool,
    /// Make chunk files written with O_DIRECT durable in batches (off by
    /// default): one `syncfs` of the store's file system for every run of
    /// files written, instead of an `fdatasync` each, before they are
    /// renamed to their final names (the commit rule is unchanged: a chunk
    /// is at its final name only once durable). For disks where each cache
    /// flush is costly; on the development machine's virtual disk it gave
    /// no steady gain until early writes were hashed while written; since,
    /// in alternating runs, it is faster for 1 GiB states and small staging
    /// pools and 1-5% slower at 3 GiB (see the README). `syncfs` also
    /// writes back whatever else is dirty on that file system, so with
    /// more than `batch_sync_max_dirty` of dirty page cache on the machine
    /// a batch is synced file by file instead.
    pub batch_sync: bool,
    /// The most dirty page-cache bytes on the machine (dirty or under
    /// writeback, from `/proc/meminfo`) with which one `syncfs`, which
    /// writes them back too, still makes durable a batch of chunk files
    /// (with `batch_sync`) or, at a commit, the names of chunks in more
    /// than 16 fan-out directories; above it, when it cannot be read, with
    /// 0, or on a file system whose `syncfs` is not known to commit its
    /// metadata (other than ext2/3/4, XFS and btrfs: FUSE file systems, for
    /// one, may ignore it), each file or directory is synced on its own.
    /// Default 256 MiB.
    pub batch_sync_max_dirty: u64,
    /// Write a raw chunk that is likely new with O_DIRECT as soon as it is
    /// staged, while it is hashed (default on; needs `direct_io` and the
    /// raw codec). A chunk is judged likely new when this store has not
    /// staged its position in the state (run, rank, entry, offset) before,
    /// or staged other bytes there last time, by a sample of eight 512-byte
    /// windows; the disk then starts while the caller's copy into staging
    /// still holds the cores. The header block is written once the hash is
    /// known, and the commit rule is unchanged: a chunk is renamed to its
    /// final name only once durable. A chunk judged new that is stored
    /// already has its early file removed (`SaveReport::bytes_discarded`).
    pub early_write: bool,
}

/// Staging copy threads by default.
const DEFAULT_COPY_THREADS: usize = 4;

/// Staging copy threads for a `copy_threads` setting (0: the default).
fn copy_threads(setting: usize) -> usize {
    if setting > 0 {
        setting
    } else {
        DEFAULT_COPY_THREADS
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: 16 << 20,
            staging_bytes: 512 << 20,
            codec: CodecChoice::Raw,
            workers: 0,
            lead_workers: 0,
            sync_threads: 16,
            copy_threads: 0,
            read_threads: 16,
            direct_io: true,
            verify_reused_chunks: false,
            batch_sync: false,
            batch_sync_max_dirty: 256 << 20,
            early_write: true,
        }
    }
}

/// Most threads of any one kind a store starts ([`StoreOptions`]'s
/// `workers`, `lead_workers`, `sync_threads`, `copy_threads`,
/// `read_threads`): more is a mistake, not a machine.
pub const MAX_THREADS: usize = 1024;

impl StoreOptions {
    /// Thread counts within [`MAX_THREADS`].
    fn check_threads(&self) -> Result<()> {
        for (what, n) in [
            ("workers", self.workers),
            ("lead_workers", self.lead_workers),
            ("sync_threads", self.sync_threads),
            ("copy_threads", self.copy_threads),
            ("read_threads", self.read_threads),
        ] {
            if n > MAX_THREADS {
                return Err(Error::invalid(
                    what,
                    format!("{n} threads: at most {MAX_THREADS}"),
                ));
            }
        }
        Ok(())
    }

    /// The I/O threads (and early writers) a store with these options
    /// runs: `sync_threads`, at most one per two chunks of the staging
    /// pool (rounded up, so a pool a few bytes short of 16 chunks still
    /// runs eight), at least one.
    pub fn io_threads(&self) -> usize {
        let per_two_chunks = self
            .staging_bytes
            .div_ceil(self.chunk_size.max(1).saturating_mul(2));
        self.sync_threads.min(per_two_chunks).max(1)
    }

    fn check(&self) -> Result<()> {
        self.check_threads()?;
        if self.chunk_size < 4096 || self.chunk_size as u64 > crate::format::chunk::MAX_CHUNK_LEN {
            return Err(Error::invalid(
                "chunk_size",
                format!("{} must be between 4 KiB and 1 GiB", self.chunk_size),
            ));
        }
        if self.staging_bytes < self.chunk_size {
            return Err(Error::invalid(
                "staging_bytes",
                format!(
                    "{} is smaller than one chunk ({} bytes)",
                    self.staging_bytes, self.chunk_size
                ),
            ));
        }
        Ok(())
    }
}

/// Which step to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepSel {
    /// The highest committed step of the run.
    Latest,
    /// This step.
    Step(u64),
}

impl std::str::FromStr for StepSel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "latest" {
            return Ok(StepSel::Latest);
        }
        s.parse()
            .map(StepSel::Step)
            .map_err(|_| Error::invalid("step", format!("{s:?}: expected a number or 'latest'")))
    }
}

#[derive(Serialize, Deserialize)]
struct StoreMarker {
    format: String,
    version: u64,
}

struct Writer {
    pool: StagingPool,
    // Dropped first: drains queued saves before the pool goes away.
    pipeline: Pipeline,
}

/// A checkpoint store on a local directory (the NVMe tier).
///
/// `Store` is `Send + Sync`; saves may run concurrently from several
/// threads. Dropping it waits for queued saves to commit.
pub struct Store {
    pub(crate) layout: Layout,
    pub(crate) chunks: LocalChunkStore,
    pub(crate) opts: StoreOptions,
    remote: Option<RemoteStore>,
    writer: Option<Writer>,
    clock: SharedClock,
}

/// Where a checkpoint was uploaded, recorded next to its local manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadMarker {
    /// The remote store's URL.
    pub url: String,
    /// When the remote manifest was committed.
    pub uploaded_unix_ms: i64,
}

/// File name of the upload marker in a step directory.
pub const UPLOAD_MARKER: &str = "remote.json";

/// An error making the store's directory `root`, as the caller sees it: a
/// path that cannot hold a store (empty, through a file, where directories
/// cannot be made or written) is invalid input naming the store path; a
/// failing disk stays what it is.
fn root_error(root: &Path, e: Error) -> Error {
    use std::io::ErrorKind as K;
    let reason = match &e {
        _ if root.as_os_str().is_empty() => "the path is empty".to_string(),
        Error::Io { path, source, .. }
            if matches!(
                source.kind(),
                K::NotADirectory
                    | K::AlreadyExists
                    | K::NotFound
                    | K::PermissionDenied
                    | K::ReadOnlyFilesystem
                    | K::InvalidFilename
            ) =>
        {
            format!("{}: {source}", path.display())
        }
        _ => return e,
    };
    Error::invalid(
        format!("store path {:?}", root.display().to_string()),
        reason,
    )
}

impl Store {
    /// Open (creating if needed) a store at `root`, and start its staging
    /// pool and pipeline threads.
    pub fn open(root: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        Self::open_layout(Layout::new(root.as_ref()), opts)
    }

    /// [`Store::open`] with every file written through `fs` instead of
    /// the operating system: a simulated disk ([`crate::testing::SimDisk`])
    /// that loses what was not made durable at a simulated power loss, or
    /// fails writes and reads. Direct I/O is off on such a store, whatever
    /// `opts` says, unless `fs` allows it.
    #[cfg(feature = "test-util")]
    pub fn open_with_fs(
        root: impl AsRef<Path>,
        opts: StoreOptions,
        fs: std::sync::Arc<dyn crate::local::fs::Fs>,
    ) -> Result<Store> {
        Self::open_layout(Layout::with_fs(root.as_ref(), fs), opts)
    }

    /// Whether this handle's save pipeline has listed the chunk files
    /// (it does so once, in the background, when the store opens; from
    /// then on a chunk absent from the listing and from its own writes is
    /// written without a lookup).
    #[cfg(feature = "test-util")]
    pub fn chunk_listing_done(&self) -> bool {
        self.writer
            .as_ref()
            .is_some_and(|w| w.pipeline.chunks_listed())
    }

    fn open_layout(layout: Layout, opts: StoreOptions) -> Result<Store> {
        opts.check()?;
        let fs = layout.fs();
        create_dir_all_durable_on(fs, layout.root()).map_err(|e| root_error(layout.root(), e))?;
        check_or_write_marker(&layout)?;
        // Nothing is created or written through a link inside the store.
        layout.check_dirs(None, None)?;
        for d in [layout.runs_dir(), layout.tmp_dir()] {
            create_dir_all_durable_on(fs, &d)?;
        }
        let mut chunks = LocalChunkStore::new(layout.clone());
        chunks.init()?;
        if opts.direct_io {
            chunks.enable_direct_io();
        }
        let workers = if opts.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            opts.workers
        };
        let pool = StagingPool::new(opts.staging_bytes)?;
        let pipeline = Pipeline::start(
            chunks.clone(),
            opts.codec,
            PipelineThreads {
                workers,
                lead_workers: opts.lead_workers,
                syncers: opts.io_threads(),
                copy_threads: copy_threads(opts.copy_threads),
            },
            opts.verify_reused_chunks,
            opts.batch_sync,
            opts.batch_sync_max_dirty,
            opts.early_write,
        )?;
        Ok(Store {
            layout,
            chunks,
            opts,
            remote: None,
            writer: Some(Writer { pool, pipeline }),
            clock: system_clock(),
        })
    }

    /// Open an existing store for reading only: no staging memory, no
    /// threads, nothing created.
    pub fn open_read_only(root: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        opts.check_threads()?;
        let layout = Layout::new(root.as_ref());
        if layout.root().as_os_str().is_empty() {
            return Err(root_error(layout.root(), Error::invalid("path", "empty")));
        }
        if !layout.marker().is_file() {
            return Err(Error::NotFound {
                what: format!("cairn store at {}", layout.root().display()),
            });
        }
        check_or_write_marker(&layout)?;
        Ok(Store {
            chunks: LocalChunkStore::new(layout.clone()),
            layout,
            opts,
            remote: None,
            writer: None,
            clock: system_clock(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// The store's settings.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Back this store with a remote tier: restores fetch (and repair)
    /// chunks missing or corrupt locally from it, and [`Store::upload`]
    /// sends checkpoints to it.
    pub fn attach_remote(&mut self, remote: RemoteStore) -> &mut Self {
        self.remote = Some(remote);
        self
    }

    /// Use `clock` for this store's time-based rules (collection grace,
    /// leftover ages). Tests drive them with a [`crate::ManualClock`].
    pub fn set_clock(&mut self, clock: SharedClock) -> &mut Self {
        self.clock = clock;
        self
    }

    /// The clock this store's time-based rules read.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The attached remote tier.
    pub fn remote(&self) -> Option<&RemoteStore> {
        self.remote.as_ref()
    }

    /// The local chunk files.
    pub fn chunk_store(&self) -> &LocalChunkStore {
        &self.chunks
    }

    /// The manifest file of a committed checkpoint, validated as
    /// [`Store::manifest`] validates it (including that it names the run
    /// and step it is stored under), as stored.
    pub fn manifest_bytes(&self, run: &str, step: u64) -> Result<Vec<u8>> {
        validate_run_name(run)?;
        let path = self.layout.manifest_path(run, step);
        let bytes = read_bounded(&path)?;
        let m = decode_manifest_file(&bytes, &path)?;
        check_location(&m, run, step, &path)?;
        Ok(bytes)
    }

    /// Upload committed checkpoint `(run, step)` to the attached remote and
    /// wait until it is durable there; then record it locally. Blocking:
    /// call it from a plain thread or `spawn_blocking`, not an async task.
    pub fn upload(&self, run: &str, step: u64) -> Result<crate::remote::UploadReport> {
        let remote = self
            .remote
            .as_ref()
            .ok_or_else(|| Error::invalid("store", "no remote attached"))?;
        self.upload_to(remote, run, step)
    }

    /// Upload committed checkpoint `(run, step)` to `remote` (see
    /// [`Store::upload`]): [`crate::copy_checkpoint`] with the remote's
    /// freshness and deadline rules, then the local upload marker.
    pub fn upload_to(
        &self,
        remote: &RemoteStore,
        run: &str,
        step: u64,
    ) -> Result<crate::remote::UploadReport> {
        let opts = crate::copy::CopyOptions {
            threads: remote.options().concurrency.max(1),
            ..Default::default()
        };
        let report = crate::copy::copy_checkpoint(self, remote, run, step, &opts)?;
        remote.metrics().add_skips(report.chunks_skipped);
        crate::failpoint::hit("upload.before_marker")
            .map_err(|e| Error::io("fail point", self.layout.step_dir(run, step), e))?;
        self.mark_uploaded(run, step, remote.url())?;
        Ok(report.into())
    }

    /// Commit a manifest copied from another tier: validated, then
    /// published only if absent. Returns `Ok(true)` if created, `Ok(false)`
    /// if identical bytes were already there; different bytes are
    /// `AlreadyExists`. The caller has stored every chunk it references.
    pub fn commit_manifest(&self, run: &str, step: u64, bytes: &[u8]) -> Result<bool> {
        validate_run_name(run)?;
        let path = self.layout.manifest_path(run, step);
        let m = decode_manifest_file(bytes, &path)?;
        if m.run != run || m.step != step {
            return Err(Error::manifest(
                &path,
                format!("names run {} step {}", m.run, m.step),
            ));
        }
        for (id, _) in m.distinct_chunks() {
            if !self.chunks.contains(&id) {
                return Err(Error::invalid(
                    "manifest commit",
                    format!("chunk {id} of run {run} step {step} is not stored"),
                ));
            }
        }
        let dirs: std::collections::BTreeSet<u8> =
            m.distinct_chunks().iter().map(|(id, _)| id.0[0]).collect();
        self.chunks.sync_prefix_dirs(dirs)?;
        self.layout.check_dirs(Some(run), Some(step))?;
        let fs = self.layout.fs();
        create_dir_chain_durable_on(
            fs,
            &self.layout.runs_dir(),
            &self.layout.step_dir(run, step),
        )?;
        if publish_new_on(fs, &self.layout.tmp_dir(), &path, bytes)? {
            return Ok(true);
        }
        if read_bounded(&path)? == bytes {
            Ok(false)
        } else {
            Err(Error::AlreadyExists {
                run: run.to_string(),
                step,
            })
        }
    }

    /// Record that `(run, step)` is durable in the remote at `url`.
    pub fn mark_uploaded(&self, run: &str, step: u64, url: &str) -> Result<()> {
        let marker = UploadMarker {
            url: url.to_string(),
            uploaded_unix_ms: self.clock.now_ms(),
        };
        let body = serde_json::to_vec(&marker).map_err(|e| Error::Internal(e.to_string()))?;
        self.layout.check_dirs(Some(run), Some(step))?;
        crate::local::durable::publish_replace_on(
            self.layout.fs(),
            &self.layout.tmp_dir(),
            &self.layout.step_dir(run, step).join(UPLOAD_MARKER),
            &body,
        )
    }

    /// The remote URL that `(run, step)` is recorded as uploaded to, if any
    /// (the local upload marker the flush daemon writes after a remote
    /// commit).
    pub fn uploaded_to(&self, run: &str, step: u64) -> Option<String> {
        let path = self.layout.step_dir(run, step).join(UPLOAD_MARKER);
        read_bounded(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<UploadMarker>(&b).ok())
            .map(|m| m.url)
    }

    /// The file holding chunk `id` in this store (whether or not it exists).
    pub fn chunk_path(&self, id: &crate::ChunkId) -> PathBuf {
        self.layout.chunk_path(id)
    }

    /// Whether `(run, step)` is recorded as durable in the remote at `url`.
    pub fn is_uploaded(&self, run: &str, step: u64, url: &str) -> bool {
        self.uploaded_to(run, step).is_some_and(|u| u == url)
    }

    /// The staging pool and pipeline of a writable store.
    pub(crate) fn writer_parts(&self) -> Result<(&StagingPool, &Pipeline)> {
        let w = self
            .writer
            .as_ref()
            .ok_or_else(|| Error::invalid("store", "opened read-only; use Store::open to save"))?;
        Ok((&w.pool, &w.pipeline))
    }

    /// The staging pool (absent on a read-only store).
    pub fn staging_pool(&self) -> Option<&StagingPool> {
        self.writer.as_ref().map(|w| &w.pool)
    }

    /// Save `state` as checkpoint `(run, step)`.
    ///
    /// Returns once every byte is copied into the staging pool; the caller
    /// may then overwrite its buffers. The returned handle resolves when the
    /// checkpoint is committed on local disk. A state larger than the
    /// staging budget still saves: the call waits for staging space.
    pub fn save(&self, run: &str, step: u64, state: &SaveState<'_>) -> Result<SaveHandle> {
        let w = self
            .writer
            .as_ref()
            .ok_or_else(|| Error::invalid("store", "opened read-only; use Store::open to save"))?;
        stage_save(
            &self.layout,
            &w.pool,
            &w.pipeline,
            self.opts.chunk_size,
            run,
            step,
            state,
            None,
        )
    }

    /// Names of all runs with at least one committed checkpoint, and of
    /// runs whose directory cannot be listed (for those, [`Store::steps`]
    /// returns the error), so that nothing unreadable goes unnoticed.
    /// Fails if `runs/` cannot be listed or is a symbolic link.
    pub fn runs(&self) -> Result<Vec<String>> {
        let dir = self.layout.runs_dir();
        if !check_store_dir(&dir)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (name, ft) in read_dir_entries(&dir)? {
            if validate_run_name(&name).is_err() || !(ft.is_dir() || ft.is_symlink()) {
                continue;
            }
            match self.steps(&name) {
                Ok(steps) if steps.is_empty() => {}
                _ => out.push(name),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Committed steps of `run`, ascending. A step directory without a
    /// manifest (an interrupted save) is not listed; one where the
    /// manifest's presence cannot be determined (say, permission denied) is,
    /// so that reading its manifest reports the error. Fails if the run's
    /// directory cannot be listed, or it or one of its step directories is
    /// a symbolic link.
    pub fn steps(&self, run: &str) -> Result<Vec<u64>> {
        validate_run_name(run)?;
        if !check_store_dir(&self.layout.runs_dir())? {
            return Ok(Vec::new());
        }
        let dir = self.layout.run_dir(run);
        if !check_store_dir(&dir)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (name, ft) in read_dir_entries(&dir)? {
            let Some(step) = parse_step_dir_name(&name) else {
                continue;
            };
            if ft.is_symlink() {
                check_store_dir(&dir.join(&name))?;
            }
            if ft.is_dir() && self.manifest_present(run, step).unwrap_or(true) {
                out.push(step);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Whether the manifest of `(run, step)` exists, without following a
    /// link; an error if that cannot be determined.
    fn manifest_present(&self, run: &str, step: u64) -> Result<bool> {
        let path = self.layout.manifest_path(run, step);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("examine manifest", &path, e)),
        }
    }

    /// The highest committed step of `run`, if any.
    pub fn latest(&self, run: &str) -> Result<Option<u64>> {
        Ok(self.steps(run)?.last().copied())
    }

    /// The highest committed step of `run` whose metrics match `filter`
    /// (e.g. `"loss<2.5".parse()?`), if any; see [`crate::latest_matching`].
    pub fn latest_where(
        &self,
        run: &str,
        filter: &crate::metrics::MetricFilter,
    ) -> Result<Option<u64>> {
        crate::metrics::latest_matching(self, run, filter)
    }

    /// Resolve a [`StepSel`] to a committed step.
    pub fn resolve(&self, run: &str, sel: StepSel) -> Result<u64> {
        match sel {
            StepSel::Step(s) => {
                validate_run_name(run)?;
                if self.manifest_present(run, s)? {
                    Ok(s)
                } else {
                    Err(Error::NotFound {
                        what: format!("checkpoint run {run} step {s}"),
                    })
                }
            }
            StepSel::Latest => self.latest(run)?.ok_or_else(|| Error::NotFound {
                what: format!("any committed checkpoint of run {run}"),
            }),
        }
    }

    /// Read and validate the manifest of a committed checkpoint.
    pub fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        validate_run_name(run)?;
        let path = self.layout.manifest_path(run, step);
        let bytes = read_bounded(&path)?;
        let m = decode_manifest_file(&bytes, &path)?;
        check_location(&m, run, step, &path)?;
        Ok(m)
    }

    /// Delete a checkpoint's manifest (its chunks stay until garbage
    /// collection). The manifest goes first, so a crash midway leaves
    /// either the whole checkpoint or none of it.
    pub fn delete(&self, run: &str, step: u64) -> Result<()> {
        validate_run_name(run)?;
        self.layout.check_dirs(Some(run), Some(step))?;
        let path = self.layout.manifest_path(run, step);
        let fs = self.layout.fs();
        match fs.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    what: format!("checkpoint run {run} step {step}"),
                })
            }
            Err(e) => return Err(Error::io("remove manifest", &path, e)),
        }
        // The manifest's removal is the deletion; make it durable. A
        // collection may remove the emptied step directory concurrently.
        let step_dir = self.layout.step_dir(run, step);
        match fsync_dir_on(fs, &step_dir) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
        let _ = fs.remove_dir_all(&step_dir);
        fsync_dir_on(fs, &self.layout.run_dir(run))
    }
}

/// A manifest read from `path`, the location of `(run, step)`, must name
/// that run and step.
fn check_location(m: &Manifest, run: &str, step: u64, path: &Path) -> Result<()> {
    if m.run != run || m.step != step {
        return Err(Error::manifest(
            path,
            format!("names run {} step {}, not its location", m.run, m.step),
        ));
    }
    Ok(())
}

fn check_or_write_marker(layout: &Layout) -> Result<()> {
    let path = layout.marker();
    if !path.exists() {
        check_adoptable(layout.root())?;
        let body = serde_json::to_vec_pretty(&StoreMarker {
            format: "cairn-store".into(),
            version: FORMAT_VERSION as u64,
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let tmp = layout.root().to_path_buf();
        publish_new_on(layout.fs(), &tmp, &path, &body)?;
    }
    let bad = |reason: String| Error::invalid(format!("store marker {}", path.display()), reason);
    let bytes = read_bounded(&path).map_err(|e| match e {
        Error::CorruptManifest { reason, .. } => bad(reason),
        e => e,
    })?;
    let marker: StoreMarker =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
    if marker.format != "cairn-store" {
        return Err(bad(format!("names format {:?}", marker.format)));
    }
    if marker.version != FORMAT_VERSION as u64 {
        return Err(Error::UnsupportedVersion {
            what: "store",
            path,
            found: marker.version,
            supported: FORMAT_VERSION as u64,
        });
    }
    Ok(())
}

/// Refuse to make a store in a directory that holds anything but a
/// store's own entries (or a file system's `lost+found`): a mistyped path
/// must not turn a user's directory into a store, whose collection would
/// then delete what lies in its `tmp/` and its `chunks/`.
fn check_adoptable(root: &Path) -> Result<()> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        // Read-only opens of a missing store report it elsewhere.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list directory", root, e)),
    };
    let mut foreign: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !crate::layout::STORE_ENTRIES.contains(&n.as_str())
                && n != "lost+found"
                && !is_marker_tmp(n)
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort_unstable();
    let shown: Vec<&str> = foreign.iter().map(String::as_str).take(3).collect();
    let more = foreign.len().saturating_sub(shown.len());
    Err(Error::invalid(
        format!("store path {:?}", root.display().to_string()),
        format!(
            "the directory holds other files ({}{}) and no {}: \
             give a new or empty directory for a new store",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            crate::layout::STORE_MARKER
        ),
    ))
}

/// Whether `name` is the temporary file of a marker being published
/// (`publish.<pid>.<n>.tmp`, beside it in the root): another process
/// making the same store at the same moment, or one killed doing so.
fn is_marker_tmp(name: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("publish.")
        .and_then(|r| r.strip_suffix(".tmp"))
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

/// Read a small metadata file, refusing anything over the manifest limit
/// and anything that is not a regular file.
pub(crate) fn read_bounded(path: &PathBuf) -> Result<Vec<u8>> {
    let limit =
        crate::format::manifest::MAX_MANIFEST_LEN + crate::format::manifest::ENVELOPE_LEN as u64;
    crate::local::durable::read_limited(path, limit).map_err(|e| match e {
        Error::InvalidInput { reason, .. } => Error::manifest(path, reason),
        e => e,
    })
}

/// Names and types (links not followed) of the entries of `dir`.
fn read_dir_entries(dir: &Path) -> Result<Vec<(String, std::fs::FileType)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list directory", dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("list directory", dir, e))?;
        let ft = ent
            .file_type()
            .map_err(|e| Error::io("list directory", ent.path(), e))?;
        if let Ok(name) = ent.file_name().into_string() {
            out.push((name, ft));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::StoreOptions;

    /// The I/O threads a store runs for a staging pool: all of
    /// `sync_threads` while they hold at most half the pool, fewer for a
    /// smaller pool, never none.
    #[test]
    fn io_threads_hold_at_most_half_the_staging_pool() {
        let with = |staging_chunks: usize, sync_threads: usize| {
            let o = StoreOptions {
                staging_bytes: staging_chunks * (16 << 20),
                sync_threads,
                ..StoreOptions::default()
            };
            o.io_threads()
        };
        assert_eq!(StoreOptions::default().io_threads(), 16);
        assert_eq!(with(64, 16), 16);
        assert_eq!(with(16, 16), 8);
        assert_eq!(with(17, 16), 9);
        assert_eq!(with(64, 4), 4);
        assert_eq!(with(3, 16), 2);
        assert_eq!(with(1, 16), 1);
        assert_eq!(with(64, 0), 1);
        // A pool a few bytes short of 16 chunks (`cairn bench --staging
        // 25%` of a 1 GiB state) runs as many as one of 16.
        let short = StoreOptions {
            staging_bytes: (256 << 20) - 6,
            ..StoreOptions::default()
        };
        assert_eq!(short.io_threads(), 8);
    }
}
