"""Tests for hessc.passes.allocate_bits: AllocateBitsPass (grouped knapsack over bits × method).

The pass runs on tiny MLPs after plan-quantization, with synthetic Hessian statistics (any object
with the ``HessianStats`` attribute names), so the predictions are known in closed form and the
chosen allocation can be checked against brute force over the same items.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import builders as b
from hessc.errors import InputError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.passes import allocate_bits, hessian, quantize, quantizers
from hessc.passes.allocate_bits import AllocateBitsPass, AllocationConfig
from hessc.passes.quantize import PlanQuantizationPass, QuantConfig


@dataclasses.dataclass(frozen=True, eq=False)
class Stats:
    """Synthetic curvature statistics with the ``HessianStats`` field names."""

    a: np.ndarray | None = None
    g: np.ndarray | None = None
    g_diag: np.ndarray | None = None
    grad: np.ndarray | None = None
    hutchinson_trace: float | None = None
    lambda_max: float | None = None


def _mlp3(k: int = 64, seed: int = 0) -> onnx.ModelProto:
    """``y = relu(relu(x W1) W2) W3``: three 64×64 MatMul weights."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="mm2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W3"], ["y"], name="mm3"),
    ]
    inits = {f"W{i}": b.weight((k, k), seed + i) for i in (1, 2, 3)}
    return b.make_model(nodes, [b.x_input(k)], [b.y_output(k)], inits)


def _correlated_cov(n: int, seed: int, scale: float = 1.0, rank: int = 4) -> np.ndarray:
    """``E[x xᵀ]`` of inputs driven by a few latent factors (strongly correlated columns)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, rank)) @ rng.standard_normal((rank, n)) + 0.1 * rng.standard_normal((2048, n))
    return scale * (x.T @ x) / len(x)


def _planned(proto: onnx.ModelProto, stats: dict[str, Stats], group: int = 32):
    model = b.load_upgraded(proto)
    PlanQuantizationPass(QuantConfig(bits=4, group_size=group))(model)
    for ref in qweights.iter_weights(model):
        if ref.name in stats:
            ref.value.meta[meta.HESSIAN_KEY] = stats[ref.name]
    return model


def _plans(model) -> dict[str, meta.QuantPlan]:
    return {r.name: r.value.meta[meta.QUANT_KEY] for r in qweights.iter_weights(model) if meta.QUANT_KEY in r.value.meta}


def _identity_stats(scales: dict[str, float], n: int = 64, seed: int = 0) -> dict[str, Stats]:
    return {name: Stats(a=_correlated_cov(n, seed + i, s), g=np.eye(n)) for i, (name, s) in enumerate(scales.items())}


def _brute_force(weights: list[dict], feasible) -> float:
    best = math.inf
    for combo in itertools.product(*(w["candidates"] for w in weights)):
        if feasible(combo):
            best = min(best, sum(c["predicted_delta_loss"] for c in combo))
    return best


# ------------------------------------------------------------------------------ predictions


def test_kfac_prediction_matches_the_kronecker_form() -> None:
    rng = np.random.default_rng(0)
    m, n = 5, 7
    a, g = _correlated_cov(n, 1), _correlated_cov(m, 2)
    grad, delta = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    stats = Stats(a=a, g=g, grad=grad)
    vec = delta.reshape(-1, order="F")  # column-major vec: (A ⊗ G)
    expected = float(np.sum(grad * delta)) + 0.5 * vec @ np.kron(a, g) @ vec
    loss, first = allocate_bits.predict_delta_loss(stats, delta, "kfac")
    assert loss == pytest.approx(expected, rel=1e-10)
    assert first == pytest.approx(float(np.sum(grad * delta)), rel=1e-12)
    diag = Stats(a=a, g_diag=np.diag(g).copy(), grad=grad)
    expected_diag = float(np.sum(grad * delta)) + 0.5 * vec @ np.kron(a, np.diag(np.diag(g))) @ vec
    assert allocate_bits.predict_delta_loss(diag, delta, "kfac")[0] == pytest.approx(expected_diag, rel=1e-10)


def test_layerwise_prediction_is_scaled_to_loss_units() -> None:
    rng = np.random.default_rng(1)
    m, n = 4, 6
    a, g = _correlated_cov(n, 3), _correlated_cov(m, 4)
    delta = rng.standard_normal((m, n))
    gamma = np.trace(g) / m
    proxy = 0.5 * float(np.sum((delta @ a) * delta))
    assert allocate_bits.predict_delta_loss(Stats(a=a, g=g), delta, "layerwise")[0] == pytest.approx(gamma * proxy)
    # From a Hutchinson trace of the block A ⊗ γI: γ = tr(H) / (m tr A).
    traced = Stats(a=a, hutchinson_trace=2.5 * m * np.trace(a), grad=np.ones((m, n)))
    loss, first = allocate_bits.predict_delta_loss(traced, delta, "layerwise")
    assert loss == pytest.approx(2.5 * proxy + delta.sum())
    # No scale at all: the output-error proxy, and the gradient term (other units) is dropped.
    loss, first = allocate_bits.predict_delta_loss(Stats(a=a, grad=np.ones((m, n))), delta, "layerwise")
    assert (loss, first) == (pytest.approx(proxy), 0.0)


def test_auto_estimator_follows_the_annotation_and_falls_back() -> None:
    with_g, without_g = Stats(a=np.eye(2), g=np.eye(2)), Stats(a=np.eye(2))
    assert allocate_bits.resolve_estimator("auto", with_g, None) == "kfac"
    assert allocate_bits.resolve_estimator("auto", with_g, "layerwise") == "layerwise"
    assert allocate_bits.resolve_estimator("auto", without_g, "kfac") == "layerwise"
    assert allocate_bits.resolve_estimator("kfac", without_g, None) == "layerwise"


# ------------------------------------------------------------------------------ the pass


def test_budget_is_respected_in_stored_bytes_and_optimal(run_pass) -> None:
    stats = _identity_stats({"W1": 10.0, "W2": 1.0, "W3": 0.1})
    model = _planned(_mlp3(), stats)
    config = AllocationConfig(budget_bits=3.5)
    result = run_pass(AllocateBitsPass(config), model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    numel = 3 * 64 * 64
    budget = 3.5 / 8 * numel
    plans = _plans(model)
    used = sum(quantize.stored_bytes(p, 4) for p in plans.values())
    assert used == record["used_bytes"] <= budget
    assert record["effective_bits"] == pytest.approx(8 * used / numel, abs=1e-4) and record["effective_bits"] <= 3.5
    best = _brute_force(record["weights"], lambda combo: sum(c["bytes"] for c in combo) <= budget)
    assert record["predicted_delta_loss"] == pytest.approx(best, rel=1e-12)
    assert result.modified == any(p.bits != 4 or p.method != "rtn" for p in plans.values())
    # The plans carry the chosen bits and methods; 3-bit costs its 4-bit container.
    for w in record["weights"]:
        assert (plans[w["name"]].bits, plans[w["name"]].method) == (w["bits"], w["method"])
        by = {(c["bits"], c["method"]): c["bytes"] for c in w["candidates"]}
        assert by[(3, "rtn")] == by[(4, "rtn")]
    assert not run_pass(AllocateBitsPass(config), model).modified  # idempotent


@pytest.mark.parametrize("kernel_layout", [True, False])
def test_kernel_layout_prices_3_bit_items_at_3_bits(run_pass, kernel_layout: bool) -> None:
    """On cpu/cuda a 3-bit item costs 3 bits per code, so a 4.2-bit budget (group 32, fp32 scales:
    3-bit items are 4.125 effective bits, 4-bit ones 5.125) is met by 3 bits everywhere; in the
    portable form's 4-bit container it is not."""
    stats = _identity_stats({"W1": 1.0, "W2": 1.0, "W3": 1.0})
    model = _planned(_mlp3(), stats)
    config = AllocationConfig(budget_bits=4.2, methods=("rtn",), kernel_layout=kernel_layout)
    run_pass(AllocateBitsPass(config), model)
    weights = model.meta[allocate_bits.ALLOCATION_KEY]["weights"]
    scales_and_zps = 64 * 2 * 4 + 64 * 1  # 2 blocks a row: fp32 scales, 2 zero points in a byte
    for w in weights:
        by = {c["bits"]: c["bytes"] for c in w["candidates"]}
        assert by[3] == (64 * 64 * 3 // 8 if kernel_layout else 64 * 64 // 2) + scales_and_zps
        assert by[4] == 64 * 64 // 2 + scales_and_zps
    assert ({w["bits"] for w in weights} == {3}) == kernel_layout


def test_more_sensitive_layers_get_more_bits(run_pass) -> None:
    stats = _identity_stats({"W1": 100.0, "W2": 1.0, "W3": 0.01})
    model = _planned(_mlp3(), stats)
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=4.5, methods=("rtn",))), model)
    bits = {w["name"]: w["bits"] for w in model.meta[allocate_bits.ALLOCATION_KEY]["weights"]}
    assert bits["W1"] >= bits["W2"] >= bits["W3"]
    assert bits["W1"] > bits["W3"]


