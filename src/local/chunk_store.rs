//! Content-addressed chunk files on local disk.
//!
//! A chunk is written to `tmp/` under a unique name, fsync'd, and only then
//! renamed to `chunks/<2 hex>/<64 hex>`: a file at its final name is always
//! complete, so finding one is enough to skip writing it again (dedup).

use super::durable::{create_dir_all_durable_on, fsync_dir_on, fsync_dirs_on, unique_tmp_name};
use super::fs::{FsFile, FsReadFile, RealFile};
use super::tmp_files::{PreCreated, RemoveOnDrop};
use crate::chunk_id::ChunkId;
use crate::codec::Decoder;
use crate::error::{Error, Result};
use crate::format::chunk::{ChunkHeader, Codec, ALIGNED_PAYLOAD_OFFSET, HEADER_LEN};
use crate::layout::{check_store_dir, Layout};
use crate::staging::StagingBuf;
use crate::staging::ALIGN;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How many fan-out directory fsyncs [`LocalChunkStore::sync_prefix_dirs`]
/// runs at once. A save touches up to 256 directories; one after the
/// other their cache flushes add up to tens of milliseconds at commit.
const PREFIX_SYNC_THREADS: usize = 8;

/// [`LocalChunkStore::sync_prefix_dirs`] for the store laid out at
/// `layout`, for callers holding only the layout (the save's commit).
pub fn sync_prefix_dirs_of(layout: &Layout, prefixes: impl IntoIterator<Item = u8>) -> Result<()> {
    let dirs: Vec<PathBuf> = prefixes
        .into_iter()
        .map(|p| layout.chunk_dir_for_prefix(p))
        .collect();
    fsync_dirs_on(layout.fs(), &dirs, PREFIX_SYNC_THREADS)
}

/// The chunk files of one local store.
#[derive(Debug, Clone)]
pub struct LocalChunkStore {
    layout: Layout,
    direct: bool,
}

/// A chunk written to a temporary file, waiting for fsync and rename.
pub struct PendingChunk {
    file: Box<dyn FsFile>,
    layout: Layout,
    tmp: PathBuf,
    dest: PathBuf,
    /// Bytes written (header + payload).
    pub stored_bytes: u64,
}

impl PendingChunk {
    /// fsync the data and rename it to its final name.
    pub fn finish(mut self) -> Result<()> {
        match self.file.sync_data() {
            Ok(()) => self.publish_synced(),
            Err(e) => {
                let _ = self.layout.fs().remove_file(&self.tmp);
                Err(Error::io("fsync chunk", &self.tmp, e))
            }
        }
    }

    /// Rename it to its final name with no fsync of its own: for a file
    /// already durable, made so by [`LocalChunkStore::sync_filesystem`]
    /// called after its write returned.
    pub fn publish_synced(self) -> Result<()> {
        let fs = self.layout.fs();
        let res = check_fan_out_dir(&self.dest).and_then(|()| {
            fs.rename(&self.tmp, &self.dest)
                .map_err(|e| Error::io("rename chunk into place", &self.dest, e))
        });
        if res.is_err() {
            let _ = fs.remove_file(&self.tmp);
        }
        res
    }

    /// The temporary file, for messages.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Remove the temporary file.
    pub fn abandon(self) {
        let _ = self.layout.fs().remove_file(&self.tmp);
    }
}

/// A raw chunk's payload written to a temporary file before its hash was
/// known ([`LocalChunkStore::write_payload_early`]). Its header block is
/// still zeros, so it is not a chunk file yet; dropped without
/// [`EarlyChunk::finish`] (the chunk turned out to be stored already, or
/// the save failed), the file is removed.
pub struct EarlyChunk {
    layout: Layout,
    /// The temporary file, removed on drop unless
    /// [`EarlyChunk::finish`] has handed it on.
    tmp: RemoveOnDrop,
    len: u64,
}

