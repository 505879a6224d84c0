"""The lossless confirmation: the allocation must not lose on data the statistics never saw.

The allocator picked the cheapest items whose *predicted* loss change sums to at most zero. This
pass measures it: the held-out feeds' loss of the quantized portable model against the float
model's (the model as it stood before planning, rewrites before it included). While the quantized
loss is higher, the allocation backs off (:func:`hessc.passes.allocate_bits.step_up`: the layers
with the largest curvature damage move up one bit level) and plan → materialize re-runs on a
fresh ``Model.clone()`` of that model, whose weights carry their (possibly transformed) Hessian
statistics, so GPTQ and ``rtn-grad`` see what the first run saw.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.passes import allocate_bits, low_rank, quantize

logger = logging.getLogger(__name__)

LOSSLESS_KEY = "hessc.lossless"
"""``model.meta`` key: the record of the confirmation (losses, steps, confirmed)."""

_LOSSES = ("next-token", "ce", "custom")


def resolve_heldout_loss(model: ir.Model, calibration: meta.Calibration) -> str:
    """The loss the held-out check measures, refusing one that fp32 already minimises."""
    from hessc.passes import hessian

    if calibration.loss is not None:
        return "custom"
    config = hessian.HessianConfig(labels=calibration.labels)
    name = hessian.resolve_loss(config, model)
    if name not in _LOSSES:
        raise InputError(
            f"lossless needs a loss whose fp32 value is not already its minimum; the model's loss is {name!r} "
            "(zero at the float weights): give labels (cross-entropy), a task loss (loss=), or use a language "
            "model with input_ids"
        )
    return name


def heldout_loss(model: ir.Model, calibration: meta.Calibration, loss_name: str) -> float:
    """The mean loss of a model over the held-out feeds, run in ORT with its fusions off."""
    from hessc.passes import hessian
    from hessc.runtime import sessions

    sess = sessions.session(model, "cpu", optimize=False)
    feeds = list(calibration.heldout)
    outputs = [sess.run(feed) for feed in feeds]
    if loss_name == "custom":
        return custom_loss(calibration.loss, sess.output_names, outputs, feeds)
    return allocate_bits.heldout_loss(outputs, feeds, loss_name, hessian.ids_input(model),
                                      calibration.heldout_labels)


def custom_loss(loss_fn: Callable, names: Sequence[str], outputs, feeds) -> float:
    """The mean of a user's task loss over feeds, from ORT outputs."""
    import torch

    values = []
    with torch.no_grad():
        for outs, feed in zip(outputs, feeds):
            named = {n: torch.from_numpy(np.asarray(o)).to(torch.float64) for n, o in zip(names, outs)}
            values.append(float(loss_fn(named, feed)))
    return float(np.mean(values))


