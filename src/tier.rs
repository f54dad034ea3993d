//! [`Tier`]: a store given by location — a local directory or an object
//! store URL — with the operations the CLI needs on either.

use crate::chunk_id::ChunkId;
use crate::codec::decode_chunk_object;
use crate::codec::Decoder;
use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::{decode_manifest_file, Manifest};
use crate::remote::{RemoteOptions, RemoteStore};
use crate::store::{StepSel, Store, StoreOptions};
use std::collections::HashMap;
use std::path::PathBuf;

/// A local store or a remote one.
pub enum Tier {
    /// A directory.
    Local(Store),
    /// An object-store prefix.
    Remote(RemoteStore),
}

/// Whether `location` names an object store (`s3://`, `gs://`, `az://`,
/// `file://`, ...) rather than a local directory.
pub fn is_url(location: &str) -> bool {
    location.contains("://")
}

impl Tier {
    /// Open an existing store at `location` for reading; nothing is
    /// created, and a missing store is [`Error::NotFound`] naming it.
    pub fn open(location: &str, remote_options: &[(String, String)]) -> Result<Tier> {
        if is_url(location) {
            Ok(Tier::Remote(RemoteStore::open_existing(
                location,
                remote_options,
                RemoteOptions::default(),
            )?))
        } else {
            Ok(Tier::Local(Store::open_read_only(
                location,
                StoreOptions::default(),
            )?))
        }
    }

    /// Open a store at `location` for writing, creating a local one if
    /// needed (with a small staging pool: copies do not stage).
    pub fn open_for_write(location: &str, remote_options: &[(String, String)]) -> Result<Tier> {
        if is_url(location) {
            return Ok(Tier::Remote(RemoteStore::open(
                location,
                remote_options,
                RemoteOptions::default(),
            )?));
        }
        Ok(Tier::Local(Store::open(
            location,
            StoreOptions {
                staging_bytes: 64 << 20,
                ..StoreOptions::default()
            },
        )?))
    }

    /// Where the store is.
    pub fn location(&self) -> String {
        match self {
            Tier::Local(s) => s.root().display().to_string(),
            Tier::Remote(r) => r.url().to_string(),
        }
    }

