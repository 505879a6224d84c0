"""Tests for hessc.passes.pipeline: the builder, pipelines as data, and analyses that stay true
across a rewrite (a test pass rotating one weight's input space by an orthogonal matrix)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import builders as b
from hessc.errors import InputError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.options import CompileOptions
from hessc.passes import pipeline
from hessc.runtime import targets
from hessc.runtime.verification import REFERENCE_KEY, VERIFICATION_KEY


def _names(**kwargs) -> list[str]:
    options = CompileOptions(**{"has_calibration": True, **kwargs})
    return pipeline.default_names(options, targets.get(options.target))


def test_default_pipelines_read_in_execution_order() -> None:
    # With calibration data the CPU runs its convs as static int8: activation ranges and Q/DQ.
    assert _names() == ["upgrade-opset", "plan-quantization", "insert-qdq", "annotate-activation-ranges",
                        "tune-int8-regions", "insert-activation-qdq", "fuse-attention", "fuse-norms", "lower-cpu", "fuse-siblings", "tune-kernels",
                        "verify-in-ort"]
    assert "tune-int8-regions" not in _names(tune=False)
    assert _names(has_calibration=False) == ["upgrade-opset", "plan-quantization", "insert-qdq", "fuse-attention",
                                             "fuse-norms", "lower-cpu", "fuse-siblings", "tune-kernels", "verify-in-ort"]
    # --activations fixes the compute: nothing to tune.
    assert _names(activations=16) == ["upgrade-opset", "plan-quantization", "insert-qdq", "fuse-attention", "fuse-norms", "lower-cpu",
                                      "fuse-siblings",
                                      "verify-in-ort"]
    assert "tune-kernels" not in _names(tune=False)
    assert _names(target="onnx", bits="lossless", method="gptq") == [
        "upgrade-opset", "annotate-hessian", "plan-quantization", "allocate-bits", "split-low-rank", "insert-qdq",
        "confirm-lossless", "lower-onnx", "verify-in-ort",
    ]
    assert "split-low-rank" not in _names(target="onnx", bits="lossless", method="gptq", low_rank=False)
    assert _names(target="onnx", bits=4, activations=8, verify=False) == [
        "upgrade-opset", "plan-quantization", "insert-qdq", "annotate-activation-ranges", "insert-activation-qdq",
        "lower-onnx",
    ]
    # On the CPU 8-bit MatMul activations are the kernel's dynamic int8 path: Q/DQ only for convs.
    options = CompileOptions(has_calibration=True, activations=8)
    steps = {p.name: p.inner for p in pipeline.build_pipeline(options, targets.get("cpu")).passes}
    assert not steps["insert-activation-qdq"].matmul_inputs
    assert steps["insert-activation-qdq"].static_int8_ops == frozenset({"Conv"})
    # The order of the full list is the order of every default pipeline.
    order = [pipeline.spec_name(s, targets.get("cpu")) for s in pipeline.PASSES]
    for names in (_names(), _names(bits=3.5, method="gptq"), _names(bits="lossless")):
        assert names == sorted(names, key=order.index)


def test_passes_and_disabled_passes_select_steps_by_name() -> None:
    options = CompileOptions(passes=("upgrade-opset", "plan-quantization"), disabled_passes=())
    assert pipeline.build_pipeline(options, targets.get("cpu")).names == ["upgrade-opset", "plan-quantization"]
    options = CompileOptions(disabled_passes=("verify-in-ort",))
    assert pipeline.build_pipeline(options, targets.get("cpu")).names[-1] == "tune-kernels"
    with pytest.raises(InputError, match="unknown pass 'quantise'"):
        pipeline.build_pipeline(CompileOptions(passes=("quantise",)), targets.get("cpu"))
    with pytest.raises(InputError, match="unknown pass 'lower-cuda'"):
        pipeline.build_pipeline(CompileOptions(passes=("lower-cuda",)), targets.get("cpu"))
    with pytest.raises(InputError, match="--share FRACTION"):
        pipeline.build_pipeline(CompileOptions(passes=("share-weights",)), targets.get("cpu"))
    with pytest.raises(InputError, match="between 0 and 1"):
        CompileOptions(share=1.5, has_calibration=True)
    with pytest.raises(InputError, match="--share"):
        CompileOptions(share=0.2)
    with pytest.raises(InputError, match="unknown pass"):
        pipeline.build_pipeline(CompileOptions(disabled_passes=("nope",)), targets.get("cpu"))
    with pytest.raises(InputError, match="empty"):
        pipeline.build_pipeline(CompileOptions(passes=("insert-qdq",), disabled_passes=("insert-qdq",)),
                                targets.get("cpu"))


def test_the_plan_lists_the_passes_that_ran() -> None:
    import hessc

    out = hessc.optimize(b.load(b.mlp_model()), target="cpu", bits=4)
    ran = meta.read_plan(out)["passes"]
    assert [p["name"] for p in ran] == ["upgrade-opset", "plan-quantization", "insert-qdq", "fuse-attention", "fuse-norms", "lower-cpu",
                                        "fuse-siblings", "tune-kernels", "verify-in-ort"]
    # tune-kernels modifies the model where this machine's timings pick fp32 compute; an MLP's
    # layers read different inputs: nothing to fuse.
    assert [p["modified"] for p in ran if p["name"] != "tune-kernels"] == [True, True, True, False, False, True, False, False]
    assert set(out.meta[meta.TIMINGS_KEY]) == {p["name"] for p in ran} | {"total"}


def test_a_pipeline_without_insert_qdq_writes_a_verified_float_model() -> None:
    import hessc

    source = b.load(b.mlp_model())
    out = hessc.optimize(source, target="cpu", bits=4, disable_passes=["insert-qdq"])
    plan = meta.read_plan(out)
    assert "DequantizeLinear" not in b.op_types(out) and "MatMulNBits" not in b.op_types(out)
    assert plan["verification"]["status"] == "passed"
    assert plan["verification"]["vs_float"]["rel_error"] < 1e-6
    assert plan["summary"]["quantized_weights"] == 0
    skipped = hessc.optimize(source, target="cpu", bits=4, passes=["upgrade-opset", "plan-quantization", "insert-qdq"])
    assert meta.read_plan(skipped)["verification"]["status"].startswith("skipped")


def test_a_user_error_inside_a_pass_keeps_its_type() -> None:
    """onnx_ir wraps a pass's exception in PassError; hessc's own errors come out as themselves,
    so the CLI reports them as user errors (exit code 2) with their message."""
    model = b.load(b.matmul_model(k=32, n=16))  # too small to compress
    options = CompileOptions(passes=("upgrade-opset", "plan-quantization"))
    with pytest.raises(InputError, match="nothing hessc can compress"):
        pipeline.run(pipeline.build_pipeline(options, targets.get("cpu")), model)


def test_other_errors_come_out_as_themselves_with_their_pass_named() -> None:
    """A bug inside a pass reaches the CLI as the exception the pass raised (not onnx_ir's
    "error at step 0"), noted with the pass it came from."""
    class Broken(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            raise RuntimeError("a bug")

    steps = pipeline.Pipeline([pipeline.InstrumentedPass("broken", Broken())])
    with pytest.raises(RuntimeError, match="a bug") as info:
        pipeline.run(steps, b.load(b.mlp_model()))
    assert info.value.__notes__ == ["in pass broken"]


# --------------------------------------------------------------------------------------------------
# Analyses that stay true: a pass that rotates one weight's input space


class RotateInputPass(ir.passes.InPlacePass):
    """``MatMul(x, W)`` → ``MatMul(x·Q, Qᵀ W)``: the same function, the weight rotated.

    With ``transform`` the weight's Hessian statistics become their exact transform
    (``HessianStats.rotated``), otherwise they are invalidated. ``Q`` enters through an
    ``Identity`` so that it is not itself a weight to quantize.
    """

    def __init__(self, weight: str, q: np.ndarray, transform: bool) -> None:
        super().__init__()
        self.weight, self.q, self.transform = weight, q, transform

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ref = next(r for r in qweights.iter_weights(model) if r.name == self.weight)
        graph = model.graph
        q_value = ir.Value(name=f"{self.weight}_rotation", shape=ir.Shape(self.q.shape), type=ir.TensorType(ir.DataType.FLOAT))
        q_value.const_value = ir.tensor(self.q.astype(np.float32), name=q_value.name)
        graph.register_initializer(q_value)
        identity = ir.node("Identity", [q_value], name=f"{self.weight}_rotation_identity")
        rotate = ir.node("MatMul", [ref.node.inputs[0], identity.outputs[0]], name=f"{self.weight}_rotate")
        graph.insert_before(ref.node, [identity, rotate])
        ref.node.replace_input_with(0, rotate.outputs[0])
        w = ref.value.const_value.numpy().astype(np.float64)  # stored (in, out)
        ref.value.const_value = ir.tensor((self.q.T @ w).astype(np.float32), name=ref.value.name)
        stats = ref.value.meta.get(meta.HESSIAN_KEY)
        if self.transform and stats is not None:
            meta.set_annotation(ref.value, meta.HESSIAN_KEY, stats.rotated(self.q))
        else:
            meta.invalidate(ref.value, meta.HESSIAN_KEY, "was invalidated by rotate-input (the weight was rotated)")
        return ir.passes.PassResult(model, True)


def _orthogonal(n: int, seed: int = 3) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _mlp() -> ir.Model:
    """``relu(x W1) W2`` with weights scaled as a trained layer's (logits of order one)."""
    from onnx import helper

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    inits = {"W1": b.weight((64, 64), 0, scale=64**-0.5), "W2": b.weight((64, 16), 1, scale=2 * 64**-0.5)}
    return b.load(b.make_model(nodes, [b.x_input(64)], [b.y_output(16)], inits))


