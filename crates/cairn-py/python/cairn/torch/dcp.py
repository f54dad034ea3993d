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
that name. The ranks are those DCP saves with (its `process_group`, or this
process alone with `no_dist=True`): the coordinator numbers the plans it
gathers, and each rank's plan carries its rank and the world size back.
Each item is saved by the one rank DCP's planner gives it (a replicated
value once, as with `FileSystemWriter`). `finish`, which DCP calls on the
coordinator once every rank's writes are done, commits the step: until then
it is invisible, so a rank that dies mid-save leaves no step behind. Each
save is an attempt of its own (a name the coordinator draws and hands to
the ranks with their plans), and the commit takes that attempt's parts:
saving a step again after a job died mid-save, with other contents,
commits the new save; the abandoned parts are left for collection.

Loading: `read_metadata` rebuilds DCP's `Metadata` from cairn's own record
(a tensor's global shape and dtype, one chunk per stored shard; one bytes
entry per blob), so a step saved by `cairn.Store.save` loads through DCP
and one saved through DCP loads with `cairn.Store.load`. DCP's planner
reshards; `read_data` serves every `ReadItem` of the rank with one call to
the core's region reads, which read each chunk once and verify it, straight
into the destination tensor when it is a contiguous CPU tensor of the saved
dtype.

Checkpoint ids: DCP passes `checkpoint_id` (as in
`dcp.save(state, checkpoint_id=..., storage_writer=w)`) to the storage's
`reset`. For cairn it is the path `STORE/runs/RUN/STEP` that
`storage_meta` reports (`STEP` may be "latest" for a reader): the writer
then saves, and the reader reads, that step of that store. Any other id is
refused by name rather than ignored, so a writer or reader reused across
ids never saves to or loads from a step other than the one asked for.

`dcp.async_save` stages with DCP's default stager (a CPU copy of the state
dict, so training may go on) and then saves that copy as `dcp.save` does:
which rank saves which item, and the ranks taking part, are only known once
the plans are gathered, after staging.
"""

import dataclasses
import io
import os
import uuid

import cairn

from .. import _dtypes
from . import _from_numpy, _store, _store_key, _store_to_read

__all__ = ["CairnStorageWriter", "CairnStorageReader"]


def _torch():
    import torch

    return torch


@dataclasses.dataclass(frozen=True)
class _Part:
    """A rank's place in the save, as the coordinator numbered the plans,
    and the save attempt the coordinator drew for this save: carried back
    to the rank in its plan's `storage_data`."""

    rank: int
    world_size: int
    attempt: str


def _dcp_base():
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

    return StorageWriter, StorageReader


_StorageWriter, _StorageReader = _dcp_base()


def _checkpoint_id(checkpoint_id, *, reader):
    """(store path, run, step) named by a DCP checkpoint id of the form
    `STORE/runs/RUN/STEP` (`STEP` a number, or "latest" for a reader);
    `InvalidError` naming the id otherwise."""
    want = "STORE/runs/RUN/STEP" + (' (STEP a number or "latest")' if reader else " (STEP a number)")
    if not isinstance(checkpoint_id, (str, bytes, os.PathLike)):
        raise cairn.InvalidError(
            f"invalid checkpoint_id: got {type(checkpoint_id).__name__}, expected a path {want}"
        )
    text = os.fsdecode(checkpoint_id)
    parts = text.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[1] != "runs" or not parts[0] or not parts[2]:
        raise cairn.InvalidError(f"invalid checkpoint_id: {text!r}: expected a path {want}")
    step = parts[3]
    if step.isascii() and step.isdigit():
        step = int(step)
    elif not (reader and step == "latest"):
        raise cairn.InvalidError(f"invalid checkpoint_id: {text!r}: step {step!r} is not a number; expected {want}")
    return parts[0], parts[2], step


