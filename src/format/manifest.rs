//! Manifests: the commit record of one checkpoint.
//!
//! A manifest file is a 56-byte envelope followed by a JSON body:
//!
//! ```text
//! offset size field
//!      0    8 magic "CAIRNMAN"
//!      8    2 format version (u16 LE) = 1
//!     10    6 reserved, must be zero
//!     16    8 body length (u64 LE)
//!     24   32 blake3 hash of the body
//!     56    - body: UTF-8 JSON, a [`Manifest`]
//! ```
//!
//! The hash makes any flipped byte detectable even where the JSON would
//! still parse. [`decode_manifest_file`] checks the envelope, parses the body
//! and validates every entry (names, sizes, chunk references) before anything
//! else sees it.

use super::chunk::MAX_CHUNK_LEN;
use super::{FORMAT_VERSION, SHARDED_FORMAT_VERSION};
use crate::chunk_id::ChunkId;
use crate::dtype::{byte_len, DType};
use crate::error::{Error, Result};
use crate::layout::{validate_entry_name, validate_run_name};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// Magic bytes at the start of every manifest file.
pub const MANIFEST_MAGIC: [u8; 8] = *b"CAIRNMAN";
/// Size of the manifest envelope in bytes.
pub const ENVELOPE_LEN: usize = 56;
/// Largest manifest body any reader accepts (256 MiB).
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;
/// Largest tensor or blob any reader accepts (1 TiB).
pub const MAX_ENTRY_LEN: u64 = 1 << 40;

/// One committed checkpoint: every tensor and blob with the chunks holding
/// its bytes, and the caller's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest schema version; 1.
    pub format_version: u32,
    /// The run this checkpoint belongs to.
    pub run: String,
    /// The training step.
    pub step: u64,
    /// Wall-clock commit time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Chunk size the writer used (informational).
    pub chunk_size: u64,
    /// Tensors, in the order the caller gave them.
    pub tensors: Vec<TensorEntry>,
    /// Opaque byte blobs (RNG state, data-loader position, ...).
    pub blobs: Vec<BlobEntry>,
    /// Caller-supplied JSON metadata.
    pub metadata: serde_json::Value,
    /// Training metrics (loss, grad norm, ...) by name; optional, absent
    /// from the JSON when empty. Non-finite values are stored as `null` and
    /// read back as NaN.
    #[serde(default, skip_serializing_if = "crate::metrics::Metrics::is_empty")]
    pub metrics: crate::metrics::Metrics,
    /// Format v2, part manifests only: the rank that saved this part and
    /// the world size it belongs to. A part never makes its step visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartInfo>,
    /// Format v2, global records only: how many parts (ranks) the step was
    /// committed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    /// Format v2, global records only: every tensor of the step with its
    /// global shape and the shards that hold its bytes. `tensors` is empty
    /// in a record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sharded: Vec<ShardedTensor>,
    /// Format v2, global records only: the save attempt whose parts were
    /// committed, when the ranks named one ([`PartInfo::attempt`]). Parts
    /// of the step from other attempts are left for collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
}

/// Which part of a sharded step a part manifest is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartInfo {
    /// The rank that saved it, `0..world_size`.
    pub rank: u32,
    /// How many ranks save the step.
    pub world_size: u32,
    /// The save attempt the part belongs to, when the ranks named one
    /// ([`crate::SaveState::attempt`]): a commit takes the parts of one
    /// attempt, so an attempt abandoned before its commit does not stand
    /// in the way of the next. Absent from the JSON when not named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
}

/// A global tensor of a committed sharded step (format v2): its type and
/// shape, and the shards that tile it without gap or overlap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of the whole tensor.
    pub shape: Vec<u64>,
    /// The shards, each a box of the global tensor stored row-major.
    pub shards: Vec<Shard>,
}