def _prepared(seed: int = 0, heldout_scale: float | None = None):
    model = _mlp()
    rng = np.random.default_rng(seed)
    feeds = tuple({"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(8))
    labels = tuple(rng.integers(0, 16, 8) for _ in feeds)
    heldout = labels_held = ()
    if heldout_scale is not None:
        heldout = tuple({"x": (heldout_scale * rng.standard_normal((8, 64))).astype(np.float32)} for _ in range(4))
        labels_held = tuple(rng.integers(0, 16, 8) for _ in heldout)
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(feeds, heldout, labels, labels_held or None)
    model.meta[REFERENCE_KEY] = model.clone()
    return model


def _stats(model: ir.Model, name: str) -> meta.HessianStats:
    return next(r for r in qweights.iter_weights(model) if r.name == name).value.meta[meta.HESSIAN_KEY]


def _assert_close(a: np.ndarray, b_: np.ndarray, what: str) -> None:
    rel = np.linalg.norm(a - b_) / np.linalg.norm(b_)
    assert rel < 1e-5, f"{what}: relative difference {rel:.2e}"


@pytest.mark.torch
def test_a_rotation_transforms_the_statistics_exactly_or_they_are_recomputed() -> None:
    options = CompileOptions(target="onnx", bits=5.5, has_calibration=True)
    target = targets.get("onnx")
    q = _orthogonal(64)
    rotate = [("allocate-bits", "rotate-input", RotateInputPass("W1", q, True))]
    until_allocation = dataclasses.replace(
        options, passes=("upgrade-opset", "annotate-hessian", "plan-quantization", "allocate-bits"))
    transformed = pipeline.run(pipeline.build_pipeline(until_allocation, target, check=True, extra=rotate), _prepared())
    # The same model rotated first and annotated afresh: what the statistics must be.
    fresh = _prepared()
    pipeline.run(pipeline.Pipeline([
        pipeline.InstrumentedPass("upgrade-opset", pipeline._upgrade_opset(options, target)),
        pipeline.InstrumentedPass("rotate-input", RotateInputPass("W1", q, False)),
        pipeline.InstrumentedPass("annotate-hessian", pipeline._annotate_hessian(options, target)),
    ]), fresh)
    kept, recomputed = _stats(transformed, "W1"), _stats(fresh, "W1")
    _assert_close(kept.a, recomputed.a, "A -> Q^T A Q")
    _assert_close(kept.grad, recomputed.grad, "grad W -> grad W . Q")
    _assert_close(kept.g, recomputed.g, "G unchanged")
    assert [p["name"] for p in transformed.meta[pipeline.PASSES_KEY]][3] == "rotate-input"
    whole = pipeline.run(pipeline.build_pipeline(options, target, check=True, extra=rotate), _prepared())
    verified = whole.meta[VERIFICATION_KEY]
    assert verified["status"] == "passed" and verified["vs_float"]["rel_error"] < 0.2

    # Invalidated instead: the allocator refuses, and names the fix ...
    with pytest.raises(Exception) as info:
        pipeline.run(pipeline.build_pipeline(
            options, target, extra=[("allocate-bits", "rotate-input", RotateInputPass("W1", q, False))]), _prepared())
    assert "run annotate-hessian again" in str(info.value) and "rotate-input" in str(info.value)
    # ... and annotating again after the rotation recomputes them.
    again = pipeline.run(pipeline.build_pipeline(options, target, extra=[
        ("allocate-bits", "rotate-input", RotateInputPass("W1", q, False)),
        ("allocate-bits", "annotate-hessian", pipeline._annotate_hessian(options, target)),
    ]), _prepared())
    assert again.meta[VERIFICATION_KEY]["status"] == "passed"
    annotated_again = pipeline.run(pipeline.build_pipeline(until_allocation, target, extra=[
        ("allocate-bits", "rotate-input", RotateInputPass("W1", q, False)),
        ("allocate-bits", "annotate-hessian", pipeline._annotate_hessian(options, target)),
    ]), _prepared())
    _assert_close(_stats(annotated_again, "W1").a, recomputed.a, "recomputed A")
    assert meta.stale_reason(next(r for r in qweights.iter_weights(fresh) if r.name == "W1").value,
                             meta.HESSIAN_KEY) is None


@pytest.mark.torch
def test_the_lossless_back_off_keeps_a_rewrite_made_before_planning() -> None:
    """The held-out feeds come from another distribution, so the first allocation fails its
    check and plan → materialize re-runs; every re-run must still hold the rotation."""
    options = CompileOptions(target="onnx", bits="lossless", has_calibration=True)
    q = _orthogonal(64)
    out = pipeline.run(pipeline.build_pipeline(
        options, targets.get("onnx"), extra=[("plan-quantization", "rotate-input", RotateInputPass("W1", q, True))]),
        _prepared(heldout_scale=6.0))
    from hessc.passes.lossless import LOSSLESS_KEY

    record = out.meta[LOSSLESS_KEY]
    assert record["steps"], "the setup must make the first allocation fail on held-out data"
    assert record["confirmed"]
    assert "W1_rotate" in {n.name for n in out.graph}, "the replayed model lost the rotation"
    want = q.T @ _mlp().graph.initializers["W1"].const_value.numpy()
    dq = [n for n in out.graph if n.op_type == "DequantizeLinear" and n.name == "W1_dq"]
    if dq:  # quantized: within half a step of the rotated weight
        _, scale, _ = b.dq_operands(dq[0])
        bound = 0.5 * np.repeat(scale, want.shape[0] // scale.shape[0], axis=0) + 1e-6
        assert np.all(np.abs(b.dequantize_linear(dq[0]) - want) <= bound)
    else:  # kept in float by the back-off: the rotated weight itself
        np.testing.assert_allclose(out.graph.initializers["W1"].const_value.numpy(), want, rtol=1e-5, atol=1e-6)
    assert out.meta[VERIFICATION_KEY]["vs_float"]["rel_error"] < 0.1


def test_options_are_checked_once() -> None:
    with pytest.raises(InputError, match="unknown target"):
        CompileOptions(target="tpu")
    with pytest.raises(InputError, match="needs calibration"):
        CompileOptions(bits=3.5)
    with pytest.raises(InputError, match="chosen by the bit allocator"):
        CompileOptions(rounding="gradient")
    with pytest.raises(InputError, match="not supported"):
        CompileOptions(bits=5)
    assert dataclasses.replace(CompileOptions(), bits="3.5", has_calibration=True).budgeted


@pytest.mark.torch
def test_rotation_runs_before_the_curvature_it_would_invalidate() -> None:
    """``rotate="hadamard"`` with GPTQ: fold-rotation first, then annotate-hessian on the rotated
    weights; the result is verified and the plan records what was folded."""
    import hessc

    assert _names(rotate="hadamard", method="gptq")[:3] == ["upgrade-opset", "fold-rotation", "annotate-hessian"]
    model = b.load(b.decoder_model(width=64, vocab=40, hidden=64, blocks=2))
    feeds = [b.ids_feed(40, (2, 16), seed=s) for s in range(4)]
    out = hessc.optimize(model, target="onnx", bits=4, group_size=32, method="gptq", rotate="hadamard",
                         calibration=feeds, allow_degraded=True)
    plan = meta.read_plan(out)
    assert [p["name"] for p in plan["passes"]][:3] == ["upgrade-opset", "fold-rotation", "annotate-hessian"]
    assert plan["rotation"]["folded"] == "R1"
    assert plan["verification"]["status"].startswith("passed")
    with pytest.raises(InputError, match="not implemented yet"):
        CompileOptions(rotate="learned")