impl EarlyChunk {
    /// Write the header block (with O_DIRECT, as the payload) now that the
    /// chunk's hash is known: the file becomes a complete chunk file, still
    /// under its temporary name, for [`PendingChunk::finish`] to make
    /// durable and rename into place. `header` must describe this payload
    /// stored raw. The file is opened again here: between the two writes
    /// it holds no descriptor, so chunks waiting to be hashed cannot run a
    /// process out of them. On failure the file is removed.
    pub fn finish(mut self, header: &ChunkHeader) -> Result<PendingChunk> {
        if header.codec != Codec::Raw || header.stored_len != self.len {
            return Err(Error::Internal(format!(
                "header for a {} {:?} payload on an early-written {}-byte one",
                header.stored_len, header.codec, self.len
            )));
        }
        let file = open_direct(self.tmp.path(), false)?;
        let block = header_block(header);
        write_all_vectored_at(&file, &[block.as_slice()], 0)
            .map_err(|e| Error::io("write chunk header (O_DIRECT)", self.tmp.path(), e))?;
        Ok(PendingChunk {
            file: Box::new(RealFile(file)),
            layout: self.layout.clone(),
            tmp: self.tmp.take(),
            dest: self.layout.chunk_path(&header.id),
            stored_bytes: ALIGNED_PAYLOAD_OFFSET as u64 + self.len,
        })
    }
}

impl LocalChunkStore {
    /// The chunk store of `layout`.
    pub fn new(layout: Layout) -> Self {
        LocalChunkStore {
            layout,
            direct: false,
        }
    }

    /// Make everything written so far to the store's file system durable,
    /// data and metadata: `syncfs(2)` on the store's root, one metadata
    /// write-out (a journal commit, or the inode writes without a journal)
    /// and one cache flush for every chunk file written before the call,
    /// where an `fdatasync` each would cost one per file.
    pub fn sync_filesystem(&self) -> std::io::Result<()> {
        super::fs::syncfs(self.layout.root())
    }

    /// Whether [`Self::sync_filesystem`] is known to make this store's
    /// files and names durable ([`super::fs::syncfs_commits`]).
    pub fn syncfs_commits(&self) -> bool {
        super::fs::syncfs_commits(self.layout.root())
    }

