"""Static int8 regions, kept only where they run faster: each connected part of the region timed
in ONNX Runtime at the serving shape against the same part with float activations.

A static int8 conv pays a ``QuantizeLinear`` on every activation entering its region and a
``DequantizeLinear`` on every one leaving it, and ORT's int8 conv kernels beat its fp32 ones
only where the convs are wide enough. A region broken up by ops that have no int8 kernel
(``PRelu``, ``Softmax``, ...) may therefore run slower than float: MTCNN's P-Net (three small
convs, each between ``PRelu``\\ s) took 0.65 ms per 48×48 image as static int8 against 0.55 ms
with the same 8-bit weights dequantized in front of float convs (fp32: 0.51 ms), and 12.3 ms
against 8.9 ms at 240×320. So it is measured:

* the region (:func:`hessc.passes.activations.static_region`) splits into its connected parts:
  layers and glue ops linked through the activations they quantize. Beyond :data:`MAX_GROUPS`
  parts, neighbouring parts are timed together;
* in graph order, each part is timed as the whole model with and without that part's Q/DQ
  (the weights keep their 8-bit codes either way: both forms cost the same bytes), the sessions
  interleaved at the serving shape; the int8 form stays only where it is faster by more than
  :data:`~hessc.runtime.tune.TIE` (the float form is the more exact);
* a part that stays float has its layers marked (:data:`FLOAT_KEY` on the node), so
  ``insert-activation-qdq`` leaves it out, and the plan lists every part with its times;
* such a part is then timed once more with its weights in float: dequantized weights run on every
  call and ORT does not prepack them for its float convs (a 64-channel grouped 3×3 conv at 56×56:
  1.74× fp32 as int8, no better dequantized); where float weights are faster by more than
  :data:`FP32_MARGIN`, the part keeps them (32 bits each: the plan lists the weights under
  ``float_weights`` and why);
* the timings are cached per machine beside the kernel timings, keyed by the graph's structure
  and the serving shape, so a second compile on the machine measures nothing and makes the same
  choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Iterator

import numpy as np
import onnx_ir as ir

from hessc.ir import frontend, meta
from hessc.passes import activations
from hessc.runtime import tune

logger = logging.getLogger(__name__)

REGIONS_KEY = "hessc.int8_regions"
"""``model.meta`` key: the record of :class:`TuneStaticRegionsPass` (also saved in the plan)."""

FLOAT_KEY = activations.FLOAT_KEY
_PART_KEY = "hessc.int8_part"

FP32_MARGIN = 0.05
"""A part whose float-activation form runs slower than with float weights by more than this
keeps float weights (32 bits each; the trade is in the plan)."""

FP32_REASON = ("kept in float: at the serving shape its static int8 form and its dequantized 8-bit form both ran "
               "slower than float weights (the plan's int8_regions)")

MAX_GROUPS = 16
"""At most this many parts of the region are timed one by one (each costs two sessions)."""

TARGET_MS = 300.0
"""Each form is timed for about this long per comparison (between 5 and 500 rounds: sub-millisecond
models need many rounds for a stable median on a shared machine)."""


def region_parts(region: activations.StaticRegion) -> list[list[ir.Node]]:
    """The region's connected parts, in graph order: nodes linked through a quantized activation
    (a producer in the region, through an absorbed ``Relu``/``Clip`` chain, and the region's
    readers of it are one part; so are region nodes reading the same outside value)."""
    order = {id(n): i for i, n in enumerate(region.nodes)}
    parent = list(range(len(region.nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for name, point in region.points.items():
        start = region.chains[name][0].inputs[0] if name in region.chains else point
        touching = [order[id(u.node)] for u in point.uses() if id(u.node) in order]
        producer = start.producer()
        if producer is not None and id(producer) in order:
            touching.append(order[id(producer)])
        for other in touching[1:]:
            union(touching[0], other)
    parts: dict[int, list[ir.Node]] = {}
    for i, node in enumerate(region.nodes):
        parts.setdefault(find(i), []).append(node)
    return [parts[k] for k in sorted(parts)]


def _groups(parts: list[list[ir.Node]], ops: frozenset[str], limit: int) -> list[list[ir.Node]]:
    """The layers of each part (glue follows its layers), neighbouring parts merged into at most
    ``limit`` groups."""
    layers = [[n for n in part if n.op_type in ops] for part in parts]
    layers = [group for group in layers if group]
    if len(layers) <= limit:
        return layers
    bounds = np.linspace(0, len(layers), limit + 1).round().astype(int)
    return [[n for group in layers[a:b] for n in group] for a, b in zip(bounds[:-1], bounds[1:])]


def structure_digest(model: ir.Model, feed: dict[str, np.ndarray]) -> str:
    """A digest of what the model's speed depends on: ops, attributes, weight shapes and types,
    and the serving shape; not the weight values or the calibrated ranges."""
    h = hashlib.sha1()
    for name, value in sorted(feed.items()):
        h.update(f"{name}{value.shape}{value.dtype}".encode())
    for graph in frontend.graphs(model):
        for node in graph:
            attrs = sorted((k, a.value if a.type in (ir.AttributeType.INT, ir.AttributeType.FLOAT,
                                                     ir.AttributeType.INTS, ir.AttributeType.FLOATS,
                                                     ir.AttributeType.STRING) else a.type.name)
                           for k, a in node.attributes.items())
            inputs = [None if v is None else (v.const_value.shape if v.const_value is not None else v.name, v.dtype)
                      for v in node.inputs]
            h.update(repr((node.domain, node.op_type, attrs, inputs)).encode())
    return h.hexdigest()[:16]


class TuneStaticRegionsPass(ir.passes.InPlacePass):
    """Marks the parts of the static int8 region that run slower than float at the serving shape,
    measured, so that ``insert-activation-qdq`` keeps them in float.

    Args:
        static_int8_ops: the ops the target runs as static int8 kernels.
        cache: the timing cache (default: the machine's, :func:`hessc.runtime.tune.default_cache`).
        float_weights: a part left float may keep float weights where they run faster (False
            under a size budget, which priced the 8-bit codes: the record says so).
    """

    def __init__(self, static_int8_ops: frozenset[str], cache: tune.TimingCache | None = None,
                 float_weights: bool = True) -> None:
        super().__init__()
        self.static_int8_ops = static_int8_ops
        self.cache = cache
        self.float_weights = float_weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        region = activations.static_region(model, self.static_int8_ops)
        groups = _groups(region_parts(region), self.static_int8_ops, MAX_GROUPS)
        if not groups:
            return ir.passes.PassResult(model, False)
        cache = self.cache if self.cache is not None else tune.default_cache()
        feed = tune.serving_feed(model)
        entries = cache.entries.setdefault(f"static-int8 regions {structure_digest(model, feed)}", {})
        for index, group in enumerate(groups):  # the mark travels with the nodes into copies
            for node in group:
                node.meta[_PART_KEY] = index
        lowered = None  # the model with its other weights lowered as the target runs them, made once
        forms: dict[int, str] = {}  # group → "float" (float activations) or "fp32" (float weights too)
        record_groups = []
        measured = False
        current = None  # a session of the model with the groups' ``forms``

        def compare(key: str, index: int, form: str) -> list[float]:
            """[ms as it stands, ms with group ``index`` in ``form``], cached."""
            nonlocal lowered, current, variant, measured
            timing = entries.get(key)
            if timing is None:
                lowered = lowered or self._lowered(model)
                current = current or self._session(lowered, forms)
                variant = self._session(lowered, {**forms, index: form})
                timing = entries[key] = _time_pair(current.run, variant.run, feed)
                measured = True
            return timing

        for index, group in enumerate(groups):
            variant = None
            int8_ms, float_ms = compare(f"float {sorted(forms.items())} + {index}", index, "float")
            entry = {"layers": [n.name for n in group], "int8_ms": int8_ms, "float_ms": float_ms, "chosen": "int8"}
            if int8_ms >= float_ms * (1 - tune.TIE):  # float activations: the more exact form wins a tie
                forms[index], current, entry["chosen"] = "float", variant, "float"
                variant = None
                if not self.float_weights:
                    entry["fp32_weights"] = "not tried: a size budget priced these weights at 8 bits"
                    record_groups.append(entry)
                    continue
                # Dequantized weights run on every call, and ORT does not prepack them for its
                # float convs: the part's weights in float may be faster still (32 bits each).
                float_ms, fp32_ms = compare(f"fp32 {sorted(forms.items())} + {index}", index, "fp32")
                entry["fp32_weights_ms"] = fp32_ms
                if float_ms >= fp32_ms * (1 + FP32_MARGIN):
                    forms[index], current, entry["chosen"] = "fp32", variant, "fp32 weights"
            record_groups.append(entry)
        if measured:
            cache.save()
        for group in groups:
            for node in group:
                node.meta.pop(_PART_KEY, None)
        folded = []
        for index, form in forms.items():
            for node in groups[index]:
                node.meta[FLOAT_KEY] = "its static int8 form measured slower than float activations at the serving shape"
                if form == "fp32" and node.op_type in self.static_int8_ops:
                    folded += fold_weight(model, node, FP32_REASON)
        record = {"serving_input": {k: list(v.shape) for k, v in feed.items()}, "machine": cache.machine,
                  "groups": record_groups,
                  "float_layers": sum(len(groups[i]) for i, f in forms.items() if f == "float"),
                  "fp32_layers": sum(len(groups[i]) for i, f in forms.items() if f == "fp32"),
                  "int8_layers": sum(len(g) for i, g in enumerate(groups) if i not in forms), "float_weights": folded}
        model.meta[REGIONS_KEY] = record
        logger.info("tune-int8-regions: %d of %d parts of the static int8 region stay int8 (%s)",
                    len(groups) - len(forms), len(groups),
                    ", ".join(f"{g['int8_ms']} vs {g['float_ms']} ms" for g in record_groups))
        return ir.passes.PassResult(model, bool(forms))

    @staticmethod
    def _lowered(model: ir.Model) -> ir.Model:
        """A copy whose MatMul/Gemm/Gather weights are lowered to the CPU's kernels, so that the
        trial models run at the speed of the result (the portable form dequantizes every weight
        on every run, which can cost more than the whole region)."""
        from hessc.runtime import lower

        copy = frontend.clone(model)
        with _quiet(lower.__name__):
            lower.LowerWeightsPass(lower.LowerConfig(target="cpu"))(copy)
        return copy

    def _session(self, lowered: ir.Model, forms: dict[int, str]):
        """A session on a copy of the lowered model with the static int8 region's Q/DQ in place,
        the groups of ``forms`` left out (``fp32``: their weights in float too)."""
        from hessc.runtime import sessions

        copy = frontend.clone(lowered)
        for node in list(copy.graph):
            form = forms.get(node.meta.get(_PART_KEY))
            if form is not None:
                node.meta[FLOAT_KEY] = "timed in float"
            if form == "fp32" and node.op_type in self.static_int8_ops:
                fold_weight(copy, node, "timed with float weights")
        with _quiet(activations.__name__):
            activations.InsertActivationQDQPass(False, self.static_int8_ops)(copy)
        return sessions.session(copy, "cpu", spinning=False)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The trial copies' rewrites are not the compile's: their info logs stay out of its log."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def fold_weight(model: ir.Model, node: ir.Node, reason: str) -> list[str]:
    """Replaces the ``DequantizeLinear`` feeding ``node``'s weight by its float values (exactly
    what it computes) and records the weight as kept in float for ``reason``; the names folded."""
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or any(v is None or v.const_value is None for v in dq.inputs):
        return []
    plan = dq.meta.get(meta.QUANT_KEY)
    codes = dq.inputs[0].const_value.numpy().astype(np.float64)
    scale = dq.inputs[1].const_value.numpy().astype(np.float64)
    zero = dq.inputs[2].const_value.numpy().astype(np.float64) if len(dq.inputs) > 2 else 0.0
    if dq.attributes.get_int("block_size", 0):
        return []  # a blocked weight is no static int8 weight
    axis = dq.attributes.get_int("axis", 1) % codes.ndim
    shape = [1] * codes.ndim
    shape[axis] = -1
    values = ((codes - np.reshape(zero, shape if np.ndim(zero) else ())) * np.reshape(scale, shape if scale.ndim else ()))
    name = plan.name if plan is not None else (dq.outputs[0].name or "weight")
    # DequantizeLinear computes in its scale's type (float16 in a float16 model).
    weight = frontend.new_initializer(model.graph, f"{dq.outputs[0].name}_float", values.astype(dq.inputs[1].dtype.numpy()))
    node.replace_input_with(1, weight)
    if not dq.outputs[0].uses():
        operands = [v for v in dq.inputs if v is not None]
        model.graph.remove(dq, safe=True)
        for value in operands:
            if not value.uses() and value.name in model.graph.initializers:
                model.graph.initializers.pop(value.name)
    materialized = dict(model.meta.get(meta.MATERIALIZED_KEY) or {})
    materialized.pop(name, None)
    model.meta[meta.MATERIALIZED_KEY] = materialized
    model.meta.setdefault(meta.SKIPPED_KEY, {})[name] = reason
    return [name]


def _time_pair(run_a, run_b, feed: dict[str, np.ndarray]) -> list[float]:
    from hessc.runtime import sessions

    return [round(ms, 4) for ms in sessions.interleaved_latency_ms([run_a, run_b], feed, None, target_ms=TARGET_MS)]
