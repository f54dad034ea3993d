"""Saves through leased slices of the staging pool (the path CUDA tensors
take; `cairn.Store(..., leases=True)` sends CPU torch tensors the same
way): bytes copied by the caller straight into the pool, handed back lease
by lease, with the pool's back-pressure."""

import time

import numpy as np
import pytest
import torch

import cairn
import cairn.torch as ct

CHUNK = 1 << 20


def leased_store(path, pool_mib=8):
    return cairn.Store(path, staging_bytes=pool_mib << 20, chunk_size=CHUNK, leases=True)


def state():
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(3 * CHUNK // 4 + 123, generator=g),  # 3 chunks + a tail
        "bf16": torch.randn(700_001, generator=g).to(torch.bfloat16),
        "small_i64": torch.arange(1000, dtype=torch.int64),
        "small_f16": torch.randn(33, 7, generator=g).to(torch.float16),
        "bool": torch.rand(999, generator=g) > 0.5,
        "u8": torch.randint(0, 255, (4096,), dtype=torch.uint8, generator=g),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "transposed": torch.randn(300, 200, generator=g).t(),
    }


def test_a_leased_save_round_trips_bit_exact(tmp_path):
    st = leased_store(tmp_path / "s")
    s = state()
    h = st.save("r", 1, s, blobs={"b": b"xyz"}, metadata={"m": 1}, metrics={"loss": 2.0})
    h.wait()
    out = {k: torch.empty(tuple(v.shape), dtype=v.dtype) for k, v in s.items()}
    st.load_into("r", out, step=1)
    for k, v in s.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k
    assert st.blobs("r", 1) == {"b": b"xyz"}
    assert st.metadata("r", 1) == {"m": 1} and st.metrics("r", 1) == {"loss": 2.0}
    # The same chunks as an ordinary save: a copy-path re-save of the large
    # tensors writes nothing new.
    plain = cairn.Store(tmp_path / "s", staging_bytes=8 << 20, chunk_size=CHUNK)
    del st
    rep = plain.save("r", 2, {"big": s["big"], "bf16": s["bf16"]}).wait()
    assert rep.chunks_written == 0 and rep.bytes_deduped == s["big"].nbytes + s["bf16"].nbytes


def test_cairn_torch_state_through_leases_with_a_pool_smaller_than_the_state(tmp_path):
    # 24 MiB of tensors through a 4 MiB pool: the save waits for the
    # pipeline to drain leases to disk, and still round-trips.
    st = leased_store(tmp_path / "s", pool_mib=4)
    model = {f"l{i}": torch.randn(CHUNK // 4 * 2 + i) for i in range(12)}
    full = {"model": model, "step": 5}
    rep = ct.save(full, st, "r", 1)
    assert rep.logical_bytes >= 24 << 20
    back = {"model": {k: torch.zeros_like(v) for k, v in model.items()}}
    ct.load(back, st, "r", 1)
    assert back["step"] == 5
    for k, v in model.items():
        assert torch.equal(back["model"][k], v), k


def test_tensors_overwritten_after_save_returns_do_not_leak(tmp_path):
    st = leased_store(tmp_path / "s", pool_mib=4)
    ts = {f"t{i}": torch.full((CHUNK // 4 * 3,), float(i)) for i in range(8)}
    h = st.save("r", 1, ts)
    for t in ts.values():
        t.fill_(-1.0)
    h.wait()
    back = st.load("r", 1)
    for i in range(8):
        assert (back[f"t{i}"] == float(i)).all(), i


def test_leases_report_a_full_pool_and_refuse_to_wait_while_holding(tmp_path):
    st = leased_store(tmp_path / "s", pool_mib=2)
    specs = [(f"t{i}", "F32", [CHUNK // 4], None) for i in range(4)]
    session = st._raw.lease_save("r", 1, specs, [], None, None, None)
    assert session.lease_count == 4
    a = session.lease(False)
    b = session.lease(False)
    assert a is not None and b is not None
    assert a[2] == CHUNK and a[1] % 4096 == 0 and a[3] == [(0, 0, 0, CHUNK)]
    # The 2 MiB pool is full: no lease without waiting, and waiting while
    # holding leases would wait on ourselves.
    assert session.lease(False) is None
    with pytest.raises(cairn.InvalidError, match="still held"):
        session.lease(True)
    session.abort()
    assert st.steps("r") == []


def test_a_lease_dropped_without_handing_back_fails_cleanly_and_frees_its_space(tmp_path):
    st = leased_store(tmp_path / "s", pool_mib=2)
    pool, base = st._pool()
    specs = [(f"t{i}", "F32", [CHUNK // 4], None) for i in range(2)]
    session = st._raw.lease_save("r", 1, specs, [], None, None, None)
    idx, addr, n, _ = session.lease(True)
    pool[addr - base : addr - base + n].fill_(1)
    session.submit(idx)
    idx2, _, _, _ = session.lease(False)
    session.discard(idx2)
    assert session.held == 0
    with pytest.raises(cairn.InvalidError, match=r'lease 1 \("t1" bytes 0\.\.1048576\) was dropped'):
        session.finish()
    with pytest.raises(cairn.NotFoundError):
        st.resolve("r", 1)
    assert st.steps("r") == []
    # The whole 2 MiB pool is free again (once the chunk handed back is
    # drained): a new save of the same step takes both leases at once.
    again = st._raw.lease_save("r", 1, specs, [], None, None, None)
    got = [again.lease(True), None]
    got[1] = again.lease(False)
    deadline = time.monotonic() + 60
    while got[1] is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the first save's submitted chunk may still be draining
        got[1] = again.lease(False)
    assert got[1] is not None
    for idx, addr, n, _ in got:
        pool[addr - base : addr - base + n].fill_(2)
        again.submit(idx)
    cairn.SaveHandle(again.finish()).wait()
    back = st.load("r", 1)
    for k, v in back.items():
        assert (v.view(np.uint8) == 2).all(), k
    assert st.steps("r") == [1]


def test_a_leased_save_of_an_existing_step_is_refused_before_any_lease(tmp_path):
    st = leased_store(tmp_path / "s")
    st.save("r", 1, {"t": torch.ones(10)}).wait()
    with pytest.raises(cairn.AlreadyExistsError):
        st.save("r", 1, {"t": torch.ones(10)})
    with pytest.raises(cairn.InvalidError):
        st._raw.lease_save("r", 2, [("t", "F32", [10], None), ("t", "F32", [10], None)], [], None, None, None)
