"""Restores read chunk files with O_DIRECT, not through the page cache,
whatever the alignment of the destination tensors: a cold restore through
the page cache runs several times slower (the README's bench table). The
observable: after `cairn.torch.load`, `Store.load_into` or the DCP reader,
the chunk files' pages are not resident in the page cache."""

import ctypes
import os

import pytest
import torch

import cairn
import cairn.torch as ct

MIB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_PROT_READ, _MAP_SHARED = 1, 1


def _resident(path):
    """(pages of `path` in the page cache, pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        addr = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + 4095) // 4096
            vec = ctypes.create_string_buffer(pages)
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def _chunk_files(root):
    out = []
    for d, _, fs in os.walk(os.path.join(root, "chunks")):
        out += [os.path.join(d, f) for f in fs]
    assert out, f"no chunk files under {root}"
    return out


def _evict(files):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_fraction(files):
    got = [_resident(f) for f in files]
    return sum(r for r, _ in got) / max(1, sum(p for _, p in got))


def _unaligned(numel, dtype=torch.float32):
    """A tensor whose data starts 64 bytes past a page boundary, as torch's
    allocator places large tensors."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(numel * size + 8192, dtype=torch.uint8)
    off = (-raw.data_ptr()) % 4096 + 64
    return raw[off : off + numel * size].view(dtype)


@pytest.fixture
def direct_store(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("the file system of the test directory does not support O_DIRECT")
    return cairn.Store(tmp_path / "s", staging_bytes=16 * MIB, chunk_size=MIB)


def _state():
    g = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(MIB // 4 * 3 + 7 * i, generator=g) for i in range(4)}


def test_cairn_torch_load_into_unaligned_tensors_bypasses_the_page_cache(direct_store):
    st = direct_store
    state = _state()
    ct.save({"model": state}, st, "r", 1)
    files = _chunk_files(st.path)
    target = {"model": {k: _unaligned(v.numel()) for k, v in state.items()}}
    assert all(t.data_ptr() % 4096 for t in target["model"].values())
    ptrs = {k: t.data_ptr() for k, t in target["model"].items()}
    _evict(files)
    assert _cached_fraction(files) < 0.05
    ct.load(target, st, "r", 1)
    for k, v in state.items():
        assert target["model"][k].data_ptr() == ptrs[k], "restored in place"
        assert torch.equal(target["model"][k], v), k
    frac = _cached_fraction(files)
    assert frac < 0.05, f"{frac:.0%} of the chunk files' pages were read through the page cache"


def test_load_creates_missing_tensors_page_aligned(direct_store):
    st = direct_store
    state = _state()
    ct.save({"optim": state}, st, "r", 1)
    out = {"optim": {}}  # an optimizer before its first step: nothing to fill
    ct.load(out, st, "r", 1)
    for k, v in state.items():
        assert out["optim"][k].data_ptr() % 4096 == 0, k
        assert torch.equal(out["optim"][k], v), k
    arrays = st.load("r", 1)
    assert all(a.__array_interface__["data"][0] % 4096 == 0 for a in arrays.values())


def test_dcp_reader_into_unaligned_tensors_bypasses_the_page_cache(direct_store):
    import torch.distributed.checkpoint as dcp

    from cairn.torch.dcp import CairnStorageReader, CairnStorageWriter

    st = direct_store
    state = _state()
    dcp.save(state, storage_writer=CairnStorageWriter(st, "d", 1))
    files = _chunk_files(st.path)
    target = {k: _unaligned(v.numel()) for k, v in state.items()}
    _evict(files)
    dcp.load(target, storage_reader=CairnStorageReader(st, "d", 1))
    for k, v in state.items():
        assert torch.equal(target[k], v), k
    frac = _cached_fraction(files)
    assert frac < 0.05, f"{frac:.0%} of the chunk files' pages were read through the page cache"
