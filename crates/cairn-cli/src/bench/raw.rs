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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// The machine's CPU time counters, in ticks (10 ms on Linux): the first
/// line of `/proc/stat`, as user, nice, system, idle, iowait, irq, softirq
/// and steal. `None` where it cannot be read.
pub fn cpu_ticks() -> Option<[u64; 8]> {
    parse_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The eight counters of the `cpu` line that opens a `/proc/stat` text.
pub fn parse_cpu_ticks(stat: &str) -> Option<[u64; 8]> {
    let mut words = stat.lines().next()?.split_whitespace();
    if words.next()? != "cpu" {
        return None;
    }
    let mut ticks = [0u64; 8];
    for t in ticks.iter_mut() {
        *t = words.next()?.parse().ok()?;
    }
    Some(ticks)
}

/// Of the CPU time that was not idle between two readings of
/// [`cpu_ticks`], the share the hypervisor took (steal): time this
/// virtual machine's processors wanted to run and the host ran something
/// else, such as the emulation of this machine's own disk I/O. `None`
/// when no busy time was counted.
pub fn steal_share(before: &[u64; 8], after: &[u64; 8]) -> Option<f64> {
    let d: [u64; 8] = std::array::from_fn(|i| after[i].saturating_sub(before[i]));
    let busy = d[0] + d[1] + d[2] + d[5] + d[6] + d[7];
    (busy > 0).then(|| d[7] as f64 / busy as f64)
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

/// Block size, requests in flight and file layout of an O_DIRECT stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoShape {
    /// Bytes per request (a multiple of 4 KiB).
    pub block: usize,
    /// Requests in flight (one thread each).
    pub depth: usize,
    /// 0: one file holding all the bytes, laid out first. Otherwise the
    /// bytes are spread over files of this size, as cairn's chunks are:
    /// `depth` threads each create, write and `fdatasync` one file after
    /// another.
    pub file_bytes: usize,
}

impl IoShape {
    /// One file, `block`-byte requests, `depth` in flight.
    pub const fn one_file(block: usize, depth: usize) -> Self {
        IoShape {
            block,
            depth,
            file_bytes: 0,
        }
    }
}

/// The one-file shapes a limit sweep tries: small and large blocks,
/// shallow and deep queues. [`sweep`] adds the many-file shapes, whose
/// files are chunk-sized.
pub const SWEEP: [IoShape; 5] = [
    IoShape::one_file(1 << 20, 32),
    IoShape::one_file(4 << 20, 16),
    IoShape::one_file(8 << 20, 8),
    IoShape::one_file(16 << 20, 16),
    IoShape::one_file(16 << 20, 4),
];

/// Threads of the many-file shapes a limit sweep tries.
pub const SWEEP_FILE_THREADS: [usize; 3] = [4, 8, 16];

/// The many-file shapes for files of `file_bytes`: one request per file
/// up to 16 MiB, [`SWEEP_FILE_THREADS`] files at once.
pub fn file_shapes(file_bytes: usize) -> Vec<IoShape> {
    let file_bytes = file_bytes.div_ceil(4096).max(1) * 4096;
    SWEEP_FILE_THREADS
        .iter()
        .map(|&depth| IoShape {
            block: file_bytes.min(16 << 20),
            depth,
            file_bytes,
        })
        .collect()
}

/// Write `len` bytes with aligned O_DIRECT writes in `shape`, then make
/// them durable: what the disk takes at its best, with no copy of the
/// data on the way (each thread writes its own pre-filled buffer, as fio
/// does). One file (`file_bytes` 0): `path` is a file, laid out first
/// and fsynced at the end. Many files: `path` is a new directory of
/// files named by number, each `fdatasync`ed once it is written, then
/// the directory is fsynced.
pub fn limit_write(path: &Path, len: usize, shape: IoShape) -> Result<Duration> {
    if shape.file_bytes > 0 {
        return limit_write_files(path, len, shape);
    }
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
        scramble(buf, b as u64);
        f.write_all_at(&buf[..], (b * block) as u64)
            .map_err(|e| Error::io("write (O_DIRECT)", path, e))?;
    })?;
    f.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    let took = t.elapsed();
    f.set_len(len as u64)
        .map_err(|e| Error::io("truncate", path, e))?;
    Ok(took)
}