def test_gptq_is_predicted_better_than_rtn_on_correlated_inputs(run_pass) -> None:
    stats = _identity_stats({"W1": 1.0, "W2": 1.0, "W3": 1.0})
    model = _planned(_mlp3(), stats)
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=4.5)), model)
    for w in model.meta[allocate_bits.ALLOCATION_KEY]["weights"]:
        loss = {(c["bits"], c["method"]): c["predicted_delta_loss"] for c in w["candidates"]}
        for bits in (2, 3, 4):
            assert loss[(bits, "gptq")] < loss[(bits, "rtn")]
        assert w["method"] == "gptq"


def _mbconv(c: int = 64, hidden: int = 128) -> onnx.ModelProto:
    """An inverted-residual block: 1×1 expand conv, depthwise 3×3, 1×1 project conv (MobileNetV2)."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h1"], name="expand"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["h2"], name="depthwise", group=hidden, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3"], ["y"], name="project"),
    ]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", c, 6, 6])
    inits = {"W1": b.weight((hidden, c, 1, 1), 1), "W2": b.weight((hidden, 1, 3, 3), 2),
             "W3": b.weight((c, hidden, 1, 1), 3)}
    return b.make_model(nodes, [x], [b.y_output(None)], inits)


def test_conv_weights_are_allocated_at_their_stored_bytes(run_pass) -> None:
    """Conv items cost what the portable graph stores: 1×1 convs in blocks of 32 input channels,
    the depthwise conv with one scale and zero point per 9 weights (its 4-bit item costs 8 bits per
    weight); the allocation meets the budget in those bytes and is the knapsack's optimum."""
    stats = {"W1": Stats(a=_correlated_cov(64, 1), g=np.eye(128)), "W2": Stats(a=_correlated_cov(9, 2), g=np.eye(128)),
             "W3": Stats(a=_correlated_cov(128, 3), g=np.eye(64))}
    model = _planned(_mbconv(), stats)
    numel = 2 * 64 * 128 + 128 * 9
    config = AllocationConfig(budget_bits=3.5)
    assert run_pass(AllocateBitsPass(config), model).modified
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert [w["name"] for w in record["weights"]] == ["W1", "W2", "W3"] and record["allocated_params"] == numel
    plans = _plans(model)
    assert {n: p.group_size for n, p in plans.items()} == {"W1": 32, "W2": 0, "W3": 32}
    for w in record["weights"]:
        assert (plans[w["name"]].bits, plans[w["name"]].method) == (w["bits"], w["method"])
    depthwise = {(c["bits"], c["method"]): c["bytes"] for c in record["weights"][1]["candidates"]}
    assert 8 * depthwise[(4, "rtn")] / (128 * 9) == 8.0  # 576 code + 512 scale + 64 zero-point bytes
    budget = 3.5 / 8 * numel
    assert record["used_bytes"] <= budget and record["effective_bits"] <= 3.5
    best = _brute_force(record["weights"], lambda combo: sum(c["bytes"] for c in combo) <= budget)
    assert record["predicted_delta_loss"] == pytest.approx(best, rel=1e-12)
    # The bytes the allocator counted are the bytes the Q/DQ graph stores. GPTQ reads its Hessian
    # from HessianStats on the weight: the synthetic A (no weighted covariance, so exactly A).
    for ref in qweights.iter_weights(model):
        meta.set_annotation(ref.value, meta.HESSIAN_KEY, meta.HessianStats(samples=1, a=stats[ref.name].a))
    run_pass(quantize.InsertQDQPass(), model)
    dqs = b.nodes_of(model, "DequantizeLinear")
    assert len(dqs) == 3
    assert sum(int(v.const_value.nbytes) for dq in dqs for v in dq.inputs) == record["used_bytes"]


