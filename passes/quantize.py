"""Weight quantization: plan per weight, then materialize the portable Q/DQ form.

For a weight ``W`` (out × in) quantized in groups of ``g`` input columns with scale ``s`` and zero
point ``z`` per (row, group), the rewrite relies on

    W[o, i] ≈ s[o, i // g] · (q[o, i] − z[o, i // g])

which is exactly ONNX's blocked ``DequantizeLinear(q, s, z; axis, block_size=g)`` applied to the
*stored* layout of the weight (``axis`` is the stored input dimension: 0 for a MatMul's ``B`` of
shape (in, out), 1 for ``Gemm(transB=1)`` and embedding tables). Conv weights (out, in/groups, *k)
are quantized per output channel (``axis=0``, no blocks), except 1×1 convs whose input channels
``g`` divides: their stored layout is the (out, in) matrix with unit axes, so they take blocks of
``g`` input channels along ``axis=1`` like a Gemm weight. The consumer then reads the
``DequantizeLinear`` output in place of the float initializer, so the graph stays runnable on any
ONNX runtime (opset 21 for int4/int8, 25 for int2); :mod:`hessc.runtime.lower` turns this form
into the target's kernels.

A table ``E`` (V × D) tied to an output head is one weight (:class:`WeightGroup`): the lookup reads
rows of ``E`` and the head computes ``y = x Eᵀ``, so both have the matrix view ``W = E`` with groups
along ``D``, and one set of codes serves both. The front door folds ``MatMul(x, Transpose(E))``
into a transposed copy ``E_T`` (marked ``meta.TIED_KEY``) so that the head is a weight with its own
curvature; one plan, decided by the head (the only use whose curvature is measured), is stored on
``E`` and ``E_T``, and one ``DequantizeLinear`` of ``E`` feeds the ``Gather`` and, through
``Transpose``, the head. GPTQ, when chosen for the head, fits the codes to the head's input
covariance; the lookup reads the same dequantized table (any codes are valid for it; their error
is then weighted for the head, not for the embedding).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import numpy as np
import onnx_ir as ir

from hessc import progress
from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.ir.meta import SUPPORTED_BITS
from hessc.ir import weights as qweights
from hessc.passes import quantizers
from hessc.passes.opset import PORTABLE_OPSET, ensure_opset

logger = logging.getLogger(__name__)

MIN_GROUP, MAX_GROUP = 16, 256
# Quantizers: round to nearest, GPTQ, and round to nearest with gradient-directed rounding near
# the boundary (quantizers.rtn's ``gradient``).
METHODS = ("rtn", "gptq", "rtn-grad")
# Half-width of the band around the rounding boundary inside which ``rtn-grad`` rounds against the
# gradient, per bit width. Measured on SmolLM2 (group 64, every decoder linear, gradient of 6
# calibration feeds, loss on 2 others): at 8 bits a band of 0.05 / 0.1 / 0.2 / 0.5 moved the held-out
# loss by −0.044 / −0.052 / −0.004 / +0.41 nats; at 4 bits 0.002 gave −0.047 against nearest and
# 0.02 gave +0.06. Wider bands move many weights together, and their correlated error outgrows
# the first-order gain.
DIRECTED_MARGIN = {8: 0.1, 4: 0.002}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Configuration of the weight-quantization passes.

    Attributes:
        bits: bits per weight for MatMul/Gemm/Conv/Gather weights.
        group_size: weights per scale along the input dimension (16–256, a power of two); Conv
            weights use it only where :func:`group_size_for` says so (1×1 convs), else one scale
            per output channel.
        symmetric: no zero points when true.
        quantize_conv: quantize Conv weights (the portable form runs them through
            ``DequantizeLinear``; ONNX Runtime's CPU/CUDA kernels have no low-bit Conv).
        quantize_embeddings: quantize Gather embedding tables (and output projections tied to them).
        method: ``rtn`` or ``gptq`` (GPTQ needs Hessian annotation).
        min_numel: weights smaller than this stay in float (biases, tiny projections).
        bits_override: per-weight bits by user-facing name (used by the bit allocator); 16 or
            more keeps the weight in float.
        method_override: per-weight method (``rtn``, ``gptq`` or ``rtn-grad``) by user-facing
            name, for MatMul, Gemm and Conv weights (used by the bit allocator).
        static_int8_ops: ops the target runs as static int8 kernels (the CPU's convs): their
            weights are 8-bit, symmetric, one scale per output channel, whatever ``bits`` says
            (:func:`static_int8_plan`).
        static_int8_limit: their code limit: 127, or 63 for CPUs whose int8 kernels saturate
            (:func:`hessc.runtime.targets.int8_code_limit`).
        conv_off_reason: why Conv weights stay in float when ``quantize_conv`` is off.
        float_ops: ops whose weights stay in float, each with the reason (the target's).
        recurrent_limit: the code limit of recurrent weights (:func:`recurrent_plan`; as
            ``static_int8_limit``: the CPU's LSTM kernel multiplies u8·s8).
        embedding_min_bits: the fewest bits for an embedding table (ORT's GatherBlockQuantized
            runs 4 and 8 bits; a 2-bit table would be dequantized whole on every run). A table
            tied to a head follows the head's plan: lowered, its lookup reads the head's
            MatMulNBits bytes, which GatherBlockQuantized runs at 2, 4 and 8 bits.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    quantize_conv: bool = True
    quantize_embeddings: bool = True
    method: str = "rtn"
    min_numel: int = 1024
    bits_override: tuple[tuple[str, int], ...] = ()
    embedding_min_bits: int = 2
    method_override: tuple[tuple[str, str], ...] = ()
    static_int8_ops: frozenset[str] = frozenset()
    static_int8_limit: int = 127
    conv_off_reason: str | None = None
    float_ops: tuple[tuple[str, str], ...] = ()
    recurrent_limit: int = 127

    def __post_init__(self) -> None:
        validate_bits_and_group(self.bits, self.group_size)
        if self.method not in ("rtn", "gptq"):
            raise InputError(f"unknown quantization method {self.method!r}; use 'rtn' or 'gptq'")
        for name, method in self.method_override:
            if method not in METHODS:
                raise InputError(f"{name}: unknown quantization method {method!r}; use one of {', '.join(METHODS)}")


def validate_bits_and_group(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InputError(f"--bits {bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if not (MIN_GROUP <= group_size <= MAX_GROUP) or group_size & (group_size - 1):
        raise InputError(
            f"--group-size {group_size} is not supported; use a power of two from {MIN_GROUP} to {MAX_GROUP}"
        )


def storage_type(bits: int, symmetric: bool) -> ir.DataType:
    """The ONNX element type holding codes of ``bits`` (3-bit codes live in a 4-bit container)."""
    container = 4 if bits == 3 else bits
    signed = {2: ir.DataType.INT2, 4: ir.DataType.INT4, 8: ir.DataType.INT8}
    unsigned = {2: ir.DataType.UINT2, 4: ir.DataType.UINT4, 8: ir.DataType.UINT8}
    return (signed if symmetric else unsigned)[container]


def container_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def group_size_for(ref: qweights.WeightRef, group_size: int) -> int:
    """The group size a weight is quantized with: ``group_size``, except for Conv weights.

    A Conv weight gets one scale per output channel (0), unless it is a 1×1 conv whose input
    channels (per conv group) ``group_size`` divides into more than one block: then blocks of
    ``group_size`` input channels, which are contiguous both in the (out, in) matrix view and in
    the stored (out, in, 1, 1) layout. A k×k kernel's matrix columns interleave channels and
    kernel offsets, so a stored-layout block along the channel axis is not a group of columns.
    """
    if ref.op != "Conv":
        return group_size
    shape = ref.stored_shape
    if group_size and math.prod(shape[2:]) == 1 and shape[1] > group_size and shape[1] % group_size == 0:
        return group_size
    return 0


def plan_for(ref: qweights.WeightRef, config: QuantConfig, lookup: bool = False) -> meta.QuantPlan | str:
    """The plan for one weight, or the reason it stays in float.

    Args:
        ref: the use that decides the plan (a :class:`WeightGroup`'s ``lead``).
        config: what to plan.
        lookup: the weight is also an embedding table (a head tied to it): it follows
            ``quantize_embeddings``.
    """
    if ref.op == "Conv" and not config.quantize_conv:
        return config.conv_off_reason or "Conv quantization is off for this target"
    if ref.op in dict(config.float_ops):
        return dict(config.float_ops)[ref.op]
    if ref.recurrent:
        return recurrent_plan(ref, config)
    if ref.op == "ConvTranspose":
        return transposed_conv_plan(ref, config)
    if ref.numel < config.min_numel and ref.op not in config.static_int8_ops:
        return f"small ({ref.numel} < {config.min_numel} elements)"
    overrides = dict(config.bits_override)
    tied_head = meta.TIED_KEY in ref.value.meta or meta.UNTIED_FROM_KEY in ref.value.meta
    if not config.quantize_embeddings and (ref.op == "Gather" or lookup or tied_head):
        return "embedding quantization is off" + (" (tied to the embedding table)" if ref.op != "Gather" else "")
    bits = overrides.get(ref.name, config.bits)
    if bits >= 16:
        return "kept in float by the plan"
    method = dict(config.method_override).get(ref.name, config.method) if ref.op != "Gather" else "rtn"
    if ref.in_subgraph:
        method = "rtn"  # GPTQ and gradient rounding read curvature, measured in the main graph only
    if ref.op in config.static_int8_ops:
        return static_int8_plan(ref, method, config.static_int8_limit)
    if ref.op == "Gather":
        bits = max(bits, config.embedding_min_bits)
    if ref.op == "Conv" and ref.name not in overrides and bits < THIN_CONV_BITS and _thin(ref):
        bits = THIN_CONV_BITS  # uniform codes only: a budget prices these weights like any other
    return meta.QuantPlan(
        ref.name, ref.op, ref.stored_shape, bits, group_size_for(ref, config.group_size), config.symmetric, method,
        ref.matrix_shape,
    )


STATIC_INT8_BITS = 8

THIN_CONV_BITS = 8
THIN_ROW = 32
"""Under uniform codes below 8 bits, a conv whose output channels each read fewer than
``THIN_ROW`` weights (depthwise convs, a 3-channel stem) keeps 8-bit codes: each output sums so
few products that its rounding errors do not average out (EfficientNet-Lite0 at 4 bits on the
portable target: see the README's conv results), and such weights are a small share of the bytes.
A budget (``bits=3.5``, lossless) decides them by their curvature instead."""


def static_int8_plan(ref: qweights.WeightRef, method: str, limit: int = 127) -> meta.QuantPlan | str:
    """The plan of a weight the target runs as a static int8 kernel, or why it stays in float.

    ONNX Runtime fuses ``DequantizeLinear → Conv → QuantizeLinear`` into ``QLinearConv`` only for
    8-bit weights with one scale per output channel (``axis=0``, no blocks) and zero point 0, so
    that is the plan whatever bit width was asked for, on the narrow grid ``[−limit, limit]``
    (``limit`` < 127 guards the GEMM kernels of CPUs whose u8·s8 products saturate; a depthwise
    conv, one input channel per group and one output channel per group, runs ORT's depthwise
    kernel, which accumulates in int32, so it keeps the full grid: measured exact at 127 on such a
    CPU, where 1×1 and 3×3 dense convs drifted 3–6%). A layer whose output is a model output
    stays in float, and so does every layer of the output tail
    (:func:`hessc.passes.activations.output_tail`): quantizing them would put the model's own
    outputs on an 8-bit grid.
    """
    from hessc.passes import activations

    if any(out.is_graph_output() for out in ref.node.outputs) or id(ref.node) in activations.output_tail(ref.graph):
        return "an output layer (no conv or matmul after it) stays in float on the static int8 path"
    if _depthwise(ref):
        limit = 127
    return meta.QuantPlan(ref.name, ref.op, ref.stored_shape, STATIC_INT8_BITS, 0, True, method, ref.matrix_shape,
                          narrow=limit)


def transposed_conv_plan(ref: qweights.WeightRef, config: QuantConfig) -> meta.QuantPlan | str:
    """The plan of a ``ConvTranspose`` weight, or why it stays in float: 8-bit, symmetric, one scale
    per output channel of a group (``DequantizeLinear`` on axis 1), outside the bit allocator (no
    curvature is measured for it)."""
    if ref.numel < config.min_numel:
        return f"small ({ref.numel} < {config.min_numel} elements)"
    if dict(config.bits_override).get(ref.name, 8) >= 16:
        return "kept in float by the plan"
    return meta.QuantPlan(ref.name, ref.op, ref.stored_shape, 8, 0, True, "rtn", ref.matrix_shape)


RECURRENT_BITS = 8


def recurrent_plan(ref: qweights.WeightRef, config: QuantConfig) -> meta.QuantPlan | str:
    """The plan of an ``LSTM``/``GRU``/``RNN`` weight, or why it stays in float.

    8-bit, symmetric, one scale per gate unit (a row of the (directions · gates · hidden, in)
    view), whatever ``bits`` says and outside the bit allocator: ONNX Runtime's quantized LSTM
    kernel (``DynamicQuantizeLSTM``, what the CPU lowers to) takes exactly that, and the error of
    a recurrent weight compounds over the steps of the sequence, which a per-layer curvature
    estimate of the input weights alone does not see. Both weights of a node are planned whatever
    their size, since the kernel takes both quantized.
    """
    if dict(config.bits_override).get(ref.name, RECURRENT_BITS) >= 16:
        return "kept in float by the plan"
    return meta.QuantPlan(ref.name, ref.op, ref.stored_shape, RECURRENT_BITS, 0, True, "rtn", ref.matrix_shape,
                          narrow=config.recurrent_limit)


def _thin(ref: qweights.WeightRef) -> bool:
    """A conv whose output channels each read few weights: depthwise, or rows < ``THIN_ROW``."""
    return _depthwise(ref) or ref.matrix_shape[1] < THIN_ROW


def _depthwise(ref: qweights.WeightRef) -> bool:
    """A conv with one input and one output channel per group."""
    group = ref.node.attributes.get_int("group", 1) if ref.op == "Conv" else 1
    return ref.op == "Conv" and group > 1 and ref.stored_shape[1] == 1 and ref.stored_shape[0] == group


@dataclasses.dataclass(frozen=True, eq=False)
class WeightGroup:
    """Every weight-bearing use of one stored weight: its own and those of its tied copies.

    A tie is a table ``E`` read by a ``Gather`` and by a head: ``Gemm(x, E, transB=1)`` reads ``E``
    itself, ``MatMul(x, Transpose(E))`` reads the copy ``E_T`` the front door folded (marked
    ``meta.TIED_KEY``). The group is planned, allocated, stored and counted once.

    Attributes:
        refs: the uses, in graph order.
        lead: the use that decides the plan: the first projection (MatMul, Gemm, Conv: the use
            whose curvature is measured), else the first lookup.
        stored: the value that is stored: the table of a tie, else the weight itself.
    """

    refs: tuple[qweights.WeightRef, ...]
    lead: qweights.WeightRef
    stored: ir.Value

    @property
    def name(self) -> str:
        return self.lead.name

    @property
    def values(self) -> tuple[ir.Value, ...]:
        """The distinct values read: the stored one first, then its tied copies."""
        out = [self.stored]
        for ref in self.refs:
            if not any(ref.value is v for v in out):
                out.append(ref.value)
        return tuple(out)

    @property
    def lookup(self) -> bool:
        """An embedding table (some use is a ``Gather``)."""
        return any(r.op == "Gather" for r in self.refs)

    @property
    def tied(self) -> bool:
        """A table with a head: read by a ``Gather`` and by a projection."""
        return self.lookup and any(r.op != "Gather" for r in self.refs)

    @property
    def uses(self) -> list[str]:
        """The ops reading the weight, each once, in graph order."""
        return list(dict.fromkeys(r.op for r in self.refs))

    def plan(self) -> meta.QuantPlan | None:
        """The group's plan: the lead's, else one found on another of its values."""
        for value in (self.lead.value, *self.values):
            plan = value.meta.get(meta.QUANT_KEY)
            if plan is not None:
                return plan
        return None

    def to_json(self) -> dict:
        """What the record says about a tie."""
        return {"table": self.stored.name, "uses": self.uses, "copies": [v.name for v in self.values[1:]],
                "measured": self.lead.op}


def tied_table(value: ir.Value) -> ir.Value | None:
    """The embedding table a transposed copy was folded from (``meta.TIED_KEY``), if it is still an
    initializer of the copy's graph."""
    name = value.meta.get(meta.TIED_KEY)
    owner = value.graph
    if name is None or owner is None:
        return None
    return owner.initializers.get(name)


def weight_groups(refs: Sequence[qweights.WeightRef]) -> list[WeightGroup]:
    """The uses grouped by the weight they store (:class:`WeightGroup`), in graph order.

    A tied copy joins its table's group only while the table is looked up by a ``Gather`` among
    ``refs``; otherwise it is a weight of its own.
    """
    lookups = {id(r.value) for r in refs if r.op == "Gather"}
    grouped: dict[int, list[qweights.WeightRef]] = {}
    stored: dict[int, ir.Value] = {}
    for ref in refs:
        value = tied_table(ref.value)
        if value is None or id(value) not in lookups:
            value = ref.value
        grouped.setdefault(id(value), []).append(ref)
        stored[id(value)] = value
    groups = []
    for key, members in grouped.items():
        lead = next((r for r in members if r.op != "Gather"), members[0])
        groups.append(WeightGroup(tuple(members), lead, stored[key]))
    return groups


def quantize_matrix(
    matrix: np.ndarray, plan: meta.QuantPlan, hessian: np.ndarray | None = None, gradient: np.ndarray | None = None
):
    """Quantizes an (out, in) matrix by the plan; a partial last group is zero-padded.

    Args:
        matrix: the (out, in) weight.
        plan: its plan.
        hessian: GPTQ's (in, in) Hessian (``gptq``).
        gradient: ``∂L/∂W`` (out, in) that directs rounding near the boundary (``rtn-grad``).

    Returns:
        The quantized weight of the padded matrix and the true input size (codes past it are
        padding and are not stored).
    """
    out_dim, in_dim = matrix.shape
    group = plan.group_size or in_dim
    padded = math.ceil(in_dim / group) * group
    if padded != in_dim:
        matrix = np.pad(matrix, ((0, 0), (0, padded - in_dim)))
        if hessian is not None:
            hessian = np.pad(hessian, ((0, padded - in_dim), (0, padded - in_dim)))
        if gradient is not None:
            gradient = np.pad(gradient, ((0, 0), (0, padded - in_dim)))
    if plan.method == "gptq":
        if hessian is None:
            raise InputError(f"{plan.name}: GPTQ needs Hessian statistics; pass calibration data")
        q = quantizers.gptq(matrix, hessian, plan.bits, plan.group_size, plan.symmetric, narrow=plan.narrow)
    elif plan.method == "rtn-grad":
        if gradient is None:
            raise InputError(f"{plan.name}: gradient-directed rounding needs the loss gradient; pass calibration data")
        if plan.bits not in DIRECTED_MARGIN:
            raise InputError(f"{plan.name}: gradient-directed rounding is offered at {sorted(DIRECTED_MARGIN)} bits, "
                             f"not {plan.bits}")
        q = quantizers.rtn(matrix, plan.bits, plan.group_size, plan.symmetric, gradient, DIRECTED_MARGIN[plan.bits],
                           narrow=plan.narrow)
    else:
        q = quantizers.rtn(matrix, plan.bits, plan.group_size, plan.symmetric, narrow=plan.narrow)
    return q, in_dim


def _quantize_read_once(ref: qweights.WeightRef, plan: meta.QuantPlan, hessian, gradient):
    """:func:`quantize_matrix` and :func:`relative_error` of one weight; ``(q, in, error)``.

    A large RTN weight kept as external data is read once, a block of its stored rows at a time,
    each block's file pages given back once it is rounded: resident memory holds its codes, not
    its float bytes. Groups run along the input dimension and never across a block (blocks of
    output rows, or of whole groups of input columns where the weight is stored ``(in, out)``), so
    the codes equal the whole weight's."""
    matrix = ref.matrix()
    out_dim, in_dim = matrix.shape
    stored = ref.value
    blockwise = (plan.method in ("rtn", "rtn-grad") and matrix.size > STREAM_ELEMENTS
                 and frontend.is_external(stored) and ref.op not in ("ConvTranspose",) and not ref.recurrent
                 and (not ref.transposed or (plan.group_size and in_dim % plan.group_size == 0)))
    if not blockwise:
        q, in_dim = quantize_matrix(matrix, plan, hessian, gradient)
        return q, in_dim, relative_error(q, matrix)
    group = plan.group_size or in_dim
    columns = ref.transposed  # stored (in, out): a block of stored rows is a block of input columns
    span, width = (in_dim, out_dim) if columns else (out_dim, in_dim)
    step = max(1, STREAM_ELEMENTS // max(1, width))
    if columns:
        step = max(group, step // group * group)
    whole, err2, ref2 = None, 0.0, 0.0
    row_bytes = width * int(stored.dtype.itemsize)
    for start in range(0, span, step):
        stop = min(start + step, span)
        cut = (slice(None), slice(start, stop)) if columns else (slice(start, stop), slice(None))
        piece = np.ascontiguousarray(matrix[cut])
        q, _ = quantize_matrix(piece, plan, None, None if gradient is None else gradient[cut])
        if whole is None:  # the codes of the whole weight, filled block by block
            padded = math.ceil(in_dim / group) * group
            whole = quantizers.QuantizedWeight(
                np.empty((out_dim, padded), q.codes.dtype), np.empty((out_dim, padded // group), q.scales.dtype),
                None if q.zero_points is None else np.empty((out_dim, padded // group), q.zero_points.dtype),
                q.bits, plan.group_size, q.symmetric)
        groups = (slice(None), slice(start // group, stop // group)) if columns else cut
        whole.codes[cut if columns else (cut[0], slice(None))] = q.codes
        whole.scales[groups] = q.scales
        if q.zero_points is not None:
            whole.zero_points[groups] = q.zero_points
        e, piece2 = relative_error(q, piece), float(np.sum(np.square(piece, dtype=np.float64)))
        err2, ref2 = err2 + e * e * piece2, ref2 + piece2
        frontend.drop_pages(stored, start * row_bytes, stop * row_bytes)
    return whole, in_dim, (math.sqrt(err2 / ref2) if ref2 > 0 else 0.0)


STREAM_ELEMENTS = 1 << 24
"""Weights of more elements than this, kept as external data, are quantized a block of about this
many elements at a time (RTN), their pages given back after each block."""


def relative_error(q: quantizers.QuantizedWeight, matrix: np.ndarray) -> float:
    """``‖W − dequantized‖ / ‖W‖`` of an (out, in) matrix and its codes (padded columns past ``in``
    ignored), a block of rows at a time: a weight of any size is checked in bounded memory."""
    out_dim, in_dim = matrix.shape
    step = max(1, ERROR_CHUNK // max(1, q.codes.shape[1]))
    err2 = ref2 = 0.0
    for i in range(0, out_dim, step):
        rows = slice(i, i + step)
        part = dataclasses.replace(q, codes=q.codes[rows], scales=q.scales[rows],
                                   zero_points=None if q.zero_points is None else q.zero_points[rows])
        deq = part.dequantize()[:, :in_dim]
        w = np.asarray(matrix[rows], dtype=np.float32)
        err2 += float(np.sum(np.square(w - deq, dtype=np.float64)))
        ref2 += float(np.sum(np.square(w, dtype=np.float64)))
    return math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)


ERROR_CHUNK = 1 << 22
"""Elements of a weight dequantized at a time by :func:`relative_error`."""


def stored_bytes(plan: meta.QuantPlan, scale_bytes: int, kernel_layout: bool = False) -> int:
    """Bytes of codes (at their container width), scales and zero points of one weight.

    Args:
        plan: the weight's plan.
        scale_bytes: bytes per scale.
        kernel_layout: count MatMulNBits' layout for MatMul/Gemm weights (what the cpu and cuda
            targets store): codes padded to whole blocks, zero points packed per row in whole bytes;
            3-bit codes at 3 bits (rows padded to groups of 8 codes only, zero points in the 4-bit
            layout), since :mod:`hessc.runtime.lower` rebuilds the 4-bit ``B`` when ORT opens the model.
    """
    out_dim, in_dim = plan.matrix_shape
    blocks = math.ceil(in_dim / plan.group_size) if plan.group_size else 1
    groups = out_dim * blocks
    code_bits = container_bits(plan.bits)
    if kernel_layout and plan.op in ("MatMul", "Gemm") and plan.group_size:
        zp_bytes = 0 if plan.symmetric else out_dim * math.ceil(blocks * code_bits / 8)
        if plan.bits == 3:
            code_bytes = 3 * out_dim * math.ceil(in_dim / 8)
        else:
            code_bytes = out_dim * blocks * plan.group_size * code_bits // 8
        return code_bytes + groups * scale_bytes + zp_bytes
    zp_bytes = 0 if plan.symmetric else math.ceil(groups * code_bits / 8)
    return math.ceil(out_dim * in_dim * code_bits / 8) + groups * scale_bytes + zp_bytes


class PlanQuantizationPass(ir.passes.InPlacePass):
    """Decides, per weight, bits, group size and method; stores a QuantPlan on the weight value.

    Args:
        config: what to plan.
        snapshot: first keep ``Model.clone()`` of the model as it stands before planning under
            ``model.meta[meta.PREPLAN_KEY]`` (weights and their statistics shared, not copied), for
            ``confirm-lossless`` to re-run plan → materialize on.
        allow_empty: planning nothing is no error (a replay whose weights are all split into
            low-rank factors, which get their plans from ``split-low-rank``).
    """

    def __init__(self, config: QuantConfig, snapshot: bool = False, allow_empty: bool = False) -> None:
        super().__init__()
        self.config = config
        self.snapshot = snapshot
        self.allow_empty = allow_empty

    def requires(self, model: ir.Model) -> None:
        _require_portable_opset(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if self.snapshot:
            model.meta[meta.PREPLAN_KEY] = frontend.clone(model)
        refs, skipped = qweights.find_weights(model)
        skip_log = model.meta.setdefault(meta.SKIPPED_KEY, {})
        for s in skipped:
            skip_log[s.name] = s.reason
        for group in weight_groups(refs):
            # One plan per stored weight: a tied table and its head share the head's plan.
            plan = plan_for(group.lead, self.config, lookup=group.lookup)
            if isinstance(plan, str):
                for name in dict.fromkeys(r.name for r in group.refs):
                    skip_log[name] = plan
                continue
            for value in group.values:
                if value.meta.get(meta.QUANT_KEY) != plan:
                    value.meta[meta.QUANT_KEY] = plan
                    modified = True
        planned = sum(1 for g in weight_groups(refs) if g.plan() is not None)
        if planned == 0 and not self.allow_empty:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(skip_log.items())[:5]) or "no MatMul, Gemm, Conv or Gather weights"
            quantized_ops = sorted({n.op_type for g in frontend.graphs(model) for n in g if n.op_type in _QUANTIZED_OPS})
            if quantized_ops:
                raise InputError(f"the model is already quantized ({', '.join(quantized_ops)}): hessc compresses float "
                                 f"models; give it the float model this one was made from ({reasons})")
            raise InputError(f"the model has nothing hessc can compress ({reasons})")
        logger.info("planned %d weights, %d stay in float", planned, len(skip_log))
        return ir.passes.PassResult(model, modified)


_QUANTIZED_OPS = frozenset({
    "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul",
    "MatMulNBits", "DynamicQuantizeMatMul", "GatherBlockQuantized", "MatMulIntegerToFloat", "QAttention",
    "DynamicQuantizeLSTM",
})
"""Operators that read weights someone already quantized."""


TIED_WEIGHTS_KEY = "hessc.tied_weights"
"""``model.meta`` key: ``{weight name: WeightGroup.to_json()}`` of the tied tables ``insert-qdq``
stored once (one ``DequantizeLinear`` read by the lookup and the head)."""


class InsertQDQPass(ir.passes.InPlacePass):
    """Materializes each QuantPlan as a blocked ``DequantizeLinear`` feeding the consumer.

    GPTQ reads its Hessian and ``rtn-grad`` its gradient from the weight's ``HessianStats``
    (:func:`hessc.passes.hessian.hessian_for`, :func:`~hessc.passes.hessian.gradient_for`); the
    plans materialized are recorded under ``model.meta[meta.MATERIALIZED_KEY]`` by weight name.
    A tied table (:class:`WeightGroup`) is quantized once, in the table's layout: the lookup reads
    the ``DequantizeLinear`` output, a folded head copy reads it through ``Transpose``
    (``(E_T)`` is ``Eᵀ``), and the ties are recorded under ``model.meta[TIED_WEIGHTS_KEY]``.
    """

    def requires(self, model: ir.Model) -> None:
        _require_portable_opset(model)
        for group in weight_groups(list(qweights.iter_weights(model))):
            plan = group.plan()
            if plan is None or plan.method not in ("gptq", "rtn-grad"):
                continue
            ref = group.lead  # the statistics live on the use that decided the plan
            if ref.value.meta.get(meta.HESSIAN_KEY) is None:
                why = meta.stale_reason(ref.value, meta.HESSIAN_KEY)
                raise ir.passes.PreconditionError(
                    f"{ref.name}: {plan.method} needs Hessian statistics"
                    + (f", which {why}; run annotate-hessian again after that pass" if why
                       else "; run annotate-hessian with calibration data first")
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        planned = [g for g in weight_groups(list(qweights.iter_weights(model))) if g.plan() is not None]
        # 2-bit codes are opset 25; raising from 21 changes no node, so the plans survive it.
        raised = bool(planned) and ensure_opset(model, max(PORTABLE_OPSET[g.plan().bits] for g in planned))
        retied = _retie_float_copies(model)
        groups = [g for g in weight_groups(list(qweights.iter_weights(model))) if g.plan() is not None]
        materialized = dict(model.meta.get(meta.MATERIALIZED_KEY) or {})
        self.errors = dict(model.meta.get(meta.WEIGHT_ERRORS_KEY) or {})
        ties = dict(model.meta.get(TIED_WEIGHTS_KEY) or {})
        for i, group in enumerate(groups):
            plan = self._materialize(group)
            for value in group.values:
                frontend.release(value)
            materialized[plan.name] = plan
            if group.tied:
                ties[plan.name] = group.to_json()
            progress.report("quantize", i + 1, len(groups))
        model.meta[meta.MATERIALIZED_KEY] = materialized
        model.meta[meta.WEIGHT_ERRORS_KEY] = self.errors
        if ties:
            model.meta[TIED_WEIGHTS_KEY] = ties
        return ir.passes.PassResult(model, bool(groups) or retied > 0 or raised)

    def _materialize(self, group: WeightGroup) -> meta.QuantPlan:
        plan = group.plan()
        ref = group.lead
        stored = group.stored
        copy = ref.value is not stored  # the lead reads a tied copy, the table transposed
        if not copy and any(r.value is stored and r.op != "Gather"
                            and (r.op != ref.op or r.transposed != ref.transposed) for r in group.refs):
            logger.warning("%s is read by nodes of different layouts; quantizing it for %s", ref.name, ref.op)
        hessian = gradient = None
        if plan.method in ("gptq", "rtn-grad"):
            from hessc.passes import hessian as curvature

            hessian = curvature.hessian_for(ref) if plan.method == "gptq" else None
            gradient = curvature.gradient_for(ref) if plan.method == "rtn-grad" else None
        q, in_dim, self.errors[plan.name] = _quantize_read_once(ref, plan, hessian, gradient)
        scale_type = ref.value.dtype
        scale_np = q.scales.astype(scale_type.numpy())
        codes = q.codes[:, :in_dim]
        # The matrix view W against the stored tensor: a copy holds the table transposed.
        transposed = ref.transposed != copy
        stored_shape = tuple(stored.const_value.shape)
        if ref.op == "Conv" and plan.group_size:  # 1×1: blocks of input channels on axis 1
            codes = codes.reshape(ref.stored_shape)
            unit = (1,) * (len(ref.stored_shape) - 2)
            scale_np = scale_np.reshape(scale_np.shape + unit)
            zps = None if q.zero_points is None else q.zero_points.reshape(q.zero_points.shape + unit)
            axis, block = 1, plan.group_size
        elif ref.op == "Conv" or ref.op == "ConvTranspose" or ref.recurrent:  # one scale per row, per axis
            scale_np = scale_np.reshape(-1)
            zps = None if q.zero_points is None else q.zero_points.reshape(-1)
            block = None
            if ref.op == "Conv":
                codes, axis = codes.reshape(ref.stored_shape), 0
            elif ref.op == "ConvTranspose":  # a row is an output channel of a group: axis 1
                rows, cols = ref.stored_shape[1], ref.stored_shape[0]
                codes, axis = np.moveaxis(codes.reshape(rows, cols, *ref.stored_shape[2:]), 0, 1), 1
            elif ref.stored_shape[0] == 1:  # a recurrent weight of one direction: (1, gates · hidden, in)
                codes, axis = codes.reshape(ref.stored_shape), 1
            else:
                # Two directions: per axis on the 2-D view, reshaped back below (a blocked
                # DequantizeLinear with one block per row computes the same ~8x slower in ORT).
                axis = 0
        elif transposed:  # stored (in, out)
            codes, scale_np = codes.T, scale_np.T
            zps = None if q.zero_points is None else q.zero_points.T
            axis, block = 0, plan.group_size
        else:  # stored (out, in)
            zps = q.zero_points
            axis, block = 1, plan.group_size
        dtype = storage_type(plan.bits, plan.symmetric)
        base = stored.name
        # Before the If or Loop holding the readers, where they are in subgraphs: a branch cannot
        # read a value of its sibling, and a loop body would dequantize on every iteration. The
        # codes go beside the DequantizeLinear: ONNX Runtime's DQ → MatMul fusion looks for them
        # in the node's own graph, not in the outer scope.
        graph, first = qweights.definition_point(group.refs)
        inputs = [
            frontend.new_initializer(graph, f"{base}_q", np.ascontiguousarray(codes).astype(dtype.numpy())),
            frontend.new_initializer(graph, f"{base}_scale", np.ascontiguousarray(scale_np)),
        ]
        if zps is not None:
            zp_codes = np.ascontiguousarray(zps).astype(dtype.numpy())
            inputs.append(frontend.new_initializer(graph, f"{base}_zp", zp_codes))
        attrs: dict = {"axis": axis}
        if block:
            attrs["block_size"] = block
        dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{base}_dq", num_outputs=1)
        dq.outputs[0].name = f"{base}_dq"
        dq.outputs[0].shape = ir.Shape(codes.shape)
        dq.outputs[0].type = ir.TensorType(scale_type)
        dq.meta[meta.QUANT_KEY] = plan
        graph.insert_before(first, dq)
        read = dq.outputs[0]
        if tuple(codes.shape) != stored_shape:  # a two-direction recurrent weight's 2-D view
            shape = frontend.new_initializer(graph, f"{base}_shape", np.array(stored_shape, dtype=np.int64))
            reshape = ir.node("Reshape", [read, shape], name=f"{base}_dq_view")
            reshape.outputs[0].name = f"{base}_dq_view"
            reshape.outputs[0].shape, reshape.outputs[0].type = ir.Shape(stored_shape), ir.TensorType(scale_type)
            graph.insert_after(dq, reshape)
            read = reshape.outputs[0]
        transpose = None
        for r in group.refs:
            index = r.position
            if r.value is stored:
                r.node.replace_input_with(index, read)
                continue
            if transpose is None:  # a tied copy reads the table transposed: (E_T) = Eᵀ
                transpose = ir.node("Transpose", [dq.outputs[0]], attributes={"perm": [1, 0]}, name=f"{base}_dq_T")
                transpose.outputs[0].name = f"{base}_dq_T"
                transpose.outputs[0].shape = ir.Shape(stored_shape[::-1])
                transpose.outputs[0].type = ir.TensorType(scale_type)
                graph.insert_after(dq, transpose)
            r.node.replace_input_with(index, transpose.outputs[0])
        for value in group.values:
            owner = value.graph  # the main graph for an outer-scope weight read in a subgraph
            if not value.uses() and owner is not None and value.name in owner.initializers:
                owner.initializers.pop(value.name)
        logger.debug("quantized %s to %d bits (group %d)%s", plan.name, plan.bits, plan.group_size,
                     f", stored once for {', '.join(group.uses)}" if group.tied else "")
        return plan


def _retie_float_copies(model: ir.Model) -> int:
    """Turns unquantized transposed copies of embedding tables back into ``Transpose(table)``.

    The front door folds ``MatMul(x, Transpose(E))`` into a transposed copy of ``E`` so the
    output projection can be quantized on its own; left in float, the copy would store the table
    twice.
    """
    count = 0
    graph = model.graph
    for value in list(graph.initializers.values()):
        table_name = value.meta.get(meta.TIED_KEY)
        if table_name is None or meta.QUANT_KEY in value.meta or table_name not in graph.initializers:
            continue
        table = graph.initializers[table_name]
        if meta.QUANT_KEY in table.meta:
            continue  # the table's plan decides the tie; the head is materialized with it
        uses = list(value.uses())
        if not uses:
            continue
        first = min((u.node for u in uses), key=lambda n: list(graph).index(n))
        transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name=f"{value.name}_retied")
        transpose.outputs[0].name = f"{value.name}_retied"
        graph.insert_before(first, transpose)
        for use in uses:
            use.node.replace_input_with(use.idx, transpose.outputs[0])
        graph.initializers.pop(value.name)
        count += 1
    return count


def _require_portable_opset(model: ir.Model) -> None:
    opset = model.opset_imports.get("", 1)
    if opset < PORTABLE_OPSET[4]:
        raise ir.passes.PreconditionError(
            f"the model is at opset {opset}; blocked DequantizeLinear needs opset {PORTABLE_OPSET[4]}: "
            "run upgrade-opset first"
        )
