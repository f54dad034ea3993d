"""The cairn Python API on real files: round trips, dtypes, layouts,
errors, the GIL, handles, buffer reuse, and a remote tier on S3."""

import os
import subprocess
import threading
import time

import ml_dtypes
import numpy as np
import pytest
import torch

import cairn

CAIRN_BIN = os.environ.get("CAIRN_BIN")

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "I64": np.int64,
    "U64": np.uint64,
    "F64": np.float64,
    "F8E4M3": ml_dtypes.float8_e4m3fn,
    "F8E5M2": ml_dtypes.float8_e5m2,
}

TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "F8E4M3": torch.float8_e4m3fn,
    "F8E5M2": torch.float8_e5m2,
}


def random_bytes_array(dtype, shape, seed):
    """An array of `dtype` whose bytes are random (every bit pattern, NaNs
    included), so a round trip is checked bit for bit."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    if dtype == np.bool_:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8).tobytes()


def test_every_dtype_round_trips_bit_exact_from_numpy(store):
    assert set(NUMPY_DTYPES) == set(cairn.DTYPES)
    arrays = {f"np/{k}": random_bytes_array(v, (3, 257), i) for i, (k, v) in enumerate(NUMPY_DTYPES.items())}
    report = store.save("r", 1, arrays).wait()
    assert report.logical_bytes == sum(a.nbytes for a in arrays.values())
    out = store.load("r", 1)
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype, name
        assert out[name].shape == a.shape, name
        assert bits(out[name]) == bits(a), name
    m = store.manifest("r", 1)
    assert [t["dtype"] for t in m["tensors"]] == list(NUMPY_DTYPES)


def test_every_dtype_round_trips_bit_exact_from_torch(store):
    tensors = {}
    for i, (k, dt) in enumerate(TORCH_DTYPES.items()):
        raw = torch.from_numpy(random_bytes_array(np.uint8, (5 * 33 * torch.empty(0, dtype=dt).element_size(),), 100 + i))
        if dt == torch.bool:
            raw &= 1
        tensors[f"t/{k}"] = raw.view(dt).view(5, 33)
    store.save("r", 2, tensors).wait()
    out = store.load("r", 2)
    for i, (k, dt) in enumerate(TORCH_DTYPES.items()):
        a = out[f"t/{k}"]
        assert a.dtype == np.dtype(NUMPY_DTYPES[k]), k
        assert a.shape == (5, 33)
        assert bits(a) == tensors[f"t/{k}"].contiguous().view(-1).view(torch.uint8).numpy().tobytes(), k
    assert [t["dtype"] for t in store.manifest("r", 2)["tensors"]] == list(TORCH_DTYPES)


def test_non_contiguous_zero_size_and_scalar_tensors(store):
    base = np.arange(24 * 10, dtype=np.float32).reshape(24, 10)
    tbase = torch.arange(60, dtype=torch.bfloat16).reshape(6, 10)
    tensors = {
        "transposed": base.T,
        "strided": base[::3, 1::2],
        "fortran": np.asfortranarray(base),
        "negative_stride": base[::-1],
        "empty": np.zeros((0, 7), dtype=np.float64),
        "empty_torch": torch.empty(3, 0, dtype=torch.float16),
        "scalar": np.array(3.25),
        "numpy_scalar": np.float32(1.5),
        "torch_t": tbase.t(),
        "torch_slice": tbase[:, ::2],
    }
    store.save("r", 1, tensors).wait()
    out = store.load("r", 1)
    for name in ["transposed", "strided", "fortran", "negative_stride", "empty", "scalar"]:
        assert out[name].shape == tensors[name].shape, name
        np.testing.assert_array_equal(out[name], tensors[name], err_msg=name)
    assert out["empty_torch"].shape == (3, 0)
    for name in ["torch_t", "torch_slice"]:
        want = tensors[name].contiguous().float().numpy()
        np.testing.assert_array_equal(out[name].astype(np.float32), want, err_msg=name)
    assert out["scalar"].shape == () and float(out["scalar"]) == 3.25
    assert out["numpy_scalar"].dtype == np.float32 and float(out["numpy_scalar"]) == 1.5


def test_steps_latest_load_names_blobs_metadata(store):
    for step in (5, 10, 7):
        store.save("r", step, {"w": np.full(4, step, np.int32)}, blobs={"rng": b"seed=%d" % step},
                   metadata={"lr": 0.5, "note": "x"}).wait()
    assert store.steps("r") == [5, 7, 10]
    assert store.latest("r") == 10
    assert store.latest("nobody") is None
    assert store.runs() == ["r"]
    assert cairn.__version__ == "0.1.0"
    out = store.load("r")
    assert out["w"].tolist() == [10] * 4
    assert store.load("r", 7, names=["w"])["w"].tolist() == [7] * 4
    assert store.blobs("r", 7) == {"rng": b"seed=7"}
    assert store.metadata("r", 5) == {"lr": 0.5, "note": "x"}


def test_errors_map_to_one_class_per_kind(store, tmp_path):
    store.save("r", 1, {"w": np.zeros(3)}).wait()
    with pytest.raises(cairn.AlreadyExistsError) as e:
        store.save("r", 1, {"w": np.zeros(3)}).wait()
    assert isinstance(e.value, cairn.Error)
    assert "run r step 1 already exists" in str(e.value)
    with pytest.raises(cairn.NotFoundError, match="step 2"):
        store.load("r", 2)
    with pytest.raises(cairn.NotFoundError, match="nope"):
        store.load("r", 1, names=["nope"])
    with pytest.raises(cairn.InvalidError, match="run name"):
        store.save("../evil", 1, {"w": np.zeros(1)})
    with pytest.raises(cairn.InvalidError, match="complex128"):
        store.save("r", 3, {"c": np.zeros(2, np.complex128)})
    with pytest.raises(cairn.InvalidError, match="got list"):
        store.save("r", 3, {"l": [1, 2, 3]})
    with pytest.raises(cairn.InvalidError, match="metric"):
        store.save("r", 3, {"w": np.zeros(1)}, metrics={"bad name": 1.0})
    with pytest.raises(cairn.InvalidError, match="step"):
        store.load("r", -1)
    for cls in [cairn.UnavailableError, cairn.InvalidError, cairn.DataError, cairn.NotFoundError,
                cairn.AlreadyExistsError, cairn.ClosedError, cairn.InternalError]:
        assert issubclass(cls, cairn.Error) and cls.__module__ == "cairn"
    # A corrupted chunk is a DataError naming the tensor.
    chunks = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ckpt" / "chunks") for f in fs]
    assert chunks
    for c in chunks:
        with open(c, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            b = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(cairn.DataError, match="w"):
        store.load("r", 1)
    # A path that cannot hold a store is the caller's to fix, not a retry.
    (tmp_path / "notes").write_bytes(b"mine")
    for bad in ("", tmp_path / "notes", tmp_path / "notes" / "ckpt"):
        with pytest.raises(cairn.InvalidError, match="store path"):
            cairn.Store(bad, staging_bytes=32 << 20)
    assert (tmp_path / "notes").read_bytes() == b"mine"


def test_shard_validation_and_sharded_calls():
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(cairn.InvalidError, match="dimension 1"):
        cairn.Shard(a, (4, 4), (0, 2))
    with pytest.raises(cairn.InvalidError, match="must be equal"):
        cairn.Shard(a, (4,), (0,))
    with pytest.raises(cairn.InvalidError, match="dimension 0"):
        cairn.Shard(a, (4, 3), (-1, 0))


def test_shard_saves_with_its_place_and_rank_arguments_make_a_part(store):
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    store.save("r", 1, {"w": cairn.Shard(data, (4, 3), (2, 0))}).wait()
    t = store.manifest("r", 1)["tensors"][0]
    assert t["shard"] == {"global_shape": [4, 3], "offsets": [2, 0]}
    np.testing.assert_array_equal(store.load("r", 1)["w"], data)
    # Regions are in the global tensor's coordinates.
    np.testing.assert_array_equal(store.load_region("r", 1, "w", (3, 1), (1, 2)), data[1:, 1:])
    # rank 0 of a world of one is a part too: the step is visible once committed.
    store.save("r", 3, {"w": data}, rank=0, world_size=1).wait()
    assert store.steps("r") == [1]
    assert store.commit("r", 3, 1).created
    assert store.steps("r") == [1, 3]
    with pytest.raises(cairn.InvalidError, match="rank"):
        store.save("r", 4, {"w": data}, rank=4, world_size=4)
    with pytest.raises(cairn.InvalidError, match="together"):
        store.save("r", 4, {"w": data}, rank=1)


def test_gil_is_released_while_saving_and_waiting(tmp_path):
    # A pool much smaller than the state: save waits for staging space,
    # and a Python thread must keep running meanwhile.
    store = cairn.Store(tmp_path / "ckpt", staging_bytes=4 << 20, chunk_size=1 << 20, direct_io=False)
    big = {f"w{i}": np.random.default_rng(i).random(4 << 20, dtype=np.float32) for i in range(16)}  # 256 MiB
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    try:
        t0 = time.perf_counter()
        h = store.save("r", 1, big)
        t1 = time.perf_counter()
        h.wait()
        t2 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    during_save = [x for x in ticks if t0 <= x <= t1]
    during_wait = [x for x in ticks if t1 <= x <= t2]
    # The thread ran while save staged and while wait blocked: with the GIL
    # held, it could not have ticked at all in either window.
    assert len(during_save) >= 3, (len(during_save), t1 - t0)
    assert len(during_wait) >= 3, (len(during_wait), t2 - t1)
    np.testing.assert_array_equal(store.load("r", 1, names=["w7"])["w7"], big["w7"])


def test_buffers_overwritten_after_save_returns_do_not_leak(store):
    a = np.random.default_rng(1).random(3 << 20).astype(np.float32)  # 12 MiB > the 8 MiB pool
    t = torch.arange(1 << 20, dtype=torch.float32)
    want_a, want_t = a.copy(), t.clone()
    h = store.save("r", 1, {"a": a, "t": t})
    a[:] = -1.0
    t.fill_(-1.0)
    h.wait()
    out = store.load("r", 1)
    np.testing.assert_array_equal(out["a"], want_a)
    np.testing.assert_array_equal(out["t"], want_t.numpy())


def test_handle_dropped_without_wait_still_commits(store):
    store.save("r", 1, {"w": np.arange(1 << 20, dtype=np.int64)})  # dropped at once
    deadline = time.time() + 30
    while store.steps("r") != [1] and time.time() < deadline:
        time.sleep(0.01)
    assert store.steps("r") == [1]
    np.testing.assert_array_equal(store.load("r", 1)["w"], np.arange(1 << 20))


def test_handle_dropped_without_wait_fails_cleanly(tmp_path):
    path = tmp_path / "ckpt"
    store = cairn.Store(path, staging_bytes=32 << 20, chunk_size=1 << 20, direct_io=False)
    store.save("r", 0, {"w": np.zeros(1)}).wait()
    # Every chunk fan-out directory replaced by a file: chunk writes fail
    # in the background (as they would on a dead disk), for root too.
    chunks = path / "chunks"
    moved = chunks.with_name("chunks.saved")
    chunks.rename(moved)
    chunks.mkdir()
    for p in range(256):
        (chunks / f"{p:02x}").write_bytes(b"")
    try:
        store.save("r", 1, {"w": np.random.default_rng(0).random(1 << 20)})  # dropped
        h = store.save("r", 2, {"w": np.random.default_rng(1).random(1 << 20)})
        with pytest.raises(cairn.UnavailableError):
            h.wait()
        time.sleep(0.5)
        assert store.steps("r") == [0]
    finally:
        for p in range(256):
            (chunks / f"{p:02x}").unlink()
        chunks.rmdir()
        moved.rename(chunks)
    store.save("r", 3, {"w": np.ones(8)}).wait()
    assert store.steps("r") == [0, 3]
    np.testing.assert_array_equal(store.load("r", 3)["w"], np.ones(8))


def test_wait_twice_returns_the_same_report(store):
    h = store.save("r", 1, {"w": np.ones(1000)})
    r1, r2 = h.wait(), h.wait()
    assert r1.as_dict() == r2.as_dict()
    assert r1.run == "r" and r1.step == 1 and r1.chunks_written >= 1
    assert isinstance(r1.durable, float) and r1.durable >= r1.stall >= 0
    # Unchanged bytes are not written again.
    r3 = store.save("r", 2, {"w": np.ones(1000)}).wait()
    assert r3.chunks_written == 0 and r3.bytes_deduped == 8000


def test_remote_tier_on_s3(tmp_path, s3_remote):
    """Saved through Python, uploaded to S3, listed and restored from there
    by the real cairn binary on another directory, read back bit for bit."""
    if not CAIRN_BIN:
        pytest.fail("CAIRN_BIN is not set: run the suite with scripts/test")
    url, opts = s3_remote
    store = cairn.Store(tmp_path / "a", remote=url, remote_options=opts)
    w = np.random.default_rng(3).random((64, 1024)).astype(ml_dtypes.bfloat16)
    store.save("r", 1, {"w": w}, metrics={"loss": 1.5}).wait()
    report = store.upload("r", 1)
    assert report["chunks_uploaded"] == report["chunks"] >= 1
    ropts = sum((["--remote-option", f"{k}={v}"] for k, v in opts.items()), [])
    ls = subprocess.run([CAIRN_BIN, "ls", url, "--json", *ropts], check=True, capture_output=True, text=True)
    assert '"loss": 1.5' in ls.stdout
    subprocess.run([CAIRN_BIN, "restore", url, "--run", "r", "--step", "1", "--to", str(tmp_path / "b"), *ropts],
                   check=True, capture_output=True)
    out = cairn.Store(tmp_path / "b").load("r", 1)
    assert out["w"].dtype == w.dtype and bits(out["w"]) == bits(w)


def test_steps_ranks_and_world_sizes_are_checked_before_saving(store):
    w = np.zeros(2, np.float32)
    for bad in (-1, 3.7, True, "3", 1 << 64):
        with pytest.raises(cairn.InvalidError, match="step"):
            store.save("r", bad, {"w": w})
    with pytest.raises(cairn.InvalidError, match="step"):
        store.delete("r", -1)
    with pytest.raises(cairn.InvalidError, match="world_size"):
        store.save("r", 1, {"w": w}, rank=0, world_size=1 << 32)
    with pytest.raises(cairn.InvalidError, match="world size"):
        store.commit("r", 1, 1 << 32)
    with pytest.raises(cairn.InvalidError, match="step"):
        store.commit("r", -1, 1)
    assert store.steps("r") == []
    store.save("r", np.int64(3), {"w": w}).wait()
    assert store.steps("r") == [3]


def test_load_into_refuses_a_read_only_target_before_writing_any(store):
    a, b = np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32) + 10
    store.save("r", 1, {"a": a, "b": b}).wait()
    first = np.zeros(4, np.float32)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(cairn.InvalidError, match="'b'.*read-only"):
        store.load_into("r", {"a": first, "b": ro})
    assert not first.any() and not ro.any()


def test_codec_option_takes_the_cli_spelling(tmp_path):
    data = np.zeros(1 << 16, np.float32)
    for i, codec in enumerate(("raw", "zstd", "zstd:3")):
        st = cairn.Store(tmp_path / f"s{i}", codec=codec)
        st.save("r", 1, {"w": data}).wait()
        assert st.load("r")["w"].tobytes() == data.tobytes()
    with pytest.raises(cairn.InvalidError, match="raw, zstd or zstd:LEVEL"):
        cairn.Store(tmp_path / "bad", codec="lz4")


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_close_commits_queued_saves_frees_the_pool_and_refuses_calls(tmp_path):
    root = tmp_path / "s"
    store = cairn.Store(root, staging_bytes=256 << 20)
    a = np.random.default_rng(5).standard_normal(48 << 20, dtype=np.float32)  # 192 MiB
    h = store.save("r", 1, {"a": a})
    before = _rss_bytes()
    store.close()
    after = _rss_bytes()
    assert store.closed
    # The save queued before close committed; the pool's pages went back.
    assert h.wait().logical_bytes == a.nbytes
    assert before - after >= 128 << 20, (before, after)
    for call in (
        lambda: store.steps("r"),
        lambda: store.load("r", 1),
        lambda: store.save("r", 2, {"a": a[:10]}),
        lambda: store.delete("r", 1),
    ):
        with pytest.raises(cairn.ClosedError, match="closed: the store at .* was closed"):
            call()
    store.close()  # closing again does nothing
    assert store.path.endswith("s")
    again = cairn.Store(root, staging_bytes=32 << 20)
    assert again.steps("r") == [1]
    assert again.load("r", 1)["a"].tobytes() == a.tobytes()
    # As a context manager.
    with cairn.Store(tmp_path / "t", staging_bytes=32 << 20) as t:
        t.save("r", 1, {"a": a[:1000]}).wait()
    assert t.closed
    with cairn.Store(tmp_path / "t", staging_bytes=32 << 20) as t2:
        assert t2.load("r", 1)["a"].tobytes() == a[:1000].tobytes()