def _same_store(store, path, *, read=False):
    """`store` if it is the store at `path`, else the one opened there (to
    read: as `cairn.torch.load` opens it, creating nothing)."""
    if _store_key(path) == _store_key(store.path):
        return store
    return _store_to_read(path)[0] if read else _store(path)


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
    cairn store (`store` a `cairn.Store` or a path). Every rank DCP saves
    with (its process group, or this process alone with `no_dist=True`)
    saves a part; the coordinator's `finish` commits the step."""

    def __init__(self, store, run, step, *, metrics=None):
        super().__init__()
        self.store = _store(store)
        self.run = cairn._run_arg(run)
        self.step = int(step)
        self.metrics = metrics
        self.is_coordinator = True
        self.rank = 0
        self.world_size = 1
        self.attempt = None

    # -- StorageWriter ---------------------------------------------------
    def reset(self, checkpoint_id=None):
        """A new save: into the step `checkpoint_id` names
        (`STORE/runs/RUN/STEP`), or the same step as before without one."""
        if checkpoint_id is None:
            return
        path, run, step = _checkpoint_id(checkpoint_id, reader=False)
        self.store = _same_store(self.store, path)
        self.run, self.step = run, step

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
        self.is_coordinator = bool(is_coordinator)
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        """Number the gathered plans (DCP orders them by rank in its
        process group): each rank's plan carries its rank, the world size
        and this save's attempt back to it, and the coordinator commits
        that many parts of that attempt. A fresh attempt per save: parts
        an earlier save of the step left behind (a job that died before
        its commit, then saved the step again after a restart) are left
        aside by the commit, not mixed in or refused."""
        self.world_size = len(plans)
        self.attempt = uuid.uuid4().hex
        return [
            dataclasses.replace(
                p, storage_data=_Part(rank=i, world_size=len(plans), attempt=self.attempt)
            )
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.storage import WriteResult

        fut = _torch().futures.Future()
        try:
            part = plan.storage_data
            if not isinstance(part, _Part):
                raise cairn.InvalidError(
                    "invalid DCP plan: it does not carry the rank's place in the save "
                    "(CairnStorageWriter.prepare_global_plan numbers the plans)"
                )
            self.rank = part.rank
            # The attempt the plan carries (a cached plan carries the one
            # drawn when it was made): the coordinator commits this one.
            self.attempt = part.attempt
            tensors, blobs, results = {}, {}, []
            for item in plan.items:
                fqn = item.index.fqn
                if item.type == WriteItemType.BYTE_IO:
                    blobs[fqn] = _bytes_of(planner.resolve_data(item))
                    size = len(blobs[fqn])
                else:
                    if fqn in tensors:
                        raise cairn.InvalidError(
                            f"invalid DCP plan: rank {self.rank} writes two chunks of {fqn!r}; "
                            "the cairn writer takes one chunk per tensor and rank"
                        )
                    tensors[fqn] = _as_shard(fqn, planner.resolve_data(item), item)
                    size = item.tensor_storage_size() or 0
                results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=None))
            h = self.store.save(
                self.run,
                self.step,
                tensors,
                blobs=blobs,
                metrics=self.metrics,
                rank=part.rank,
                world_size=part.world_size,
                attempt=part.attempt,
            )
            h.wait()
            fut.set_result(results)
        except BaseException as e:  # noqa: BLE001 - DCP reads it from the future
            fut.set_exception(e)
        return fut

    def finish(self, metadata, results):
        if self.is_coordinator:
            self.store.commit(self.run, self.step, self.world_size, attempt=self.attempt)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        """Whether `checkpoint_id` is a step path `STORE/runs/RUN/STEP`."""
        try:
            _checkpoint_id(checkpoint_id, reader=False)
        except cairn.InvalidError:
            return False
        return True

    def storage_meta(self):
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=os.path.join(self.store.path, "runs", self.run, str(self.step)))


class CairnStorageReader(_StorageReader):
    """DCP `StorageReader` over committed step `(run, step)` of a cairn
    store (`store` a `cairn.Store` or a path; `step` a number or
    "latest"). Works on sharded steps and single-process ones alike."""

    def __init__(self, store, run, step="latest"):
        super().__init__()
        # By path: opened to read only, as `cairn.torch.load` does (a
        # missing store is NotFoundError; the smallest staging pool).
        self.store = _store_to_read(store)[0]
        self.run = cairn._run_arg(run)
        self._step_arg = step
        self.step = None

    def _resolve(self):
        if self.step is None:
            self.step = self.store.resolve(self.run, self._step_arg)
        return self.step

    def reset(self, checkpoint_id=None):
        """A new load: of the step `checkpoint_id` names
        (`STORE/runs/RUN/STEP`, `STEP` a number or "latest"), or of the
        same step argument as before (resolved anew) without one."""
        if checkpoint_id is not None:
            path, run, step = _checkpoint_id(checkpoint_id, reader=True)
            self.store = _same_store(self.store, path, read=True)
            self.run, self._step_arg = run, step
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
            raw, direct, staged, keep, candidates = [], [], [], [], []
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
                    # Chunks land on page boundaries (read with O_DIRECT)
                    # only in page-aligned memory; small reads go through
                    # the page cache either way.
                    and (addr % cairn._PAGE == 0 or nbytes < cairn._DIRECT_MIN)
                )
                candidates.append((r, target, name, offsets, shape, addr, nbytes, ok))
            # The core fills the direct regions in any order: targets that
            # share memory go through temporaries, copied in plan order.
            direct_ok = [i for i, c in enumerate(candidates) if c[7] and c[6] > 0]
            shared = cairn._overlapping([(candidates[i][5], candidates[i][5] + candidates[i][6]) for i in direct_ok])
            shared = {direct_ok[j] for j in shared}
            for i, (r, target, name, offsets, shape, addr, nbytes, ok) in enumerate(candidates):
                if ok and i not in shared:
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
        """Whether `checkpoint_id` is a step path `STORE/runs/RUN/STEP`
        (`STEP` a number or "latest")."""
        try:
            _checkpoint_id(checkpoint_id, reader=True)
        except cairn.InvalidError:
            return False
        return True
