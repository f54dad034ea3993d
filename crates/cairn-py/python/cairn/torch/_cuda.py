"""HBM -> DRAM: copying CUDA tensors to host memory for a save.

The copies run with `non_blocking=True` on a side stream that first waits
for the current stream (so they see every kernel queued before the save),
into slices of a host arena; a CUDA event marks them done, and the current
stream waits for that event, so kernels queued after the save (the next
optimizer step) never overwrite a parameter before it is copied. The arena
is page-locked once with `cudaHostRegister` through `torch.cuda.cudart()`
(no CUDA link in the wheel), so the copies run at pinned-memory speed; if
registration is unavailable it falls back to torch's pinned allocator, and
without a GPU nothing here runs at all. From the arena, `Store.save` copies
the bytes into cairn's staging pool.
"""

import threading

import numpy as np

_ALIGN = 4096


def _torch():
    import torch

    return torch


class _Arena:
    """A growing, page-locked host buffer leased out in aligned slices."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buf = None  # numpy uint8 array
        self.registered = False
        self.pinned_by = None  # "cudaHostRegister", "torch pin_memory" or None
        self._owner = None

    def reserve(self, nbytes):
        """Make the arena at least `nbytes` long (under `lock`)."""
        if self.buf is not None and self.buf.nbytes >= nbytes:
            return
        self._release()
        size = max(nbytes, _ALIGN)
        size = (size + (1 << 21) - 1) // (1 << 21) * (1 << 21)
        torch = _torch()
        raw = np.empty(size + _ALIGN, dtype=np.uint8)
        off = (-raw.__array_interface__["data"][0]) % _ALIGN
        buf = raw[off : off + size]
        buf.fill(0)  # fault the pages in before pinning
        self.pinned_by = None
        try:
            cudart = torch.cuda.cudart()
            ptr = buf.__array_interface__["data"][0]
            rc = cudart.cudaHostRegister(ptr, size, 0)
            ok = rc == 0 if isinstance(rc, int) else int(getattr(rc, "value", rc)) == 0
            if ok:
                self.registered = True
                self.pinned_by = "cudaHostRegister"
        except Exception:  # noqa: BLE001 - fall back below
            self.registered = False
        if self.pinned_by is None:
            try:
                pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                buf = pinned.numpy()
                raw = pinned
                self.pinned_by = "torch pin_memory"
            except Exception:  # noqa: BLE001 - pageable memory still works
                pass
        self.buf = buf
        self._owner = raw

    def _release(self):
        if self.buf is not None and self.registered:
            try:
                _torch().cuda.cudart().cudaHostUnregister(self.buf.__array_interface__["data"][0])
            except Exception:  # noqa: BLE001
                pass
        self.buf, self.registered, self._owner = None, False, None

    def slice(self, off, nbytes):
        return self.buf[off : off + nbytes]


_arena = _Arena()


def arena_info():
    """How the host arena is pinned (for scripts/gpu-check): a dict with
    `bytes` and `pinned_by`."""
    return {"bytes": 0 if _arena.buf is None else int(_arena.buf.nbytes), "pinned_by": _arena.pinned_by}


class PendingCopies:
    """Device-to-host copies in flight. `finish()` waits for them and
    returns the items with CUDA tensors replaced by host tensors in the
    arena; `release()` hands the arena back once those are staged."""

    def __init__(self, items, event, hosts):
        self.items, self.event, self.hosts = items, event, hosts
        self._held = True

    def finish(self):
        import cairn

        self.event.synchronize()
        out = list(self.items)
        for i, host in self.hosts.items():
            name, v = out[i]
            out[i] = (name, cairn.Shard(host, v.global_shape, v.offsets) if isinstance(v, cairn.Shard) else host)
        return out

    def release(self):
        if self._held:
            self._held = False
            _arena.lock.release()


def _device_tensor(v):
    import cairn

    return v.data if isinstance(v, cairn.Shard) else v


def start_copies(items, indices):
    """Queue the device-to-host copies of `items[i]` for `i` in `indices`
    (CUDA tensors or `cairn.Shard`s of them); holds the arena until
    `release()`."""
    torch = _torch()
    tensors = {i: _device_tensor(items[i][1]).detach() for i in indices}
    spans, total = {}, 0
    for i, t in tensors.items():
        n = t.numel() * t.element_size()
        spans[i] = (total, n)
        total += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    _arena.lock.acquire()
    try:
        _arena.reserve(total)
        current = torch.cuda.current_stream()
        side = _side_stream(current.device)
        side.wait_stream(current)
        hosts = {}
        with torch.cuda.stream(side):
            for i, t in tensors.items():
                off, n = spans[i]
                raw = torch.from_numpy(_arena.slice(off, n))
                host = raw.view(t.dtype).view(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
                src = t if t.is_contiguous() else t.contiguous()
                src.record_stream(side)
                host.copy_(src, non_blocking=True)
                hosts[i] = host
            event = torch.cuda.Event()
            event.record(side)
        current.wait_event(event)
        return PendingCopies(items, event, hosts)
    except BaseException:
        _arena.lock.release()
        raise


_streams = {}


def _side_stream(device):
    torch = _torch()
    key = str(device)
    if key not in _streams:
        _streams[key] = torch.cuda.Stream(device=device)
    return _streams[key]
