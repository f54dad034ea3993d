"""Metrics saved with a step and roll back by them: store.latest(where=)
and the cairn CLI (`cairn ls`, `cairn latest --where`)."""

import json
import math
import os
import subprocess

import numpy as np
import pytest

import cairn

CAIRN_BIN = os.environ.get("CAIRN_BIN")

LOSSES = {100: 2.9, 200: 2.4, 300: 2.1, 400: 7.5, 500: float("nan")}


def fill(store):
    for step, loss in LOSSES.items():
        store.save("r", step, {"w": np.full(16, step, np.float32)}, metrics={"loss": loss, "grad_norm": step / 100}).wait()
    store.save("r", 600, {"w": np.zeros(16, np.float32)}).wait()  # no metrics


def test_latest_where_picks_the_newest_good_step(store):
    fill(store)
    assert store.latest("r") == 600
    assert store.latest("r", where="loss<2.5") == 300
    assert store.latest("r", where="loss < 3, grad_norm <= 2") == 200
    assert store.latest("r", where="loss<2.5 and grad_norm>3") is None
    assert store.latest("r", where="loss>5") == 400  # NaN never matches
    assert store.latest("r", where=lambda m: m.get("loss", math.inf) < 2.2) == 300
    m = store.metrics("r", 500)
    assert math.isnan(m["loss"]) and m["grad_norm"] == 5.0
    assert store.metrics("r", 600) == {}
    with pytest.raises(cairn.InvalidError, match="metric condition"):
        store.latest("r", where="loss<<2")
    # Roll back: the newest good step loads.
    good = store.latest("r", where="loss<2.5")
    assert store.load("r", good)["w"][0] == 300


def test_cli_shows_and_selects_by_metrics(store):
    if not CAIRN_BIN:
        pytest.fail("CAIRN_BIN is not set: run the suite with scripts/test")
    fill(store)
    ls = subprocess.run([CAIRN_BIN, "ls", store.path, "--json"], check=True, capture_output=True, text=True)
    rows = {r["step"]: r for r in json.loads(ls.stdout)}
    assert rows[300]["metrics"] == {"grad_norm": 3.0, "loss": 2.1}
    assert rows[500]["metrics"]["loss"] is None
    text = subprocess.run([CAIRN_BIN, "ls", store.path, "--where", "loss<2.5"], check=True, capture_output=True, text=True).stdout
    assert "METRICS" in text and "loss=2.1" in text and " 200 " in text and " 400 " not in text
    latest = subprocess.run([CAIRN_BIN, "latest", store.path, "--run", "r", "--where", "loss<2.5"], check=True, capture_output=True, text=True)
    assert latest.stdout.strip() == "300"
    none = subprocess.run([CAIRN_BIN, "latest", store.path, "--run", "r", "--where", "loss<0.1"], capture_output=True, text=True)
    assert none.returncode == 1 and "loss<0.1" in none.stderr
    bad = subprocess.run([CAIRN_BIN, "latest", store.path, "--run", "r", "--where", "loss<"], capture_output=True, text=True)
    assert bad.returncode == 2
