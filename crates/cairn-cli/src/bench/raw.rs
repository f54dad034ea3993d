//! Raw baselines measured in the same run as cairn: memcpy into
//! pre-faulted memory, a buffered write + fsync, an O_DIRECT write with
//! several requests in flight, a cold sequential read, and the disk's
//! limits: the best sequential O_DIRECT write and read found by a short
//! sweep of block size and queue depth.

use cairn::{Error, Result};
use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Block size for the raw write and read baselines.
pub const RAW_BLOCK: usize = 8 << 20;
/// Requests in flight for the O_DIRECT write.
pub const DIRECT_QUEUE_DEPTH: usize = 4;

/// Anonymous memory, populated so it never page-faults when used.
pub fn prefaulted(len: usize) -> Result<MmapMut> {
    let mut m = MmapOptions::new()
        .len(len.max(1))
        .populate()
        .map_anon()
        .map_err(|e| Error::io("map buffer", "<anonymous>", e))?;
    for p in m.chunks_mut(4096) {
        p[0] = 1;
    }
    Ok(m)
}

/// Copy `srcs` back to back into `dst` (pre-faulted), one thread.
pub fn memcpy(srcs: &[&[u8]], dst: &mut [u8]) -> Duration {
    let t = Instant::now();
    let mut off = 0;
    for s in srcs {
        dst[off..off + s.len()].copy_from_slice(s);
        off += s.len();
    }
    t.elapsed()
}

/// Write `srcs` back to back to a new file with buffered writes, then
/// fsync: what `torch.save` followed by a sync does.
pub fn buffered_write_fsync(path: &Path, srcs: &[&[u8]]) -> Result<Duration> {
    let t = Instant::now();
    let mut f = File::create(path).map_err(|e| Error::io("create", path, e))?;
    for s in srcs {
        for piece in s.chunks(RAW_BLOCK) {
            f.write_all(piece)
                .map_err(|e| Error::io("write", path, e))?;
        }
    }
    f.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    Ok(t.elapsed())
}

/// Write `srcs` back to back with O_DIRECT: aligned 8 MiB blocks, four in
/// flight, then fsync. The disk's best sequential write.
pub fn direct_write(path: &Path, srcs: &[&[u8]]) -> Result<Duration> {
    let total: usize = srcs.iter().map(|s| s.len()).sum();
    let blocks = total.div_ceil(RAW_BLOCK);
    let mut bufs: Vec<MmapMut> = (0..DIRECT_QUEUE_DEPTH)
        .map(|_| prefaulted(RAW_BLOCK))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| Error::io("create (O_DIRECT)", path, e))?;
    let next = AtomicUsize::new(0);
    let res: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = bufs
            .iter_mut()
            .map(|buf| {
                let (f, next) = (&f, &next);
                s.spawn(move || -> Result<()> {
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= blocks {
                            return Ok(());
                        }
                        let start = b * RAW_BLOCK;
                        let len = RAW_BLOCK.min(total - start);
                        gather(srcs, start, &mut buf[..len]);
                        let padded = len.div_ceil(4096) * 4096;
                        f.write_all_at(&buf[..padded], start as u64)
                            .map_err(|e| Error::io("write (O_DIRECT)", path, e))?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(Error::Internal("writer panicked".into())))
            })
            .collect()
    });
    for r in res {
        r?;
    }
    f.set_len(total as u64)
        .map_err(|e| Error::io("truncate", path, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    Ok(t.elapsed())
}

/// Block size and requests in flight of an O_DIRECT stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoShape {
    /// Bytes per request (a multiple of 4 KiB).
    pub block: usize,
    /// Requests in flight (one thread each).
    pub depth: usize,
}

/// The shapes a limit sweep tries: small and large blocks, shallow and
/// deep queues.
pub const SWEEP: [IoShape; 5] = [
    IoShape {
        block: 1 << 20,
        depth: 32,
    },
    IoShape {
        block: 4 << 20,
        depth: 16,
    },
    IoShape {
        block: 8 << 20,
        depth: 8,
    },
    IoShape {
        block: 16 << 20,
        depth: 16,
    },
    IoShape {
        block: 16 << 20,
        depth: 4,
    },
];

/// Write `len` bytes to a new file with aligned O_DIRECT writes of
/// `shape.block` bytes, `shape.depth` in flight, then fsync: what the disk
/// takes at its best, with no copy of the data on the way (each thread
/// writes its own pre-filled buffer, as fio does).
pub fn limit_write(path: &Path, len: usize, shape: IoShape) -> Result<Duration> {
    let block = shape.block.div_ceil(4096) * 4096;
    let blocks = len.div_ceil(block);
    let depth = shape.depth.clamp(1, blocks.max(1));
    let mut bufs: Vec<MmapMut> = (0..depth)
        .map(|_| prefaulted(block))
        .collect::<Result<_>>()?;
    for (i, b) in bufs.iter_mut().enumerate() {
        fill_pattern(b, i as u64);
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| Error::io("create (O_DIRECT)", path, e))?;
    // Lay the file out first, as fio does: writes inside the file's size
    // run in parallel, while extending writes to one file are serialized
    // by some file systems (ext4 takes the inode lock for them).
    {
        use std::os::fd::AsRawFd;
        let padded = (blocks * block) as libc::off_t;
        // SAFETY: plain syscall on a valid, open fd.
        let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, padded) };
        if r != 0 {
            f.set_len(padded as u64)
                .map_err(|e| Error::io("size", path, e))?;
        }
    }
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    run_threads(bufs.iter_mut(), |buf| loop {
        let b = next.fetch_add(1, Ordering::Relaxed);
        if b >= blocks {
            return Ok(());
        }
        f.write_all_at(&buf[..], (b * block) as u64)
            .map_err(|e| Error::io("write (O_DIRECT)", path, e))?;
    })?;
    f.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    let took = t.elapsed();
    f.set_len(len as u64)
        .map_err(|e| Error::io("truncate", path, e))?;
    Ok(took)
}

