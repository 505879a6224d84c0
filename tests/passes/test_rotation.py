"""Tests for hessc.passes.rotation: the rotation matrices, finding the residual stream, folding R1
exactly (checked in ONNX Runtime with its optimizations off), refusals, ties, the gate, statistics."""

from __future__ import annotations

import json

import builders as b
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hessc.errors import VerificationError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.passes import rotation as rot

EXACT = 1e-5
"""Relative output error of a folded rotation (fp64 folding, fp32 weights and ORT)."""


def _feed(gemm: bool = False, seed: int = 1) -> dict[str, np.ndarray]:
    return b.ids_feed(shape=(7,) if gemm else (2, 7), seed=seed)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


def _arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def _fold(run_pass, proto: onnx.ModelProto, config: rot.RotationConfig | None = None, gemm: bool = False):
    """The model, its outputs before and after the pass, the initializers before, the result."""
    model = b.load(proto)
    feeds = [_feed(gemm, seed) for seed in (1, 2)]
    before = [b.run_ort(model, f)[0] for f in feeds]
    arrays = _arrays(model)
    result = run_pass(rot.FoldRotationPass(config or rot.RotationConfig()), model)
    after = [b.run_ort(model, f)[0] for f in feeds]
    return model, before, after, arrays, result


def _assert_exact(before, after) -> None:
    for y0, y1 in zip(before, after):
        assert _rel(y1, y0.astype(np.float64)) < EXACT


# --------------------------------------------------------------------------------------------------
# The matrices


@pytest.mark.parametrize("n, construction", [
    (1, "sylvester(1)"), (64, "sylvester(64)"), (12, "paley1(11)"), (24, "paley1(23)"), (28, "paley2(13)"),
    (36, "paley2(17)"), (40, "paley1(19) x sylvester(2)"), (576, "paley1(71) x sylvester(8)"),
    (896, "paley1(223) x sylvester(4)"),
])
def test_hadamard_matrices_are_hadamard(n: int, construction: str) -> None:
    h, what = rot.hadamard(n)
    assert what == construction
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", [6, 18, 30, 52])
def test_orders_without_a_construction_have_none(n: int) -> None:
    assert rot.hadamard(n) is None


@pytest.mark.parametrize("width, mode, kind", [
    (32, "hadamard", "hadamard"), (24, "hadamard", "hadamard"), (30, "hadamard", "random-orthogonal"),
    (32, "random", "random-orthogonal"),
])
def test_rotation_matrices_are_orthogonal_and_seeded(width: int, mode: str, kind: str) -> None:
    r, got, _ = rot.rotation_matrix(width, mode, seed=3)
    assert got == kind and r.dtype == np.float64
    np.testing.assert_allclose(r.T @ r, np.eye(width), atol=1e-12)
    np.testing.assert_array_equal(r, rot.rotation_matrix(width, mode, seed=3)[0])
    assert not np.array_equal(r, rot.rotation_matrix(width, mode, seed=4)[0])
    if kind == "hadamard":  # random signs times a normalised Hadamard matrix: entries ±1/√d
        np.testing.assert_allclose(np.abs(r), width**-0.5)


def test_the_config_and_plan_are_checked() -> None:
    with pytest.raises(ValueError, match="mode"):
        rot.RotationConfig(mode="learned")
    with pytest.raises(ValueError, match="tolerance"):
        rot.RotationConfig(tolerance=0)
    with pytest.raises(ValueError, match="say why"):
        rot.RotationPlan("none")
    with pytest.raises(ValueError, match="width"):
        rot.RotationPlan("R1", width=4, matrix=np.eye(3))


# --------------------------------------------------------------------------------------------------
# Folding


