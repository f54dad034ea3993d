//! The save path: the caller's copy into staging, the background pipeline,
//! and the handle and report a caller gets back.

mod ctx;
mod early;
mod handle;
mod known;
mod pipeline;
mod stage;
mod state;

pub(crate) use ctx::{PlannedEntry, SaveCtx};
pub use handle::{SaveHandle, SaveReport};
pub(crate) use pipeline::{ChunkJob, Pipeline, PipelineThreads, Submitter};
pub(crate) use stage::{
    position_of, sample_of, stage_entries, stage_save, validate, validate_attempt, with_attempt,
    PACK_THRESHOLD,
};
pub use state::{SaveState, TensorView};
