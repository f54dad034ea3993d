//! The local-disk tier: durable file primitives, the chunk store and the
//! collection lock.

pub mod chunk_store;
pub mod durable;
pub mod lock;

pub use chunk_store::{LocalChunkStore, PendingChunk};
pub use lock::GcLock;
