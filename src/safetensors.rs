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
use std::path::{Path, PathBuf};

/// The header key safetensors reserves for the file's string metadata;
/// no tensor may take it.
pub const METADATA_KEY: &str = "__metadata__";

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
///
/// As strict as the reference implementation: the header is at most
/// [`MAX_HEADER`] bytes of one JSON object; a key (tensor name or
/// `__metadata__`, or a key inside it) may appear only once; `__metadata__`
/// maps strings to strings; every tensor has a known dtype, a shape and
/// `data_offsets` holding exactly its bytes; and the tensors tile the data
/// section with no gap, overlap or trailing byte. The header is parsed
/// straight into [`StTensor`]s, without a JSON tree, so memory stays a small
/// multiple of the header size.
pub fn parse_header(bytes: &[u8], file_len: u64, path: &Path) -> Result<StHeader> {
    let bad =
        |reason: String| Error::invalid(format!("safetensors file {}", path.display()), reason);
    if bytes.len() < 8 {
        return Err(bad("shorter than the 8-byte header length".into()));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
    if n > MAX_HEADER {
        return Err(bad(format!(
            "header length {n} is over the {MAX_HEADER}-byte limit"
        )));
    }
    if 8 + n > file_len || 8 + n > bytes.len() as u64 {
        return Err(bad(format!(
            "header length {n} is impossible for a {file_len}-byte file"
        )));
    }
    let text = &bytes[8..8 + n as usize];
    if text.first() != Some(&b'{') {
        return Err(bad("header is not a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let raw = serde::de::Deserializer::deserialize_map(&mut de, RawHeaderVisitor)
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| bad(format!("header: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut tensors = Vec::with_capacity(raw.tensors.len());
    for (name, info) in raw.tensors {
        validate_entry_name("tensor", &name)
            .map_err(|e| bad(format!("tensor name {name:?}: {e}")))?;
        let dtype = parse_dtype(&info.dtype)
            .map_err(|_| bad(format!("{name}: unknown dtype {:?}", info.dtype)))?;
        let (begin, end) = info.data_offsets;
        let want =
            byte_len(dtype, &info.shape).ok_or_else(|| bad(format!("{name}: shape overflows")))?;
        if begin > end || end > data_len || end - begin != want {
            return Err(bad(format!(
                "{name}: offsets {begin}..{end} do not hold {want} bytes inside {data_len}"
            )));
        }
        tensors.push(StTensor {
            name,
            dtype,
            shape: info.shape,
            begin,
            end,
        });
    }
    {
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("duplicate tensor name {:?}", w[0])));
        }
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut at = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if t.begin < at {
            return Err(bad(format!(
                "{} and {} overlap",
                tensors[i - 1].name,
                t.name
            )));
        }
        if t.begin > at {
            return Err(bad(format!(
                "gap of {} bytes at offset {at} before tensor {}",
                t.begin - at,
                t.name
            )));
        }
        at = t.end;
    }
    if at != data_len {
        return Err(bad(format!(
            "gap of {} bytes after the last tensor: the data section is {data_len} bytes",
            data_len - at
        )));
    }
    Ok(StHeader {
        tensors,
        metadata: raw.metadata,
        data_start: 8 + n,
    })
}

/// A tensor's header entry as written.
#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

struct RawHeader {
    tensors: Vec<(String, RawInfo)>,
    metadata: BTreeMap<String, String>,
}

struct RawHeaderVisitor;

impl<'de> serde::de::Visitor<'de> for RawHeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<RawHeader, A::Error> {
        use serde::de::Error as _;
        let mut tensors = Vec::new();
        let mut metadata = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                if metadata.is_some() {
                    return Err(A::Error::custom("duplicate key \"__metadata__\""));
                }
                metadata = Some(map.next_value::<StringMap>()?.0);
            } else {
                let info = map.next_value::<RawInfo>()?;
                tensors.push((key, info));
            }
        }
        Ok(RawHeader {
            tensors,
            metadata: metadata.unwrap_or_default(),
        })
    }
}

