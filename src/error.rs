//! Errors returned by cairn.
//!
//! [`Error`] carries structured fields naming what went wrong; [`Error::kind`]
//! maps every variant to a small [`ErrorKind`] that tells the caller what to
//! do about it (retry, fix the input, treat the data as corrupt, ...).

use std::path::PathBuf;

/// Result type used throughout cairn.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O resource was unavailable or failed; retrying may succeed.
    Unavailable,
    /// The caller passed something invalid; fix the input.
    Invalid,
    /// Stored data is corrupt or malformed.
    Data,
    /// The requested run, step or tensor does not exist.
    NotFound,
    /// The checkpoint already exists; checkpoints are immutable.
    AlreadyExists,
    /// The store or pipeline has shut down.
    Closed,
    /// A bug in cairn.
    Internal,
}

/// An error from cairn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("I/O error during {op} on {path}: {source}")]
    Io {
        /// What cairn was doing (`"write chunk"`, `"fsync"`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An argument or a piece of caller-supplied state is invalid.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input is wrong (`"tensor name"`, `"shape of tensor w"`, ...).
        what: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A chunk failed verification: bad header, truncated, or hash mismatch.
    #[error("corrupt chunk {chunk} ({path}): {reason}{}", tensors_suffix(.tensors))]
    CorruptChunk {
        /// Hex blake3 id of the chunk.
        chunk: String,
        /// Where the chunk was read from.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
        /// Tensors and blobs whose bytes live (partly) in this chunk.
        tensors: Vec<String>,
    },
    /// A manifest failed to parse or validate.
    #[error("corrupt manifest {path}: {reason}")]
    CorruptManifest {
        /// The manifest file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A stored object declares a format version this build cannot read.
    #[error("unsupported {what} format version {found} in {path} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Which kind of object (`"chunk"`, `"manifest"`, `"store"`).
        what: &'static str,
        /// Where it was read from.
        path: PathBuf,
        /// The version found.
        found: u64,
        /// The version this build supports.
        supported: u64,
    },
    /// A chunk declares a codec or filter this build does not know.
    #[error("unknown {what} {value} in chunk {path}")]
    UnknownCodec {
        /// `"codec"` or `"filter"`.
        what: &'static str,
        /// The raw value found in the header.
        value: u8,
        /// The chunk file.
        path: PathBuf,
    },
    /// The requested object does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for (`"run r1 step 7"`, `"tensor w"`).
        what: String,
    },
    /// A checkpoint with this run and step is already committed.
    #[error("checkpoint run {run} step {step} already exists")]
    AlreadyExists {
        /// The run.
        run: String,
        /// The step.
        step: u64,
    },
    /// A sharded step with no record here was committed on the remote
    /// tier from the parts of an earlier save attempt (the flush daemon
    /// uploaded them and found every rank): committing another attempt
    /// here would make the tiers disagree on the step.
    #[error(
        "checkpoint run {run} step {step} is already committed on the remote {url} (from the \
         parts of an earlier save attempt the flush daemon uploaded); a different save of it \
         here would disagree with that record: save to another step"
    )]
    CommittedRemotely {
        /// The run.
        run: String,
        /// The step.
        step: u64,
        /// The remote that holds the step's record.
        url: String,
    },
    /// A call to the object store failed (after retries, where the error
    /// was transient).
    #[error("object store error during {op} on {path}: {source}")]
    Remote {
        /// What cairn was doing (`"upload chunk"`, `"get manifest"`, ...).
        op: &'static str,
        /// The object's path in the store.
        path: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// An operation ran past the time the protocol allows it; retrying
    /// starts it over.
    #[error("{what} took {took:?}, longer than the {limit:?} allowed; not committed")]
    DeadlineExceeded {
        /// What ran too long.
        what: String,
        /// How long it took.
        took: std::time::Duration,
        /// The limit.
        limit: std::time::Duration,
    },
    /// The object store refused a request for a reason that repeating it
    /// cannot change: access denied, missing or wrong credentials, a
    /// request it calls bad. Not retried.
    #[error("object store refused {op} on {location}: {reason}; {hint}: {source}")]
    RemoteRefused {
        /// What cairn was doing (`"list"`, `"put object"`, ...).
        op: &'static str,
        /// The object path and the store URL.
        location: String,
        /// The answer, e.g. `"access denied (HTTP 403)"`.
        reason: String,
        /// What to do about it.
        hint: &'static str,
        /// The underlying error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A remote operation kept failing with transient errors until its
    /// attempts or its time budget ran out (see `RetryPolicy`).
    #[error(
        "{op} gave up after {attempts} attempts in {elapsed:?} (retry budget {budget:?}): {source}"
    )]
    RetriesExhausted {
        /// The operation and the object it addressed.
        op: String,
        /// Attempts made, the first included.
        attempts: u32,
        /// Time spent on the operation.
        elapsed: std::time::Duration,
        /// The operation's time budget.
        budget: std::time::Duration,
        /// The last error.
        #[source]
        source: Box<Error>,
    },
    /// A sharded step cannot be committed: a rank of the world has not
    /// published its part (yet).
    #[error("run {run} step {step}: rank {rank} of world size {world_size} has no part")]
    MissingRank {
        /// The run.
        run: String,
        /// The step.
        step: u64,
        /// The first rank without a part.
        rank: u32,
        /// The world size being committed.
        world_size: u32,
    },
    /// A sharded step cannot be committed: two shards of a tensor overlap
    /// without being replicas of the same region.
    #[error("tensor {tensor:?}: shard {first} overlaps shard {second}")]
    ShardOverlap {
        /// The tensor.
        tensor: String,
        /// One of the shards.
        first: Box<Region>,
        /// The other.
        second: Box<Region>,
    },
    /// A sharded step cannot be committed: no shard of a tensor covers
    /// `point` (an element index of the global tensor).
    #[error(
        "tensor {tensor:?} of global shape {global_shape:?}: no shard covers element {point:?}"
    )]
    ShardGap {
        /// The tensor.
        tensor: String,
        /// Its global shape.
        global_shape: Vec<u64>,
        /// The first uncovered element, in row-major order of dimensions.
        point: Vec<u64>,
    },
    /// A sharded step cannot be committed: the parts disagree about a
    /// tensor's dtype or global shape, or hold different bytes under one
    /// blob name.
    #[error(
        "{name:?}: rank {first_rank} has {what} {first} but rank {other_rank} has {other}{hint}"
    )]
    PartsDisagree {
        /// The tensor or blob.
        name: String,
        /// What differs: `"dtype"`, `"global shape"`, `"blob bytes"`, or
        /// `"part"` (two attempts of one rank with different contents).
        what: &'static str,
        /// The lowest rank, whose value is taken as the reference.
        first_rank: u32,
        /// Its value.
        first: String,
        /// A rank that disagrees.
        other_rank: u32,
        /// Its value.
        other: String,
        /// For two attempts of one rank: how to go on (empty otherwise).
        hint: String,
    },
    /// The store's background pipeline has shut down.
    #[error("the store pipeline is closed")]
    Closed,
    /// A remote operation did not run, or was dropped in flight, because
    /// its store was cancelled ([`crate::RemoteStore::cancel`]): the
    /// process is stopping.
    #[error("cancelled: remote store {url} is stopping")]
    Cancelled {
        /// The remote store's URL.
        url: String,
    },
    /// An invariant inside cairn did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A box of a global tensor saved by one rank, as named in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The rank whose part holds it.
    pub rank: u32,
    /// Offset in each dimension.
    pub offsets: Vec<u64>,
    /// Extent in each dimension.
    pub shape: Vec<u64>,
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}+{:?} of rank {}",
            self.offsets, self.shape, self.rank
        )
    }
}

