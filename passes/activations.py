"""8-bit activations: static per-tensor Q/DQ on the inputs of quantized layers.

For an activation ``x`` with calibrated range ``[lo, hi]`` (widened to contain 0, so that zero
padding stays exact), the uint8 affine grid is

    s = (hi − lo) / 255,    z = round(−lo / s),    x̂ = s · (clip(round(x / s) + z, 0, 255) − z)

which is ONNX's ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``. Inserted before every
MatMul/Gemm whose weight is quantized, it makes the portable model W·A8; lowering then maps it to
what each target runs well (on the CPU, MatMulNBits' own int8 activation path, which quantizes
dynamically per block and is finer than these static per-tensor ranges).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from hessc.ir import meta

logger = logging.getLogger(__name__)

ACT_QUANT_KEY = "hessc.act_quant"
"""``node.meta`` key on an activation ``DequantizeLinear``: the (lo, hi) range it quantizes."""

ACT_RANGE_KEY = "hessc.act_range"
"""``value.meta`` key on an activation: its calibrated (lo, hi) range."""


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


def uint8_grid(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of the uint8 grid covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.float32(scale) >= np.finfo(np.float32).tiny:  # an (almost) constant activation
        scale = 1.0
    zero = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


class AnnotateActivationRangesPass(ir.passes.InPlacePass):
    """Annotates the inputs of quantized MatMul/Gemm layers with their calibrated (min, max).

    An analysis: streams the calibration feeds (``model.meta[meta.CALIBRATION_KEY]``) through
    ORT and stores each range under :data:`ACT_RANGE_KEY` on the activation value.
    """

    def requires(self, model: ir.Model) -> None:
        if model.meta.get(meta.CALIBRATION_KEY) is None:
            raise ir.passes.PreconditionError("annotate-activation-ranges needs calibration data; pass --calibration")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from hessc.runtime import calibration

        layers = quantized_layer_inputs(model)
        ranges = calibration.activation_ranges(model, list(layers), model.meta[meta.CALIBRATION_KEY].feeds)
        for name, readers in layers.items():
            meta.set_annotation(readers[0].inputs[0], ACT_RANGE_KEY, tuple(float(v) for v in ranges[name]))
        return ir.passes.PassResult(model, False)


class InsertActivationQDQPass(ir.passes.InPlacePass):
    """Inserts ``QuantizeLinear → DequantizeLinear`` (uint8, per tensor) on quantized layers' inputs,
    on the ranges :class:`AnnotateActivationRangesPass` annotated."""

    def requires(self, model: ir.Model) -> None:
        missing = [n for n, readers in quantized_layer_inputs(model).items()
                   if readers[0].inputs[0].meta.get(ACT_RANGE_KEY) is None and not _quantized(readers[0].inputs[0])]
        if missing:
            raise ir.passes.PreconditionError(
                f"insert-activation-qdq: no calibrated range on {len(missing)} layer inputs ({missing[0]}); "
                "run annotate-activation-ranges first"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for name, readers in quantized_layer_inputs(model).items():
            x = readers[0].inputs[0]
            rng = x.meta.get(ACT_RANGE_KEY)
            if rng is None or _quantized(x):
                continue
            scale, zero = uint8_grid(*rng)
            s_val = _scalar(graph, f"{name}_act_scale", np.array(scale, dtype=np.float32))
            z_val = _scalar(graph, f"{name}_act_zp", np.array(zero, dtype=np.uint8))
            q = ir.node("QuantizeLinear", [x, s_val, z_val], name=f"{name}_act_q")
            dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{name}_act_dq")
            q.outputs[0].name, dq.outputs[0].name = f"{name}_act_q", f"{name}_act_dq"
            dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
            dq.meta[ACT_QUANT_KEY] = rng
            first = min(readers, key=lambda n: list(graph).index(n))
            graph.insert_before(first, [q, dq])
            for node in readers:
                node.replace_input_with(0, dq.outputs[0])
            count += 1
        logger.info("8-bit activations on %d layer inputs", count)
        return ir.passes.PassResult(model, count > 0)


def _quantized(x: ir.Value) -> bool:
    producer = x.producer()
    return producer is not None and ACT_QUANT_KEY in producer.meta


def _scalar(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value
