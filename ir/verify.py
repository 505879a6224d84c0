"""Structural verification of the IR between passes.

Checks: every node input is produced before it is read (topological order, outer-scope values
allowed in subgraphs), value names are unique per graph, every weight ``DequantizeLinear`` has a
scale whose shape matches its codes and block size, and every annotation is of its declared type.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from hessc.ir import meta


class VerificationFailed(AssertionError):
    """The IR broke an invariant; the message names the pass and the node."""


def verify_model(model: ir.Model, after: str = "") -> None:
    where = f" after pass {after!r}" if after else ""
    _verify_graph(model.graph, set(), where)


def _verify_graph(graph: ir.Graph, outer: set[int], where: str) -> None:
    available = set(outer)
    names: set[str] = set()
    for value in list(graph.inputs) + list(graph.initializers.values()):
        available.add(id(value))
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in available:
                raise VerificationFailed(
                    f"node {node.name or node.op_type} reads {value.name!r} before it is produced{where}"
                )
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _verify_graph(attr.value, available, where)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    _verify_graph(g, available, where)
        for out in node.outputs:
            if out.name:
                if out.name in names:
                    raise VerificationFailed(f"value name {out.name!r} is produced twice{where}")
                names.add(out.name)
            available.add(id(out))
        if node.op_type == "DequantizeLinear" and meta.QUANT_KEY in node.meta:
            _verify_dq(node, where)
    for value in graph.outputs:
        if id(value) not in available:
            raise VerificationFailed(f"graph output {value.name!r} is never produced{where}")


def _verify_dq(node: ir.Node, where: str) -> None:
    plan = node.meta[meta.QUANT_KEY]
    if not isinstance(plan, meta.QuantPlan):
        raise VerificationFailed(f"{node.name}: {meta.QUANT_KEY} holds a {type(plan).__name__}{where}")
    q, scale = node.inputs[0], node.inputs[1]
    q_shape, s_shape = tuple(q.const_value.shape), tuple(scale.const_value.shape)
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    if block:
        expected = list(q_shape)
        expected[axis] = math.ceil(q_shape[axis] / block)
        if tuple(expected) != s_shape:
            raise VerificationFailed(f"{node.name}: scale shape {s_shape} does not match codes {q_shape}{where}")
    elif s_shape not in ((q_shape[axis],), ()):
        raise VerificationFailed(f"{node.name}: per-axis scale shape {s_shape} for codes {q_shape}{where}")
