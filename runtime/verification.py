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

Outputs are compared where they are comparable, never broadcast:

* random nodes (``RandomNormalLike``, ``Multinomial``, ...) without a ``seed`` get one on copies
  used only here, the same per node in every model (``seed(node) = crc32(seed, node name or
  position)``), so the reference and the result draw the same noise; a reference that still
  disagrees with itself on a second session (custom ops) makes those outputs not comparable;
* an output whose shape differs (a length that depends on the input values) is compared on the
  common prefix along the differing axes, ``y[:min(n_ref, n_out)]``, and the mismatch is recorded;
  with different ranks it is not comparable. Integer and bool outputs (indices, counts) are
  compared as the fraction of equal elements, floats by relative error and cosine.

Where the float model does not fit in memory beside the result (:func:`memory.whole_model_check`,
``--max-memory``), verification goes weight by weight instead and the record says so: each
quantized weight against its float weight, the packed kernels' weights against their portable
codes, and the result run on its target with every output finite.

Decisions read only what was compared: the quality check skips, saying why, when no float output
is comparable; the end-to-end lowering check reads only outputs of the same shape on every feed,
and the per-op check runs whenever it cannot conclude.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import VerificationError
from hessc.ir import frontend, meta
from hessc.runtime import memory, sessions, targets

logger = logging.getLogger(__name__)

REFERENCE_KEY = "hessc.reference"
"""``model.meta`` key: the float model the result is verified against (a path or a model)."""

VERIFICATION_KEY = "hessc.verification"
"""``model.meta`` key: the verification record."""

CONDITIONED = 0.5
"""Relative output error against float above which end-to-end lowering checks are replaced by
per-op checks (the outputs amplify arithmetic noise)."""

WEIGHT_ERROR_LIMIT = 1.0
"""Relative error of a quantized weight (against its float weight) at or above which the weight
is broken: zeroing the weight would do as well."""

LOWERED_OPS: dict[str, tuple[int, ...]] = {
    "MatMulNBits": (0,), "GatherBlockQuantized": (1,), "DynamicQuantizeLSTM": (0, 4, 5, 6),
}
"""The lowered kernels checked one by one, with the positions of their non-weight inputs."""


RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli", "Dropout"})
"""ONNX ops that draw from a generator (``seed`` attribute; Dropout only in training mode)."""

WHOLE, PREFIX, SOME_FEEDS, NOT_COMPARABLE = "whole", "on a common prefix", "on some feeds", "not comparable"
"""How an output was compared: its whole value on every feed, on the common prefix of differing
lengths on some feed, only on some feeds (the others not comparable), or not at all."""


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """One output's error against the reference over the feeds.

    Attributes:
        compared: :data:`WHOLE`, :data:`PREFIX`, :data:`SOME_FEEDS` or :data:`NOT_COMPARABLE`.
        how: ``"values"`` (floats: relative error, cosine, max abs error) or ``"agreement"``
            (integers and bools: the fraction of equal elements).
        feeds: feeds compared (whole or on a prefix); ``prefix_feeds`` of them on a prefix.
        non_finite: the candidate has non-finite values where the reference's are finite (the
            errors are over the elements finite in both).
    """

    name: str
    rel_error: float | None
    max_abs_error: float | None
    cosine: float | None
    note: str | None = None
    compared: str = WHOLE
    how: str | None = None
    agreement: float | None = None
    feeds: int = 0
    prefix_feeds: int = 0
    non_finite: bool = False

    @property
    def comparable(self) -> bool:
        return self.compared != NOT_COMPARABLE

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if not self.prefix_feeds:
            out.pop("prefix_feeds")
        if not self.non_finite:
            out.pop("non_finite")
        return out


@dataclasses.dataclass
class _Tally:
    """Running sums for one output: err², ref², cand², dot and max |d| for floats; equal and total
    elements for integers; feeds by how they were compared."""

    err2: float = 0.0
    ref2: float = 0.0
    cand2: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    equal: int = 0
    elements: int = 0
    floats: bool = True
    whole: int = 0
    prefix: int = 0
    skipped: int = 0
    non_finite: bool = False
    prefix_note: str | None = None
    skip_note: str | None = None


