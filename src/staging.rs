//! The DRAM staging pool: a fixed budget of pre-faulted memory that tensor
//! bytes are copied into before the background pipeline hashes, encodes and
//! writes them.
//!
//! The pool is one anonymous mapping, populated when the store opens (a page
//! fault on fresh memory costs several times a memcpy), and handed out as a
//! ring: allocations are carved from the tail in order and their space is
//! reclaimed from the head once they and everything older are released.
//! Chunks drain from the pipeline in roughly the order they were staged, so
//! the ring stays dense. When the ring is full, [`StagingPool::alloc`]
//! blocks until the pipeline releases space: this is the back-pressure that
//! keeps memory inside the budget whatever the checkpoint size.

use crate::error::{Error, Result};
use memmap2::{MmapMut, MmapOptions};
use std::collections::VecDeque;
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
    tail: usize,
    first_id: u64,
    live: VecDeque<Entry>,
    in_use: usize,
    high_water: usize,
}

struct Entry {
    start: usize,
    end: usize,
    freed: bool,
}

impl Ring {
    /// Where an allocation of `len` bytes can start now, if anywhere.
    fn place(&self, len: usize) -> Option<usize> {
        let Some(front) = self.live.front() else {
            return (len <= self.cap).then_some(0);
        };
        let head = front.start;
        if self.tail > head {
            if self.cap - self.tail >= len {
                Some(self.tail)
            } else if head >= len {
                Some(0)
            } else {
                None
            }
        } else if head - self.tail >= len {
            Some(self.tail)
        } else {
            None
        }
    }

    fn release(&mut self, id: u64) {
        let idx = (id - self.first_id) as usize;
        let e = &mut self.live[idx];
        e.freed = true;
        self.in_use -= e.end - e.start;
        while self.live.front().is_some_and(|e| e.freed) {
            self.live.pop_front();
            self.first_id += 1;
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
            .populate()
            .map_anon()
            .map_err(|e| Error::io("map staging pool", "<anonymous>", e))?;
        // MAP_POPULATE is a hint; touch every page so none faults later.
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
                    first_id: 0,
                    live: VecDeque::new(),
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
        let id = ring.first_id + ring.live.len() as u64;
        ring.live.push_back(Entry {
            start,
            end: start + rounded,
            freed: false,
        });
        ring.tail = start + rounded;
        ring.in_use += rounded;
        ring.high_water = ring.high_water.max(ring.in_use);
        drop(ring);
        Ok(Some(StagingBuf {
            pool: self.inner.clone(),
            id,
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
    id: u64,
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

    /// The contents with the bytes after them zeroed up to the next
    /// [`ALIGN`] boundary: a page-aligned buffer of aligned length, ready
    /// for direct I/O.
    pub fn aligned_padded(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(ALIGN) * ALIGN;
        debug_assert!(padded <= self.reserved);
        // SAFETY: padded <= reserved, all inside this buffer's range.
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr, padded) };
        all[self.len..].fill(0);
        all
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
        ring.release(self.id);
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
        let _c = pool.alloc(ALIGN).unwrap();
        drop(b); // not at head: space not yet reusable
        let p2 = pool.clone();
        let t = std::thread::spawn(move || {
            let mut d = p2.alloc(2 * ALIGN).unwrap();
            d.fill(7);
            d.len()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(a);
        assert_eq!(t.join().unwrap(), 2 * ALIGN);
        assert!(pool.alloc(5 * ALIGN).is_err());
        assert_eq!(pool.high_water(), 4 * ALIGN);
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