class ConfirmLosslessPass(ir.passes.InPlacePass):
    """Backs a lossless allocation off until its held-out loss is no worse than the float model's.

    When the allocation steps back, the model's graph is replaced by the re-quantized clone's.

    Args:
        config: the quantization configuration the allocation replays through.
        candidate_bits: the bit widths the allocator offered.
    """

    def __init__(self, config: quantize.QuantConfig, candidate_bits: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.candidate_bits = tuple(candidate_bits)

    def precheck(self, model: ir.Model) -> None:
        """Refuses before any work when the check could not be run (no held-out feeds, no loss)."""
        calibration = model.meta.get(meta.CALIBRATION_KEY)
        if calibration is None or not calibration.heldout:
            raise InputError("lossless needs at least 2 calibration samples (a quarter is held out); pass more")
        resolve_heldout_loss(model, calibration)

    def requires(self, model: ir.Model) -> None:
        self.precheck(model)
        require_replayable(model, "confirm-lossless")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        calibration: meta.Calibration = model.meta[meta.CALIBRATION_KEY]
        preplan: ir.Model = model.meta.pop(meta.PREPLAN_KEY)
        record = model.meta[allocate_bits.ALLOCATION_KEY]
        loss_name = resolve_heldout_loss(preplan, calibration)
        fp32 = heldout_loss(preplan, calibration, loss_name)
        quantized = heldout_loss(model, calibration, loss_name)
        steps: list[dict[str, Any]] = []
        logger.info("lossless: held-out loss %.6g (fp32) vs %.6g (quantized)", fp32, quantized)
        result = None
        while quantized > fp32:
            weights = allocate_bits.step_up(record, self.candidate_bits)
            if weights is None:
                break
            raised = [w["name"] for w, old in zip(weights, record["weights"]) if w["bits"] != old["bits"]]
            record = allocate_bits.with_weights(record, weights)
            result = self._replay(preplan, record)
            quantized = heldout_loss(result, calibration, loss_name)
            steps.append({"raised": raised, "heldout_loss_quantized": quantized, "used_bytes": record["used_bytes"]})
            logger.info("lossless: raised %s; held-out loss %.6g", ", ".join(raised), quantized)
        confirmed = quantized <= fp32
        if not confirmed:
            logger.warning(
                "lossless not confirmed: held-out loss %.6g is above fp32's %.6g after %d steps", quantized, fp32, len(steps)
            )
        if result is not None:
            adopt(model, result)
        model.meta[allocate_bits.ALLOCATION_KEY] = record
        model.meta[LOSSLESS_KEY] = {
            "heldout_loss_fp32": fp32, "heldout_loss_quantized": quantized, "heldout_samples": len(calibration.heldout),
            "loss": loss_name, "steps": steps, "confirmed": confirmed,
        }
        return ir.passes.PassResult(model, bool(steps))

    def _replay(self, preplan: ir.Model, record: dict[str, Any]) -> ir.Model:
        return replay(self.config, preplan, record)


def require_replayable(model: ir.Model, name: str) -> None:
    """Refuses a model without what a replay of its allocation needs."""
    if model.meta.get(meta.PREPLAN_KEY) is None or model.meta.get(allocate_bits.ALLOCATION_KEY) is None:
        raise ir.passes.PreconditionError(
            f"{name} needs the allocation and the model before planning: run plan-quantization (with the "
            "snapshot), allocate-bits and insert-qdq first"
        )


def adopt(model: ir.Model, result: ir.Model) -> None:
    """Gives ``model`` the graph (and what the materialization recorded) of a replay."""
    model.graph = result.graph
    model.ir_version = result.ir_version
    model.meta[meta.MATERIALIZED_KEY] = result.meta.get(meta.MATERIALIZED_KEY, {})
    model.meta[meta.SKIPPED_KEY] = result.meta.get(meta.SKIPPED_KEY, {})
    # The replay's low-rank forms replace the first materialization's (a form stepped away from
    # must not stay in the byte count).
    if result.meta.get(low_rank.LOW_RANK_KEY):
        model.meta[low_rank.LOW_RANK_KEY] = result.meta[low_rank.LOW_RANK_KEY]
    else:
        model.meta.pop(low_rank.LOW_RANK_KEY, None)


def replay(config: quantize.QuantConfig, preplan: ir.Model, record: dict[str, Any]) -> ir.Model:
    """An allocation record's bits and methods planned and materialized on a fresh clone of the
    model as it stood before planning (the float model itself where every weight is in float)."""
    replayed = dataclasses.replace(
        config, bits_override=tuple((n, b) for n, b in record["bits_override"]),
        method_override=tuple((n, m) for n, m in record["method_override"]),
    )
    candidate = frontend.clone(preplan)
    ranks = record.get("rank_override") or []
    try:
        quantize.PlanQuantizationPass(replayed, allow_empty=bool(ranks))(candidate)
        if ranks:
            low_rank.attach(candidate, ranks, config.group_size, config.symmetric)
            low_rank.SplitLowRankPass()(candidate)
        quantize.InsertQDQPass()(candidate)
    except ir.passes.PassError as e:  # everything is back in float: the float model itself
        if not isinstance(_root(e), InputError):
            raise
        candidate = frontend.clone(preplan)
    return candidate


def _root(e: BaseException) -> BaseException:
    while isinstance(e, ir.passes.PassError) and e.__cause__ is not None:
        e = e.__cause__
    return e
