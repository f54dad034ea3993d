//! The chunks a store's pipeline knows to be stored, so that a save does
//! not look up every new chunk's name on disk.
//!
//! Deciding whether a chunk must be written takes a lookup of
//! `chunks/<2 hex>/<64 hex>`. When the fan-out directories' blocks are not
//! in memory (a node just booted, a restore that dropped caches, memory
//! pressure from a data loader), each lookup of a new name is a disk read
//! queued behind the save's own writes: tens of milliseconds, on the
//! threads that hash the next chunks. So the pipeline lists the chunk
//! directories once, in the background, when the store opens, and records
//! every chunk it writes after that. A chunk absent from a complete
//! listing is new: it is written without a lookup.
//!
//! Only the "absent" answer is trusted, and it is safe when stale: a chunk
//! another process stored after the listing is written again, the same
//! bytes under the same name (the rename replaces a complete file with a
//! complete file). A chunk the set holds is still opened and checked
//! before it is reused, so a chunk removed since (a collection, a repair,
//! a hand) is written again as before.

use crate::chunk_id::ChunkId;
use crate::local::LocalChunkStore;
use std::collections::HashSet;
use std::sync::Mutex;

/// Above this many chunk files the listing is dropped and every chunk is
/// looked up (about 64 bytes of memory each).
pub(crate) const MAX_LISTED_CHUNKS: usize = 1 << 22;

#[derive(Default)]
struct State {
    /// Chunks listed or recorded.
    ids: HashSet<ChunkId>,
    /// The listing of every fan-out directory has been merged into `ids`.
    complete: bool,
    /// The listing failed or was too large: `ids` is not used.
    abandoned: bool,
}

/// Chunks known to be stored (see the module documentation).
#[derive(Default)]
pub(crate) struct KnownChunks {
    state: Mutex<State>,
}

impl KnownChunks {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// List `chunks`' fan-out directories and merge the names found;
    /// from then on an id not in the set is taken as new. Run on a
    /// thread of its own: it reads every fan-out directory.
    pub fn load(&self, chunks: &LocalChunkStore) {
        let listed = chunks.list_ids(MAX_LISTED_CHUNKS);
        let mut s = self.lock();
        match listed {
            Some(ids) if s.ids.len() + ids.len() <= MAX_LISTED_CHUNKS => {
                s.ids.extend(ids);
                s.complete = true;
            }
            _ => {
                s.abandoned = true;
                s.ids = HashSet::new();
            }
        }
    }

    /// Chunk `id` is stored under its final name (written by this
    /// pipeline, or found and checked).
    pub fn record(&self, id: ChunkId) {
        let mut s = self.lock();
        if !s.abandoned && s.ids.len() < MAX_LISTED_CHUNKS {
            s.ids.insert(id);
        } else if !s.abandoned {
            s.abandoned = true;
            s.complete = false;
            s.ids = HashSet::new();
        }
    }

    /// Whether `id` is surely not stored by this store's own account: the
    /// listing is complete and neither it nor a later write holds `id`.
    /// `false` means "look it up".
    pub fn surely_absent(&self, id: &ChunkId) -> bool {
        let s = self.lock();
        s.complete && !s.abandoned && !s.ids.contains(id)
    }

    /// Whether the listing has been merged (for tests).
    #[cfg(feature = "test-util")]
    pub fn listed(&self) -> bool {
        self.lock().complete
    }
}
