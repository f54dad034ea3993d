"""Worker for test_dcp.py, launched by torchrun on CPU with gloo.

    torchrun --nproc_per_node=N dcp_worker.py save|load|kill DIR

save (4 ranks): an FSDP2-sharded model and its Adam state, saved at step 1
  with DCP's FileSystemWriter (DIR/fs1) and with the cairn writer (run
  "dcp" step 1 of the store DIR/store); after another training step, saved
  with FileSystemWriter (DIR/fs2) and with `dcp.async_save` through the cairn
  writer (step 2), training on while the save runs.
load (any N): a freshly initialized model of the same shape sharded over N
  ranks, loaded from each cairn step and from the matching FileSystemWriter
  directory; every local shard and every other value must be equal, bit
  for bit.
kill (4 ranks): rank 2 SIGKILLs itself in the middle of saving step 3.
resave (4 ranks): after kill, the restarted job saves step 3 again with
  other contents and loads it back; each rank writes DIR/ok-resave-RANK.
groups (2 ranks): a value that differs per rank, saved with `dcp.save` and
  `dcp.async_save` (DCP keeps one rank's, as FileSystemWriter shows); saves
  with `no_dist=True` on each rank and with a one-rank process group. Each
  case writes DIR/CASE-RANK: "ok", or the error.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import cairn
from cairn.torch.dcp import CairnStorageReader, CairnStorageWriter


def build(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 40, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 7),
    )
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 24, generator=g)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def state_of(model, opt):
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "extra": {"epoch": 3, "note": "cairn"}}


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def same(a, b, where):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), (where, sorted(fa.keys() ^ fb.keys()))
    n = 0
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            x, y = local(x), local(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (where, k, x.shape, y.shape)
            assert x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), (where, k)
            n += 1
        else:
            assert x == y, (where, k, x, y)
    return n


def main():
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    store = cairn.Store(os.path.join(root, "store"), staging_bytes=8 << 20, chunk_size=4096)
    if mode == "save":
        save_group = dist.new_group(backend="gloo")
        model, opt = build(0)
        train_step(model, opt, 1)
        state = state_of(model, opt)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(root, "fs1")))
        dcp.save(state, storage_writer=CairnStorageWriter(store, "dcp", 1))
        train_step(model, opt, 2)
        state = state_of(model, opt)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(root, "fs2")))
        before = {k: local(v).clone() for k, v in flat(state).items() if isinstance(v, torch.Tensor)}
        # DCP's advice: a separate group, so the save's collectives never
        # interleave with training's.
        f = dcp.async_save(
            state, storage_writer=CairnStorageWriter(store, "dcp", 2), process_group=save_group
        )
        # Training goes on while the save runs: staged bytes must not change.
        train_step(model, opt, 3)
        f.result()
        changed = [k for k, v in flat(state_of(model, opt)).items() if isinstance(v, torch.Tensor)
                   and not local(v).equal(before[k])]
        assert changed, "the training step after async_save changed nothing"
        dist.barrier()
    elif mode == "load":
        for step in (1, 2):
            model, opt = build(100 + world)
            train_step(model, opt, 9)  # creates optimizer state of the right shapes
            got = state_of(model, opt)
            got["extra"] = {"epoch": 0, "note": ""}
            dcp.load(got, storage_reader=CairnStorageReader(os.path.join(root, "store"), "dcp", step))
            model2, opt2 = build(200 + world)
            train_step(model2, opt2, 9)
            want = state_of(model2, opt2)
            want["extra"] = {"epoch": 0, "note": ""}
            dcp.load(want, storage_reader=dcp.FileSystemReader(os.path.join(root, f"fs{step}")))
            n = same(got, want, f"step {step} world {world} rank {rank}")
            assert got["extra"] == {"epoch": 3, "note": "cairn"}
            assert n >= 10, n
        with open(os.path.join(root, f"ok-load-{world}-{rank}"), "w") as fh:
            fh.write("ok")
    elif mode == "kill":
        model, opt = build(0)
        train_step(model, opt, 1)
        state = state_of(model, opt)
        if rank == 2:
            real_save = cairn.Store.save

            def dying_save(self, *a, **k):
                os.kill(os.getpid(), signal.SIGKILL)
                return real_save(self, *a, **k)

            cairn.Store.save = dying_save
        dcp.save(state, storage_writer=CairnStorageWriter(store, "dcp", 3))
    elif mode == "resave":
        # The job restarted after "kill": it trains on from step 1 and saves
        # step 3 again, with other contents than the dead attempt's parts.
        model, opt = build(0)
        train_step(model, opt, 1)
        train_step(model, opt, 4)
        state = state_of(model, opt)
        dcp.save(state, storage_writer=CairnStorageWriter(store, "dcp", 3))
        model2, opt2 = build(300)
        train_step(model2, opt2, 9)
        got = state_of(model2, opt2)
        got["extra"] = {"epoch": 0, "note": ""}
        dcp.load(got, storage_reader=CairnStorageReader(store, "dcp", 3))
        n = same(got, state, f"resaved step 3 rank {rank}")
        assert n >= 10, n
        with open(os.path.join(root, f"ok-resave-{rank}"), "w") as fh:
            fh.write("ok")
    elif mode == "groups":
        groups(root, rank, store)
    dist.destroy_process_group()


def outcome(root, case, rank, fn):
    try:
        fn()
        text = "ok"
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        text = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"{case}-{rank}"), "w") as fh:
        fh.write(text)


def groups(root, rank, store):
    # A per-rank value: DCP's planner keeps one rank's copy; the cairn
    # writer must store what FileSystemWriter stores, sync or async.
    state = {"w": torch.ones(4), "loss": 1.0 + rank, "nested": {"rank": rank}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(root, "fs-per-rank")))

    def check(step):
        got = {"w": torch.zeros(4), "loss": 0.0, "nested": {"rank": -1}}
        dcp.load(got, storage_reader=CairnStorageReader(store, "per-rank", step))
        want = {"w": torch.zeros(4), "loss": 0.0, "nested": {"rank": -1}}
        dcp.load(want, storage_reader=dcp.FileSystemReader(os.path.join(root, "fs-per-rank")))
        assert torch.equal(got["w"], torch.ones(4)), got
        assert got["loss"] == want["loss"] and got["nested"] == want["nested"], (got, want)

    def sync_save():
        dcp.save(state, storage_writer=CairnStorageWriter(store, "per-rank", 1))
        check(1)

    def async_save():
        dcp.async_save(state, storage_writer=CairnStorageWriter(store, "per-rank", 2)).result()
        dist.barrier()
        check(2)

    outcome(root, "per-rank-sync", rank, sync_save)
    dist.barrier()
    outcome(root, "per-rank-async", rank, async_save)
    dist.barrier()

    # Every rank saves a checkpoint of its own, without collectives.
    def no_dist():
        w = torch.arange(3.0) + rank
        dcp.save({"w": w}, storage_writer=CairnStorageWriter(store, f"own-{rank}", 1), no_dist=True)
        back = {"w": torch.zeros(3)}
        dcp.load(back, storage_reader=CairnStorageReader(store, f"own-{rank}", 1), no_dist=True)
        assert torch.equal(back["w"], w), back

    def no_dist_async():
        w = torch.arange(3.0) + 10 * rank
        dcp.async_save(
            {"w": w}, storage_writer=CairnStorageWriter(store, f"own-{rank}", 2), no_dist=True
        ).result()
        back = {"w": torch.zeros(3)}
        dcp.load(back, storage_reader=CairnStorageReader(store, f"own-{rank}", 2), no_dist=True)
        assert torch.equal(back["w"], w), back

    outcome(root, "no-dist", rank, no_dist)
    outcome(root, "no-dist-async", rank, no_dist_async)
    dist.barrier()
    # A process group of rank 0 only.
    solo = dist.new_group([0])
    if rank == 0:
        def subgroup():
            dcp.save({"w": torch.full((3,), 5.0)}, storage_writer=CairnStorageWriter(store, "solo", 1),
                     process_group=solo)
            dcp.async_save({"w": torch.full((3,), 6.0)}, storage_writer=CairnStorageWriter(store, "solo", 2),
                           process_group=solo).result()
            for step, v in ((1, 5.0), (2, 6.0)):
                back = {"w": torch.zeros(3)}
                dcp.load(back, storage_reader=CairnStorageReader(store, "solo", step), process_group=solo)
                assert torch.equal(back["w"], torch.full((3,), v)), back

        outcome(root, "subgroup", rank, subgroup)
    dist.barrier()


if __name__ == "__main__":
    main()
