"""cairn as PyTorch DCP's storage: torchrun with 4 CPU ranks (gloo) saves
an FSDP2-sharded model and optimizer through `CairnStorageWriter` (plain
and `dcp.async_save`), 2, 3 and 1 ranks load it through
`CairnStorageReader`, bit-exact against the same state saved with DCP's
`FileSystemWriter`; a rank killed mid-save leaves the step invisible, and
the restarted job's save of that step commits. The
ranks' work is in `dcp_worker.py`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cairn

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from cairn.torch.dcp import CairnStorageReader, CairnStorageWriter  # noqa: E402

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(n, mode, root, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(
        [str(TORCHRUN), "--standalone", f"--nproc_per_node={n}", str(HERE / "dcp_worker.py"), mode, str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    if expect_ok and p.returncode != 0:
        pytest.fail(f"torchrun {mode} with {n} ranks failed ({p.returncode}):\n{p.stdout[-6000:]}")
    return p


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    torchrun(4, "save", root)
    return root


def test_four_ranks_save_and_the_steps_are_committed(saved):
    store = cairn.Store(saved / "store")
    assert store.steps("dcp") == [1, 2]
    m = store.manifest("dcp", 1)
    assert m["world_size"] == 4
    # FSDP2 shards every parameter and its Adam moments across the 4 ranks.
    w = next(t for t in m["sharded"] if t["name"] == "model.2.weight")
    assert w["shape"] == [40, 40]
    assert sorted({s["rank"] for s in w["shards"]}) == [0, 1, 2, 3]
    assert any(t["name"] == "optim.state.2.weight.exp_avg" for t in m["sharded"])


@pytest.mark.parametrize("ranks", [2, 3, 1])
def test_load_resharded_is_bit_exact_with_filesystem_writer(saved, ranks):
    torchrun(ranks, "load", saved)
    for r in range(ranks):
        assert (saved / f"ok-load-{ranks}-{r}").read_text() == "ok"


def test_dcp_step_loads_with_cairn_store_load_and_matches_filesystem_writer(saved):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    store = cairn.Store(saved / "store")
    for step in (1, 2):
        ref_path = saved / f"ref{step}.pt"
        dcp_to_torch_save(saved / f"fs{step}", ref_path)
        ref = torch.load(ref_path, weights_only=False)

        def flat(obj, prefix=""):
            out = {}
            for k, v in obj.items():
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = v
            return out

        ref = {k: v for k, v in flat(ref).items() if isinstance(v, torch.Tensor)}
        got = store.load("dcp", step)
        assert set(ref) <= set(got), sorted(set(ref) - set(got))
        for k, t in ref.items():
            assert got[k].tobytes() == t.numpy().tobytes(), (step, k)


def test_step_saved_by_cairn_store_save_loads_through_dcp(tmp_path):
    store = cairn.Store(tmp_path / "s")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    b = rng.standard_normal((5,)).astype(np.float32)
    store.save("plain", 7, {"w": w, "b": b}).wait()
    # Sharded, through Store.save with ranks.
    store.save("plain", 8, {"w": cairn.Shard(w[:2], w.shape, (0, 0)), "b": b}, rank=0, world_size=2).wait()
    store.save("plain", 8, {"w": cairn.Shard(w[2:], w.shape, (2, 0))}, rank=1, world_size=2).wait()
    store.commit("plain", 8, 2)
    for step in (7, 8):
        state = {"w": torch.zeros(6, 5), "b": torch.zeros(5)}
        dcp.load(state, storage_reader=CairnStorageReader(store, "plain", step))
        assert state["w"].numpy().tobytes() == w.tobytes()
        assert state["b"].numpy().tobytes() == b.tobytes()
    # And the other way: a single-process DCP save, read with Store.load.
    state = {"w": torch.from_numpy(w), "meta": {"epoch": 4}}
    dcp.save(state, storage_writer=CairnStorageWriter(tmp_path / "s", "viadcp", 1))
    assert store.steps("viadcp") == [1]
    assert store.load("viadcp", 1)["w"].tobytes() == w.tobytes()
    back = {"w": torch.zeros(6, 5), "meta": {"epoch": 0}}
    dcp.load(back, storage_reader=CairnStorageReader(str(tmp_path / "s"), "viadcp"))
    assert back["meta"] == {"epoch": 4}
    assert back["w"].numpy().tobytes() == w.tobytes()


def test_rank_killed_mid_save_leaves_the_step_invisible_and_a_resave_commits(saved):
    p = torchrun(4, "kill", saved, expect_ok=False)
    assert p.returncode != 0, p.stdout[-4000:]
    assert "SIGKILL" in p.stdout or "Signal 9" in p.stdout, p.stdout[-4000:]
    store = cairn.Store(saved / "store")
    assert store.steps("dcp") == [1, 2]
    assert 3 not in store.steps("dcp")
    with pytest.raises(cairn.NotFoundError):
        store.commit("dcp", 3, 4)
    with pytest.raises(cairn.NotFoundError, match="run dcp step 3"):
        CairnStorageReader(store, "dcp", 3).read_metadata()
    # Whatever parts the other ranks published never became a step; the
    # killed rank published none.
    parts_dir = saved / "store" / "runs" / "dcp" / f"{3:020d}" / "parts"
    parts = [p.name for p in parts_dir.iterdir()] if parts_dir.exists() else []
    assert not any(p.startswith("2-of-4") for p in parts), parts
    assert parts, "the ranks that lived published their parts"
    # The job restarts and saves step 3 again with other contents: the
    # dead attempt's parts are left aside, the new save commits and loads.
    torchrun(4, "resave", saved)
    assert all((saved / f"ok-resave-{r}").exists() for r in range(4))
    assert store.steps("dcp") == [1, 2, 3]
    now = sorted(p.name for p in parts_dir.iterdir())
    assert set(parts) < set(now) and len(now) == len(parts) + 4, (parts, now)
    # The record names the attempt it took: not the dead one.
    assert store.manifest("dcp", 3)["attempt"]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp-groups")
    torchrun(2, "groups", root)
    return root


def test_a_value_that_differs_per_rank_is_stored_once_sync_and_async(groups):
    # DCP keeps one rank's copy of a non-tensor value; the cairn writer
    # stores that one (the value FileSystemWriter stores) in both paths.
    for case in ("per-rank-sync", "per-rank-async"):
        for r in range(2):
            assert (groups / f"{case}-{r}").read_text() == "ok", case
    store = cairn.Store(groups / "store")
    assert store.steps("per-rank") == [1, 2]
    assert store.blobs("per-rank", 1) == store.blobs("per-rank", 2)


def test_no_dist_and_a_process_group_set_the_world_of_the_step(groups):
    for r in range(2):
        assert (groups / f"no-dist-{r}").read_text() == "ok"
        assert (groups / f"no-dist-async-{r}").read_text() == "ok"
    assert (groups / "subgroup-0").read_text() == "ok"
    store = cairn.Store(groups / "store")
    for run in ("own-0", "own-1", "solo"):
        assert store.steps(run) == [1, 2], run
        assert store.manifest(run, 1)["world_size"] == 1


def test_complex_tensors_are_refused_naming_the_real_view(tmp_path):
    # The DCP reader builds DCP's metadata from what the step stores, which
    # has no complex dtype: the writer refuses them with the way out.
    state = {"freqs_cis": torch.polar(torch.ones(4, 2), torch.zeros(4, 2))}
    with pytest.raises(BaseException, match="view_as_real"):
        dcp.save(state, storage_writer=CairnStorageWriter(tmp_path / "s", "c", 1), no_dist=True)
    assert cairn.Store(tmp_path / "s").steps("c") == []
    real = {"freqs_cis": torch.view_as_real(state["freqs_cis"])}
    dcp.save(real, storage_writer=CairnStorageWriter(tmp_path / "s", "c", 2), no_dist=True)
    back = {"freqs_cis": torch.zeros(4, 2, 2)}
    dcp.load(back, storage_reader=CairnStorageReader(tmp_path / "s", "c", 2), no_dist=True)
    assert torch.equal(torch.view_as_complex(back["freqs_cis"]), state["freqs_cis"])


def test_a_checkpoint_id_picks_the_step_and_other_ids_are_refused(tmp_path):
    # DCP hands a save's or load's checkpoint_id to the storage's reset: a
    # writer or reader reused across ids saves and loads the step each
    # names, the STORE/runs/RUN/STEP path its storage_meta reports.
    root = tmp_path / "s"
    a = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    b = {"w": a["w"] * 2}
    writer = CairnStorageWriter(root, "r", 1)
    dcp.save(a, storage_writer=writer, no_dist=True)
    dcp.save(b, checkpoint_id=root / "runs" / "r" / "2", storage_writer=writer, no_dist=True)
    dcp.save(a, checkpoint_id=f"{root}/runs/other/5/", storage_writer=writer, no_dist=True)
    store = cairn.Store(root)
    assert store.steps("r") == [1, 2]
    assert store.steps("other") == [5]
    assert writer.storage_meta().checkpoint_id == str(root / "runs" / "other" / "5")

    reader = CairnStorageReader(root, "r", 1)
    for cid, want in (
        (root / "runs" / "r" / "2", b),
        (f"{root}/runs/r/1", a),
        (root / "runs" / "r" / "latest", b),
        (root / "runs" / "other" / "latest", a),
    ):
        back = {"w": torch.zeros(3, 4)}
        dcp.load(back, checkpoint_id=cid, storage_reader=reader, no_dist=True)
        assert torch.equal(back["w"], want["w"]), cid

    # An id naming no step is refused by name, and nothing is written.
    bad = [tmp_path / "elsewhere", root / "runs" / "r", root / "runs" / "r" / "x", 7]
    for cid in bad + [root / "runs" / "r" / "latest"]:
        assert not CairnStorageWriter.validate_checkpoint_id(cid)
        with pytest.raises(cairn.InvalidError, match="checkpoint_id"):
            dcp.save(b, checkpoint_id=cid, storage_writer=writer, no_dist=True)
    for cid in bad:
        assert not CairnStorageReader.validate_checkpoint_id(cid)
        with pytest.raises(cairn.InvalidError, match="checkpoint_id"):
            dcp.load({"w": torch.zeros(3, 4)}, checkpoint_id=cid, storage_reader=reader, no_dist=True)
    assert CairnStorageWriter.validate_checkpoint_id(root / "runs" / "r" / "3")
    assert CairnStorageReader.validate_checkpoint_id(root / "runs" / "r" / "latest")
    assert store.steps("r") == [1, 2]
    assert store.steps("other") == [5]
