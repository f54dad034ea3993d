//! [`SimDisk`]: a simulated disk under a local store, for tests of crash
//! consistency and I/O errors.
//!
//! Every call through the seam is carried out on a real directory, so
//! everything that reads the store (listings, manifests, chunk reads) sees
//! what a running process sees: the page cache. Next to it the disk keeps
//! a model of what is *durable*: the contents of each file as of its last
//! fsync, and the entries of each directory as of its last directory
//! fsync. [`SimDisk::power_loss`] rewrites the directory to that durable
//! state and drops everything else, the way a power cut drops the page
//! cache: a file created, renamed, linked or removed whose directory was
//! not fsynced since reverts, and a file's unsynced writes are lost. A sync
//! of the whole file system (`syncfs`) makes everything durable.
//!
//! [`SimDisk::crash_at`] arms a power loss just before the n-th operation
//! (counting creates, writes, fsyncs, renames, links, removals and
//! directory creations): that operation and every later one fail, as on a
//! machine that stopped. Faults without a crash: writes past
//! [`SimDisk::set_space_left`] fail with `ENOSPC`, the fsync chosen by
//! [`SimDisk::fail_sync_after`] with the errno given, and reads of a file
//! given to [`SimDisk::fail_reads_of`] with `EIO`, and removals of an
//! entry given to [`SimDisk::fail_removals_of`] with `EACCES`.

