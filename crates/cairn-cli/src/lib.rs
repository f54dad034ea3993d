//! The benchmark harness behind `cairn bench` and the `benches/`: a
//! synthetic training state saved and restored through [`cairn::Store`],
//! against raw-disk and memcpy baselines measured in the same run.
//!
//! It lives beside the CLI, not in the library, so a trainer linking
//! `cairn` compiles none of it.

pub mod bench;