/// One stored region of a [`ShardedTensor`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// The rank whose part supplied these bytes (the lowest, for a region
    /// several ranks saved).
    pub rank: u32,
    /// Offset of the region in each dimension of the global tensor.
    pub offsets: Vec<u64>,
    /// Shape of the region.
    pub shape: Vec<u64>,
    /// Byte length; equals `dtype.size() * product(shape)`.
    pub len: u64,
    /// The region's bytes (row-major) are the concatenation of these slices.
    pub chunks: Vec<ChunkRef>,
}

/// Where a tensor shard sits in its global tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Shape of the full tensor across all ranks.
    pub global_shape: Vec<u64>,
    /// Offset of this shard in each dimension of the global tensor.
    pub offsets: Vec<u64>,
}

/// A tensor in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of the bytes stored here (the local shard).
    pub shape: Vec<u64>,
    /// Byte length; equals `dtype.size() * product(shape)`.
    pub len: u64,
    /// For a shard of a larger tensor, where it sits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    /// The tensor's bytes are the concatenation of these slices.
    pub chunks: Vec<ChunkRef>,
}

/// An opaque blob in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobEntry {
    /// Blob name.
    pub name: String,
    /// Byte length.
    pub len: u64,
    /// The blob's bytes are the concatenation of these slices.
    pub chunks: Vec<ChunkRef>,
}

/// A slice of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// The chunk's id (blake3 of its uncompressed bytes).
    pub id: ChunkId,
    /// Uncompressed length of the whole chunk.
    pub chunk_len: u64,
    /// Offset of the slice within the uncompressed chunk.
    pub offset: u64,
    /// Length of the slice.
    pub len: u64,
}

/// A tensor or blob seen uniformly: name plus chunk slices.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    /// Name of the tensor or blob.
    pub name: &'a str,
    /// Byte length.
    pub len: u64,
    /// Chunk slices holding the bytes.
    pub chunks: &'a [ChunkRef],
}

impl Manifest {
    /// Total bytes of all tensors (sharded ones at their global size) and
    /// blobs.
    pub fn logical_bytes(&self) -> u64 {
        let sharded: u64 = self
            .sharded
            .iter()
            .map(|t| byte_len(t.dtype, &t.shape).unwrap_or(0))
            .sum();
        self.entries().map(|e| e.len).sum::<u64>() + sharded
    }

    /// Tensors then blobs, uniformly.
    pub fn entries(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.tensors
            .iter()
            .map(|t| EntryRef {
                name: &t.name,
                len: t.len,
                chunks: &t.chunks,
            })
            .chain(self.blobs.iter().map(|b| EntryRef {
                name: &b.name,
                len: b.len,
                chunks: &b.chunks,
            }))
    }

    /// The shards of a record's sharded tensors, uniformly (each named by
    /// its tensor).
    pub fn shard_entries(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.sharded.iter().flat_map(|t| {
            t.shards.iter().map(move |s| EntryRef {
                name: &t.name,
                len: s.len,
                chunks: &s.chunks,
            })
        })
    }

    /// Tensors, blobs, then shards of sharded tensors: everything that
    /// references chunks.
    pub fn all_entries(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.entries().chain(self.shard_entries())
    }

    /// Whether this is a global record of a sharded step (format v2).
    pub fn is_sharded(&self) -> bool {
        self.world_size.is_some()
    }

