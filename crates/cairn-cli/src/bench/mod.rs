//! `cairn bench`: a synthetic training state saved and restored against
//! raw-disk and memcpy baselines measured in the same run.

pub mod raw;
pub mod remote;
pub mod run;
pub mod synthetic;

pub use run::{check_size, run_bench, BenchConfig, BenchReport, MIN_SIZE};
