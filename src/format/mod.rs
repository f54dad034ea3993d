//! On-disk format v1: chunk files and manifest files.
//!
//! `docs/format.md` specifies both byte by byte.

pub mod chunk;
pub mod manifest;

/// Format version written by this build, for chunks, manifests and the store.
pub const FORMAT_VERSION: u16 = 1;

/// Manifest format version of sharded steps: part manifests and the global
/// records committed from them. Single-process saves still write
/// [`FORMAT_VERSION`] manifests, and the store marker stays at 1.
pub const SHARDED_FORMAT_VERSION: u16 = 2;
