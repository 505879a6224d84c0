"""Static int8 convs on the CPU: the region, its Q/DQ form, what ONNX Runtime fuses it into, and
the arithmetic details that keep the fused kernels equal to the portable form."""

from __future__ import annotations

import collections

import builders as b
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import hessc
from hessc.ir import meta
from hessc.passes import activations
from hessc.runtime import calibration as calib
from hessc.runtime import targets

CONV = frozenset({"Conv"})


def _residual_net(c: int = 16, hidden: int = 32, tiny_channel: bool = False) -> onnx.ModelProto:
    """stem conv → ReLU6 → [expand 1×1 → ReLU → depthwise 3×3 → ReLU → project 1×1] + skip →
    MaxPool → head conv (the output), all convs with biases: an inverted-residual block."""
    nodes = [
        helper.make_node("Conv", ["x", "W0", "B0"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["s", "lo", "hi"], ["s6"], name="relu6"),
        helper.make_node("Conv", ["s6", "W1", "B1"], ["h1"], name="expand"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["h2"], name="depthwise", group=hidden, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3", "B3"], ["p"], name="project"),
        helper.make_node("Add", ["p", "s6"], ["res"], name="skip"),
        helper.make_node("MaxPool", ["res"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool", "W4"], ["y"], name="head"),
    ]
    rng = np.random.default_rng(0)
    w1 = b.weight((hidden, c, 1, 1), 1, 0.3)
    if tiny_channel:  # a dead channel: its weight scale is tiny, its bias is not
        w1[0] = 1e-9 * rng.standard_normal(w1[0].shape)
    inits = {
        "W0": b.weight((c, 3, 3, 3), 0, 0.3), "B0": b.weight((c,), 10, 0.1),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
        "W1": w1, "B1": b.weight((hidden,), 11, 0.5),
        "W2": b.weight((hidden, 1, 3, 3), 2, 0.3), "B2": b.weight((hidden,), 12, 0.1),
        "W3": b.weight((c, hidden, 1, 1), 3, 0.2), "B3": b.weight((c,), 13, 0.1),
        "W4": b.weight((8, c, 1, 1), 4, 0.3),
    }
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 3, 16, 16])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 8, 8, 8])
    return b.make_model(nodes, [x], [y], inits)


def _feeds(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [{"x": b.images(2, 3, 16, seed + i)} for i in range(n)]


def _optimized_ops(model) -> collections.Counter:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    path = "/tmp/hessc-static-int8-optimized.onnx"
    opts.optimized_model_filepath = path
    ort.InferenceSession(b.to_bytes(model), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def test_convs_become_fused_int8_kernels_on_the_cpu() -> None:
    proto = _residual_net()
    feeds = _feeds()
    out = hessc.optimize(b.load(proto), target="cpu", bits=4, calibration=feeds, tune=False)
    record = meta.read_plan(out)
    plans = {w["name"]: w for w in record["weights"]}
    # Four static int8 convs (8 bits whatever --bits said, narrow per-channel grid, even the
    # 288-weight depthwise one); the head writes the model's output and stays in float.
    assert {n for n, w in plans.items() if w["bits"] == 8 and w.get("narrow")} == {"W0", "W1", "W2", "W3"}
    assert "W4" not in plans
    assert record["verification"]["status"] == "passed"
    ops = collections.Counter(n.op_type for n in out.graph)
    assert ops["Clip"] == 0 and ops["Relu"] == 0, "ReLU6 and ReLU are absorbed by the grids after them"
    fused = _optimized_ops(out)
    assert fused["QLinearConv"] == 4 and fused["QLinearAdd"] == 1
    assert fused["Conv"] == 1  # the float head
    for feed in _feeds(3, seed=100):  # held-out
        ref = b.run_ort(proto, feed)[0]
        portable, lowered = b.run_ort(out, feed)[0], b.run_ort(out, feed, optimize=True)[0]
        assert _rel(portable, ref) < 0.05
        assert _rel(lowered, portable) < 0.02, "the fused kernels compute the portable form"


def test_one_bias_read_by_several_convs_gets_an_int32_copy_per_conv() -> None:
    """The TorchScript exporter stores equal initializers once (zero biases of a random-weight net,
    read through Identity): each conv's int32 bias has its own weight scale, so its own name."""
    proto = _residual_net()
    inits = {t.name: t for t in proto.graph.initializer}
    inits["B3"].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(inits["B0"]), "B3"))
    shared = onnx.numpy_helper.from_array(np.zeros(16, np.float32), "B0")
    inits["B0"].CopyFrom(shared)
    for node in proto.graph.node:
        if node.name == "project":
            node.input[2] = "B0_read"
    proto.graph.node.insert(0, helper.make_node("Identity", ["B0"], ["B0_read"]))
    proto.graph.initializer.remove(inits["B3"])
    out = hessc.optimize(b.load(proto), target="cpu", bits=4, calibration=_feeds())
    assert meta.read_plan(out)["verification"]["status"] == "passed"
    biases = [n.inputs[2] for n in out.graph if n.op_type == "Conv" and len(n.inputs) > 2 and n.inputs[2] is not None]
    names = [v.name for v in biases]
    assert len(names) == len(set(names)) >= 4
    assert _optimized_ops(out)["QLinearConv"] == 4


