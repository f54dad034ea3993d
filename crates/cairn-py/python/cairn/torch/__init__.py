"""cairn for PyTorch: save and load nested state dicts (model + optimizer).

    import cairn, cairn.torch
    store = cairn.Store("/nvme/ckpt")
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "epoch": 3}
    cairn.torch.save(state, store, "run1", step, metrics={"loss": loss})
    ...
    cairn.torch.load(state, store, "run1")          # in place, newest step
    model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optim"])

Every tensor of the state becomes a cairn tensor named by its path
(`model/layer.weight`, `optim/state/0/exp_avg`); the structure and every
non-tensor value (step counters, hyper-parameters, ...) are stored as blobs:
the structure as JSON, values JSON cannot hold pickled. The structure also
records what the stored tensor cannot: whether it was an `nn.Parameter`,
`requires_grad`, and complex dtypes, which are stored as their real view
(`torch.view_as_real`: a trailing dimension of 2). CUDA tensors are
copied device-to-host on a side stream straight into leased slices of the
staging pool, page-locked once (see `_cuda`).

`cairn.torch.dcp` makes cairn the storage of PyTorch's distributed
checkpointing (`CairnStorageWriter`, `CairnStorageReader`).
"""

import json
import os
import pickle
import threading
from concurrent.futures import Future

import numpy as np

import cairn

from .. import _dtypes

__all__ = ["save", "async_save", "load", "close", "AsyncSaveHandle", "STATE_BLOB", "DEFAULT_STAGING_BYTES"]

#: The blob holding the structure of a saved state (JSON).
STATE_BLOB = "cairn.torch/state"
_PICKLE_BLOB = "cairn.torch/pickle/{}"

_T, _TUPLE, _DICT, _PICKLE = "__cairn_tensor__", "__cairn_tuple__", "__cairn_dict__", "__cairn_pickle__"
_MARKERS = (_T, _TUPLE, _DICT, _PICKLE)

_stores = {}
_stores_lock = threading.Lock()


#: Staging pool of a store `cairn.torch` opens from a path (bytes), unless
#: `staging_bytes=` says otherwise. The trainer is blocked while its state
#: does not fit in the pool (the rest waits for the disk), and the pool is
#: resident memory; see the README's bench table for the trade-off.
DEFAULT_STAGING_BYTES = 1 << 30


def _store_key(path):
    """The key of the store at `path` in the cache: one store per
    directory, however the path is spelled ("ckpt", "./ckpt/", its absolute
    path, a symbolic link to it)."""
    key = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return key if "://" in key else os.path.realpath(key)


def _store(store, staging_bytes=None):
    """A `cairn.Store`, or the one opened (once per process) at a path,
    with a staging pool of `staging_bytes` (default
    `DEFAULT_STAGING_BYTES`). A second call for the same path with another
    `staging_bytes` raises `InvalidError`."""
    if isinstance(store, cairn.Store):
        return store
    key = _store_key(store)
    want = DEFAULT_STAGING_BYTES if staging_bytes is None else int(staging_bytes)
    with _stores_lock:
        if key not in _stores or _stores[key][0].closed:
            _stores[key] = (cairn.Store(key, staging_bytes=want), want)
        st, have = _stores[key]
        if staging_bytes is not None and have != want:
            raise cairn.InvalidError(
                f"invalid staging_bytes: {want}: the store at {key!r} is open with {have}"
            )
        return st


#: Staging pool of a store opened by path only to load from (one chunk of
#: the default chunk size: a load does not stage).
_READ_STAGING_BYTES = 16 << 20


def _store_to_read(store):
    """`(store, opened)`: the `cairn.Store` given, the open one `cairn.torch`
    holds for the path, or else a store opened for this read alone
    (`opened` true: the caller closes it), with the smallest staging pool,
    so that a load neither holds `DEFAULT_STAGING_BYTES` of memory nor
    changes the pool a later save gets. A local path with no cairn store
    raises `NotFoundError` and creates nothing."""
    if isinstance(store, cairn.Store):
        return store, False
    key = _store_key(store)
    with _stores_lock:
        entry = _stores.get(key)
        if entry is not None and not entry[0].closed:
            return entry[0], False
    if "://" not in key and not os.path.isfile(os.path.join(key, "cairn-store.json")):
        raise cairn.NotFoundError(f"not found: cairn store at {os.fsdecode(store)!r}")
    return cairn.Store(key, staging_bytes=_READ_STAGING_BYTES), True


