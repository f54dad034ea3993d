//! Chunk payload encoding: raw, zstd, and zstd over byte-grouped floats.
//!
//! Byte-grouping (a "shuffle" filter) rewrites `n` elements of width `w` as
//! `w` planes: all first bytes, then all second bytes, and so on; trailing
//! bytes that do not fill an element are appended unchanged. Exponent bytes
//! of floats then sit together and compress far better.

use crate::chunk_id::ChunkId;
use crate::error::{Error, Result};
use crate::format::chunk::{ChunkHeader, Codec, HEADER_LEN};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Payloads that do not shrink below this fraction of their input are
/// stored raw.
pub const MIN_SAVING: f64 = 0.97;

/// How a tier encodes the chunks it writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum CodecChoice {
    /// Store uncompressed bytes (cheapest on CPU).
    #[default]
    Raw,
    /// zstd at `level`, with byte-grouping for float tensors; falls back to
    /// raw when a chunk does not shrink by at least 3%.
    Zstd {
        /// zstd compression level (1 is fast).
        level: i32,
    },
}

impl std::str::FromStr for CodecChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(CodecChoice::Raw),
            "zstd" => Ok(CodecChoice::Zstd { level: 1 }),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (1..=19).contains(&level) => Ok(CodecChoice::Zstd { level }),
                _ => Err(Error::invalid(
                    "codec",
                    format!("{s:?}: expected raw, zstd or zstd:LEVEL with LEVEL in 1..=19"),
                )),
            },
        }
    }
}

impl std::fmt::Display for CodecChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecChoice::Raw => write!(f, "raw"),
            CodecChoice::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// Reusable compression state for one worker thread: the zstd context and
/// scratch buffers live as long as the worker.
pub struct Encoder {
    ctx: Option<zstd::bulk::Compressor<'static>>,
    grouped: Vec<u8>,
    out: Vec<u8>,
}

impl Encoder {
    /// A new encoder for `choice`.
    pub fn new(choice: CodecChoice) -> Result<Self> {
        let ctx = match choice {
            CodecChoice::Raw => None,
            CodecChoice::Zstd { level } => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Internal(format!("zstd init: {e}")))?,
            ),
        };
        Ok(Encoder {
            ctx,
            grouped: Vec::new(),
            out: Vec::new(),
        })
    }

    /// Encode `data`; `width` is the element width to byte-group by (0 for
    /// none). Returns the codec, filter and the payload, which is either
    /// `data` itself or a slice of the encoder's output buffer.
    pub fn encode<'a>(&'a mut self, data: &'a [u8], width: u8) -> (Codec, u8, &'a [u8]) {
        let Some(ctx) = self.ctx.as_mut() else {
            return (Codec::Raw, 0, data);
        };
        let width = if matches!(width, 2 | 4 | 8) && data.len() >= width as usize * 64 {
            width
        } else {
            0
        };
        let input: &[u8] = if width > 0 {
            self.grouped.resize(data.len(), 0);
            byte_group(data, width as usize, &mut self.grouped);
            &self.grouped
        } else {
            data
        };
        let bound = zstd::zstd_safe::compress_bound(input.len());
        self.out.clear();
        self.out.reserve(bound);
        match ctx.compress_to_buffer(input, &mut self.out) {
            Ok(n) if (n as f64) < data.len() as f64 * MIN_SAVING => {
                (Codec::Zstd, width, &self.out[..n])
            }
            _ => (Codec::Raw, 0, data),
        }
    }
}

impl Encoder {
    /// Compressed size of `data` without the raw fallback (for measuring
    /// ratios); `data.len()` for a raw encoder.
    pub fn encode_forced(&mut self, data: &[u8], width: u8) -> usize {
        let Some(ctx) = self.ctx.as_mut() else {
            return data.len();
        };
        let input: &[u8] = if matches!(width, 2 | 4 | 8) {
            self.grouped.resize(data.len(), 0);
            byte_group(data, width as usize, &mut self.grouped);
            &self.grouped
        } else {
            data
        };
        self.out.clear();
        self.out
            .reserve(zstd::zstd_safe::compress_bound(input.len()));
        ctx.compress_to_buffer(input, &mut self.out)
            .unwrap_or(data.len())
    }
}

