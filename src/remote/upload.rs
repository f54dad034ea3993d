//! What uploading a committed local checkpoint reports. The upload itself
//! is [`crate::copy_checkpoint`] from the local tier to the remote one
//! ([`crate::Store::upload`], the flush daemon).

use crate::copy::CopyReport;
use serde::Serialize;
use std::time::Duration;

/// What one upload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadReport {
    /// The run.
    pub run: String,
    /// The step.
    pub step: u64,
    /// Distinct chunks the checkpoint references.
    pub chunks: u64,
    /// Chunks uploaded by this call (renewed ones included).
    pub chunks_uploaded: u64,
    /// Bytes of chunk objects uploaded by this call.
    pub bytes_uploaded: u64,
    /// Chunks the remote already held, young enough to rely on.
    pub chunks_skipped: u64,
    /// Chunks the remote held but too old to rely on, uploaded again.
    pub chunks_renewed: u64,
    /// True if the remote manifest already existed (nothing was exposed
    /// twice).
    pub already_committed: bool,
    /// Wall time.
    pub elapsed: Duration,
}

impl From<CopyReport> for UploadReport {
    fn from(c: CopyReport) -> Self {
        UploadReport {
            run: c.run,
            step: c.step,
            chunks: c.chunks,
            chunks_uploaded: c.chunks_copied,
            bytes_uploaded: c.bytes_copied,
            chunks_skipped: c.chunks_skipped,
            chunks_renewed: c.chunks_renewed,
            already_committed: c.already_present,
            elapsed: c.elapsed,
        }
    }
}
