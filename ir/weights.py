"""Graph queries: the weight-bearing nodes of a model and a normalised view of their weights.

A weight is a constant, float, initializer operand of

* ``MatMul(x, B)`` with ``B`` of shape (in, out): ``W = Bᵀ``;
* ``Gemm(x, B)`` with ``transA = 0``: ``W = B`` when ``transB = 1``, else ``Bᵀ``;
* ``Conv(x, W)``: ``W`` of shape (out, in/groups, *kernel), viewed as (out, in/groups · prod(kernel));
* ``ConvTranspose(x, W)``: ``W`` of shape (in, out/groups, *kernel), viewed as
  (out/groups, in · prod(kernel)): one row per output channel of a group;
* ``Gather(E, ids)`` on axis 0 (an embedding table of shape (vocab, dim)): ``W = E``;
* ``LSTM``/``GRU``/``RNN(X, W, R)``: two weights, the input weights ``W`` (directions, gates ·
  hidden, input) and the recurrent weights ``R`` (directions, gates · hidden, hidden), each
  viewed as (directions · gates · hidden, input or hidden): one row per gate unit.

``W`` has shape (out, in) and quantization groups run along ``in`` (``dim`` for embeddings).
Weights are found in every graph, subgraphs of ``If``/``Loop``/``Scan`` included; the front door
makes each one a main-graph initializer that a subgraph node reads from the outer scope.

A value computed from a weight (its ``DequantizeLinear``) for readers in several graphs is placed
by :func:`definition_point`: ONNX lets a node read values of its own graph and of the graphs that
enclose it, never those of a sibling branch, so the value goes in the innermost graph enclosing
every reader, and out of any ``Loop``/``Scan`` body, whose nodes run once per iteration.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from hessc.ir import frontend

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", *RECURRENT_OPS)
LOOP_OPS = ("Loop", "Scan")
"""Ops whose body runs once per iteration."""
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """One weight-bearing node.

    Attributes:
        name: the user-facing name (the original parameter name where the exporter kept it).
        node: the consuming node.
        graph: the graph holding the node (the main graph or a subgraph).
        value: the weight value (an initializer).
        op: ``MatMul``, ``Gemm``, ``Conv``, ``ConvTranspose``, ``Gather``, ``LSTM``, ``GRU`` or ``RNN``.
        transposed: the stored tensor is ``Wᵀ`` (in, out).
        scope: the nodes whose subgraphs hold ``node``, outermost first (``()`` in the main graph).
        index: the node input holding the weight (:attr:`position` when None).
    """

    name: str
    node: ir.Node
    graph: ir.Graph
    value: ir.Value
    op: str
    transposed: bool
    scope: tuple[ir.Node, ...] = ()
    index: int | None = None

    @property
    def position(self) -> int:
        """The node input holding the weight: 0 for a lookup, 1 for a layer's weight, 1 or 2 for a
        recurrent op's input or recurrent weights."""
        if self.index is not None:
            return self.index
        return 0 if self.op == "Gather" else 1

    @property
    def recurrent(self) -> bool:
        return self.op in RECURRENT_OPS

    @property
    def in_subgraph(self) -> bool:
        return bool(self.scope)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.value.const_value.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in) of the normalised view."""
        shape = self.stored_shape
        if self.op == "Conv":
            return shape[0], int(np.prod(shape[1:]))
        if self.recurrent:
            return shape[0] * shape[1], shape[2]
        if self.op == "ConvTranspose":
            return shape[1], shape[0] * int(np.prod(shape[2:]))
        return (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    @property
    def activation(self) -> ir.Value | None:
        """The value multiplied by the weight (None for an embedding, and for recurrent weights,
        which multiply the op's hidden state)."""
        if self.op == "Gather" or (self.recurrent and self.position != 1):
            return None
        return self.node.inputs[0]

    @property
    def numel(self) -> int:
        return int(np.prod(self.stored_shape))

    def matrix(self) -> np.ndarray:
        """The weight as float32 (out, in)."""
        array = frontend.ensure_float_array(self.value.const_value)
        if self.op == "Conv":
            return array.reshape(array.shape[0], -1)
        if self.recurrent:
            return array.reshape(-1, array.shape[2])
        if self.op == "ConvTranspose":
            return np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
        return array.T if self.transposed else array


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A node that holds a weight hessc does not compress, and why."""

    name: str
    op: str
    reason: str


def _const_float(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.is_initializer()
        and value.dtype in _FLOAT_TYPES
    )


def classify(node: ir.Node, graph: ir.Graph, scope: tuple[ir.Node, ...] = ()) -> list[WeightRef | Skipped]:
    """A node's weights and the reasons some are skipped (empty when it holds no weight): one for
    a layer or a lookup, two for a recurrent op (``W``, then ``R``).

    Args:
        node: the node.
        graph: the graph holding it.
        scope: the nodes whose subgraphs hold ``graph``, outermost first (:attr:`WeightRef.scope`).
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS:
        return []
    items = _recurrent(node, graph) if node.op_type in RECURRENT_OPS else [_classify(node, graph)]
    return [dataclasses.replace(item, scope=scope) if isinstance(item, WeightRef) and scope else item
            for item in items if item is not None]


def _recurrent(node: ir.Node, graph: ir.Graph) -> list[WeightRef | Skipped | None]:
    items: list[WeightRef | Skipped | None] = []
    for index in (1, 2):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None or value.const_value is None:
            continue
        name = frontend.original_name(value)
        if not _const_float(value):
            items.append(Skipped(name, node.op_type, f"weight type {value.dtype} is not a float type"))
        elif len(value.const_value.shape) != 3:
            items.append(Skipped(name, node.op_type, f"{len(value.const_value.shape)}-D {node.op_type} weight"))
        else:
            items.append(WeightRef(name, node, graph, value, node.op_type, transposed=False, index=index))
    return items


def _classify(node: ir.Node, graph: ir.Graph) -> WeightRef | Skipped | None:
    op = node.op_type
    index = 0 if op == "Gather" else 1
    if len(node.inputs) <= index:
        return None
    value = node.inputs[index]
    if value is None or value.const_value is None:
        return None
    name = frontend.original_name(value)
    if not _const_float(value):
        return Skipped(name, op, f"weight type {value.dtype} is not a float type")
    rank = len(value.const_value.shape)
    if op == "MatMul":
        if node.inputs[0] is not None and node.inputs[0].const_value is not None:
            return None  # constant folding material, not a layer
        if rank != 2:
            return Skipped(name, op, f"{rank}-D MatMul weight (only 2-D weights are compressed)")
        return WeightRef(name, node, graph, value, op, transposed=True)
    if op == "Gemm":
        if node.attributes.get_int("transA", 0):
            return Skipped(name, op, "Gemm with transA=1")
        return WeightRef(name, node, graph, value, op, transposed=not node.attributes.get_int("transB", 0))
    if op in ("Conv", "ConvTranspose"):
        if rank < 3:
            return Skipped(name, op, f"{rank}-D {op} weight")
        return WeightRef(name, node, graph, value, op, transposed=False)
    # Gather: an embedding table looked up by non-constant indices along axis 0.
    if node.attributes.get_int("axis", 0) != 0 or rank != 2:
        return Skipped(name, op, "Gather not on axis 0 of a 2-D table")
    ids = node.inputs[1]
    producer = ids.producer() if ids is not None else None
    if ids is None or ids.const_value is not None or (producer is not None and producer.op_type == "Constant"):
        return None  # a constant lookup, not an embedding
    return WeightRef(name, node, graph, value, op, transposed=False)


def find_weights(model: ir.Model) -> tuple[list[WeightRef], list[Skipped]]:
    """Every weight-bearing node of the model (subgraphs included), and the skipped ones."""
    found: list[WeightRef] = []
    skipped: list[Skipped] = []
    for graph, scope in frontend.scoped_graphs(model):
        for node in graph:
            for item in classify(node, graph, scope):
                (found if isinstance(item, WeightRef) else skipped).append(item)
    return found, skipped


def iter_weights(model: ir.Model) -> Iterator[WeightRef]:
    yield from find_weights(model)[0]


def definition_point(refs: Sequence[WeightRef]) -> tuple[ir.Graph, ir.Node]:
    """Where one value read by every ref's node can be defined, and the node to insert it before.

    The graph is the innermost one enclosing every reader, moved out of ``Loop``/``Scan`` bodies
    (:data:`LOOP_OPS`); the node is the first of that graph that reads the value or holds a
    subgraph that does. A weight read by both branches of an ``If`` is defined once, before the
    ``If``; one read by a single branch stays in that branch, which runs only when taken.

    Raises:
        ValueError: no refs.
    """
    if not refs:
        raise ValueError("definition_point needs at least one weight use")
    chains = [(*r.scope, r.node) for r in refs]  # chain[i] is a node of the graph at depth i
    depth = 0
    while all(len(c) > depth + 1 for c in chains) and len({id(c[depth + 1].graph) for c in chains}) == 1:
        depth += 1
    while depth > 0 and chains[0][depth - 1].op_type in LOOP_OPS:
        depth -= 1
    graph = chains[0][depth].graph
    order = {id(n): i for i, n in enumerate(graph)}
    first = min((c[depth] for c in chains), key=lambda n: order[id(n)])
    return graph, first


def _embedding_lookup(node: ir.Node) -> bool:
    """A row lookup in a constant 2-D table: float, its portable quantized form or its kernel."""
    if node.op_type == "GatherBlockQuantized":
        return node.attributes.get_int("gather_axis", 0) == 0
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0 or not node.inputs:
        return False
    table = node.inputs[0]
    producer = table.producer() if table is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        table = producer.inputs[0]
    return table is not None and table.const_value is not None and len(table.const_value.shape) == 2


def token_ids_input(model: ir.Model) -> str | None:
    """The graph input holding token ids, or None: an integer input that indexes the rows of a
    constant 2-D float table (``Gather(E, ids)`` on axis 0, an embedding), or failing that one
    called ``input_ids``."""
    ints = [v for v in model.graph.inputs if v.dtype in (ir.DataType.INT64, ir.DataType.INT32)]
    for v in ints:
        for use in v.uses():
            if use.idx == 1 and _embedding_lookup(use.node):
                return v.name
    return next((v.name for v in ints if "input_ids" in (v.name or "")), None)
