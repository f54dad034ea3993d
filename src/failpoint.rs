//! Named fail points at the commit edges, for tests that stop a commit at
//! an exact moment (behind the `test-util` feature; without it every point
//! is an empty inline function).
//!
//! Each point counts its hits; an action set for it by a test
//! (`set`) runs at the hit and may fail the operation there with an I/O
//! error, as a process stopped at that moment would leave it (a test
//! combines it with `SimDisk::crash_at` to stop the disk too). A process
//! started with `CAIRN_FAILPOINT_PAUSE=<name>[,<name>...]` (a `cairn`
//! binary built with the feature, as the CLI tests build it) instead
//! stops for good at the first hit of a named point, after writing
//! `cairn: paused at fail point <name>` to stderr: a test waits for that
//! line and kills the process exactly there. The points:
//!
//! | name | where |
//! |---|---|
//! | `publish.before_tmp` | a create-only publication (a manifest), before its temporary file is created |
//! | `publish.after_tmp_sync` | after the temporary file is written and fsynced |
//! | `publish.before_link` | just before the hard link into place |
//! | `publish.after_link` | after the link, before the directory fsync |
//! | `publish.after_dir_sync` | after the directory fsync: the publication is durable |
//! | `chunk.batch_dirty` | the barrier's check of the machine's dirty page cache before a batch sync: an error makes it take the machine as holding too much, and the batch is made durable file by file (`fdatasync` each) instead of by `syncfs` |
//! | `chunk.batch_sync` | a batch of chunk files written with O_DIRECT, before the `syncfs` that makes them durable (they are renamed to their final names only after it) |
//! | `chunk.early_write` | an early writer, before it writes a chunk's payload (an error makes the chunk take the usual path once hashed) |
//! | `chunk.early_hash` | a worker, before it hashes a chunk an early writer is writing at the same time |
//! | `copy.before_commit` | a copy between tiers, every chunk at the target, before the manifest commit |
//! | `pack.after_put` | a copy to a remote that packs, after each pack is stored (before the pack map) |
//! | `remote.after_manifest_put` | a remote manifest put that succeeded, before its caller learns of it |
//! | `remote_commit.before_record` | a remote commit of a sharded step (`RemoteStore::commit`, the flush daemon's), every part read and checked, before the record is put |
//! | `upload.before_marker` | an upload (the flush daemon's), after the remote commit, before the local upload marker |

/// Every fail point name.
#[cfg_attr(not(feature = "test-util"), allow(dead_code))]
pub const NAMES: &[&str] = &[
    "publish.before_tmp",
    "publish.after_tmp_sync",
    "publish.before_link",
    "publish.after_link",
    "publish.after_dir_sync",
    "chunk.batch_dirty",
    "chunk.batch_sync",
    "chunk.early_write",
    "chunk.early_hash",
    "copy.before_commit",
    "pack.after_put",
    "remote.after_manifest_put",
    "remote_commit.before_record",
    "upload.before_marker",
];

#[cfg(feature = "test-util")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, MutexGuard};

    /// What a fail point does when hit: `Some(error)` fails the operation.
    pub type Action = Arc<dyn Fn() -> Option<std::io::Error> + Send + Sync>;

    #[derive(Default)]
    struct Registry {
        actions: HashMap<String, Action>,
        hits: HashMap<String, u64>,
    }

    fn registry() -> MutexGuard<'static, Registry> {
        static REG: std::sync::LazyLock<Mutex<Registry>> =
            std::sync::LazyLock::new(|| Mutex::new(Registry::default()));
        REG.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run fail point `name`: count the hit and run its action, if any;
    /// stop the process there for good if `CAIRN_FAILPOINT_PAUSE` names it.
    pub fn hit(name: &str) -> std::io::Result<()> {
        if std::env::var("CAIRN_FAILPOINT_PAUSE")
            .is_ok_and(|v| v.split(',').any(|p| p.trim() == name))
        {
            eprintln!("cairn: paused at fail point {name}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let action = {
            let mut r = registry();
            *r.hits.entry(name.to_string()).or_insert(0) += 1;
            r.actions.get(name).cloned()
        };
        match action.and_then(|a| a()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Set the action of fail point `name` (replacing any earlier one).
    pub fn set(name: &str, action: impl Fn() -> Option<std::io::Error> + Send + Sync + 'static) {
        registry()
            .actions
            .insert(name.to_string(), Arc::new(action));
    }

    /// Fail every hit of `name` with an I/O error naming the point.
    pub fn fail(name: &str) {
        let n = name.to_string();
        set(name, move || {
            Some(std::io::Error::other(format!("fail point {n}")))
        });
    }

    /// Remove the action of fail point `name`; it only counts from now on.
    pub fn remove(name: &str) {
        registry().actions.remove(name);
    }

    /// How many times fail point `name` was hit since the last [`reset`].
    pub fn hits(name: &str) -> u64 {
        registry().hits.get(name).copied().unwrap_or(0)
    }

    /// Remove every action and zero every counter.
    pub fn reset() {
        let mut r = registry();
        r.actions.clear();
        r.hits.clear();
    }
}

#[cfg(feature = "test-util")]
pub use imp::{fail, hits, remove, reset, set, Action};

#[cfg(feature = "test-util")]
pub(crate) use imp::hit;

/// Fail point `name`: nothing without the `test-util` feature.
#[cfg(not(feature = "test-util"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) -> std::io::Result<()> {
    Ok(())
}
