"""8-bit activations: static per-tensor Q/DQ on the inputs of quantized layers.

For an activation ``x`` with calibrated range ``[lo, hi]`` (widened to contain 0, so that zero
padding stays exact), the uint8 affine grid is

    s = (hi − lo) / 255,    z = round(−lo / s),    x̂ = s · (clip(round(x / s) + z, 0, 255) − z)

which is ONNX's ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``. Two uses:

* ``--activations 8``: inserted before every MatMul/Gemm whose weight is quantized, it makes the
  portable model W·A8; lowering then maps it to what each target runs well (on the CPU,
  MatMulNBits' own int8 activation path, which quantizes dynamically per block and is finer than
  these static per-tensor ranges).
* the static int8 region (:func:`static_region`): on a target whose convs run as static int8
  kernels, every activation entering or leaving such a layer, and the cheap ops between them
  (residual ``Add``, ``Concat``, pooling, ``Sigmoid``, ``Mul``, ...), is quantized once, so ONNX
  Runtime fuses each ``DequantizeLinear → op → QuantizeLinear`` group into its QLinear kernel and
  the activations stay uint8 from layer to layer. A ``Relu``/``Clip`` after a layer is absorbed
  into the following ``QuantizeLinear`` when the grid saturates exactly where it clips, and the
  conv's float bias becomes the int32 ``DequantizeLinear`` the fused kernel needs (scale
  ``s_x · s_w``). Ranges are the calibrated min/max
  (:func:`hessc.runtime.calibration.activation_ranges` says why not a clipped range).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from hessc.ir import frontend, meta

logger = logging.getLogger(__name__)

ACT_QUANT_KEY = "hessc.act_quant"
"""``node.meta`` key on an activation ``DequantizeLinear``: the (lo, hi) range it quantizes."""

ACT_RANGE_KEY = "hessc.act_range"
"""``value.meta`` key on an activation: its calibrated (lo, hi) range."""

FLOAT_KEY = "hessc.int8_float"
"""``node.meta`` key on a static int8 layer that keeps float activations: why
(:mod:`hessc.runtime.tune_regions` sets it where the int8 form measured slower)."""


def quantized_layer_inputs(model: ir.Model) -> dict[str, list[ir.Node]]:
    """Activation value name → the MatMul/Gemm nodes that read it with a quantized weight."""
    readers: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        producer = weight.producer() if weight is not None else None
        if producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer()  # a head tied to its table reads Transpose(DQ(E))
        if producer is None or producer.op_type != "DequantizeLinear" or meta.QUANT_KEY not in producer.meta:
            continue
        x = node.inputs[0]
        if x is not None and x.name:
            readers.setdefault(x.name, []).append(node)
    return readers


# Ops that join the static int8 region when every activation input comes out of it, with the
# positions of their activation inputs (None: all). ONNX Runtime fuses DQ → op → Q for each
# (QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool,
# QLinearSigmoid, QLinearLeakyRelu, uint8 MaxPool and Resize).
GLUE_OPS: dict[str, tuple[int, ...] | None] = {
    "Add": None, "Mul": None, "Concat": None, "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,),
    "Sigmoid": (0,), "LeakyRelu": (0,), "Resize": (0,),
}

SAME_GRID_OPS = ("MaxPool", "Resize")
"""Region ops whose output takes their input's grid: ORT then drops their Q/DQ and runs them on
uint8 directly (their outputs are values of their input, or between them)."""

ABSORBED_OPS = ("Relu", "Clip")

BIAS_LIMIT = 2.0**30
"""The largest int32 bias code, leaving the kernel's accumulator headroom for the products."""
"""Activations a following ``QuantizeLinear`` can absorb: its grid saturates where they clip."""


@dataclasses.dataclass
class StaticRegion:
    """The static int8 part of a graph.

    Attributes:
        nodes: the region's nodes (static int8 layers and the glue between them), graph order.
        points: the values quantized, by name: each gets one Q/DQ pair read by all its uses.
        chains: per point that sits after an absorbed ``Relu``/``Clip`` chain, the chain's nodes
            (the layer output they start from is ``chains[name][0].inputs[0]``).
        same_grid: point name → the point whose grid it takes (outputs of :data:`SAME_GRID_OPS`).
    """

    nodes: list[ir.Node]
    points: dict[str, ir.Value]
    chains: dict[str, list[ir.Node]]
    same_grid: dict[str, str]


HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def output_tail(graph: ir.Graph) -> set[int]:
    """Ids of the nodes downstream of which no Conv/MatMul/Gemm runs: the model's output layers
    (a detector's box and score heads, a segmenter's last conv) and what they feed into the
    outputs. Quantizing them would put the model's own outputs on an 8-bit grid for little speed."""
    heavy_below: dict[int, bool] = {}
    for node in reversed(list(graph)):
        heavy_below[id(node)] = any(
            use.node.op_type in HEAVY_OPS or heavy_below.get(id(use.node), True)
            for out in node.outputs for use in out.uses()
        )
    return {i for i, below in heavy_below.items() if not below}


def _static_layer(node: ir.Node, ops: frozenset[str]) -> bool:
    if node.op_type not in ops or len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return False
    if FLOAT_KEY in node.meta:
        return False
    producer = node.inputs[1].producer()
    plan = producer.meta.get(meta.QUANT_KEY) if producer is not None and producer.op_type == "DequantizeLinear" else None
    return plan is not None and bool(plan.narrow) and node.inputs[0].const_value is None


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    positions = GLUE_OPS.get(node.op_type, (0,))
    inputs = list(node.inputs) if positions is None else [node.inputs[i] for i in positions if i < len(node.inputs)]
    return [v for v in inputs if v is not None]


