//! The filesystem seam under the local tier: the few calls that change
//! what is on disk or must reach it durably (create, write and fsync a
//! file, rename, hard-link, remove, create and fsync a directory) and the
//! read of chunk files. [`RealFs`] is the operating system and the
//! default; tests swap in a simulated disk (`cairn::testing::SimDisk`)
//! that drops everything not made durable at a simulated power loss, or
//! that fails writes with `ENOSPC` and reads with `EIO`.
//!
//! Everything else a store does (listing directories, examining entries,
//! reading manifests) reads the real directory directly.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{Result, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The durable operations of the local tier.
pub trait Fs: Send + Sync + std::fmt::Debug {
    /// Create a new file for writing (mode 0644); fails if it exists.
    fn create_new(&self, path: &Path) -> Result<Box<dyn FsFile>>;
    /// Rename `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    /// Hard-link `from` at `to`; fails with `AlreadyExists` if `to` exists.
    fn hard_link(&self, from: &Path, to: &Path) -> Result<()>;
    /// Remove a file.
    fn remove_file(&self, path: &Path) -> Result<()>;
    /// Remove a directory and everything below it.
    fn remove_dir_all(&self, path: &Path) -> Result<()>;
    /// Create one directory.
    fn create_dir(&self, path: &Path) -> Result<()>;
    /// fsync a directory: the entries created, renamed or removed in it
    /// become durable.
    fn sync_dir(&self, dir: &Path) -> Result<()>;
    /// Open a file for positioned reads (`O_NONBLOCK`, so that a FIFO in
    /// its place does not block; `O_NOFOLLOW`, so that a symbolic link in
    /// its place fails with `ELOOP` instead of being followed).
    fn open_read(&self, path: &Path) -> Result<Box<dyn FsReadFile>>;
    /// Make everything written to the file system holding `path` durable,
    /// file data and directory entries alike (`syncfs`). `None` where there
    /// is no such call: callers then sync file by file.
    fn sync_filesystem(&self, _path: &Path) -> Option<Result<()>> {
        None
    }
    /// Whether the save pipeline may write raw chunks with `O_DIRECT` on
    /// its own file descriptors, past this seam.
    fn allows_direct_io(&self) -> bool {
        true
    }
}

/// A file being written through an [`Fs`].
pub trait FsFile: Send {
    /// Append all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> Result<()>;
    /// fsync the file's data (and the metadata needed to read it back).
    fn sync_data(&mut self) -> Result<()>;
    /// Ask for writeback to start now, without waiting (a hint).
    fn start_writeback(&self) {}
}

/// A file opened for reading through an [`Fs`].
pub trait FsReadFile: Send + Sync {
    /// Fill `buf` from offset `off`.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// The open file's metadata.
    fn metadata(&self) -> Result<Metadata>;
    /// Fill `buf` from offset `off` bypassing the page cache (`O_DIRECT`),
    /// straight into `buf`: the caller guarantees that `buf`'s address,
    /// its length and `off` are multiples of 4096. `None` where the file
    /// or its file system cannot (the caller then reads normally).
    fn read_direct_at(&self, _buf: &mut [u8], _off: u64) -> Option<Result<()>> {
        None
    }
}

/// The operating system's file system: every call is the plain syscall.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

/// A real open file, for writing or reading.
#[derive(Debug)]
pub struct RealFile(pub File);

impl FsFile for RealFile {
    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.0.write_all(buf)
    }
    fn sync_data(&mut self) -> Result<()> {
        self.0.sync_data()
    }
    fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a valid fd; failure only loses the hint.
        unsafe {
            libc::sync_file_range(self.0.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

impl FsReadFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        FileExt::read_exact_at(&self.0, buf, off)
    }
    fn metadata(&self) -> Result<Metadata> {
        self.0.metadata()
    }
    fn read_direct_at(&self, buf: &mut [u8], off: u64) -> Option<Result<()>> {
        use std::os::fd::AsRawFd;
        let fd = self.0.as_raw_fd();
        // SAFETY: fcntl on a valid fd owned by self; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // The flag is set on this open file description only, and cleared
        // again below; a file system without O_DIRECT refuses it here.
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
            return None;
        }
        let res = FileExt::read_exact_at(&self.0, buf, off);
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        match res {
            // Refused only at the first read on some file systems.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            r => Some(r),
        }
    }
}

impl Fs for RealFs {
    fn create_new(&self, path: &Path) -> Result<Box<dyn FsFile>> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn create_dir(&self, path: &Path) -> Result<()> {
        std::fs::create_dir(path)
    }
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        File::open(dir)?.sync_all()
    }
    fn sync_filesystem(&self, path: &Path) -> Option<Result<()>> {
        syncfs_commits(path).then(|| syncfs(path))
    }
    fn open_read(&self, path: &Path) -> Result<Box<dyn FsReadFile>> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
}

/// Whether a `syncfs` of the file system holding `path` is known to commit
/// its metadata, so that it makes renames durable as directory fsyncs do:
/// ext2/3/4, XFS and btrfs. Elsewhere (a FUSE file system without a sync
/// of its own, for one, returns success having sent nothing to its server)
/// callers fsync each directory instead.
pub fn syncfs_commits(path: &Path) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded, so it filled the buffer.
    // `f_type`'s width differs between targets.
    #[allow(clippy::unnecessary_cast)]
    let kind = unsafe { st.assume_init() }.f_type as i64;
    matches!(kind, EXT4 | XFS | BTRFS)
}

/// `syncfs` of the file system holding `path`: its journal committed (or
/// its dirty inodes written) and the disk's cache flushed, so every name
/// and every write on it is durable. It also writes back whatever else is
/// dirty there.
pub fn syncfs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    // SAFETY: plain syscall on a valid fd owned by `f`.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::syncfs_commits;
    use std::path::Path;

    #[test]
    fn syncfs_is_trusted_only_where_it_commits_metadata() {
        // procfs and a missing path: no; the directory fsyncs stay.
        assert!(!syncfs_commits(Path::new("/proc")));
        assert!(!syncfs_commits(Path::new("/no/such/cairn/dir")));
    }
}