def _mismatch(r: np.ndarray, c: np.ndarray, common: tuple[int, ...] | None = None) -> str:
    """How the shapes of ``r`` (the reference's) and ``c`` (the result's) differ, and what was
    compared given their ``common`` prefix."""
    axes = [i for i, (a, b) in enumerate(zip(r.shape, c.shape)) if a != b]
    if len(axes) == 1:
        (axis,) = axes
        where = f" along axis {axis}" if r.ndim > 1 else ""
        text = f"length {r.shape[axis]} (reference) vs {c.shape[axis]} (result){where}"
        return text if common is None else f"{text}, compared on the first {common[axis]}"
    text = f"shape {list(r.shape)} (reference) vs {list(c.shape)} (result)"
    return text if common is None else f"{text}, compared on the common {list(common)}"


def _tally(s: _Tally, r: Any, c: Any, align: bool) -> None:
    """Adds one feed's reference and candidate value of an output to its tally."""
    if not isinstance(r, np.ndarray) or not isinstance(c, np.ndarray):
        s.skipped += 1
        s.skip_note = s.skip_note or "a sequence or map output"
        return
    floating = np.issubdtype(r.dtype, np.floating)
    if floating != np.issubdtype(c.dtype, np.floating):
        s.skipped += 1
        s.skip_note = s.skip_note or f"element type {r.dtype} (reference) vs {c.dtype} (result)"
        return
    s.floats = floating
    if r.ndim != c.ndim:
        s.skipped += 1
        s.skip_note = s.skip_note or f"rank {r.ndim} (reference) vs {c.ndim} (result)"
        return
    if r.shape != c.shape:
        common = tuple(min(a, b) for a, b in zip(r.shape, c.shape))
        if not align or math.prod(common) == 0:
            s.skipped += 1
            s.skip_note = s.skip_note or _mismatch(r, c) + ("" if not align else ": nothing in common")
            return
        s.prefix_note = s.prefix_note or _mismatch(r, c, common)
        s.prefix += 1
        index = tuple(slice(0, n) for n in common)
        r, c = r[index], c[index]
    else:
        s.whole += 1
    s.elements += r.size
    if not floating:
        s.equal += int(np.count_nonzero(r == c))
        return
    # Elements the reference leaves non-finite say nothing about the result; those the result
    # alone makes non-finite fail it.
    r_finite, c_finite = np.isfinite(r), np.isfinite(c)
    s.non_finite = s.non_finite or bool(np.any(r_finite & ~c_finite))
    both = r_finite & c_finite
    r64, c64 = r[both].astype(np.float64), c[both].astype(np.float64)
    d = c64 - r64
    s.err2 += float(d @ d)
    s.ref2 += float(r64 @ r64)
    s.cand2 += float(c64 @ c64)
    s.dot += float(r64 @ c64)
    s.max_abs = max(s.max_abs, float(np.max(np.abs(d))) if d.size else 0.0)


def _summary(name: str, s: _Tally, feeds: int, unstable: str | None) -> OutputComparison:
    if unstable is not None:
        return OutputComparison(name, None, None, None, unstable, NOT_COMPARABLE)
    compared = s.whole + s.prefix
    if compared == 0:
        return OutputComparison(name, None, None, None, s.skip_note, NOT_COMPARABLE)
    compared_as = WHOLE if not s.prefix and not s.skipped else PREFIX if s.prefix else SOME_FEEDS
    notes = []
    if s.prefix:
        notes.append(s.prefix_note if s.prefix == feeds else f"on {s.prefix} of {feeds} feeds: {s.prefix_note}")
    if s.skipped:
        notes.append(f"not comparable on {s.skipped} of {feeds} feeds: {s.skip_note}")
    note = "; ".join(notes) or None
    if not s.floats:
        agreement = s.equal / s.elements if s.elements else 1.0
        return OutputComparison(name, None, None, None, note, compared_as, "agreement", agreement, compared, s.prefix)
    return OutputComparison(name, _rel(s.err2, s.ref2), s.max_abs, _cos(s.ref2, s.cand2, s.dot), note, compared_as,
                            "values", None, compared, s.prefix, s.non_finite)


class _Ran(NamedTuple):
    """What the comparisons need of a session once its outputs are in: its output names and
    provider (the session itself, and the weights it holds, are released)."""

    output_names: tuple[str, ...]
    provider: str


def _ran(session: sessions.Session) -> _Ran:
    return _Ran(tuple(session.output_names), session.provider)


