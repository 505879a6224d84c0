"""Tests for hessc.passes.pipeline: the builder's order and the instrumenting runner."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import builders as b
from hessc.errors import InputError
from hessc.passes import pipeline, quantize


class _Noop(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_pipeline_reads_in_execution_order_and_runs_with_timings() -> None:
    steps = pipeline.build_quantization_pipeline(quantize.QuantConfig(), annotate=_Noop(), allocate=_Noop())
    assert [n for n, _ in steps] == ["annotate-hessian", "plan-quantization", "allocate-bits", "insert-qdq"]
    model = b.load(b.mlp_model())
    timings = pipeline.run(model, pipeline.build_quantization_pipeline(quantize.QuantConfig()), check=True)
    assert [t.name for t in timings] == ["plan-quantization", "insert-qdq"]
    assert all(t.modified and t.seconds >= 0 for t in timings)


def test_a_user_error_inside_a_pass_keeps_its_type() -> None:
    """onnx_ir wraps a pass's exception in PassError; hessc's own errors come out as themselves,
    so the CLI reports them as user errors (exit code 2) with their message."""
    model = b.load(b.matmul_model(k=32, n=16))  # too small to compress
    with pytest.raises(InputError, match="nothing hessc can compress"):
        pipeline.run(model, pipeline.build_quantization_pipeline(quantize.QuantConfig()))


def test_other_errors_stay_pass_errors() -> None:
    class Broken(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            raise RuntimeError("a bug")

    with pytest.raises(ir.passes.PassError) as info:
        pipeline.run(b.load(b.mlp_model()), [("broken", Broken())])
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, RuntimeError)
