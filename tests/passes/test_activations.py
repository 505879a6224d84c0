"""8-bit activation Q/DQ: the grid, the rewrite, its error bound, and its lowering on the CPU."""

from __future__ import annotations

import builders as b
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hessc
from hessc.errors import InputError
from hessc.ir import meta
from hessc.passes.activations import (
    ACT_QUANT_KEY,
    ACT_RANGE_KEY,
    AnnotateActivationRangesPass,
    InsertActivationQDQPass,
    quantized_layer_inputs,
    uint8_grid,
)
from hessc.passes.quantize import InsertQDQPass, PlanQuantizationPass, QuantConfig
from hessc.runtime import calibration as calib
from hessc.runtime.lower import LowerConfig, lower


def _portable(run_pass, proto, bits: int = 8):
    model = b.load_upgraded(proto)
    run_pass(PlanQuantizationPass(QuantConfig(bits=bits)), model)
    run_pass(InsertQDQPass(), model)
    return model


@settings(max_examples=30, deadline=None, database=None)
@given(lo=st.floats(-100, 100), span=st.floats(0, 200))
def test_grid_covers_the_range_and_zero_exactly(lo: float, span: float) -> None:
    hi = lo + span
    scale, zero = uint8_grid(lo, hi)
    assert scale > 0 and 0 <= zero <= 255
    # Zero is on the grid, and both ends are within half a step of it.
    assert float(scale) * (0 - int(zero)) <= min(lo, 0.0) + 0.5 * float(scale) + 1e-6
    assert float(scale) * (255 - int(zero)) >= max(hi, 0.0) - 0.5 * float(scale) - 1e-6


def test_inserts_one_pair_per_quantized_layer_input(run_pass) -> None:
    model = _portable(run_pass, b.mlp_model())
    readers = quantized_layer_inputs(model)
    assert set(readers) == {n.inputs[0].name for n in model.graph if n.op_type in ("MatMul", "Gemm")}
    feeds = [b.x_feed(64, seed=s) for s in range(4)]
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(feeds=tuple(feeds))
    assert not run_pass(AnnotateActivationRangesPass(), model).modified, "an analysis changes nothing"
    ranges = calib.activation_ranges(model, list(readers), feeds)
    assert {name: nodes[0].inputs[0].meta[ACT_RANGE_KEY] for name, nodes in readers.items()} == ranges
    result = run_pass(InsertActivationQDQPass(), model)
    assert result.modified
    act_dqs = [n for n in model.graph if ACT_QUANT_KEY in n.meta]
    assert len(act_dqs) == len(readers)
    assert {n.meta[ACT_QUANT_KEY] for n in act_dqs} == set(ranges.values())
    assert not run_pass(InsertActivationQDQPass(), model).modified, "a second run changes nothing"


def test_ranges_need_calibration_and_insertion_needs_ranges() -> None:
    model = b.load_upgraded(b.mlp_model())
    PlanQuantizationPass(QuantConfig(bits=8))(model)
    InsertQDQPass()(model)
    with pytest.raises(ir.passes.PreconditionError, match="needs calibration data"):
        AnnotateActivationRangesPass()(model)
    with pytest.raises(ir.passes.PreconditionError, match="run annotate-activation-ranges first"):
        InsertActivationQDQPass()(model)


def test_output_error_is_within_the_activation_grid_bound(run_pass) -> None:
    proto = b.matmul_model(k=64, n=32)
    model = _portable(run_pass, proto)
    feed = b.x_feed(64, batch=5, seed=3)
    (weight_only,) = b.run_ort(model, feed)
    x = feed["x"]
    x_range = (float(x.min()), float(x.max()))
    meta.set_annotation(model.graph.inputs[0], ACT_RANGE_KEY, x_range)
    run_pass(InsertActivationQDQPass(), model)
    (out,) = b.run_ort(model, feed)
    scale, _ = uint8_grid(*x_range)
    deq = b.dequantize_linear(next(n for n in model.graph if n.op_type == "DequantizeLinear" and ACT_QUANT_KEY not in n.meta))
    # |Δy| ≤ Σ_i |Δx_i| |W_ij| ≤ (s/2) Σ_i |W_ij| for every output column j.
    bound = 0.5 * float(scale) * np.abs(deq).sum(axis=0)
    assert np.all(np.abs(out - weight_only) <= bound[None, :] + 1e-5)
    assert np.any(np.abs(out - weight_only) > 0), "the activations were really quantized"


def test_cpu_lowering_hands_activations_to_the_kernel(run_pass) -> None:
    model = _portable(run_pass, b.mlp_model(), bits=4)
    feeds = [b.x_feed(64, seed=s) for s in range(3)]
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(feeds=tuple(feeds))
    AnnotateActivationRangesPass()(model)
    InsertActivationQDQPass()(model)
    assert b.op_types(model).count("QuantizeLinear") == 2
    lowered, summary = lower(model, LowerConfig(target="cpu"))
    assert summary["8-bit activations: MatMulNBits dynamic int8 (accuracy_level 4)"] == 2
    assert b.op_types(lowered).count("QuantizeLinear") == 0


def test_activations_8_needs_calibration_except_on_the_cpu_kernel() -> None:
    with pytest.raises(InputError, match="needs calibration"):
        hessc.optimize(b.mlp_model(), target="onnx", activations=8)
    # On the CPU, MatMulNBits quantizes activations itself (dynamic int8 per block): no Q/DQ.
    model = hessc.optimize(b.mlp_model(), target="cpu", activations=8)
    assert b.op_types(model) == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert {n.attributes.get_int("accuracy_level") for n in model.graph if n.op_type == "MatMulNBits"} == {4}
    with pytest.raises(InputError, match="not supported"):
        hessc.optimize(b.mlp_model(), target="cpu", activations=4)


def test_a_head_tied_to_its_table_gets_its_input_quantized_too() -> None:
    """The tied head reads ``Transpose(DequantizeLinear(E))``: it is a quantized layer like the others."""
    model = b.load_upgraded(b.decoder_model(width=64, vocab=40, hidden=64, blocks=1, tied="transpose"))
    run = lambda p: p(model)  # noqa: E731
    run(PlanQuantizationPass(QuantConfig(bits=4, group_size=32)))
    run(InsertQDQPass())
    readers = quantized_layer_inputs(model)
    heads = [n for rs in readers.values() for n in rs if n.inputs[1].producer().op_type == "Transpose"]
    assert len(heads) == 1
