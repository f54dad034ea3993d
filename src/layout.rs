//! The store's directory layout and the rules for names that reach it.
//!
//! ```text
//! <root>/cairn-store.json                    store marker (format version)
//! <root>/chunks/<2 hex>/<64 hex>             content-addressed chunk files
//! <root>/runs/<run>/<step:020>/manifest.cairn  one committed checkpoint
//! <root>/tmp/                                files being written
//! ```
//!
//! Run names become directory names, so they are restricted to a safe
//! alphabet. Tensor and blob names never become paths, but they are still
//! checked so that tools exporting them to files cannot be steered outside
//! their target.

use crate::chunk_id::ChunkId;
use crate::error::{Error, Result};
use crate::local::fs::{Fs, RealFs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the store marker.
pub const STORE_MARKER: &str = "cairn-store.json";
/// File name of a committed manifest inside its step directory.
pub const MANIFEST_FILE: &str = "manifest.cairn";
/// Directory of a step's part manifests (format v2).
pub const PARTS_DIR: &str = "parts";

/// File name of a part manifest: `<rank>-of-<world>.<64 hex>.cairn`, the
/// hex being the blake3 hash of the file's bytes, so that two attempts of
/// one rank never collide unless they are identical.
pub fn part_file_name(rank: u32, world_size: u32, bytes: &[u8]) -> String {
    format!(
        "{rank}-of-{world_size}.{}.cairn",
        blake3::hash(bytes).to_hex()
    )
}

/// `(rank, world_size)` of a part manifest's file name, if it is one.
pub fn parse_part_file_name(name: &str) -> Option<(u32, u32)> {
    let stem = name.strip_suffix(".cairn")?;
    let (ranks, hash) = stem.split_once('.')?;
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let (rank, world) = ranks.split_once("-of-")?;
    let canon = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    };
    if !canon(rank) || !canon(world) {
        return None;
    }
    let (rank, world): (u32, u32) = (rank.parse().ok()?, world.parse().ok()?);
    (rank < world).then_some((rank, world))
}
/// Directory of the chunk fan-out directories.
pub const CHUNKS_DIR: &str = "chunks";
/// Directory of the runs.
pub const RUNS_DIR: &str = "runs";

/// The names a store keeps at its root, local or remote: the marker, the
/// chunks, the runs, files being written, the collection lock, and the
/// remote layout's packs and grace record. Nothing else may be written
/// there under these names.
pub const STORE_ENTRIES: &[&str] = &[
    STORE_MARKER,
    CHUNKS_DIR,
    RUNS_DIR,
    "tmp",
    crate::local::lock::GC_LOCK,
    crate::remote::pack::PACKS_DIR,
    crate::remote::grace::GRACE_RECORD,
];

/// The path of chunk `id` below a store's root, as components:
/// `chunks/<2 hex>/<64 hex>`. Local directories and object-store prefixes
/// both build their paths from these.
pub fn chunk_components(id: &ChunkId) -> [String; 3] {
    [CHUNKS_DIR.to_string(), id.prefix(), id.to_hex()]
}

/// The path of a checkpoint's manifest below a store's root, as
/// components: `runs/<run>/<step:020>/manifest.cairn`.
pub fn manifest_components(run: &str, step: u64) -> [String; 4] {
    [
        RUNS_DIR.to_string(),
        run.to_string(),
        step_dir_name(step),
        MANIFEST_FILE.to_string(),
    ]
}
/// Longest run name accepted.
pub const MAX_RUN_NAME: usize = 128;
/// Longest tensor or blob name accepted, in bytes.
pub const MAX_ENTRY_NAME: usize = 1024;

/// Paths of everything in a store rooted at one directory, and the
/// filesystem seam its files are written through.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    fs: Arc<dyn Fs>,
}

