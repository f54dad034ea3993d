"""cairn: a tiered checkpoint store for large-model training.

    import cairn
    store = cairn.Store("/nvme/ckpt")
    h = store.save("run1", 100, {"w": weights}, metrics={"loss": 2.31})
    # returns once staged: `weights` may be overwritten now
    report = h.wait()                 # durable on local disk
    arrays = store.load("run1")       # dict name -> numpy array

`save` copies each tensor once, straight from the numpy array's or CPU
torch tensor's memory into cairn's staging pool (CUDA tensors
device-to-host into leased slices of the pool, see `cairn.torch._cuda`);
hashing, writing and fsync run in the background. Every blocking call releases the GIL.

Errors are `cairn.Error` subclasses, one per kind: `UnavailableError`
(retrying may succeed), `InvalidError` (fix the input), `DataError`
(stored data is corrupt), `NotFoundError`, `AlreadyExistsError`,
`ClosedError`, `InternalError`.
"""

import json
import math
import sys
import weakref

import numpy as np

from . import _dtypes
from ._cairn import (
    AlreadyExistsError,
    ClosedError,
    DataError,
    Error,
    InternalError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from ._cairn import SaveHandle as _RawHandle
from ._cairn import Store as _RawStore
from ._cairn import dtype_names as _dtype_names

__all__ = [
    "Store",
    "SaveHandle",
    "SaveReport",
    "CommitReport",
    "Shard",
    "Error",
    "UnavailableError",
    "InvalidError",
    "DataError",
    "NotFoundError",
    "AlreadyExistsError",
    "ClosedError",
    "InternalError",
    "DTYPES",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("cairn")
except Exception:  # noqa: BLE001 - not installed as a distribution
    __version__ = "unknown"

#: Every dtype name cairn stores ("F32", "BF16", "F8E4M3", ...).
DTYPES = tuple(_dtype_names())

class Shard:
    """A shard of a global tensor: `data` (numpy array or torch tensor)
    holds the elements at `offsets` of a tensor of `global_shape`."""

    __slots__ = ("data", "global_shape", "offsets")

    def __init__(self, data, global_shape, offsets):
        shape = tuple(data.shape)
        global_shape = tuple(int(d) for d in global_shape)
        offsets = tuple(int(o) for o in offsets)
        if len(global_shape) != len(shape) or len(offsets) != len(shape):
            raise InvalidError(
                f"invalid shard: data has {len(shape)} dimensions, global_shape "
                f"{len(global_shape)} and offsets {len(offsets)}; they must be equal"
            )
        for i, (n, g, o) in enumerate(zip(shape, global_shape, offsets)):
            if g < 0 or o < 0 or o + n > g:
                raise InvalidError(
                    f"invalid shard: in dimension {i}, offset {o} + size {n} "
                    f"does not fit in the global size {g}"
                )
        self.data = data
        self.global_shape = global_shape
        self.offsets = offsets

    def __repr__(self):
        return (
            f"cairn.Shard(shape={tuple(self.data.shape)}, "
            f"global_shape={self.global_shape}, offsets={self.offsets})"
        )


def _seconds(v):
    if isinstance(v, dict) and set(v) == {"secs", "nanos"}:
        return v["secs"] + v["nanos"] / 1e9
    return v


class SaveReport:
    """What one save did: `bytes_written`, `chunks_written`,
    `bytes_deduped`, `logical_bytes`, ...; durations (`stall`, `durable`,
    `hash_busy`, ...) in seconds."""

    def __init__(self, fields):
        self._fields = {k: _seconds(v) for k, v in fields.items()}
        self.__dict__.update(self._fields)

    def as_dict(self):
        """The report as a plain dict."""
        return dict(self._fields)

    def __repr__(self):
        return f"cairn.SaveReport({self._fields!r})"


class CommitReport(SaveReport):
    """What `Store.commit` published: `run`, `step`, `world_size`,
    `parts`, `tensors`, `shards`, `replicas`, `blobs`, `logical_bytes`,
    `created`; `elapsed` in seconds."""

    def __repr__(self):
        return f"cairn.CommitReport({self._fields!r})"


class SaveHandle:
    """Returned by `Store.save` once every byte is staged (the caller's
    buffers are reusable). `wait()` blocks, without the GIL, until the
    checkpoint is durable on local disk. Dropping the handle without waiting
    does not cancel the save: it still commits (or fails) on its own."""

    __slots__ = ("_raw", "_keep")

    def __init__(self, raw, keep=()):
        self._raw = raw
        self._keep = keep

    @property
    def run(self):
        """The run being saved."""
        return self._raw.run

    @property
    def step(self):
        """The step being saved."""
        return self._raw.step

    @property
    def stall_s(self):
        """Seconds `save` blocked the caller."""
        return self._raw.stall_s

    def wait(self):
        """Block until the checkpoint is committed on local disk; its
        `SaveReport`. Raises the save's error if it failed."""
        report = SaveReport(json.loads(self._raw.wait()))
        self._keep = ()
        return report


def _is_torch_tensor(v):
    """Whether `v` is a torch tensor (any subclass: `nn.Parameter`, a
    user's own, `DTensor`), without importing torch where it is not."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def _torch_memory_problem(t):
    """Why cairn cannot read or fill torch tensor `t` through its memory, or
    None: a meta tensor holds no data, a `DTensor` holds only its local
    shard, and any other tensor without an address (a wrapper subclass)
    has none cairn could use. Devices other than CPU and CUDA are not
    handled."""
    kind = t.device.type
    if kind == "meta":
        return (
            "a meta tensor holds no data; materialize it first (module.to_empty(device=...)), "
            "or load into a new state and use load_state_dict(..., assign=True)"
        )
    if any(c.__name__ == "DTensor" for c in type(t).__mro__):
        return (
            "a DTensor holds only its local shard; save and load it with torch.distributed.checkpoint "
            "and cairn.torch.dcp, or pass its full_tensor() (or its to_local() as a cairn.Shard)"
        )
    if kind not in ("cpu", "cuda"):
        return f"on {t.device}; cairn reads and fills CPU and CUDA tensors"
    try:
        addr = t.data_ptr()
    except RuntimeError as e:
        return f"a {type(t).__name__} whose memory cannot be addressed ({e})"
    if addr == 0 and t.numel() > 0:
        return f"a {type(t).__name__} whose memory cannot be addressed (data_ptr() is 0)"
    return None


def _check_torch_tensor(name, t, what="tensor"):
    """Raise `InvalidError` naming `name` where `_torch_memory_problem`
    finds one."""
    why = _torch_memory_problem(t)
    if why is not None:
        raise InvalidError(f"invalid {what} {name!r}: {why}")


def _unsupported(name, dtype, is_complex):
    """The error for a dtype cairn cannot store."""
    if is_complex:
        return InvalidError(
            f"invalid tensor {name!r}: dtype {dtype} is not supported: complex tensors are stored "
            "as their real view (torch.view_as_real, numpy .view(float dtype)); cairn.torch.save "
            "does that itself"
        )
    return InvalidError(f"invalid tensor {name!r}: dtype {dtype} is not supported")


def _raw_tensor(name, value, keep):
    """(name, dtype, shape, address, nbytes, shard) of one tensor, keeping
    whatever owns the memory alive in `keep`. No copy for C-contiguous
    host memory."""
    shard = None
    if isinstance(value, Shard):
        shard = (list(value.global_shape), list(value.offsets))
        value = value.data
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        dt = _dtypes.from_numpy(value.dtype)
        if dt is None:
            raise _unsupported(name, f"numpy {value.dtype}", value.dtype.kind == "c")
        if not value.flags.c_contiguous:
            value = np.ascontiguousarray(value)
        keep.append(value)
        addr = value.__array_interface__["data"][0]
        return (name, dt, [int(d) for d in value.shape], addr, int(value.nbytes), shard)
    if _is_torch_tensor(value):
        _check_torch_tensor(name, value)
        dt = _dtypes.from_torch(value.dtype)
        if dt is None:
            raise _unsupported(name, value.dtype, value.dtype.is_complex)
        if value.device.type != "cpu":
            raise InvalidError(
                f"invalid tensor {name!r}: on {value.device}; CUDA tensors are staged by Store.save"
            )
        t = value.detach()
        if t.layout != _torch().strided:
            raise InvalidError(f"invalid tensor {name!r}: {t.layout} tensors are not supported")
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        keep.append(t)
        nbytes = t.numel() * t.element_size()
        return (name, dt, [int(d) for d in t.shape], t.data_ptr(), nbytes, shard)
    raise InvalidError(
        f"invalid tensor {name!r}: expected a numpy array, a torch tensor or a cairn.Shard, "
        f"got {type(value).__name__}"
    )


def _torch():
    import torch

    return torch


def _items(mapping, what):
    if mapping is None:
        return []
    if hasattr(mapping, "items"):
        return list(mapping.items())
    try:
        return [(k, v) for k, v in mapping]
    except (TypeError, ValueError):
        raise InvalidError(f"invalid {what}: expected a dict or (name, value) pairs") from None


def _run_arg(run):
    """A run name as the core takes it: a str (the core checks its
    characters); anything else, None included, is refused rather than
    turned into its repr."""
    if not isinstance(run, str):
        raise InvalidError(f"invalid run: {run!r}: expected a str, got {type(run).__name__}")
    return run


def _attempt_arg(attempt):
    """A save attempt's name, or None (the core checks its characters)."""
    if attempt is not None and not isinstance(attempt, str):
        raise InvalidError(f"invalid attempt: {attempt!r}: expected a str, got {type(attempt).__name__}")
    return attempt


def _part_arg(rank, world_size, attempt=None):
    """`(rank, world_size, attempt)` of a sharded save, or None for a plain
    one."""
    attempt = _attempt_arg(attempt)
    if rank is None and world_size is None:
        if attempt is not None:
            raise InvalidError(
                f"invalid attempt: {attempt!r}: only a part of a sharded step (a save with rank and "
                "world_size) names an attempt"
            )
        return None
    if rank is None or world_size is None:
        raise InvalidError("invalid sharded save: rank and world_size go together")
    for what, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= _U32_MAX:
            raise InvalidError(f"invalid {what}: {v!r}: expected an int in 0..={_U32_MAX}")
    if not 0 <= rank < world_size:
        raise InvalidError(f"invalid rank: {rank} is not below world_size {world_size}")
    return (int(rank), int(world_size), attempt)


def _tensor_entries(manifest):
    """The tensors of a checkpoint's manifest as dicts with `name`,
    `dtype` and `shape` (the global shape for a sharded step), in order."""
    return list(manifest.get("tensors") or []) + list(manifest.get("sharded") or [])


# Steps are u64 and ranks and world sizes u32 in the core.
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1


def _is_step(step):
    return not isinstance(step, bool) and isinstance(step, (int, np.integer)) and 0 <= step <= _U64_MAX


def _step_arg(step):
    if step is None or (isinstance(step, str) and step == "latest"):
        return None
    if not _is_step(step):
        raise InvalidError(f"invalid step: {step!r}: expected a non-negative int or 'latest'")
    return int(step)


def _save_step(step):
    """A step to save, commit or delete: an int (numpy's too) in the core's
    range; a float or a bool is refused rather than truncated."""
    if not _is_step(step):
        raise InvalidError(f"invalid step: {step!r}: expected an int in 0..={_U64_MAX}")
    return int(step)


def _overlapping(spans):
    """Indices of the `(start, end)` spans that overlap another one, in
    O(n log n): after sorting by start, a span overlaps an earlier one
    exactly when it starts before the furthest end so far, and then it
    overlaps the span holding that end too."""
    hit = set()
    far_end, far = None, None
    for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        start, end = spans[i]
        if far_end is not None and start < far_end:
            hit.add(i)
            hit.add(far)
        if far_end is None or end > far_end:
            far_end, far = end, i
    return hit


def _codec_option(codec):
    """The `codec` store option as the core reads it: the CLI's spelling
    (`"raw"`, `"zstd"`, `"zstd:LEVEL"`) becomes its tagged form; a dict is
    passed as it is."""
    if not isinstance(codec, str):
        return codec
    if codec == "raw":
        return {"kind": "raw"}
    if codec == "zstd":
        return {"kind": "zstd", "level": 1}
    level = codec[len("zstd:"):] if codec.startswith("zstd:") else ""
    if level.isdigit() and 1 <= int(level) <= 19:
        return {"kind": "zstd", "level": int(level)}
    raise InvalidError(f"invalid codec: {codec!r}: expected raw, zstd or zstd:LEVEL with LEVEL in 1..=19")


_PAGE = 4096
# Targets smaller than this are read through the page cache either way.
_DIRECT_MIN = 1 << 20
# The bounce buffer of a restore into targets that are not page-aligned.
_BOUNCE_BYTES = 256 << 20


def _padded(n):
    return (n + _PAGE - 1) // _PAGE * _PAGE


def _entry_nbytes(e):
    n = np.dtype(_dtypes.to_numpy(e["dtype"])).itemsize
    for d in e["shape"]:
        n *= int(d)
    return n


def _aligned_empty(nbytes):
    """An uninitialized uint8 array of `nbytes` starting on a page."""
    raw = np.empty(nbytes + _PAGE, dtype=np.uint8)
    off = (-raw.__array_interface__["data"][0]) % _PAGE
    return raw[off : off + nbytes]


def _aligned_array(shape, dtype):
    """An uninitialized numpy array on a page boundary (restores into it
    read with O_DIRECT)."""
    dtype = np.dtype(dtype)
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    if n == 0:
        return np.empty(tuple(shape), dtype=dtype)
    return _aligned_empty(n).view(dtype).reshape(tuple(shape))


def _unpin_pool(base):
    """Forget (and unlock, where `cairn.torch` page-locked it) the staging
    pool at `base`, before its memory is freed: a later pool at the same
    address is then registered anew."""
    cuda = sys.modules.get("cairn.torch._cuda")
    if cuda is not None:
        cuda.unregister_pool(base)


class Store:
    """A checkpoint store on a local directory (created if missing), with
    an optional remote tier (`remote="s3://bucket/prefix"`, credentials from
    the environment, `remote_options` as a dict of object_store options).
    Keyword `options` set `StoreOptions` fields (`staging_bytes`,
    `chunk_size`, `codec` as `"raw"`, `"zstd"` or `"zstd:LEVEL"`, `workers`,
    ...). `staging_bytes` is the staging
    pool: a save blocks only while its state does not fit in what is free,
    and the pool is resident memory. Saves with CUDA tensors copy them
    straight into leased slices of the pool; `leases=True` sends CPU torch
    tensors the same way (torch's own copy) instead of the core's copy."""

    def __init__(self, path, remote=None, *, remote_options=None, leases=False, **options):
        opts = [(str(k), str(v)) for k, v in (remote_options or {}).items()]
        self._leases = bool(leases)
        self._pool_view = None
        if "codec" in options:
            options["codec"] = _codec_option(options["codec"])
        self._raw = _RawStore(
            str(path),
            remote,
            opts,
            json.dumps(options) if options else None,
        )

    @property
    def path(self):
        """The store's directory."""
        return str(self._raw.path)

    def __repr__(self):
        return f"cairn.Store({self.path!r})"

    @property
    def closed(self):
        """Whether `close` was called."""
        return self._raw.closed

    def close(self):
        """Close the store: wait for the saves queued so far to commit, then
        free the staging pool (resident memory) and stop the store's
        threads. Later calls raise `ClosedError`; closing again does
        nothing. Close only once no other thread is saving through the
        store: such a save keeps the pool until it ends. `with
        cairn.Store(path) as store:` closes it on leaving the block."""
        if self._raw.closed:
            return
        if self._pool_view is not None:
            self._unpin()
            self._pool_view = None
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def save(
        self,
        run,
        step,
        tensors,
        blobs=None,
        metadata=None,
        metrics=None,
        rank=None,
        world_size=None,
        attempt=None,
    ):
        """Save checkpoint `(run, step)`. `tensors` maps names to numpy
        arrays, torch tensors (CPU or CUDA) or `cairn.Shard`s; `blobs` maps
        names to bytes; `metadata` is JSON-serializable; `metrics` maps
        names to numbers (loss, grad norm, ...) that `latest(where=...)`
        selects by. Returns a `SaveHandle` once every byte is staged: the
        caller may overwrite its tensors right away.

        With `rank` and `world_size` the save is that rank's part of a
        sharded step: `cairn.Shard` values place their data in the global
        tensor, plain tensors are replicas of the whole tensor. A part does
        not make the step visible; `commit` does, once every rank saved.
        `attempt` (a str of 1 to 64 letters, digits, `-` or `_`, the same on
        every rank) names the save attempt the part belongs to, so that
        `commit(..., attempt=...)` takes that attempt's parts and leaves an
        earlier attempt of the step, abandoned before its commit, aside."""
        run = _run_arg(run)
        step = _save_step(step)
        part = _part_arg(rank, world_size, attempt)
        items = _items(tensors, "tensors")
        values = [v.data if isinstance(v, Shard) else v for _, v in items]
        for (name, _), v in zip(items, values):
            if _is_torch_tensor(v):
                _check_torch_tensor(name, v)
        cuda = any(_is_torch_tensor(v) and v.device.type != "cpu" for v in values)
        if cuda or (self._leases and values and all(_is_torch_tensor(v) for v in values)):
            return self._save_leased(run, step, items, blobs, metadata, metrics, part)
        return self._save_host(run, step, items, blobs, metadata, metrics, part)

    def _pool(self):
        """The staging pool as a torch uint8 tensor over its memory, and its
        base address (made once)."""
        if self._pool_view is None:
            import ctypes

            torch = _torch()
            region = self._raw.staging_region()
            if region is None:
                raise InvalidError("invalid store: opened read-only")
            base, length = region
            buf = (ctypes.c_uint8 * length).from_address(base)
            self._pool_view = (torch.frombuffer(buf, dtype=torch.uint8), base)
            # The pool may get page-locked for CUDA copies: unlocked before
            # its memory is freed, by close or when this store is collected.
            self._unpin = weakref.finalize(self, _unpin_pool, base)
        return self._pool_view

    def _save_leased(self, run, step, items, blobs, metadata, metrics, part=None):
        """Save torch tensors (CPU or CUDA) by copying them straight into
        leased slices of the staging pool: CPU tensors with torch's own
        (parallel) copy, CUDA tensors device-to-host on a side stream (see
        `cairn.torch._cuda`). Returns once every byte is in the pool."""
        torch = _torch()
        specs, sources = [], []
        for name, value in items:
            shard = None
            if isinstance(value, Shard):
                shard = (list(value.global_shape), list(value.offsets))
                value = value.data
            if not _is_torch_tensor(value):
                raise InvalidError(
                    f"invalid tensor {name!r}: a save with CUDA tensors takes torch tensors only, "
                    f"got {type(value).__name__}"
                )
            dt = _dtypes.from_torch(value.dtype)
            if dt is None:
                raise _unsupported(name, value.dtype, value.dtype.is_complex)
            t = value.detach()
            if t.layout != torch.strided:
                raise InvalidError(f"invalid tensor {name!r}: {t.layout} tensors are not supported")
            if t.is_conj() or t.is_neg():
                t = t.resolve_conj().resolve_neg()
            if not t.is_contiguous():
                t = t.contiguous()
            specs.append((str(name), dt, [int(d) for d in t.shape], shard))
            sources.append(t.reshape(-1).view(torch.uint8) if t.numel() else None)
        raw_blobs, meta, mets = self._extras(blobs, metadata, metrics)
        session = self._raw.lease_save(_run_arg(run), int(step), specs, raw_blobs, meta, mets, part)
        try:
            pool, base = self._pool()
            if any(s is not None and s.device.type != "cpu" for s in sources):
                from .torch import _cuda

                _cuda.fill_leases(session, pool, base, sources)
            else:
                for _ in range(session.lease_count):
                    index, addr, _, segments = session.lease(True)
                    off = addr - base
                    for ti, toff, loff, n in segments:
                        pool[off + loff : off + loff + n].copy_(sources[ti][toff : toff + n])
                    session.submit(index)
            h = session.finish()
        except BaseException:
            session.abort()
            raise
        return SaveHandle(h)

    def _extras(self, blobs, metadata, metrics):
        """Blobs, metadata and metrics of a save as the extension takes them."""
        raw_blobs = []
        for n, b in _items(blobs, "blobs"):
            if not isinstance(b, (bytes, bytearray, memoryview)):
                raise InvalidError(f"invalid blob {n!r}: expected bytes, got {type(b).__name__}")
            raw_blobs.append((str(n), bytes(b)))
        meta = None
        if metadata is not None:
            try:
                meta = json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise InvalidError(f"invalid metadata: {e} (metadata is stored as JSON)") from None
        mets = None
        if metrics is not None:
            mets = {}
            for n, v in _items(metrics, "metrics"):
                try:
                    mets[str(n)] = float(v)
                except (TypeError, ValueError):
                    raise InvalidError(f"invalid metric {n!r}: {v!r} is not a number") from None
        return raw_blobs, meta, mets

    def _save_host(self, run, step, items, blobs, metadata, metrics, part=None):
        keep = []
        raw = [_raw_tensor(str(n), v, keep) for n, v in items]
        raw_blobs, meta, mets = self._extras(blobs, metadata, metrics)
        h = self._raw.save(_run_arg(run), int(step), raw, raw_blobs, meta, mets, part)
        return SaveHandle(h)

    def commit(self, run, step, world_size, attempt=None):
        """Make sharded step `(run, step)` visible once each of the
        `world_size` ranks saved its part (and its handle resolved). Checks
        that the parts agree and that the shards of every tensor tile it
        without gap or overlap; raises `InvalidError` naming the missing
        rank, the overlapping or the uncovered region otherwise. Returns a
        `CommitReport` (`parts`, `tensors`, `shards`, `replicas`, `blobs`,
        `logical_bytes`, `created`, `elapsed`). Committing an already
        committed step with the same parts succeeds with `created=False`.
        With `attempt`, the parts saved with that attempt are committed and
        those of other attempts left aside (collection removes them once
        the step is committed); without, the one attempt every rank saved
        (parts saved without an attempt count as one); two complete attempts
        with different contents are refused, naming both."""
        step = _save_step(step)
        if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)):
            raise InvalidError(f"invalid world size: {world_size!r}: expected an int")
        if not 1 <= world_size <= _U32_MAX:
            raise InvalidError(f"invalid world size: {world_size}: must be in 1..={_U32_MAX}")
        attempt = _attempt_arg(attempt)
        return CommitReport(json.loads(self._raw.commit(_run_arg(run), step, int(world_size), attempt)))

    def load_region(self, run, step, name, offsets, shape):
        """The region of tensor `name` at `offsets` with `shape` as a numpy
        array, read from a committed step (sharded or not; `step` a number
        or "latest"). Only the chunks that overlap the region are read, each
        once and verified."""
        return self.load_regions(run, step, [(name, offsets, shape)])[0]

    def load_regions(self, run, step, regions):
        """Several regions at once: `regions` is a list of `(name, offsets,
        shape)`; a list of numpy arrays in the same order. A chunk several
        regions need is read once."""
        run = _run_arg(run)
        step = self.resolve(run, step)
        dtypes = {e["name"]: e["dtype"] for e in _tensor_entries(json.loads(self._raw.manifest_json(run, step)))}
        out, raw = [], []
        for name, offsets, shape in regions:
            name = str(name)
            if name not in dtypes:
                raise NotFoundError(f"not found: tensor {name!r} in run {run} step {step}")
            offsets = [int(o) for o in offsets]
            shape = [int(d) for d in shape]
            if any(o < 0 for o in offsets) or any(d < 0 for d in shape):
                raise InvalidError(
                    f"invalid region of {name!r}: offsets {offsets} and shape {shape} must be non-negative"
                )
            a = _aligned_array(shape, _dtypes.to_numpy(dtypes[name]))
            out.append(a)
            raw.append((name, offsets, shape, a.__array_interface__["data"][0], int(a.nbytes)))
        self._raw.restore_regions(run, step, raw)
        return out

    def runs(self):
        """Runs with at least one committed checkpoint."""
        return list(self._raw.runs())

    def steps(self, run):
        """Committed steps of `run`, ascending."""
        return list(self._raw.steps(_run_arg(run)))

    def latest(self, run, where=None):
        """The newest committed step of `run`, or None. With `where`, the
        newest whose metrics match: conditions as text (`"loss<2.5"`,
        `"loss<2.5,grad_norm<=10"`), or a function of the metrics dict. A
        step without the named metric, or with a NaN, does not match."""
        if where is None or isinstance(where, str):
            return self._raw.latest(_run_arg(run), where)
        if not callable(where):
            raise InvalidError("invalid where: expected conditions as text or a function of the metrics")
        for step in reversed(self.steps(run)):
            if where(self.metrics(run, step)):
                return step
        return None

    def resolve(self, run, step="latest"):
        """The committed step `step` names ("latest" or a number)."""
        return self._raw.resolve(_run_arg(run), _step_arg(step))

    def manifest(self, run, step="latest"):
        """The manifest of a committed checkpoint, as a dict."""
        step = self.resolve(run, step)
        return json.loads(self._raw.manifest_json(_run_arg(run), step))

    def metrics(self, run, step="latest"):
        """The metrics saved with a checkpoint (NaN for non-finite ones)."""
        m = self.manifest(run, step).get("metrics") or {}
        return {k: (math.nan if v is None else float(v)) for k, v in m.items()}

    def metadata(self, run, step="latest"):
        """The JSON metadata saved with a checkpoint."""
        return self.manifest(run, step).get("metadata")

    def blobs(self, run, step="latest", names=None):
        """The blobs of a checkpoint: dict name -> bytes."""
        step = self.resolve(run, step)
        return dict(self._raw.blobs(_run_arg(run), step, None if names is None else list(names)))

    def load(self, run, step="latest", names=None):
        """Read a checkpoint's tensors: dict name -> numpy array (bf16 and
        fp8 as ml_dtypes arrays), in saved order. `names` selects tensors;
        every chunk read is verified."""
        run = _run_arg(run)
        step = self.resolve(run, step)
        entries = _tensor_entries(json.loads(self._raw.manifest_json(run, step)))
        by_name = {e["name"]: e for e in entries}
        if names is None:
            wanted = [e["name"] for e in entries]
        else:
            wanted = list(dict.fromkeys(str(n) for n in names))
            for n in wanted:
                if n not in by_name:
                    raise NotFoundError(f"not found: tensor {n!r} in run {run} step {step}")
        out = {}
        for n in wanted:
            e = by_name[n]
            out[n] = _aligned_array(e["shape"], _dtypes.to_numpy(e["dtype"]))
        targets = [(n, a.__array_interface__["data"][0], int(a.nbytes)) for n, a in out.items()]
        self._raw.restore_into(run, step, targets)
        return out

    def load_into(self, run, targets, step="latest"):
        """Restore tensors in place: `targets` maps names to numpy arrays or
        torch tensors of the saved dtype and shape (CPU or CUDA).
        Page-aligned (or small) C-contiguous host buffers are filled
        directly; others through a page-aligned bounce buffer (so that
        chunks are read with O_DIRECT, not through the page cache) and a
        copy; targets that share memory are restored in the order given.
        Every target is checked (name, dtype, shape, writable) before any
        is written. Returns the step read."""
        run = _run_arg(run)
        step = self.resolve(run, step)
        entries = {e["name"]: e for e in _tensor_entries(json.loads(self._raw.manifest_json(run, step)))}
        checked = []
        for name, t in _items(targets, "targets"):
            name = str(name)
            e = entries.get(name)
            if e is None:
                raise NotFoundError(f"not found: tensor {name!r} in run {run} step {step}")
            if _is_torch_tensor(t):
                _check_torch_tensor(name, t, "target")
                dt, cpu = _dtypes.from_torch(t.dtype), t.device.type == "cpu"
                contiguous = cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()
                addr, nbytes = t.data_ptr(), t.numel() * t.element_size()
            elif isinstance(t, np.ndarray):
                if not t.flags.writeable:
                    raise InvalidError(f"invalid target {name!r}: the numpy array is read-only")
                dt = _dtypes.from_numpy(t.dtype)
                contiguous = t.flags.c_contiguous
                addr, nbytes = t.__array_interface__["data"][0], int(t.nbytes)
            else:
                raise InvalidError(f"invalid target {name!r}: expected a numpy array or a torch tensor")
            if dt != e["dtype"] or list(t.shape) != list(e["shape"]):
                raise InvalidError(
                    f"invalid target {name!r}: {dt} {list(t.shape)}, "
                    f"but the checkpoint holds {e['dtype']} {e['shape']}"
                )
            # Filled in place only where the core can write it directly.
            ok = contiguous and nbytes > 0 and (addr % _PAGE == 0 or nbytes < _DIRECT_MIN)
            checked.append((name, t, e, addr, nbytes, ok))
        # The core writes direct targets in any order, so targets that share
        # memory go through the bounce buffer, copied in the order given.
        candidates = [i for i, c in enumerate(checked) if c[5]]
        shared = _overlapping([(checked[i][3], checked[i][3] + checked[i][4]) for i in candidates])
        shared = {candidates[j] for j in shared}
        direct, staged, keep = [], [], []
        for i, (name, t, e, addr, nbytes, ok) in enumerate(checked):
            if nbytes == 0:
                continue
            if ok and i not in shared:
                direct.append((name, addr, nbytes))
                keep.append(t)
            else:
                staged.append((name, t, e))
        self._raw.restore_into(run, step, direct)
        self._restore_bounced(run, step, staged)
        return step

    def _restore_bounced(self, run, step, staged):
        """Restore `(name, target, entry)` triples through a page-aligned
        bounce buffer, in batches of at most `_BOUNCE_BYTES` (a larger
        tensor alone): chunks then land on page boundaries and are read
        with O_DIRECT, which a cold restore needs (read through the page
        cache, a restore runs several times slower), and are copied into
        the targets after."""
        batches, batch, size = [], [], 0
        for item in staged:
            n = _padded(_entry_nbytes(item[2]))
            if batch and size + n > _BOUNCE_BYTES:
                batches.append(batch)
                batch, size = [], 0
            batch.append(item)
            size += n
        if batch:
            batches.append(batch)
        buf = None
        for batch in batches:
            total = sum(_padded(_entry_nbytes(e)) for _, _, e in batch)
            if buf is None or buf.nbytes < total:
                buf = None
                buf = _aligned_empty(max(total, 1))
            base = buf.__array_interface__["data"][0]
            views, raw, off = [], [], 0
            for name, t, e in batch:
                n = _entry_nbytes(e)
                a = buf[off : off + n].view(_dtypes.to_numpy(e["dtype"])).reshape(tuple(e["shape"]))
                views.append(a)
                raw.append((name, base + off, n))
                off += _padded(n)
            self._raw.restore_into(run, step, raw)
            for (_, t, _), a in zip(batch, views):
                if _is_torch_tensor(t):
                    from .torch import _from_numpy

                    # A parameter that requires grad is restored like any
                    # tensor: the copy is not part of the autograd graph.
                    with _torch().no_grad():
                        t.copy_(_from_numpy(a))
                else:
                    np.copyto(t, a)

    def delete(self, run, step):
        """Delete a checkpoint (its chunks go at the next garbage collection)."""
        self._raw.delete(_run_arg(run), _save_step(step))

    def upload(self, run, step):
        """Upload a checkpoint to the remote tier; the report as a dict."""
        return json.loads(self._raw.upload(_run_arg(run), _save_step(step)))