    /// Number of tensors: plain tensors plus sharded (global) ones.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len() + self.sharded.len()
    }

    /// Distinct chunks referenced, with their uncompressed lengths.
    pub fn distinct_chunks(&self) -> Vec<(ChunkId, u64)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in self.all_entries() {
            for c in e.chunks {
                if seen.insert(c.id) {
                    out.push((c.id, c.chunk_len));
                }
            }
        }
        out
    }

    /// Check every invariant a reader relies on. `path` names the file in
    /// errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(Error::manifest(path, reason));
        if self.format_version != FORMAT_VERSION as u32
            && self.format_version != SHARDED_FORMAT_VERSION as u32
        {
            return Err(Error::UnsupportedVersion {
                what: "manifest",
                path: path.to_path_buf(),
                found: self.format_version as u64,
                supported: SHARDED_FORMAT_VERSION as u64,
            });
        }
        let v2 = self.part.is_some() || self.world_size.is_some() || !self.sharded.is_empty();
        if v2 != (self.format_version == SHARDED_FORMAT_VERSION as u32) {
            return bad(format!(
                "format_version {} does not match its fields (part, world_size and sharded are format 2 only)",
                self.format_version
            ));
        }
        if let Some(p) = &self.part {
            if p.world_size == 0 || p.rank >= p.world_size {
                return bad(format!(
                    "part rank {} of world size {}",
                    p.rank, p.world_size
                ));
            }
            if self.world_size.is_some() || !self.sharded.is_empty() {
                return bad("a part carries no world_size or sharded tensors".into());
            }
        }
        if let Some(w) = self.world_size {
            if w == 0 {
                return bad("world_size is 0".into());
            }
            if !self.tensors.is_empty() {
                return bad("a sharded record lists its tensors under sharded only".into());
            }
        } else if !self.sharded.is_empty() {
            return bad("sharded tensors without a world_size".into());
        }
        if let Err(e) = validate_run_name(&self.run) {
            return bad(e.to_string());
        }
        let mut names = HashSet::new();
        for t in &self.tensors {
            if let Err(e) = validate_entry_name("tensor", &t.name) {
                return bad(e.to_string());
            }
            if !names.insert(("t", t.name.as_str())) {
                return bad(format!("tensor {:?} appears twice", t.name));
            }
            match byte_len(t.dtype, &t.shape) {
                Some(n) if n == t.len => {}
                Some(n) => {
                    return bad(format!(
                        "tensor {:?}: shape {:?} of {} needs {n} bytes but len is {}",
                        t.name, t.shape, t.dtype, t.len
                    ))
                }
                None => {
                    return bad(format!(
                        "tensor {:?}: shape {:?} overflows",
                        t.name, t.shape
                    ))
                }
            }
            if let Some(s) = &t.shard {
                if s.global_shape.len() != t.shape.len() || s.offsets.len() != t.shape.len() {
                    return bad(format!("tensor {:?}: shard rank mismatch", t.name));
                }
                for i in 0..t.shape.len() {
                    if s.offsets[i]
                        .checked_add(t.shape[i])
                        .is_none_or(|end| end > s.global_shape[i])
                    {
                        return bad(format!(
                            "tensor {:?}: shard does not fit its global shape",
                            t.name
                        ));
                    }
                }
            }
        }
        if let Err(e) = crate::metrics::validate_metrics(&self.metrics) {
            return bad(e.to_string());
        }
        for t in &self.sharded {
            if let Err(e) = validate_entry_name("tensor", &t.name) {
                return bad(e.to_string());
            }
            if !names.insert(("t", t.name.as_str())) {
                return bad(format!("tensor {:?} appears twice", t.name));
            }
            if byte_len(t.dtype, &t.shape).is_none_or(|n| n > MAX_ENTRY_LEN) {
                return bad(format!(
                    "tensor {:?}: global shape {:?} overflows or exceeds the entry limit",
                    t.name, t.shape
                ));
            }
            for s in &t.shards {
                if s.shape.len() != t.shape.len() || s.offsets.len() != t.shape.len() {
                    return bad(format!("tensor {:?}: shard rank mismatch", t.name));
                }
                if self.world_size.is_some_and(|w| s.rank >= w) {
                    return bad(format!(
                        "tensor {:?}: shard of rank {} outside the world",
                        t.name, s.rank
                    ));
                }
                for i in 0..t.shape.len() {
                    if s.offsets[i]
                        .checked_add(s.shape[i])
                        .is_none_or(|end| end > t.shape[i])
                    {
                        return bad(format!(
                            "tensor {:?}: shard at {:?} of shape {:?} does not fit {:?}",
                            t.name, s.offsets, s.shape, t.shape
                        ));
                    }
                }
                if byte_len(t.dtype, &s.shape) != Some(s.len) {
                    return bad(format!(
                        "tensor {:?}: shard of shape {:?} of {} does not hold {} bytes",
                        t.name, s.shape, t.dtype, s.len
                    ));
                }
            }
        }
        for b in &self.blobs {
            if let Err(e) = validate_entry_name("blob", &b.name) {
                return bad(e.to_string());
            }
            if !names.insert(("b", b.name.as_str())) {
                return bad(format!("blob {:?} appears twice", b.name));
            }
        }
        let mut chunk_lens: std::collections::HashMap<ChunkId, u64> = Default::default();
        for e in self.all_entries() {
            for c in e.chunks {
                if *chunk_lens.entry(c.id).or_insert(c.chunk_len) != c.chunk_len {
                    return bad(format!("chunk {} is given two different lengths", c.id));
                }
            }
        }
        for e in self.all_entries() {
            if e.len > MAX_ENTRY_LEN {
                return bad(format!(
                    "{:?} declares {} bytes, over the {MAX_ENTRY_LEN}-byte limit",
                    e.name, e.len
                ));
            }
            let mut total: u64 = 0;
            for c in e.chunks {
                if c.chunk_len > MAX_CHUNK_LEN {
                    return bad(format!(
                        "{:?}: chunk {} declares {} bytes, over the {MAX_CHUNK_LEN}-byte limit",
                        e.name, c.id, c.chunk_len
                    ));
                }
                if c.offset
                    .checked_add(c.len)
                    .is_none_or(|end| end > c.chunk_len)
                {
                    return bad(format!(
                        "{:?}: slice {}+{} lies outside chunk {} of {} bytes",
                        e.name, c.offset, c.len, c.id, c.chunk_len
                    ));
                }
                total = match total.checked_add(c.len) {
                    Some(t) => t,
                    None => return bad(format!("{:?}: chunk lengths overflow", e.name)),
                };
            }
            if total != e.len {
                return bad(format!(
                    "{:?}: chunks hold {total} bytes but len is {}",
                    e.name, e.len
                ));
            }
        }
        Ok(())
    }
}