impl Layout {
    /// A layout rooted at `root`, on the real file system.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_fs(root, Arc::new(RealFs))
    }

    /// A layout rooted at `root` whose files are written through `fs`.
    pub fn with_fs(root: impl Into<PathBuf>, fs: Arc<dyn Fs>) -> Self {
        Layout {
            root: root.into(),
            fs,
        }
    }

    /// The filesystem seam the store's files are written through.
    pub fn fs(&self) -> &dyn Fs {
        &*self.fs
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store marker file.
    pub fn marker(&self) -> PathBuf {
        self.root.join(STORE_MARKER)
    }

    /// Directory holding all chunk fan-out directories.
    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join(CHUNKS_DIR)
    }

    /// Fan-out directory for chunks whose id starts with `prefix`.
    pub fn chunk_dir_for_prefix(&self, prefix: u8) -> PathBuf {
        self.chunks_dir().join(format!("{prefix:02x}"))
    }

    /// The file holding chunk `id`.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        chunk_components(id)
            .iter()
            .fold(self.root.clone(), |p, c| p.join(c))
    }

    /// Directory holding all runs.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join(RUNS_DIR)
    }

    /// Directory of one run. The name must have passed [`validate_run_name`].
    pub fn run_dir(&self, run: &str) -> PathBuf {
        self.runs_dir().join(run)
    }

    /// Directory of one step of a run.
    pub fn step_dir(&self, run: &str, step: u64) -> PathBuf {
        self.run_dir(run).join(step_dir_name(step))
    }

    /// The committed manifest of a checkpoint.
    pub fn manifest_path(&self, run: &str, step: u64) -> PathBuf {
        manifest_components(run, step)
            .iter()
            .fold(self.root.clone(), |p, c| p.join(c))
    }

    /// Directory of the part manifests of a sharded step.
    pub fn parts_dir(&self, run: &str, step: u64) -> PathBuf {
        self.step_dir(run, step).join(PARTS_DIR)
    }

    /// Directory for files being written.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Check the store-owned directories `chunks/`, `runs/` and `tmp/`,
    /// and with `run` (and `step`) that run's (and step's) directory, with
    /// [`check_store_dir`]: none may be a symbolic link. Absent ones pass.
    pub fn check_dirs(&self, run: Option<&str>, step: Option<u64>) -> Result<()> {
        for d in [self.chunks_dir(), self.runs_dir(), self.tmp_dir()] {
            check_store_dir(&d)?;
        }
        if let Some(run) = run {
            validate_run_name(run)?;
            check_store_dir(&self.run_dir(run))?;
            if let Some(step) = step {
                check_store_dir(&self.step_dir(run, step))?;
            }
        }
        Ok(())
    }
}

/// Examine a directory the store owns (`chunks/`, `chunks/<xx>/`, `runs/`,
/// `runs/<run>/`, `runs/<run>/<step>/`, `tmp/`) without following a
/// symbolic link: `Ok(true)` if it is a directory, `Ok(false)` if it does
/// not exist, and an error naming it if it is a symbolic link, something
/// other than a directory, or cannot be examined. cairn never reads,
/// creates, renames or deletes through such a link; only the store root
/// itself may be one.
pub fn check_store_dir(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::io(
            "open store directory",
            path,
            std::io::Error::other("is a symbolic link; cairn never follows links inside a store"),
        )),
        Ok(m) if m.is_dir() => Ok(true),
        Ok(_) => Err(Error::io(
            "open store directory",
            path,
            std::io::Error::other("is not a directory"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("examine store directory", path, e)),
    }
}

/// Names of the run directories under a store's `runs/` (valid names
/// only; none if absent).
pub fn list_run_dirs(root: &Path) -> Result<Vec<String>> {
    let dir = root.join(RUNS_DIR);
    if !check_store_dir(&dir)? {
        return Ok(Vec::new());
    }
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("list directory", &dir, e))?;
    // A stray file (a README, notes) is no run; a link is kept, so that
    // reading it reports that cairn does not follow links.
    let mut out: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_run_name(n).is_ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Directory name of a step: zero-padded to 20 digits so listings sort.
pub fn step_dir_name(step: u64) -> String {
    format!("{step:020}")
}

/// Parse a step directory name written by [`step_dir_name`].
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    if name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok()
    } else {
        None
    }
}

/// Check a run name: 1..=128 characters from `[A-Za-z0-9._-]`, not starting
/// with a dot.
pub fn validate_run_name(run: &str) -> Result<()> {
    let bad = |reason: &str| Err(Error::invalid("run name", format!("{run:?}: {reason}")));
    if run.is_empty() {
        return bad("must not be empty");
    }
    if run.len() > MAX_RUN_NAME {
        return bad("longer than 128 bytes");
    }
    if run.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !run
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Check a tensor or blob name: non-empty UTF-8 of at most 1024 bytes with
/// no control characters (NUL included), no backslash, not absolute, and no
/// empty, `.` or `..` path component. Names like `model.layers.0.attn/q`
/// are fine.
pub fn validate_entry_name(kind: &str, name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::invalid(
            format!("{kind} name"),
            format!("{name:?}: {reason}"),
        ))
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_ENTRY_NAME {
        return bad("longer than 1024 bytes");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("contains a control character (NUL included)");
    }
    if name.contains('\\') {
        return bad("contains a backslash");
    }
    if name.starts_with('/') {
        return bad("is an absolute path");
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, '.' or '..' path component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names() {
        assert!(validate_run_name("llama-7b_run.3").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\0b",
            ".hidden",
            &"x".repeat(129),
        ] {
            assert!(validate_run_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entry_names() {
        assert!(validate_entry_name("tensor", "model.layers.0.attn/q.weight").is_ok());
        for bad in [
            "", "../../x", "/abs", "a\0b", "a//b", "a/./b", "a/..", "a\\b", "x/",
        ] {
            assert!(validate_entry_name("tensor", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn step_names_sort() {
        assert_eq!(step_dir_name(42), "00000000000000000042");
        assert_eq!(
            parse_step_dir_name(&step_dir_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_step_dir_name("42"), None);
    }
}
