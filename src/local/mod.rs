//! The local-disk tier: the filesystem seam, durable file primitives, the
//! chunk store and the collection lock (and, for tests, a simulated disk).

pub mod chunk_store;
pub mod durable;
pub mod fs;
pub mod lock;
#[cfg(feature = "test-util")]
pub mod sim;

pub use chunk_store::{EarlyChunk, LocalChunkStore, PendingChunk};
pub use lock::GcLock;
