//! Temporary chunk files created ahead of their writes.
//!
//! Creating a file takes a handle on the file system's journal; while the
//! journal commits (each chunk's `fsync` forces a commit), a create waits,
//! 5-50 ms on a busy disk, and an early writer waiting there has no data
//! write in flight: in a traced 1 GiB save with a quarter of it staged,
//! the eight writers spent 1.1 s of their 5.4 s creating files.
//! [`TmpFileSupply`] creates them on threads of its own: one per early
//! write queued ([`TmpFileSupply::request`]) and, while a save that has
//! queued one is staging, [`RESERVE`] more; a writer takes one
//! ([`TmpFileSupply::take`]) and goes straight to its data write.
//!
//! [`TmpFileSupply::trim`] (after each commit) removes the files beyond
//! those still requested once no save is staging, and a closed supply
//! removes all it holds: a committed save leaves `tmp/` as it found it, and
//! a file the supply made is taken within moments, long before a
//! collection would count it stale.

use super::chunk_store::open_direct;
use super::durable::unique_tmp_name;
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// An empty temporary file in `tmp/`, open for O_DIRECT writes. Dropped
/// unused, it is removed.
pub struct PreCreated {
    file: std::fs::File,
    path: RemoveOnDrop,
    made: std::time::Instant,
}

/// A temporary file's path, the file removed when this is dropped unless
/// handed on first ([`RemoveOnDrop::take`]).
pub(super) struct RemoveOnDrop(PathBuf);

impl RemoveOnDrop {
    /// The path (empty once handed on).
    pub(super) fn path(&self) -> &Path {
        &self.0
    }

    /// Hand the path on: removing the file is then the caller's.
    pub(super) fn take(&mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl PreCreated {
    /// Create a new file at a unique name under `dir` (`stem.PID.N.tmp`).
    pub fn create(dir: &Path, stem: &str) -> Result<Self> {
        let path = dir.join(unique_tmp_name(stem));
        let file = open_direct(&path, true)?;
        Ok(PreCreated {
            file,
            path: RemoveOnDrop(path),
            made: std::time::Instant::now(),
        })
    }

    /// The file's path (still removed when dropped) and descriptor.
    pub(super) fn into_parts(self) -> (RemoveOnDrop, std::fs::File) {
        (self.path, self.file)
    }
}

/// Files kept made beyond those requested while a save is staging: about
/// what eight writers take during a journal commit under load.
pub const RESERVE: usize = 32;

/// A file made longer ago than this is not handed out but removed: a
/// collection removes temporary files older than [`crate::gc::TMP_MIN_AGE`]
/// (ten minutes), and a write into a file it removed could not be renamed.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Threads creating files: creates waiting for the same journal commit go
/// on together once it ends.
const SUPPLIERS: usize = 2;

/// What the suppliers and the writers share.
#[derive(Default)]
struct State {
    /// Requests not yet taken.
    requested: usize,
    /// Saves staging now.
    staging: usize,
    /// Whether a file was requested since staging began: only then is the
    /// reserve kept (a save of unchanged tensors writes nothing early).
    reserving: bool,
    /// Files being created now.
    creating: usize,
    /// Files made and not yet taken.
    ready: VecDeque<PreCreated>,
    /// A create failed: none is tried again until the next request or
    /// staging save.
    backoff: bool,
    /// No more files are made.
    closed: bool,
}

impl State {
    /// How many files should exist, made or being made.
    fn wanted(&self) -> usize {
        self.requested + if self.reserving { RESERVE } else { 0 }
    }
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    dir: PathBuf,
    /// [`MAX_AGE`], but for tests.
    max_age: std::time::Duration,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(s).unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates temporary files in a store's `tmp/` ahead of the O_DIRECT
/// writes that will fill them, on threads of their own
/// ("cairn-tmpfiles"). Closed (threads joined, unused files removed) on
/// [`TmpFileSupply::close`] or drop.
pub struct TmpFileSupply {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The stem of the supply's file names (`early.PID.N.tmp`).
const STEM: &str = "early";

impl TmpFileSupply {
    /// Start a supply of files in `dir`.
    pub fn start(dir: PathBuf) -> Result<Self> {
        Self::start_aging(dir, MAX_AGE)
    }

    /// [`Self::start`], handing out no file made longer than `max_age`
    /// ago.
    fn start_aging(dir: PathBuf, max_age: std::time::Duration) -> Result<Self> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            dir,
            max_age,
        });
        let supply = TmpFileSupply {
            inner,
            threads: Mutex::new(Vec::new()),
        };
        for i in 0..SUPPLIERS {
            let supplier = supply.inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("cairn-tmpfiles-{i}"))
                .spawn(move || supply_loop(&supplier))
                .map_err(|e| Error::Internal(format!("spawn temporary file thread: {e}")))?;
            supply
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t);
        }
        Ok(supply)
    }

    /// A save starts staging: from its first request on, keep [`RESERVE`]
    /// files ahead until the returned guard is dropped (its staging ends).
    pub fn staging(&self) -> StagingGuard {
        let mut s = self.inner.lock();
        s.staging += 1;
        s.backoff = false;
        self.inner.changed.notify_all();
        StagingGuard(self.inner.clone())
    }

    /// A write will [`Self::take`] a file: keep one made for it.
    pub fn request(&self) {
        let mut s = self.inner.lock();
        s.requested += 1;
        s.reserving = s.staging > 0;
        s.backoff = false;
        self.inner.changed.notify_all();
    }

    /// A file for a [`Self::request`] made earlier, if one is made (else
    /// the caller creates its own). Each request is met by one take.
    pub fn take(&self) -> Option<PreCreated> {
        let mut s = self.inner.lock();
        s.requested = s.requested.saturating_sub(1);
        let mut stale = Vec::new();
        let mut found = None;
        while let Some(f) = s.ready.pop_front() {
            if f.made.elapsed() <= self.inner.max_age {
                found = Some(f);
                break;
            }
            stale.push(f);
        }
        if !stale.is_empty() {
            self.inner.changed.notify_all();
        }
        drop(s);
        drop(stale);
        found
    }

    /// Once no save is staging, remove the files beyond those requested
    /// (after the ones being made are done), so a committed save leaves
    /// no file of the supply's that no write will take.
    pub fn trim(&self) {
        let mut s = self.inner.lock();
        while s.creating > 0 && s.staging == 0 {
            s = self.inner.wait(s);
        }
        if s.staging > 0 {
            return;
        }
        let keep = s.requested.min(s.ready.len());
        let extra: Vec<PreCreated> = s.ready.drain(keep..).collect();
        drop(s);
        drop(extra);
    }

    /// Stop making files, wait for the threads, and remove the files not
    /// taken. Takes after this find none.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.changed.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        let unused = std::mem::take(&mut self.inner.lock().ready);
        drop(unused);
    }
}

