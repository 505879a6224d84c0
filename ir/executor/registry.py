"""The operator registry: ``(domain, op_type, since_version)`` → torch implementation.

Implementations register with :func:`register_op`; :func:`lookup_op` picks, for a model's opset,
the entry with the highest ``since_version`` not above it. The default domain is ``""``
(``"ai.onnx"`` is accepted as an alias).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any


OpFunction = Callable[..., Any]
"""``fn(ctx: OpContext, *inputs) -> Tensor | Sequence[Tensor]``; absent optional inputs are None."""

_MS_DOMAIN = "com.microsoft"
_REGISTRY: dict[tuple[str, str], list[tuple[int, OpFunction]]] = collections.defaultdict(list)


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _domain_label(domain: str) -> str:
    return "ai.onnx" if domain == "" else domain


def register_op(
    domain: str, op_type: str, since_version: int = 1
) -> Callable[[OpFunction], OpFunction]:
    """Register a torch implementation of an ONNX operator.

    Lookups pick the entry with the highest ``since_version`` not above the model's opset for the
    domain, so an operator whose semantics changed is registered once per changing version.

    Args:
        domain: operator domain (``""`` or ``"ai.onnx"`` for the default domain).
        op_type: operator name, e.g. ``"MatMul"``.
        since_version: first opset version this implementation applies to.

    Returns:
        A decorator that registers ``fn(ctx, *inputs)`` and returns it unchanged.
    """

    def deco(fn: OpFunction) -> OpFunction:
        entries = _REGISTRY[(_norm_domain(domain), op_type)]
        entries[:] = [e for e in entries if e[0] != since_version]
        entries.append((since_version, fn))
        entries.sort(key=lambda e: e[0])
        return fn

    return deco


def lookup_op(domain: str, op_type: str, opset: int) -> OpFunction | None:
    """The implementation registered for ``domain::op_type`` at ``opset``, or None."""
    best = None
    for since, fn in _REGISTRY.get((_norm_domain(domain), op_type), ()):
        if since <= opset:
            best = fn
    return best


def supported_ops() -> list[str]:
    """Every registered operator as ``"domain::op_type"``, sorted."""
    return sorted(f"{_domain_label(d)}::{o}" for (d, o) in _REGISTRY)