impl Encoder {
    /// Encode `data`, whose element width is unknown (a chunk that may hold
    /// tensors of several dtypes), choosing the byte-grouping width by
    /// compressing a few samples of it grouped by 2, 4 and not at all: the
    /// smallest wins. Returns what [`Encoder::encode`] returns.
    pub fn encode_auto<'a>(&'a mut self, data: &'a [u8]) -> (Codec, u8, &'a [u8]) {
        if self.ctx.is_none() {
            return (Codec::Raw, 0, data);
        }
        let width = self.pick_width(data);
        self.encode(data, width)
    }

    /// The byte-grouping width (0, 2 or 4) under which samples of `data`
    /// compress best.
    fn pick_width(&mut self, data: &[u8]) -> u8 {
        const SAMPLE: usize = 64 << 10;
        const SAMPLES: usize = 4;
        if data.len() < 4 * 64 {
            return 0;
        }
        let mut sample = Vec::with_capacity(SAMPLE * SAMPLES);
        if data.len() <= SAMPLE * SAMPLES * 2 {
            sample.extend_from_slice(&data[..data.len().min(SAMPLE * SAMPLES)]);
        } else {
            let stride = (data.len() - SAMPLE) / (SAMPLES - 1);
            for i in 0..SAMPLES {
                // 8-byte aligned starts keep the element phase of the data.
                let start = (i * stride) & !7;
                sample.extend_from_slice(&data[start..start + SAMPLE]);
            }
        }
        let mut best = (usize::MAX, 0u8);
        for width in [0u8, 2, 4] {
            let n = self.encode_forced(&sample, width);
            if n < best.0 {
                best = (n, width);
            }
        }
        best.1
    }
}

/// Re-encode a chunk object held raw (header and uncompressed payload)
/// with `encoder`, choosing the byte-grouping width itself
/// ([`Encoder::encode_auto`]). Returns the new object (64-byte header, the
/// compressed payload) when compression pays (see [`MIN_SAVING`]); `None`
/// when the object is already compressed, is not a raw chunk object, or
/// does not shrink enough, so the caller keeps the object as it is. The
/// name of the chunk, the hash of its uncompressed bytes, is unchanged.
pub fn compress_chunk_object(object: &[u8], encoder: &mut Encoder) -> Option<Vec<u8>> {
    let header = ChunkHeader::decode(object, Path::new("")).ok()?;
    if header.codec != Codec::Raw {
        return None;
    }
    let start = header.payload_offset as usize;
    let payload = object.get(start..)?;
    if payload.len() as u64 != header.uncompressed_len {
        return None;
    }
    let (codec, filter, out) = encoder.encode_auto(payload);
    if codec == Codec::Raw {
        return None;
    }
    let h = ChunkHeader {
        codec,
        filter,
        uncompressed_len: header.uncompressed_len,
        stored_len: out.len() as u64,
        payload_offset: HEADER_LEN as u32,
        id: header.id,
    };
    let mut v = Vec::with_capacity(HEADER_LEN + out.len());
    v.extend_from_slice(&h.encode());
    v.extend_from_slice(out);
    Some(v)
}

/// Encoders shared by the threads of one writer, at most `limit` in use at
/// once: the number of chunks compressed in parallel. A thread that finds
/// every one in use waits.
pub struct EncoderPool {
    choice: CodecChoice,
    limit: usize,
    state: std::sync::Mutex<(usize, Vec<Encoder>)>,
    freed: std::sync::Condvar,
}

impl std::fmt::Debug for EncoderPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncoderPool({:?}, {})", self.choice, self.limit)
    }
}