@pytest.mark.parametrize("tune", [False, True], ids=["int8", "tuned"])
def test_a_float16_conv_net_gets_its_quantization_in_float16(tune: bool) -> None:
    """A float16 model (as converted for GPUs): activation scales, int32-bias scales and weights
    folded back to float all keep float16, which QuantizeLinear/DequantizeLinear/Conv bind."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(_residual_net(), keep_io_types=False)
    feeds = [{"x": f["x"].astype(np.float16)} for f in _feeds()]
    out = hessc.optimize(b.load(proto), target="cpu", bits=4, calibration=feeds, tune=tune)
    assert meta.read_plan(out)["verification"]["status"] == "passed"
    scales = [n.inputs[1] for n in out.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all(v.dtype == ir.DataType.FLOAT16 for v in scales)
    if not tune:  # tuned, the parts may all run faster in float16 (ORT fuses no float16 Q/DQ on the CPU)
        assert sum(n.op_type == "QuantizeLinear" for n in out.graph) >= 3
    feed = {"x": b.images(2, 3, 16, 100).astype(np.float16)}
    ref = b.run_ort(proto, feed)[0].astype(np.float32)
    assert _rel(b.run_ort(out, feed)[0].astype(np.float32), ref) < 0.05


def test_the_int8_range_sets_the_weight_grid_and_auto_follows_this_cpu() -> None:
    """``int8_range`` picks the code limit of the GEMM convs' weights (the depthwise W2 runs an
    int32 kernel and keeps 127); ``auto`` is the reduced grid exactly where this machine's
    kernels saturate, and the fused kernels then agree with the portable form whichever CPU
    runs the test."""
    proto, feeds = _residual_net(), _feeds()
    limits = {}
    for choice in ("full", "reduced", "auto"):
        out = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=feeds, int8_range=choice, tune=False)
        weights = meta.read_plan(out)["weights"]
        limits[choice] = {w["name"]: w["narrow"] for w in weights if w.get("narrow")}
        if choice == "auto":
            for feed in _feeds(2, seed=200):
                portable, lowered = b.run_ort(out, feed)[0], b.run_ort(out, feed, optimize=True)[0]
                assert _rel(lowered, portable) < 0.01
    dense = 63 if targets.saturating_int8_products() else 127
    assert limits["full"] == {"W0": 127, "W1": 127, "W2": 127, "W3": 127}
    assert limits["reduced"] == {"W0": 63, "W1": 63, "W2": 127, "W3": 63}
    assert limits["auto"] == {"W0": dense, "W1": dense, "W2": 127, "W3": dense}
    with pytest.raises(hessc.InputError, match="int8 range"):
        hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=feeds, int8_range="7")


def test_a_dead_channel_bias_fits_int32_and_the_kernel_agrees() -> None:
    """A channel of ~1e-9 weights with a 0.5-sized bias: in units of s_x · s_w the bias is beyond
    int32; the channel's weight scale is widened so the fused kernel agrees with the Q/DQ form."""
    proto = _residual_net(tiny_channel=True)
    out = hessc.optimize(b.load(proto), target="cpu", bits=8, calibration=_feeds(), tune=False)
    biases = [n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == onnx.TensorProto.INT32]
    assert len(biases) == 4
    for dq in biases:
        codes = dq.inputs[0].const_value.numpy()
        assert np.abs(codes.astype(np.int64)).max() <= activations.BIAS_LIMIT
    feed = _feeds(1, seed=50)[0]
    assert _rel(b.run_ort(out, feed, optimize=True)[0], b.run_ort(out, feed)[0]) < 0.02


@pytest.mark.parametrize("lo, hi, absorbed", [(0.0, 6.0, True), (-1.0, 6.0, True), (0.0, 1.0, False), (1.0, 6.0, False)])
def test_a_clip_is_absorbed_only_where_the_grid_saturates_at_its_bounds(lo, hi, absorbed) -> None:
    bounds = []
    for v in (lo, hi):
        value = ir.Value(name=f"bound{v}")
        value.const_value = ir.tensor(np.array(v, np.float32))
        bounds.append(value)
    clip = ir.node("Clip", [ir.Value(name="a"), *bounds])
    grid = activations.uint8_grid(0.0, 5.0)  # the calibrated range after the clip: [0, 5]
    assert activations._absorbs(clip, grid) is absorbed
    # The claim behind it: on the grid, Q(clip(x)) == Q(x) for every x exactly when absorbed.
    scale, zero = np.float32(grid[0]), int(grid[1])
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    q = lambda t: np.clip(np.round(t / scale) + zero, 0, 255)  # noqa: E731
    assert np.array_equal(q(np.clip(x, lo, hi)), q(x)) is absorbed


def test_ranges_of_graph_inputs_and_intermediate_values() -> None:
    proto = _residual_net()
    model = b.load(proto)
    feeds = _feeds(3)
    ranges = calib.activation_ranges(model, ["x", "s6"], feeds)
    assert ranges["x"] == (min(float(f["x"].min()) for f in feeds), max(float(f["x"].max()) for f in feeds))
    lo, hi = ranges["s6"]
    assert lo >= 0.0 and hi <= 6.0  # after ReLU6


def test_without_calibration_or_with_float_activations_convs_stay_float_and_say_why() -> None:
    with pytest.raises(hessc.errors.InputError, match="needs calibration data .*pass --calibration"):
        hessc.optimize(b.load(_residual_net()), target="cpu", bits=4)
    with pytest.raises(hessc.errors.InputError, match="--activations 16 keeps activations in float"):
        hessc.optimize(b.load(_residual_net()), target="cpu", bits=4, calibration=_feeds(), activations=16)
    assert activations.static_region(b.load(_residual_net()), CONV).nodes == [], \
        "no conv has a narrow 8-bit weight before planning"
