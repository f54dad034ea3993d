//! # cairn — a tiered checkpoint store for large-model training
//!
//! Training jobs save weights and optimizer state every few minutes; every
//! second a save or restore stalls the accelerators is paid for. cairn makes
//! `save` cost only a copy into a pre-faulted DRAM staging pool: hashing
//! (blake3), optional compression (zstd with byte-grouping for floats),
//! writes and fsyncs run in the background, and the checkpoint commits
//! atomically when its manifest is published. Chunks are named by the hash
//! of their bytes, so unchanged tensors cost nothing to save again, and
//! every byte read back is verified.
//!
//! ```no_run
//! use cairn::{DType, SaveState, StepSel, Store, StoreOptions, TensorFilter};
//!
//! # fn main() -> cairn::Result<()> {
//! let store = Store::open("/tmp/ckpt", StoreOptions::default())?;
//! let weights: Vec<f32> = vec![0.5; 1024];
//! let bytes: &[u8] = bytemuck_free_cast(&weights);
//! let state = SaveState::new()
//!     .tensor("layer0.weight", DType::F32, &[32, 32], bytes)
//!     .blob("rng", b"seed=7")
//!     .metadata(serde_json::json!({"lr": 3e-4}));
//! let handle = store.save("run1", 100, &state)?; // returns once staged
//! // ... training continues; `weights` may be overwritten now ...
//! let report = handle.wait()?; // durable on local disk
//! println!("wrote {} bytes", report.bytes_written);
//!
//! let restored = store.restore("run1", StepSel::Latest, &TensorFilter::All)?;
//! assert_eq!(restored.tensor("layer0.weight").unwrap().data, bytes);
//! # Ok(()) }
//! # fn bytemuck_free_cast(v: &[f32]) -> &[u8] {
//! #     unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
//! # }
//! ```
//!
//! `docs/architecture.md` describes the pipeline and `docs/format.md` the
//! on-disk format.

mod chunk_id;
mod clock;
mod codec;
mod copy;
mod daemon;
mod dtype;
mod error;
mod failpoint;
#[doc(hidden)]
pub mod format;
mod gc;
mod layout;
mod lease;
mod local;
mod metrics;
mod parallel;
mod remote;
mod restore;
pub mod safetensors;
mod save;
mod shard;
mod staging;
mod store;
mod tier;
mod verify;

/// The object-store crate whose errors and stores appear in cairn's API.
pub use object_store;

pub use chunk_id::ChunkId;
pub use clock::{system_clock, Clock, ManualClock, SharedClock, SystemClock};
pub use codec::{CodecChoice, Decoder, Encoder};
pub use copy::{copy_checkpoint, glob_match, CopyOptions, CopyReport};
pub use daemon::{
    DaemonConfig, DaemonStatus, FailingCheckpoint, FlushDaemon, GcConfig, RetentionConfig,
    SharedStatus, MAX_CONFIG_LEN, STOP_GRACE,
};
pub use dtype::DType;
pub use error::{Error, ErrorKind, Region, Result};
pub use format::manifest::{
    BlobEntry, ChunkRef, EntryRef, Manifest, PartInfo, Shard, ShardInfo, ShardedTensor, TensorEntry,
};
pub use gc::{GcReport, TMP_MIN_AGE};
pub use layout::{validate_run_name, STORE_ENTRIES, STORE_MARKER};
pub use lease::{Lease, LeasedSave, LeasedTensor, NextLease, Segment};
pub use local::nesting::enclosing_store;
pub use metrics::{
    latest_matching, validate_metric_name, MetricCondition, MetricFilter, MetricOp, Metrics,
    MAX_METRICS, MAX_METRIC_NAME,
};
pub use remote::{
    check_remote_gc_grace, RemoteMetrics, RemoteMetricsSnapshot, RemoteOptions, RemoteStore,
    RetryPolicy, UploadReport, MAX_REMOTE_GC_GRACE, MIN_REMOTE_GC_GRACE,
};
#[doc(hidden)]
pub use remote::{listed_chunk_id, listed_manifest_step};
pub use restore::{RestoreReport, Restored, RestoredTensor, TensorFilter};
pub use save::{SaveHandle, SaveReport, SaveState, TensorView};
pub use shard::{
    CommitReport, PartListing, PartsUploadReport, RegionTarget, PENDING_PART_MIN_GRACE,
};
pub use store::{StepSel, Store, StoreOptions, UploadMarker, MAX_THREADS};
pub use tier::{is_url, ChunkInfo, ChunkTier, ReuseRule, Tier};
pub use verify::{Problem, VerifyReport};

/// Test support for code built on cairn: an object store wrapper that
/// injects failures, lost responses and delays, and a simulated disk
/// ([`testing::SimDisk`], through [`Store::open_with_fs`]) that loses
/// what was not fsynced at a simulated power loss and injects `ENOSPC`
/// and `EIO`. Enabled by the `test-util` feature; never needed in
/// production.
#[cfg(feature = "test-util")]
pub mod testing {
    pub use crate::local::fs::{Fs, FsFile, FsReadFile, RealFs};
    /// Named fail points at the commit edges: count hits, fail at one.
    pub mod failpoints {
        pub use crate::failpoint::{fail, hits, remove, reset, set, Action, NAMES};
    }
    pub use crate::local::sim::SimDisk;
    pub use crate::remote::fault::{FaultConfig, FaultyObjectStore, OpHook};
}