/// The many-file form of [`limit_write`]: `len` bytes as files of
/// `shape.file_bytes` (the last one shorter, padded to 4 KiB) in the new
/// directory `dir`, `shape.depth` threads each creating a file, writing
/// it in `shape.block` requests, `fdatasync`ing it and taking the next,
/// as cairn's chunk writers do; no file is laid out first.
fn limit_write_files(dir: &Path, len: usize, shape: IoShape) -> Result<Duration> {
    let file_bytes = shape.file_bytes.div_ceil(4096) * 4096;
    let block = shape.block.div_ceil(4096).max(1) * 4096;
    let files = len.div_ceil(file_bytes).max(1);
    let depth = shape.depth.clamp(1, files);
    let mut bufs: Vec<MmapMut> = (0..depth)
        .map(|_| prefaulted(block.min(file_bytes)))
        .collect::<Result<_>>()?;
    for (i, b) in bufs.iter_mut().enumerate() {
        fill_pattern(b, i as u64);
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    run_threads(bufs.iter_mut(), |buf| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= files {
            return Ok(());
        }
        let path = dir.join(i.to_string());
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| Error::io("create (O_DIRECT)", &path, e))?;
        let this = (len - i * file_bytes).min(file_bytes).div_ceil(4096) * 4096;
        let mut off = 0;
        while off < this {
            let n = buf.len().min(this - off);
            scramble(&mut buf[..n], ((i as u64) << 32) | (off / block) as u64);
            f.write_all_at(&buf[..n], off as u64)
                .map_err(|e| Error::io("write (O_DIRECT)", &path, e))?;
            off += n;
        }
        f.sync_data()
            .map_err(|e| Error::io("fdatasync", &path, e))?;
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))?;
    Ok(t.elapsed())
}

/// Read what [`limit_write`] wrote at `path` with aligned O_DIRECT reads
/// of `shape.block` bytes, `shape.depth` in flight: the disk's cold read
/// at its best (O_DIRECT bypasses the page cache). A directory is read
/// file by file, `shape.depth` files at once. Returns the time and the
/// bytes read.
pub fn limit_read(path: &Path, shape: IoShape) -> Result<(Duration, u64)> {
    if path.is_dir() {
        return limit_read_files(path, shape);
    }
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
        let n = read_block(&f, buf, (b * block) as u64, path)?;
        read.fetch_add(n, Ordering::Relaxed);
    })?;
    Ok((t.elapsed(), read.load(Ordering::Relaxed) as u64))
}

/// The many-file form of [`limit_read`]: each of `shape.depth` threads
/// opens the next file of `dir` with O_DIRECT and reads it whole in
/// `shape.block` requests.
fn limit_read_files(dir: &Path, shape: IoShape) -> Result<(Duration, u64)> {
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("list directory", dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io("list directory", dir, e))?;
    paths.sort();
    let block = shape.block.div_ceil(4096).max(1) * 4096;
    let depth = shape.depth.clamp(1, paths.len().max(1));
    let mut bufs: Vec<MmapMut> = (0..depth)
        .map(|_| prefaulted(block))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    let read = AtomicUsize::new(0);
    run_threads(bufs.iter_mut(), |buf| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(path) = paths.get(i) else {
            return Ok(());
        };
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| Error::io("open (O_DIRECT)", path, e))?;
        let mut off = 0u64;
        loop {
            let n = read_block(&f, buf, off, path)?;
            read.fetch_add(n, Ordering::Relaxed);
            if n < buf.len() {
                break;
            }
            off += n as u64;
        }
    })?;
    Ok((t.elapsed(), read.load(Ordering::Relaxed) as u64))
}

/// Fill `buf` from `off` of `f` (O_DIRECT), stopping early at the end of
/// the file. Returns the bytes read.
fn read_block(f: &File, buf: &mut [u8], off: u64, path: &Path) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f
            .read_at(&mut buf[got..], off + got as u64)
            .map_err(|e| Error::io("read (O_DIRECT)", path, e))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Remove what [`limit_write`] left at `path` (a file or a directory).
pub fn remove_limit(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// The files [`limit_write`] left at `path`, for evicting from the cache.
pub fn limit_files(path: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(path) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => vec![path.to_path_buf()],
    }
}

/// The best of one limit measure: its shape and seconds.
pub type Best = (IoShape, f64);

