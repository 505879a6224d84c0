"""Opset upgrade: the default-domain opset the portable quantized form needs.

Blocked ``DequantizeLinear`` with int4/uint4 codes is opset 21; int2/uint2 codes are opset 25.
Converting from an old opset (≤ 17) rebuilds the graph and with it every node's and value's
``meta``, so the upgrade runs first, before any analysis annotates the graph; a later raise from
21 to 25 (when the allocator picks 2-bit codes) changes no node.
"""

from __future__ import annotations

import logging

import onnx_ir as ir


logger = logging.getLogger(__name__)

PORTABLE_OPSET = {2: 25, 3: 21, 4: 21, 8: 21}
"""The opset whose ``DequantizeLinear`` takes the container type of each code width."""


def needed_opset(bits: int) -> int:
    return PORTABLE_OPSET[bits]


def ensure_opset(model: ir.Model, opset: int) -> bool:
    """Raises the default-domain opset to ``opset`` if lower; True if raised."""
    current = model.opset_imports.get("", 1)
    if current >= opset:
        return False
    from onnxscript import version_converter

    version_converter.convert_version(model, opset, fallback=True)
    model.opset_imports[""] = max(model.opset_imports.get("", 1), opset)
    model.graph.opset_imports[""] = model.opset_imports[""]
    if model.ir_version < 10:
        model.ir_version = 10
    if opset >= 25 and model.ir_version < 11:
        model.ir_version = 11
    logger.info("opset %d -> %d", current, opset)
    return True


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Raises the default-domain opset to ``opset`` (never lowers it)."""

    def __init__(self, opset: int = 21) -> None:
        super().__init__()
        if opset not in set(PORTABLE_OPSET.values()):
            raise ValueError(f"UpgradeOpsetPass: opset {opset} is not one the quantized form needs")
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, ensure_opset(model, self.opset))



