"""Typed annotations stored on IR values and nodes.

Every annotation is a frozen dataclass under a namespaced key defined once here. Values that must
survive saving go to ``model.metadata_props`` as JSON (``PLAN_KEY``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

QUANT_KEY = "hessc.quant"
"""``node.meta`` key of a weight ``DequantizeLinear``: the :class:`QuantPlan` it materializes."""

HESSIAN_KEY = "hessc.hessian"
"""``value.meta`` key of a weight initializer: its curvature statistics."""

WEIGHT_NAME_KEY = "hessc.weight_name"
"""``value.meta`` key: the user-facing name of a weight (the original parameter name)."""

TIMINGS_KEY = "hessc.timings"
"""``model.meta`` key: wall-clock seconds per pass of the last ``optimize`` (not saved)."""

LATENCY_KEY = "hessc.latency"
"""``model.meta`` key: float vs optimized latency measured by ``optimize`` (not saved)."""

PLAN_KEY = "hessc.plan"
"""``model.metadata_props`` key: the JSON record of every compression decision."""


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """How one weight is quantized.

    Attributes:
        name: user-facing weight name.
        op: the consuming op (``MatMul``, ``Gemm``, ``Conv``, ``Gather``).
        shape: the stored weight shape.
        bits: bits per code (2, 3, 4 or 8).
        group_size: codes per scale along the input dimension; 0 means per output channel.
        symmetric: no zero point when true.
        method: the quantizer that chose the codes (``rtn``, ``gptq``).
        matrix_shape: (out, in) of the normalised weight view; groups run along ``in``.
    """

    name: str
    op: str
    shape: tuple[int, ...]
    bits: int
    group_size: int
    symmetric: bool
    method: str = "rtn"
    matrix_shape: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d.pop("matrix_shape")
        return d


def read_plan(model) -> dict[str, Any] | None:
    """The ``hessc.plan`` record of a model, or None when it has none."""
    raw = model.metadata_props.get(PLAN_KEY)
    return json.loads(raw) if raw else None


def write_plan(model, plan: dict[str, Any]) -> None:
    model.metadata_props[PLAN_KEY] = json.dumps(plan, sort_keys=True)
