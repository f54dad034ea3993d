//! Durable file primitives: fsync'd writes, atomic publication, directory
//! fsyncs, and bounded reads of small files. Every file cairn commits goes
//! through here; the `_on` forms go through a filesystem seam
//! ([`super::fs::Fs`]), which the local store uses.

use super::fs::{Fs, RealFs};
use crate::error::{Error, Result};
use crate::failpoint::hit;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file name for a temporary file that no other writer (thread or
/// process) will pick: `<stem>.<pid>.<counter>.tmp`.
pub fn unique_tmp_name(stem: &str) -> String {
    format!(
        "{stem}.{}.{}.tmp",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The directory holding `path`: its parent, or `.` for a bare relative
/// name such as `model.safetensors` (whose [`Path::parent`] is empty) and
/// for a root (which has none).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Read a small file whole: at most `limit` bytes, through a bounded read.
/// A missing file is [`Error::NotFound`]; a file that is not a regular file
/// (a FIFO, a device such as `/dev/zero`, a directory) or is larger than
/// `limit` is [`Error::InvalidInput`] naming it.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                what: path.display().to_string(),
            },
            _ => Error::io("open", path, e),
        })?;
    let meta = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    let too_large = || {
        Error::invalid(
            format!("file {}", path.display()),
            format!("larger than {limit} bytes"),
        )
    };
    if !meta.is_file() {
        return Err(Error::invalid(
            format!("file {}", path.display()),
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

/// fsync a directory so the entries created or renamed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    fsync_dir_on(&RealFs, dir)
}

/// [`fsync_dir`] through `fs`.
pub fn fsync_dir_on(fs: &dyn Fs, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// [`fsync_dir_on`] for each of `dirs`, up to `threads` at once. Each
/// directory fsync writes the directory's changed blocks and then waits
/// for a cache flush of the device; side by side they share the waits.
/// Returns after every one has succeeded, or with the first error.
pub fn fsync_dirs_on(fs: &dyn Fs, dirs: &[PathBuf], threads: usize) -> Result<()> {
    crate::parallel::try_for_each(dirs.iter(), threads, || Ok(()), |_, d| fsync_dir_on(fs, d))
}

/// Create `dir` and any missing parents, fsyncing each parent that gained
/// an entry so the new directories survive a crash.
pub fn create_dir_all_durable(dir: &Path) -> Result<()> {
    create_dir_all_durable_on(&RealFs, dir)
}

/// [`create_dir_all_durable`] through `fs`.
pub fn create_dir_all_durable_on(fs: &dyn Fs, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.is_dir() {
            break;
        }
        missing.push(d.to_path_buf());
        // A bare relative name's parent is "", the current directory.
        cur = d.parent().filter(|p| !p.as_os_str().is_empty());
    }
    for d in missing.iter().rev() {
        match fs.create_dir(d) {
            Ok(()) => {}
            // Made meanwhile by another process, or something else is
            // there: a file would otherwise surface later as an error
            // about a path inside it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::io(
                    "create directory",
                    d,
                    std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "exists and is not a directory",
                    ),
                ))
            }
            Err(e) => return Err(Error::io("create directory", d, e)),
        }
        fsync_dir_on(fs, parent_dir(d))?;
    }
    Ok(())
}

/// Create `dir`, a directory below `base`, and its missing parents, and
/// make the entry of every directory between `base` and `dir` durable:
/// each one's parent is fsynced whether this call created it or an
/// earlier call did, which may have failed before its fsync (a new
/// directory that a later call merely finds is not yet durable). `base`
/// is created first if missing ([`create_dir_all_durable_on`]).
pub fn create_dir_chain_durable_on(fs: &dyn Fs, base: &Path, dir: &Path) -> Result<()> {
    let Ok(rel) = dir.strip_prefix(base) else {
        return create_dir_all_durable_on(fs, dir);
    };
    create_dir_all_durable_on(fs, base)?;
    let mut cur = base.to_path_buf();
    for c in rel.components() {
        let next = cur.join(c);
        match fs.create_dir(&next) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create directory", &next, e)),
        }
        fsync_dir_on(fs, &cur)?;
        cur = next;
    }
    Ok(())
}

/// Create a new file for writing; fails if it exists.
pub fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::io("create file", path, e))
}

