//! Uploading a committed local checkpoint: chunks the remote lacks, in
//! parallel and verified, then the manifest, put last and only if absent.

use super::RemoteStore;
use crate::codec::decode_chunk_object;
use crate::codec::Decoder;
use crate::error::{Error, Result};
use crate::local::LocalChunkStore;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What one upload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadReport {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// Distinct chunks the checkpoint references.
    pub chunks: u64,
    /// Chunks uploaded by this call.
    pub chunks_uploaded: u64,
    /// Bytes of chunk objects uploaded by this call.
    pub bytes_uploaded: u64,
    /// Chunks the remote already held.
    pub chunks_skipped: u64,
    /// True if the remote manifest already existed (nothing was exposed
    /// twice).
    pub already_committed: bool,
    /// Wall time.
    pub elapsed: Duration,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl RemoteStore {
    /// Upload checkpoint `(run, step)` from `local`, whose manifest file
    /// bytes are `manifest_bytes`.
    ///
    /// Every chunk is re-verified from local disk before it is sent. A
    /// chunk the remote already holds is skipped unless its object is older
    /// than `refresh_after` (then it is uploaded again, which renews it for
    /// the grace period of remote garbage collection). The manifest is put
    /// with `PutMode::Create` only after every chunk is present.
    pub async fn upload_checkpoint(
        &self,
        local: &LocalChunkStore,
        run: &str,
        step: u64,
        manifest_bytes: bytes::Bytes,
        refresh_after: Duration,
    ) -> Result<UploadReport> {
        let t0 = Instant::now();
        let display = std::path::PathBuf::from(format!("{run}/{step}"));
        let manifest = crate::format::manifest::decode_manifest_file(&manifest_bytes, &display)?;
        let chunks = manifest.distinct_chunks();
        let uploaded = AtomicU64::new(0);
        let bytes_up = AtomicU64::new(0);
        let skipped = AtomicU64::new(0);
        let fresh_after = now_ms() - refresh_after.as_millis() as i64;
        let renewed = std::sync::Mutex::new(Vec::new());
        futures::stream::iter(chunks.iter().copied())
            .map(|(id, len)| {
                let (uploaded, bytes_up, skipped, renewed) =
                    (&uploaded, &bytes_up, &skipped, &renewed);
                async move {
                    if let Some(meta) = self.head_chunk(&id).await? {
                        if meta.last_modified.timestamp_millis() > fresh_after {
                            skipped.fetch_add(1, Ordering::Relaxed);
                            self.metrics.add_skip();
                            return Ok::<(), Error>(());
                        }
                        renewed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((id, len));
                    }
                    let local = local.clone();
                    let object = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                        let object = local.read_object(&id, len)?;
                        let mut out = vec![0u8; len as usize];
                        let mut dec = Decoder::new()?;
                        let path = local.layout().chunk_path(&id);
                        decode_chunk_object(&object, &id, &mut out, &mut dec, &path)?;
                        Ok(object)
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("chunk reader: {e}")))??;
                    let n = object.len() as u64;
                    self.put_object(&self.chunk_path(&id), bytes::Bytes::from(object))
                        .await?;
                    self.metrics.add_upload(n);
                    tracing::debug!(chunk = %id, bytes = n, "uploaded chunk");
                    uploaded.fetch_add(1, Ordering::Relaxed);
                    bytes_up.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                }
            })
            .buffer_unordered(self.opts.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        // A chunk skipped above is safe from collection for refresh_after
        // after it was looked at; publish well inside that window or not
        // at all (the next attempt starts over).
        if t0.elapsed() > refresh_after / 2 {
            return Err(Error::Internal(format!(
                "upload of run {run} step {step} took {:?}, longer than a quarter of the gc grace period; not committing",
                t0.elapsed()
            )));
        }
        let created = self.put_manifest(run, step, manifest_bytes).await?;
        // A chunk renewed above may have been deleted by a collector that
        // checked its old age just before the renewal landed; put back any
        // that vanished (the manifest now protects them).
        let renewed = renewed.into_inner().unwrap_or_else(|p| p.into_inner());
        for (id, len) in renewed {
            if self.head_chunk(&id).await?.is_none() {
                tracing::warn!(chunk = %id, "renewed chunk vanished under collection; uploading again");
                let local = local.clone();
                let object = tokio::task::spawn_blocking(move || local.read_object(&id, len))
                    .await
                    .map_err(|e| Error::Internal(format!("chunk reader: {e}")))??;
                self.put_object(&self.chunk_path(&id), bytes::Bytes::from(object))
                    .await?;
            }
        }
        Ok(UploadReport {
            run: run.to_string(),
            step,
            chunks: chunks.len() as u64,
            chunks_uploaded: uploaded.into_inner(),
            bytes_uploaded: bytes_up.into_inner(),
            chunks_skipped: skipped.into_inner(),
            already_committed: !created,
            elapsed: t0.elapsed(),
        })
    }
}