/// Serialize a manifest into the file form (envelope + JSON body).
pub fn encode_manifest_file(m: &Manifest) -> Vec<u8> {
    let body = serde_json::to_vec(m).unwrap_or_default();
    let mut out = encode_envelope(&body);
    out[8..10].copy_from_slice(&envelope_version(m).to_le_bytes());
    out
}

/// The envelope version of `m`: its `format_version` (1, or 2 for parts
/// and sharded records).
fn envelope_version(m: &Manifest) -> u16 {
    if m.format_version == SHARDED_FORMAT_VERSION as u32 {
        SHARDED_FORMAT_VERSION
    } else {
        FORMAT_VERSION
    }
}

/// Serialize a manifest into the file form, refusing a body over
/// [`MAX_MANIFEST_LEN`]: every writer commits through this, so nothing is
/// published that readers would refuse. The body is written once, after
/// room for the envelope.
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    let mut out = vec![0u8; ENVELOPE_LEN];
    serde_json::to_writer(&mut out, m).map_err(|e| Error::Internal(e.to_string()))?;
    let body_len = (out.len() - ENVELOPE_LEN) as u64;
    if body_len > MAX_MANIFEST_LEN {
        return Err(Error::invalid(
            format!("manifest of run {} step {}", m.run, m.step),
            format!(
                "its body would be {body_len} bytes, over the {MAX_MANIFEST_LEN}-byte limit readers accept (too many entries or too much metadata)"
            ),
        ));
    }
    let hash = blake3::hash(&out[ENVELOPE_LEN..]);
    out[0..8].copy_from_slice(&MANIFEST_MAGIC);
    out[8..10].copy_from_slice(&envelope_version(m).to_le_bytes());
    out[16..24].copy_from_slice(&body_len.to_le_bytes());
    out[24..56].copy_from_slice(hash.as_bytes());
    Ok(out)
}