def static_region(model: ir.Model, ops: frozenset[str]) -> StaticRegion:
    """The static int8 region: layers of ``ops`` with a narrow 8-bit weight, and the glue ops whose
    activation inputs all come out of the region (through absorbed ``Relu``/``Clip`` chains too)."""
    graph = model.graph
    inside: set[int] = set()
    nodes: list[ir.Node] = []
    tail = output_tail(graph)

    def produced(v: ir.Value) -> bool:
        while True:
            producer = v.producer()
            if producer is None:
                return False
            if id(producer) in inside:
                return True
            if producer.op_type not in ABSORBED_OPS or producer.inputs[0] is None:
                return False
            v = producer.inputs[0]

    for node in graph:
        if _static_layer(node, ops):
            pass
        elif node.op_type in GLUE_OPS:
            acts = _activation_inputs(node)
            if not acts or any(v.const_value is not None or not produced(v) for v in acts):
                continue
            if id(node) in tail or any(out.is_graph_output() for out in node.outputs):
                continue
        else:
            continue
        inside.add(id(node))
        nodes.append(node)

    points: dict[str, ir.Value] = {}
    chains: dict[str, list[ir.Node]] = {}
    same_grid: dict[str, str] = {}

    def point_after(v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
        chain: list[ir.Node] = []
        while not v.is_graph_output():
            uses = list(v.uses())
            if len(uses) != 1 or uses[0].node.op_type not in ABSORBED_OPS or uses[0].idx != 0:
                break
            chain.append(uses[0].node)
            v = uses[0].node.outputs[0]
        return v, chain

    for node in nodes:
        for v in _activation_inputs(node):
            if v.name:
                points.setdefault(v.name, v)
        for out in node.outputs:
            point, chain = point_after(out)
            if point.is_graph_output() or not point.name or not list(point.uses()):
                continue
            points.setdefault(point.name, point)
            if chain:
                chains[point.name] = chain
            if node.op_type in SAME_GRID_OPS and node.inputs[0] is not None and not chain:
                same_grid[point.name] = node.inputs[0].name
    return StaticRegion(nodes, points, chains, same_grid)


def uint8_grid(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of the uint8 grid covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.float32(scale) >= np.finfo(np.float32).tiny:  # an (almost) constant activation
        scale = 1.0
    zero = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


class AnnotateActivationRangesPass(ir.passes.InPlacePass):
    """Annotates the activations to quantize with their calibrated range.

    An analysis: streams the calibration feeds (``model.meta[meta.CALIBRATION_KEY]``) through
    ORT and stores each range (min, max) under :data:`ACT_RANGE_KEY` on the activation value: the
    inputs of quantized MatMul/Gemm layers (``matmul_inputs``) and the points of the static int8
    region (``static_int8_ops``).
    """

    def __init__(self, matmul_inputs: bool = True, static_int8_ops: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.matmul_inputs = matmul_inputs
        self.static_int8_ops = static_int8_ops

    def requires(self, model: ir.Model) -> None:
        if model.meta.get(meta.CALIBRATION_KEY) is None:
            raise ir.passes.PreconditionError("annotate-activation-ranges needs calibration data; pass --calibration")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from hessc.runtime import calibration

        feeds = model.meta[meta.CALIBRATION_KEY].feeds
        layers = quantized_layer_inputs(model) if self.matmul_inputs else {}
        if layers:
            ranges = calibration.activation_ranges(model, list(layers), feeds)
            for name, readers in layers.items():
                meta.set_annotation(readers[0].inputs[0], ACT_RANGE_KEY, tuple(float(v) for v in ranges[name]))
        region = static_region(model, self.static_int8_ops) if self.static_int8_ops else None
        if region is not None and region.points:
            names = [n for n in region.points if n not in region.same_grid]
            ranges = calibration.activation_ranges(model, names, feeds)
            for name in names:
                meta.set_annotation(region.points[name], ACT_RANGE_KEY, tuple(float(v) for v in ranges[name]))
            logger.info("static int8 region: %d layers and glue ops, %d activations", len(region.nodes),
                        len(region.points))
        return ir.passes.PassResult(model, False)


class InsertActivationQDQPass(ir.passes.InPlacePass):
    """Inserts ``QuantizeLinear → DequantizeLinear`` (uint8, per tensor) on the activations
    :class:`AnnotateActivationRangesPass` annotated: quantized MatMul/Gemm inputs
    (``matmul_inputs``), and the points of the static int8 region (``static_int8_ops``), whose
    absorbable ``Relu``/``Clip`` chains are folded into the Q and whose layers' float biases
    become int32 ``DequantizeLinear``."""

    def __init__(self, matmul_inputs: bool = True, static_int8_ops: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.matmul_inputs = matmul_inputs
        self.static_int8_ops = static_int8_ops

    def requires(self, model: ir.Model) -> None:
        missing = []
        if self.matmul_inputs:
            missing = [n for n, readers in quantized_layer_inputs(model).items()
                       if readers[0].inputs[0].meta.get(ACT_RANGE_KEY) is None and not _quantized(readers[0].inputs[0])]
        if self.static_int8_ops:
            region = static_region(model, self.static_int8_ops)
            missing += [n for n, v in region.points.items()
                        if n not in region.same_grid and v.meta.get(ACT_RANGE_KEY) is None and not _quantized(v)]
        if missing:
            raise ir.passes.PreconditionError(
                f"insert-activation-qdq: no calibrated range on {len(missing)} activations ({missing[0]}); "
                "run annotate-activation-ranges first"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        if self.matmul_inputs:
            for name, readers in quantized_layer_inputs(model).items():
                x = readers[0].inputs[0]
                rng = x.meta.get(ACT_RANGE_KEY)
                if rng is None or _quantized(x):
                    continue
                _insert_pair(graph, x, x, rng, uint8_grid(*rng), readers)
                count += 1
        if self.static_int8_ops:
            count += self._static(model)
        logger.info("8-bit activations on %d values", count)
        return ir.passes.PassResult(model, count > 0)

    def _static(self, model: ir.Model) -> int:
        graph = model.graph
        region = static_region(model, self.static_int8_ops)
        grids: dict[str, tuple[np.float32, np.uint8]] = {}
        count = 0
        absorbed = 0
        for name, point in region.points.items():
            if _quantized(point) or any(_quantized_use(u.node) for u in point.uses()):
                continue
            root = name
            while root in region.same_grid:
                root = region.same_grid[root]
            rng = region.points[root].meta.get(ACT_RANGE_KEY)
            grid = grids.setdefault(root, uint8_grid(*rng))
            chain = region.chains.get(name, [])
            x = point
            if chain and all(_absorbs(node, grid) for node in chain):
                x = chain[0].inputs[0]
            readers = [u.node for u in point.uses()]
            _insert_pair(graph, point, x, rng, grid, readers)
            if x is not point:
                for node in reversed(chain):
                    graph.remove(node, safe=True)
                absorbed += len(chain)
            count += 1
        biases = sum(_quantize_bias(graph, node) for node in region.nodes if node.op_type in self.static_int8_ops)
        logger.info("static int8: %d activations quantized, %d Relu/Clip absorbed, %d int32 biases",
                    count, absorbed, biases)
        return count


def _insert_pair(graph: ir.Graph, value: ir.Value, x: ir.Value, rng, grid, readers) -> None:
    """``Q(x) → DQ`` on ``grid``, read by ``readers`` in place of ``value`` (``x`` is ``value`` or
    the start of the ``Relu``/``Clip`` chain the pair absorbs)."""
    scale, zero = grid
    name = value.name
    # The scale has the activation's type (QuantizeLinear binds both): float16 in a float16 model.
    dtype = np.float32 if value.dtype is None else value.dtype.numpy()
    s_val = frontend.new_initializer(graph, f"{name}_act_scale", np.array(scale, dtype=dtype))
    z_val = frontend.new_initializer(graph, f"{name}_act_zp", np.array(zero, dtype=np.uint8))
    q = ir.node("QuantizeLinear", [x, s_val, z_val], name=f"{name}_act_q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{name}_act_dq")
    q.outputs[0].name, dq.outputs[0].name = f"{name}_act_q", f"{name}_act_dq"
    dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
    dq.meta[ACT_QUANT_KEY] = tuple(float(v) for v in rng)
    order = {id(n): i for i, n in enumerate(graph)}
    first = min(readers, key=lambda n: order[id(n)])
    graph.insert_before(first, [q, dq])
    for node in readers:
        for i, v in enumerate(node.inputs):
            if v is value:
                node.replace_input_with(i, dq.outputs[0])


def _absorbs(node: ir.Node, grid: tuple[np.float32, np.uint8]) -> bool:
    """Whether ``Q(node(x)) == Q(x)`` on ``grid``: the grid's codes saturate where the node clips."""
    scale, zero = float(grid[0]), int(grid[1])
    if node.op_type == "Relu":
        lo, hi = 0.0, np.inf
    else:  # Clip: bounds from inputs (opset ≥ 11); absent means unbounded
        bounds = []
        for i in (1, 2):
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is not None and v.const_value is None:
                return False
            bounds.append(None if v is None else float(v.const_value.numpy()))
        lo = -np.inf if bounds[0] is None else bounds[0]
        hi = np.inf if bounds[1] is None else bounds[1]
    code = lambda t: np.round(np.float32(t) / np.float32(scale)) + zero  # noqa: E731
    return bool((lo == -np.inf or code(lo) <= 0) and (hi == np.inf or code(hi) >= 255))


def _quantize_bias(graph: ir.Graph, node: ir.Node) -> int:
    """Replaces a static int8 layer's float bias by ``DequantizeLinear(int32, s_x · s_w, axis=0)``,
    the bias form of the fused kernel; 1 when it did."""
    if len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2].const_value is None:
        return 0
    x_dq, w_dq = node.inputs[0].producer(), node.inputs[1].producer()
    if x_dq is None or ACT_QUANT_KEY not in x_dq.meta or w_dq is None:
        return 0
    s_x = float(x_dq.inputs[1].const_value.numpy())
    s_w = w_dq.inputs[1].const_value.numpy().astype(np.float64).reshape(-1)
    bias = node.inputs[2].const_value.numpy().astype(np.float64).reshape(-1)
    # A channel of near-zero weights has a tiny s_w, and its bias in units of s_x · s_w would
    # overflow int32 (and the kernel's int32 accumulator): widen that channel's weight scale
    # until the bias fits in BIAS_LIMIT, re-rounding its (tiny) weights on the wider grid.
    needed = np.abs(bias) / (s_x * BIAS_LIMIT)
    wide = needed > s_w
    if np.any(wide):
        codes = w_dq.inputs[0].const_value.numpy()
        weights = codes.reshape(codes.shape[0], -1).astype(np.float64) * s_w[:, None]
        s_w = np.where(wide, needed, s_w)
        limit = 2 ** 7 - 1
        recoded = np.clip(np.round(weights / s_w[:, None]), -limit, limit).astype(codes.dtype).reshape(codes.shape)
        w_dq.inputs[0].const_value = ir.tensor(recoded, name=w_dq.inputs[0].name)
        w_dq.inputs[1].const_value = ir.tensor(s_w.astype(w_dq.inputs[1].dtype.numpy()), name=w_dq.inputs[1].name)
        logger.debug("%s: widened the weight scale of %d channels for an int32 bias", node.name, int(wide.sum()))
    scale = (s_x * s_w).astype(node.inputs[2].dtype.numpy())
    safe = np.where(scale != 0, scale, 1.0).astype(np.float64)
    codes = np.clip(np.round(bias / safe), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    base = node.inputs[2].name or f"{node.name}_bias"
    q = frontend.new_initializer(graph, f"{base}_q", codes)
    if q.name != f"{base}_q":  # one bias read by several nodes: each gets its own names
        base = q.name
    s = frontend.new_initializer(graph, f"{base}_scale", scale)
    dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": 0}, name=f"{base}_dq")
    dq.outputs[0].name = f"{base}_dq"
    dq.outputs[0].shape, dq.outputs[0].type = node.inputs[2].shape, node.inputs[2].type
    graph.insert_before(node, dq)
    old = node.inputs[2]
    node.replace_input_with(2, dq.outputs[0])
    if not old.uses() and old.name in graph.initializers:
        graph.initializers.pop(old.name)
    return 1


def _quantized_use(node: ir.Node) -> bool:
    return node.op_type == "QuantizeLinear"


def _quantized(x: ir.Value) -> bool:
    producer = x.producer()
    return producer is not None and ACT_QUANT_KEY in producer.meta


