//! [`Tier`]: a store named by location — a local directory or an object
//! store URL — opened as the right [`ChunkTier`].

use super::ChunkTier;
use crate::chunk_id::ChunkId;
use crate::error::Result;
use crate::remote::{RemoteOptions, RemoteStore};
use crate::store::{StepSel, Store, StoreOptions};
use std::collections::HashMap;

/// A local store or a remote one. It dereferences to [`ChunkTier`], so
/// every tier operation works on either.
// One Tier per command: its size does not matter, boxing would only add
// an indirection to every call.
#[allow(clippy::large_enum_variant)]
pub enum Tier {
    /// A directory.
    Local(Store),
    /// An object-store prefix.
    Remote(RemoteStore),
}

/// Whether `location` names an object store (`s3://`, `gs://`, `az://`,
/// `file://`, ...) rather than a local directory.
pub fn is_url(location: &str) -> bool {
    location.contains("://")
}

impl std::ops::Deref for Tier {
    type Target = dyn ChunkTier;

    fn deref(&self) -> &Self::Target {
        match self {
            Tier::Local(s) => s,
            Tier::Remote(r) => r,
        }
    }
}

impl Tier {
    /// Open an existing store at `location` for reading; nothing is
    /// created, and a missing store is [`crate::Error::NotFound`] naming it.
    pub fn open(location: &str, remote_options: &[(String, String)]) -> Result<Tier> {
        if is_url(location) {
            Ok(Tier::Remote(RemoteStore::open_existing(
                location,
                remote_options,
                RemoteOptions::default(),
            )?))
        } else {
            Ok(Tier::Local(Store::open_read_only(
                location,
                StoreOptions::default(),
            )?))
        }
    }

    /// Open a store at `location` for writing, creating a local one if
    /// needed (with the smallest staging pool a store accepts, one chunk:
    /// copies do not stage, and the pool is pre-faulted memory). A
    /// directory (or `file://` URL) among another store's own entries
    /// (`runs/`, `chunks/`, `tmp/`, ...) is refused as
    /// [`crate::Error::InvalidInput`]: that store's gc would remove it.
    pub fn open_for_write(location: &str, remote_options: &[(String, String)]) -> Result<Tier> {
        let dir = match crate::local::nesting::file_url_path(location) {
            Some(dir) => Some(dir),
            None if !is_url(location) => Some(std::path::PathBuf::from(location)),
            None => None,
        };
        if let Some(dir) = dir {
            crate::local::nesting::check_not_among_store_entries(&dir, "target store")?;
        }
        if is_url(location) {
            return Ok(Tier::Remote(RemoteStore::open(
                location,
                remote_options,
                RemoteOptions::default(),
            )?));
        }
        Ok(Tier::Local(Store::open(
            location,
            StoreOptions {
                staging_bytes: StoreOptions::default().chunk_size,
                ..StoreOptions::default()
            },
        )?))
    }

    /// This store as a [`ChunkTier`].
    pub fn as_tier(&self) -> &dyn ChunkTier {
        &**self
    }

    /// Restore a checkpoint from this tier into new buffers, verified.
    pub fn restore(
        &self,
        run: &str,
        step: StepSel,
        filter: &crate::TensorFilter,
    ) -> Result<crate::Restored> {
        match self {
            Tier::Local(s) => s.restore(run, step, filter),
            Tier::Remote(r) => r.restore(run, step, filter),
        }
    }

    /// Restore the checkpoint `manifest` describes (read before from this
    /// tier) into new buffers, verified, without reading the manifest again.
    pub fn restore_from_manifest(
        &self,
        manifest: crate::Manifest,
        filter: &crate::TensorFilter,
    ) -> Result<crate::Restored> {
        match self {
            Tier::Local(s) => s.restore_from_manifest(manifest, filter),
            Tier::Remote(r) => r.restore_from_manifest(manifest, filter),
        }
    }

    /// Verify checkpoints: all, one run's, or one step's. Every referenced
    /// chunk is read and hashed once.
    pub fn verify(
        &self,
        run: Option<&str>,
        step: Option<u64>,
    ) -> Result<crate::verify::VerifyReport> {
        match self {
            Tier::Local(s) => s.verify(run, step),
            Tier::Remote(_) => crate::verify::verify(self.as_tier(), run, step),
        }
    }

    /// Stored size of every chunk object in the store.
    pub fn chunk_sizes(&self) -> Result<HashMap<ChunkId, u64>> {
        Ok(self
            .list_chunks()?
            .into_iter()
            .map(|c| (c.id, c.size))
            .collect())
    }

    /// Stored size of every chunk of the committed checkpoint `(run,
    /// step)` that lives in a pack (its object's length there), from the
    /// checkpoint's pack map. Empty for a local store and for a remote
    /// checkpoint without packed chunks; [`Self::chunk_sizes`] lists only
    /// the plain chunk objects.
    pub fn packed_chunk_sizes(&self, run: &str, step: u64) -> Result<HashMap<ChunkId, u64>> {
        match self {
            Tier::Local(_) => Ok(HashMap::new()),
            Tier::Remote(r) => Ok(r
                .block_on(r.pack_map(run, step))??
                .map(|m| m.locations().map(|(id, loc)| (id, loc.len)).collect())
                .unwrap_or_default()),
        }
    }
}