/// A file being written in a directory before it is published under its
/// final name. Where the filesystem allows it (Linux `O_TMPFILE`, with
/// `/proc` mounted), the file has no name until [`PendingFile::publish`],
/// so a writer killed part-way leaves nothing in the directory; elsewhere
/// it is a named temporary file (`<stem>.<pid>.<n>.tmp`), removed when the
/// `PendingFile` is dropped unpublished.
pub struct PendingFile {
    file: File,
    dir: PathBuf,
    stem: String,
    /// The temporary name, for a file made with one; `None` while unnamed.
    name: Option<PathBuf>,
}

impl PendingFile {
    /// Make a pending file in `dir`, unnamed where possible. An error names
    /// `dir` (missing, not writable, ...), not a temporary name in it.
    pub fn create_in(dir: &Path, stem: &str) -> Result<PendingFile> {
        if Path::new("/proc/self/fd").is_dir() {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o644)
                .open(dir)
            {
                Ok(file) => {
                    return Ok(PendingFile {
                        file,
                        dir: dir.to_path_buf(),
                        stem: stem.to_string(),
                        name: None,
                    })
                }
                // No unnamed files here (filesystem or kernel): named below.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                    ) => {}
                Err(e) => return Err(Error::io("create file in directory", dir, e)),
            }
        }
        PendingFile::named_in(dir, stem)
    }

    /// A pending file made under a temporary name in `dir` (the next name
    /// when one is taken, e.g. left by a killed writer of the same pid).
    fn named_in(dir: &Path, stem: &str) -> Result<PendingFile> {
        let mut tries = 0;
        loop {
            let tmp = dir.join(unique_tmp_name(stem));
            match create_new(&tmp) {
                Ok(file) => {
                    return Ok(PendingFile {
                        file,
                        dir: dir.to_path_buf(),
                        stem: stem.to_string(),
                        name: Some(tmp),
                    })
                }
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists && tries < 64 =>
                {
                    tries += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The open file, to write through (`&File` implements `Write`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Give the file the name `dest` (in the same directory), replacing a
    /// file there, then fsync the file and the directory. The caller syncs
    /// the file's data first. An unnamed file is first linked under a
    /// temporary name (a link cannot replace a file), which a failed rename
    /// removes; a writer killed between the two leaves that name.
    pub fn publish(mut self, dest: &Path) -> Result<()> {
        let tmp = match self.name.take() {
            Some(tmp) => tmp,
            None => self.link_unnamed(dest)?,
        };
        if let Err(e) = std::fs::rename(&tmp, dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("rename", dest, e));
        }
        // The data is already on disk; this makes the new link's inode
        // change durable on filesystems that do not log it with the
        // directory.
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync", dest, e))?;
        fsync_dir(&self.dir)
    }

    /// Link the unnamed file under a fresh temporary name in its directory
    /// and return that name: through `/proc/self/fd` (no privilege needed),
    /// else `AT_EMPTY_PATH` (which needs `CAP_DAC_READ_SEARCH`); the next
    /// name when one is taken. Errors name `dest`.
    fn link_unnamed(&self, dest: &Path) -> Result<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::AsRawFd;
        let fd = self.file.as_raw_fd();
        let proc_path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut tries = 0;
        loop {
            let tmp = self.dir.join(unique_tmp_name(&self.stem));
            let to = std::ffi::CString::new(tmp.as_os_str().as_bytes())
                .map_err(|_| Error::invalid(dest.display().to_string(), "contains a NUL byte"))?;
            // SAFETY: the paths are valid NUL-terminated strings that outlive
            // the calls, and `fd` is this file's open descriptor.
            let mut rc = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            let mut err = std::io::Error::last_os_error();
            if rc != 0 && err.kind() != std::io::ErrorKind::AlreadyExists {
                // SAFETY: as above; "" with AT_EMPTY_PATH names `fd` itself.
                rc = unsafe {
                    libc::linkat(
                        fd,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        to.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                };
                if rc != 0 {
                    err = std::io::Error::last_os_error();
                }
            }
            if rc == 0 {
                return Ok(tmp);
            }
            if err.kind() != std::io::ErrorKind::AlreadyExists || tries >= 64 {
                return Err(Error::io(
                    "link the written file before renaming it to",
                    dest,
                    err,
                ));
            }
            tries += 1;
        }
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(tmp) = &self.name {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Write `bytes` to a fresh temporary file in `tmp_dir` and fsync it, all
/// through `fs`. Returns the temporary path.
pub fn write_tmp_synced_on(
    fs: &dyn Fs,
    tmp_dir: &Path,
    stem: &str,
    bytes: &[u8],
) -> Result<PathBuf> {
    let tmp = tmp_dir.join(unique_tmp_name(stem));
    let mut f = fs
        .create_new(&tmp)
        .map_err(|e| Error::io("create file", &tmp, e))?;
    let res = f
        .write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))
        .and_then(|()| f.sync_data().map_err(|e| Error::io("fsync", &tmp, e)));
    if let Err(e) = res {
        drop(f);
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Atomically publish `bytes` at `dest` through `fs`: temp file, fsync,
/// then a hard link that fails if `dest` exists (`Ok(false)`), then an
/// fsync of `dest`'s directory. A reader sees either no file or the whole
/// file; if that last fsync fails, the link is removed again and the
/// error returned.
pub fn publish_new_on(fs: &dyn Fs, tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<bool> {
    let point = |name: &str| hit(name).map_err(|e| Error::io("fail point", dest, e));
    point("publish.before_tmp")?;
    let tmp = write_tmp_synced_on(fs, tmp_dir, "publish", bytes)?;
    point("publish.after_tmp_sync")?;
    point("publish.before_link")?;
    let linked = fs.hard_link(&tmp, dest);
    let _ = fs.remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(Error::io("link into place", dest, e)),
    }
    point("publish.after_link")?;
    if let Err(e) = fsync_dir_on(fs, parent_dir(dest)) {
        // Not durable: take the file back, so that a failure leaves no
        // file behind for a reader to take as published.
        let _ = fs.remove_file(dest);
        return Err(e);
    }
    point("publish.after_dir_sync")?;
    Ok(true)
}

/// Atomically replace `dest` with `bytes` (temp file, fsync, rename, fsync
/// of the directory).
pub fn publish_replace(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    publish_replace_on(&RealFs, tmp_dir, dest, bytes)
}

/// [`publish_replace`] through `fs`.
pub fn publish_replace_on(fs: &dyn Fs, tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_tmp_synced_on(fs, tmp_dir, "publish", bytes)?;
    if let Err(e) = fs.rename(&tmp, dest) {
        let _ = fs.remove_file(&tmp);
        return Err(Error::io("rename into place", dest, e));
    }
    fsync_dir_on(fs, parent_dir(dest))?;
    Ok(())
}

/// The names in `dir`, sorted (for tests).
#[cfg(test)]
pub(crate) fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::sorted_names as names;

    #[test]
    fn a_pending_file_in_a_missing_directory_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nodir");
        let e = PendingFile::create_in(&missing, ".x").err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains(&format!("{}: ", missing.display())), "{msg}");
        assert!(!msg.contains("/.x."), "{msg}");
    }

    #[test]
    fn a_pending_file_replaces_on_publish_and_leaves_nothing_when_dropped() {
        use std::io::Write;
        let made: [fn(&Path, &str) -> Result<PendingFile>; 2] =
            [PendingFile::create_in, PendingFile::named_in];
        for make in made {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("out.bin");
            std::fs::write(&dest, b"old").unwrap();
            let p = make(dir.path(), ".x").unwrap();
            p.file().write_all(b"new bytes").unwrap();
            p.file().sync_all().unwrap();
            p.publish(&dest).unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), b"new bytes");
            assert_eq!(names(dir.path()), ["out.bin"]);
            let p = make(dir.path(), ".x").unwrap();
            p.file().write_all(b"abandoned").unwrap();
            drop(p);
            assert_eq!(names(dir.path()), ["out.bin"]);
            assert_eq!(std::fs::read(&dest).unwrap(), b"new bytes");
        }
    }

    #[test]
    fn fsync_dirs_syncs_each_and_names_the_one_that_fails() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs: Vec<PathBuf> = (0..20).map(|i| root.path().join(format!("d{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        fsync_dirs_on(&RealFs, &dirs, 8).unwrap();
        let missing = root.path().join("missing");
        dirs.insert(7, missing.clone());
        match fsync_dirs_on(&RealFs, &dirs, 8) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!(
                "expected an I/O error naming {}, got {other:?}",
                missing.display()
            ),
        }
    }
}
