"""cairn.torch: a real torch.nn model with its Adam optimizer, saved and
loaded in place; async saves; the CPU fallback of the CUDA path."""

import os
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_refused_page_lock_leaves_no_cuda_error_behind(tmp_path):
    # A pool the CUDA runtime refuses to page-lock (here: one locked
    # already, outside cairn) stays pageable, and the trainer's next CUDA
    # op does not raise the refusal as its own error; the same for a
    # refused unlock.
    from cairn.torch import _cuda

    st = cairn.Store(tmp_path / "s", staging_bytes=8 << 20, chunk_size=1 << 20)
    base, length = st._raw.staging_region()
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(base, length, 0)) == 0
    try:
        assert _cuda.register_pool(base, length) is None
        x = torch.arange(1000, device="cuda", dtype=torch.float32)
        assert (x * 2).sum().item() == 999000.0
    finally:
        assert int(cudart.cudaHostUnregister(base)) == 0
    with _cuda._lock:
        _cuda._registered[base] = "cudaHostRegister"  # as if cairn had locked it
    _cuda.unregister_pool(base)  # refused: not locked any more
    assert (x + 1).sum().item() == 500500.0
    st.close()


def test_a_pool_is_forgotten_when_its_store_is_closed_or_collected(tmp_path):
    # A later pool at the same address must be page-locked anew, and a
    # locked pool unlocked before its memory goes back.
    import gc

    from cairn.torch import _cuda

    for how in ("close", "collect"):
        st = cairn.Store(tmp_path / how, staging_bytes=8 << 20, chunk_size=1 << 20, leases=True)
        st.save("r", 1, {"w": torch.arange(1000.0)}).wait()
        _, base = st._pool()
        _cuda.register_pool(base, 8 << 20)  # as a save of CUDA tensors does
        assert base in _cuda.pool_info()
        if how == "close":
            st.close()
        else:
            del st
            gc.collect()
        assert base not in _cuda.pool_info(), how


def test_keys_that_name_the_same_tensor_are_refused_before_saving(store):
    for state, path in (
        ({"a": {0: torch.tensor([1.0]), "0": torch.tensor([2.0])}}, "a/0"),
        ({"b": {None: torch.tensor([3.0]), "None": torch.tensor([4.0])}}, "b/None"),
    ):
        with pytest.raises(cairn.InvalidError, match=path):
            ct.save(state, store, "r", 1)
    assert store.steps("r") == []
    # Distinct names still save: an int key beside other string keys.
    ct.save({"a": {0: torch.tensor([1.0]), "x": torch.tensor([2.0])}}, store, "r", 1)
    out = ct.load({}, store, "r", 1)
    assert torch.equal(out["a"][0], torch.tensor([1.0])) and torch.equal(out["a"]["x"], torch.tensor([2.0]))


def test_load_into_many_small_tensors(store):
    n = 20000
    sd = {f"t{i}": torch.full((3,), float(i)) for i in range(n)}
    ct.save(sd, store, "r", 1)
    back = {k: torch.zeros(3) for k in sd}
    ct.load(back, store, "r", 1)
    for i in range(0, n, 997):
        assert torch.equal(back[f"t{i}"], torch.full((3,), float(i)))
    assert torch.equal(back[f"t{n - 1}"], torch.full((3,), float(n - 1)))
    # The same through the DCP reader, one read item per tensor.
    from torch.distributed.checkpoint import load as dcp_load

    from cairn.torch.dcp import CairnStorageReader

    store.save("plain", 1, {k: v.numpy() for k, v in sd.items()}).wait()
    back = {k: torch.zeros(3) for k in sd}
    dcp_load(back, storage_reader=CairnStorageReader(store, "plain", 1))
    for i in range(0, n, 997):
        assert torch.equal(back[f"t{i}"], torch.full((3,), float(i)))


