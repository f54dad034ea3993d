//! The DRAM staging pool: a fixed budget of pre-faulted memory that tensor
//! bytes are copied into before the background pipeline hashes, encodes and
//! writes them.
//!
//! The pool is one anonymous mapping, populated when the store opens (a page
//! fault on fresh memory costs several times a memcpy), and handed out as a
//! ring: allocations are carved in order from just past the newest one,
//! wrapping to the start. A released buffer's space is free at once, even
//! while older buffers are still held: the pipeline's writers finish chunks
//! out of order, and a caller waiting for room gets it as soon as any chunk
//! is written, not only when the oldest is. Where the tail has no room, the
//! first free gap that fits is used. When no gap fits,
//! [`StagingPool::alloc`] blocks until the pipeline releases space: this is
//! the back-pressure that keeps memory inside the budget whatever the
//! checkpoint size.

use crate::error::{Error, Result};
use memmap2::{MmapMut, MmapOptions};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

/// Allocations are rounded up to this many bytes (a page, so buffers are
/// aligned for direct I/O).
pub const ALIGN: usize = 4096;

/// A fixed-size pool of reusable, pre-faulted staging memory.
#[derive(Clone)]
pub struct StagingPool {
    inner: Arc<Inner>,
}

struct Inner {
    // Owns the memory `base` points into.
    _map: MmapMut,
    base: *mut u8,
    cap: usize,
    ring: Mutex<Ring>,
    freed: Condvar,
}

// SAFETY: the mapping is only reached through `StagingBuf`s, whose ranges
// the ring keeps disjoint; the ring itself sits behind a mutex. Moving the
// owner to another thread moves no aliasing access with it.
unsafe impl Send for Inner {}
// SAFETY: as for Send: shared references reach the ring only through its
// mutex, and the mapping only through disjoint `StagingBuf` ranges.
unsafe impl Sync for Inner {}

struct Ring {
    cap: usize,
    /// Just past the newest allocation: where the next one goes if it fits.
    tail: usize,
    /// Live allocations, start -> end, disjoint.
    live: BTreeMap<usize, usize>,
    in_use: usize,
    high_water: usize,
}

impl Ring {
    /// Where an allocation of `len` bytes can start now, if anywhere: at
    /// the tail if the gap there holds it, else the first gap that does.
    fn place(&self, len: usize) -> Option<usize> {
        let tail = self.tail;
        let tail_free = self
            .live
            .range(..=tail)
            .next_back()
            .is_none_or(|(_, &end)| end <= tail);
        let next_start = self
            .live
            .range(tail..)
            .next()
            .map_or(self.cap, |(&start, _)| start);
        if tail_free && next_start - tail >= len {
            return Some(tail);
        }
        let mut pos = 0;
        for (&start, &end) in &self.live {
            if start - pos >= len {
                return Some(pos);
            }
            pos = end;
        }
        (self.cap - pos >= len).then_some(pos)
    }

    fn release(&mut self, start: usize) {
        if let Some(end) = self.live.remove(&start) {
            self.in_use -= end - start;
        }
        if self.live.is_empty() {
            self.tail = 0;
        }
    }
}

