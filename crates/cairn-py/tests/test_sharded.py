"""Sharded saves from Python: ranks save parts with `cairn.Shard` values,
`Store.commit` makes the step visible, `Store.load_region` and
`Store.load` read it back at any world size."""

import threading

import ml_dtypes
import numpy as np
import pytest

import cairn

WORLD = 8


def _global_state():
    rng = np.random.default_rng(7)
    return {
        # Split by rows across the 8 ranks (uneven: 37 rows).
        "rows": rng.standard_normal((37, 29)).astype(np.float32),
        # A 2 x 4 grid of blocks.
        "grid": rng.integers(-(2**31), 2**31 - 1, size=(20, 44), dtype=np.int64).astype(np.int32),
        "bf16": rng.standard_normal((16, 33)).astype(ml_dtypes.bfloat16),
        # Replicated on every rank.
        "bias": rng.standard_normal((13,)).astype(np.float64),
        "scalar": np.array(3.5, dtype=np.float32),
    }


def _bounds(n, parts):
    """Split `n` into `parts` contiguous ranges (some may be empty)."""
    cuts = [n * i // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _rank_tensors(g, rank):
    out = {}
    r0, r1 = _bounds(g["rows"].shape[0], WORLD)[rank]
    out["rows"] = cairn.Shard(g["rows"][r0:r1], g["rows"].shape, (r0, 0))
    bi, bj = divmod(rank, 4)
    (a0, a1), (b0, b1) = _bounds(20, 2)[bi], _bounds(44, 4)[bj]
    out["grid"] = cairn.Shard(g["grid"][a0:a1, b0:b1], g["grid"].shape, (a0, b0))
    c0, c1 = _bounds(33, WORLD)[rank]
    out["bf16"] = cairn.Shard(g["bf16"][:, c0:c1], g["bf16"].shape, (0, c0))
    out["bias"] = g["bias"]
    out["scalar"] = g["scalar"]
    return out


def _save_all_ranks(store, run, step, g):
    errors = []

    def rank_main(rank):
        try:
            h = store.save(
                run,
                step,
                _rank_tensors(g, rank),
                blobs={"world": b"8"},
                metrics={"loss": 1.25} if rank == 0 else None,
                rank=rank,
                world_size=WORLD,
            )
            h.wait()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((rank, e))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _regions(shape, parts):
    """Tile a global tensor into `parts` regions the way `parts` ranks
    would read it: a grid over the first two dimensions."""
    if len(shape) == 0:
        return [((), ())]
    if len(shape) == 1:
        return [((a,), (b - a,)) for a, b in _bounds(shape[0], parts)]
    p0 = max(d for d in range(1, parts + 1) if parts % d == 0 and d * d <= parts)
    p1 = parts // p0
    out = []
    for a0, a1 in _bounds(shape[0], p0):
        for b0, b1 in _bounds(shape[1], p1):
            out.append(((a0, b0) + (0,) * (len(shape) - 2), (a1 - a0, b1 - b0) + tuple(shape[2:])))
    return out


def test_eight_ranks_commit_and_any_world_size_reads_regions(tmp_path):
    store = cairn.Store(tmp_path / "ckpt", staging_bytes=8 << 20, chunk_size=4096)
    g = _global_state()
    _save_all_ranks(store, "run", 10, g)
    # Parts alone do not make the step visible.
    assert store.steps("run") == []
    assert store.latest("run") is None

    report = store.commit("run", 10, WORLD)
    assert report.created is True
    assert report.world_size == WORLD
    assert report.parts == WORLD
    assert report.tensors == len(g)
    assert report.blobs == 1
    assert report.logical_bytes == sum(a.nbytes for a in g.values()) + 1
    assert store.steps("run") == [10]
    assert store.metrics("run", 10) == {"loss": 1.25}
    # Committing again with the same parts is a no-op.
    assert store.commit("run", 10, WORLD).created is False

    for parts in (1, 3, 16):
        for name, a in g.items():
            regions = _regions(a.shape, parts)
            got = store.load_regions("run", "latest", [(name, o, s) for o, s in regions])
            for (o, s), r in zip(regions, got):
                want = a[tuple(slice(oi, oi + si) for oi, si in zip(o, s))]
                assert r.dtype == a.dtype, name
                assert r.shape == want.shape, (name, o, s)
                assert r.tobytes() == want.tobytes(), (name, parts, o, s)
    one = store.load_region("run", 10, "grid", (3, 5), (11, 30))
    assert one.tobytes() == g["grid"][3:14, 5:35].tobytes()

    # load of a sharded step returns the full tensors.
    full = store.load("run", 10)
    assert list(full) == list(g)
    for name, a in g.items():
        assert full[name].dtype == a.dtype and full[name].shape == a.shape
        assert full[name].tobytes() == a.tobytes(), name
    assert store.blobs("run", 10) == {"world": b"8"}

    # A region outside the tensor is an error, not a short read.
    with pytest.raises(cairn.InvalidError):
        store.load_region("run", 10, "rows", (30, 0), (8, 29))
    with pytest.raises(cairn.NotFoundError):
        store.load_region("run", 10, "nope", (0,), (1,))


def _save_parts(store, run, step, world, parts):
    for rank, tensors in parts.items():
        store.save(run, step, tensors, rank=rank, world_size=world).wait()


def test_commit_names_the_gap(store):
    a = np.arange(40, dtype=np.float32).reshape(8, 5)
    _save_parts(
        store,
        "r",
        1,
        2,
        {
            0: {"w": cairn.Shard(a[0:3], (8, 5), (0, 0))},
            # rows 3 and 4 are nobody's
            1: {"w": cairn.Shard(a[5:8], (8, 5), (5, 0))},
        },
    )
    with pytest.raises(cairn.InvalidError, match=r'"w".*no shard covers element \[3, 0\]'):
        store.commit("r", 1, 2)
    assert store.steps("r") == []


def test_commit_names_the_overlap(store):
    a = np.arange(40, dtype=np.float32).reshape(8, 5)
    _save_parts(
        store,
        "r",
        1,
        2,
        {
            0: {"w": cairn.Shard(a[0:5], (8, 5), (0, 0))},
            1: {"w": cairn.Shard(a[4:8], (8, 5), (4, 0))},
        },
    )
    with pytest.raises(cairn.InvalidError, match=r'"w": shard .* overlaps shard'):
        store.commit("r", 1, 2)
    assert store.steps("r") == []


def test_commit_names_the_missing_rank(store):
    a = np.arange(40, dtype=np.float32).reshape(8, 5)
    _save_parts(
        store,
        "r",
        1,
        3,
        {
            0: {"w": cairn.Shard(a[0:3], (8, 5), (0, 0))},
            2: {"w": cairn.Shard(a[6:8], (8, 5), (6, 0))},
        },
    )
    with pytest.raises(cairn.NotFoundError, match="rank 1 of world size 3 has no part"):
        store.commit("r", 1, 3)
    assert store.steps("r") == []
    # The late rank saves; the commit now succeeds.
    _save_parts(store, "r", 1, 3, {1: {"w": cairn.Shard(a[3:6], (8, 5), (3, 0))}})
    store.commit("r", 1, 3)
    assert store.load("r", 1)["w"].tobytes() == a.tobytes()


def test_a_named_attempt_leaves_an_abandoned_one_aside(store):
    a = np.arange(40, dtype=np.float32).reshape(8, 5)
    b = a + 100
    # An earlier save of step 1 died after rank 0 saved; then every rank
    # saved it again, with other contents, as attempt "second".
    store.save("r", 1, {"w": cairn.Shard(a[0:4], (8, 5), (0, 0))}, rank=0, world_size=2, attempt="first").wait()
    for rank in (0, 1):
        part = cairn.Shard(b[4 * rank : 4 * rank + 4], (8, 5), (4 * rank, 0))
        store.save("r", 1, {"w": part}, rank=rank, world_size=2, attempt="second").wait()
    with pytest.raises(cairn.NotFoundError, match="rank 1 of world size 2"):
        store.commit("r", 1, 2, attempt="first")
    report = store.commit("r", 1, 2, attempt="second")
    assert report.parts == 2
    assert store.load("r", 1)["w"].tobytes() == b.tobytes()
    assert store.manifest("r", 1)["attempt"] == "second"
    # Arguments.
    with pytest.raises(cairn.InvalidError, match="only a part"):
        store.save("r", 2, {"w": a}, attempt="x")
    with pytest.raises(cairn.InvalidError, match="attempt"):
        store.save("r", 2, {"w": a}, rank=0, world_size=1, attempt="a/b")
    with pytest.raises(cairn.InvalidError, match="expected a str"):
        store.commit("r", 2, 1, attempt=7)
    assert store.steps("r") == [1]


def test_run_and_metadata_that_cannot_be_stored_are_named(store):
    a = np.zeros(4, dtype=np.float32)
    for run in (None, 5, b"r"):
        with pytest.raises(cairn.InvalidError, match=r"invalid run: .*expected a str"):
            store.save(run, 1, {"w": a})
    with pytest.raises(cairn.InvalidError, match="invalid run"):
        store.steps(None)
    with pytest.raises(cairn.InvalidError, match="invalid metadata: Out of range float"):
        store.save("r", 1, {"w": a}, metadata={"lr": float("nan")})
    with pytest.raises(cairn.InvalidError, match="invalid metadata: .*not JSON serializable"):
        store.save("r", 1, {"w": a}, metadata={"when": object()})
    assert store.steps("r") == []


def test_commit_and_world_size_arguments_are_checked(store):
    with pytest.raises(cairn.InvalidError, match="world size"):
        store.commit("r", 1, 0)
    with pytest.raises(cairn.InvalidError, match="rank"):
        store.save("r", 1, {"w": np.zeros(2)}, rank=-1, world_size=2)