    /// Use O_DIRECT for raw chunk payloads if the file system supports it
    /// (probed with a real write in `tmp/`) and the store's filesystem
    /// seam allows it. Returns whether it is on.
    pub fn enable_direct_io(&mut self) -> bool {
        if !self.layout.fs().allows_direct_io() {
            self.direct = false;
            return false;
        }
        let probe = self.layout.tmp_dir().join(unique_tmp_name("direct-probe"));
        let ok = (|| -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_DIRECT)
                .open(&probe)?;
            let block = AlignedBlock::new();
            f.write_all_at(block.as_slice(), 0)
        })()
        .is_ok();
        let _ = std::fs::remove_file(&probe);
        self.direct = ok;
        ok
    }

    /// Whether raw payloads are written with O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// Create the chunk fan-out directories (idempotent). Fails, naming
    /// it, if `chunks/` or a fan-out directory is a symbolic link.
    pub fn init(&self) -> Result<()> {
        check_store_dir(&self.layout.chunks_dir())?;
        let fs = self.layout.fs();
        create_dir_all_durable_on(fs, &self.layout.chunks_dir())?;
        let mut created = false;
        for p in 0..=255u8 {
            let d = self.layout.chunk_dir_for_prefix(p);
            if check_store_dir(&d)? {
                continue;
            }
            match fs.create_dir(&d) {
                Ok(()) => created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("create directory", &d, e)),
            }
        }
        if created {
            fsync_dir_on(fs, &self.layout.chunks_dir())?;
        }
        Ok(())
    }

    /// The store layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether a complete chunk file for `id` exists (a regular file; a
    /// link in its place is not one).
    pub fn contains(&self, id: &ChunkId) -> bool {
        std::fs::symlink_metadata(self.layout.chunk_path(id)).is_ok_and(|m| m.is_file())
    }

    /// Whether stored chunk `id` of `len` uncompressed bytes may be reused
    /// by a new checkpoint instead of written: a regular file whose header
    /// names `id` and `len`, whose size matches the header and whose padding
    /// is zero (one open and a read of the header block). With `full`, its payload is
    /// also read, decoded and hashed. Any failure means "write it again".
    pub fn is_reusable(&self, id: &ChunkId, len: u64, full: bool) -> bool {
        let Ok(chunk) = self.open_chunk(id, len) else {
            return false;
        };
        if !full {
            return true;
        }
        let Ok(mut decoder) = Decoder::new() else {
            return false;
        };
        let mut out = vec![0u8; len as usize];
        chunk
            .read_verified(&mut out, &mut Vec::new(), &mut decoder)
            .is_ok()
    }

    /// Write header + payload to a temporary file and start its writeback.
    pub fn begin_write(&self, header: &ChunkHeader, payload: &[u8]) -> Result<PendingChunk> {
        let tmp = self
            .layout
            .tmp_dir()
            .join(unique_tmp_name(&header.id.to_hex()));
        let fs = self.layout.fs();
        let mut file = fs
            .create_new(&tmp)
            .map_err(|e| Error::io("create file", &tmp, e))?;
        let header = ChunkHeader {
            payload_offset: HEADER_LEN as u32,
            ..*header
        };
        let res = file
            .write_all(&header.encode())
            .and_then(|()| file.write_all(payload));
        if let Err(e) = res {
            drop(file);
            let _ = fs.remove_file(&tmp);
            return Err(Error::io("write chunk", &tmp, e));
        }
        file.start_writeback();
        Ok(PendingChunk {
            file,
            layout: self.layout.clone(),
            tmp,
            dest: self.layout.chunk_path(&header.id),
            stored_bytes: (HEADER_LEN + payload.len()) as u64,
        })
    }

    /// Write a raw chunk with O_DIRECT straight from its staging buffer:
    /// one 4 KiB header block and the page-aligned payload in one
    /// `pwritev`, then a truncate to the exact length; the buffer's padding
    /// ([`StagingBuf::zero_padding`]) is written past the payload and cut
    /// off by the truncate. Falls back to [`Self::begin_write`] when direct
    /// I/O is off.
    pub fn write_direct(&self, header: &ChunkHeader, buf: &StagingBuf) -> Result<PendingChunk> {
        if !self.direct || header.codec != Codec::Raw {
            return self.begin_write(header, buf);
        }
        let tmp = self
            .layout
            .tmp_dir()
            .join(unique_tmp_name(&header.id.to_hex()));
        let file = open_direct(&tmp, true)?;
        let block = header_block(header);
        let len = buf.len() as u64;
        // Header block and payload in one request.
        let res = write_all_vectored_at(&file, &[block.as_slice(), buf.padded()], 0)
            .and_then(|()| cut_padding(&file, len));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("write chunk (O_DIRECT)", &tmp, e));
        }
        Ok(PendingChunk {
            file: Box::new(RealFile(file)),
            layout: self.layout.clone(),
            tmp,
            dest: self.layout.chunk_path(&header.id),
            stored_bytes: ALIGNED_PAYLOAD_OFFSET as u64 + len,
        })
    }

    /// Write a raw chunk's payload with O_DIRECT straight from its staging
    /// buffer before its hash is known, to a temporary file with no header
    /// yet: its 4 KiB header block is written as zeros in the same request
    /// (so the file is allocated in one piece, and the header's own write
    /// in [`EarlyChunk::finish`] overwrites a block already allocated).
    /// `None` when direct I/O is off: the chunk then takes the usual path.
    /// As with [`Self::write_direct`], the buffer's padding is written past
    /// the payload and cut off. `made` is a file created for it ahead
    /// ([`super::TmpFileSupply`]); without one, it creates its own.
    pub fn write_payload_early(
        &self,
        buf: &StagingBuf,
        made: Option<PreCreated>,
    ) -> Result<Option<EarlyChunk>> {
        if !self.direct {
            return Ok(None);
        }
        let (tmp, file) = match made {
            Some(made) => made.into_parts(),
            None => PreCreated::create(&self.layout.tmp_dir(), "early")?.into_parts(),
        };
        let early = EarlyChunk {
            layout: self.layout.clone(),
            tmp,
            len: buf.len() as u64,
        };
        let zeros = AlignedBlock::new();
        write_all_vectored_at(&file, &[zeros.as_slice(), buf.padded()], 0)
            .and_then(|()| cut_padding(&file, early.len))
            .map_err(|e| Error::io("write chunk (O_DIRECT)", early.tmp.path(), e))?;
        Ok(Some(early))
    }

    /// Store a whole chunk object (as fetched from another tier) under its
    /// final name: temp file, fsync, rename, directory fsync. The caller
    /// has verified it.
    pub fn put_object(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        let tmp = self.layout.tmp_dir().join(unique_tmp_name(&id.to_hex()));
        let fs = self.layout.fs();
        let mut f = fs
            .create_new(&tmp)
            .map_err(|e| Error::io("create file", &tmp, e))?;
        let dest = self.layout.chunk_path(id);
        let res = f
            .write_all(bytes)
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io("write chunk copied from another tier", &tmp, e))
            .and_then(|()| check_fan_out_dir(&dest))
            .and_then(|()| {
                fs.rename(&tmp, &dest)
                    .map_err(|e| Error::io("rename chunk into place", &dest, e))
            });
        drop(f);
        if let Err(e) = res {
            let _ = fs.remove_file(&tmp);
            return Err(e);
        }
        self.sync_prefix_dir(id.0[0])
    }

    /// Read a whole chunk file as stored (header, padding and payload),
    /// for copying it to another tier. Checks the header against `id` and
    /// `expected_len` first.
    pub fn read_object(&self, id: &ChunkId, expected_len: u64) -> Result<Vec<u8>> {
        let chunk = self.open_chunk(id, expected_len)?;
        let len = chunk.header.payload_offset as u64 + chunk.header.stored_len;
        let mut buf = vec![0u8; len as usize];
        read_exact_at(&*chunk.file, &mut buf, 0, &chunk.path, id)?;
        Ok(buf)
    }

    /// Stored size of every chunk file.
    pub fn stored_sizes(&self) -> std::collections::HashMap<ChunkId, u64> {
        let mut out = std::collections::HashMap::new();
        for p in 0..=255u8 {
            let Ok(rd) = std::fs::read_dir(self.layout.chunk_dir_for_prefix(p)) else {
                continue;
            };
            for e in rd.flatten() {
                if let (Some(id), Ok(m)) = (
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.parse::<ChunkId>().ok()),
                    e.metadata(),
                ) {
                    out.insert(id, m.len());
                }
            }
        }
        out
    }

    /// The ids of every chunk file, from the names in the fan-out
    /// directories alone (no file is opened or examined). `None` if a
    /// directory cannot be read or there are more than `max` names.
    pub fn list_ids(&self, max: usize) -> Option<std::collections::HashSet<ChunkId>> {
        let mut out = std::collections::HashSet::new();
        for p in 0..=255u8 {
            let rd = std::fs::read_dir(self.layout.chunk_dir_for_prefix(p)).ok()?;
            for e in rd {
                let e = e.ok()?;
                if let Some(id) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<ChunkId>().ok())
                {
                    if id.0[0] == p {
                        out.insert(id);
                    }
                }
                if out.len() > max {
                    return None;
                }
            }
        }
        Some(out)
    }

    /// fsync the fan-out directory holding chunks with this first byte.
    pub fn sync_prefix_dir(&self, prefix: u8) -> Result<()> {
        fsync_dir_on(self.layout.fs(), &self.layout.chunk_dir_for_prefix(prefix))
    }

    /// fsync the fan-out directories of these first bytes, several at a
    /// time ([`PREFIX_SYNC_THREADS`]): the names of chunks renamed into
    /// them become durable. Returns after all of them, or with the first
    /// error.
    pub fn sync_prefix_dirs(&self, prefixes: impl IntoIterator<Item = u8>) -> Result<()> {
        sync_prefix_dirs_of(&self.layout, prefixes)
    }

    /// Open chunk `id` and validate its header against the expected
    /// uncompressed length and the file's size, before anything is
    /// allocated for its contents.
    pub fn open_chunk(&self, id: &ChunkId, expected_len: u64) -> Result<OpenChunk> {
        let path = self.layout.chunk_path(id);
        // O_NONBLOCK: opening a FIFO put in place of a chunk must not hang
        // (regular files ignore the flag). The type is checked on the fd.
        // O_NOFOLLOW: a link in place of a chunk is not a chunk file.
        let file = match self.layout.fs().open_read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt(id, &path, "missing from the store".into()))
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(corrupt(
                    id,
                    &path,
                    "a symbolic link, not a chunk file".into(),
                ))
            }
            Err(e) => return Err(Error::io("open chunk", &path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat chunk", &path, e))?;
        if !meta.is_file() {
            return Err(corrupt(id, &path, "not a regular file".into()));
        }
        let file_len = meta.len();
        let mut hbuf = [0u8; HEADER_LEN];
        read_exact_at(&*file, &mut hbuf, 0, &path, id)?;
        let header = ChunkHeader::decode(&hbuf, &path)?;
        header.check(id, expected_len, file_len, &path)?;
        let gap = header.payload_offset as usize - HEADER_LEN;
        if gap > 0 {
            let mut pad = vec![0u8; gap];
            read_exact_at(&*file, &mut pad, HEADER_LEN as u64, &path, id)?;
            if pad.iter().any(|&b| b != 0) {
                return Err(corrupt(
                    id,
                    &path,
                    "non-zero bytes between header and payload".into(),
                ));
            }
        }
        Ok(OpenChunk { file, header, path })
    }

    /// Read chunk `id`, which must be `out.len()` bytes uncompressed, into
    /// `out`, verifying its header and blake3 hash. `scratch` holds
    /// compressed payloads. Returns the bytes read from disk.
    pub fn read_verified(
        &self,
        id: &ChunkId,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64> {
        let chunk = self.open_chunk(id, out.len() as u64)?;
        chunk.read_verified(out, scratch, decoder)
    }
}

/// A chunk file whose header has been validated.
pub struct OpenChunk {
    file: Box<dyn FsReadFile>,
    header: ChunkHeader,
    path: PathBuf,
}

impl OpenChunk {
    /// The validated header.
    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// Read and decode the payload into `out` (exactly the uncompressed
    /// length) and verify its hash. Returns the bytes read from disk.
    pub fn read_verified(
        &self,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
        decoder: &mut Decoder,
    ) -> Result<u64> {
        let (h, path, id) = (&self.header, &self.path, &self.header.id);
        if out.len() as u64 != h.uncompressed_len {
            return Err(Error::Internal(format!(
                "buffer of {} bytes for chunk {id} of {}",
                out.len(),
                h.uncompressed_len
            )));
        }
        match h.codec {
            Codec::Raw => self.read_raw(out)?,
            Codec::Zstd => {
                scratch.resize(h.stored_len as usize, 0);
                read_exact_at(&*self.file, scratch, h.payload_offset as u64, path, id)?;
                decoder.decode(h.codec, h.filter, scratch, out, path)?;
            }
        }
        let got = ChunkId::of(out);
        if got != *id {
            return Err(corrupt(
                id,
                path,
                format!("content hash mismatch (bytes hash to {got})"),
            ));
        }
        Ok(h.payload_offset as u64 + h.stored_len)
    }
}

impl OpenChunk {
    /// Read a raw payload into `out`. Where `out` starts on a page and
    /// the payload on a block (chunks written with O_DIRECT), the whole
    /// blocks are read with O_DIRECT straight into `out`, with no copy
    /// through the page cache; the tail, and everything elsewhere, is
    /// read normally.
    fn read_raw(&self, out: &mut [u8]) -> Result<()> {
        let (off, path, id) = (
            self.header.payload_offset as u64,
            &self.path,
            &self.header.id,
        );
        let bulk = out.len() / ALIGN * ALIGN;
        let direct = bulk >= DIRECT_READ_MIN
            && (out.as_ptr() as usize) % ALIGN == 0
            && off % ALIGN as u64 == 0;
        if direct {
            let (head, tail) = out.split_at_mut(bulk);
            match self.file.read_direct_at(head, off) {
                Some(Ok(())) => {
                    return read_exact_at(&*self.file, tail, off + bulk as u64, path, id);
                }
                Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(corrupt(id, path, "truncated".into()));
                }
                Some(Err(e)) => return Err(Error::io("read chunk (O_DIRECT)", path, e)),
                None => {}
            }
        }
        read_exact_at(&*self.file, out, off, path, id)
    }
}

