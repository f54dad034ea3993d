"""cairn as a storage backend of PyTorch distributed checkpointing (DCP).

    import torch.distributed.checkpoint as dcp
    from cairn.torch.dcp import CairnStorageWriter, CairnStorageReader

    dcp.save(state, storage_writer=CairnStorageWriter(store, "run1", step))
    dcp.load(state, storage_reader=CairnStorageReader(store, "run1"))
    f = dcp.async_save(state, storage_writer=CairnStorageWriter(store, "run1", step))

Saving: each rank saves one part of sharded step `(run, step)`
(`Store.save` with `rank`/`world_size`): every tensor `WriteItem` of its
plan becomes a `cairn.Shard` named by the item's fully qualified name, at
the chunk's offsets in the global tensor; every bytes item becomes a blob of
that name. `finish`, which DCP calls on the coordinator once every rank's
writes are done, commits the step: until then it is invisible, so a rank
that dies mid-save leaves no step behind.

Loading: `read_metadata` rebuilds DCP's `Metadata` from cairn's own record
(a tensor's global shape and dtype, one chunk per stored shard; one bytes
entry per blob), so a step saved by `cairn.Store.save` loads through DCP
and one saved through DCP loads with `cairn.Store.load`. DCP's planner
reshards; `read_data` serves every `ReadItem` of the rank with one call to
the core's region reads, which read each chunk once and verify it, straight
into the destination tensor when it is a contiguous CPU tensor of the saved
dtype.

`CairnStorageWriter` is also DCP's `AsyncStager`: `dcp.async_save` calls
its `stage`, which copies this rank's tensors straight into cairn's staging
pool (the part save starts there and then), instead of DCP's default stager
making a second CPU copy of the state dict first.
"""

import io
import os

import cairn

from .. import _dtypes
from . import _from_numpy, _store

__all__ = ["CairnStorageWriter", "CairnStorageReader"]


def _torch():
    import torch

    return torch


def _dist():
    import torch.distributed as dist

    return dist


def _world_and_rank():
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _dcp_base():
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

    return StorageWriter, StorageReader


_StorageWriter, _StorageReader = _dcp_base()


def _as_shard(fqn, tensor, item):
    """A `cairn.Shard` of a tensor write item (host memory, contiguous)."""
    torch = _torch()
    t = tensor.detach()
    if isinstance(t, torch.distributed.tensor.DTensor):
        t = t.to_local()
    if t.device.type != "cpu":
        t = t.cpu()
    td = item.tensor_data
    return cairn.Shard(t, tuple(td.size), tuple(td.chunk.offsets))


def _bytes_of(data):
    if isinstance(data, io.BytesIO):
        return data.getvalue()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise cairn.InvalidError(f"invalid bytes item: got {type(data).__name__}")


