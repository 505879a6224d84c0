"""Kernel tuning: one-node timing models, the per-machine cache, and the choice per MatMulNBits."""

from __future__ import annotations

import json

import builders as b
import numpy as np
import pytest

import hessc
from hessc import report
from hessc.ir import meta
from hessc.runtime import sessions, tune


def _levels(model) -> dict[str, int]:
    return {n.name: n.attributes["accuracy_level"].as_int() for n in b.nodes_of(model, "MatMulNBits")}


def test_the_timing_models_compute_the_same_layer_in_every_form() -> None:
    """Level 4 and level 1 run the same codes (outputs agree up to int8 activation rounding), and
    each form is timed."""
    layer = tune.NBitsLayer(m=6, k=64, n=48, bits=4, block=32, zero_points=True, bias=True)
    x = {"x": np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)}
    four, one = (sessions.session(tune._layer_model(layer, f), "cpu").run(x)[0] for f in ("level-4", "level-1"))
    assert four.shape == (6, 48)
    assert np.linalg.norm(four - one) / np.linalg.norm(one) < 0.05
    timings = tune.time_layer(layer, ("level-4", "level-1", "fp32"), rounds=3)
    assert set(timings) == {"level-4", "level-1", "fp32"} and all(t > 0 for t in timings.values())


def _seed_cache(tmp_path, monkeypatch, level4: float, level1: float, m: int) -> None:
    """A timing cache in which the MLP's two layers (at ``m`` rows) take the given times."""
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path))
    entries = {}
    for k, n in ((64, 64), (64, 32)):
        layer = tune.NBitsLayer(m=m, k=k, n=n, bits=4, block=32, zero_points=True, bias=False)
        entries[layer.key] = {"level-4": level4, "level-1": level1, "fp32": 1.0}
    (tmp_path / tune.TIMINGS_FILE).write_text(json.dumps({tune.machine_key(): entries}))


@pytest.mark.parametrize(("level4", "level1", "chosen"), [(0.5, 2.0, 4), (2.0, 0.5, 1), (1.0, 1.01, 1)])
def test_each_layer_takes_its_fastest_level_at_the_serving_shape(tmp_path, monkeypatch, level4, level1, chosen) -> None:
    """The rows come from the calibration shape (5 × 3 = 15); the faster level is set on each node,
    a tie within 3% goes to the exact fp32 path, and the cache is read, not re-measured."""
    _seed_cache(tmp_path, monkeypatch, level4, level1, m=15)
    feeds = [{"x": np.random.default_rng(i).standard_normal((5, 3, 64)).astype(np.float32)} for i in range(4)]
    proto = b.mlp_model()
    x = proto.graph.input[0].type.tensor_type.shape
    x.dim[0].dim_param, x.dim[1].dim_param = "B", "T"
    x.dim.add().dim_value = 64
    out = hessc.optimize(b.load(proto), target="cpu", bits=4, calibration=feeds)
    record = meta.read_plan(out)["tuning"]
    assert record["serving_input"] == {"x": [5, 3, 64]}
    assert [layer["layer"].split()[1] for layer in record["layers"]] == ["m15", "m15"]
    assert set(_levels(out).values()) == {chosen}
    assert all(layer["chosen"] == f"level-{chosen}" for layer in record["layers"])
    assert ("slower_than_fp32" in record) == (min(level4, level1) > 1.03)
    cached = json.loads((tmp_path / tune.TIMINGS_FILE).read_text())[tune.machine_key()]
    assert {v["level-4"] for v in cached.values()} == {level4}  # read, not measured again


def test_a_new_shape_is_measured_and_cached_and_a_second_compile_chooses_the_same(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path))
    feeds = [b.x_feed(64, batch=7, seed=i) for i in range(3)]
    first = hessc.optimize(b.load(b.mlp_model()), target="cpu", bits=4, calibration=feeds)
    cached = json.loads((tmp_path / tune.TIMINGS_FILE).read_text())[tune.machine_key()]
    assert sorted(cached) == sorted(layer["layer"] for layer in meta.read_plan(first)["tuning"]["layers"])
    assert all(key.split()[1] == "m7" for key in cached)
    second = hessc.optimize(b.load(b.mlp_model()), target="cpu", bits=4, calibration=feeds)
    assert b.to_bytes(first) == b.to_bytes(second)
    text = report.plan_markdown(meta.read_plan(first))
    assert "## Kernel tuning" in text and all(key in text for key in cached)


def test_a_huge_layer_is_not_timed_as_fp32(tmp_path, monkeypatch) -> None:
    """Above the limit the fp32 reference (a 256 MiB weight and more) is skipped, not allocated."""
    monkeypatch.setattr(tune, "FP32_REFERENCE_LIMIT", 64 * 32)
    cache = tune.TimingCache(tmp_path / "t.json")
    model = hessc.optimize(b.load(b.mlp_model()), target="cpu", bits=4, calibration=[b.x_feed(64)], tune=False)
    tune.TuneKernelsPass(cache=cache)(model)
    layers = {t["layer"].split()[3]: t for t in model.meta[tune.TUNE_KEY]["layers"]}
    assert layers["n64"]["fp32_matmul_ms"] is None and layers["n64"]["vs_fp32"] is None
    assert layers["n32"]["fp32_matmul_ms"] > 0
    assert "fp32" not in cache.entries[layers["n64"]["layer"]]


def test_no_tune_keeps_int8_compute_and_an_unreadable_cache_is_ignored(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path))
    (tmp_path / tune.TIMINGS_FILE).write_text("{not json")
    feeds = [b.x_feed(64, seed=i) for i in range(3)]
    plain = hessc.optimize(b.load(b.mlp_model()), target="cpu", bits=4, calibration=feeds, tune=False)
    assert "tuning" not in meta.read_plan(plain) and set(_levels(plain).values()) == {4}
    tuned = hessc.optimize(b.load(b.mlp_model()), target="cpu", bits=4, calibration=feeds)
    assert "unreadable kernel-timing cache" in caplog.text
    assert len(meta.read_plan(tuned)["tuning"]["layers"]) == 2
    json.loads((tmp_path / tune.TIMINGS_FILE).read_text())  # rewritten whole