def close(store):
    """Close the store `cairn.torch` opened at a path (or the `cairn.Store`
    given): wait for its queued saves to commit, then free its staging pool
    (`DEFAULT_STAGING_BYTES` of resident memory) and threads. A later call
    with that path opens it anew. Nothing if none is open there."""
    if isinstance(store, cairn.Store):
        with _stores_lock:
            for key, (st, _) in list(_stores.items()):
                if st is store:
                    del _stores[key]
        store.close()
        return
    key = _store_key(store)
    with _stores_lock:
        entry = _stores.pop(key, None)
    if entry is not None:
        entry[0].close()


def _torch():
    import torch

    return torch


# What a stored value may name when unpickled with weights_only=True (the
# default): containers and plain values of the standard library, numpy
# arrays and scalars, torch dtypes, devices and sizes. Nothing whose
# construction runs code of the checkpoint's choosing.
_SAFE_GLOBALS = {
    "builtins": {"set", "frozenset", "complex", "slice", "range", "bytearray", "bytes",
                 "list", "dict", "tuple", "int", "float", "str", "bool"},
    "collections": {"OrderedDict", "defaultdict", "deque", "Counter"},
    "datetime": {"datetime", "date", "time", "timedelta", "timezone"},
    "decimal": {"Decimal"},
    "fractions": {"Fraction"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "torch": {"device", "Size"},
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        torch = _torch()
        allowed = name in _SAFE_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if module == "numpy.dtypes" and name.endswith("DType"):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(data, index, weights_only):
    """A stored non-tensor value: with `weights_only`, only plain values
    and containers (see `_SAFE_GLOBALS`); a value naming anything else
    raises `InvalidError` naming it, before anything is loaded."""
    if not weights_only:
        return pickle.loads(data)
    import io

    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise cairn.InvalidError(
            f"invalid checkpoint value {_PICKLE_BLOB.format(index)!r}: unpickling it would "
            f"call {e}, which load does not run by default (whoever can write the store "
            "chooses what a pickle runs); pass weights_only=False to load it if you trust "
            "the checkpoint"
        ) from None


def _escape(part):
    part = str(part).replace("%", "%25").replace("/", "%2F")
    if part in ("", ".", ".."):
        part = "%00" + part.replace(".", "%2E")
    return part


def _encode(obj, path, tensors, pickles):
    """The JSON structure of `obj`, collecting its tensors and pickled
    values on the way."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        name = "/".join(path) if path else "%00"
        if name in tensors:
            # Keys are stored as text: 0 and "0", or None and "None", in one
            # dict would name one tensor and one of them would be lost.
            raise cairn.InvalidError(
                f"invalid state: two tensors would be saved as {name!r} "
                "(keys of one dict that are equal as text, such as 0 and '0')"
            )
        skel = {_T: name, "device": str(obj.device), "requires_grad": bool(obj.requires_grad)}
        if isinstance(obj, torch.nn.Parameter):
            skel["parameter"] = True
        if obj.is_complex():
            skel["complex"] = True
            obj = torch.view_as_real(obj.detach().resolve_conj())
        tensors[name] = obj
        return skel
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, path + [_escape(k)], tensors, pickles) for k, v in obj.items()}
        for k in obj:
            if isinstance(k, torch.Tensor):
                raise cairn.InvalidError(
                    f"invalid state: a tensor is a key of the dict at {'/'.join(path) or '/'!r} "
                    "(a tensor key cannot be stored; use its value, e.g. int(key))"
                )
        return {
            _DICT: [
                [_encode(k, path + ["%key"], {}, pickles), _encode(v, path + [_escape(k)], tensors, pickles)]
                for k, v in obj.items()
            ]
        }
    if type(obj) is list:
        return [_encode(v, path + [str(i)], tensors, pickles) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {_TUPLE: [_encode(v, path + [str(i)], tensors, pickles) for i, v in enumerate(obj)]}
    try:
        pickles.append(pickle.dumps(obj, protocol=4))
    except Exception as e:
        raise cairn.InvalidError(
            f"invalid state: the value at {'/'.join(path) or '/'!r} ({type(obj).__name__}) "
            f"cannot be stored: {e}"
        ) from None
    return {_PICKLE: len(pickles) - 1}


def _flatten(state_dict):
    tensors, pickles = {}, []
    try:
        skeleton = _encode(state_dict, [], tensors, pickles)
    except RecursionError:
        raise cairn.InvalidError(
            "invalid state: it holds itself (a dict or list nested in itself), or is nested "
            "deeper than Python's recursion limit"
        ) from None
    blobs = {STATE_BLOB: json.dumps(skeleton).encode()}
    for i, p in enumerate(pickles):
        blobs[_PICKLE_BLOB.format(i)] = p
    return tensors, blobs


def save(state_dict, store, run, step, *, metadata=None, metrics=None, staging_bytes=None):
    """Save a (nested) state dict as checkpoint `(run, step)` and wait until
    it is durable on local disk; the `cairn.SaveReport`. `store` is a
    `cairn.Store` or a path (opened once per process, with a staging pool
    of `staging_bytes`, default `DEFAULT_STAGING_BYTES`)."""
    tensors, blobs = _flatten(state_dict)
    h = _store(store, staging_bytes).save(run, step, tensors, blobs=blobs, metadata=metadata, metrics=metrics)
    return h.wait()


class AsyncSaveHandle:
    """An `async_save` in flight. `staged` resolves once every tensor is
    copied out (the state may change from then on); `durable` resolves to
    the `cairn.SaveReport` once the checkpoint is committed on local disk.
    Either carries the save's exception if it fails."""

    def __init__(self):
        self.staged = Future()
        self.durable = Future()

    def wait(self, timeout=None):
        """The `SaveReport`, once durable."""
        return self.durable.result(timeout)


class _Turns:
    """Turns handed out in call order: `take` numbers a caller, `wait`
    blocks until every earlier number is `done` (a plain lock wakes
    waiters in no particular order)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def take(self):
        with self._cond:
            turn = self._next
            self._next += 1
            return turn

    def wait(self, turn):
        with self._cond:
            self._cond.wait_for(lambda: self._serving == turn)

    def done(self, turn):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


_async_turns = _Turns()


def async_save(state_dict, store, run, step, *, metadata=None, metrics=None, staging_bytes=None):
    """Start saving a (nested) state dict; returns an `AsyncSaveHandle`.
    CPU tensors must not change before `handle.staged` resolves (the copy
    into the staging pool runs in the background). A state with CUDA
    tensors is staged before this returns: the device-to-host copies go
    straight into the staging pool on a side stream and this waits for
    them, so the parameters may change right after (`staged` is then
    already resolved). Saves are staged in call order, each once the
    previous one is staged."""
    handle = AsyncSaveHandle()
    try:
        tensors, blobs = _flatten(state_dict)
        st = _store(store, staging_bytes)
        items = list(tensors.items())
        cuda = any(t.device.type != "cpu" for _, t in items)
    except BaseException as e:  # noqa: BLE001 - reported through the futures
        handle.staged.set_exception(e)
        handle.durable.set_exception(e)
        return handle

    turn = _async_turns.take()

    def stage():
        _async_turns.wait(turn)
        try:
            return st.save(run, step, items, blobs=blobs, metadata=metadata, metrics=metrics)
        finally:
            _async_turns.done(turn)

    def durable(h):
        try:
            handle.durable.set_result(h.wait())
        except BaseException as e:  # noqa: BLE001
            handle.durable.set_exception(e)

    def work():
        try:
            h = stage()
            handle.staged.set_result(None)
        except BaseException as e:  # noqa: BLE001
            handle.staged.set_exception(e)
            handle.durable.set_exception(e)
            return
        durable(h)

    if cuda:
        try:
            h = stage()
            handle.staged.set_result(None)
        except BaseException as e:  # noqa: BLE001
            handle.staged.set_exception(e)
            handle.durable.set_exception(e)
            return handle
        threading.Thread(target=durable, args=(h,), name=f"cairn-async-save-{run}-{step}", daemon=False).start()
        return handle
    try:
        threading.Thread(target=work, name=f"cairn-async-save-{run}-{step}", daemon=False).start()
    except BaseException:
        # No thread takes the turn: pass it on so later saves still run.
        _async_turns.wait(turn)
        _async_turns.done(turn)
        raise
    return handle


def _from_numpy(a):
    """A torch tensor sharing the memory of numpy array `a` (bf16, fp8 and
    unsigned types included)."""
    torch = _torch()
    name = _dtypes.from_numpy(a.dtype)
    same_size = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    if name == "BOOL":
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(same_size)).view(_dtypes.to_torch(name))


def _aligned_empty(shape, dtype):
    """An uninitialized CPU tensor whose data starts on a page boundary
    (unless small), so that a restore reads its chunks with O_DIRECT
    straight into it."""
    torch = _torch()
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    if n < cairn._DIRECT_MIN:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(n + cairn._PAGE, dtype=torch.uint8)
    off = (-raw.data_ptr()) % cairn._PAGE
    return raw[off : off + n].view(dtype).view(shape)


def _stored(skel, entries):
    """(entry, dtype, shape) of the tensor at `skel` as the state held it:
    a complex tensor is stored as its real view, with a trailing 2."""
    torch = _torch()
    e = entries[skel[_T]]
    dtype, shape = _dtypes.to_torch(e["dtype"]), tuple(e["shape"])
    if skel.get("complex"):
        complex_of = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}
        dtype, shape = complex_of[dtype], shape[:-1]
    return e, dtype, shape


def _check(skel, target, pickles, entries, path, missing):
    """Refuse, before anything is written, a tensor of the state whose
    shape differs from the checkpoint's (walks the state as `_decode`), and
    collect in `missing` the paths of the state's dict entries that the
    checkpoint does not hold."""
    torch = _torch()
    if isinstance(skel, list):
        if type(target) is list and len(target) == len(skel):
            for i, (s, t) in enumerate(zip(skel, target)):
                _check(s, t, pickles, entries, path + [str(i)], missing)
        return
    if not isinstance(skel, dict) or _PICKLE in skel:
        return
    if _T in skel:
        if isinstance(target, torch.Tensor):
            _, _, shape = _stored(skel, entries)
            if tuple(target.shape) != shape:
                raise cairn.InvalidError(
                    f"invalid target {skel[_T]!r}: the state holds shape {list(target.shape)}, "
                    f"the checkpoint {list(shape)}"
                )
        return
    if _TUPLE in skel:
        if type(target) is tuple and len(target) == len(skel[_TUPLE]):
            for i, (s, t) in enumerate(zip(skel[_TUPLE], target)):
                _check(s, t, pickles, entries, path + [str(i)], missing)
        return
    if not isinstance(target, dict):
        return
    if _DICT in skel:
        pairs = [(_decode(k, None, [], pickles, entries), v) for k, v in skel[_DICT]]
    else:
        pairs = list(skel.items())
    held = set()
    for k, v in pairs:
        held.add(k)
        if k in target:
            _check(v, target[k], pickles, entries, path + [_escape(k)], missing)
    missing.extend("/".join(path + [_escape(k)]) for k in target if k not in held)


def _decode(skel, target, plan, pickles, entries):
    """Rebuild the value at one position of the state from its structure,
    reusing `target` (the caller's value there) where it fits. `plan`
    collects `(name, tensor to restore into, value placed in the state,
    finish)`: `finish` is None when the bytes land in the caller's tensor,
    else a function run once they are in, returning the value the state
    holds in the end (the caller's tensor after a converting copy, or the
    new tensor on its device, an `nn.Parameter`, ...)."""
    torch = _torch()
    if isinstance(skel, list):
        if type(target) is list and len(target) == len(skel):
            for i, s in enumerate(skel):
                target[i] = _decode(s, target[i], plan, pickles, entries)
            return target
        return [_decode(s, None, plan, pickles, entries) for s in skel]
    if not isinstance(skel, dict):
        return skel
    if _T in skel:
        name = skel[_T]
        e, dtype, shape = _stored(skel, entries)
        stored_dtype, stored_shape = _dtypes.to_torch(e["dtype"]), tuple(e["shape"])
        is_complex = bool(skel.get("complex"))
        if isinstance(target, torch.Tensor):
            cairn._check_torch_tensor(name, target, "target")
        if isinstance(target, torch.Tensor) and tuple(target.shape) == shape:
            if target.dtype == dtype and not (is_complex and target.is_conj()):
                plan.append((name, torch.view_as_real(target) if is_complex else target, target, None))
                return target
            # Another dtype: restored aside, then converted into the
            # caller's tensor (as `load_state_dict` copies).
            raw = _aligned_empty(stored_shape, stored_dtype)
            value = torch.view_as_complex(raw) if is_complex else raw

            def convert(target=target, value=value):
                with torch.no_grad():
                    target.copy_(value)
                return target

            plan.append((name, raw, target, convert))
            return target
        raw = _aligned_empty(stored_shape, stored_dtype)
        value = torch.view_as_complex(raw) if is_complex else raw
        device = skel.get("device", "cpu")
        if device != "cpu" and not torch.cuda.is_available():
            device = "cpu"
        requires_grad = bool(skel.get("requires_grad")) and (value.is_floating_point() or value.is_complex())
        parameter = bool(skel.get("parameter"))

        def create(value=value, device=device, requires_grad=requires_grad, parameter=parameter):
            if device != "cpu":
                value = value.to(device)
            if parameter:
                return torch.nn.Parameter(value, requires_grad=requires_grad)
            return value.requires_grad_(requires_grad)

        plan.append((name, raw, value, create))
        return value
    if _TUPLE in skel:
        tgt = target if type(target) is tuple and len(target) == len(skel[_TUPLE]) else (None,) * len(skel[_TUPLE])
        return tuple(_decode(s, t, plan, pickles, entries) for s, t in zip(skel[_TUPLE], tgt))
    if _PICKLE in skel:
        return pickles[skel[_PICKLE]]
    if _DICT in skel:
        pairs = [(_decode(k, None, plan, pickles, entries), v) for k, v in skel[_DICT]]
    else:
        pairs = list(skel.items())
    out = target if isinstance(target, dict) else {}
    for k, v in pairs:
        out[k] = _decode(v, out.get(k), plan, pickles, entries)
    return out


def load(state_dict, store, run, step="latest", *, strict=True, weights_only=True):
    """Load checkpoint `(run, step)` into `state_dict` in place: tensors of
    matching dtype and shape are overwritten where they are (a model's
    `state_dict()` shares its parameters, so the model is restored too);
    a tensor of another dtype is loaded converted into the existing tensor
    (as `load_state_dict` copies); a tensor of another shape raises
    `InvalidError` naming it and both shapes, before anything is written.
    Entries missing (an optimizer state before its first step) are
    created, as the saved tensor was: on its device (CPU without a GPU),
    an `nn.Parameter` or not, with its `requires_grad`; complex tensors
    come back complex. Non-tensor values are replaced. An entry of
    `state_dict` (at any depth of its dicts) that the checkpoint does not
    hold raises `InvalidError` naming it, before anything is written, as
    DCP's load does: a model whose names changed (a `module.` or
    `_orig_mod.` prefix) would otherwise keep its initial weights. With
    `strict=False` such entries are left as they are and the rest loads.
    Non-tensor values JSON cannot hold were pickled; as `torch.load`'s
    `weights_only`, only plain values and containers (numpy arrays, torch
    dtypes and devices among them) are unpickled unless
    `weights_only=False`: a checkpoint naming anything else raises
    `InvalidError` before anything is loaded. `store` given as a path is
    opened for this load alone unless `cairn.torch` holds it open; a path
    with no store raises `NotFoundError`. Returns `state_dict`."""
    st, opened = _store_to_read(store)
    try:
        return _load(state_dict, st, run, step, strict, weights_only)
    finally:
        if opened:
            st.close()


def _load(state_dict, st, run, step, strict, weights_only):
    step = st.resolve(run, step)
    manifest = st.manifest(run, step)
    entries = {e["name"]: e for e in manifest["tensors"]}
    names = [b["name"] for b in manifest["blobs"]]
    if STATE_BLOB not in names:
        raise cairn.NotFoundError(
            f"not found: blob {STATE_BLOB!r} in run {run} step {step} (not saved by cairn.torch)"
        )
    blobs = st.blobs(run, step)
    skeleton = json.loads(blobs[STATE_BLOB])
    pickles = {}
    for n, b in blobs.items():
        if n.startswith("cairn.torch/pickle/"):
            i = int(n.rsplit("/", 1)[1])
            pickles[i] = _unpickle(b, i, weights_only)
    missing = []
    _check(skeleton, state_dict, pickles, entries, [], missing)
    if strict and missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        count = "1 entry of the state is" if len(missing) == 1 else f"{len(missing)} entries of the state are"
        raise cairn.InvalidError(
            f"invalid target: run {run!r} step {step} holds no {shown}{more} "
            f"({count} not in the checkpoint; "
            "load(..., strict=False) loads the rest and leaves those as they are)"
        )
    plan = []
    result = _decode(skeleton, state_dict, plan, pickles, entries)
    st.load_into(run, [(name, t) for name, t, _, _ in plan], step=step)
    made = {}
    for _, _, placed, finish in plan:
        if finish is not None:
            final = finish()
            if final is not placed:
                made[id(placed)] = final
    if made:
        result = _replace(result, made)
    if result is not state_dict and isinstance(state_dict, dict) and isinstance(result, dict):
        state_dict.update(result)
        return state_dict
    return result


def _replace(obj, moved):
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        return moved.get(id(obj), obj)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _replace(obj[k], moved)
        return obj
    if type(obj) is list:
        for i, v in enumerate(obj):
            obj[i] = _replace(v, moved)
        return obj
    if type(obj) is tuple:
        return tuple(_replace(v, moved) for v in obj)
    return obj