use super::fs::{Fs, FsFile, FsReadFile};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{Error, ErrorKind, Result, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A simulated disk rooted at a real, initially empty directory. Share it
/// with a store through [`crate::Store::open_with_fs`].
#[derive(Debug)]
pub struct SimDisk {
    root: PathBuf,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
enum Node {
    File {
        live: Vec<u8>,
        durable: Vec<u8>,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    next: u64,
    root: u64,
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
    space_left: Option<u64>,
    /// Fail the fsync (of a file or a directory) after this many more
    /// succeed, with this errno.
    sync_fault: Option<(u64, i32)>,
    eio_reads: HashSet<PathBuf>,
    /// Entries whose removal fails with `EACCES`.
    undeletable: HashSet<PathBuf>,
    /// Syncs of the whole file system so far.
    filesystem_syncs: u64,
}

fn lost_power() -> Error {
    Error::other("the simulated disk lost power")
}

fn off_disk(path: &Path) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("{} is not on the simulated disk", path.display()),
    )
}

impl State {
    fn empty() -> State {
        let mut nodes = HashMap::new();
        nodes.insert(
            0,
            Node::Dir {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
            },
        );
        State {
            nodes,
            next: 1,
            root: 0,
            ops: 0,
            crash_at: None,
            crashed: false,
            space_left: None,
            sync_fault: None,
            eio_reads: HashSet::new(),
            undeletable: HashSet::new(),
            filesystem_syncs: 0,
        }
    }

    /// Count one operation, or fail it if the power is (now) off.
    fn tick(&mut self) -> Result<()> {
        if self.crashed || self.crash_at == Some(self.ops) {
            self.crashed = true;
            return Err(lost_power());
        }
        self.ops += 1;
        Ok(())
    }

    /// Apply an armed fsync fault: `Err` if this fsync is the one to fail.
    fn sync_fault(&mut self) -> Result<()> {
        match self.sync_fault {
            Some((0, errno)) => {
                self.sync_fault = None;
                Err(Error::from_raw_os_error(errno))
            }
            Some((n, errno)) => {
                self.sync_fault = Some((n - 1, errno));
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn new_node(&mut self, node: Node) -> u64 {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(id, node);
        id
    }

    fn entries(&mut self, dir: u64) -> Option<&mut BTreeMap<OsString, u64>> {
        match self.nodes.get_mut(&dir) {
            Some(Node::Dir { live, .. }) => Some(live),
            _ => None,
        }
    }

    /// The node at `rel` (components below the root), through live entries.
    fn lookup(&self, rel: &[OsString]) -> Option<u64> {
        let mut cur = self.root;
        for c in rel {
            match self.nodes.get(&cur) {
                Some(Node::Dir { live, .. }) => cur = *live.get(c)?,
                _ => return None,
            }
        }
        Some(cur)
    }
}

impl SimDisk {
    /// A simulated disk on `root`, an existing empty directory, whose
    /// entry is itself durable.
    pub fn new(root: impl Into<PathBuf>) -> Result<Arc<SimDisk>> {
        let root = root.into();
        if std::fs::read_dir(&root)?.next().is_some() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is not empty", root.display()),
            ));
        }
        Ok(Arc::new(SimDisk {
            root,
            state: Arc::new(Mutex::new(State::empty())),
        }))
    }

    /// The directory the disk lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Operations carried out since the disk was created or last lost power.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Syncs of the whole file system (`syncfs`) since the disk was
    /// created.
    pub fn filesystem_syncs(&self) -> u64 {
        self.lock().filesystem_syncs
    }

    /// Lose power just before operation `n` (0-based, counted as by
    /// [`SimDisk::ops`]): it and every later operation fail.
    pub fn crash_at(&self, n: u64) {
        self.lock().crash_at = Some(n);
    }

    /// Whether the armed crash point was reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Fail writes with `ENOSPC` once `bytes` more have been written
    /// (`None`: unlimited space).
    pub fn set_space_left(&self, bytes: Option<u64>) {
        self.lock().space_left = bytes;
    }

    /// Let `after` more fsyncs (of files or directories) succeed, then fail
    /// the next one with `errno` (say `libc::ENOSPC` or `libc::EIO`); it
    /// makes nothing durable.
    pub fn fail_sync_after(&self, after: u64, errno: i32) {
        self.lock().sync_fault = Some((after, errno));
    }

    /// Disarm [`SimDisk::fail_sync_after`]; whether it fired.
    pub fn clear_sync_fault(&self) -> bool {
        self.lock().sync_fault.take().is_none()
    }

    /// Fail every read of the file at `path` with `EIO` (until
    /// [`SimDisk::clear_read_failures`]).
    pub fn fail_reads_of(&self, path: impl Into<PathBuf>) {
        self.lock().eio_reads.insert(path.into());
    }

    /// Stop failing reads.
    pub fn clear_read_failures(&self) {
        self.lock().eio_reads.clear();
    }

    /// Fail every removal of the file or directory at `path` with
    /// `EACCES`, as for an entry this process may not remove (until
    /// [`SimDisk::clear_removal_failures`]).
    pub fn fail_removals_of(&self, path: impl Into<PathBuf>) {
        self.lock().undeletable.insert(path.into());
    }

    /// Stop failing removals.
    pub fn clear_removal_failures(&self) {
        self.lock().undeletable.clear();
    }

    /// Cut the power: rewrite the directory to its durable state, dropping
    /// every write, rename, link, removal and directory entry not made
    /// durable by an fsync of the file or its directory. The disk then
    /// runs again (powered, counters reset, no crash armed). Close the
    /// store on it first.
    pub fn power_loss(&self) -> Result<()> {
        let mut st = self.lock();
        for ent in std::fs::read_dir(&self.root)? {
            let ent = ent?;
            if ent.file_type()?.is_dir() {
                std::fs::remove_dir_all(ent.path())?;
            } else {
                std::fs::remove_file(ent.path())?;
            }
        }
        let mut fresh = State::empty();
        let mut written: HashMap<u64, (PathBuf, u64)> = HashMap::new();
        rebuild(&st, st.root, &self.root, &mut fresh, 0, &mut written)?;
        fresh.space_left = st.space_left;
        fresh.eio_reads = std::mem::take(&mut st.eio_reads);
        fresh.undeletable = std::mem::take(&mut st.undeletable);
        fresh.filesystem_syncs = st.filesystem_syncs;
        *st = fresh;
        Ok(())
    }

    fn split(&self, path: &Path) -> Result<Vec<OsString>> {
        let rel = path.strip_prefix(&self.root).map_err(|_| off_disk(path))?;
        rel.components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n.to_os_string()),
                _ => Err(off_disk(path)),
            })
            .collect()
    }

    /// The directory node holding `path`, and `path`'s name in it.
    fn parent(&self, st: &State, path: &Path) -> Result<(u64, OsString)> {
        let mut rel = self.split(path)?;
        let name = rel.pop().ok_or_else(|| off_disk(path))?;
        let dir = st.lookup(&rel).ok_or_else(|| off_disk(path))?;
        match st.nodes.get(&dir) {
            Some(Node::Dir { .. }) => Ok((dir, name)),
            _ => Err(off_disk(path)),
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Recreate the durable content of directory `dir` of `old` at `path`, as
/// directory `into` of `fresh`.
fn rebuild(
    old: &State,
    dir: u64,
    path: &Path,
    fresh: &mut State,
    into: u64,
    written: &mut HashMap<u64, (PathBuf, u64)>,
) -> Result<()> {
    let Some(Node::Dir { durable, .. }) = old.nodes.get(&dir) else {
        return Ok(());
    };
    for (name, &child) in durable {
        let p = path.join(name);
        let new_id = match old.nodes.get(&child) {
            Some(Node::File { durable: data, .. }) => {
                if let Some((first, id)) = written.get(&child) {
                    std::fs::hard_link(first, &p)?;
                    *id
                } else {
                    std::fs::write(&p, data)?;
                    let id = fresh.new_node(Node::File {
                        live: data.clone(),
                        durable: data.clone(),
                    });
                    written.insert(child, (p.clone(), id));
                    id
                }
            }
            Some(Node::Dir { .. }) => {
                std::fs::create_dir(&p)?;
                let id = fresh.new_node(Node::Dir {
                    live: BTreeMap::new(),
                    durable: BTreeMap::new(),
                });
                rebuild(old, child, &p, fresh, id, written)?;
                id
            }
            None => continue,
        };
        if let Some(Node::Dir { live, durable }) = fresh.nodes.get_mut(&into) {
            live.insert(name.clone(), new_id);
            durable.insert(name.clone(), new_id);
        }
    }
    Ok(())
}

/// A file being written on a [`SimDisk`].
struct SimFile {
    state: Arc<Mutex<State>>,
    node: u64,
    file: File,
}

impl FsFile for SimFile {
    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        let mut st = lock(&self.state);
        st.tick()?;
        if let Some(left) = st.space_left {
            if (buf.len() as u64) > left {
                st.space_left = Some(0);
                return Err(Error::from_raw_os_error(libc::ENOSPC));
            }
            st.space_left = Some(left - buf.len() as u64);
        }
        self.file.write_all(buf)?;
        if let Some(Node::File { live, .. }) = st.nodes.get_mut(&self.node) {
            live.extend_from_slice(buf);
        }
        Ok(())
    }

    fn sync_data(&mut self) -> Result<()> {
        let mut st = lock(&self.state);
        st.tick()?;
        st.sync_fault()?;
        if let Some(Node::File { live, durable }) = st.nodes.get_mut(&self.node) {
            durable.clone_from(live);
        }
        Ok(())
    }
}

/// A file being read on a [`SimDisk`].
struct SimReadFile {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    file: File,
}

impl FsReadFile for SimReadFile {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if lock(&self.state).eio_reads.contains(&self.path) {
            return Err(Error::from_raw_os_error(libc::EIO));
        }
        self.file.read_exact_at(buf, off)
    }

    fn metadata(&self) -> Result<Metadata> {
        self.file.metadata()
    }
}