def compare_outputs(
    reference: sessions.Session, candidate: sessions.Session, feeds: Sequence[dict[str, np.ndarray]],
    reference_outputs: Sequence[Sequence[np.ndarray]] | None = None,
    candidate_outputs: Sequence[Sequence[np.ndarray]] | None = None,
    unstable: dict[str, str] | None = None, align: bool = True,
) -> tuple[dict[str, Any], list[OutputComparison]]:
    """Per-output and overall errors of ``candidate`` against ``reference``.

    An output whose shape differs on some feed (a length that depends on the input values) is
    compared there on the common prefix of the differing axes (with ``align``; without it, not
    on that feed), one whose rank differs not at all; integer and bool outputs by agreement.
    Outputs the caller already has (per feed, in output order) are used instead of running the
    sessions again.

    Args:
        unstable: outputs known not to be comparable (a reference that disagrees with itself),
            with the reason.
        align: compare outputs of different lengths on their common prefix.

    Returns:
        The overall errors over the compared float outputs (``rel_error``, ``cosine`` and
        ``max_abs_error`` None when there is none; ``agreement`` over the integer outputs when
        there are some), and one :class:`OutputComparison` per output.
    """
    names = reference.output_names
    if reference_outputs is None:
        reference_outputs = [reference.run(feed) for feed in feeds]
    if candidate_outputs is None:
        candidate_outputs = [candidate.run(feed) for feed in feeds]
    unstable = unstable or {}
    tallies = {n: _Tally() for n in names}
    for ref_outs, cand_outs in zip(reference_outputs, candidate_outputs):
        for name, r, c in zip(names, ref_outs, cand_outs):
            if name not in unstable:
                _tally(tallies[name], r, c, align)
    per_output = [_summary(name, tallies[name], len(feeds), unstable.get(name)) for name in names]
    total, floats = _Tally(), False
    for c in per_output:
        s = tallies[c.name]
        if not c.comparable:
            continue
        if c.how == "agreement":
            total.equal += s.equal
            total.elements += s.elements
            continue
        total.err2, total.ref2, total.cand2, total.dot = (
            total.err2 + s.err2, total.ref2 + s.ref2, total.cand2 + s.cand2, total.dot + s.dot)
        total.max_abs = max(total.max_abs, s.max_abs)
        floats = True
    overall: dict[str, Any] = {
        "samples": len(feeds),
        "rel_error": _rel(total.err2, total.ref2) if floats else None,
        "max_abs_error": total.max_abs if floats else None,
        "cosine": _cos(total.ref2, total.cand2, total.dot) if floats else None,
        "reference_provider": reference.provider,
        "candidate_provider": candidate.provider,
    }
    if any(c.comparable and c.how == "agreement" for c in per_output):
        overall["agreement"] = total.equal / total.elements if total.elements else 1.0
    return overall, per_output


def _rel(err2: float, ref2: float) -> float:
    return (err2 / ref2) ** 0.5 if ref2 > 0 else float(err2 > 0)


def _cos(ref2: float, cand2: float, dot: float) -> float:
    return dot / ((ref2 * cand2) ** 0.5) if ref2 > 0 and cand2 > 0 else 1.0


