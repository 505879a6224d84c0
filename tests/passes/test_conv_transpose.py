"""ConvTranspose weights: 8-bit per output channel of a group in the portable form (DequantizeLinear
on axis 1), float on the CPU with the measured reason, outside the bit allocator."""

from __future__ import annotations

import builders as b
import numpy as np
import onnx
import pytest
from onnx import helper

import hessc
from hessc.ir import meta


def _upsampler(group: int = 1) -> onnx.ModelProto:
    """conv 3→16 → ReLU → ConvTranspose 16→8 (4×4, stride 2, ``group``) → conv 8→4 (the output)."""
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "WT", "BT"], ["u"], name="up", strides=[2, 2], pads=[1, 1, 1, 1],
                         group=group),
        helper.make_node("Conv", ["u", "W1"], ["y"], name="head"),
    ]
    inits = {"W0": b.weight((16, 3, 3, 3), 0, 0.3), "WT": b.weight((16, 8 // group, 4, 4), 1, 0.2),
             "BT": b.weight((8,), 2, 0.1), "W1": b.weight((4, 8, 1, 1), 3, 0.3)}
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 3, 12, 12])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 4, 24, 24])
    return b.make_model(nodes, [x], [y], inits)


def _feeds(n: int = 6) -> list[dict[str, np.ndarray]]:
    return [{"x": b.images(2, 3, 12, i)} for i in range(n)]


@pytest.mark.parametrize("group", [1, 2])
def test_portable_conv_transpose_weights_are_8_bit_per_output_channel(group) -> None:
    proto = _upsampler(group)
    out = hessc.optimize(b.load(proto), target="onnx", bits=4, calibration=_feeds())
    plans = {w["name"]: w for w in meta.read_plan(out)["weights"]}
    assert plans["WT"]["bits"] == 8 and plans["WT"]["group_size"] == 0 and plans["WT"]["symmetric"]
    up = next(n for n in out.graph if n.op_type == "ConvTranspose")
    dq = up.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].as_int() == 1
    assert dq.inputs[1].const_value.numpy().shape == (8 // group,)
    # The codes of each output channel span its own range: the rounding error is half a step of it.
    w = proto.graph.initializer[1]
    ref_w = onnx.numpy_helper.to_array(w)
    deq = b.dequantize_linear(dq)
    step = np.abs(ref_w).max(axis=(0, 2, 3)) / 127
    assert np.all(np.abs(deq - ref_w) <= step[None, :, None, None] / 2 + 1e-7)


def test_conv_transpose_stays_float_on_the_cpu_with_the_reason() -> None:
    out = hessc.optimize(b.load(_upsampler()), target="cpu", bits=4, calibration=_feeds())
    record = meta.read_plan(out)
    assert "no int8 ConvTranspose kernel" in record["skipped"]["WT"]
    assert record["verification"]["status"] == "passed"


def test_conv_transpose_sits_outside_the_budget() -> None:
    with pytest.raises(hessc.InputError, match="fixed form"):  # its 8 bits alone exceed a 3.5-bit budget
        hessc.optimize(b.load(_upsampler()), target="onnx", bits=3.5, calibration=_feeds())
    out = hessc.optimize(b.load(_upsampler()), target="onnx", bits=9.0, calibration=_feeds())
    outside = {w["name"]: w for w in meta.read_plan(out)["allocation"]["outside_budget"]}
    assert outside["WT"]["bits"] == 8 and "ConvTranspose" in outside["WT"]["reason"]
