"""HBM -> DRAM: copying CUDA tensors straight into cairn's staging pool.

A save with CUDA tensors is a leased save (`cairn.Store.save` opens it):
the core lends chunk-aligned slices of its staging pool, and the
device-to-host copies land in them directly, with no intermediate host
buffer. The copies run with `non_blocking=True` on a side stream that first
waits for the current stream (so they see every kernel queued before the
save); each lease gets a CUDA event, and a lease is handed back to the
pipeline once its event fires. `save` returns when every lease is handed
back, so the caller may change its parameters right after.

The pool is page-locked once per store with `cudaHostRegister` through
`torch.cuda.cudart()` (no CUDA link in the wheel), so the copies run at
pinned-memory speed; if registration is unavailable the copies still work,
into pageable memory, and without a GPU nothing here runs at all.

Back-pressure: when the pool is full, the oldest lease in flight is waited
for and handed back, which frees room as the pipeline drains it to disk.
"""

import ctypes
import os
import threading
from collections import deque

_lock = threading.Lock()
# base address -> how the pool at that address is pinned
_registered = {}
# the CUDA runtime library torch loaded (None: not looked for yet, False:
# not found, e.g. a torch linked with the static runtime)
_cudart_lib = None


def _torch():
    import torch

    return torch


def _succeeded(rc):
    """Whether a `torch.cuda.cudart()` call's result (an int or a
    `cudaError` enum) is `cudaSuccess`."""
    return int(getattr(rc, "value", rc)) == 0


def _clear_cuda_error():
    """Reset the CUDA runtime's last error on this thread after a failed
    `cudaHostRegister`/`cudaHostUnregister`: left set, torch raises it at
    its next kernel launch, in the trainer's code, as if that had failed.
    `torch.cuda.cudart()` has no `cudaGetLastError`, so it is called in
    the `libcudart` torch loaded (found in `/proc/self/maps`); where there
    is none (a statically linked runtime), nothing is done."""
    global _cudart_lib
    try:
        if _cudart_lib is None:
            _cudart_lib = False
            with open("/proc/self/maps") as maps:
                for line in maps:
                    path = line.split(maxsplit=5)[-1].strip()
                    if os.path.basename(path).startswith("libcudart.so"):
                        _cudart_lib = ctypes.CDLL(path)
                        break
        if _cudart_lib:
            _cudart_lib.cudaGetLastError()
    except Exception:  # noqa: BLE001 - nothing more can be done
        pass


def register_pool(base, length):
    """Page-lock the staging pool at `base` (`length` bytes) with
    `cudaHostRegister`, once per pool; how it is pinned
    (`"cudaHostRegister"`), or None if it could not be (pageable memory
    still works, slower)."""
    with _lock:
        if base in _registered:
            return _registered[base]
        pinned_by = None
        try:
            torch = _torch()
            if torch.cuda.is_available():
                rc = torch.cuda.cudart().cudaHostRegister(base, length, 0)
                if _succeeded(rc):
                    pinned_by = "cudaHostRegister"
                else:
                    _clear_cuda_error()
        except Exception:  # noqa: BLE001 - pageable memory is the fallback
            pinned_by = None
        _registered[base] = pinned_by
        return pinned_by


def unregister_pool(base):
    """Undo `register_pool` for the pool at `base` (before its memory is
    freed); nothing if it was never registered or not pinned."""
    with _lock:
        pinned_by = _registered.pop(base, None)
        if pinned_by == "cudaHostRegister":
            try:
                rc = _torch().cuda.cudart().cudaHostUnregister(base)
                if not _succeeded(rc):
                    _clear_cuda_error()
            except Exception:  # noqa: BLE001 - the memory is freed either way
                pass


def pool_info():
    """How each staging pool seen so far is pinned (for scripts/gpu-check):
    a dict base address -> `"cudaHostRegister"` or None."""
    with _lock:
        return dict(_registered)


_streams = {}


def _side_stream(device):
    torch = _torch()
    key = str(device)
    if key not in _streams:
        _streams[key] = torch.cuda.Stream(device=device)
    return _streams[key]


def fill_leases(session, pool, base, sources):
    """Copy `sources` (flat uint8 views of the tensors, CPU or CUDA; None
    for empty ones) into the leases of `session`, a `_cairn.LeasedSave`,
    and hand every lease back. `pool` is a uint8 tensor over the staging
    pool, which starts at address `base`. Returns once every byte is in
    the pool."""
    torch = _torch()
    register_pool(base, pool.numel())
    devices = {s.device for s in sources if s is not None and s.device.type != "cpu"}
    current = {d: torch.cuda.current_stream(d) for d in devices}
    side = {d: _side_stream(d) for d in devices}
    for d in devices:
        side[d].wait_stream(current[d])
        for s in sources:
            if s is not None and s.device == d:
                s.record_stream(side[d])
    inflight = deque()  # (index, [events])

    def hand_back_oldest():
        index, events = inflight.popleft()
        for e in events:
            e.synchronize()
        session.submit(index)

    for _ in range(session.lease_count):
        got = session.lease(False)
        while got is None:
            if inflight:
                hand_back_oldest()
                got = session.lease(False)
            else:
                got = session.lease(True)
        index, addr, _, segments = got
        off = addr - base
        used = set()
        for ti, toff, loff, n in segments:
            src = sources[ti][toff : toff + n]
            dst = pool[off + loff : off + loff + n]
            if src.device.type == "cpu":
                dst.copy_(src)
            else:
                with torch.cuda.stream(side[src.device]):
                    dst.copy_(src, non_blocking=True)
                used.add(src.device)
        if not used:
            session.submit(index)
            continue
        events = []
        for d in used:
            e = torch.cuda.Event()
            e.record(side[d])
            events.append(e)
        inflight.append((index, events))
    while inflight:
        hand_back_oldest()
    # Kernels queued after the save may now overwrite the parameters.
    for d in devices:
        current[d].wait_stream(side[d])