fn tensors_suffix(tensors: &[String]) -> String {
    if tensors.is_empty() {
        String::new()
    } else {
        format!("; affects {}", tensors.join(", "))
    }
}

impl Error {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => io_kind(source.kind()),
            Error::Remote { source, .. } => match source {
                object_store::Error::NotFound { .. } => ErrorKind::NotFound,
                object_store::Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
                object_store::Error::InvalidPath { .. }
                | object_store::Error::UnknownConfigurationKey { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => ErrorKind::Invalid,
                _ => ErrorKind::Unavailable,
            },
            Error::InvalidInput { .. } => ErrorKind::Invalid,
            Error::CorruptChunk { .. }
            | Error::CorruptManifest { .. }
            | Error::UnsupportedVersion { .. }
            | Error::UnknownCodec { .. } => ErrorKind::Data,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } | Error::CommittedRemotely { .. } => {
                ErrorKind::AlreadyExists
            }
            Error::DeadlineExceeded { .. } => ErrorKind::Unavailable,
            Error::RemoteRefused { .. } => ErrorKind::Invalid,
            Error::RetriesExhausted { .. } => ErrorKind::Unavailable,
            Error::MissingRank { .. } => ErrorKind::NotFound,
            Error::ShardOverlap { .. } | Error::ShardGap { .. } | Error::PartsDisagree { .. } => {
                ErrorKind::Invalid
            }
            Error::Closed | Error::Cancelled { .. } => ErrorKind::Closed,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// An [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Remote`].
    pub fn remote(op: &'static str, path: impl ToString, source: object_store::Error) -> Self {
        Error::Remote {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// An [`Error::InvalidInput`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn manifest(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::CorruptManifest {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// The kind of an operating-system I/O error: one that retrying cannot
/// cure (no permission, a read-only file system, a name too long) is the
/// caller's to fix; the rest (a full disk, a failed device, a store
/// directory replaced by a file, ...) may pass once the machine is mended.
fn io_kind(kind: std::io::ErrorKind) -> ErrorKind {
    use std::io::ErrorKind as K;
    match kind {
        K::PermissionDenied | K::ReadOnlyFilesystem | K::InvalidFilename => ErrorKind::Invalid,
        _ => ErrorKind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_that_retrying_cannot_cure_are_invalid() {
        let kind = |k| Error::io("open", "/x", std::io::Error::from(k)).kind();
        for k in [
            std::io::ErrorKind::PermissionDenied,
            std::io::ErrorKind::ReadOnlyFilesystem,
            std::io::ErrorKind::InvalidFilename,
        ] {
            assert_eq!(kind(k), ErrorKind::Invalid, "{k:?}");
        }
        for k in [
            std::io::ErrorKind::StorageFull,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::NotADirectory,
            std::io::ErrorKind::Other,
        ] {
            assert_eq!(kind(k), ErrorKind::Unavailable, "{k:?}");
        }
    }

    #[test]
    fn a_store_path_that_cannot_hold_a_store_is_invalid_input() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let opts = || crate::StoreOptions {
            staging_bytes: 16 << 20,
            ..crate::StoreOptions::default()
        };
        for root in [file.clone(), file.join("s"), std::path::PathBuf::new()] {
            let e = crate::Store::open(&root, opts())
                .err()
                .expect("no store there");
            assert_eq!(e.kind(), ErrorKind::Invalid, "{}: {e}", root.display());
            assert!(e.to_string().contains("store path"), "{e}");
        }
        let e = crate::Store::open_read_only("", opts())
            .err()
            .expect("no store at an empty path");
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(std::fs::read(&file).unwrap() == b"x", "the file is kept");
    }
}