/// Wrap an arbitrary body in a manifest envelope (for tools and tests that
/// need to build manifests by hand).
pub fn encode_envelope(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_LEN + body.len());
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse and validate a manifest file's bytes. `path` names it in errors.
pub fn decode_manifest_file(buf: &[u8], path: &Path) -> Result<Manifest> {
    let bad = |reason: String| Err(Error::manifest(path, reason));
    if buf.len() < ENVELOPE_LEN {
        return bad(format!(
            "truncated: {} bytes, the envelope alone is {ENVELOPE_LEN}",
            buf.len()
        ));
    }
    if buf[0..8] != MANIFEST_MAGIC {
        return bad("bad magic (not a cairn manifest)".into());
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != FORMAT_VERSION && version != SHARDED_FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "manifest",
            path: path.to_path_buf(),
            found: version as u64,
            supported: SHARDED_FORMAT_VERSION as u64,
        });
    }
    if buf[10..16] != [0u8; 6] {
        return bad("reserved envelope bytes are not zero".into());
    }
    let body_len = u64::from_le_bytes(buf[16..24].try_into().unwrap_or_default());
    if body_len > MAX_MANIFEST_LEN {
        return bad(format!(
            "declared body of {body_len} bytes exceeds the {MAX_MANIFEST_LEN}-byte limit"
        ));
    }
    let body = &buf[ENVELOPE_LEN..];
    if body.len() as u64 != body_len {
        return bad(format!(
            "body is {} bytes but the envelope declares {body_len} (truncated or extended)",
            body.len()
        ));
    }
    if blake3::hash(body).as_bytes()[..] != buf[24..56] {
        return bad("body hash mismatch (the manifest is corrupt)".into());
    }
    let m: Manifest = match serde_json::from_slice(body) {
        Ok(m) => m,
        Err(e) => return bad(format!("body does not parse: {e}")),
    };
    if m.format_version != version as u32 {
        return bad(format!(
            "envelope version {version} but body format_version {}",
            m.format_version
        ));
    }
    m.validate(path)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let id = ChunkId::of(b"abcd");
        Manifest {
            format_version: 1,
            run: "r".into(),
            step: 3,
            created_unix_ms: 0,
            chunk_size: 4,
            tensors: vec![TensorEntry {
                name: "w".into(),
                dtype: DType::F32,
                shape: vec![1],
                len: 4,
                shard: None,
                chunks: vec![ChunkRef {
                    id,
                    chunk_len: 4,
                    offset: 0,
                    len: 4,
                }],
            }],
            blobs: vec![],
            metadata: serde_json::json!({"lr": 0.1}),
            metrics: Default::default(),
            part: None,
            world_size: None,
            sharded: vec![],
            attempt: None,
        }
    }

    #[test]
    fn round_trip_and_flip_detection() {
        let m = sample();
        let p = Path::new("m");
        let enc = encode_manifest_file(&m);
        assert_eq!(encode_manifest(&m).unwrap(), enc);
        assert_eq!(decode_manifest_file(&enc, p).unwrap(), m);
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x01;
            assert!(decode_manifest_file(&bad, p).is_err(), "flip at {i}");
        }
        assert!(decode_manifest_file(&enc[..enc.len() - 1], p).is_err());
    }

    #[test]
    fn one_chunk_one_length() {
        let mut m = sample();
        let mut t = m.tensors[0].clone();
        t.name = "w2".into();
        t.shape = vec![1];
        t.chunks[0].chunk_len = 1000;
        t.chunks[0].offset = 996;
        m.tensors.push(t);
        assert!(m.validate(Path::new("m")).is_err());
    }

    #[test]
    fn absurd_shapes_are_rejected() {
        let mut m = sample();
        m.tensors[0].shape = vec![u64::MAX, 4];
        assert!(m.validate(Path::new("m")).is_err());
        let mut m = sample();
        m.tensors[0].shape = vec![1 << 40];
        m.tensors[0].len = 4 << 40;
        assert!(m.validate(Path::new("m")).is_err());
    }
}