/// Read a whole file with aligned O_DIRECT reads of `shape.block` bytes,
/// `shape.depth` in flight: the disk's cold read at its best (O_DIRECT
/// bypasses the page cache).
pub fn limit_read(path: &Path, shape: IoShape) -> Result<(Duration, u64)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| Error::io("open (O_DIRECT)", path, e))?;
    let len = f.metadata().map_err(|e| Error::io("stat", path, e))?.len() as usize;
    let block = shape.block.div_ceil(4096) * 4096;
    let blocks = len.div_ceil(block);
    let depth = shape.depth.clamp(1, blocks.max(1));
    let mut bufs: Vec<MmapMut> = (0..depth)
        .map(|_| prefaulted(block))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    let read = AtomicUsize::new(0);
    run_threads(bufs.iter_mut(), |buf| loop {
        let b = next.fetch_add(1, Ordering::Relaxed);
        if b >= blocks {
            return Ok(());
        }
        let mut off = 0;
        while off < block {
            let n = f
                .read_at(&mut buf[off..], (b * block + off) as u64)
                .map_err(|e| Error::io("read (O_DIRECT)", path, e))?;
            if n == 0 {
                break;
            }
            off += n;
        }
        read.fetch_add(off, Ordering::Relaxed);
    })?;
    Ok((t.elapsed(), read.load(Ordering::Relaxed) as u64))
}

/// Try each shape of [`SWEEP`] on a `len`-byte file at `path` and return
/// the fastest for writing and for reading, with their seconds.
pub fn sweep(path: &Path, len: usize) -> Result<((IoShape, f64), (IoShape, f64))> {
    let mut best_w: Option<(IoShape, f64)> = None;
    let mut best_r: Option<(IoShape, f64)> = None;
    for shape in SWEEP {
        let w = limit_write(path, len, shape)?.as_secs_f64();
        if best_w.is_none_or(|(_, b)| w < b) {
            best_w = Some((shape, w));
        }
        drop_caches(&[path]);
        let r = limit_read(path, shape)?.0.as_secs_f64();
        if best_r.is_none_or(|(_, b)| r < b) {
            best_r = Some((shape, r));
        }
    }
    let _ = std::fs::remove_file(path);
    match (best_w, best_r) {
        (Some(w), Some(r)) => Ok((w, r)),
        _ => Err(Error::Internal("empty sweep".into())),
    }
}

/// Run `f` on one scoped thread per item; the first error wins.
fn run_threads<T: Send>(
    items: impl Iterator<Item = T>,
    f: impl Fn(T) -> Result<()> + Sync,
) -> Result<()> {
    let res: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = items.map(|it| s.spawn(|| f(it))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(Error::Internal("I/O thread panicked".into())))
            })
            .collect()
    });
    res.into_iter().collect()
}

/// Fill `buf` with bytes that neither compress nor repeat across buffers.
fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

/// Copy bytes `[start, start + out.len())` of the concatenation of `srcs`.
fn gather(srcs: &[&[u8]], start: usize, out: &mut [u8]) {
    let mut pos = 0;
    let mut filled = 0;
    for s in srcs {
        let end = pos + s.len();
        if end > start + filled && filled < out.len() {
            let from = start + filled - pos;
            let n = (s.len() - from).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&s[from..from + n]);
            filled += n;
        }
        pos = end;
        if filled == out.len() {
            break;
        }
    }
}

/// Read a file sequentially in 8 MiB blocks into a reused buffer.
pub fn sequential_read(path: &Path) -> Result<(Duration, u64)> {
    let mut buf = prefaulted(RAW_BLOCK)?;
    let t = Instant::now();
    let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut n = 0u64;
    loop {
        let r = f
            .read(&mut buf[..])
            .map_err(|e| Error::io("read", path, e))?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    Ok((t.elapsed(), n))
}

/// Empty the page cache so the next read comes from the disk. Uses
/// `/proc/sys/vm/drop_caches` when permitted (root); otherwise evicts each
/// of `files` with `posix_fadvise(DONTNEED)`. Returns the method used.
pub fn drop_caches(files: &[&Path]) -> &'static str {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", b"1").is_ok() {
        return "drop_caches";
    }
    for f in files {
        evict_from_cache(f);
    }
    "fadvise"
}

/// Drop a file's clean pages from the page cache. Best effort.
fn evict_from_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.sync_all();
        // SAFETY: plain syscall on a valid, open fd; failure only loses
        // the hint.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_spans_sources() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let c = [6u8, 7, 8, 9];
        let srcs: [&[u8]; 3] = [&a, &b, &c];
        let mut out = [0u8; 4];
        gather(&srcs, 2, &mut out);
        assert_eq!(out, [3, 4, 5, 6]);
        let mut out = [0u8; 2];
        gather(&srcs, 7, &mut out);
        assert_eq!(out, [8, 9]);
    }
}
