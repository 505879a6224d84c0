"""tune-int8-regions: the static int8 region split into its connected parts, each kept int8 only
where ONNX Runtime ran it faster than float activations at the serving shape, the timings cached."""

from __future__ import annotations

import json

import builders as b
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import hessc
from hessc import report
from hessc.ir import meta
from hessc.passes import activations
from hessc.runtime import tune, tune_regions

CONV = frozenset({"Conv"})


def _prelu_net(size: int = 24) -> onnx.ModelProto:
    """Three 3×3 convs, each followed by a PRelu (no int8 kernel: it splits the region), then a
    1×1 head conv writing the output (float: the output tail)."""
    nodes, inits = [], {}
    channels = [3, 8, 16, 16]
    x = "x"
    for i in range(3):
        inits[f"W{i}"] = b.weight((channels[i + 1], channels[i], 3, 3), i, 0.3)
        inits[f"B{i}"] = b.weight((channels[i + 1],), 10 + i, 0.1)
        inits[f"a{i}"] = np.full((channels[i + 1], 1, 1), 0.25, np.float32)
        nodes.append(helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("PRelu", [f"c{i}", f"a{i}"], [f"p{i}"]))
        x = f"p{i}"
    inits["W3"] = b.weight((4, 16, 1, 1), 3, 0.3)
    nodes.append(helper.make_node("Conv", [x, "W3"], ["y"], name="head"))
    xi = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 3, size, size])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 4, size, size])
    return b.make_model(nodes, [xi], [y], inits)


def _feeds(n: int = 6, size: int = 24) -> list[dict[str, np.ndarray]]:
    return [{"x": b.images(1, 3, size, i)} for i in range(n)]


def _int8_convs(model) -> set[str]:
    """The convs whose activation input is quantized (the static int8 ones)."""
    return {n.name for n in model.graph if n.op_type == "Conv" and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type == "DequantizeLinear" and n.inputs[0].producer().inputs[0].producer()
            is not None}


def test_the_region_splits_where_an_op_without_an_int8_kernel_sits() -> None:
    model = b.load_upgraded(_prelu_net())
    hessc_model = hessc.optimize(model, target="cpu", bits=8, calibration=_feeds(), tune=False,
                                 passes=["upgrade-opset", "plan-quantization", "insert-qdq"])
    parts = tune_regions.region_parts(activations.static_region(hessc_model, CONV))
    assert [[n.name for n in p] for p in parts] == [["conv0"], ["conv1"], ["conv2"]]


def test_parts_follow_the_measured_timings_and_the_cache_replays_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path))
    proto, feeds = _prelu_net(), _feeds()
    first = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=feeds)
    record = meta.read_plan(first)["int8_regions"]
    assert [g["layers"] for g in record["groups"]] == [["conv0"], ["conv1"], ["conv2"]]
    for group in record["groups"]:  # each part's choice is the faster form (float wins a tie)
        faster = "int8" if group["int8_ms"] < group["float_ms"] * (1 - tune.TIE) else "float"
        # A part left with float activations may keep its weights in fp32 where that ran faster still.
        assert group["chosen"] == faster or (faster == "float" and group["chosen"] == "fp32 weights")
    assert _int8_convs(first) == {g["layers"][0] for g in record["groups"] if g["chosen"] == "int8"}
    assert meta.read_plan(first)["verification"]["status"] == "passed"

    # The cached timings decide the next compile: rewrite them so that int8 wins only for conv1.
    path = tmp_path / tune.TIMINGS_FILE
    cached = json.loads(path.read_text())
    machine = tune.machine_key()
    (key,) = [k for k in cached[machine] if k.startswith("static-int8 regions")]
    cached[machine][key] = {
        "float [] + 0": [2.0, 1.0], "fp32 [(0, 'float')] + 0": [1.0, 2.0],
        "float [(0, 'float')] + 1": [1.0, 2.0],
        "float [(0, 'float')] + 2": [2.0, 1.0], "fp32 [(0, 'float'), (2, 'float')] + 2": [1.0, 2.0],
    }
    path.write_text(json.dumps(cached))
    second = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=feeds)
    assert [g["chosen"] for g in meta.read_plan(second)["int8_regions"]["groups"]] == ["float", "int8", "float"]
    assert _int8_convs(second) == {"conv1"}
    text = report.plan_markdown(meta.read_plan(second))
    assert "## Static int8 regions" in text and "| conv1 | 1.0 | 2.0 | int8 |" in text
    assert meta.read_plan(second)["verification"]["status"] == "passed"
    third = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=feeds)
    assert b.to_bytes(third) == b.to_bytes(second), "the same timings make the same model"

    # Where float weights beat the dequantized 8-bit ones, the part keeps float weights, said so.
    cached[machine][key]["fp32 [(0, 'float')] + 0"] = [2.0, 1.0]
    cached[machine][key] = {k.replace("[(0, 'float')", "[(0, 'fp32')") if k != "fp32 [(0, 'float')] + 0" else k: v
                            for k, v in cached[machine][key].items()}
    path.write_text(json.dumps(cached))
    fourth = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=feeds)
    plan = meta.read_plan(fourth)
    assert [g["chosen"] for g in plan["int8_regions"]["groups"]] == ["fp32 weights", "int8", "float"]
    conv0 = next(n for n in fourth.graph if n.name == "conv0")
    assert conv0.inputs[1].const_value is not None and conv0.inputs[1].dtype == ir.DataType.FLOAT
    assert "W0" not in {w["name"] for w in plan["weights"]} and "float weights" in plan["skipped"]["W0"]
    assert plan["verification"]["status"] == "passed"

    # Under a size budget the weights keep the 8-bit codes it priced: float weights are not tried.
    cached[machine][key].update({"float [(0, 'float')] + 1": [1.0, 2.0], "float [(0, 'float')] + 2": [2.0, 1.0]})
    path.write_text(json.dumps(cached))
    budgeted = hessc.optimize(b.load(proto), target="cpu", bits=9.0, calibration=feeds)
    plan = meta.read_plan(budgeted)
    assert [g["chosen"] for g in plan["int8_regions"]["groups"]] == ["float", "int8", "float"]
    assert "size budget" in plan["int8_regions"]["groups"][0]["fp32_weights"]
    assert "W0" in {w["name"] for w in plan["weights"]} and plan["summary"]["effective_bits_per_weight"] <= 9.0


def test_without_tuning_the_whole_region_is_int8() -> None:
    out = hessc.optimize(b.load(_prelu_net()), target="cpu", bits=8, calibration=_feeds(), tune=False)
    assert _int8_convs(out) == {"conv0", "conv1", "conv2"}
    assert "int8_regions" not in meta.read_plan(out)


@pytest.mark.parametrize("count,limit,expected", [(3, 16, [1, 1, 1]), (5, 2, [2, 3]), (4, 4, [1, 1, 1, 1])])
def test_many_parts_are_timed_in_neighbouring_groups(count, limit, expected) -> None:
    class Node:
        op_type = "Conv"

    parts = [[Node()] for _ in range(count)]
    groups = tune_regions._groups(parts, CONV, limit)
    assert [len(g) for g in groups] == expected
    assert [n for g in groups for n in g] == [p[0] for p in parts]