def test_conv_weights_are_not_allocated_where_the_target_keeps_them_float(run_pass) -> None:
    model = b.load_upgraded(b.make_model(
        [helper.make_node("Conv", ["x", "C"], ["c"], name="conv"), helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 64, 1, 1])], [b.y_output(64)],
        {"C": b.weight((64, 64, 1, 1), 0), "W": b.weight((64, 64), 1)},
    ))
    PlanQuantizationPass(QuantConfig(bits=4, quantize_conv=False))(model)
    for ref in qweights.iter_weights(model):
        ref.value.meta[meta.HESSIAN_KEY] = Stats(a=_correlated_cov(64, 0), g=np.eye(64))
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=3.5)), model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert [w["name"] for w in record["weights"]] == ["W"] and set(_plans(model)) == {"W"}


def test_budget_below_the_smallest_items_names_the_minimum() -> None:
    model = _planned(_mlp3(), _identity_stats({"W1": 1.0, "W2": 1.0, "W3": 1.0}))
    smallest = meta.QuantPlan("W", "MatMul", (64, 64), 2, 32, False, "rtn", (64, 64))
    min_bits = 8 * quantize.stored_bytes(smallest, 4) / (64 * 64)
    with pytest.raises(InputError, match=f"{min_bits:.4f} bits per weight"):
        AllocateBitsPass(AllocationConfig(budget_bits=2.0))(model)
    with pytest.raises(InputError, match="--budget-bytes 100 is below"):
        AllocateBitsPass(AllocationConfig(budget_bytes=100))(model)


def test_budget_at_float_size_is_an_honest_no_op(run_pass) -> None:
    model = _planned(_mlp3(), _identity_stats({"W1": 1.0, "W2": 1.0, "W3": 1.0}))
    assert run_pass(AllocateBitsPass(AllocationConfig(budget_bits=32)), model).modified
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert "nothing to compress" in record["note"]
    assert _plans(model) == {}
    assert all(w["bits"] == allocate_bits.FLOAT_BITS for w in record["weights"])
    assert model.meta["hessc.skipped"]["W1"] == "kept in float by the bit allocator"


def test_lossless_picks_the_cheapest_allocation_predicted_not_worse(run_pass) -> None:
    # W1's gradient points against its 4-bit RTN error: quantizing W1 is predicted to *lower* the
    # loss, which pays for quantizing some of the others; W3 has no gradient.
    probe = _planned(_mlp3(), {})
    w1 = next(r for r in qweights.iter_weights(probe) if r.name == "W1").matrix()
    plan4 = meta.QuantPlan("W1", "MatMul", (64, 64), 4, 32, False, "rtn", (64, 64))
    q, _ = quantize.quantize_matrix(w1, plan4)
    err = q.dequantize() - w1
    stats = _identity_stats({"W1": 1.0, "W2": 1.0, "W3": 1.0})
    stats["W1"] = dataclasses.replace(stats["W1"], grad=-200.0 * err / np.sum(err * err))
    stats["W2"] = dataclasses.replace(stats["W2"], grad=np.zeros((64, 64)))
    model = _planned(_mlp3(), stats)
    assert run_pass(AllocateBitsPass(AllocationConfig(lossless=True)), model).modified
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert record["predicted_delta_loss"] <= 0
    assert any(c["predicted_delta_loss"] < 0 for w in record["weights"] for c in w["candidates"])
    chosen = {w["name"]: w for w in record["weights"]}
    assert chosen["W1"]["bits"] != allocate_bits.FLOAT_BITS
    assert chosen["W2"]["bits"] != allocate_bits.FLOAT_BITS  # paid for by W1's negative term
    # Cheapest among the selections with Σ predicted ≤ 0 (brute force over the same items).
    cheapest = min(
        sum(c["bytes"] for c in combo)
        for combo in itertools.product(*(w["candidates"] for w in record["weights"]))
        if sum(c["predicted_delta_loss"] for c in combo) <= 0
    )
    assert record["used_bytes"] == cheapest


def test_lossless_needs_curvature_in_loss_units() -> None:
    model = _planned(_mlp3(), {n: Stats(a=np.eye(64)) for n in ("W1", "W2", "W3")})
    with pytest.raises(InputError, match="loss units"):
        AllocateBitsPass(AllocationConfig(lossless=True))(model)


