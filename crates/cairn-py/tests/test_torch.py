"""cairn.torch: a real torch.nn model with its Adam optimizer, saved and
loaded in place; async saves; the CPU fallback of the CUDA path."""

import threading

import numpy as np
import pytest
import torch

import cairn
import cairn.torch as ct


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.l1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.l2 = torch.nn.Linear(32, 50)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.l2(self.norm(torch.relu(self.l1(self.emb(x)))))


def train(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 50, (8, 4), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 50), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.steps_seen += 1
    return float(loss.detach())


def state_of(model, opt, epoch):
    return {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "rng": torch.get_rng_state()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor), k
            assert va.dtype == vb.dtype and va.shape == vb.shape, k
            assert torch.equal(va, vb), k
        elif isinstance(va, dict):
            assert_same_state(va, vb)
        elif isinstance(va, (list, tuple)):
            assert type(va) is type(vb) and len(va) == len(vb), k
            for x, y in zip(va, vb):
                if isinstance(x, dict):
                    assert_same_state(x, y)
                else:
                    assert x == y, k
        else:
            assert va == vb, k


def test_model_and_adam_round_trip_in_place(store):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    loss = train(model, opt, 5, seed=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    report = ct.save(state_of(model, opt, 3), store, "r", 5, metrics={"loss": loss})
    assert report.chunks_written >= 1
    names = [t["name"] for t in store.manifest("r", 5)["tensors"]]
    assert "model/l1.weight" in names and "optim/state/0/exp_avg" in names

    # A fresh model and an optimizer that has not stepped (no state yet).
    torch.manual_seed(99)
    model2 = Net()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    state = state_of(model2, opt2, 0)
    weight_before = model2.l1.weight
    out = ct.load(state, store, "r")
    assert out is state
    # Model tensors were restored in place: the module's parameters hold
    # the saved values without load_state_dict.
    assert model2.l1.weight is weight_before
    for k, v in saved.items():
        assert torch.equal(model2.state_dict()[k], v), k
    opt2.load_state_dict(state["optim"])
    assert state["epoch"] == 3
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.99)
    for k, s in saved_opt.items():
        for n, t in s.items():
            assert torch.equal(opt2.state_dict()["state"][k][n], t), (k, n)
    assert torch.equal(state["rng"], torch.get_rng_state()) or state["rng"].dtype == torch.uint8
    # Both continue identically.
    l1 = train(model, opt, 3, seed=7)
    l2 = train(model2, opt2, 3, seed=7)
    assert l1 == l2
    assert_same_state(model.state_dict(), model2.state_dict())


def test_bf16_model_and_odd_values(store):
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    state = {
        "model": model.state_dict(),
        "tuple": (1, 2.5, "x", None, True),
        "int_keys": {0: torch.ones(2), 7: "seven"},
        "nested": [{"a": torch.arange(3)}, [torch.zeros(0)]],
        "obj": {1, 2, 3},
        "nan": float("nan"),
        "__cairn_tensor__": "not a marker",
    }
    ct.save(state, store, "r", 1)
    fresh = {"model": torch.nn.Linear(8, 8).to(torch.bfloat16).state_dict()}
    ct.load(fresh, store, "r", 1)
    assert torch.equal(fresh["model"]["weight"], model.weight.detach())
    assert fresh["model"]["weight"].dtype == torch.bfloat16
    assert fresh["tuple"] == (1, 2.5, "x", None, True)
    assert set(fresh["int_keys"]) == {0, 7} and torch.equal(fresh["int_keys"][0], torch.ones(2))
    assert torch.equal(fresh["nested"][0]["a"], torch.arange(3))
    assert fresh["nested"][1][0].shape == (0,)
    assert fresh["obj"] == {1, 2, 3}
    assert fresh["nan"] != fresh["nan"]
    assert fresh["__cairn_tensor__"] == "not a marker"


def test_tied_and_non_contiguous_targets(store):
    w = torch.randn(6, 4)
    ct.save({"a": w, "b": w.t().contiguous()}, store, "r", 1)
    shared = torch.zeros(6, 4)
    target = {"a": shared, "b": torch.zeros(8, 6).t()[:4, :6]}
    ct.load(target, store, "r", 1)
    assert torch.equal(target["a"], w) and torch.equal(shared, w)
    assert torch.equal(target["b"], w.t())


def test_load_refuses_a_mismatched_numpy_target(store):
    store.save("r", 1, {"w": np.zeros((2, 2), np.float32)}).wait()
    with pytest.raises(cairn.InvalidError, match="F32"):
        store.load_into("r", {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(cairn.NotFoundError, match="cairn.torch/state"):
        ct.load({}, store, "r", 1)


def test_async_save_staged_then_durable(store):
    model = Net()
    sd = model.state_dict()
    want = {k: v.clone() for k, v in sd.items()}
    h = ct.async_save({"model": sd}, store, "r", 1, metrics={"loss": 1.0})
    assert h.staged.result(timeout=60) is None
    # Staged: the state may change now without reaching the checkpoint.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    report = h.wait(timeout=60)
    assert report.step == 1 and h.durable.done()
    out = store.load("r", 1)
    for k, v in want.items():
        np.testing.assert_array_equal(out[f"model/{k}"], v.numpy(), err_msg=k)


def test_async_save_failure_reaches_both_futures(store):
    store.save("r", 1, {"w": np.zeros(1)}).wait()
    h = ct.async_save({"w": torch.zeros(1)}, store, "r", 1)
    with pytest.raises(cairn.AlreadyExistsError):
        h.staged.result(timeout=60)
    with pytest.raises(cairn.AlreadyExistsError):
        h.durable.result(timeout=60)


def test_async_saves_keep_call_order(store):
    hs = [ct.async_save({"w": torch.full((1000,), float(i))}, store, "r", i) for i in range(1, 6)]
    for h in hs:
        h.wait(timeout=60)
    assert store.steps("r") == [1, 2, 3, 4, 5]


def test_path_as_store_and_cuda_fallback(tmp_path):
    # Without a GPU, the CUDA path is never taken and CPU tensors save as
    # they are; with one, CUDA tensors go through pinned host memory.
    path = tmp_path / "by-path"
    t = torch.randn(100)
    ct.save({"t": t}, str(path), "r", 1)
    out = {"t": torch.empty(100)}
    ct.load(out, str(path), "r")
    assert torch.equal(out["t"], t)
    if torch.cuda.is_available():
        g = t.cuda()
        ct.save({"g": g}, str(path), "r", 2)
        back = {"g": torch.empty(100, device="cuda")}
        ct.load(back, str(path), "r", 2)
        assert torch.equal(back["g"].cpu(), t)


def test_pool_registration_without_a_gpu_falls_back_to_pageable_memory(tmp_path):
    from cairn.torch import _cuda

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu-check covers the pinned pool")
    st = cairn.Store(tmp_path / "s", staging_bytes=8 << 20, chunk_size=1 << 20)
    base, length = st._raw.staging_region()
    assert base % 4096 == 0 and length == 8 << 20
    assert _cuda.register_pool(base, length) is None
    assert _cuda.pool_info()[base] is None
