//! The local-disk tier: durable file primitives and the chunk store.

pub mod chunk_store;
pub mod durable;

pub use chunk_store::{LocalChunkStore, OpenChunk, PendingChunk};
