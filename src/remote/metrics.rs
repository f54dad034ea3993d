//! Counters of remote activity, read by the daemon's status and metrics
//! endpoints and by reports.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one remote store.
#[derive(Debug, Default)]
pub struct RemoteMetrics {
    bytes_uploaded: AtomicU64,
    chunks_uploaded: AtomicU64,
    chunks_skipped: AtomicU64,
    bytes_downloaded: AtomicU64,
    chunks_downloaded: AtomicU64,
    get_requests: AtomicU64,
    manifests_uploaded: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    put_requests: AtomicU64,
    packs_uploaded: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RemoteMetricsSnapshot {
    /// Bytes of chunk objects uploaded.
    pub bytes_uploaded: u64,
    /// Chunk objects uploaded.
    pub chunks_uploaded: u64,
    /// Chunks not uploaded because the remote already held them.
    pub chunks_skipped: u64,
    /// Bytes of chunk objects downloaded.
    pub bytes_downloaded: u64,
    /// Chunk objects downloaded.
    pub chunks_downloaded: u64,
    /// GET requests (whole or ranged) for chunk objects.
    pub get_requests: u64,
    /// Manifests committed remotely.
    pub manifests_uploaded: u64,
    /// Operations repeated after a transient error.
    pub retries: u64,
    /// Operations that failed for good. A not-found answer (a probe for
    /// an object not there yet) is not an error.
    pub errors: u64,
    /// Objects put (chunk objects, packs, pack maps, manifests, part
    /// manifests, grace records; a
    /// multipart upload counts once, a retried put once per attempt).
    pub put_requests: u64,
    /// Pack objects uploaded (each also counted in `bytes_uploaded`).
    pub packs_uploaded: u64,
}

impl RemoteMetrics {
    pub(crate) fn add_upload(&self, bytes: u64) {
        self.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
        self.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_skips(&self, n: u64) {
        self.chunks_skipped.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_download(&self, bytes: u64) {
        self.bytes_downloaded.fetch_add(bytes, Ordering::Relaxed);
        self.chunks_downloaded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_get(&self) {
        self.get_requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_manifest(&self) {
        self.manifests_uploaded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_put(&self) {
        self.put_requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_pack_upload(&self, bytes: u64) {
        self.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
        self.packs_uploaded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Read every counter.
    pub fn snapshot(&self) -> RemoteMetricsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteMetricsSnapshot {
            bytes_uploaded: l(&self.bytes_uploaded),
            chunks_uploaded: l(&self.chunks_uploaded),
            chunks_skipped: l(&self.chunks_skipped),
            bytes_downloaded: l(&self.bytes_downloaded),
            chunks_downloaded: l(&self.chunks_downloaded),
            get_requests: l(&self.get_requests),
            manifests_uploaded: l(&self.manifests_uploaded),
            retries: l(&self.retries),
            errors: l(&self.errors),
            put_requests: l(&self.put_requests),
            packs_uploaded: l(&self.packs_uploaded),
        }
    }
}