    /// `"local"` or `"remote"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Tier::Local(_) => "local",
            Tier::Remote(_) => "remote",
        }
    }

    /// Runs with committed checkpoints.
    pub fn runs(&self) -> Result<Vec<String>> {
        match self {
            Tier::Local(s) => s.runs(),
            Tier::Remote(r) => r.block_on(r.runs())?,
        }
    }

    /// Committed steps of `run`.
    pub fn steps(&self, run: &str) -> Result<Vec<u64>> {
        match self {
            Tier::Local(s) => s.steps(run),
            Tier::Remote(r) => r.block_on(r.steps(run))?,
        }
    }

    /// Resolve a step selection.
    pub fn resolve(&self, run: &str, sel: StepSel) -> Result<u64> {
        let steps = self.steps(run)?;
        let found = match sel {
            StepSel::Latest => steps.last().copied(),
            StepSel::Step(s) => steps.contains(&s).then_some(s),
        };
        found.ok_or_else(|| Error::NotFound {
            what: match sel {
                StepSel::Latest => format!(
                    "any committed checkpoint of run {run} in {}",
                    self.location()
                ),
                StepSel::Step(s) => format!("checkpoint run {run} step {s} in {}", self.location()),
            },
        })
    }

    /// The validated manifest file bytes of a checkpoint.
    pub fn manifest_bytes(&self, run: &str, step: u64) -> Result<Vec<u8>> {
        match self {
            Tier::Local(s) => s.manifest_bytes(run, step),
            Tier::Remote(r) => {
                let path = r.manifest_path(run, step);
                let b = r.block_on(r.get_manifest_object(&path))??;
                decode_manifest_file(&b, &PathBuf::from(path.to_string()))?;
                Ok(b.to_vec())
            }
        }
    }

    /// The manifest of a checkpoint.
    pub fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        match self {
            Tier::Local(s) => s.manifest(run, step),
            Tier::Remote(r) => r.block_on(r.manifest(run, step))?,
        }
    }

    /// Restore a checkpoint from this tier into new buffers, verified.
    pub fn restore(
        &self,
        run: &str,
        step: StepSel,
        filter: &crate::TensorFilter,
    ) -> Result<crate::Restored> {
        match self {
            Tier::Local(s) => s.restore(run, step, filter),
            Tier::Remote(r) => r.restore(run, step, filter),
        }
    }

    /// Whether the store holds chunk `id`.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        match self {
            Tier::Local(s) => Ok(s.chunk_store().contains(id)),
            Tier::Remote(r) => Ok(r.block_on(r.head_chunk(id))??.is_some()),
        }
    }

    /// Whether the store holds chunk `id` in a state a new manifest may
    /// rely on: locally, present; remotely, present and younger than half
    /// the collection grace period (an older object is uploaded again, which
    /// renews it; see the collection protocol in `docs/architecture.md`).
    pub fn has_live_chunk(&self, id: &ChunkId) -> Result<bool> {
        match self {
            Tier::Local(s) => Ok(s.chunk_store().contains(id)),
            Tier::Remote(r) => {
                let fresh_after =
                    crate::remote::upload::now_ms() - (r.options().gc_grace / 2).as_millis() as i64;
                Ok(r.block_on(r.head_chunk(id))??
                    .is_some_and(|m| m.last_modified.timestamp_millis() > fresh_after))
            }
        }
    }

    /// Whether the store holds chunk `id` (uncompressed `len`) whole, so a
    /// copy may skip it: as [`Self::has_live_chunk`], and its object read
    /// back and verified against its hash. A chunk that is corrupt, not a
    /// regular file, or gone counts as absent, so the copy writes it again.
    pub fn has_verified_chunk(&self, id: &ChunkId, len: u64) -> Result<bool> {
        if !self.has_live_chunk(id)? {
            return Ok(false);
        }
        match self.read_chunk_object(id, len) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::Data | ErrorKind::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Read chunk object `id` (uncompressed `len`) as stored, verified.
    pub fn read_chunk_object(&self, id: &ChunkId, len: u64) -> Result<bytes::Bytes> {
        let (object, path) = match self {
            Tier::Local(s) => (
                bytes::Bytes::from(s.chunk_store().read_object(id, len)?),
                s.chunk_store().layout().chunk_path(id),
            ),
            Tier::Remote(r) => (
                r.block_on(r.fetch_chunk_object(id, len))??,
                PathBuf::from(r.chunk_path(id).to_string()),
            ),
        };
        let mut out = vec![0u8; len as usize];
        decode_chunk_object(&object, id, &mut out, &mut Decoder::new()?, &path)?;
        Ok(object)
    }

    /// Store a verified chunk object under its final name.
    pub fn put_chunk_object(&self, id: &ChunkId, object: bytes::Bytes) -> Result<()> {
        match self {
            Tier::Local(s) => s.chunk_store().put_object(id, &object),
            Tier::Remote(r) => r.block_on(r.put_object(&r.chunk_path(id), object))?,
        }
    }

    /// Commit a manifest (only if absent; identical bytes count as done).
    pub fn commit_manifest(&self, run: &str, step: u64, bytes: Vec<u8>) -> Result<bool> {
        match self {
            Tier::Local(s) => s.commit_manifest(run, step, &bytes),
            Tier::Remote(r) => r.block_on(r.put_manifest(run, step, bytes.into()))?,
        }
    }

    /// Verify checkpoints: all, one run's, or one step's. Every referenced
    /// chunk is read and hashed once.
    pub fn verify(
        &self,
        run: Option<&str>,
        step: Option<u64>,
    ) -> Result<crate::verify::VerifyReport> {
        match self {
            Tier::Local(s) => s.verify(run, step),
            Tier::Remote(_) => crate::verify::verify(self, run, step),
        }
    }

    /// Stored size of every chunk object in the store.
    pub fn chunk_sizes(&self) -> Result<HashMap<ChunkId, u64>> {
        match self {
            Tier::Local(s) => Ok(s.chunk_store().stored_sizes()),
            Tier::Remote(r) => Ok(r
                .block_on(r.list_chunks())??
                .into_iter()
                .map(|(id, _, size)| (id, size))
                .collect()),
        }
    }
}

impl crate::verify::VerifySource for Tier {
    fn runs(&self) -> Result<Vec<String>> {
        Tier::runs(self)
    }
    fn steps(&self, run: &str) -> Result<Vec<u64>> {
        Tier::steps(self, run)
    }
    fn resolve(&self, run: &str, step: u64) -> Result<u64> {
        Tier::resolve(self, run, StepSel::Step(step))
    }
    fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        Tier::manifest(self, run, step)
    }
    fn manifest_location(&self, run: &str, step: u64) -> PathBuf {
        match self {
            Tier::Local(s) => s
                .root()
                .join("runs")
                .join(run)
                .join(crate::layout::step_dir_name(step)),
            Tier::Remote(r) => PathBuf::from(r.manifest_path(run, step).to_string()),
        }
    }
    fn chunk_location(&self, id: &ChunkId) -> PathBuf {
        match self {
            Tier::Local(s) => s.chunk_store().layout().chunk_path(id),
            Tier::Remote(r) => PathBuf::from(r.chunk_path(id).to_string()),
        }
    }
    fn check_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        _buf: &mut Vec<u8>,
        _scratch: &mut Vec<u8>,
        _dec: &mut Decoder,
    ) -> Result<u64> {
        self.read_chunk_object(id, len).map(|b| b.len() as u64)
    }
    fn threads(&self) -> usize {
        match self {
            Tier::Local(s) => s.options().read_threads,
            Tier::Remote(r) => r.options().concurrency,
        }
    }
}
