"""Tests for hessc.passes.low_rank: whitened low-rank factors, the allocator's split and
compensation items, and SplitLowRankPass (``split-low-rank``).

Hand-built graphs with synthetic curvature (``A`` from correlated inputs, ``G = I``), so what the
allocator should choose is known: a weight of rank r plus noise is split at rank r, a full-rank
random weight is not; the materialized graph is run in ONNX Runtime and compared with the
factors' own prediction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import builders as b
from hessc.errors import InputError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.passes import allocate_bits, low_rank, quantize
from hessc.passes.allocate_bits import AllocateBitsPass, AllocationConfig
from hessc.passes.low_rank import SplitLowRankPass
from hessc.passes.quantize import InsertQDQPass, PlanQuantizationPass, QuantConfig


@dataclasses.dataclass(frozen=True, eq=False)
class Stats:
    """Synthetic curvature statistics with the ``HessianStats`` field names."""

    a: np.ndarray | None = None
    g: np.ndarray | None = None
    grad: np.ndarray | None = None


def _inputs(n: int, seed: int, samples: int = 4096) -> np.ndarray:
    """Correlated inputs: a few strong latent directions over a full-rank floor."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((samples, 6)) @ rng.standard_normal((6, n))
            + 0.3 * rng.standard_normal((samples, n))).astype(np.float32)


def _cov(x: np.ndarray) -> np.ndarray:
    return (x.T.astype(np.float64) @ x) / len(x)


def _low_rank_weight(out_dim: int, in_dim: int, rank: int, seed: int, noise: float = 1e-4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_dim, rank)) @ rng.standard_normal((rank, in_dim)) / np.sqrt(rank)
    return (w + noise * rng.standard_normal((out_dim, in_dim))).astype(np.float32)


def _model(*weights: np.ndarray):
    """``y = x W1ᵀ (W2ᵀ ...)``: MatMul layers with weights given as (out, in), stored (in, out)."""
    nodes, inits, prev = [], {}, "x"
    for i, w in enumerate(weights, 1):
        out = "y" if i == len(weights) else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out], name=f"mm{i}"))
        inits[f"W{i}"] = np.ascontiguousarray(w.T)
        prev = out
    return b.make_model(nodes, [b.x_input(weights[0].shape[1])], [b.y_output(weights[-1].shape[0])], inits)


def _planned(proto, xs: list[np.ndarray], group: int = 32):
    """Planned at 4 bits, each weight with ``A`` of its (float) input and ``G = I``."""
    model = b.load_upgraded(proto)
    PlanQuantizationPass(QuantConfig(bits=4, group_size=group))(model)
    for ref, x in zip(sorted(qweights.iter_weights(model), key=lambda r: r.name), xs):
        ref.value.meta[meta.HESSIAN_KEY] = Stats(a=_cov(x), g=np.eye(ref.matrix_shape[0]))
    return model


def _weight(model, name: str) -> dict:
    return next(w for w in model.meta[allocate_bits.ALLOCATION_KEY]["weights"] if w["name"] == name)


# ------------------------------------------------------------------------------ the factors


