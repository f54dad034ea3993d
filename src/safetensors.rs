//! Reading and writing the safetensors format, for `cairn export` and
//! `cairn import`.
//!
//! A safetensors file is an 8-byte little-endian header length `N`, a JSON
//! header of `N` bytes (`{"name": {"dtype": "F32", "shape": [..],
//! "data_offsets": [begin, end]}, "__metadata__": {"k": "v"}}`), then the
//! tensor bytes, offsets relative to the end of the header.

use crate::dtype::{byte_len, DType};
use crate::error::{Error, Result};
use crate::layout::validate_entry_name;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Largest header accepted (100 MB, as the reference implementation).
pub const MAX_HEADER: u64 = 100_000_000;

/// The safetensors spelling of a dtype.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F8E4M3 => "F8_E4M3",
        DType::F8E5M2 => "F8_E5M2",
        other => other.name(),
    }
}

/// Parse a safetensors dtype name.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "F8_E4M3" => Ok(DType::F8E4M3),
        "F8_E5M2" => Ok(DType::F8E5M2),
        other => other.parse(),
    }
}

/// One tensor in a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Byte range relative to the start of the data section.
    pub begin: u64,
    /// End of the byte range.
    pub end: u64,
}

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub struct StHeader {
    /// Tensors in data order.
    pub tensors: Vec<StTensor>,
    /// `__metadata__` string pairs.
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section in the file.
    pub data_start: u64,
}

/// Parse and validate the header of a safetensors file whose total length
/// is `file_len`; `bytes` must hold at least the header.
pub fn parse_header(bytes: &[u8], file_len: u64, path: &Path) -> Result<StHeader> {
    let bad =
        |reason: String| Error::invalid(format!("safetensors file {}", path.display()), reason);
    if bytes.len() < 8 {
        return Err(bad("shorter than the 8-byte header length".into()));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
    if n > MAX_HEADER || 8 + n > file_len || 8 + n > bytes.len() as u64 {
        return Err(bad(format!(
            "header length {n} is impossible for a {file_len}-byte file"
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize])
        .map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = file_len - 8 - n;
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            for (k, val) in entry.as_object().into_iter().flatten() {
                metadata.insert(k.clone(), val.as_str().unwrap_or_default().to_string());
            }
            continue;
        }
        validate_entry_name("tensor", name)?;
        let dtype = parse_dtype(entry["dtype"].as_str().unwrap_or(""))
            .map_err(|_| bad(format!("{name}: unknown dtype {}", entry["dtype"])))?;
        let shape: Vec<u64> = entry["shape"]
            .as_array()
            .ok_or_else(|| bad(format!("{name}: no shape")))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| bad(format!("{name}: bad shape"))))
            .collect::<Result<_>>()?;
        let offs = entry["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(format!("{name}: no data_offsets")))?;
        let (begin, end) = (
            offs[0]
                .as_u64()
                .ok_or_else(|| bad(format!("{name}: bad offsets")))?,
            offs[1]
                .as_u64()
                .ok_or_else(|| bad(format!("{name}: bad offsets")))?,
        );
        let want =
            byte_len(dtype, &shape).ok_or_else(|| bad(format!("{name}: shape overflows")))?;
        if begin > end || end > data_len || end - begin != want {
            return Err(bad(format!(
                "{name}: offsets {begin}..{end} do not hold {want} bytes inside {data_len}"
            )));
        }
        tensors.push(StTensor {
            name: name.clone(),
            dtype,
            shape,
            begin,
            end,
        });
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    for w in tensors.windows(2) {
        if w[1].begin < w[0].end {
            return Err(bad(format!("{} and {} overlap", w[0].name, w[1].name)));
        }
    }
    Ok(StHeader {
        tensors,
        metadata,
        data_start: 8 + n,
    })
}

/// Write a safetensors file atomically (temp file, fsync, rename). `fill`
/// is called once per tensor, in order, to write its bytes.
pub fn write_file(
    path: &Path,
    tensors: &[(String, DType, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut off = 0u64;
    for (name, dtype, shape) in tensors {
        let n = byte_len(*dtype, shape).ok_or_else(|| Error::invalid("shape", "overflow"))?;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let dir = crate::local::durable::parent_dir(path);
    let tmp = dir.join(crate::local::durable::unique_tmp_name(".cairn-export"));
    let res = (|| -> Result<()> {
        let f = crate::local::durable::create_new(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        let io = |e| Error::io("write safetensors", &tmp, e);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        for i in 0..tensors.len() {
            fill(i, &mut w)?;
        }
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename safetensors", path, e))?;
        crate::local::durable::fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map(|()| 8 + h.len() as u64 + off)
}

/// Durably write (or replace) a sharded model's `model.safetensors.index.json`
/// at `path`: a temporary file in `dir`, fsync, rename, fsync of `dir`.
pub fn publish_index(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    crate::local::durable::publish_replace(dir, path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let ts = vec![
            ("w".to_string(), DType::BF16, vec![2, 3]),
            ("b".to_string(), DType::F8E4M3, vec![4]),
        ];
        let data: Vec<Vec<u8>> = vec![(0..12).collect(), vec![9; 4]];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let len = write_file(&p, &ts, &meta, |i, w| {
            w.write_all(&data[i]).map_err(|e| Error::io("w", "x", e))
        })
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, len);
        let h = parse_header(&bytes, len, &p).unwrap();
        assert_eq!(h.metadata, meta);
        assert_eq!(h.tensors[0].name, "w");
        assert_eq!(h.tensors[1].dtype, DType::F8E4M3);
        let s = h.data_start as usize;
        assert_eq!(
            &bytes[s + h.tensors[1].begin as usize..s + h.tensors[1].end as usize],
            &[9; 4]
        );
        assert!(parse_header(&bytes[..20], 20, &p).is_err());
    }
}
