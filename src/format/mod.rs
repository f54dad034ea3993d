//! On-disk format v1: chunk files and manifest files.
//!
//! `docs/format.md` specifies both byte by byte.

pub mod chunk;
pub mod manifest;

/// Format version written by this build, for chunks, manifests and the store.
pub const FORMAT_VERSION: u16 = 1;
