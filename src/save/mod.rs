//! The save path: the caller's copy into staging, the background pipeline,
//! and the handle and report a caller gets back.

mod ctx;
mod handle;
mod pipeline;
mod stage;
mod state;

pub use handle::{SaveHandle, SaveReport};
pub(crate) use pipeline::Pipeline;
pub(crate) use stage::stage_save;
pub use state::{SaveState, TensorView};