impl EncoderPool {
    /// A pool of encoders for `choice`, `limit` (at least one) in use at
    /// once.
    pub fn new(choice: CodecChoice, limit: usize) -> Self {
        EncoderPool {
            choice,
            limit: limit.max(1),
            state: std::sync::Mutex::new((0, Vec::new())),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Run `f` with an encoder of the pool, waiting while `limit` are in
    /// use.
    pub fn with<T>(&self, f: impl FnOnce(&mut Encoder) -> T) -> Result<T> {
        let mut enc = {
            let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
            while g.0 >= self.limit {
                g = self.freed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.0 += 1;
            g.1.pop()
        };
        let encoder = match enc.take() {
            Some(e) => Ok(e),
            None => Encoder::new(self.choice),
        };
        let (out, back) = match encoder {
            Ok(mut e) => (Ok(f(&mut e)), Some(e)),
            Err(e) => (Err(e), None),
        };
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if let Some(e) = back {
            g.1.push(e);
        }
        drop(g);
        self.freed.notify_one();
        out
    }
}

/// Reusable decompression state for one reader thread.
pub struct Decoder {
    ctx: zstd::bulk::Decompressor<'static>,
    grouped: Vec<u8>,
}

impl Decoder {
    /// A new decoder.
    pub fn new() -> Result<Self> {
        Ok(Decoder {
            ctx: zstd::bulk::Decompressor::new()
                .map_err(|e| Error::Internal(format!("zstd init: {e}")))?,
            grouped: Vec::new(),
        })
    }

    /// Decode `payload` into `out`, which must be exactly the uncompressed
    /// length. `path` names the chunk in errors.
    pub fn decode(
        &mut self,
        codec: Codec,
        filter: u8,
        payload: &[u8],
        out: &mut [u8],
        path: &Path,
    ) -> Result<()> {
        let corrupt = |reason: String| Error::CorruptChunk {
            chunk: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            reason,
            tensors: Vec::new(),
        };
        match codec {
            Codec::Raw => {
                if payload.len() != out.len() {
                    return Err(corrupt("raw payload length mismatch".into()));
                }
                out.copy_from_slice(payload);
                Ok(())
            }
            Codec::Zstd => {
                let target: &mut [u8] = if filter == 0 {
                    out
                } else {
                    self.grouped.resize(out.len(), 0);
                    &mut self.grouped
                };
                let n = self
                    .ctx
                    .decompress_to_buffer(payload, target)
                    .map_err(|e| corrupt(format!("zstd payload does not decode: {e}")))?;
                if n != target.len() {
                    return Err(corrupt(format!(
                        "zstd payload decodes to {n} bytes, header says {}",
                        target.len()
                    )));
                }
                if filter != 0 {
                    byte_ungroup(&self.grouped, filter as usize, out);
                }
                Ok(())
            }
        }
    }
}

/// Byte-group `src` by element width `w` into `dst` (same length).
pub fn byte_group(src: &[u8], w: usize, dst: &mut [u8]) {
    let n = src.len() / w;
    for b in 0..w {
        let plane = &mut dst[b * n..(b + 1) * n];
        for (i, d) in plane.iter_mut().enumerate() {
            *d = src[i * w + b];
        }
    }
    dst[n * w..].copy_from_slice(&src[n * w..]);
}

/// Invert [`byte_group`].
pub fn byte_ungroup(src: &[u8], w: usize, dst: &mut [u8]) {
    let n = dst.len() / w;
    for b in 0..w {
        let plane = &src[b * n..(b + 1) * n];
        for (i, &s) in plane.iter().enumerate() {
            dst[i * w + b] = s;
        }
    }
    let tail = n * w;
    dst[tail..].copy_from_slice(&src[tail..]);
}

/// Validate a whole chunk object held in memory (header, padding, payload)
/// and decode it into `out` (exactly the uncompressed length), verifying
/// the blake3 hash. `path` names the object in errors.
pub fn decode_chunk_object(
    bytes: &[u8],
    id: &ChunkId,
    out: &mut [u8],
    decoder: &mut Decoder,
    path: &Path,
) -> Result<()> {
    let header = ChunkHeader::decode(bytes, path)?;
    header.check(id, out.len() as u64, bytes.len() as u64, path)?;
    let corrupt = |reason: String| Error::CorruptChunk {
        chunk: id.to_hex(),
        path: path.to_path_buf(),
        reason,
        tensors: Vec::new(),
    };
    let start = header.payload_offset as usize;
    if bytes[HEADER_LEN..start].iter().any(|&b| b != 0) {
        return Err(corrupt("non-zero bytes between header and payload".into()));
    }
    decoder.decode(header.codec, header.filter, &bytes[start..], out, path)?;
    let got = ChunkId::of(out);
    if got != *id {
        return Err(corrupt(format!(
            "content hash mismatch (bytes hash to {got})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ungroup_inverse() {
        for len in [0usize, 1, 3, 4, 5, 17, 1000, 1003] {
            for w in [2usize, 4, 8] {
                let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let mut g = vec![0; len];
                let mut back = vec![0; len];
                byte_group(&src, w, &mut g);
                byte_ungroup(&g, w, &mut back);
                assert_eq!(src, back, "len {len} w {w}");
            }
        }
    }

    #[test]
    fn zstd_round_trip_and_raw_fallback() {
        let mut enc = Encoder::new(CodecChoice::Zstd { level: 1 }).unwrap();
        let mut dec = Decoder::new().unwrap();
        let floats: Vec<u8> = (0..4096u32)
            .flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes())
            .collect();
        let (codec, filter, payload) = enc.encode(&floats, 4);
        assert_eq!((codec, filter), (Codec::Zstd, 4));
        let payload = payload.to_vec();
        let mut out = vec![0; floats.len()];
        dec.decode(codec, filter, &payload, &mut out, Path::new("c"))
            .unwrap();
        assert_eq!(out, floats);
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new()
            .update(b"noise")
            .finalize_xof()
            .fill(&mut noise);
        let (codec, _, _) = enc.encode(&noise, 0);
        assert_eq!(codec, Codec::Raw);
    }
}
