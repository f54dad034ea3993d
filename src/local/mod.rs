//! The local-disk tier: the filesystem seam, durable file primitives, the
//! chunk store, temporary files made ahead of their writes, the
//! collection lock, where one store lies against another (and, for tests, a simulated disk).

pub mod chunk_store;
pub mod durable;
pub mod fs;
pub mod lock;
pub mod nesting;
#[cfg(feature = "test-util")]
pub mod sim;
pub mod tmp_files;

pub use chunk_store::{EarlyChunk, LocalChunkStore, PendingChunk};
pub use lock::GcLock;
pub use tmp_files::TmpFileSupply;
