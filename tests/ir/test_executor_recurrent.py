"""The executor's LSTM, GRU and RNN against ONNX Runtime: every direction, biases, initial states,
peepholes, sequence lengths, linear_before_reset and clip; batch-first layout (which ORT's CPU
refuses) against the sequence-first result; and gradients flow."""

from __future__ import annotations

import builders as b
import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from hessc.ir.executor import TorchExecutor, max_deviation_vs_ort

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(op: str, direction: str = "forward", layout: int = 0, bias: bool = True, states: bool = False,
           lens: bool = False, peephole: bool = False, **attrs):
    i, h, seq, batch = 5, 6, 4, 3
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    rng = np.random.default_rng(0)
    inits = {"W": (0.5 * rng.standard_normal((d, g * h, i))).astype(np.float32),
             "R": (0.5 * rng.standard_normal((d, g * h, h))).astype(np.float32)}
    names = ["x", "W", "R"]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                            [batch, seq, i] if layout else [seq, batch, i])]
    feeds = {"x": rng.standard_normal((batch, seq, i) if layout else (seq, batch, i)).astype(np.float32)}
    if bias:
        inits["B"] = (0.3 * rng.standard_normal((d, 2 * g * h))).astype(np.float32)
    names.append("B" if bias else "")
    names.append("lens" if lens else "")
    if lens:
        inputs.append(helper.make_tensor_value_info("lens", onnx.TensorProto.INT32, [batch]))
        feeds["lens"] = np.array([4, 2, 1], np.int32)
    state_shape = (batch, d, h) if layout else (d, batch, h)
    for name in (["h0", "c0"] if op == "LSTM" else ["h0"]):
        names.append(name if states else "")
        if states:
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(state_shape)))
            feeds[name] = rng.standard_normal(state_shape).astype(np.float32)
    if peephole:
        inits["P"] = (0.3 * rng.standard_normal((d, 3 * h))).astype(np.float32)
        names.append("P")
    while names[-1] == "":
        names.pop()
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, hidden_size=h, direction=direction, layout=layout, **attrs)
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outs]
    return b.load(b.make_model([node], inputs, outputs, inits)), feeds


CASES = [
    dict(), dict(direction="reverse"), dict(direction="bidirectional"),
    dict(bias=False), dict(states=True), dict(lens=True), dict(lens=True, direction="bidirectional", states=True),
    dict(clip=0.5),
]


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_recurrent_ops_match_onnx_runtime(op, case) -> None:
    model, feeds = _model(op, **case)
    assert max_deviation_vs_ort(model, feeds, dtype=torch.float64) < 1e-5


@pytest.mark.parametrize("extra", [dict(peephole=True, states=True), dict(peephole=True, direction="bidirectional")])
def test_lstm_peepholes_match_onnx_runtime(extra) -> None:
    model, feeds = _model("LSTM", **extra)
    assert max_deviation_vs_ort(model, feeds, dtype=torch.float64) < 1e-5


@pytest.mark.parametrize("before_reset", [0, 1])
def test_gru_linear_before_reset_matches_onnx_runtime(before_reset) -> None:
    model, feeds = _model("GRU", linear_before_reset=before_reset, states=True)
    assert max_deviation_vs_ort(model, feeds, dtype=torch.float64) < 1e-5


@pytest.mark.parametrize("op", list(GATES))
def test_gradients_reach_both_weights(op) -> None:
    model, feeds = _model(op, direction="bidirectional")
    ex = TorchExecutor(model, dtype=torch.float64)
    weights = ex.make_trainable(["W", "R"])
    loss = ex.run(feeds)["y"].square().sum()
    grads = torch.autograd.grad(loss, list(weights.values()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("op", list(GATES))
def test_batch_first_layout_is_the_sequence_first_result_transposed(op) -> None:
    seq_first, feeds = _model(op, direction="bidirectional", states=True)
    batch_first, _ = _model(op, direction="bidirectional", states=True, layout=1)
    got = TorchExecutor(batch_first, dtype=torch.float64).run(
        {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})
    want = TorchExecutor(seq_first, dtype=torch.float64).run(feeds)
    torch.testing.assert_close(got["y"], want["y"].permute(2, 0, 1, 3))
    torch.testing.assert_close(got["y_h"], want["y_h"].transpose(0, 1))