impl Fs for SimDisk {
    fn create_new(&self, path: &Path) -> Result<Box<dyn FsFile>> {
        let mut st = self.lock();
        st.tick()?;
        let (dir, name) = self.parent(&st, path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)?;
        let node = st.new_node(Node::File {
            live: Vec::new(),
            durable: Vec::new(),
        });
        if let Some(e) = st.entries(dir) {
            e.insert(name, node);
        }
        Ok(Box::new(SimFile {
            state: self.state.clone(),
            node,
            file,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let (fdir, fname) = self.parent(&st, from)?;
        let (tdir, tname) = self.parent(&st, to)?;
        std::fs::rename(from, to)?;
        if let Some(node) = st.entries(fdir).and_then(|e| e.remove(&fname)) {
            if let Some(e) = st.entries(tdir) {
                e.insert(tname, node);
            }
        }
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let (fdir, fname) = self.parent(&st, from)?;
        let (tdir, tname) = self.parent(&st, to)?;
        std::fs::hard_link(from, to)?;
        if let Some(node) = st.entries(fdir).and_then(|e| e.get(&fname).copied()) {
            if let Some(e) = st.entries(tdir) {
                e.insert(tname, node);
            }
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        let mut st = self.lock();
        st.tick()?;
        if st.undeletable.contains(path) {
            return Err(Error::from_raw_os_error(libc::EACCES));
        }
        let (dir, name) = self.parent(&st, path)?;
        std::fs::remove_file(path)?;
        if let Some(e) = st.entries(dir) {
            e.remove(&name);
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        let mut st = self.lock();
        st.tick()?;
        if st.undeletable.contains(path) {
            return Err(Error::from_raw_os_error(libc::EACCES));
        }
        let (dir, name) = self.parent(&st, path)?;
        std::fs::remove_dir_all(path)?;
        if let Some(e) = st.entries(dir) {
            e.remove(&name);
        }
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let (dir, name) = self.parent(&st, path)?;
        std::fs::create_dir(path)?;
        let node = st.new_node(Node::Dir {
            live: BTreeMap::new(),
            durable: BTreeMap::new(),
        });
        if let Some(e) = st.entries(dir) {
            e.insert(name, node);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let mut st = self.lock();
        st.tick()?;
        st.sync_fault()?;
        let rel = self.split(dir)?;
        let node = st.lookup(&rel).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("{} not found", dir.display()))
        })?;
        match st.nodes.get_mut(&node) {
            Some(Node::Dir { live, durable }) => {
                durable.clone_from(live);
                Ok(())
            }
            _ => Err(Error::new(
                ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            )),
        }
    }

    fn sync_filesystem(&self, _path: &Path) -> Option<Result<()>> {
        let mut st = self.lock();
        let res = st.tick().and_then(|()| st.sync_fault());
        if res.is_ok() {
            st.filesystem_syncs += 1;
            for node in st.nodes.values_mut() {
                match node {
                    Node::File { live, durable } => durable.clone_from(live),
                    Node::Dir { live, durable } => durable.clone_from(live),
                }
            }
        }
        Some(res)
    }

    fn open_read(&self, path: &Path) -> Result<Box<dyn FsReadFile>> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)?;
        Ok(Box::new(SimReadFile {
            state: self.state.clone(),
            path: path.to_path_buf(),
            file,
        }))
    }

    fn allows_direct_io(&self) -> bool {
        false
    }
}