def test_whitened_truncation_loses_exactly_the_dropped_energy() -> None:
    """``tr(Δ A Δᵀ) = Σ_{i>r} σ_i²`` of ``W S`` for float factors (the SVD-LLM identity), and it
    is smaller than the plain (unwhitened) truncation's output error."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((80, 96))
    a = _cov(_inputs(96, 1))
    sigma = np.linalg.svd(w @ np.linalg.cholesky(a), compute_uv=False)
    for rank in (8, 24, 40):
        f = low_rank.split_factors(w, a, [rank], [32], 32, False)[(32, rank)]
        delta = f.product - w
        assert np.einsum("ij,jk,ik->", delta, a, delta) == pytest.approx(np.sum(sigma[rank:] ** 2), rel=1e-4)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        plain = (u[:, :rank] * s[:rank]) @ vt[:rank] - w
        assert np.einsum("ij,jk,ik->", delta, a, delta) < np.einsum("ij,jk,ik->", plain, a, plain)


def test_quantized_factors_refit_the_left_factor() -> None:
    """Rounding R and refitting L to it loses less than rounding both as they come."""
    w = _low_rank_weight(96, 128, 24, 0, noise=0.05)
    a = _cov(_inputs(128, 2))
    f = low_rank.split_factors(w, a, [24], [4], 32, False)[(4, 24)]
    white = low_rank.whitened(a)
    left, right = white.factors(white.svd(w), 24)
    plans = low_rank.factor_plans("w", w.shape, 24, 4, 32, False)
    naive = low_rank._rounded(left.astype(np.float32), plans[0]) @ low_rank._rounded(right.astype(np.float32), plans[1])

    def err(m):
        d = m - w
        return np.einsum("ij,jk,ik->", d, a, d)

    assert err(f.product) < 0.9 * err(naive)


def test_energy_ranks_find_the_numerical_rank() -> None:
    sigma = np.r_[np.full(8, 10.0), np.full(40, 1e-3)]
    assert low_rank.energy_ranks(sigma, (0.9, 0.99, 0.999)) == [8]
    assert low_rank.ranks_for((96, 128), (0.25, 0.5, 0.75)) == [16, 32]
    assert low_rank.break_even_rank((96, 128)) == 54


# ------------------------------------------------------------------------------ the allocator


def test_a_weight_of_rank_r_is_split_at_rank_r_and_runs_within_the_bound(run_pass) -> None:
    w1 = _low_rank_weight(96, 128, 8, 0)
    x = _inputs(128, 3)
    model = _planned(_model(w1), [x])
    # 2 bits per weight: below any plain item (2-bit codes with their scales and zero points).
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=2.0, low_rank=True)), model)
    chosen = _weight(model, "W1")
    assert (chosen.get("form"), chosen.get("rank")) == ("split", 8)
    assert any(c.get("form") == "compensate" for c in chosen["candidates"])
    reference = b.run_ort(b.load(_model(w1)), {"x": x[:256]})[0]
    result = run_pass(SplitLowRankPass(), model)
    assert result.modified
    record = model.meta[low_rank.LOW_RANK_KEY]["W1"]
    assert record["form"] == "split" and record["rank"] == 8 and record["params_saved"] == 96 * 128 - 8 * 224
    assert "W1" not in model.graph.initializers  # the split weight is no longer stored
    assert not run_pass(SplitLowRankPass(), model).modified  # idempotent: nothing left to split
    InsertQDQPass()(model)
    assert len(b.nodes_of(model, "DequantizeLinear")) == 2 and len(b.nodes_of(model, "MatMul")) == 2
    got = b.run_ort(model, {"x": x[:256]})[0]
    # The output error is what the 8-bit factors and the dropped (noise) triples leave: far below
    # the 4-bit weight's that the budget would otherwise buy.
    q4 = quantize.quantize_matrix(w1, meta.QuantPlan("W1", "MatMul", (128, 96), 4, 32, False, "rtn", (96, 128)))[0]
    four = x[:256] @ q4.dequantize().T
    assert np.linalg.norm(got - reference) < 0.2 * np.linalg.norm(four - reference)
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.01


def test_a_weight_read_by_several_layers_is_replaced_in_every_one(run_pass) -> None:
    """One weight read by two MatMuls (cross-layer shared, as in ALBERT): its factors replace it
    in both, and the float weight is stored no more."""
    w = _low_rank_weight(96, 96, 8, 0)
    x = _inputs(96, 3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm2")]
    proto = b.make_model(nodes, [b.x_input(96)], [b.y_output(96)], {"W": np.ascontiguousarray(w.T)})
    model = _planned(proto, [np.concatenate([x, x @ w.T])])
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=2.0, low_rank=True)), model)
    assert _weight(model, "W").get("form") == "split"
    run_pass(SplitLowRankPass(), model)
    assert "W" not in model.graph.initializers
    assert all(n.inputs[1].name != "W" for n in model.graph)
    InsertQDQPass()(model)
    assert len(b.nodes_of(model, "MatMul")) == 4 and len(b.nodes_of(model, "DequantizeLinear")) == 2
    reference = b.run_ort(b.load(proto), {"x": x[:256]})[0]
    got = b.run_ort(model, {"x": x[:256]})[0]
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.02


def test_a_full_rank_weight_is_not_split(run_pass) -> None:
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((96, 128)).astype(np.float32)
    model = _planned(_model(w1), [_inputs(128, 4)])
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=3.5, low_rank=True)), model)
    chosen = _weight(model, "W1")
    assert chosen.get("form") != "split"
    assert any(c.get("form") == "split" for c in chosen["candidates"])  # offered, and priced out


def test_without_low_rank_no_forms_are_offered(run_pass) -> None:
    model = _planned(_model(_low_rank_weight(96, 128, 8, 0)), [_inputs(128, 3)])
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=3.5)), model)
    assert not any(c.get("form") for c in _weight(model, "W1")["candidates"])
    assert not run_pass(SplitLowRankPass(), model).modified


def test_compensation_fits_the_residual_of_the_weights_own_quantization(run_pass) -> None:
    """``Q(W) + L R`` on a weight with a strong low-rank part over noise: materialized as the
    quantized MatMul plus the factor pair added to its output, it computes what the allocator
    scored (ORT against ``x (Q(W) + L_q R_q)ᵀ``), closer to float than ``Q(W)`` alone."""
    rng = np.random.default_rng(7)
    w1 = (_low_rank_weight(96, 128, 4, 1, noise=0.0) * 4 + 0.1 * rng.standard_normal((96, 128))).astype(np.float32)
    x = _inputs(128, 6)
    model = _planned(_model(w1), [x])
    # Force the compensation item: 2-bit codes with a rank-16 correction.
    ref = next(qweights.iter_weights(model))
    plan = dataclasses.replace(ref.value.meta[meta.QUANT_KEY], bits=2)
    ref.value.meta[meta.QUANT_KEY] = plan
    ref.value.meta[meta.RANK_KEY] = meta.RankPlan("W1", "compensate", 16, 8, 32, False)
    q = quantize.quantize_matrix(w1, plan)[0].dequantize().astype(np.float64)
    factors = low_rank.compensation_factors(w1, q, _cov(x), [16], 8, 32, False)[16]
    run_pass(SplitLowRankPass(), model)
    InsertQDQPass()(model)
    assert [n.op_type for n in model.graph if n.op_type in ("MatMul", "Add")].count("Add") == 1
    assert model.graph.outputs[0].name == "y"
    feed = x[:128]
    got = b.run_ort(model, {"x": feed})[0]
    np.testing.assert_allclose(got, feed @ (q + factors.product).T.astype(np.float32), rtol=1e-3, atol=1e-3)
    exact = feed @ w1.T
    assert np.linalg.norm(got - exact) < 0.5 * np.linalg.norm(feed @ q.T - exact)


def test_compensation_items_beat_plain_items_of_the_same_bits_in_prediction(run_pass) -> None:
    rng = np.random.default_rng(8)
    w1 = (_low_rank_weight(96, 128, 4, 2, noise=0.0) * 4 + 0.1 * rng.standard_normal((96, 128))).astype(np.float32)
    model = _planned(_model(w1), [_inputs(128, 6)])
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=4.0, low_rank=True)), model)
    cands = _weight(model, "W1")["candidates"]
    plain2 = min(c["predicted_delta_loss"] for c in cands if c["bits"] == 2 and not c.get("form"))
    comp2 = [c for c in cands if c["bits"] == 2 and c.get("form") == "compensate"]
    assert comp2 and all(c["predicted_delta_loss"] < plain2 for c in comp2)
    assert all(c["bytes"] > min(d["bytes"] for d in cands if d["bits"] == 2 and not d.get("form")) for c in comp2)


def test_replay_reproduces_the_low_rank_forms(run_pass) -> None:
    """The allocation record replays (check-allocation, confirm-lossless) with its forms."""
    from hessc.passes import lossless

    w1 = _low_rank_weight(96, 128, 8, 0)
    proto = _model(w1)
    model = b.load_upgraded(proto)
    preplan_stats = Stats(a=_cov(_inputs(128, 3)), g=np.eye(96))
    next(qweights.iter_weights(model)).value.meta[meta.HESSIAN_KEY] = preplan_stats
    config = QuantConfig(bits=4, group_size=32)
    PlanQuantizationPass(config, snapshot=True)(model)
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=2.0, low_rank=True)), model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert record["rank_override"] == [["W1", "split", 8, 8]]
    assert record["bits_override"] == [["W1", allocate_bits.FLOAT_BITS]]
    replayed = lossless.replay(config, model.meta[meta.PREPLAN_KEY], record)
    assert replayed.meta[low_rank.LOW_RANK_KEY]["W1"]["rank"] == 8
    SplitLowRankPass()(model)
    InsertQDQPass()(model)
    feed = {"x": _inputs(128, 9, 64)}
    np.testing.assert_array_equal(b.run_ort(replayed, feed)[0], b.run_ort(model, feed)[0])

    # A correction that steps the weight back to a plain item: adopting its replay drops the
    # split's record (its factors would otherwise stay in the byte count).
    plain = {**record, "rank_override": [], "bits_override": [["W1", 4]]}
    lossless.adopt(model, lossless.replay(config, model.meta[meta.PREPLAN_KEY], plain))
    assert low_rank.LOW_RANK_KEY not in model.meta
    assert not any(n.endswith("_lr_left") for n in model.graph.initializers)
    lossless.adopt(model, replayed)
    assert model.meta[low_rank.LOW_RANK_KEY]["W1"]["rank"] == 8


# ------------------------------------------------------------------------------ refusals


def test_bad_low_rank_plans_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="rank >= 1"):
        meta.RankPlan("w", "split", 0, 8)
    with pytest.raises(ValueError, match="form"):
        meta.RankPlan("w", "shared", 8, 8)
    with pytest.raises(ValueError, match="factor bits"):
        meta.RankPlan("w", "split", 8, 5)
    with pytest.raises(InputError, match="split fractions"):
        AllocationConfig(budget_bits=3.0, low_rank=True, split_fractions=(1.5,))
    with pytest.raises(InputError, match="compensation ranks"):
        AllocationConfig(budget_bits=3.0, low_rank=True, compensation_ranks=(0,))
    model = _planned(_model(_low_rank_weight(96, 128, 8, 0)), [_inputs(128, 3)])
    ref = next(qweights.iter_weights(model))
    ref.value.meta[meta.RANK_KEY] = meta.RankPlan("W1", "split", 200, 8)
    with pytest.raises(ir.passes.PreconditionError, match="exceeds"):
        SplitLowRankPass()(model)
    ref.value.meta[meta.RANK_KEY] = meta.RankPlan("W1", "split", 8, 8)
    del ref.value.meta[meta.HESSIAN_KEY]
    with pytest.raises(ir.passes.PreconditionError, match="annotate-hessian"):
        SplitLowRankPass()(model)


def test_small_weights_get_no_low_rank_form() -> None:
    model = b.load_upgraded(_model(np.ones((32, 48), np.float32)))
    assert "smaller than" in low_rank.supports(next(qweights.iter_weights(model)))


@pytest.mark.parametrize("curvature", ["g", "g_diag", "layerwise", "none"])
def test_factored_scores_equal_the_scores_of_the_full_change(curvature: str) -> None:
    """The allocator scores low-rank items from r×r forms; they equal the full-matrix prediction
    and output error of the same change under every estimator."""
    rng = np.random.default_rng(5)
    out_dim, in_dim, rank = 24, 40, 6
    x = rng.standard_normal((200, in_dim))
    y = rng.standard_normal((out_dim, out_dim))
    a = x.T @ x / 200
    fields = {"a": a, "grad": rng.standard_normal((out_dim, in_dim)) * 0.01}
    if curvature == "g":
        fields["g"] = y @ y.T / out_dim
    elif curvature == "g_diag":
        fields["g_diag"] = rng.random(out_dim)
    elif curvature == "layerwise":
        fields["hutchinson_trace"] = 3.0
    stats = type("Stats", (), fields)()
    estimator = "layerwise" if curvature in ("layerwise", "none") else "kfac"
    w = rng.standard_normal((out_dim, in_dim))
    fixed = rng.standard_normal((out_dim, in_dim)) * 0.1
    left, right = rng.standard_normal((out_dim, rank)), rng.standard_normal((rank, in_dim)) * 0.1
    base = allocate_bits._output_energy(a, w)
    loss, first, rho = allocate_bits.LowRankScore(stats, estimator, fixed, base)(left, right)
    delta = fixed + left @ right
    want_loss, want_first = allocate_bits.predict_delta_loss(stats, delta, estimator)
    assert loss == pytest.approx(want_loss, rel=1e-9) and first == pytest.approx(want_first, rel=1e-9, abs=1e-12)
    assert rho == pytest.approx(allocate_bits._perturbation(a, delta, base), rel=1e-9)
    assert (first != 0.0) == (curvature != "none")  # the gradient term only in loss units