def test_weights_without_a_keep_their_uniform_plan(run_pass) -> None:
    model = _planned(b.mlp_model(), {"W1": Stats(a=_correlated_cov(64, 0), g=np.eye(64)), "W2": Stats(g=np.eye(32))})
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=4.5)), model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert [w["name"] for w in record["weights"]] == ["W1"] and record["not_allocated"] == ["W2"]
    assert _plans(model)["W2"].bits == 4
    # The budget covers W2's fixed bytes too: the bits over both weights stay within it.
    assert record["planned_effective_bits"] <= 4.5 < record["outside_budget"][0]["bytes"] * 8 / 2048
    with pytest.raises(InputError, match="fixed form"):  # W2 alone takes 5.1 bits of a 3.5-bit budget
        AllocateBitsPass(AllocationConfig(budget_bits=3.5))(_planned(
            b.mlp_model(), {"W1": Stats(a=_correlated_cov(64, 0), g=np.eye(64)), "W2": Stats(g=np.eye(32))}))
    with pytest.raises(Exception, match="annotate-hessian"):
        AllocateBitsPass(AllocationConfig(budget_bits=3.0))(_planned(b.mlp_model(), {}))


def test_config_validation() -> None:
    with pytest.raises(InputError, match="exactly one budget"):
        AllocationConfig(budget_bits=3.0, lossless=True)
    with pytest.raises(InputError, match="exactly one budget"):
        AllocationConfig()
    with pytest.raises(InputError, match="estimator"):
        AllocationConfig(budget_bits=3.0, estimator="magic")
    with pytest.raises(InputError, match="--bits 5"):
        AllocationConfig(budget_bits=3.0, candidate_bits=(5,))


