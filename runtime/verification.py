"""Verification in ONNX Runtime: the result runs on its target and is compared before it is returned.

Three comparisons, each on the same feeds:

* against the float model (the user's input): reported, and refused only when non-finite;
* against its own portable Q/DQ form, per output, on the target's provider: lowering changes
  kernels, not values, so the relative difference must stay within the target's tolerance (or
  half the quantization error, when that is larger). Where the model's outputs are already far
  from float's (relative error ≥ :data:`CONDITIONED`), end-to-end differences amplify kernel
  arithmetic without bound, so
* every lowered op is checked on its own: the lowered ops are cut out of the lowered model and
  their portable counterparts out of the portable form, both fed the same activations (tapped
  from the portable model), and each op's output must agree within the tolerance. A provider
  kernel that computes a form wrongly fails here, whatever the model around it does.

Outputs whose shapes differ between the two runs (data-dependent lengths) are reported as not
compared, never broadcast; a check that could not be run says so in the record.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import VerificationError
from hessc.ir import frontend, meta
from hessc.runtime import sessions, targets

logger = logging.getLogger(__name__)

REFERENCE_KEY = "hessc.reference"
"""``model.meta`` key: the float model the result is verified against (a path or a model)."""

VERIFICATION_KEY = "hessc.verification"
"""``model.meta`` key: the verification record."""

CONDITIONED = 0.5
"""Relative output error against float above which end-to-end lowering checks are replaced by
per-op checks (the outputs amplify arithmetic noise)."""

LOWERED_OPS = ("MatMulNBits", "GatherBlockQuantized")


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """One output's error against the reference over the feeds."""

    name: str
    rel_error: float | None
    max_abs_error: float | None
    cosine: float | None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def compare_outputs(
    reference: sessions.Session, candidate: sessions.Session, feeds: Sequence[dict[str, np.ndarray]],
    reference_outputs: Sequence[Sequence[np.ndarray]] | None = None,
    candidate_outputs: Sequence[Sequence[np.ndarray]] | None = None,
) -> tuple[dict[str, Any], list[OutputComparison]]:
    """Per-output and overall errors of ``candidate`` against ``reference``.

    Float outputs are compared; an output whose shape differs on some feed (a length that depends
    on the input or on noise) is not compared on that feed and says so. Outputs the caller already
    has (per feed, in output order) are used instead of running the session again.
    """
    names = reference.output_names
    if reference_outputs is None:
        reference_outputs = [reference.run(feed) for feed in feeds]
    if candidate_outputs is None:
        candidate_outputs = [candidate.run(feed) for feed in feeds]
    sums = {n: [0.0, 0.0, 0.0, 0.0, 0.0, 0] for n in names}  # err², ref², cand², dot, max|d|, feeds
    notes: dict[str, str] = {}
    for ref_outs, cand_outs in zip(reference_outputs, candidate_outputs):
        for name, r, c in zip(names, ref_outs, cand_outs):
            r, c = np.asarray(r), np.asarray(c)
            if not np.issubdtype(r.dtype, np.floating):
                notes.setdefault(name, f"not compared: {r.dtype} output")
                continue
            if r.shape != c.shape:
                notes[name] = f"not compared on some feeds: shape {list(c.shape)} against {list(r.shape)}"
                continue
            r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
            d = c64 - r64
            s = sums[name]
            s[0] += float(d @ d)
            s[1] += float(r64 @ r64)
            s[2] += float(c64 @ c64)
            s[3] += float(r64 @ c64)
            s[4] = max(s[4], float(np.max(np.abs(d))) if d.size else 0.0)
            s[5] += 1
    per_output = []
    total = [0.0, 0.0, 0.0, 0.0, 0.0]
    for name in names:
        s = sums[name]
        if s[5] == 0:
            per_output.append(OutputComparison(name, None, None, None, notes.get(name)))
            continue
        per_output.append(OutputComparison(name, _rel(s[0], s[1]), s[4], _cos(s[1], s[2], s[3]), notes.get(name)))
        for i in range(4):
            total[i] += s[i]
        total[4] = max(total[4], s[4])
    overall = {
        "samples": len(feeds), "rel_error": _rel(total[0], total[1]), "max_abs_error": total[4],
        "cosine": _cos(total[1], total[2], total[3]),
        "reference_provider": reference.inner.get_providers()[0],
        "candidate_provider": candidate.inner.get_providers()[0],
    }
    return overall, per_output


def _rel(err2: float, ref2: float) -> float:
    return (err2 / ref2) ** 0.5 if ref2 > 0 else float(err2 > 0)