class CairnStorageWriter(_StorageWriter):
    """DCP `StorageWriter` that saves into sharded step `(run, step)` of a
    cairn store (`store` a `cairn.Store` or a path). Every rank saves a
    part; the coordinator's `finish` commits the step. Also an
    `AsyncStager` for `dcp.async_save` (see the module docs)."""

    # AsyncStager protocol: `stage` copies before it returns, so there is
    # nothing left to synchronize afterwards.
    _synchronize_after_execute = False

    def __init__(self, store, run, step, *, metrics=None):
        super().__init__()
        self.store = _store(store)
        self.run = str(run)
        self.step = int(step)
        self.metrics = metrics
        self.is_coordinator = True
        self.rank = 0
        self.world_size = 1
        self._staged = None  # (handle, names) once `stage` saved this rank's part

    @property
    def should_synchronize_after_execute(self):
        """False: `stage` has copied everything when it returns."""
        return False

    # -- StorageWriter ---------------------------------------------------
    def reset(self, checkpoint_id=None):
        pass

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
        self.is_coordinator = bool(is_coordinator)
        self.world_size, rank = _world_and_rank()
        self.rank = int(kwargs.get("rank", rank))

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.storage import WriteResult

        fut = _torch().futures.Future()
        try:
            tensors, blobs, results = {}, {}, []
            staged = self._staged
            self._staged = None
            for item in plan.items:
                fqn = item.index.fqn
                if item.type == WriteItemType.BYTE_IO:
                    if staged is None:
                        blobs[fqn] = _bytes_of(planner.resolve_data(item))
                    size = len(blobs.get(fqn, b"")) if staged is None else staged[2].get(fqn, 0)
                else:
                    if staged is None:
                        if fqn in tensors:
                            raise cairn.InvalidError(
                                f"invalid DCP plan: rank {self.rank} writes two chunks of {fqn!r}; "
                                "the cairn writer takes one chunk per tensor and rank"
                            )
                        tensors[fqn] = _as_shard(fqn, planner.resolve_data(item), item)
                    size = item.tensor_storage_size() or 0
                if staged is not None and fqn not in staged[1]:
                    raise cairn.InvalidError(
                        f"invalid DCP plan: {fqn!r} was not staged by CairnStorageWriter.stage"
                    )
                results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=None))
            if staged is None:
                h = self.store.save(
                    self.run,
                    self.step,
                    tensors,
                    blobs=blobs,
                    metrics=self.metrics,
                    rank=self.rank,
                    world_size=self.world_size,
                )
            else:
                h = staged[0]
            h.wait()
            fut.set_result(results)
        except BaseException as e:  # noqa: BLE001 - DCP reads it from the future
            fut.set_exception(e)
        return fut

    def finish(self, metadata, results):
        if self.is_coordinator:
            self.store.commit(self.run, self.step, self.world_size)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return False

    def storage_meta(self):
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=os.path.join(self.store.path, "runs", self.run, str(self.step)))

    # -- AsyncStager -----------------------------------------------------
    def stage(self, state_dict):
        """Copy this rank's share of `state_dict` into cairn's staging pool
        and start saving the part; returns `state_dict` (DCP plans on it,
        but `write_data` then writes what was staged, not the live
        tensors). Items are named and cut exactly as DCP's default planner
        does (flattened names, DTensor local chunks); replicated values are
        saved by every rank and stored once."""
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict
        from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.utils import find_state_dict_object

        torch = _torch()
        self.world_size, self.rank = _world_and_rank()
        flat, _ = flatten_state_dict(state_dict)
        plan = create_default_local_save_plan(flat, True)
        tensors, blobs = {}, {}
        for item in plan.items:
            fqn = item.index.fqn
            obj = find_state_dict_object(flat, item.index)
            if item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(obj, buf)
                blobs[fqn] = buf.getvalue()
            else:
                if fqn in tensors:
                    raise cairn.InvalidError(
                        f"invalid state dict: rank {self.rank} holds two chunks of {fqn!r}; "
                        "the cairn writer takes one chunk per tensor and rank"
                    )
                tensors[fqn] = _as_shard(fqn, obj, item)
        h = self.store.save(
            self.run,
            self.step,
            tensors,
            blobs=blobs,
            metrics=self.metrics,
            rank=self.rank,
            world_size=self.world_size,
        )
        self._staged = (h, set(tensors) | set(blobs), {k: len(v) for k, v in blobs.items()})
        return state_dict

    def synchronize_staging(self):
        """Nothing to do: `stage` copies synchronously."""

    def close(self):
        """Nothing to release: the store stays open."""