/// Try each shape of [`SWEEP`] and of [`file_shapes`]`(file_bytes)` on
/// `len` bytes at `path` (a file or a directory, removed at the end).
/// Returns, for writing and for reading, the fastest one-file shape and
/// the fastest many-file shape with their seconds, fastest first: which
/// layout wins can change with the size and from minute to minute, so
/// the bench measures both.
pub fn sweep(path: &Path, len: usize, file_bytes: usize) -> Result<(Vec<Best>, Vec<Best>)> {
    // Index 0: one file; 1: many files.
    let mut best_w: [Option<Best>; 2] = [None, None];
    let mut best_r: [Option<Best>; 2] = [None, None];
    let keep = |slot: &mut Option<Best>, shape: IoShape, t: f64| {
        if slot.is_none_or(|(_, b)| t < b) {
            *slot = Some((shape, t));
        }
    };
    for shape in SWEEP.into_iter().chain(file_shapes(file_bytes)) {
        let layout = usize::from(shape.file_bytes > 0);
        remove_limit(path);
        let w = limit_write(path, len, shape)?.as_secs_f64();
        keep(&mut best_w[layout], shape, w);
        let files = limit_files(path);
        let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
        drop_caches(&refs);
        let r = limit_read(path, shape)?.0.as_secs_f64();
        keep(&mut best_r[layout], shape, r);
    }
    remove_limit(path);
    let sorted = |b: [Option<Best>; 2]| {
        let mut v: Vec<Best> = b.into_iter().flatten().collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        v
    };
    Ok((sorted(best_w), sorted(best_r)))
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

/// A number no other write of this process uses, for [`scramble`].
static WRITE_TAG: AtomicU64 = AtomicU64::new(0);

/// Make the next write of `buf` unlike any other block the limit writes:
/// the first 8 bytes of each 4 KiB sector become a tag unique to this write
/// (from `block`, the write's place in its file, and a process-wide
/// count) mixed with the sector's index, as fio's `scramble_buffers` does.
/// Each limit thread writes its one pre-filled buffer again and again, and
/// storage that deduplicates or caches by content (a virtual machine's
/// disk on a deduplicating host) takes such repeated blocks faster than
/// the unique bytes of a checkpoint. On one virtual machine's disk, a
/// 1 GiB O_DIRECT file of one 16 MiB buffer repeated wrote in a median
/// 3.1 s against 3.7 s for unique random bytes (six alternating runs).
fn scramble(buf: &mut [u8], block: u64) {
    let tag = WRITE_TAG
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ block.rotate_left(17)
        ^ u64::from(std::process::id()) << 40;
    for (i, sector) in buf.chunks_mut(4096).enumerate() {
        let v = (tag ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes();
        let n = sector.len().min(v.len());
        sector[..n].copy_from_slice(&v[..n]);
    }
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
    fn steal_share_from_proc_stat() {
        let before =
            parse_cpu_ticks("cpu  100 5 20 900 3 1 2 10 0 0\ncpu0 50 2 10 450 1 0 1 5 0 0\n")
                .expect("a cpu line");
        assert_eq!(before, [100, 5, 20, 900, 3, 1, 2, 10]);
        // 20 ticks of user, 4 of system, 6 of steal, 70 idle.
        let after = parse_cpu_ticks("cpu  120 5 24 970 3 1 2 16 0 0\n").unwrap();
        let share = steal_share(&before, &after).unwrap();
        assert!((share - 6.0 / 30.0).abs() < 1e-12, "share {share}");
        // Nothing busy in between: no share to give.
        assert_eq!(steal_share(&after, &after), None);
        // Not a /proc/stat text.
        assert_eq!(parse_cpu_ticks("intr 1 2 3\n"), None);
        assert_eq!(parse_cpu_ticks("cpu 1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(parse_cpu_ticks("cpu 1 2 3\n"), None);
        // This machine's own counters parse.
        #[cfg(target_os = "linux")]
        assert!(cpu_ticks().is_some(), "/proc/stat unreadable");
    }

    #[test]
    fn scrambled_writes_repeat_no_sector() {
        // One thread's buffer written three times, as the limit does: no
        // 4 KiB sector may be written twice with the same bytes.
        let mut buf = vec![0u8; 64 << 10];
        fill_pattern(&mut buf, 3);
        let mut seen = std::collections::HashSet::new();
        for block in 0..3 {
            scramble(&mut buf, block);
            for sector in buf.chunks(4096) {
                assert!(seen.insert(sector.to_vec()), "sector repeated");
            }
        }
        // The same block number again (the same place in another file)
        // still gives new bytes.
        scramble(&mut buf, 0);
        for sector in buf.chunks(4096) {
            assert!(seen.insert(sector.to_vec()), "sector repeated");
        }
    }

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