def _cos(ref2: float, cand2: float, dot: float) -> float:
    return dot / ((ref2 * cand2) ** 0.5) if ref2 > 0 and cand2 > 0 else 1.0


def cut(model: ir.Model, inputs: Sequence[str], outputs: Sequence[str],
        dtypes: dict[str, np.dtype] | None = None) -> ir.Model:
    """The part of ``model`` computing ``outputs`` from the values ``inputs`` (and constants).

    A clone of the model whose graph inputs are the named values, whose outputs are the named
    outputs, and nothing else; weights are shared with the original, not copied. ``dtypes``
    gives the element type of an input value the model carries no type for.
    """
    part = frontend.clone(model)
    graph = part.graph
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    new_inputs = []
    for name in inputs:
        old = values[name]
        if old.is_graph_input():
            new_inputs.append(old)
            continue
        value_type = old.type
        if value_type is None and dtypes and name in dtypes:
            value_type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtypes[name])))
        new = ir.Value(name=name, shape=old.shape, type=value_type)
        ir.convenience.replace_all_uses_with(old, new)
        old.name = f"{name}__cut"
        new_inputs.append(new)
    graph.outputs.clear()
    graph.outputs.extend(values[name] for name in outputs)
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
    ir.passes.common.RemoveUnusedNodesPass()(part)
    return part


def _activation_inputs(model: ir.Model) -> tuple[list[ir.Node], list[str]]:
    nodes = [n for n in model.graph if n.domain == "com.microsoft" and n.op_type in LOWERED_OPS]
    names: list[str] = []
    for node in nodes:
        index = 1 if node.op_type == "GatherBlockQuantized" else 0
        x = node.inputs[index]
        if x is not None and x.const_value is None and x.name not in names:
            names.append(x.name)
    return nodes, names


def check_lowered_ops(
    lowered: ir.Model, portable: ir.Model, feed: dict[str, np.ndarray], target: targets.Target,
    reference: ir.Model | None = None,
) -> dict[str, Any]:
    """Each lowered op on the target's provider against its portable form, on the same activations.

    An op's limit is the target's tolerance, or half the op's own quantization error (its
    portable output against the float ``reference``'s, same inputs) when that is larger: the
    kernels' arithmetic (int8 activations on the CPU) legitimately moves a coarse op by more than
    a fine one, and a wrong kernel moves it by the size of its output.

    Returns:
        ``{"ops": n, "max_rel_error": e, "worst": name, "failed": [...]}``; ``failed`` lists the
        ops whose relative error exceeds their limit.
    """
    nodes, x_names = _activation_inputs(lowered)
    if not nodes:
        return {"ops": 0}
    out_names = [n.outputs[0].name for n in nodes]
    portable_values = {v.name for node in portable.graph for v in node.outputs} | {v.name for v in portable.graph.inputs}
    x_names = [n for n in x_names if n in portable_values]
    out_names = [n for n in out_names if n in portable_values]
    taps = sessions.ValueTaps(portable)
    try:
        graph_inputs = {v.name for v in portable.graph.inputs}
        tapped = [x for x in x_names if x not in graph_inputs]
        arrays = dict(zip(tapped, taps.session(tapped).run(tapped, feed))) if tapped else {}
    finally:
        taps.close()
    arrays.update({x: feed[x] for x in x_names if x in graph_inputs})
    tapped_types = {name: np.asarray(arrays[name]).dtype for name in x_names}
    portable_part = cut(portable, x_names, out_names, tapped_types)
    lowered_part = cut(lowered, x_names, out_names, tapped_types)
    # fp16 lowering keeps value names but not types: feed each probe input in its own type.
    dtypes = {v.name: v.dtype.numpy() for v in lowered_part.graph.inputs if v.dtype is not None}
    probe_feed = {name: np.asarray(arrays[name]).astype(dtypes.get(name, np.asarray(arrays[name]).dtype))
                  for name in x_names}
    on_target = sessions.session(lowered_part, target.name if _can_run(target) else "cpu")
    exact = sessions.session(portable_part, "cpu", optimize=False)
    # By position: a value that is one op's output and the next op's input is renamed in the cut.
    got = dict(zip(out_names, on_target.run(probe_feed)))
    exact_feed = {k: np.asarray(arrays[k]) for k in x_names}
    want = dict(zip(out_names, exact.run(exact_feed)))
    floats: dict[str, np.ndarray] = {}
    if reference is not None:
        known = {v.name for node in reference.graph for v in node.outputs} | {v.name for v in reference.graph.inputs}
        if all(n in known for n in [*x_names, *out_names]):
            part = cut(reference, x_names, out_names, tapped_types)
            floats = dict(zip(out_names, sessions.session(part, "cpu", optimize=False).run(exact_feed)))
    worst, worst_name, failed = 0.0, None, []
    for name in out_names:
        g, w = np.asarray(got[name], dtype=np.float64), np.asarray(want[name], dtype=np.float64)
        err = _rel(float(np.sum((g - w) ** 2)), float(np.sum(w**2)))
        limit = target.tolerance
        if name in floats:
            f = np.asarray(floats[name], dtype=np.float64)
            limit = max(limit, 0.5 * _rel(float(np.sum((w - f) ** 2)), float(np.sum(f**2))))
        if not math.isfinite(err) or err > limit:
            failed.append({"output": name, "rel_error": err, "limit": limit})
        if err > worst or worst_name is None:
            worst, worst_name = err, name
    return {"ops": len(out_names), "max_rel_error": worst, "worst": worst_name, "failed": failed,
            "provider": on_target.inner.get_providers()[0]}


