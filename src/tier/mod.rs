//! The tier abstraction: a place that holds chunk objects and manifests.
//!
//! [`ChunkTier`] is implemented by the local store ([`crate::Store`], a
//! directory) and the remote store ([`crate::RemoteStore`], an
//! object-store prefix). Everything that moves or checks checkpoints
//! between places is written once on top of it: copying and uploading
//! (`copy`), verification (`verify`), the mark phase of garbage
//! collection (`gc`), and restore's tiered reads with repair (`restore`).
//! [`Tier`] opens either kind from a location string.

mod local;
mod location;
mod remote;

pub use location::{is_url, Tier};

use crate::chunk_id::ChunkId;
use crate::clock::Clock;
use crate::codec::Decoder;
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::local::GcLock;
use crate::store::StepSel;
use std::path::PathBuf;
use std::time::Duration;

/// What a tier knows of one stored chunk object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// The chunk.
    pub id: ChunkId,
    /// Bytes of the stored object (header and payload).
    pub size: u64,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// How a writer may rely on a chunk it finds already stored, so that a
/// concurrent garbage collection cannot delete it before the writer's
/// manifest commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReuseRule {
    /// Present is enough: writers hold the tier's collection lock
    /// ([`ChunkTier::write_guard`]) until they commit, and a collection
    /// takes it exclusively (the local tier).
    Locked,
    /// Present and modified less than `refresh_after` ago; an older object
    /// is written again, which renews it. The manifest must then commit
    /// within `commit_within` of the writer's first look, and renewed
    /// chunks are checked again after the commit (the remote tier; see
    /// the collection protocol in `docs/architecture.md`).
    Grace {
        /// Age beyond which a present chunk is written again.
        refresh_after: Duration,
        /// Longest a writer may take from its first look to its commit.
        commit_within: Duration,
    },
}

/// A place that holds chunk objects and manifests in cairn's layout.
///
/// Every method blocks; a remote implementation drives its object store on
/// the current tokio runtime's handle when called from a blocking thread
/// of one, or on a runtime of its own otherwise.
pub trait ChunkTier: Sync {
    /// Where the tier is: a directory or a URL.
    fn location(&self) -> String;
    /// `"local"` or `"remote"`.
    fn kind(&self) -> &'static str;
    /// The clock the tier's time-based rules read.
    fn clock(&self) -> &dyn Clock;
    /// Chunks worth reading or writing at once.
    fn threads(&self) -> usize;

    /// Runs with committed checkpoints, sorted.
    fn runs(&self) -> Result<Vec<String>>;
    /// Committed steps of `run`, ascending. A step whose state cannot be
    /// determined is listed, so that reading it reports the error.
    fn steps(&self, run: &str) -> Result<Vec<u64>>;
    /// The manifest file of a committed checkpoint, validated, as stored.
    fn manifest_bytes(&self, run: &str, step: u64) -> Result<Vec<u8>>;
    /// The manifest of a committed checkpoint, validated, including that it
    /// names the run and step it is stored under.
    fn manifest(&self, run: &str, step: u64) -> Result<Manifest>;
    /// Publish a manifest, create-only, after every chunk it references is
    /// stored: `Ok(true)` if created, `Ok(false)` if identical bytes were
    /// already there; different bytes are [`Error::AlreadyExists`].
    fn commit_manifest(&self, run: &str, step: u64, bytes: &[u8]) -> Result<bool>;
    /// Delete a checkpoint's manifest (its chunks stay until collected).
    fn delete_manifest(&self, run: &str, step: u64) -> Result<()>;
    /// Where a manifest lives, for messages.
    fn manifest_location(&self, run: &str, step: u64) -> PathBuf;

    /// The stored chunk object `id`, if present.
    fn chunk_info(&self, id: &ChunkId) -> Result<Option<ChunkInfo>>;
    /// Every chunk object; names that are not chunk ids are skipped.
    fn list_chunks(&self) -> Result<Vec<ChunkInfo>>;
    /// Read chunk `id` (`len` bytes uncompressed), verified against its
    /// hash, into `out` when given (exactly `len` bytes), else into `buf`.
    /// Returns the bytes read from the tier.
    fn read_chunk(
        &self,
        id: &ChunkId,
        len: u64,
        out: Option<&mut [u8]>,
        buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64>;
    /// Whether [`ChunkTier::read_chunk`] reads a chunk's payload with
    /// O_DIRECT when `out` starts on a page: a restore into a buffer that
    /// does not then reads through an aligned buffer of its own rather than
    /// through the page cache. False by default.
    fn reads_direct(&self) -> bool {
        false
    }
    /// Called with every chunk a restore or verify is about to read, before
    /// the first read: the tier may get ready for them (the local tier
    /// brings their files' metadata into memory). Nothing by default.
    fn prepare_reads(&self, _chunks: &[(ChunkId, u64)]) {}
    /// Chunk object `id` as stored (header and payload), verified against
    /// its hash: what a copy to another tier sends.
    fn read_chunk_object(&self, id: &ChunkId, len: u64) -> Result<bytes::Bytes>;
    /// Store a chunk object under its final name, atomically: a reader
    /// sees the whole object or none. A tier may store it in another
    /// encoding of the same uncompressed bytes (the remote tier compresses
    /// raw chunks, see [`crate::RemoteOptions::codec`]; a local store keeps
    /// its own [`crate::StoreOptions::codec`], decoding a compressed object
    /// for a raw store); the name, the hash of the uncompressed bytes,
    /// stays. Returns the bytes stored.
    fn put_chunk_object(&self, id: &ChunkId, object: bytes::Bytes) -> Result<u64>;
    /// Delete chunk object `id` (absent is fine).
    fn delete_chunk(&self, id: &ChunkId) -> Result<()>;
    /// Where a chunk lives, for messages.
    fn chunk_location(&self, id: &ChunkId) -> PathBuf;

    /// How writers may rely on chunks already present.
    fn reuse_rule(&self) -> ReuseRule;
    /// What a writer holds from its first look at stored chunks until its
    /// manifest commits (the shared collection lock, on the local tier).
    fn write_guard(&self) -> Result<Option<GcLock>>;

    /// The remote store behind this tier, if it is one (copies pack small
    /// chunks into a remote that packs them).
    fn as_remote(&self) -> Option<&crate::remote::RemoteStore> {
        None
    }

    /// Resolve a step selection to a committed step.
    fn resolve(&self, run: &str, sel: StepSel) -> Result<u64> {
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

    /// Whether a chunk found present may be relied on now without writing
    /// it again (see [`ReuseRule`]).
    fn is_fresh(&self, info: &ChunkInfo) -> bool {
        match self.reuse_rule() {
            ReuseRule::Locked => true,
            ReuseRule::Grace { refresh_after, .. } => {
                self.clock().since(info.modified_ms) < refresh_after
            }
        }
    }
}