def test_overlapping_targets_are_all_restored(store):
    a, b, c = torch.arange(8.0), torch.arange(8.0) + 100, torch.arange(4.0) + 200
    store.save("r", 1, {"a": a, "b": b, "c": c}).wait()
    buf = torch.zeros(12)
    # a and b share memory; c overlaps the end of both; the later target
    # wins where they overlap, as with separate copies in order.
    targets = {"a": buf[:8], "b": buf[:8], "c": buf[6:10], "d": torch.zeros(4)}
    store.load_into("r", {k: v for k, v in targets.items() if k != "d"})
    want = torch.zeros(12)
    want[:8] = b
    want[6:10] = c
    assert torch.equal(buf, want)


def test_load_checks_shapes_and_converts_dtypes_in_place(store):
    model = torch.nn.Linear(4, 3)
    ct.save({"model": model.state_dict()}, store, "r", 1)
    # A shape mismatch names the key and both shapes; nothing is written.
    wrong = torch.nn.Linear(4, 5)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    state = {"model": wrong.state_dict()}
    with pytest.raises(cairn.InvalidError, match=r"model/weight.*\[5, 4\].*\[3, 4\]"):
        ct.load(state, store, "r", 1)
    for k, v in wrong.state_dict().items():
        assert torch.equal(v, before[k]), k
    # A dtype mismatch loads converted into the existing tensor: the
    # module's parameter holds the values.
    half = torch.nn.Linear(4, 3).to(torch.float64)
    weight = half.weight
    state = {"model": half.state_dict()}
    ct.load(state, store, "r", 1)
    assert state["model"]["weight"] is not None and half.weight is weight
    assert half.weight.dtype == torch.float64
    assert torch.equal(half.weight.detach(), model.weight.detach().to(torch.float64))
    assert torch.equal(half.bias.detach(), model.bias.detach().to(torch.float64))