def _next_token_logits(ids: np.ndarray | None, outputs: Sequence[np.ndarray]) -> bool:
    """Whether the first output is a language model's logits for these token ids: (batch, tokens,
    vocabulary) over at least two tokens, every id inside the vocabulary (a sentence encoder also
    reads ``input_ids``, but its outputs are no next-token distribution)."""
    if ids is None or not outputs:
        return False
    ids, logits = np.asarray(ids), np.asarray(outputs[0])
    return (ids.ndim == 2 and ids.shape[1] > 1 and logits.ndim == 3 and logits.shape[:2] == ids.shape
            and np.issubdtype(logits.dtype, np.floating) and int(ids.max()) < logits.shape[-1])


def _can_run(target: targets.Target) -> bool:
    return target.name != "cuda" or sessions.cuda_available()


class VerifyInORTPass(ir.passes.InPlacePass):
    """Runs the model in ONNX Runtime on its target and compares it (an analysis; see the module
    docstring). Raises :class:`VerificationError` on a result that must not be returned.

    Reads the float reference from ``model.meta[REFERENCE_KEY]``, the portable form (if the
    model was lowered) from ``model.meta[lower.PORTABLE_KEY]``, the feeds from the calibration
    (statistics and held-out feeds) or, without calibration, ``seed``-generated inputs.
    """

    def __init__(self, target: targets.Target, seed: int = 0, max_loss_increase: float = 1.0,
                 min_output_cosine: float = 0.5, allow_degraded: bool = False) -> None:
        super().__init__()
        self.target = target
        self.seed = seed
        self.max_loss_increase = max_loss_increase
        self.min_output_cosine = min_output_cosine
        self.allow_degraded = allow_degraded

    def requires(self, model: ir.Model) -> None:
        if model.meta.get(REFERENCE_KEY) is None:
            raise ir.passes.PreconditionError("verify-in-ort needs the float reference model (model.meta[REFERENCE_KEY])")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from hessc.runtime import calibration as calib
        from hessc.runtime.lower import PORTABLE_KEY

        target = self.target
        reference_source = model.meta[REFERENCE_KEY]
        calibration: meta.Calibration | None = model.meta.get(meta.CALIBRATION_KEY)
        if calibration is not None:
            feeds = [*calibration.feeds, *calibration.heldout]
        else:
            base = reference_source if isinstance(reference_source, ir.Model) else model
            feeds = calib.generated_feeds(base, count=2, seed=self.seed)
        reference = sessions.session(str(reference_source) if isinstance(reference_source, Path) else reference_source, "cpu",
                                 custom_op_libraries=model.meta.get(meta.CUSTOM_OPS_KEY, ()))
        if not _can_run(target):
            try:
                candidate = sessions.session(model, "cpu")
            except Exception as e:  # noqa: BLE001 - the record says why nothing ran
                logger.warning("no CUDA provider here and the CPU provider cannot run the cuda model: %s", e)
                model.meta[VERIFICATION_KEY] = {"status": "not run: no CUDA provider on this machine"}
                return ir.passes.PassResult(model, False)
            where = "CPUExecutionProvider (no CUDA provider on this machine)"
        else:
            candidate = sessions.session(model, target.name)
            where = candidate.inner.get_providers()[0]
            if target.name == "cuda":
                sessions.check_cuda_placement(model, feeds[0])
        # Each session runs the feeds once; every comparison below reads these outputs.
        float_outputs = [reference.run(f) for f in feeds]
        outputs = [candidate.run(f) for f in feeds]
        vs_float, per_float = compare_outputs(reference, candidate, feeds, float_outputs, outputs)
        record: dict[str, Any] = {"status": "passed", "provider": where, "vs_float": vs_float,
                                  "vs_float_outputs": [c.to_json() for c in per_float]}
        not_compared = [c.name for c in per_float if c.rel_error is None]
        if not_compared:
            record["not_compared"] = not_compared
        portable = model.meta.get(PORTABLE_KEY)
        if portable is not None:
            self._check_lowering(model, portable, candidate, feeds, outputs, vs_float, record)
        else:
            record["vs_portable"] = "skipped: the model was not lowered (it is its portable form)"
        model.meta[VERIFICATION_KEY] = record
        if not math.isfinite(vs_float["rel_error"]):
            raise VerificationError("the optimized model produces non-finite outputs; use more bits")
        self._check_quality(model, feeds, float_outputs, outputs, vs_float, record)
        return ir.passes.PassResult(model, False)

    def _check_quality(self, model, feeds, float_outputs, outputs, vs_float, record) -> None:
        """No silent collapse: a result whose next-token loss (language models) rose by more than
        ``max_loss_increase`` nats, or whose outputs' cosine to float fell below
        ``min_output_cosine``, is refused unless degraded results are allowed."""
        from hessc.ir.weights import token_ids_input

        reasons = []
        quality: dict[str, Any] = {"output_cosine": vs_float["cosine"], "min_output_cosine": self.min_output_cosine}
        ids = token_ids_input(model)
        if ids is not None and all(_next_token_logits(f.get(ids), outs) for f, outs in zip(feeds, float_outputs)):
            from hessc.passes.allocate_bits import heldout_loss

            float_loss = heldout_loss(float_outputs, feeds, "next-token", ids)
            loss = heldout_loss(outputs, feeds, "next-token", ids)
            quality.update(next_token_loss_float=float_loss, next_token_loss=loss,
                           max_loss_increase=self.max_loss_increase)
            if loss - float_loss > self.max_loss_increase:
                reasons.append(f"its next-token loss rose by {loss - float_loss:.3g} nats (perplexity "
                               f"{math.exp(min(float_loss, 700)):.4g} -> {math.exp(min(loss, 700)):.4g}; "
                               f"limit {self.max_loss_increase:g}, --max-loss-increase)")
        if vs_float["cosine"] < self.min_output_cosine:
            reasons.append(f"its outputs' cosine to the float model is {vs_float['cosine']:.3f} "
                           f"(limit {self.min_output_cosine:g}, --min-output-cosine)")
        quality["degraded"] = bool(reasons)
        if reasons:
            quality["reasons"] = reasons
        record["quality"] = quality
        if reasons and not self.allow_degraded:
            raise VerificationError(
                "the result is degraded: " + "; ".join(reasons) + ". Use more bits (or a budget), or pass "
                "--allow-degraded to write it anyway"
            )
        if reasons:
            record["status"] = "passed (degraded, allowed)"
            logger.warning("the result is degraded: %s", "; ".join(reasons))

    def _check_lowering(self, model, portable, candidate, feeds, outputs, vs_float, record) -> None:
        target = self.target
        portable_session = sessions.session(portable, "cpu", optimize=False)
        lowered, per_output = compare_outputs(portable_session, candidate, feeds, candidate_outputs=outputs)
        record["vs_portable"] = lowered
        record["vs_portable_outputs"] = [c.to_json() for c in per_output]
        conditioned = vs_float["rel_error"] < CONDITIONED
        limit = max(target.tolerance, 0.5 * vs_float["rel_error"])
        if not math.isfinite(lowered["rel_error"]):
            raise VerificationError(
                f"the lowered {target.name} model produces non-finite outputs where its portable Q/DQ form does not; "
                "this is a hessc bug: rerun with --target onnx and report it"
            )
        if conditioned:
            bad = [c for c in per_output if c.rel_error is not None and c.rel_error > limit]
            if bad:
                raise VerificationError(
                    f"the lowered {target.name} model's output {bad[0].name!r} differs from its portable Q/DQ form by "
                    f"{bad[0].rel_error:.2%} (limit {limit:.2%}); this is a hessc bug: rerun with --target onnx and report it"
                )
            record["lowered_ops"] = "checked end to end"
            return
        reference = model.meta[REFERENCE_KEY]
        if isinstance(reference, Path):
            reference = frontend.load(reference, custom_op_libraries=model.meta.get(meta.CUSTOM_OPS_KEY, ()))
        ops = check_lowered_ops(model, portable, feeds[0], target, reference)
        record["lowered_ops"] = ops
        if ops.get("failed"):
            first = ops["failed"][0]
            raise VerificationError(
                f"the lowered {target.name} kernel computing {first['output']!r} differs from its portable Q/DQ form by "
                f"{first['rel_error']:.2%} on the same inputs (limit {first['limit']:.2%}); this is a hessc bug: "
                "rerun with --target onnx and report it"
            )