/// `__metadata__`: string keys, string values, each key once.
struct StringMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for StringMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("__metadata__ as an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StringMap, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v = map.next_value::<MetaString>()?.0;
                    if out.contains_key(&k) {
                        return Err(A::Error::custom(format!(
                            "duplicate key {k:?} in __metadata__"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(StringMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A `__metadata__` value: a string and nothing else.
struct MetaString(String);

impl<'de> serde::Deserialize<'de> for MetaString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MetaString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string (__metadata__ values must be strings)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<MetaString, E> {
                Ok(MetaString(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(
                self,
                v: String,
            ) -> std::result::Result<MetaString, E> {
                Ok(MetaString(v))
            }
        }
        d.deserialize_string(V)
    }
}

/// Check that `path` may be replaced by an output file: it is absent or a
/// regular file. Device nodes, FIFOs, sockets, directories and symbolic
/// links are refused, never renamed over.
pub fn check_output_path(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "a directory"
            } else if ft.is_symlink() {
                "a symbolic link"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_char_device() || ft.is_block_device() {
                "a device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a special file"
            };
            Err(Error::invalid(
                format!("output {}", path.display()),
                format!("is {kind}, not a regular file; refusing to replace it"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("stat output", path, e)),
    }
}

/// Open `path` for reading only if it is a regular file. The open itself
/// cannot block (`O_NONBLOCK`, which regular files ignore), and the type is
/// checked on the opened descriptor, so a FIFO or device put in place of
/// the file is refused instead of hanging or being read.
pub fn open_regular(path: &Path, what: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                what: format!("{what} {}", path.display()),
            },
            _ => Error::io("open", path, e),
        })?;
    let m = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !m.is_file() {
        return Err(Error::invalid(
            format!("{what} {}", path.display()),
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Write a safetensors file atomically: written unnamed in the target's
/// directory where the filesystem allows (else under a temporary name),
/// fsynced, then renamed into place, so a writer killed part-way leaves no
/// file behind where it can. `fill`
/// is called once per tensor, in order, to write its bytes. Only an absent
/// path or a regular file is replaced (see [`check_output_path`]).
pub fn write_file(
    path: &Path,
    tensors: &[(String, DType, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
    fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let written = write_pending(path, tensors, metadata, fill)?;
    let len = written.len;
    written.publish()?;
    Ok(len)
}

/// A safetensors file written and fsynced but not yet at its name (see
/// [`write_pending`]). Dropped unpublished, it leaves nothing behind where
/// the filesystem has unnamed files (else its temporary name is removed).
pub struct PendingExport {
    pending: crate::local::durable::PendingFile,
    path: PathBuf,
    len: u64,
}

impl PendingExport {
    /// The path it is published at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no bytes (never: the header is always written).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rename it into place (replacing a regular file there), then fsync
    /// the file and its directory.
    pub fn publish(self) -> Result<()> {
        check_output_path(&self.path)?;
        self.pending.publish(&self.path)
    }
}

/// [`write_file`] without the last step: the file is written and fsynced
/// in `path`'s directory and returned unpublished, so that a caller writing
/// several (a sharded export) publishes them only once all are written.
pub fn write_pending(
    path: &Path,
    tensors: &[(String, DType, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<PendingExport> {
    if let Some((name, ..)) = tensors.iter().find(|(n, ..)| n == METADATA_KEY) {
        return Err(Error::invalid(
            format!("tensor {name:?}"),
            "safetensors reserves that name for the file's metadata",
        ));
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            METADATA_KEY.into(),
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
    check_output_path(path)?;
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let dir = crate::local::durable::parent_dir(path);
    let pending = crate::local::durable::PendingFile::create_in(dir, ".cairn-export")?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, pending.file());
    let io = |e| Error::io("write safetensors", path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for i in 0..tensors.len() {
        fill(i, &mut w)?;
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    Ok(PendingExport {
        pending,
        path: path.to_path_buf(),
        len: 8 + h.len() as u64 + off,
    })
}

/// Remove an earlier export's file at `path` and fsync its directory, so
/// the removal survives a crash before what replaces it is published.
pub fn remove_durably(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|e| Error::io("remove older export", path, e))?;
    crate::local::durable::fsync_dir(crate::local::durable::parent_dir(path))
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