class CairnStorageReader(_StorageReader):
    """DCP `StorageReader` over committed step `(run, step)` of a cairn
    store (`store` a `cairn.Store` or a path; `step` a number or
    "latest"). Works on sharded steps and single-process ones alike."""

    def __init__(self, store, run, step="latest"):
        super().__init__()
        self.store = _store(store)
        self.run = str(run)
        self._step_arg = step
        self.step = None

    def _resolve(self):
        if self.step is None:
            self.step = self.store.resolve(self.run, self._step_arg)
        return self.step

    def reset(self, checkpoint_id=None):
        self.step = None

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        torch = _torch()
        step = self._resolve()
        m = self.store.manifest(self.run, step)
        md = {}
        for t in m.get("tensors") or []:
            # A single-process checkpoint: one chunk, at its recorded place
            # in the global tensor for a cairn.Shard.
            shard = t.get("shard")
            size = shard["global_shape"] if shard else t["shape"]
            offsets = shard["offsets"] if shard else [0] * len(t["shape"])
            md[t["name"]] = TensorStorageMetadata(
                properties=TensorProperties(dtype=_dtypes.to_torch(t["dtype"])),
                size=torch.Size(size),
                chunks=[ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(t["shape"]))],
            )
        for t in m.get("sharded") or []:
            md[t["name"]] = TensorStorageMetadata(
                properties=TensorProperties(dtype=_dtypes.to_torch(t["dtype"])),
                size=torch.Size(t["shape"]),
                chunks=[
                    ChunkStorageMetadata(offsets=torch.Size(s["offsets"]), sizes=torch.Size(s["shape"]))
                    for s in t["shards"]
                ],
            )
        for b in m.get("blobs") or []:
            md[b["name"]] = BytesStorageMetadata()
        return Metadata(
            state_dict_metadata=md,
            storage_meta=StorageMeta(checkpoint_id=os.path.join(self.store.path, "runs", self.run, str(step))),
        )

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        self._resolve()

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        from torch.distributed.checkpoint.planner import LoadItemType

        torch = _torch()
        step = self._resolve()
        fut = _torch().futures.Future()
        try:
            byte_items = [r for r in plan.items if r.type == LoadItemType.BYTE_IO]
            tensor_items = [r for r in plan.items if r.type != LoadItemType.BYTE_IO]
            if byte_items:
                blobs = self.store.blobs(self.run, step, sorted({r.storage_index.fqn for r in byte_items}))
                for r in byte_items:
                    planner.load_bytes(r, io.BytesIO(blobs[r.storage_index.fqn]))
            dtypes = {}
            m = self.store.manifest(self.run, step)
            for t in (m.get("tensors") or []) + (m.get("sharded") or []):
                dtypes[t["name"]] = t["dtype"]
            raw, direct, staged, spans, keep = [], [], [], [], []
            for r in tensor_items:
                name = r.storage_index.fqn
                base = r.storage_index.offset or [0] * len(r.lengths)
                offsets = [int(b) + int(o) for b, o in zip(base, r.storage_offsets)]
                shape = [int(n) for n in r.lengths]
                if name not in dtypes:
                    raise cairn.NotFoundError(f"not found: tensor {name!r} in run {self.run} step {step}")
                target = planner.resolve_tensor(r).detach()
                nbytes = target.numel() * target.element_size()
                addr = target.data_ptr()
                ok = (
                    target.device.type == "cpu"
                    and target.is_contiguous()
                    and _dtypes.from_torch(target.dtype) == dtypes[name]
                    and list(target.shape) == shape
                    and not any(a < addr + nbytes and addr < b for a, b in spans)
                    # Chunks land on page boundaries (read with O_DIRECT)
                    # only in page-aligned memory; small reads go through
                    # the page cache either way.
                    and (addr % cairn._PAGE == 0 or nbytes < cairn._DIRECT_MIN)
                )
                if ok:
                    if nbytes:
                        spans.append((addr, addr + nbytes))
                    keep.append(target)
                    direct.append((r, target))
                    raw.append((name, offsets, shape, addr, nbytes))
                else:
                    staged.append((r, target, name, offsets, shape))
            # One call: each chunk the regions need is read once, verified.
            self.store._raw.restore_regions(self.run, step, raw)
            for r, target in direct:
                planner.commit_tensor(r, target)
            # The rest through page-aligned temporaries, a bounded batch at
            # a time, then copied into place.
            batch, size = [], 0
            for i, item in enumerate(staged):
                shape, name = item[4], item[2]
                tmp = cairn._aligned_array(shape, _dtypes.to_numpy(dtypes[name]))
                batch.append((item, tmp))
                size += tmp.nbytes
                if size >= cairn._BOUNCE_BYTES or i == len(staged) - 1:
                    self.store._raw.restore_regions(
                        self.run,
                        step,
                        [
                            (n, o, list(s), t.__array_interface__["data"][0], int(t.nbytes))
                            for (_, _, n, o, s), t in batch
                        ],
                    )
                    for (r, target, _, _, _), t in batch:
                        target.copy_(_from_numpy(t).reshape(target.shape))
                        planner.commit_tensor(r, target)
                    batch, size = [], 0
            fut.set_result(None)
        except BaseException as e:  # noqa: BLE001 - DCP reads it from the future
            fut.set_exception(e)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return False