def test_step_up_moves_the_worst_layers_one_level() -> None:
    model = _planned(_mlp3(), _identity_stats({"W1": 100.0, "W2": 1.0, "W3": 0.01}))
    config = AllocationConfig(budget_bits=3.2, methods=("rtn",))
    AllocateBitsPass(config)(model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    before = {w["name"]: w for w in record["weights"]}
    after = {w["name"]: w for w in allocate_bits.step_up(record, config.candidate_bits, fraction=0.1)}
    worst = max(before.values(), key=lambda w: w["predicted_delta_loss"])["name"]
    assert before[worst]["bits"] == 2 and after[worst]["bits"] == 4  # 3-bit is no level: same bytes
    assert all(after[n]["bits"] == before[n]["bits"] for n in before if n != worst)
    for w in after.values():
        w["bits"] = allocate_bits.FLOAT_BITS
    assert allocate_bits.step_up({"weights": list(after.values())}, config.candidate_bits) is None


def test_step_up_ranks_by_damage_not_by_a_gradient_gain() -> None:
    def entry(name: str, bits: int, quadratic: float, first: float) -> dict:
        cands = [{"bits": b, "method": "rtn", "bytes": b * 100, "predicted_delta_loss": quadratic / 4 ** (b - bits) + first,
                  "first_order": first} for b in (2, 4, 8)]
        return {"name": name, "shape": [10, 80], "bits": bits, "method": "rtn", "bytes": bits * 100,
                "predicted_delta_loss": quadratic + first, "candidates": cands}

    # "noisy" predicts a gain (gradient term -5 beats curvature 1); "small" a loss of 0.01.
    record = {"weights": [entry("noisy", 2, 1.0, -5.0), entry("small", 8, 0.01, 0.0)]}
    after = {w["name"]: w for w in allocate_bits.step_up(record, (2, 4, 8), fraction=0.5)}
    assert after["noisy"]["bits"] == 4 and after["small"]["bits"] == 8


def test_gptq_items_are_fitted_on_one_half_and_scored_on_the_other(monkeypatch) -> None:
    fit, check = _correlated_cov(64, 1), _correlated_cov(64, 2)
    stats = {"W1": meta.HessianStats(samples=10, a=(fit + check) / 2, a_fit=fit, a_check=check, g=np.eye(64))}
    model = _planned(_mlp3(), stats)
    seen = []
    original = allocate_bits.predict_delta_loss
    monkeypatch.setattr(allocate_bits, "predict_delta_loss",
                        lambda st, d, e: seen.append(st.a) or original(st, d, e))
    fitted = []
    real_gptq = quantizers.gptq
    monkeypatch.setattr(quantizers, "gptq", lambda W, H, *a, **k: fitted.append(H) or real_gptq(W, H, *a, **k))
    # W2 and W3 have no statistics: their 4-bit plans take 5.1 of the budget's bits.
    AllocateBitsPass(AllocationConfig(budget_bits=4.8, methods=("rtn", "gptq"), candidate_bits=(2, 4)))(model)
    assert len(seen) == 4 and sum(a is check for a in seen) == 2  # the two GPTQ items
    assert sum(a is stats["W1"].a for a in seen) == 2  # RTN items: no fit, the whole A
    h = hessian.gptq_hessian(dataclasses.replace(stats["W1"], a=fit))
    assert len(fitted) == 2 and all(np.array_equal(f, h) for f in fitted)


def test_directed_rounding_items_are_directed_by_one_half_and_scored_on_the_other(monkeypatch) -> None:
    rng = np.random.default_rng(4)
    fit, check = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    a = _correlated_cov(64, 1)
    stats = {"W1": meta.HessianStats(samples=10, a=a, g=np.eye(64), grad=(fit + check) / 2, grad_fit=fit, grad_check=check),
             "W2": meta.HessianStats(samples=10, a=a, g=np.eye(64), grad=fit.copy())}  # no halves: no rtn-grad items
    model = _planned(_mlp3(), stats)
    scored = []
    original = allocate_bits.predict_delta_loss
    monkeypatch.setattr(allocate_bits, "predict_delta_loss", lambda st, d, e: scored.append(st.grad) or original(st, d, e))
    config = AllocationConfig(lossless=True, methods=("rtn", "rtn-grad"), candidate_bits=(2, 4, 8))
    AllocateBitsPass(config)(model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    items = {w["name"]: {(c["bits"], c["method"]) for c in w["candidates"]} for w in record["weights"]}
    assert items["W1"] == {(2, "rtn"), (4, "rtn"), (8, "rtn"), (4, "rtn-grad"), (8, "rtn-grad"), (32, "float")}
    assert items["W2"] == {(2, "rtn"), (4, "rtn"), (8, "rtn"), (32, "float")}
    assert sum(g is check for g in scored) == 2 and not any(g is fit for g in scored)
    # The item's first-order term is the odd feeds' gradient against rounding the even feeds' chose.
    w1 = next(r for r in qweights.iter_weights(model) if r.name == "W1").matrix()
    directed = quantizers.rtn(w1, 8, 32, False, fit, quantize.DIRECTED_MARGIN[8]).dequantize() - w1
    entry = next(c for w in record["weights"] if w["name"] == "W1" for c in w["candidates"]
                 if (c["bits"], c["method"]) == (8, "rtn-grad"))
    assert entry["first_order"] == pytest.approx(float(np.sum(check * directed)), rel=1e-9)
    nearest = quantizers.rtn(w1, 8, 32).dequantize() - w1
    assert np.sum(fit * directed) < np.sum(fit * nearest)


def test_rtn_grad_plans_are_quantized_with_the_whole_gradient() -> None:
    rng = np.random.default_rng(5)
    grad = rng.standard_normal((64, 64))
    replay = QuantConfig(bits=4, group_size=32, method_override=(("W1", "rtn-grad"),), bits_override=(("W1", 8),))
    model = b.load_upgraded(_mlp3())
    PlanQuantizationPass(replay)(model)
    w1_ref = next(r for r in qweights.iter_weights(model) if r.name == "W1")
    w1 = w1_ref.matrix()
    with pytest.raises(ir.passes.PreconditionError, match="W1: rtn-grad needs Hessian statistics"):  # no annotation
        quantize.InsertQDQPass()(model)
    meta.set_annotation(w1_ref.value, meta.HESSIAN_KEY, meta.HessianStats(samples=1, a=np.eye(64)))
    with pytest.raises(InputError, match="needs the loss gradient"):  # statistics without a gradient
        quantize.InsertQDQPass()(model)
    model = b.load_upgraded(_mlp3())
    PlanQuantizationPass(replay)(model)
    w1_ref = next(r for r in qweights.iter_weights(model) if r.name == "W1")
    meta.set_annotation(w1_ref.value, meta.HESSIAN_KEY, meta.HessianStats(grad=grad))
    quantize.InsertQDQPass()(model)
    codes = next(v for v in model.graph.initializers.values() if v.name == "W1_q").const_value.numpy()
    expected = quantizers.rtn(w1, 8, 32, False, grad, quantize.DIRECTED_MARGIN[8]).codes
    np.testing.assert_array_equal(codes.T, expected)  # MatMul stores (in, out)
    assert not np.array_equal(expected, quantizers.rtn(w1, 8, 32).codes)


def test_items_beyond_the_trust_radius_only_when_the_budget_needs_them() -> None:
    stats = _identity_stats({"W1": 1e4, "W2": 1.0, "W3": 1e-6})

    def allocate(budget: float, radius) -> dict:
        model = _planned(_mlp3(), stats)
        AllocateBitsPass(AllocationConfig(budget_bits=budget, methods=("rtn",), trust_radius=radius))(model)
        return model.meta[allocate_bits.ALLOCATION_KEY]

    # Unrestricted, the flat W3 pays for 8-bit elsewhere with 2-bit codes (ρ ≈ 0.4: beyond 0.3).
    free = allocate(6.0, None)
    assert any(c["perturbation"] > 0.3 for w in free["weights"] for c in w["candidates"] if c["bits"] == w["bits"])
    kept = allocate(6.0, 0.3)
    chosen = {w["name"]: next(c for c in w["candidates"] if c["bits"] == w["bits"]) for w in kept["weights"]}
    # Beyond the radius only where the predicted damage is negligible: W3 (curvature 1e-6 of the
    # median layer's) may take 2-bit codes, W2 (the median) may not.
    assert chosen["W2"]["perturbation"] <= 0.3 or chosen["W2"]["bits"] >= 8
    assert "note" not in kept
    four = {w["name"]: next(c for c in w["candidates"] if c["bits"] == 4) for w in kept["weights"]}
    negligible = allocate_bits.NEGLIGIBLE_SHARE * four["W2"]["predicted_delta_loss"]
    for name, c in chosen.items():
        assert c["perturbation"] <= 0.3 or c["bits"] >= 8 or c["predicted_delta_loss"] <= negligible, name
    assert kept["trust_radius"] == 0.3
    # A budget only 2-bit items meet: admitted, and said so.
    tight = allocate(3.1, 0.3)
    assert {w["bits"] for w in tight["weights"]} == {2} and "beyond it" in tight["note"]


# ------------------------------------------------------------------------------ the facade

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def mlp_and_calibration():
    """A torch MLP (static batch 16) and correlated calibration inputs: 4 latent factors."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)
    )
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4, 64))
    feeds = [{"input": (rng.standard_normal((16, 4)) @ latent + 0.05 * rng.standard_normal((16, 64))).astype(np.float32)}
             for _ in range(12)]
    from hessc.ir import frontend

    return frontend.load(module, (torch.randn(16, 64),)), feeds


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path / "cache"))


@pytest.mark.torch
def test_optimize_with_a_fractional_bit_budget(mlp_and_calibration) -> None:
    import hessc

    model, feeds = mlp_and_calibration
    out = hessc.optimize(model, target="onnx", bits=3.5, calibration=feeds, method="gptq")
    record = meta.read_plan(out)
    s = record["summary"]
    assert s["budget_bits"] == 3.5 and s["allocated_effective_bits"] <= 3.5
    assert s["effective_bits_per_weight"] <= 3.5
    assert record["verification"]["status"] == "passed"
    assert {w["bits"] for w in record["weights"]} <= {2, 3, 4, 8}
    # Low-rank factors are weights of their own, predicted with the weight they stand for.
    assert all(("predicted_delta_loss" in w or "low_rank_of" in w) and w["method"] in ("rtn", "gptq")
               for w in record["weights"])
    assert s["predicted_delta_loss"] == pytest.approx(sum(w["predicted_delta_loss"] for w in record["allocation"]["weights"]))


def _latent_feeds(dtype, count: int = 8) -> list[dict[str, np.ndarray]]:
    """``x`` [16, 64] batches on 4 latent directions plus a little noise."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4, 64))
    return [{"x": (rng.standard_normal((16, 4)) @ latent + 0.05 * rng.standard_normal((16, 64))).astype(dtype)}
            for _ in range(count)]


@pytest.mark.torch
def test_a_budget_holds_in_the_file_for_gemm_weights_stored_in_by_out() -> None:
    """GPT-2's Conv1D layers export as ``Gemm(x, W[in, out])`` (no transB): on the cpu target
    their codes, 3-bit ones included, are stored as the allocator priced them (MatMulNBits, 3-bit
    codes at 3 bits), so the file's effective bits are the allocation's."""
    import hessc

    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2")]
    inits = {"W1": b.weight((64, 128), 1), "b1": b.weight((128,), 2), "W2": b.weight((128, 64), 3, 0.1)}
    proto = b.make_model(nodes, [b.x_input(64)], [b.y_output(64)], inits)
    feeds = _latent_feeds(np.float32)
    out = hessc.optimize(b.load(proto), target="cpu", bits=3.5, calibration=feeds, low_rank=False)
    s = meta.read_plan(out)["summary"]
    assert s["effective_bits_per_weight"] == pytest.approx(s["planned_effective_bits"], abs=0.01)
    assert s["effective_bits_per_weight"] <= 3.5 and "stored_over_plan_bits" not in s
    assert s["planned_quantized_params"] == 2 * 64 * 128 and "priced_params_in_float" not in s
    assert [n.op_type for n in out.graph].count("MatMulNBits") == 2


@pytest.mark.torch
def test_a_float16_model_is_priced_with_float16_scales() -> None:
    """A float16 model stores its scales in float16: priced so, a 4.7-bit budget buys both
    weights 4-bit codes (4.625 bits each with their scales and zero points); priced at 4 bytes
    a scale, one of them would get 2 bits and the file 3.6 bits."""
    import hessc
    from onnxruntime.transformers.float16 import convert_float_to_float16

    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    inits = {"W1": b.weight((64, 128), 1), "W2": b.weight((128, 64), 3, 0.1)}
    proto = convert_float_to_float16(b.make_model(nodes, [b.x_input(64)], [b.y_output(64)], inits), keep_io_types=False)
    feeds = _latent_feeds(np.float16)
    out = hessc.optimize(b.load(proto), target="onnx", bits=4.7, calibration=feeds, low_rank=False)
    s = meta.read_plan(out)["summary"]
    assert s["effective_bits_per_weight"] == s["planned_effective_bits"] == 4.625


def test_a_file_above_its_planned_bits_is_reported(caplog) -> None:
    from hessc import api

    summary = {"planned_effective_bits": 3.47, "effective_bits_per_weight": 3.97}
    with caplog.at_level("WARNING"):
        api._check_stored_bits(summary, 1000)
    assert summary["stored_over_plan_bits"] == 0.5 and "pricing bug" in caplog.text
    within = {"planned_effective_bits": 3.47, "effective_bits_per_weight": 3.48, "planned_quantized_params": 1000}
    api._check_stored_bits(within, 1000)
    assert "stored_over_plan_bits" not in within and "priced_params_in_float" not in within
    floated = {"planned_quantized_params": 1000}
    api._check_stored_bits(floated, 900)
    assert floated["priced_params_in_float"] == 100


@pytest.mark.torch
def test_optimize_allocates_conv_weights_on_the_portable_target(monkeypatch) -> None:
    """End to end on an inverted-residual block: curvature through the torch executor for convs,
    GPTQ and RTN items for the 1×1 and depthwise weights, and the budget met in the bytes the saved
    Q/DQ graph stores; on the cpu target convs are static int8, with nothing to allocate."""
    import hessc

    feeds = [{"x": b.images(2, 64, 6, seed)} for seed in range(6)]
    out = hessc.optimize(b.load(_mbconv()), target="onnx", bits=3.5, group_size=32, calibration=feeds, method="gptq")
    record = meta.read_plan(out)
    s = record["summary"]
    assert {w["name"]: w["op"] for w in record["weights"]} == {"W1": "Conv", "W2": "Conv", "W3": "Conv"}
    assert {w["name"] for w in record["allocation"]["weights"]} == {"W1", "W2", "W3"}
    assert s["effective_bits_per_weight"] == s["allocated_effective_bits"] <= 3.5
    assert record["verification"]["status"] == "passed"
    # On the cpu target convs are static int8 kernels, 8 bits, whatever the budget: 3.5 bits is
    # refused with the reason (before any curvature is measured), and a budget that holds them is
    # met with nothing to allocate.
    from hessc.passes.hessian.annotate import AnnotateHessianPass

    with monkeypatch.context() as m:
        m.setattr(AnnotateHessianPass, "call", lambda self, model: pytest.fail("annotated before refusing"))
        with pytest.raises(InputError, match="fixed form on this target"):
            hessc.optimize(b.load(_mbconv()), target="cpu", bits=3.5, group_size=32, calibration=feeds)
    out = hessc.optimize(b.load(_mbconv()), target="cpu", bits=9.5, group_size=32, calibration=feeds)
    record = meta.read_plan(out)
    outside = record["allocation"]["outside_budget"]
    assert outside and all(w["bits"] == 8 and "static int8" in w["reason"] for w in outside)
    assert record["allocation"]["weights"] == []
    assert {w["bits"] for w in record["weights"]} == {8}
    assert record["verification"]["status"] == "passed"


@pytest.mark.torch
def test_gptq_beats_rtn_at_four_bits_on_correlated_data(mlp_and_calibration) -> None:
    import hessc

    model, feeds = mlp_and_calibration
    errors = {}
    for method in ("rtn", "gptq"):
        out = hessc.optimize(model, target="onnx", bits=4, calibration=feeds, method=method)
        record = meta.read_plan(out)
        assert {w["method"] for w in record["weights"]} == {method}
        errors[method] = record["verification"]["vs_float"]["rel_error"]
    assert errors["gptq"] < errors["rtn"]


def _torch_mlp(*dims: int):
    """``Linear → ReLU → … → Linear`` over ``dims``: the module, its ONNX model, 8 feeds of 16 rows."""
    from hessc.ir import frontend

    torch.manual_seed(1)
    layers: list = []
    for i, (a, b_) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [torch.nn.ReLU()] if i else []
        layers.append(torch.nn.Linear(a, b_))
    module = torch.nn.Sequential(*layers)
    model = frontend.load(module, (torch.randn(16, dims[0]),))
    rng = np.random.default_rng(2)
    feeds = [{"input": rng.standard_normal((16, dims[0])).astype(np.float32)} for _ in range(8)]
    return module, model, feeds, rng


@pytest.mark.torch
def test_lossless_is_confirmed_on_held_out_data() -> None:
    import hessc

    _, model, feeds, rng = _torch_mlp(64, 128, 64, 16)
    labels = [rng.integers(0, 16, 16) for _ in range(8)]
    out = hessc.optimize(model, target="onnx", bits="lossless", calibration=feeds, labels=labels, method="gptq")
    s = meta.read_plan(out)["summary"]
    assert s["allocation_mode"] == "lossless"
    assert s["heldout_loss_quantized"] <= s["heldout_loss_fp32"]
    assert isinstance(s["steps"], list)
    with pytest.raises(InputError, match="lossless needs a loss"):
        hessc.optimize(model, target="onnx", bits="lossless", calibration=feeds)


@pytest.mark.torch
def test_lossless_with_gradient_directed_rounding() -> None:
    import hessc

    _, model, feeds, rng = _torch_mlp(64, 128, 64)
    labels = [rng.integers(0, 64, 16) for _ in range(8)]
    out = hessc.optimize(model, target="onnx", bits="lossless", calibration=feeds, labels=labels, rounding="gradient")
    plan = meta.read_plan(out)
    s = plan["summary"]
    assert s["heldout_loss_quantized"] <= s["heldout_loss_fp32"]
    offered = {(c["bits"], c["method"]) for w in plan["allocation"]["weights"] for c in w["candidates"]}
    assert {(4, "rtn-grad"), (8, "rtn-grad")} <= offered and not any(m == "rtn-grad" and b in (2, 3) for b, m in offered)
    plain = hessc.optimize(model, target="onnx", bits="lossless", calibration=feeds, labels=labels)
    assert all(c["method"] != "rtn-grad" for w in meta.read_plan(plain)["allocation"]["weights"] for c in w["candidates"])
    with pytest.raises(InputError, match="chosen by the bit allocator"):
        hessc.optimize(model, target="onnx", bits=4, calibration=feeds, rounding="gradient")
    with pytest.raises(InputError, match="unknown rounding"):
        hessc.optimize(model, target="onnx", bits="lossless", calibration=feeds, labels=labels, rounding="up")


@pytest.mark.torch
def test_lossless_with_a_task_loss_checks_that_loss_on_held_out_feeds() -> None:
    import hessc

    module, model, feeds, _ = _torch_mlp(64, 128, 32)
    calls = []

    def pair_loss(outputs: dict, feed: dict) -> torch.Tensor:
        """Contrastive: row i of the first half must match row i of the second half."""
        (y,) = outputs.values()
        calls.append(feed["input"].shape)
        return torch.nn.functional.cross_entropy(y[:8] @ y[8:].T, torch.arange(8))

    out = hessc.optimize(model, target="onnx", bits="lossless", calibration=feeds, loss=pair_loss)
    s = meta.read_plan(out)["summary"]
    fp32 = float(np.mean([float(pair_loss({"y": torch.from_numpy(module(torch.from_numpy(f["input"])).detach().numpy())
                                           .double()}, f)) for f in feeds[6:]]))
    assert s["heldout_loss_fp32"] == pytest.approx(fp32, rel=1e-4)  # the held-out quarter, through the task loss
    assert s["heldout_loss_quantized"] <= s["heldout_loss_fp32"] and s["lossless_confirmed"]
    assert calls, "the task loss drives the curvature statistics and the check"


@pytest.mark.torch
def test_budgets_need_calibration(mlp_and_calibration) -> None:
    import hessc

    model, _ = mlp_and_calibration
    with pytest.raises(InputError, match="needs calibration"):
        hessc.optimize(model, target="onnx", bits=3.5)
    with pytest.raises(InputError, match="needs calibration"):
        hessc.optimize(model, target="onnx", bits=4, method="gptq")
    with pytest.raises(InputError, match="'lossless'"):
        hessc.optimize(model, target="onnx", bits="many")


def _two_paths_model() -> "ir.Model":
    """``y = x W1 + (0.001 x) W2``: two same-shaped weights, the second behind an input 1000×
    smaller, so its quantization error reaches the output 1000× attenuated."""
    from onnx import helper

    nodes = [
        helper.make_node("Mul", ["x", "small"], ["xs"], name="attenuate"),
        helper.make_node("MatMul", ["x", "W1"], ["y1"], name="mm1"),
        helper.make_node("MatMul", ["xs", "W2"], ["y2"], name="mm2"),
        helper.make_node("Add", ["y1", "y2"], ["y"], name="add"),
    ]
    inits = {"small": np.array(1e-3, dtype=np.float32),
             "W1": b.weight((128, 64), 0, scale=0.09), "W2": b.weight((128, 64), 1, scale=0.09)}
    return b.load(b.make_model(nodes, [b.x_input(128)], [b.y_output(64)], inits))


def test_a_budget_is_spent_where_the_loss_is_sensitive() -> None:
    """At 5.5 bits the insensitive weight's 2-bit item is far outside its own layer's trust radius
    (relative layer-output error ≈ 0.45), but its effect on the model is 1000× attenuated: the
    neighbourhood is judged by the predicted effect on the loss, so the budget buys 8 bits for
    the sensitive weight instead of leaving both at 4 bits with the budget unspent."""
    import hessc

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((16, 128)).astype(np.float32)} for _ in range(8)]
    out = hessc.optimize(_two_paths_model(), target="onnx", bits=5.5, group_size=128, calibration=feeds)
    plan = meta.read_plan(out)
    bits = {w["name"]: w["bits"] for w in plan["weights"]}
    assert bits == {"W1": 8, "W2": 2}, bits
    assert plan["summary"]["effective_bits_per_weight"] > 5.0
    assert plan["summary"]["effective_bits_per_weight"] <= 5.5