def test_load_refuses_entries_the_checkpoint_lacks(store):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ct.save({"model": model.state_dict(), "optim": opt.state_dict()}, store, "r", 1)

    # A wrapped model's names (DDP's `module.` prefix): nothing of the
    # checkpoint would land in it, so the load is refused by name.
    wrapped = {"module.weight": torch.zeros(3, 4), "module.bias": torch.zeros(3)}
    with pytest.raises(cairn.InvalidError, match=r"'model/module\.weight', 'model/module\.bias'.*strict=False"):
        ct.load({"model": wrapped}, store, "r", 1)
    assert set(wrapped) == {"module.weight", "module.bias"}

    # One entry more than the checkpoint, at any depth (an optimizer state
    # for a parameter the checkpoint has none for): refused before anything
    # is written.
    weight, extra = torch.zeros(3, 4), torch.full((2,), 7.0)
    target = {"model": {"weight": weight, "bias": torch.zeros(3), "extra": extra}}
    with pytest.raises(cairn.InvalidError, match=r"holds no 'model/extra' \(1 entry of the state is not"):
        ct.load(target, store, "r", 1)
    assert torch.equal(weight, torch.zeros(3, 4))
    opt_target = {"optim": {"state": {0: {}, 1: {}, 5: {"exp_avg": torch.zeros(1)}}}}
    with pytest.raises(cairn.InvalidError, match=r"'optim/state/5'"):
        ct.load(opt_target, store, "r", 1)

    # strict=False loads what the checkpoint holds and leaves the rest.
    ct.load(target, store, "r", 1, strict=False)
    assert torch.equal(weight, model.weight.detach())
    assert target["model"]["extra"] is extra and torch.equal(extra, torch.full((2,), 7.0))

    # Many missing: the first five named, and how many in all.
    many = {f"t{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(cairn.InvalidError, match=r"'t4' and 3 more \(8 entries"):
        ct.load(many, store, "r", 1)


def _touch(path):
    open(path, "w").close()
    return "ran"


class _RunsCode:
    """A value whose unpickling calls a function of the pickle's choosing."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def test_load_does_not_run_code_from_pickled_values(store, tmp_path):
    marker = tmp_path / "ran"
    ct.save({"w": torch.ones(4), "cfg": _RunsCode(str(marker))}, store, "r", 1)
    assert not marker.exists()
    w = torch.zeros(4)
    with pytest.raises(cairn.InvalidError, match=r"_touch.*weights_only=False"):
        ct.load({"w": w, "cfg": None}, store, "r", 1)
    assert not marker.exists(), "load ran the checkpoint's code"
    assert torch.equal(w, torch.zeros(4)), "refused before anything was loaded"
    # Opted in, the value is unpickled as it was saved.
    out = ct.load({"w": w}, store, "r", 1, weights_only=False)
    assert marker.exists() and out["cfg"] == "ran" and torch.equal(w, torch.ones(4))


def test_plain_pickled_values_load_by_default(store):
    import collections
    import datetime
    import random

    rng = np.random.RandomState(3)
    state = {
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "default": collections.defaultdict(list, {"x": [1]}),
        "set": {1, 2}, "frozen": frozenset({3}), "complex": 1 + 2j, "bytes": b"\x00\xff",
        "array": np.arange(6, dtype=np.float16).reshape(2, 3),
        "np_scalar": np.float64(2.5),
        "np_rng": rng.get_state(),
        "py_rng": random.getstate(),
        "dtype": torch.bfloat16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
        "when": datetime.datetime(2026, 12, 5, 8, 0), "for": datetime.timedelta(seconds=3),
    }
    ct.save(state, store, "r", 1)
    out = ct.load({}, store, "r", 1)
    for k in ("set", "frozen", "complex", "bytes", "dtype", "device", "size", "when", "for", "py_rng"):
        assert out[k] == state[k] and type(out[k]) is type(state[k]), k
    # Dict subclasses are stored as dicts (their items, not their type).
    assert out["ordered"] == state["ordered"] and out["default"] == {"x": [1]}
    np.testing.assert_array_equal(out["array"], state["array"])
    assert out["array"].dtype == np.float16 and out["np_scalar"] == 2.5
    assert out["np_rng"][0] == "MT19937"
    np.testing.assert_array_equal(out["np_rng"][1], state["np_rng"][1])


def test_states_that_cannot_be_stored_are_named(store):
    with pytest.raises(cairn.InvalidError, match=r"tensor is a key of the dict at 'opt'"):
        ct.save({"opt": {torch.tensor(1): 5}}, store, "r", 1)
    with pytest.raises(cairn.InvalidError, match=r"value at 'cfg/fn' \(function\) cannot be stored"):
        ct.save({"cfg": {"fn": lambda x: x}}, store, "r", 1)
    loop = {"w": torch.ones(1)}
    loop["self"] = loop
    with pytest.raises(cairn.InvalidError, match="holds itself"):
        ct.save(loop, store, "r", 1)
    assert store.steps("r") == []


def test_load_by_path_creates_nothing_and_holds_no_pool(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(cairn.NotFoundError, match="typo"):
        ct.load({}, str(missing), "r")
    assert not missing.exists()
    from cairn.torch.dcp import CairnStorageReader

    with pytest.raises(cairn.NotFoundError):
        CairnStorageReader(str(missing), "r")
    assert not missing.exists()
    # An existing store loads by path without being kept open.
    root = tmp_path / "s"
    ct.save({"w": torch.arange(5.0)}, root, "r", 1)
    ct.close(root)
    back = {"w": torch.zeros(5)}
    ct.load(back, str(root), "r")
    assert torch.equal(back["w"], torch.arange(5.0))
    assert os.path.realpath(root) not in ct._stores


def test_a_forked_child_is_refused_not_hung(store):
    # multiprocessing's fork start method hands children a copy of the
    # store without its pipeline threads: a save there used to wait for
    # ever. Now every call there is refused, and the child exits cleanly.
    ct.save({"w": torch.ones(3)}, store, "f", 1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            try:
                ct.save({"w": torch.ones(3)}, store, "f", 2)
                msg = b"saved"
            except cairn.InvalidError as e:
                msg = b"refused: " + str(e).encode()
            store.close()
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    import select
    import signal

    ready, _, _ = select.select([r], [], [], 60)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    got = os.read(r, 4096).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert got.startswith("refused: ") and "forked" in got and "open the store anew" in got, got
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's store is untouched and saves on.
    assert store.steps("f") == [1]
    ct.save({"w": torch.ones(3)}, store, "f", 2)
    assert store.steps("f") == [1, 2]


def test_complex_tensors_round_trip(store):
    freqs_cis = torch.polar(torch.ones(16, 4), torch.randn(16, 4))
    z = torch.randn(3, dtype=torch.complex128)
    ct.save({"model": {"freqs_cis": freqs_cis}, "z": z, "scalar": torch.tensor(1 + 2j)}, store, "r", 1)
    out = ct.load({}, store, "r", 1)
    assert out["model"]["freqs_cis"].dtype == torch.complex64
    assert torch.equal(out["model"]["freqs_cis"], freqs_cis)
    assert out["z"].dtype == torch.complex128 and torch.equal(out["z"], z)
    assert torch.equal(out["scalar"], torch.tensor(1 + 2j))
    # In place, into an existing complex buffer.
    buf = torch.zeros(16, 4, dtype=torch.complex64)
    state = {"model": {"freqs_cis": buf}}
    ct.load(state, store, "r", 1)
    assert state["model"]["freqs_cis"] is buf and torch.equal(buf, freqs_cis)
    # The conjugate view saves its values.
    ct.save({"c": z.conj()}, store, "r", 2)
    assert torch.equal(ct.load({}, store, "r", 2)["c"], z.conj().resolve_conj())


def test_load_into_parameters_that_require_grad(store):
    big = torch.randn(MIB_FLOATS + 3)
    small = torch.randn(10)
    ct.save({"small": small, "big": big}, store, "r", 1)
    # An unaligned >= 1 MiB leaf that requires grad, beside a small one.
    raw = torch.empty(big.numel() + 1024)
    off = 16 if (raw.data_ptr() + 64) % 4096 else 32
    p_big = torch.nn.Parameter(raw[off : off + big.numel()])
    assert p_big.data_ptr() % 4096 != 0
    p_small = torch.nn.Parameter(torch.zeros(10))
    state = {"small": p_small, "big": p_big}
    ct.load(state, store, "r", 1)
    assert state["big"] is p_big and p_big.requires_grad
    assert torch.equal(p_big.detach(), big) and torch.equal(p_small.detach(), small)
    p_big2 = torch.nn.Parameter(torch.zeros(big.numel()))
    store.load_into("r", {"big": p_big2, "small": torch.nn.Parameter(torch.zeros(10))}, step=1)
    assert torch.equal(p_big2.detach(), big)


MIB_FLOATS = (1 << 20) // 4


def test_load_restores_parameters_and_requires_grad(store):
    model = torch.nn.Linear(3, 2)
    state = {"params": list(model.parameters()), "frozen": torch.ones(2), "grad": torch.ones(2, requires_grad=True)}
    ct.save(state, store, "r", 1)
    out = ct.load({}, store, "r", 1)
    for p, q in zip(out["params"], model.parameters()):
        assert type(p) is torch.nn.Parameter and p.requires_grad
        assert torch.equal(p.detach(), q.detach())
    assert type(out["frozen"]) is torch.Tensor and not out["frozen"].requires_grad
    assert type(out["grad"]) is torch.Tensor and out["grad"].requires_grad and out["grad"].is_leaf


def test_async_saves_stage_in_call_order(store):
    staged = []
    real = store.save

    def recording_save(run, step, *a, **k):
        staged.append(step)
        return real(run, step, *a, **k)

    store.save = recording_save
    try:
        hs = [
            ct.async_save({"w": torch.full((1 if i % 2 else 1 << 19,), float(i))}, store, "r", i)
            for i in range(1, 41)
        ]
        for h in hs:
            h.wait(timeout=120)
    finally:
        del store.save
    assert staged == list(range(1, 41))
    assert store.steps("r") == list(range(1, 41))
    for s in (1, 2, 39, 40):
        assert store.load("r", s)["w"][0] == float(s)


DTENSOR_SCRIPT = r"""
import sys, torch, torch.distributed as dist, cairn, cairn.torch as ct
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
root, pg = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{pg}", rank=0, world_size=1)
w = distribute_tensor(torch.arange(12.0).reshape(3, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
store = cairn.Store(root, staging_bytes=8 << 20, chunk_size=1 << 20)
for what, call in [
    ("save", lambda: ct.save({"w": w}, store, "r", 1)),
    ("Store.save", lambda: store.save("r", 2, {"w": w}).wait()),
]:
    try:
        call()
        print(what, "no error")
    except cairn.InvalidError as e:
        print(what, "InvalidError", e)
ct.save({"w": torch.arange(12.0).reshape(3, 4)}, store, "r", 3)
for what, call in [
    ("load", lambda: ct.load({"w": w}, store, "r")),
    ("load_into", lambda: store.load_into("r", {"w": w})),
]:
    try:
        call()
        print(what, "no error")
    except cairn.InvalidError as e:
        print(what, "InvalidError", e)
print("steps", store.steps("r"))
dist.destroy_process_group()
"""


def test_dtensors_are_refused_by_name_not_read_at_address_zero(tmp_path):
    # A DTensor's data_ptr() is 0: read or filled through it, the process
    # died (SIGSEGV). Run apart so that a crash fails this test only.
    import subprocess
    import sys

    script = tmp_path / "dt.py"
    script.write_text(DTENSOR_SCRIPT)
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "pg")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    for what in ("save", "Store.save", "load", "load_into"):
        line = next(x for x in lines if x.startswith(what + " "))
        assert "InvalidError" in line and "'w'" in line and "DTensor" in line, line
    assert lines[-1] == "steps [3]", p.stdout


def test_meta_tensors_are_refused_not_skipped(store):
    with pytest.raises(cairn.InvalidError, match=r"'model/x'.*meta tensor holds no data"):
        ct.save({"model": {"x": torch.empty(3, device="meta")}}, store, "r", 1)
    assert store.steps("r") == []
    real = torch.nn.Linear(4, 4)
    ct.save({"model": real.state_dict()}, store, "r", 2)
    with torch.device("meta"):
        m = torch.nn.Linear(4, 4)
    # Loading into a meta model used to return at once, leaving it meta.
    with pytest.raises(cairn.InvalidError, match="meta tensor holds no data"):
        ct.load({"model": m.state_dict()}, store, "r")
    with pytest.raises(cairn.InvalidError, match=r"'model/weight'.*meta"):
        store.load_into("r", {"model/weight": torch.empty(4, 4, device="meta")})
    # Materialized, the same model loads.
    m.to_empty(device="cpu")
    ct.load({"model": m.state_dict()}, store, "r")
    assert torch.equal(m.weight, real.weight) and torch.equal(m.bias, real.bias)


def test_tensor_subclasses_are_tensors(store):
    class MyParam(torch.nn.Parameter):
        pass

    w = MyParam(torch.randn(4, 4))
    ct.save({"w": w}, store, "r", 1)
    got = ct.load({}, store, "r")["w"]
    assert torch.equal(got, w.detach())


def test_one_store_per_directory_however_spelled(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir()
    (tmp_path / "link").symlink_to(d)
    monkeypatch.chdir(tmp_path)
    spellings = [str(d), str(d) + "/", "ckpt", "./ckpt", d, tmp_path / "link"]
    stores = {id(ct._store(s, staging_bytes=32 << 20)) for s in spellings}
    assert len(stores) == 1


def test_close_frees_the_store_opened_for_a_path_however_spelled(tmp_path):
    root = tmp_path / "ckpt"
    state = {"w": torch.arange(10, dtype=torch.float32)}
    ct.save(state, root, "r", 1, staging_bytes=32 << 20)
    first = ct._store(str(root))
    ct.close(f"{root}/")
    assert first.closed
    assert os.path.realpath(root) not in ct._stores
    ct.close(root)  # none open there: nothing to do
    # The next call with the path opens it anew (another staging size is fine).
    ct.save(state, root, "r", 2, staging_bytes=64 << 20)
    second = ct._store(root)
    assert second is not first and not second.closed
    back = {"w": torch.zeros(10)}
    ct.load(back, root, "r", 2)
    assert torch.equal(back["w"], state["w"])
    ct.close(second)
    assert second.closed
    assert os.path.realpath(root) not in ct._stores
    with pytest.raises(cairn.ClosedError):
        ct.save(state, second, "r", 3)
    assert cairn.Store(root, staging_bytes=32 << 20).steps("r") == [1, 2]
