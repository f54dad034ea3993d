//! The collection lock of a local store: saves and copies into the store
//! hold it shared until they commit; a local garbage collection holds it
//! exclusive for its whole mark-and-sweep.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// File name of the collection lock in a store's root.
pub const GC_LOCK: &str = "gc.lock";

/// A held `flock` on a store's collection lock; released on drop.
#[derive(Debug)]
pub struct GcLock {
    _file: File,
}

/// The error for a collection lock that is not a regular file.
fn not_a_file(path: &Path) -> Error {
    Error::invalid(
        format!("collection lock {}", path.display()),
        "not a regular file",
    )
}

impl GcLock {
    fn take(root: &Path, exclusive: bool) -> Result<Self> {
        let path = root.join(GC_LOCK);
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO put in its place must not wait for a
        // reader; its type is checked on the open descriptor.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                // A FIFO without a reader.
                Some(libc::ENXIO) => not_a_file(&path),
                _ => Error::io("open gc lock", &path, e),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat gc lock", &path, e))?;
        if !meta.is_file() {
            return Err(not_a_file(&path));
        }
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a valid fd.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(GcLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("lock gc lock", &path, e));
            }
        }
    }

    /// The shared lock a save holds while in flight.
    pub fn shared(root: &Path) -> Result<Self> {
        Self::take(root, false)
    }

    /// The exclusive lock a collection holds.
    pub fn exclusive(root: &Path) -> Result<Self> {
        Self::take(root, true)
    }
}
