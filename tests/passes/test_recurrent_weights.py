"""Recurrent weights: LSTM, GRU and RNN input and recurrent weights at 8 bits per gate unit in the
portable form, LSTM lowered to ONNX Runtime's DynamicQuantizeLSTM on the CPU, GRU/RNN kept float
there with the reason, and all of them outside the bit allocator."""

from __future__ import annotations

import builders as b
import numpy as np
import onnx
import pytest
from onnx import helper

import hessc
from hessc.ir import meta
from hessc.runtime import verification

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent_net(op: str = "LSTM", direction: str = "bidirectional", i: int = 48, h: int = 32) -> onnx.ModelProto:
    """x (seq, batch, i) → op → Y (seq, d, batch, h) → Transpose/Reshape (seq, batch, d·h) →
    MatMul head (d·h → 64)."""
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = {"W": b.weight((d, g * h, i), 0, 0.2), "R": b.weight((d, g * h, h), 1, 0.2),
             "B": b.weight((d, 2 * g * h), 2, 0.1), "shape": np.array([0, 0, d * h], np.int64),
             "H": b.weight((d * h, 64), 3, 0.2)}
    nodes = [
        helper.make_node(op, ["x", "W", "R", "B"], ["y", "y_h"], name="rnn", hidden_size=h, direction=direction),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "H"], ["out"], name="head"),
    ]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", "B", i])
    outs = [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)]
    return b.make_model(nodes, [x], outs, inits)


def _feeds(n: int = 8, i: int = 48) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [{"x": rng.standard_normal((10, 2, i)).astype(np.float32)} for _ in range(n)]


def _rel(a, ref) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_portable_recurrent_weights_are_8_bit_per_gate_unit(op, direction) -> None:
    proto = _recurrent_net(op, direction)
    out = hessc.optimize(b.load(proto), target="onnx", bits=8, calibration=_feeds())
    plans = {w["name"]: w for w in meta.read_plan(out)["weights"]}
    for name in ("W", "R"):
        assert plans[name]["bits"] == 8 and plans[name]["symmetric"] and plans[name]["group_size"] == 0
    assert plans["H"]["group_size"] == 32  # the head keeps the asked-for grouping
    rnn = next(n for n in out.graph if n.op_type == op)
    for index in (1, 2):  # one scale per row: per axis on the 3-D tensor, or on its 2-D view
        producer = rnn.inputs[index].producer()
        dq = producer if direction == "forward" else producer.inputs[0].producer()
        assert dq.op_type == "DequantizeLinear" and "block_size" not in dq.attributes
        scale = dq.inputs[1].const_value.numpy()
        assert scale.shape == (GATES[op] * 32 * (2 if direction == "bidirectional" else 1),)
    for feed in _feeds(3):
        ref, got = b.run_ort(proto, feed)[0], b.run_ort(out, feed)[0]
        assert _rel(got, ref) < 0.02


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_runs_as_dynamic_quantize_lstm_on_the_cpu(direction) -> None:
    proto = _recurrent_net("LSTM", direction)
    out = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=_feeds(), verify=False)
    ops = b.op_types(out)
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    record = meta.read_plan(out)
    # Effective bits count the LSTM's int8 codes, per-row scales and zero points.
    assert 8.0 < record["summary"]["effective_bits_per_weight"] < 9.5
    for feed in _feeds(3):
        ref, got = b.run_ort(proto, feed)[0], b.run_ort(out, feed, optimize=True)[0]
        assert _rel(got, ref) < 0.04  # int8 weights and the kernel's uint8 input and state


def test_the_lowered_lstm_is_checked_against_its_portable_form() -> None:
    proto = _recurrent_net("LSTM")
    portable = hessc.optimize(b.load(proto), target="onnx", bits=8, calibration=_feeds(), verify=False)
    lowered = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=_feeds(), verify=False)
    from hessc.runtime import targets

    report = verification.check_lowered_ops(lowered, portable, _feeds(1)[0], targets.get("cpu"))
    assert report["ops"] >= 2 and not report["failed"]  # the LSTM and the head
    assert report["max_rel_error"] < 0.05


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_gru_and_rnn_keep_float_weights_on_the_cpu_and_say_why(op) -> None:
    out = hessc.optimize(b.load(_recurrent_net(op)), target="cpu", bits=4, calibration=_feeds())
    record = meta.read_plan(out)
    assert "no int8 kernel" in record["skipped"]["W"] and "no int8 kernel" in record["skipped"]["R"]
    assert {w["name"] for w in record["weights"]} == {"H"}
    assert record["verification"]["status"] == "passed"


def test_recurrent_weights_sit_outside_the_budget() -> None:
    with pytest.raises(hessc.InputError, match="fixed form"):  # the 8-bit recurrent weights alone exceed 3.5 bits
        hessc.optimize(b.load(_recurrent_net("LSTM")), target="onnx", bits=3.5, calibration=_feeds())
    out = hessc.optimize(b.load(_recurrent_net("LSTM")), target="onnx", bits=8.5, calibration=_feeds())
    allocation = meta.read_plan(out)["allocation"]
    outside = {w["name"]: w for w in allocation["outside_budget"]}
    assert set(outside) == {"W", "R"}
    assert all(w["bits"] == 8 and "recurrent" in w["reason"] for w in outside.values())
    assert [w["name"] for w in allocation["weights"]] == ["H"]
