"""Tests for hessc.passes.quantize: PlanQuantizationPass and InsertQDQPass (the portable Q/DQ form).

Numerical checks run the Q/DQ graph in ONNX Runtime with its graph optimizations off and compare
with ``x @ dequant(W)`` computed in numpy from the model's own initializers (exact up to float32
accumulation), then bound the error against the float model analytically: RTN moves each weight
by at most half a quantization step ``|s|/2`` (a full step for the one code a symmetric quantizer
clips at ``2^(b−1) − 1``), so ``|Δy_j| ≤ Σ_i |x_i| · bound_ij``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as b
from hessc.errors import InputError
from hessc.ir import meta, verify
from hessc.ir import weights as qweights
from hessc.passes import quantize
from hessc.passes.opset import UpgradeOpsetPass
from hessc.passes.quantize import InsertQDQPass, PlanQuantizationPass, QuantConfig

DTYPES = {
    (2, True): ir.DataType.INT2, (2, False): ir.DataType.UINT2,
    (3, True): ir.DataType.INT4, (3, False): ir.DataType.UINT4,
    (4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
    (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8,
}


def _quantized(run_pass, proto: onnx.ModelProto, config: QuantConfig) -> ir.Model:
    model = b.load_upgraded(proto)
    assert run_pass(PlanQuantizationPass(config), model).modified
    assert run_pass(InsertQDQPass(), model).modified
    return model


def _dq(model: ir.Model) -> ir.Node:
    (dq,) = b.nodes_of(model, "DequantizeLinear")
    return dq


def _error_bound(dq: ir.Node, bits: int, symmetric: bool) -> np.ndarray:
    """Per-element bound on |W − dequant(W)| in the stored layout: half a step ``|s|/2``, or a
    full step where a symmetric code sits at the clipped top code ``2^(b−1) − 1``."""
    codes, scale, _ = b.dq_operands(dq)
    step = np.abs(scale)
    bound = 0.5 * step
    if symmetric:
        bound = np.where(codes == 2 ** (bits - 1) - 1, step, bound)
    return bound * (1 + 1e-6) + 1e-7


# ---------------------------------------------------------------------------------- the passes


def test_plan_is_idempotent_and_insert_reports_change(run_pass) -> None:
    model = b.load_upgraded(b.mlp_model())
    config = QuantConfig(bits=4, group_size=32)
    assert run_pass(PlanQuantizationPass(config), model).modified
    assert not run_pass(PlanQuantizationPass(config), model).modified
    # A different decision is a change again.
    assert run_pass(PlanQuantizationPass(QuantConfig(bits=8, group_size=32)), model).modified
    assert not run_pass(PlanQuantizationPass(QuantConfig(bits=8, group_size=32)), model).modified
    plans = {r.name: r.value.meta[meta.QUANT_KEY] for r in qweights.iter_weights(model)}
    assert set(plans) == {"W1", "W2"} and {p.bits for p in plans.values()} == {8}
    assert run_pass(InsertQDQPass(), model).modified
    assert not run_pass(InsertQDQPass(), model).modified
    assert b.op_types(model) == ["DequantizeLinear", "MatMul", "Relu", "DequantizeLinear", "MatMul"]
    assert model.meta[meta.MATERIALIZED_KEY] == plans, "insert-qdq records the plans it materialized"


def test_plan_and_insert_require_the_portable_opset() -> None:
    model = b.load(b.mlp_model(opset=20))
    with pytest.raises(ir.passes.PreconditionError, match="opset 20.*run upgrade-opset first"):
        PlanQuantizationPass(QuantConfig())(model)
    with pytest.raises(ir.passes.PreconditionError, match="opset 20.*run upgrade-opset first"):
        InsertQDQPass()(model)
    assert model.opset_imports[""] == 20


def test_gptq_plans_need_hessian_statistics_on_the_weight() -> None:
    model = b.load_upgraded(b.matmul_model())
    PlanQuantizationPass(QuantConfig(method="gptq"))(model)
    with pytest.raises(ir.passes.PreconditionError, match="W: gptq needs Hessian statistics"):
        InsertQDQPass()(model)
    assert b.op_types(model) == ["MatMul"], "nothing is materialized"


def test_graph_inputs_outputs_and_other_initializers_are_intact(run_pass) -> None:
    proto = b.gemm_model(k=64, n=32, trans_b=1, bias=True)
    before = b.load(proto)
    model = _quantized(run_pass, proto, QuantConfig())
    io = lambda m: [(v.name, v.shape, v.dtype) for v in [*m.graph.inputs, *m.graph.outputs]]  # noqa: E731
    assert io(model) == io(before)
    assert "W" not in model.graph.initializers, "the float weight is replaced, not kept"
    assert set(model.graph.initializers) == {"b", "W_q", "W_scale", "W_zp"}
    np.testing.assert_array_equal(model.graph.initializers["b"].const_value.numpy(), b.weight((32,), 1))


@pytest.mark.parametrize("bits, opset, ir_version", [(4, 21, 10), (8, 21, 10), (3, 21, 10), (2, 25, 11)])
def test_opset_is_raised_for_the_element_type(run_pass, bits: int, opset: int, ir_version: int) -> None:
    """upgrade-opset raises 20 to 21; insert-qdq raises 21 to 25 itself when a 2-bit plan exists."""
    model = b.load(b.matmul_model(opset=20))
    assert run_pass(UpgradeOpsetPass(), model).modified
    assert not run_pass(UpgradeOpsetPass(), model).modified
    assert model.opset_imports[""] == 21
    assert run_pass(PlanQuantizationPass(QuantConfig(bits=bits)), model).modified
    assert run_pass(InsertQDQPass(), model).modified
    assert model.opset_imports[""] == opset
    assert model.ir_version >= ir_version


def test_opset_above_the_requirement_is_kept(run_pass) -> None:
    model = b.load(b.matmul_model(opset=23))
    assert not run_pass(UpgradeOpsetPass(), model).modified
    assert run_pass(PlanQuantizationPass(QuantConfig(bits=4)), model).modified
    assert run_pass(InsertQDQPass(), model).modified
    assert model.opset_imports[""] == 23


@pytest.mark.parametrize("bits, raised", [(4, 21), (2, 25)])
@pytest.mark.parametrize("opset", [13, 17])
def test_plans_survive_the_opset_upgrade_from_an_old_opset(run_pass, opset: int, bits: int, raised: int) -> None:
    model = b.load(b.mlp_model(opset=opset))
    assert run_pass(UpgradeOpsetPass(), model).modified
    assert model.opset_imports[""] == 21
    assert run_pass(PlanQuantizationPass(QuantConfig(bits=bits)), model).modified
    assert run_pass(InsertQDQPass(), model).modified  # 2-bit: raises 21 -> 25 after planning
    assert model.opset_imports[""] == raised
    plans = [n.meta.get(meta.QUANT_KEY) for n in b.nodes_of(model, "DequantizeLinear")]
    assert len(plans) == 2 and all(isinstance(p, meta.QuantPlan) and p.bits == bits for p in plans)


# ---------------------------------------------------------------------------------- DQ structure


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "kind, stored, axis",
    [("matmul", (64, 32), 0), ("gemm", (32, 64), 1), ("gather", (100, 64), 1)],
)
def test_dq_structure(run_pass, kind: str, stored, axis: int, bits: int, symmetric: bool) -> None:
    proto = {"matmul": b.matmul_model, "gemm": b.gemm_model, "gather": b.gather_model}[kind]()
    model = _quantized(run_pass, proto, QuantConfig(bits=bits, group_size=16, symmetric=symmetric))
    dq = _dq(model)
    consumer = model.graph.node(1)
    assert list(model.graph)[0] is dq and consumer.inputs[1 if kind != "gather" else 0] is dq.outputs[0]
    assert dq.attributes.get_int("axis") == axis and dq.attributes.get_int("block_size") == 16
    q, s = dq.inputs[0], dq.inputs[1]
    assert q.dtype == DTYPES[bits, symmetric] and tuple(q.shape) == stored
    groups = list(stored)
    groups[axis] //= 16
    assert s.dtype == ir.DataType.FLOAT and tuple(s.shape) == tuple(groups)
    if symmetric:
        assert len(dq.inputs) == 2
    else:
        assert dq.inputs[2].dtype == q.dtype and tuple(dq.inputs[2].shape) == tuple(groups)
    codes = q.const_value.numpy().astype(np.int32)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert codes.min() >= lo and codes.max() <= hi, "3-bit codes use only 3 bits of the container"
    plan = dq.meta[meta.QUANT_KEY]
    assert (plan.bits, plan.group_size, plan.symmetric, plan.shape) == (bits, 16, symmetric, stored)
    assert dq.outputs[0].dtype == ir.DataType.FLOAT and tuple(dq.outputs[0].shape) == stored


def _float_conv(c_in: int, kernel: int, group: int, w: np.ndarray) -> onnx.ModelProto:
    """The float conv of :func:`builders.conv_model` with the weight ``w``."""
    proto = b.conv_model(c_in=c_in, c_out=w.shape[0], kernel=kernel, group=group)
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    return proto


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "c_in, kernel, group, group_size, blocks",
    [
        (8, 3, 1, 16, 0),  # k×k: one scale per output channel
        (16, 3, 16, 16, 0),  # depthwise 3×3: per output channel, 9 weights per scale
        (64, 1, 1, 16, 4),  # 1×1: blocks of 16 input channels along axis 1
        (48, 1, 1, 32, 0),  # 1×1 whose input channels 32 does not divide: per output channel
        (32, 1, 1, 32, 0),  # one block would be the whole row: per output channel
    ],
)
def test_conv_qdq_runs_in_ort_and_matches_the_dequantized_weights(
    run_pass, c_in: int, kernel: int, group: int, group_size: int, blocks: int, bits: int, symmetric: bool
) -> None:
    c_out = 16
    stored = (c_out, c_in // group, kernel, kernel)
    proto = b.conv_model(c_in=c_in, c_out=c_out, kernel=kernel, group=group, seed=bits)
    # Named bits (as the allocator gives them): uniform codes would keep a depthwise conv at 8.
    config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, min_numel=0, bits_override=(("W", bits),))
    model = _quantized(run_pass, proto, config)
    dq = _dq(model)
    plan = dq.meta[meta.QUANT_KEY]
    assert (plan.op, plan.bits, plan.group_size, plan.symmetric) == ("Conv", bits, blocks and group_size, symmetric)
    q, s = dq.inputs[0], dq.inputs[1]
    assert q.dtype == DTYPES[bits, symmetric] and tuple(q.shape) == stored
    assert len(dq.inputs) == (2 if symmetric else 3)
    if blocks:
        assert dq.attributes.get_int("axis") == 1 and dq.attributes.get_int("block_size") == group_size
        assert tuple(s.shape) == (c_out, blocks, 1, 1)
    else:
        assert dq.attributes.get_int("axis") == 0 and "block_size" not in dq.attributes
        assert tuple(s.shape) == (c_out,)
    w = b.weight(stored, bits).astype(np.float64)
    deq = b.dequantize_linear(dq)
    assert np.all(np.abs(deq - w) <= _error_bound(dq, bits, symmetric))
    assert np.abs(deq - w).max() > 0
    # ORT runs the Q/DQ graph as the float conv of the dequantized weight.
    feed = {"x": np.random.default_rng(0).standard_normal((2, c_in, 6, 6)).astype(np.float32)}
    (ref,) = b.run_ort(_float_conv(c_in, kernel, group, deq), feed)
    np.testing.assert_allclose(b.run_ort(model, feed)[0], ref, rtol=1e-5, atol=1e-4)
    # The plan's byte count is what the graph stores.
    stored_bytes = sum(int(v.const_value.nbytes) for v in dq.inputs)
    assert quantize.stored_bytes(plan, 4) == stored_bytes


@pytest.mark.parametrize("c_in, kernel, group, thin", [
    (16, 3, 16, True),  # depthwise 3×3: 9 weights per output channel
    (3, 3, 1, True),  # an RGB stem: 27
    (8, 3, 1, False),  # 72
    (64, 1, 1, False),  # 1×1 over 64 channels
])
def test_uniform_codes_keep_thin_convs_at_8_bits(run_pass, c_in: int, kernel: int, group: int, thin: bool) -> None:
    proto = b.conv_model(c_in=c_in, c_out=16, kernel=kernel, group=group)
    plan = _dq(_quantized(run_pass, proto, QuantConfig(bits=4, min_numel=0))).meta[meta.QUANT_KEY]
    assert plan.bits == (8 if thin else 4)
    named = QuantConfig(bits=4, min_numel=0, bits_override=(("W", 2),))  # a budget's choice stands
    assert _dq(_quantized(run_pass, proto, named)).meta[meta.QUANT_KEY].bits == 2


def test_conv_quantization_can_be_off() -> None:
    model = b.load_upgraded(b.mlp_model())
    conv = b.load_upgraded(b.conv_model(c_in=16, c_out=16))
    with pytest.raises(InputError, match="Conv quantization is off for this target"):
        PlanQuantizationPass(QuantConfig(quantize_conv=False))(conv)
    assert PlanQuantizationPass(QuantConfig(quantize_conv=False))(model).modified


def test_weight_shared_by_two_matmuls_gets_one_dq(run_pass) -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["x", "W"], ["y"])]
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", 64])
    proto = b.make_model(nodes, [b.x_input(64)], [b.y_output(64), h], {"W": b.weight((64, 64))})
    model = _quantized(run_pass, proto, QuantConfig())
    assert b.op_types(model) == ["DequantizeLinear", "MatMul", "MatMul"]
    dq = _dq(model)
    assert [n.inputs[1] for n in list(model.graph)[1:]] == [dq.outputs[0]] * 2


# ---------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k, group", [(64, 32), (128, 16), (64, 64)])
def test_matmul_qdq_equals_dequantized_product_within_half_a_step(run_pass, k, group, bits, symmetric) -> None:
    proto = b.matmul_model(k=k, n=24, seed=bits)
    model = _quantized(run_pass, proto, QuantConfig(bits=bits, group_size=group, symmetric=symmetric))
    dq = _dq(model)
    w = b.weight((k, 24), bits).astype(np.float64)
    deq = b.dequantize_linear(dq)
    bound = _error_bound(dq, bits, symmetric)
    assert np.all(np.abs(deq - w) <= bound)

    x = np.random.default_rng(7).standard_normal((5, k))
    (y,) = b.run_ort(model, {"x": x.astype(np.float32)})
    x = x.astype(np.float32).astype(np.float64)
    # ORT's graph is exactly x @ dequant(W): only float32 accumulation differs from numpy's fp64.
    np.testing.assert_allclose(y, x @ deq, rtol=1e-5, atol=1e-6 * (np.abs(x) @ np.abs(deq)).max())
    # Against the float model: at most the analytic bound, and the bound is not vacuous.
    err = np.abs(y - x @ w)
    limit = np.abs(x) @ bound + 1e-4
    assert np.all(err <= limit)
    assert err.max() > 0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_and_gather_qdq_match_numpy(run_pass, bits: int, symmetric: bool) -> None:
    config = QuantConfig(bits=bits, group_size=32, symmetric=symmetric)
    gemm = _quantized(run_pass, b.gemm_model(), config)
    x = b.x_feed(64)["x"]
    deq = b.dequantize_linear(_dq(gemm))  # stored (out, in)
    np.testing.assert_allclose(b.run_ort(gemm, {"x": x})[0], x @ deq.T + b.weight((32,), 1), rtol=1e-5, atol=1e-5)

    gather = _quantized(run_pass, b.gather_model(), config)
    ids = np.array([[0, 5, 99, 5, 1], [2, 3, 4, 98, 0]], dtype=np.int64)
    deq = b.dequantize_linear(_dq(gather))
    np.testing.assert_allclose(b.run_ort(gather, {"ids": ids})[0], deq[ids], rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(deq - b.weight((100, 64))) <= _error_bound(_dq(gather), bits, symmetric))


@pytest.mark.parametrize("symmetric", [False, True])
def test_input_size_not_divisible_by_group(run_pass, symmetric: bool) -> None:
    model = _quantized(run_pass, b.matmul_model(k=80, n=24), QuantConfig(bits=4, group_size=32, symmetric=symmetric))
    dq = _dq(model)
    assert tuple(dq.inputs[1].shape) == (3, 24)  # ceil(80 / 32) blocks along axis 0
    w = b.weight((80, 24)).astype(np.float64)
    deq = b.dequantize_linear(dq)
    assert np.all(np.abs(deq - w) <= _error_bound(dq, 4, symmetric))
    x = b.x_feed(80)["x"]
    np.testing.assert_allclose(b.run_ort(model, {"x": x})[0], x @ deq, rtol=1e-5, atol=1e-5)


def test_weights_in_if_subgraphs_are_quantized_where_they_are_read(run_pass) -> None:
    model = _quantized(run_pass, b.if_model(), QuantConfig(bits=8))
    (if_node,) = b.nodes_of(model, "If")
    for branch in ("then_branch", "else_branch"):
        graph = if_node.attributes[branch].value
        assert [n.op_type for n in graph] == ["DequantizeLinear", "MatMul"]
    assert "W_else" not in model.graph.initializers, "the float outer-scope weight is dropped once unused"
    for cond, seed in ((True, 0), (False, 1)):
        x = b.x_feed(64)["x"]
        (y,) = b.run_ort(model, {"x": x, "cond": np.array(cond)})
        branch = if_node.attributes["then_branch" if cond else "else_branch"].value
        deq = b.dequantize_linear(next(iter(branch)))
        np.testing.assert_allclose(y, x @ deq, rtol=1e-5, atol=1e-5)
        assert np.all(np.abs(deq - b.weight((64, 32), seed)) <= _error_bound(next(iter(branch)), 8, False))


@pytest.mark.parametrize(
    "c_in, c_out, kernel, group",
    [(16, 32, 3, 1), (128, 128, 3, 128), (64, 32, 1, 1)],  # dense 3×3, depthwise 3×3, 1×1 in 16-blocks
)
def test_conv_gptq_with_the_annotated_covariance_beats_rtn(c_in: int, c_out: int, kernel: int, group: int) -> None:
    """GPTQ reads a Conv weight as the (out, in/groups · k · k) matrix ``W.reshape(out, −1)`` and
    the annotation's im2col ``A`` must order its features the same way (channel, then kernel
    offsets): with it, GPTQ's real output error on unseen inputs is far below RTN's; with the
    features in kernel-offset-major order it is worse than RTN's."""
    from hessc.passes import hessian

    proto = b.conv_model(c_in=c_in, c_out=c_out, kernel=kernel, group=group, size=8, seed=1)
    calibration = [{"x": b.images(4, c_in, 8, seed)} for seed in range(4)]
    test = {"x": b.images(8, c_in, 8, 99)}
    (y_float,) = b.run_ort(proto, test)
    per_group = c_in // group * kernel * kernel
    wrong = np.arange(per_group).reshape(c_in // group, kernel * kernel).T.reshape(-1)

    def output_error(method: str, order: np.ndarray | None = None) -> float:
        model = b.load_upgraded(proto)
        hessian.AnnotateHessianPass(hessian.HessianConfig(cache=False), calibration)(model)
        PlanQuantizationPass(QuantConfig(bits=3, group_size=16, method=method, min_numel=0))(model)
        (ref,) = qweights.iter_weights(model)
        a = hessian.hessian_for(ref)
        assert a.shape == (per_group, per_group) == (ref.matrix_shape[1],) * 2
        if order is not None:
            a = a[order][:, order]
        # GPTQ reads its Hessian from the weight's statistics: hand it exactly ``a``.
        stats = meta.HessianStats(samples=ref.value.meta[meta.HESSIAN_KEY].samples, a=a)
        meta.set_annotation(ref.value, meta.HESSIAN_KEY, stats)
        assert np.array_equal(hessian.hessian_for(ref), a)
        InsertQDQPass()(model)
        assert _dq(model).meta[meta.QUANT_KEY].method == method
        (y,) = b.run_ort(model, test)
        return float(np.mean((y.astype(np.float64) - y_float) ** 2))

    rtn, gptq = output_error("rtn"), output_error("gptq")
    assert gptq < 0.6 * rtn
    if kernel > 1 and group == 1:
        assert output_error("gptq", wrong) > rtn > gptq


# ---------------------------------------------------------------------------------- errors


def test_nothing_to_compress_is_an_input_error(run_pass) -> None:
    relu = b.make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [b.x_input(64)], [b.y_output(64)]
    )
    with pytest.raises(InputError, match="nothing hessc can compress.*no MatMul, Gemm, Conv or Gather"):
        PlanQuantizationPass(QuantConfig())(b.load_upgraded(relu))
    with pytest.raises(InputError, match=r"nothing hessc can compress \(W: small \(512 < 1024 elements\)\)"):
        PlanQuantizationPass(QuantConfig())(b.load_upgraded(b.matmul_model(k=32, n=16)))