/// The 4 KiB block at the start of a chunk file written with O_DIRECT:
/// `header`, with its payload at [`ALIGNED_PAYLOAD_OFFSET`], and zeros.
fn header_block(header: &ChunkHeader) -> AlignedBlock {
    let header = ChunkHeader {
        payload_offset: ALIGNED_PAYLOAD_OFFSET,
        ..*header
    };
    let mut block = AlignedBlock::new();
    block.as_mut_slice()[..HEADER_LEN].copy_from_slice(&header.encode());
    block
}

/// Cut a chunk file written with O_DIRECT, a header block and a payload of
/// `len` bytes padded to a block, to its exact length: nothing to do when
/// `len` is a whole number of blocks (a file-system call saved per chunk).
fn cut_padding(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    if len % ALIGN as u64 == 0 {
        return Ok(());
    }
    file.set_len(ALIGNED_PAYLOAD_OFFSET as u64 + len)
}

/// Write all of `bufs`, back to back, at `off` of `file` with `pwritev`:
/// one request for all of them, continued after a short write.
fn write_all_vectored_at(
    file: &std::fs::File,
    bufs: &[&[u8]],
    mut off: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let rest = &iov[first..];
        // SAFETY: every iovec points into a live slice of `bufs` (or a
        // suffix of one), which pwritev only reads.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                rest.as_ptr(),
                rest.len() as libc::c_int,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        off += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, so the result stays in the slice.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Payloads under this many bytes are read through the page cache: a
/// direct read saves nothing worth a second syscall there.
pub(crate) const DIRECT_READ_MIN: usize = 1 << 20;

/// One zeroed, page-aligned block for direct I/O.
struct AlignedBlock {
    ptr: *mut u8,
}

impl AlignedBlock {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(ALIGN, ALIGN) {
        Ok(l) => l,
        Err(_) => panic!("bad layout"),
    };

    fn new() -> Self {
        // SAFETY: non-zero size; a null result is handled.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::LAYOUT);
        }
        AlignedBlock { ptr }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr owns ALIGN initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, ALIGN) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, ALIGN) }
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated with the same layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, Self::LAYOUT) }
    }
}

/// The fan-out directory a chunk file goes into must be a real directory
/// of the store, not a symbolic link.
fn check_fan_out_dir(dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(dest);
    if check_store_dir(dir)? {
        Ok(())
    } else {
        Err(Error::NotFound {
            what: format!("chunk directory {}", dir.display()),
        })
    }
}

fn corrupt(id: &ChunkId, path: &Path, reason: String) -> Error {
    Error::CorruptChunk {
        chunk: id.to_hex(),
        path: path.to_path_buf(),
        reason,
        tensors: Vec::new(),
    }
}

fn read_exact_at(
    file: &dyn FsReadFile,
    buf: &mut [u8],
    off: u64,
    path: &Path,
    id: &ChunkId,
) -> Result<()> {
    match file.read_exact_at(buf, off) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(corrupt(id, path, "truncated".into()))
        }
        Err(e) => Err(Error::io("read chunk", path, e)),
    }
}

/// Open `path` for O_DIRECT writes: a new file (`create`), or one written
/// before.
pub(super) fn open_direct(path: &Path, create: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(create)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            let op = if create {
                "create chunk (O_DIRECT)"
            } else {
                "open chunk (O_DIRECT)"
            };
            Error::io(op, path, e)
        })
}