impl StagingPool {
    /// Map and pre-fault a pool of `budget` bytes (rounded down to [`ALIGN`]).
    pub fn new(budget: usize) -> Result<Self> {
        let cap = budget / ALIGN * ALIGN;
        if cap == 0 {
            return Err(Error::invalid(
                "staging budget",
                format!("{budget} bytes is less than one page"),
            ));
        }
        let mut map = MmapOptions::new()
            .len(cap)
            .map_anon()
            .map_err(|e| Error::io("map staging pool", "<anonymous>", e))?;
        // Huge pages where the kernel offers them (transparent huge pages
        // in `madvise` mode): fewer TLB misses for the staging copy, and
        // fewer pages for O_DIRECT writes to pin. Only a hint: without
        // them the pool works the same.
        let _ = map.advise(memmap2::Advice::HugePage);
        // Touch every page so none faults later.
        for page in map.chunks_mut(ALIGN) {
            page[0] = 0;
        }
        let base = map.as_mut_ptr();
        Ok(StagingPool {
            inner: Arc::new(Inner {
                _map: map,
                base,
                cap,
                ring: Mutex::new(Ring {
                    cap,
                    tail: 0,
                    live: BTreeMap::new(),
                    in_use: 0,
                    high_water: 0,
                }),
                freed: Condvar::new(),
            }),
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.inner.cap
    }

    /// Most bytes ever allocated at once.
    pub fn high_water(&self) -> usize {
        self.lock().high_water
    }

    /// Bytes allocated now (rounded up to the page size): staged chunks
    /// not yet written out. Zero once every save has finished, committed
    /// or failed.
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.inner.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool's memory as `(base address, length)`, for registering it
    /// once with a device driver (e.g. `cudaHostRegister`). It stays mapped
    /// at this address until the last clone of the pool is dropped.
    pub fn region(&self) -> (usize, usize) {
        (self.inner.base as usize, self.inner.cap)
    }

    /// Allocate `len` bytes, blocking until the pipeline frees enough space.
    /// Fails only if `len` can never fit.
    pub fn alloc(&self, len: usize) -> Result<StagingBuf> {
        self.alloc_inner(len, true)?
            .ok_or_else(|| Error::Internal("blocking staging allocation gave nothing".into()))
    }

    /// Allocate `len` bytes if they fit now; `None` if the pool is full
    /// (the caller hands staged buffers back and retries). Fails only if
    /// `len` can never fit.
    pub fn try_alloc(&self, len: usize) -> Result<Option<StagingBuf>> {
        self.alloc_inner(len, false)
    }

    fn alloc_inner(&self, len: usize, wait: bool) -> Result<Option<StagingBuf>> {
        let rounded = len.max(1).div_ceil(ALIGN) * ALIGN;
        if rounded > self.inner.cap {
            return Err(Error::invalid(
                "staging allocation",
                format!(
                    "{len} bytes exceed the staging budget of {} bytes",
                    self.inner.cap
                ),
            ));
        }
        let mut ring = self.lock();
        let start = loop {
            if let Some(s) = ring.place(rounded) {
                break s;
            }
            if !wait {
                return Ok(None);
            }
            ring = self
                .inner
                .freed
                .wait(ring)
                .unwrap_or_else(|p| p.into_inner());
        };
        ring.live.insert(start, start + rounded);
        ring.tail = start + rounded;
        ring.in_use += rounded;
        ring.high_water = ring.high_water.max(ring.in_use);
        drop(ring);
        Ok(Some(StagingBuf {
            pool: self.inner.clone(),
            start,
            // SAFETY: start + rounded <= cap, inside the mapping.
            ptr: unsafe { self.inner.base.add(start) },
            len,
            reserved: rounded,
        }))
    }
}

/// One allocation from the [`StagingPool`]; returns its space on drop.
pub struct StagingBuf {
    pool: Arc<Inner>,
    start: usize,
    ptr: *mut u8,
    len: usize,
    reserved: usize,
}

// SAFETY: a StagingBuf is the only handle to its byte range.
unsafe impl Send for StagingBuf {}
// SAFETY: a StagingBuf is the only handle to its byte range, and `&self`
// gives only read access to it.
unsafe impl Sync for StagingBuf {}

impl StagingBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if zero-length.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shrink the visible length (the reserved space is unchanged).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Zero the bytes after the contents up to the next [`ALIGN`]
    /// boundary, so that [`StagingBuf::padded`] writes zeros past them.
    pub fn zero_padding(&mut self) {
        let padded = self.padded_len();
        // SAFETY: padded <= reserved, all inside this buffer's range, and
        // &mut self gives exclusive access.
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr, padded) };
        all[self.len..].fill(0);
    }

    /// The contents and the bytes after them up to the next [`ALIGN`]
    /// boundary: a page-aligned buffer of aligned length, ready for direct
    /// I/O. The bytes past the contents are zeros after
    /// [`StagingBuf::zero_padding`], else whatever the pool held there.
    pub fn padded(&self) -> &[u8] {
        // SAFETY: padded_len <= reserved, all inside this buffer's range
        // of the live (pre-faulted, so initialized) mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.padded_len()) }
    }

    fn padded_len(&self) -> usize {
        let padded = self.len.div_ceil(ALIGN) * ALIGN;
        debug_assert!(padded <= self.reserved);
        padded
    }
}

impl std::ops::Deref for StagingBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is inside the live mapping and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for StagingBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for StagingBuf {
    fn drop(&mut self) {
        let mut ring = self.pool.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.release(self.start);
        drop(ring);
        self.pool.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ring_reuses_space_and_blocks_when_full() {
        let pool = StagingPool::new(4 * ALIGN).unwrap();
        let a = pool.alloc(ALIGN).unwrap();
        let b = pool.alloc(2 * ALIGN).unwrap();
        let c = pool.alloc(ALIGN).unwrap();
        let p2 = pool.clone();
        let t = std::thread::spawn(move || {
            let mut d = p2.alloc(2 * ALIGN).unwrap();
            d.fill(7);
            d
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "the pool is full");
        // Not the oldest buffer: its space is free at once all the same.
        drop(b);
        let d = t.join().unwrap();
        assert_eq!(d.len(), 2 * ALIGN);
        assert!(pool.try_alloc(ALIGN).unwrap().is_none());
        drop(a);
        drop(c);
        drop(d);
        let e = pool.alloc(2 * ALIGN).unwrap();
        assert_eq!(pool.in_use(), 2 * ALIGN);
        drop(e);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.alloc(5 * ALIGN).is_err());
        assert_eq!(pool.high_water(), 4 * ALIGN);
    }

    /// Buffers of mixed sizes released in random order: every live buffer
    /// keeps its bytes (no two overlap), and `in_use` counts exactly the
    /// live ones.
    #[test]
    fn out_of_order_release_keeps_buffers_disjoint() {
        let pool = StagingPool::new(64 * ALIGN).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut live: Vec<(StagingBuf, u8)> = Vec::new();
        for round in 0..2000u32 {
            if !live.is_empty() && (rand(3) == 0 || live.len() > 12) {
                let i = rand(live.len() as u64) as usize;
                let (b, v) = live.swap_remove(i);
                assert!(b.iter().all(|&y| y == v), "round {round}");
            }
            let len = (1 + rand(8) as usize) * ALIGN - rand(100) as usize;
            if let Some(mut b) = pool.try_alloc(len).unwrap() {
                let v = (round % 251) as u8;
                b.fill(v);
                live.push((b, v));
            }
            let want: usize = live
                .iter()
                .map(|(b, _)| b.len().div_ceil(ALIGN) * ALIGN)
                .sum();
            assert_eq!(pool.in_use(), want, "round {round}");
        }
        for (b, v) in &live {
            assert!(b.iter().all(|&y| y == *v));
        }
        drop(live);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.try_alloc(64 * ALIGN).unwrap().is_some());
    }

    #[test]
    fn buffers_are_disjoint() {
        let pool = StagingPool::new(16 * ALIGN).unwrap();
        let mut bufs: Vec<_> = (0..8).map(|_| pool.alloc(ALIGN + 1).unwrap()).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8));
        }
    }
}