# ------------------------------------------------------------------------ tied tables and heads


def _tied_decoder(tied: str = "transpose", budget: float | None = 4.6, **config):
    """The tied decoder planned at 4 bits (group 16), synthetic statistics on every projection: the
    head's (``E_T`` or the Gemm's ``E``) are the table's only ones."""
    model = b.load_upgraded(b.decoder_model(tied=tied))
    PlanQuantizationPass(QuantConfig(bits=4, group_size=16))(model)
    for i, ref in enumerate(qweights.iter_weights(model)):
        if ref.op != "Gather":
            out, k = ref.matrix_shape
            ref.value.meta[meta.HESSIAN_KEY] = Stats(a=_correlated_cov(k, i), g=np.eye(out))
    return model, AllocationConfig(budget_bits=budget, group_size=16, **config)


@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_a_tied_table_is_one_item_priced_once(run_pass, tied: str) -> None:
    model, config = _tied_decoder(tied)
    run_pass(AllocateBitsPass(config), model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    names = [w["name"] for w in record["weights"]]
    assert names.count("E") == 1 and len(names) == 7, "six linears and the tied table, once"
    numel = 2 * (3 * 32 * 48) + 40 * 32
    assert record["allocated_params"] == numel and record["budget_bytes"] == math.floor(4.6 / 8 * numel)
    (entry,) = [w for w in record["weights"] if w["name"] == "E"]
    head = "MatMul" if tied == "transpose" else "Gemm"
    assert entry["tied"]["uses"] == ["Gather", head] and entry["tied"]["table"] == "E"
    assert "the Gather use is not measured" in entry["tied"]["note"]
    refs = [r for r in qweights.iter_weights(model) if r.name == "E"]
    (plan,) = {r.value.meta[meta.QUANT_KEY] for r in refs}
    assert (plan.bits, plan.method) == (entry["bits"], entry["method"]), "the table follows its head's item"
    assert entry["bytes"] == quantize.stored_bytes(plan, 4), "its bytes, stored once"
    assert record["used_bytes"] <= record["budget_bytes"]
    assert record["outside_budget"] == [] and record["planned_effective_bits"] == record["effective_bits"]
    assert not run_pass(AllocateBitsPass(config), model).modified


def test_a_tied_table_kept_in_float_is_stored_once_in_float(run_pass) -> None:
    model, config = _tied_decoder(budget=32)
    run_pass(AllocateBitsPass(config), model)
    assert all(meta.QUANT_KEY not in r.value.meta for r in qweights.iter_weights(model) if r.name == "E")
    (entry,) = [w for w in model.meta[allocate_bits.ALLOCATION_KEY]["weights"] if w["name"] == "E"]
    assert entry["bytes"] == 4 * 40 * 32, "the float table, once"


def test_an_embedding_table_without_a_head_is_recorded_outside_the_budget(run_pass) -> None:
    model = b.load_upgraded(b.decoder_model())
    PlanQuantizationPass(QuantConfig(bits=4, group_size=16))(model)
    for i, ref in enumerate(qweights.iter_weights(model)):
        if ref.op != "Gather":
            out, k = ref.matrix_shape
            ref.value.meta[meta.HESSIAN_KEY] = Stats(a=_correlated_cov(k, i), g=np.eye(out))
    run_pass(AllocateBitsPass(AllocationConfig(budget_bits=4.6, group_size=16)), model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    assert "E" not in [w["name"] for w in record["weights"]]
    (outside,) = record["outside_budget"]
    table_plan = model.graph.initializers["E"].meta[meta.QUANT_KEY]
    assert (outside["name"], outside["op"], outside["bits"]) == ("E", "Gather", 4)
    assert outside["bytes"] == quantize.stored_bytes(table_plan, 4) and "lookup" in outside["reason"]
    numel = record["allocated_params"] + 40 * 32
    assert record["planned_effective_bits"] == pytest.approx(8 * (record["used_bytes"] + outside["bytes"]) / numel,
                                                              abs=1e-4)