impl Drop for TmpFileSupply {
    fn drop(&mut self) {
        self.close();
    }
}

/// A save staging ([`TmpFileSupply::staging`]); dropped when its staging
/// ends.
pub struct StagingGuard(Arc<Inner>);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.staging = s.staging.saturating_sub(1);
        s.reserving &= s.staging > 0;
        self.0.changed.notify_all();
    }
}

fn supply_loop(inner: &Inner) {
    let mut s = inner.lock();
    loop {
        while !s.closed && (s.backoff || s.ready.len() + s.creating >= s.wanted()) {
            s = inner.wait(s);
        }
        if s.closed {
            return;
        }
        s.creating += 1;
        drop(s);
        // A failed create is not delivered: a take finds nothing and its
        // writer creates the file itself, reporting the error if it stays.
        let made = PreCreated::create(&inner.dir, STEM);
        s = inner.lock();
        s.creating -= 1;
        match made {
            Ok(f) => s.ready.push_back(f),
            Err(_) => s.backoff = true,
        }
        inner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::local::durable::sorted_names as names;

    /// O_DIRECT is not on every file system (tmpfs has none): the tests
    /// run where the build does.
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn requested_files_are_taken_and_a_trim_leaves_only_those() {
        let dir = scratch();
        let supply = TmpFileSupply::start(dir.path().to_path_buf()).unwrap();
        for _ in 0..64 {
            supply.request();
        }
        let mut taken = Vec::new();
        let mut own = 0;
        for _ in 0..64 {
            match supply.take() {
                Some(f) => taken.push(f.into_parts()),
                None => own += 1,
            }
        }
        assert_eq!(taken.len() + own, 64);
        // Whatever the race, once trimmed nothing is left but what was
        // taken.
        supply.trim();
        assert_eq!(names(dir.path()).len(), taken.len());
        for (path, _) in &taken {
            assert!(path.path().starts_with(dir.path()), "{:?}", path.path());
            assert!(names(dir.path()).iter().all(|n| n.starts_with("early.")));
        }
        supply.close();
        assert_eq!(
            names(dir.path()).len(),
            taken.len(),
            "close removed a taken file"
        );
        for (mut path, _) in taken {
            std::fs::remove_file(path.take()).unwrap();
        }
        assert_eq!(names(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_staging_save_gets_a_reserve_that_goes_once_it_is_trimmed() {
        let dir = scratch();
        let supply = TmpFileSupply::start(dir.path().to_path_buf()).unwrap();
        let staging = supply.staging();
        // Nothing is made before a write asks.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(names(dir.path()), Vec::<String>::new());
        // The first request brings the reserve with it.
        supply.request();
        wait_until("the reserve made", || {
            names(dir.path()).len() == RESERVE + 1
        });
        let (path, file) = supply.take().expect("a file made ahead").into_parts();
        supply.request();
        wait_until("the reserve made up", || {
            names(dir.path()).len() == RESERVE + 2
        });
        drop(supply.take().expect("a file made ahead"));
        // No trim while a save stages.
        supply.trim();
        assert_eq!(names(dir.path()).len(), RESERVE + 1);
        // One requested and not yet taken is kept; the rest go.
        supply.request();
        drop(staging);
        supply.trim();
        assert_eq!(names(dir.path()).len(), 2);
        drop(supply.take().expect("the requested file"));
        drop(file);
        supply.request();
        drop(supply);
        assert_eq!(
            names(dir.path()),
            vec![path
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()],
            "a file not taken outlived the supply"
        );
    }

    #[test]
    fn a_file_made_too_long_ago_is_removed_not_handed_out() {
        let dir = scratch();
        let supply =
            TmpFileSupply::start_aging(dir.path().to_path_buf(), std::time::Duration::ZERO)
                .unwrap();
        supply.request();
        wait_until("the file made", || names(dir.path()).len() == 1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(supply.take().is_none(), "a stale file was handed out");
        assert_eq!(names(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_supply_that_cannot_create_hands_out_nothing() {
        let dir = scratch();
        let supply = TmpFileSupply::start(dir.path().join("absent")).unwrap();
        let _staging = supply.staging();
        supply.request();
        // Both suppliers try and back off; a take finds nothing to use.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(supply.take().is_none());
        supply.trim();
        assert_eq!(names(dir.path()), Vec::<String>::new());
    }
}