def _all_nodes(model: ir.Model):
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _is_random(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in RANDOM_OPS:
        return False
    if node.op_type != "Dropout":
        return True
    # Dropout draws only in training mode: a third input that is not a constant false.
    mode = node.inputs[2] if len(node.inputs) > 2 else None
    return mode is not None and (mode.const_value is None or bool(mode.const_value.numpy()))


def random_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes of ``model`` (subgraphs and functions included) that draw random numbers, in order."""
    return [n for n in _all_nodes(model) if _is_random(n)]


def seed_random_nodes(models: Sequence[ir.Model], seed: int = 0) -> dict[str, Any]:
    """Gives every random node without a ``seed`` one, the same per node in each of ``models``.

    A node is known by its name when every model has the same set of unique, non-empty random
    node names, else by its position among the random nodes (the passes neither add nor reorder
    them). The seed is ``crc32("seed:key") mod 2^24``, exact as the attribute's float.

    Returns:
        ``{"nodes": n, "seeded": k, "keyed_by": "name" | "position"}`` for the first model.
    """
    import zlib

    found = [random_nodes(m) for m in models]
    names = [[n.name or "" for n in nodes] for nodes in found]
    by_name = all(all(names_) and len(set(names_)) == len(names_) and set(names_) == set(names[0]) for names_ in names)
    seeded = [0] * len(models)
    for i, nodes in enumerate(found):
        for position, node in enumerate(nodes):
            if "seed" in node.attributes:
                continue
            key = node.name if by_name else f"{position}:{node.op_type}"
            value = float(zlib.crc32(f"{seed}:{key}".encode()) % (1 << 24))
            node.attributes["seed"] = ir.AttrFloat32("seed", value)
            seeded[i] += 1
    return {"nodes": len(found[0]) if found else 0, "seeded": seeded[0] if seeded else 0,
            "keyed_by": "name" if by_name else "position"}


def _subgraph_nodes(node: ir.Node) -> list[ir.Node]:
    return [n for g in frontend.subgraphs(node) for n in ir.traversal.RecursiveGraphIterator(g)]


def noisy_outputs(model: ir.Model) -> set[str]:
    """The graph outputs that depend on a random node: directly, or through a node whose
    subgraphs or function hold one or read a noisy value of the outer graph."""
    random_functions = {key for key, f in model.functions.items()
                        if any(_is_random(n) for n in ir.traversal.RecursiveGraphIterator(f))}
    noisy: set[str] = set()
    for node in model.graph:
        inner = [node, *_subgraph_nodes(node)]
        if any(_is_random(n) or (n.domain, n.op_type, n.overload or "") in random_functions
               or any(v is not None and v.name in noisy for v in n.inputs) for n in inner):
            noisy.update(v.name for v in node.outputs)
    return {v.name for v in model.graph.outputs if v.name in noisy}


def unstable_outputs(names: Sequence[str], first: Sequence[Sequence[Any]], second: Sequence[Sequence[Any]],
                     rtol: float = 1e-6) -> dict[str, str]:
    """The outputs on which two runs of the same model over the same feeds disagree, with how.

    Floats may differ by ``rtol`` relative to the output's norm (threaded reductions); integers,
    bools and shapes must be equal.
    """
    unstable: dict[str, str] = {}
    for feed, (outs_a, outs_b) in enumerate(zip(first, second)):
        for name, a, b in zip(names, outs_a, outs_b):
            if name in unstable or not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
                continue
            if a.shape != b.shape:
                unstable[name] = (f"the reference disagrees with itself: shape {list(a.shape)} then {list(b.shape)} "
                                  f"on feed {feed} (nondeterministic)")
            elif np.issubdtype(a.dtype, np.floating):
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                finite = np.isfinite(a64) & np.isfinite(b64)
                same_nonfinite = np.array_equal(~np.isfinite(a64), ~np.isfinite(b64))
                err = _rel(float(np.sum((a64[finite] - b64[finite]) ** 2)), float(np.sum(a64[finite] ** 2)))
                if err > rtol or not same_nonfinite:
                    unstable[name] = (f"the reference disagrees with itself: relative difference {err:.3g} between "
                                      f"two runs on feed {feed} (nondeterministic)")
            elif not np.array_equal(a, b):
                unstable[name] = (f"the reference disagrees with itself: {int(np.count_nonzero(a != b))} of {a.size} "
                                  f"elements differ between two runs on feed {feed} (nondeterministic)")
    return unstable


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
        for index in LOWERED_OPS[node.op_type]:
            x = node.inputs[index] if index < len(node.inputs) else None
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
    out_names = [next(v.name for v in n.outputs if v.name) for n in nodes]
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
        limit = target.tolerance
        if g.shape != w.shape:  # same inputs: a kernel that changes the shape is wrong
            failed.append({"output": name, "rel_error": math.inf, "limit": limit,
                           "note": f"shape {list(g.shape)} vs {list(w.shape)} of the portable form"})
            worst, worst_name = math.inf, name
            continue
        err = _rel(float(np.sum((g - w) ** 2)), float(np.sum(w**2)))
        if name in floats and np.shape(floats[name]) == w.shape:
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


STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def _not_comparable_reason(per_output: Sequence[OutputComparison]) -> str:
    return "; ".join(f"{c.name!r}: {c.note}" if not c.comparable else f"{c.name!r}: {c.how} only"
                     for c in per_output) or "the model has no outputs"


class VerifyInORTPass(ir.passes.InPlacePass):
    """Runs the model in ONNX Runtime on its target and compares it (an analysis; see the module
    docstring). Raises :class:`VerificationError` on a result that must not be returned.

    Reads the float reference from ``model.meta[REFERENCE_KEY]``, the portable form (if the
    model was lowered) from ``model.meta[lower.PORTABLE_KEY]``, the feeds from the calibration
    (statistics and held-out feeds) or, without calibration, ``seed``-generated inputs. Random
    nodes without a seed are seeded from ``seed`` on copies used only here; the model returned
    is not changed.
    """

    def __init__(self, target: targets.Target, seed: int = 0, max_loss_increase: float = 1.0,
                 min_output_cosine: float = 0.5, allow_degraded: bool = False, max_memory: int | None = None) -> None:
        super().__init__()
        self.max_memory = max_memory
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
        libraries = model.meta.get(meta.CUSTOM_OPS_KEY, ())
        calibration: meta.Calibration | None = model.meta.get(meta.CALIBRATION_KEY)
        if calibration is not None:
            feeds = [*calibration.feeds, *calibration.heldout]
        else:
            base = reference_source if isinstance(reference_source, ir.Model) else model
            feeds = calib.generated_feeds(base, count=2, seed=self.seed)
        too_large = memory.whole_model_check(model, self.max_memory)
        if too_large:
            model.meta[VERIFICATION_KEY] = self._weight_by_weight(model, feeds, too_large)
            return ir.passes.PassResult(model, False)
        # Random nodes draw the same noise in the reference, the result and its portable form
        # only with the same seed per node: set one on copies (the passes add no random nodes,
        # so a result without them has a reference without them).
        result, reference_model, portable = model, reference_source, model.meta.get(PORTABLE_KEY)
        randomness = None
        if random_nodes(model):
            reference_model = (frontend.load(reference_source, custom_op_libraries=libraries)
                               if isinstance(reference_source, Path) else frontend.clone(reference_source))
            result = frontend.clone(model)
            portable = frontend.clone(portable) if portable is not None else None
            randomness = seed_random_nodes([reference_model, result, *([portable] if portable is not None else [])],
                                           self.seed)
            randomness["seed"] = self.seed
        reference_path = str(reference_model) if isinstance(reference_model, Path) else reference_model
        # One session at a time, each closed once its outputs are in: a model near the memory
        # bound holds its float weights once, not once per session.
        reference = sessions.session(reference_path, "cpu", custom_op_libraries=libraries)
        float_outputs = [reference.run(f) for f in feeds]
        reference = _ran(reference)
        unstable = self._unstable(model, reference_path, libraries, feeds, reference.output_names, float_outputs,
                                  randomness)
        if not _can_run(target):
            try:
                candidate = sessions.session(result, "cpu")
            except Exception as e:  # noqa: BLE001 - the record says why nothing ran
                logger.warning("no CUDA provider here and the CPU provider cannot run the cuda model: %s", e)
                model.meta[VERIFICATION_KEY] = {"status": "not run: no CUDA provider on this machine"}
                return ir.passes.PassResult(model, False)
            where = "CPUExecutionProvider (no CUDA provider on this machine)"
        else:
            candidate = sessions.session(result, target.name)
            where = candidate.provider
            if target.name == "cuda":
                sessions.check_cuda_placement(model, feeds[0])
        # Each session runs the feeds once; every comparison below reads these outputs.
        outputs = [candidate.run(f) for f in feeds]
        candidate = _ran(candidate)
        if randomness is not None and reference.provider != candidate.provider:
            for name in sorted(noisy_outputs(result) - set(unstable)):
                unstable[name] = (f"depends on random nodes, drawn on {candidate.provider} for the result and on "
                                  f"{reference.provider} for the reference (different generators)")
        vs_float, per_float = compare_outputs(reference, candidate, feeds, float_outputs, outputs, unstable)
        record: dict[str, Any] = {"status": "passed", "provider": where}
        if vs_float["rel_error"] is not None:
            record["vs_float"] = vs_float
        record["vs_float_outputs"] = [c.to_json() for c in per_float]
        for key, chosen in (("not_comparable", [c.name for c in per_float if not c.comparable]),
                            ("compared_on_prefix", [c.name for c in per_float if c.prefix_feeds])):
            if chosen:
                record[key] = chosen
        if randomness is not None:
            record["random_nodes"] = randomness
        for c in per_float:
            if c.compared != WHOLE:
                logger.info("output %r: %s", c.name, c.note)
        if portable is not None:
            self._check_lowering(result, portable, reference_model, candidate, feeds, outputs, vs_float, unstable,
                                 record)
        else:
            record["vs_portable"] = "skipped: the model was not lowered (it is its portable form)"
        model.meta[VERIFICATION_KEY] = record
        broken = [c.name for c in per_float if c.non_finite]
        if broken:
            raise VerificationError(f"the optimized model produces non-finite values in output {broken[0]!r} where "
                                    "the float model does not; use more bits")
        self._check_quality(model, feeds, float_outputs, outputs, vs_float, per_float, record)
        return ir.passes.PassResult(model, False)

    def _weight_by_weight(self, model: ir.Model, feeds, too_large: str) -> dict[str, Any]:
        """Verification that never holds the float model: each quantized weight against its float
        weight (``insert-qdq`` measured ‖W − dequantized‖ / ‖W‖ as it read each one), the packed
        kernels' weights against their portable codes (checked in the lowering, weight by
        weight), and the result run on its target on the feeds: every output present and finite."""
        errors = model.meta.get(meta.WEIGHT_ERRORS_KEY) or {}
        broken = sorted(name for name, e in errors.items() if not e < WEIGHT_ERROR_LIMIT)
        if broken:
            raise VerificationError(
                f"{len(broken)} quantized weights are no closer to their float weights than zero ({broken[0]!r}: "
                f"relative error {errors[broken[0]]:.3g}); this is a hessc bug: rerun with --target onnx and report it")
        record: dict[str, Any] = {"status": "passed (weight by weight)", "mode": "weight by weight",
                                  "end_to_end": f"skipped: {too_large}"}
        if errors:
            worst = max(errors, key=errors.get)
            record["weights"] = {"checked": len(errors), "max_rel_error": round(errors[worst], 6), "worst": worst,
                                 "mean_rel_error": round(float(np.mean(list(errors.values()))), 6)}
        record["lowered_weights"] = ("packed weights equal to their portable codes (checked in the lowering)"
                                     if self.target.lowers_weights else "skipped: the model was not lowered")
        if not _can_run(self.target):
            record["ran"] = "not run: no CUDA provider on this machine"
            return record
        too_large_to_run = memory.session_fits(model, self.max_memory)
        if too_large_to_run:
            record["ran"] = f"skipped: the optimized model's session: {too_large_to_run}"
            logger.warning("verified weight by weight only; the optimized model was not run: %s", too_large_to_run)
            return record
        candidate = sessions.session(model, self.target.name)
        names = candidate.output_names
        non_finite = []
        for feed in feeds:
            for name, out in zip(names, candidate.run(feed)):
                out = np.asarray(out)
                if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
                    non_finite.append(name)
        record["ran"] = {"provider": candidate.provider, "feeds": len(feeds), "outputs": len(names)}
        if non_finite:
            raise VerificationError(f"the optimized model produces non-finite values in output {non_finite[0]!r}; "
                                    "use more bits, or raise --max-memory so it is compared with the float model")
        logger.info("verified weight by weight (%d weights, max relative error %.4f); end to end skipped: %s",
                    len(errors), max(errors.values(), default=0.0), too_large)
        return record

    def _unstable(self, model, reference_path, libraries, feeds, names, float_outputs, randomness) -> dict[str, str]:
        """Outputs that cannot be compared whatever the result computes: those on which a second
        reference session (generators restart per session) disagrees with the first. (Where the
        result runs on another provider than the reference, those that depend on random nodes are
        added by the caller: each provider has its own generator.)"""
        custom = any(n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type, n.overload or "") not in model.functions
                     for n in _all_nodes(model))
        if randomness is None and not custom:
            return {}
        again = sessions.session(reference_path, "cpu", custom_op_libraries=libraries)
        unstable = unstable_outputs(names, float_outputs, [again.run(f) for f in feeds])
        if randomness is not None:
            randomness["reference_runs"] = 2
        return unstable

    def _check_quality(self, model, feeds, float_outputs, outputs, vs_float, per_float, record) -> None:
        """No silent collapse: a result whose next-token loss (language models) rose by more than
        ``max_loss_increase`` nats, or whose outputs' cosine to float fell below
        ``min_output_cosine``, is refused unless degraded results are allowed. Only comparable
        float outputs count; with none, the check is skipped and the record says why."""
        from hessc.ir.weights import token_ids_input

        reasons = []
        quality: dict[str, Any] = {"output_cosine": vs_float["cosine"], "min_output_cosine": self.min_output_cosine}
        agreement = {c.name: c.agreement for c in per_float if c.comparable and c.how == "agreement"}
        if agreement:
            quality["agreement"] = agreement
        prefix = [c.name for c in per_float if c.comparable and c.prefix_feeds]
        if prefix:
            quality["compared_on_prefix"] = prefix
        if vs_float["cosine"] is None:
            why = "no float output is comparable with the float model's (" + _not_comparable_reason(per_float) + ")"
            quality["skipped"] = why
            record["quality"] = quality
            record["status"] = "passed (quality not checked: no float output is comparable)"
            logger.warning("the result's quality was not checked: %s", why)
            return
        ids = token_ids_input(model)
        if (ids is not None and per_float and per_float[0].compared == WHOLE
                and all(_next_token_logits(f.get(ids), outs) for f, outs in zip(feeds, float_outputs))):
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
            on_prefix = f"; {', '.join(map(repr, prefix))} compared on a common prefix, their lengths differ" if prefix else ""
            reasons.append(f"its outputs' cosine to the float model is {vs_float['cosine']:.3f} "
                           f"(limit {self.min_output_cosine:g}, --min-output-cosine{on_prefix})")
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

    def _check_lowering(self, result, portable, reference, candidate, feeds, outputs, vs_float, unstable,
                        record) -> None:
        """The lowered model against its portable form: end to end on the float outputs of the same
        shape on every feed (a length that moves with the kernels' rounding says nothing about
        them), and op by op when the outputs are far from float's or not all compared whole."""
        target = self.target
        # Unoptimized, the portable form dequantizes every weight on every run: without the arena
        # those float copies are freed as each layer is done, not kept for the next run.
        portable_session = sessions.session(portable, "cpu", optimize=False, arena=False)
        portable_outputs = [portable_session.run(f) for f in feeds]
        portable_session = _ran(portable_session)
        lowered, per_output = compare_outputs(portable_session, candidate, feeds, portable_outputs, outputs,
                                              unstable=unstable, align=False)
        record["vs_portable"] = (lowered if lowered["rel_error"] is not None else
                                 "skipped: no float output is comparable with the portable form's ("
                                 + _not_comparable_reason(per_output) + ")")
        record["vs_portable_outputs"] = [c.to_json() for c in per_output]
        if any(c.non_finite for c in per_output):
            raise VerificationError(
                f"the lowered {target.name} model produces non-finite outputs where its portable Q/DQ form does not; "
                "this is a hessc bug: rerun with --target onnx and report it"
            )
        decided = [c for c in per_output if c.compared == WHOLE and c.how == "values"]
        open_ = [c.name for c in per_output if c.how != "agreement" and c.compared != WHOLE]
        conditioned = vs_float["rel_error"] is not None and vs_float["rel_error"] < CONDITIONED
        if conditioned:
            limit = max(target.tolerance, 0.5 * vs_float["rel_error"])
            bad = [c for c in decided if c.rel_error > limit]
            if bad:
                raise VerificationError(
                    f"the lowered {target.name} model's output {bad[0].name!r} differs from its portable Q/DQ form by "
                    f"{bad[0].rel_error:.2%} (limit {limit:.2%}); this is a hessc bug: rerun with --target onnx and report it"
                )
            if decided and not open_:
                record["lowered_ops"] = "checked end to end"
                return
        if isinstance(reference, Path):
            reference = frontend.load(reference, custom_op_libraries=result.meta.get(meta.CUSTOM_OPS_KEY, ()))
        ops = check_lowered_ops(result, portable, feeds[0], target, reference)
        if open_ or not decided:
            ops["why"] = ("not every float output was compared whole end to end: " + ", ".join(map(repr, open_))
                          if open_ else "no float output to compare end to end")
        elif not conditioned:
            ops["why"] = "the outputs are far from float's (or not comparable with them)"
        record["lowered_ops"] = ops
        if ops.get("failed"):
            first = ops["failed"][0]
            raise VerificationError(
                f"the lowered {target.name} kernel computing {first['output']!r} differs from its portable Q/DQ form by "
                f"{first['rel_error']:.2%} on the same inputs (limit {first['limit']:.2%}); this is a hessc bug: "
                "rerun with --target onnx and report it"
            )