@pytest.mark.parametrize("width, norm, kind", [
    (32, "pow-reciprocal", "hadamard"), (24, "mul-div", "hadamard"), (30, "div", "random-orthogonal"),
    (64, "simplified", "hadamard"), (48, "rms23", "hadamard"),
])
def test_a_pre_norm_decoder_is_rotated_exactly(run_pass, width: int, norm: str, kind: str) -> None:
    proto = b.decoder_model(width=width, norm=norm)
    model, before, after, arrays, result = _fold(run_pass, proto)
    assert result.modified
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    assert (plan.folded, plan.width, plan.kind) == ("R1", width, kind)
    # 2 blocks × (gate, up) + the head read the norms; 2 down projections write; 3 norms.
    assert (plan.readers, plan.writers, plan.norms, plan.gammas_folded, plan.tables) == (5, 2, 3, 3, 1)
    assert plan.untied == () and plan.untied_bytes == 0 and plan.reason == ""
    assert plan.rel_error < EXACT and plan.gate_samples == 2
    r = plan.matrix
    new = _arrays(model)
    # The graph keeps its nodes, inputs, outputs and initializers; only the values change.
    assert list(new) == list(arrays)
    assert b.op_types(model) == b.op_types(b.load(proto))
    assert [v.name for v in model.graph.inputs] == ["ids"] and [v.name for v in model.graph.outputs] == ["logits"]
    # E ← E R; reader B ← Rᵀ diag(γ) B; writer B ← B R; every γ is now ones.
    np.testing.assert_allclose(new["E"], arrays["E"] @ r, rtol=1e-5, atol=1e-6)
    gamma = arrays["layers.0.norm.weight"].astype(np.float64)
    np.testing.assert_allclose(new["layers.0.up"], r.T @ (gamma[:, None] * arrays["layers.0.up"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["layers.1.down"], arrays["layers.1.down"] @ r, rtol=1e-5, atol=1e-6)
    gamma = arrays["norm.weight"].astype(np.float64)
    np.testing.assert_allclose(new["lm_head.weight"], r.T @ (gamma[:, None] * arrays["lm_head.weight"]),
                               rtol=1e-5, atol=1e-6)
    for name in ("layers.0.norm.weight", "layers.1.norm.weight", "norm.weight"):
        assert not np.array_equal(arrays[name], 1) and np.array_equal(new[name], np.ones_like(arrays[name]))
    # Idempotence: the marker stops a second rotation, in memory and after a save.
    assert not run_pass(rot.FoldRotationPass(), model).modified
    np.testing.assert_array_equal(_arrays(model)["E"], new["E"])
    saved = b.load(ir.to_proto(model))
    assert json.loads(saved.metadata_props[rot.ROTATION_KEY])["folded"] == "R1"
    assert not rot.FoldRotationPass()(saved).modified
    if norm not in ("simplified",):  # ORT's SimplifiedLayerNormalization is not an ONNX op
        onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_the_rotation_mode_and_seed_are_used(run_pass) -> None:
    model, before, after, _, _ = _fold(run_pass, b.decoder_model(width=32), rot.RotationConfig(mode="random", seed=7))
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    assert (plan.kind, plan.seed) == ("random-orthogonal", 7)
    np.testing.assert_array_equal(plan.matrix, rot.rotation_matrix(32, "random", 7)[0])


@pytest.mark.parametrize("kwargs", [{"bias": True}, {"gemm": True}, {"residual_scale": 0.5}, {"blocks": 3}])
def test_biases_gemm_and_scalar_residual_scaling_rotate_exactly(run_pass, kwargs) -> None:
    """Writers' biases (an Add, or Gemm's C) rotate with them; a scalar Mul on the stream commutes
    with any rotation."""
    model, before, after, arrays, result = _fold(run_pass, b.decoder_model(**kwargs), gemm=kwargs.get("gemm", False))
    assert result.modified
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    blocks = kwargs.get("blocks", 2)
    assert (plan.readers, plan.writers, plan.norms) == (2 * blocks + 1, blocks, blocks + 1)
    if kwargs.get("bias") or kwargs.get("gemm"):
        assert plan.biases == 2
        np.testing.assert_allclose(_arrays(model)["layers.0.down.bias"], arrays["layers.0.down.bias"] @ plan.matrix,
                                   rtol=1e-5, atol=1e-6)
    if kwargs.get("gemm"):  # transB=1: the stored (out, in) writer becomes Rᵀ B
        np.testing.assert_allclose(_arrays(model)["layers.0.down"], plan.matrix.T @ arrays["layers.0.down"],
                                   rtol=1e-5, atol=1e-6)


def test_a_norm_inside_a_sublayer_does_not_touch_the_stream(run_pass) -> None:
    """A norm on a reader's output (as a QK-norm on q, k) sees the same values after the fold:
    R1 only rotates the residual stream, and the reader's output space is unchanged."""
    model, before, after, arrays, result = _fold(run_pass, b.decoder_model(inner_norm=True))
    assert result.modified
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    assert (plan.norms, plan.gammas_folded) == (3, 3)
    np.testing.assert_array_equal(_arrays(model)["layers.0.gate_norm.weight"], arrays["layers.0.gate_norm.weight"])


def test_a_norm_without_a_scale_keeps_its_readers_unscaled(run_pass) -> None:
    """A unit (or absent) scale commutes with the rotation: nothing to fold, readers only rotate."""
    model, before, after, arrays, _ = _fold(run_pass, b.decoder_model(norm="rms23", unit_gamma=(0,)))
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    assert (plan.norms, plan.gammas_folded) == (3, 2)
    np.testing.assert_allclose(_arrays(model)["layers.0.up"], plan.matrix.T @ arrays["layers.0.up"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Tied heads


def test_a_tied_head_is_untied_when_the_final_scale_is_folded(run_pass) -> None:
    """``MatMul(h, Transpose(E))`` is a tied copy (``meta.TIED_KEY``); ``Rᵀ diag(γ) Eᵀ`` is no longer
    ``(E R)ᵀ``, so the tie goes and the float model stores the head on its own."""
    model, before, after, arrays, _ = _fold(run_pass, b.decoder_model(tied="transpose"))
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    head = model.graph.initializers["E_T"]
    assert meta.TIED_KEY not in head.meta and head.meta[meta.UNTIED_FROM_KEY] == "E"
    # Still the tied head for quantize_embeddings=False: it stays in float like the table.
    from hessc.ir import weights as qweights
    from hessc.passes.quantize import QuantConfig, plan_for

    ref = next(r for r in qweights.iter_weights(model) if r.value is head)
    assert "embedding quantization is off" in plan_for(ref, QuantConfig(quantize_embeddings=False, min_numel=0))
    gamma, r = arrays["norm.weight"].astype(np.float64), plan.matrix
    np.testing.assert_allclose(head.const_value.numpy(), r.T @ (gamma[:, None] * arrays["E_T"]), rtol=1e-5, atol=1e-6)
    assert plan.untied == ("E_T",) and plan.untied_bytes == 40 * 32 * 4
    assert plan.to_json()["untied_bytes"] == 40 * 32 * 4
    # insert-qdq turns float tied copies back into Transpose(table): this one must stay a copy.
    from hessc.passes.quantize import _retie_float_copies

    assert _retie_float_copies(model) == 0


def test_a_tied_head_stays_tied_without_a_final_scale(run_pass) -> None:
    model, before, after, _, _ = _fold(run_pass, b.decoder_model(tied="transpose", unit_gamma=(2,)))
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    head = model.graph.initializers["E_T"]
    assert head.meta[meta.TIED_KEY] == "E" and plan.untied == () and plan.untied_bytes == 0
    np.testing.assert_allclose(head.const_value.numpy(), model.graph.initializers["E"].const_value.numpy().T,
                               rtol=1e-6, atol=1e-6)
    from hessc.passes.quantize import _retie_float_copies  # re-tied to the rotated table: still exact

    assert _retie_float_copies(model) == 1 and "E_T" not in model.graph.initializers
    _assert_exact(before, [b.run_ort(model, _feed(seed=s))[0] for s in (1, 2)])


def test_a_table_shared_with_a_gemm_head_is_split_when_it_must_differ(run_pass) -> None:
    """``Gemm(h, E, transB=1)`` reads the table itself: with the final scale folded in, the head
    needs ``E diag(γ) R`` and the Gather ``E R``, so the head gets its own copy."""
    model, before, after, arrays, _ = _fold(run_pass, b.decoder_model(tied="gemm"), gemm=True)
    _assert_exact(before, after)
    plan = model.meta[rot.ROTATION_KEY]
    assert plan.untied == ("E_untied",) and plan.untied_bytes == 40 * 32 * 4
    head = next(n for n in model.graph if n.name == "lm_head")
    assert head.inputs[1].name == "E_untied" and "E_untied" in model.graph.initializers
    embed = next(n for n in model.graph if n.name == "embed")
    assert embed.inputs[0].name == "E"
    gamma, r, new = arrays["norm.weight"].astype(np.float64), plan.matrix, _arrays(model)
    np.testing.assert_allclose(new["E"], arrays["E"] @ r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["E_untied"], (arrays["E"] * gamma) @ r, rtol=1e-5, atol=1e-6)
    # Without a final scale both uses need E R: one table, still shared.
    model, before, after, _, _ = _fold(run_pass, b.decoder_model(tied="gemm", unit_gamma=(2,)), gemm=True)
    _assert_exact(before, after)
    assert model.meta[rot.ROTATION_KEY].untied == () and "E_untied" not in model.graph.initializers


# --------------------------------------------------------------------------------------------------
# What is not rotated


@pytest.mark.parametrize("kwargs, reason", [
    ({"sandwich": True}, "sandwich norm"),
    ({"norm": "layernorm"}, "LayerNormalization 'layers.0.norm' subtracts the mean"),
    ({"residual_scale": np.linspace(0.5, 1.5, 32)}, "scaled per channel"),
    ({"writer_op": "Tanh"}, "reads the output of Tanh, not of a MatMul/Gemm with a constant weight"),
])
def test_models_whose_stream_cannot_rotate_exactly_are_left_alone(run_pass, kwargs, reason: str) -> None:
    model, before, after, arrays, result = _fold(run_pass, b.decoder_model(**kwargs))
    assert not result.modified
    plan = model.meta[rot.ROTATION_KEY]
    assert plan.folded == "none" and reason in plan.reason and plan.matrix is None
    assert rot.ROTATION_KEY not in model.metadata_props
    for name, array in _arrays(model).items():
        np.testing.assert_array_equal(array, arrays[name])
    for y0, y1 in zip(before, after):
        np.testing.assert_array_equal(y0, y1)
    assert not run_pass(rot.FoldRotationPass(), model).modified
    json.dumps(plan.to_json())


def test_a_model_without_an_embedding_or_residual_is_not_rotated(run_pass) -> None:
    model = b.load(b.mlp_model())
    assert not run_pass(rot.FoldRotationPass(), model).modified
    assert "no token embedding" in model.meta[rot.ROTATION_KEY].reason
    model = b.load(b.decoder_model(blocks=0))
    assert not run_pass(rot.FoldRotationPass(), model).modified
    assert "not a residual model" in model.meta[rot.ROTATION_KEY].reason


def test_a_stream_value_that_is_a_graph_output_stops_the_rotation(run_pass) -> None:
    proto = b.decoder_model()
    proto.graph.output.append(onnx.helper.make_tensor_value_info("layers.0.res", onnx.TensorProto.FLOAT, None))
    model = b.load(proto)
    assert not run_pass(rot.FoldRotationPass(), model).modified
    assert "graph output" in model.meta[rot.ROTATION_KEY].reason


# --------------------------------------------------------------------------------------------------
# The exactness gate


def test_the_gate_raises_on_models_that_differ() -> None:
    original = b.load(b.decoder_model())
    other = b.load(b.decoder_model(seed=1))
    feeds = [_feed()]
    assert rot.check_exact(original, b.load(b.decoder_model()), feeds, 1e-6).rel_error == 0.0
    with pytest.raises(VerificationError, match="differ from the original's") as info:
        rot.check_exact(original, other, feeds, 1e-4)
    assert info.value.exit_code == 3


def test_a_failed_gate_raises_and_leaves_the_model_as_it_was() -> None:
    """The fold is exact only to float32 rounding (~1e-7): a tolerance below it fails the gate,
    and the pass puts every weight, scale and annotation back before raising."""
    model = b.load(b.decoder_model(tied="transpose"))
    arrays = _arrays(model)
    with pytest.raises(VerificationError, match="above the tolerance 1e-12"):
        rot.FoldRotationPass(rot.RotationConfig(tolerance=1e-12))(model)
    for name, array in _arrays(model).items():
        np.testing.assert_array_equal(array, arrays[name])
    assert model.graph.initializers["E_T"].meta[meta.TIED_KEY] == "E"
    assert rot.ROTATION_KEY not in model.meta and rot.ROTATION_KEY not in model.metadata_props
    assert rot.FoldRotationPass()(model).modified  # and a sound tolerance then folds it


def test_the_gate_runs_the_calibration_feeds() -> None:
    model = b.load(b.decoder_model())
    feeds = tuple(_feed(seed=s) for s in range(6))
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(feeds)
    rot.FoldRotationPass(rot.RotationConfig(verify_feeds=5))(model)
    assert model.meta[rot.ROTATION_KEY].gate_samples == 5


# --------------------------------------------------------------------------------------------------
# Curvature statistics


def _spd(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((3 * n, n))
    return x.T @ x / (3 * n)


def test_statistics_are_rotated_where_exact_and_invalidated_elsewhere(run_pass) -> None:
    """Block 0's norm has no scale: its readers' inputs are only rotated (``x R``), so their
    statistics become ``HessianStats.rotated(R)``. γ-folded readers, writers and the table change
    in ways ``rotated`` does not cover: invalidated, with the reason."""
    model = b.load(b.decoder_model(unit_gamma=(0,)))
    stats = {}
    for ref in qweights.iter_weights(model):
        n_in = ref.matrix_shape[1]
        stats[ref.name] = meta.HessianStats(samples=10, a=_spd(n_in, len(stats)),
                                            grad=np.ones(ref.matrix_shape))
        meta.set_annotation(ref.value, meta.HESSIAN_KEY, stats[ref.name])
    run_pass(rot.FoldRotationPass(), model)
    r = model.meta[rot.ROTATION_KEY].matrix
    values = {ref.name: ref.value for ref in qweights.iter_weights(model)}
    for name in ("layers.0.gate", "layers.0.up"):
        kept = values[name].meta[meta.HESSIAN_KEY]
        np.testing.assert_allclose(kept.a, r.T @ stats[name].a @ r, atol=1e-12)
        np.testing.assert_allclose(kept.grad, stats[name].grad @ r, atol=1e-12)
        assert meta.stale_reason(values[name], meta.HESSIAN_KEY) is None
    for name, why in [("layers.1.up", "rescaled by a folded norm scale"), ("lm_head.weight", "rescaled"),
                      ("layers.0.down", "output space was rotated"), ("E", "rows were rotated")]:
        assert values[name].meta.get(meta.HESSIAN_KEY) is None
        assert "fold-rotation" in meta.stale_reason(values[name], meta.HESSIAN_KEY)
        assert why in meta.stale_reason(values[name], meta.HESSIAN_KEY)


def test_a_stream_value_read_inside_a_subgraph_stops_the_rotation(run_pass) -> None:
    from onnx import TensorProto, helper

    proto = b.decoder_model()
    branch = lambda name: helper.make_graph(
        [helper.make_node("Identity", ["layers.0.res"], [name])], name, [],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    proto.graph.node.append(helper.make_node("If", ["cond"], ["side"], then_branch=branch("t"), else_branch=branch("e")))
    proto.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    proto.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    model = b.load(proto)
    assert not run_pass(rot.FoldRotationPass(), model).modified
    assert "inside a subgraph" in model.meta[rot.ROTATION_KEY].reason
