"""check-allocation: a budget's predicted loss change measured on held-out feeds, and corrected
where the prediction fails, under the same budget."""

from __future__ import annotations

import dataclasses

import builders as b
import numpy as np
import onnx_ir as ir
import pytest

import hessc
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.options import CompileOptions
from hessc.passes import allocate_bits, check_allocation, pipeline
from hessc.runtime import targets
from hessc.runtime.verification import REFERENCE_KEY

pytestmark = pytest.mark.torch


def _mlp() -> ir.Model:
    """``relu(relu(x W1) W2) W3``, weights scaled as a trained net's."""
    from onnx import helper

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W3"], ["y"]),
    ]
    inits = {"W1": b.weight((64, 128), 0, 64**-0.5), "W2": b.weight((128, 128), 1, 2 * 128**-0.5),
             "W3": b.weight((128, 16), 2, 2 * 128**-0.5)}
    return b.load(b.make_model(nodes, [b.x_input(64)], [b.y_output(16)], inits))


def _prepared() -> ir.Model:
    model = _mlp()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(12)]
    labels = [rng.integers(0, 16, 16) for _ in feeds]
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(tuple(feeds[:9]), tuple(feeds[9:]), tuple(labels[:9]),
                                                        tuple(labels[9:]))
    model.meta[REFERENCE_KEY] = model.clone()
    return model


class HideCurvature(ir.passes.InPlacePass):
    """Scales one weight's curvature statistics down, as if its calibration inputs had not shown
    how much the loss depends on it: its predicted damage becomes ``scale`` times the truth."""

    def __init__(self, weight: str, scale: float) -> None:
        super().__init__()
        self.weight, self.scale = weight, scale

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ref = next(r for r in qweights.iter_weights(model) if r.name == self.weight)
        stats = ref.value.meta[meta.HESSIAN_KEY]
        scaled = {k: getattr(stats, k) * self.scale for k in ("g", "g_diag", "grad", "lambda_max", "hutchinson_trace",
                                                                "fisher_diag_mean") if getattr(stats, k) is not None}
        meta.set_annotation(ref.value, meta.HESSIAN_KEY, dataclasses.replace(stats, **scaled))
        return ir.passes.PassResult(model, True)


def _run(extra=()) -> ir.Model:
    # Bit widths only: the check's mechanism, on items whose damage HideCurvature scales.
    options = CompileOptions(target="onnx", bits=5.0, has_calibration=True, group_size=128, low_rank=False)
    return pipeline.run(pipeline.build_pipeline(options, targets.get("onnx"), extra=list(extra)), _prepared())


def _bits(model: ir.Model) -> dict[str, int]:
    return {w["name"]: w["bits"] for w in model.meta[allocate_bits.ALLOCATION_KEY]["weights"]}


def test_an_under_predicted_weight_is_measured_and_the_budget_moves_to_it() -> None:
    honest = _run()
    hidden = _run([("allocate-bits", "hide-curvature", HideCurvature("W2", 1e-4))])
    check = hidden.meta[check_allocation.CHECK_KEY]
    first, last = check["rounds"][0], check["rounds"][-1]
    assert first["measured"] > check_allocation.FACTOR * first["predicted"], "the hidden curvature is caught"
    assert check["corrections"]["W2"] > 100, "W2 measured alone: far more damage than predicted"
    assert last["measured"] < first["measured"]
    record = hidden.meta[allocate_bits.ALLOCATION_KEY]
    assert record["used_bytes"] <= record["budget_bytes"], "the budget still holds"
    assert _bits(hidden)["W2"] >= _bits(honest)["W2"] - 1
    assert hidden.meta["hessc.verification"]["status"] == "passed"


def test_an_honest_prediction_is_recorded_with_its_measurement() -> None:
    model = _run()
    check = model.meta[check_allocation.CHECK_KEY]
    assert check["loss"] == "ce" and check["samples"] == 3 and "held out" in check["feeds"]
    first = check["rounds"][0]
    assert np.isfinite(first["measured"]) and first["predicted"] > 0
    assert check["status"] in ("holds", "prediction exceeded")


def test_the_plan_and_the_cli_carry_the_check(tmp_path) -> None:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(8)]
    labels = [rng.integers(0, 16, 16) for _ in feeds]
    out = hessc.optimize(_mlp(), target="onnx", bits=3.5, group_size=128, calibration=feeds, labels=labels)
    record = meta.read_plan(out)
    assert record["allocation"]["check"]["samples"] == 8 and "too few" in record["allocation"]["check"]["feeds"]
    assert "measured_delta_loss" in record["summary"] and "predicted_delta_loss" in record["summary"]
    off = hessc.optimize(_mlp(), target="onnx", bits=3.5, group_size=128, calibration=feeds, labels=labels, check_allocation=False)
    assert "check" not in meta.read_plan(off)["allocation"]
    assert "check-allocation" not in [p["name"] for p in meta.read_plan(off)["passes"]]


def _low_rank_prepared() -> ir.Model:
    """The MLP with W2 of rank 8 (plus noise), so that the allocator chooses a split for it."""
    model = _prepared()
    rng = np.random.default_rng(3)
    w2 = (rng.standard_normal((128, 8)) @ rng.standard_normal((8, 128)) * 0.05
          + 1e-3 * rng.standard_normal((128, 128))).astype(np.float32)
    model.graph.initializers["W2"].const_value = ir.tensor(w2, name="W2")
    model.meta[REFERENCE_KEY] = model.clone()
    return model


def test_low_rank_items_stay_only_where_they_measure_better_than_plain_items() -> None:
    options = CompileOptions(target="onnx", bits=3.0, has_calibration=True, group_size=128)
    model = pipeline.run(pipeline.build_pipeline(options, targets.get("onnx")), _low_rank_prepared())
    check = model.meta[check_allocation.CHECK_KEY]
    structural = check["structural"]
    assert np.isfinite(structural["with_low_rank"]) and np.isfinite(structural["plain"])
    plain_wins = structural["plain"] <= structural["with_low_rank"]
    assert structural["kept"] == ("plain items" if plain_wins else "low-rank items")
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    forms = [w for w in record["weights"] if w.get("form")]
    assert bool(forms) != plain_wins
    from hessc.passes import low_rank

    assert (low_rank.LOW_RANK_KEY in model.meta) != plain_wins, "the records follow the graph kept"
    assert check["rounds"][-1]["measured"] == pytest.approx(min(structural["plain"], structural["with_low_rank"]))
    assert record["used_bytes"] <= record["budget_bytes"]
    assert model.meta["hessc.verification"]["status"] == "passed"