def test_an_already_quantized_model_is_refused_as_such(tmp_path) -> None:
    """A model ORT's quantize_dynamic already made int8 is named so, with the fix."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(b.matmul_model(k=128, n=64), src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    with pytest.raises(InputError, match=r"already quantized \(.*MatMulInteger.*\).*give it the float model"):
        PlanQuantizationPass(QuantConfig())(b.load_upgraded(onnx.load(dst)))


@pytest.mark.parametrize("bits", [0, 1, 5, 16])
def test_bad_bits_is_an_input_error(bits: int) -> None:
    with pytest.raises(InputError, match=f"--bits {bits} is not supported; use one of 2, 3, 4, 8"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("group", [0, 8, 48, 512, -32])
def test_bad_group_size_is_an_input_error(group: int) -> None:
    with pytest.raises(InputError, match=f"--group-size {group} is not supported; use a power of two"):
        QuantConfig(group_size=group)


def test_bad_method_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown quantization method"):
        QuantConfig(method="awq")


# ---------------------------------------------------------------------------------- saved result


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_saved_result_passes_the_full_onnx_checker(run_pass, tmp_path, bits: int) -> None:
    model = _quantized(run_pass, b.mlp_model(), QuantConfig(bits=bits))
    path = tmp_path / "q.onnx"
    ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    verify.verify_model(ir.load(path))


def test_stored_bytes_counts_containers_scales_and_zero_points() -> None:
    plan = meta.QuantPlan("W", "MatMul", (64, 32), 4, 32, False, matrix_shape=(32, 64))
    # 2048 codes × 4 bits + 64 fp32 scales + 64 4-bit zero points
    assert quantize.stored_bytes(plan, 4) == 1024 + 256 + 32
    three = meta.QuantPlan("W", "MatMul", (64, 32), 3, 32, True, matrix_shape=(32, 64))
    assert quantize.stored_bytes(three, 2) == 1024 + 128  # 3-bit codes in 4-bit containers
    partial = meta.QuantPlan("W", "MatMul", (80, 24), 8, 32, False, matrix_shape=(24, 80))
    assert quantize.stored_bytes(partial, 4) == 80 * 24 + 24 * 3 * 4 + 24 * 3
    assert math.isclose(8 * quantize.stored_bytes(plan, 4) / 2048, 5.125)


@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_layout_stores_3_bit_codes_at_3_bits(symmetric: bool) -> None:
    """On cpu/cuda, 3-bit MatMul/Gemm codes cost 3 bits (rows padded to groups of 8 codes, not to
    whole blocks), while 2/4/8-bit codes are padded to whole blocks; zero points stay 4-bit."""
    def plan(bits: int) -> meta.QuantPlan:  # K = 100: 3.125 blocks of 32, 12.5 groups of 8
        return meta.QuantPlan("W", "MatMul", (100, 24), bits, 32, symmetric, matrix_shape=(24, 100))

    scales, zps = 24 * 4 * 4, 0 if symmetric else 24 * 2  # 4 blocks a row; 4 zero points in 2 bytes
    assert quantize.stored_bytes(plan(3), 4, kernel_layout=True) == 3 * 24 * 13 + scales + zps
    assert quantize.stored_bytes(plan(4), 4, kernel_layout=True) == 24 * 4 * 32 // 2 + scales + zps
    assert quantize.stored_bytes(plan(3), 4) == quantize.stored_bytes(plan(4), 4), "portable: 4-bit container"


# ------------------------------------------------------------------------ tied tables and heads


def _tied_feed(vocab: int = 40, seed: int = 1) -> dict[str, np.ndarray]:
    return b.ids_feed(vocab, (2, 7), seed)


def _dequantized(model: ir.Model) -> ir.Model:
    """A copy of a portable model with every weight DequantizeLinear replaced by the float
    initializer it computes (numpy): the reference of an exact rewrite."""
    copy = b.copy(model)
    for dq in b.nodes_of(copy, "DequantizeLinear"):
        if dq.inputs[0].const_value is None:
            continue
        value = ir.Value(name=f"{dq.outputs[0].name}_float")
        value.const_value = ir.tensor(b.dequantize_linear(dq).astype(np.float32), name=value.name)
        copy.graph.register_initializer(value)
        ir.convenience.replace_all_uses_with(dq.outputs[0], value)
        copy.graph.remove(dq, safe=True)
    return copy


@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_a_tied_table_and_its_head_are_planned_as_one_weight(run_pass, tied: str) -> None:
    model = b.load_upgraded(b.decoder_model(tied=tied))
    config = QuantConfig(bits=4, group_size=16, method_override=(("E", "gptq"),), bits_override=(("E", 8),))
    assert run_pass(PlanQuantizationPass(config), model).modified
    assert not run_pass(PlanQuantizationPass(config), model).modified
    refs = [r for r in qweights.iter_weights(model) if r.name == "E"]
    assert sorted(r.op for r in refs) == sorted(["Gather", "MatMul" if tied == "transpose" else "Gemm"])
    plans = {id(r.value): r.value.meta[meta.QUANT_KEY] for r in refs}
    assert len(set(plans.values())) == 1, "one plan decides the table and its head"
    (plan,) = set(plans.values())
    # The head decides (its curvature is the measured one): its op, the override's bits and method.
    assert (plan.name, plan.op, plan.bits, plan.method, plan.matrix_shape) == (
        "E", "MatMul" if tied == "transpose" else "Gemm", 8, "gptq", (40, 32))
    (group,) = [g for g in quantize.weight_groups(refs)]
    assert group.tied and group.stored.name == "E" and group.lead.op != "Gather"


@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_a_tied_table_stays_in_float_without_embedding_quantization(run_pass, tied: str) -> None:
    proto = b.decoder_model(tied=tied)
    model = b.load_upgraded(proto)
    run_pass(PlanQuantizationPass(QuantConfig(bits=4, group_size=16, quantize_embeddings=False)), model)
    assert all(meta.QUANT_KEY not in r.value.meta for r in qweights.iter_weights(model) if r.name == "E")
    assert model.meta[meta.SKIPPED_KEY]["E"].startswith("embedding quantization is off")
    run_pass(InsertQDQPass(), model)
    assert "E" in model.graph.initializers and "E_T" not in model.graph.initializers, "the float table once"
    assert len(b.nodes_of(model, "DequantizeLinear")) == 6, "only the decoder's six linears"
    table = model.graph.initializers["E"]
    readers = sorted(u.node.op_type for u in table.uses())
    assert readers == (["Gather", "Transpose"] if tied == "transpose" else ["Gather", "Gemm"])
    if tied == "transpose":  # the folded copy is the table again: Transpose(E) → head
        (transpose,) = b.nodes_of(model, "Transpose")
        assert [u.node.name for u in transpose.outputs[0].uses()] == ["lm_head"]
    assert np.array_equal(table.const_value.numpy(),
                          numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "E")))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits, width, group", [(4, 32, 16), (2, 32, 16), (8, 32, 16), (3, 32, 16), (4, 40, 16)])
def test_a_tied_table_is_stored_once_and_dequantized_once(run_pass, bits, width, group, symmetric) -> None:
    """The portable form of ``Gather(E) … MatMul(h, Transpose(E))``: one DequantizeLinear of the
    table read by the lookup and, through Transpose, by the head. It is exactly the float model
    with ``E`` replaced by its dequantized codes."""
    proto = b.decoder_model(width=width, tied="transpose")
    model = b.load_upgraded(proto)
    run_pass(PlanQuantizationPass(QuantConfig(bits=bits, group_size=group, symmetric=symmetric)), model)
    assert run_pass(InsertQDQPass(), model).modified
    assert not run_pass(InsertQDQPass(), model).modified
    (dq,) = [n for n in b.nodes_of(model, "DequantizeLinear") if n.inputs[0].name == "E_q"]
    assert tuple(dq.inputs[0].const_value.shape) == (40, width) and dq.attributes.get_int("axis") == 1
    assert dq.inputs[0].dtype == DTYPES[(bits, symmetric)]
    readers = sorted(u.node.op_type for u in dq.outputs[0].uses())
    assert readers == ["Gather", "Transpose"]
    (transpose,) = b.nodes_of(model, "Transpose")
    assert [(u.node.op_type, u.idx) for u in transpose.outputs[0].uses()] == [("MatMul", 1)]
    names = set(model.graph.initializers)
    assert {"E", "E_T", "E_T_q"}.isdisjoint(names) and {"E_q", "E_scale"} <= names
    # The codes are the table's RTN codes (the head's matrix view W = (E_T)ᵀ = E).
    table = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "E"))
    expected = quantize.quantize_matrix(table, dq.meta[meta.QUANT_KEY])[0].dequantize()[:, :width]
    np.testing.assert_allclose(b.dequantize_linear(dq), expected, rtol=1e-6, atol=1e-6)
    feed = _tied_feed()
    (got,) = b.run_ort(model, feed)
    (want,) = b.run_ort(_dequantized(model), feed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert model.meta[quantize.TIED_WEIGHTS_KEY] == {
        "E": {"table": "E", "uses": ["Gather", "MatMul"], "copies": ["E_T"], "measured": "MatMul"}}
    assert list(model.meta[meta.MATERIALIZED_KEY]).count("E") == 1


def test_a_gemm_tied_table_is_one_dequantize_read_by_both(run_pass, caplog) -> None:
    proto = b.decoder_model(tied="gemm")
    model = b.load_upgraded(proto)
    run_pass(PlanQuantizationPass(QuantConfig(bits=4, group_size=16)), model)
    with caplog.at_level("WARNING"):
        run_pass(InsertQDQPass(), model)
    assert "different layouts" not in caplog.text, "a lookup and a transB=1 head share the table's layout"
    (dq,) = [n for n in b.nodes_of(model, "DequantizeLinear") if n.inputs[0].name == "E_q"]
    assert sorted((u.node.op_type, u.idx) for u in dq.outputs[0].uses()) == [("Gather", 0), ("Gemm", 1)]
    feed = b.ids_feed(40, (16,))
    np.testing.assert_allclose(b.run_ort(model, feed)[0], b.run_ort(_dequantized(model), feed)[0], rtol=1e-5, atol=1e-5)


def test_gptq_on_a_tied_head_reads_the_heads_statistics(run_pass) -> None:
    """GPTQ is fitted to the head's input covariance (the table has none); the lookup reads the
    same codes."""
    model = b.load_upgraded(b.decoder_model(tied="transpose"))
    run_pass(PlanQuantizationPass(QuantConfig(bits=4, group_size=16, method_override=(("E", "gptq"),))), model)
    with pytest.raises(ir.passes.PreconditionError, match="E: gptq needs Hessian statistics"):
        InsertQDQPass()(model)
    head = model.graph.initializers["E_T"]
    x = np.random.default_rng(0).standard_normal((256, 32)) * np.linspace(0.1, 3.0, 32)
    head.meta[meta.HESSIAN_KEY] = meta.HessianStats(samples=256, a=x.T @ x / 256)
    table = model.graph.initializers["E"].const_value.numpy().copy()
    run_pass(InsertQDQPass(), model)
    (dq,) = [n for n in b.nodes_of(model, "DequantizeLinear") if n.inputs[0].name == "E_q"]
    assert dq.meta[meta.QUANT_KEY].method == "gptq"
    a = head.meta[meta.HESSIAN_KEY].a
    rtn = quantize.quantize_matrix(table, dataclasses.replace(dq.meta[meta.QUANT_KEY], method="rtn"))[0].dequantize()
    err = lambda w: float(np.trace((w - table) @ a @ (w - table).T))  # noqa: E731
    assert err(b.dequantize_linear(dq)) < err(rtn), "fitted to the head's covariance"


def test_a_head_untied_from_its_table_is_quantized_on_its_own(run_pass) -> None:
    """A copy whose table is not looked up (or no longer marked tied) is a weight of its own."""
    model = b.load_upgraded(b.decoder_model(tied="transpose"))
    del model.graph.initializers["E_T"].meta[meta.TIED_KEY]
    run_pass(PlanQuantizationPass(QuantConfig(bits=4, group_size=16)), model)
    run_pass(InsertQDQPass(), model)
    codes = {n.inputs[0].name for n in b.nodes_of(model, "DequantizeLinear")}
    assert {"E_q", "E_T_q"} <= codes and not b.nodes_of(model, "Transpose")


@pytest.mark.parametrize("kind,group,bits,symmetric", [
    ("matmul", 16, 4, False),   # stored (in, out): blocks of whole input groups
    ("matmul", 16, 2, True),
    ("gemm", 16, 4, False),     # stored (out, in): blocks of rows
    ("gemm", 64, 3, False),     # a partial last group
    ("matmul", 64, 4, False),   # groups that do not tile the input: read whole
])
def test_a_large_external_weight_is_quantized_a_block_at_a_time_to_the_same_codes(
        run_pass, monkeypatch, tmp_path, kind: str, group: int, bits: int, symmetric: bool) -> None:
    """Read from external data a block of stored rows at a time (each block's pages given back),
    a weight gets the codes, scales and measured error of the whole-weight quantization."""
    k, n = 208, 96
    proto = b.matmul_model(k=k, n=n) if kind == "matmul" else b.gemm_model(k=k, n=n)
    model = b.load_upgraded(proto)
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    config = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)

    def quantized(limit: int):
        monkeypatch.setattr(quantize, "STREAM_ELEMENTS", limit)
        m = ir.load(tmp_path / "m.onnx")
        assert isinstance(next(iter(m.graph.initializers.values())).const_value, ir.ExternalTensor)
        run_pass(PlanQuantizationPass(config), m)
        run_pass(InsertQDQPass(), m)
        dq = b.nodes_of(m, "DequantizeLinear")[0]
        return [x.const_value.numpy() for x in dq.inputs[1:] if x is not None] + [b.dequantize_linear(dq)], \
            next(iter(m.meta[meta.WEIGHT_ERRORS_KEY].values()))

    (whole, whole_error), (blocks, block_error) = quantized(1 << 30), quantized(7 * 64)
    for a, c in zip(whole, blocks):
        np.testing.assert_array_equal(a, c)
    w = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    deq = whole[-1].astype(np.float64).reshape(w.shape)
    assert whole_error == pytest.approx(np.linalg.norm(w - deq) / np.linalg.norm(w), rel=1e-5)
    assert block_error == pytest.approx(whole_error, rel=1e-6)
