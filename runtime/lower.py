"""Lowering: the portable Q/DQ form → the operators each ONNX Runtime target runs fastest.

The portable form reads each quantized weight through a blocked ``DequantizeLinear``. Lowering
matches that ``DequantizeLinear`` together with its consumers and rewrites them:

* ``DQ(q[K,N]; axis=0, block=g) → MatMul(x, ·)`` and ``DQ(q[N,K]; axis=1) → Gemm(x, ·, c; transB=1)``
  become ``com.microsoft.MatMulNBits(x, pack(qᵀ), s, z[, bias])`` (``Y = x · dequant(B)ᵀ``), with
  ``accuracy_level=4`` on the CPU (int8 compute; 20–30× faster than the float path for 2/8 bits);
* ``DQ(E_q[V,D]; axis=1) → Gather(·, ids)`` becomes ``com.microsoft.GatherBlockQuantized`` (4/8 bits);
* ``target="cuda"`` additionally converts float tensors to fp16 (inputs and outputs keep their types)
  when asked, since the CUDA kernels of MatMulNBits are fastest in fp16.

3-bit codes (no 3-bit kernel exists) run as 4-bit ``MatMulNBits``: they are stored in a 4-bit
container in the portable form too, so this costs no size. A pattern a target cannot run as a
kernel (a block size the kernel refuses) is left in the portable form, which every target runs;
each such case is reported in the lowering summary.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError, VerificationError
from hessc.ir import meta
from hessc.passes.activations import ACT_QUANT_KEY
from hessc.runtime import packing

logger = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "onnx")
MS_DOMAIN = "com.microsoft"
_BITS = {
    ir.DataType.INT2: 2, ir.DataType.UINT2: 2,
    ir.DataType.INT4: 4, ir.DataType.UINT4: 4,
    ir.DataType.INT8: 8, ir.DataType.UINT8: 8,
}
_SIGNED = (ir.DataType.INT2, ir.DataType.INT4, ir.DataType.INT8)


@dataclasses.dataclass(frozen=True)
class LowerConfig:
    """Lowering options.

    Attributes:
        target: ``cpu``, ``cuda`` or ``onnx``.
        accuracy_level: MatMulNBits ``accuracy_level`` (4: int8 compute on CPU).
        gather_quantized: lower quantized embeddings to GatherBlockQuantized.
        fp16: convert float activations and scales to fp16 (cuda only).
    """

    target: str = "cpu"
    accuracy_level: int = 4
    gather_quantized: bool = True
    fp16: bool = False

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; use one of {', '.join(TARGETS)}")
        if self.fp16 and self.target != "cuda":
            raise InputError("fp16 lowering is for target='cuda' only")


def _dq_parts(dq: ir.Node):
    q, scale = dq.inputs[0], dq.inputs[1]
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if q is None or q.const_value is None or scale is None or scale.const_value is None:
        return None
    if zp is not None and zp.const_value is None:
        return None
    if q.dtype not in _BITS:
        return None
    return q, scale, zp


def _plan_bits(dq: ir.Node, default: int) -> int:
    plan = dq.meta.get(meta.QUANT_KEY)
    return plan.bits if plan is not None else default


class LowerWeightsPass(ir.passes.InPlacePass):
    """Rewrites weight ``DequantizeLinear`` patterns into the target's low-bit operators."""

    def __init__(self, config: LowerConfig) -> None:
        super().__init__()
        self.config = config
        self.summary: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.summary[key] = self.summary.get(key, 0) + 1

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.summary = {}
        if self.config.target == "onnx":
            return ir.passes.PassResult(model, False)
        modified = False
        for node in list(model.graph):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            modified |= self._lower(model, node)
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)

    def _lower(self, model: ir.Model, dq: ir.Node) -> bool:
        parts = _dq_parts(dq)
        if parts is None:
            return False
        q, scale, zp = parts
        uses = list(dq.outputs[0].uses())
        if not uses or dq.outputs[0].is_graph_output():
            return False
        block = dq.attributes.get_int("block_size", 0)
        axis = dq.attributes.get_int("axis", 1)
        bits = _BITS[q.dtype]
        ops = {(u.node.op_type, u.idx) for u in uses}
        if ops == {("MatMul", 1)} and axis == 0 and block:
            return self._to_matmul_nbits(model, dq, uses, q, scale, zp, bits, block, transposed=True)
        if all(u.node.op_type == "Gemm" and u.idx == 1 for u in uses) and axis == 1 and block:
            if all(self._plain_gemm(u.node) for u in uses):
                return self._to_matmul_nbits(model, dq, uses, q, scale, zp, bits, block, transposed=False)
        if ops == {("Gather", 0)} and axis == 1 and block and self.config.gather_quantized:
            return self._to_gather_block_quantized(model, dq, uses, q, scale, zp, bits, block)
        return False

    def _activation_input(self, x: ir.Value) -> ir.Value:
        """On the CPU, static per-tensor activation Q/DQ gives way to the kernel's own int8 path."""
        dq = x.producer()
        if self.config.target != "cpu" or dq is None or ACT_QUANT_KEY not in dq.meta:
            return x
        q = dq.inputs[0].producer()
        if q is None or q.op_type != "QuantizeLinear":
            return x
        self._count("8-bit activations: MatMulNBits dynamic int8 (accuracy_level 4)")
        return q.inputs[0]

    @staticmethod
    def _plain_gemm(node: ir.Node) -> bool:
        a = node.attributes
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return (
            a.get_int("transA", 0) == 0
            and a.get_int("transB", 0) == 1
            and a.get_float("alpha", 1.0) == 1.0
            and (c is None or (a.get_float("beta", 1.0) == 1.0 and c.shape is not None and len(c.shape) == 1))
        )

    def _to_matmul_nbits(self, model, dq, uses, q, scale, zp, bits, block, transposed) -> bool:
        if block < 16 or block & (block - 1):
            self._count(f"kept Q/DQ: block size {block} (MatMulNBits needs a power of two >= 16)")
            return False
        codes = q.const_value.numpy().astype(np.int16)
        scales = scale.const_value.numpy()
        zps = None if zp is None else zp.const_value.numpy().astype(np.int16)
        if transposed:  # stored (K, N) → (N, K)
            codes, scales = codes.T, scales.T
            zps = None if zps is None else zps.T
        n_out, k = codes.shape
        symmetric = q.dtype in _SIGNED
        if symmetric and zps is not None and np.any(zps):
            self._count("kept Q/DQ: signed codes with non-zero zero points")
            return False
        packed_b, packed_zp = packing.matmul_nbits_weights(
            codes, None if symmetric else zps, bits, block, symmetric
        )
        _check_packed(q.name, codes, scales, None if symmetric else zps, packed_b, packed_zp, bits, block, symmetric)
        graph = dq.graph
        base = q.name.removesuffix("_q")
        b_val = _initializer(graph, f"{base}_nbits_B", packed_b)
        s_val = _initializer(graph, f"{base}_nbits_scales", np.ascontiguousarray(scales).reshape(-1))
        zp_val = None if packed_zp is None else _initializer(graph, f"{base}_nbits_zp", packed_zp)
        for use in uses:
            node = use.node
            x = self._activation_input(node.inputs[0])
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            inputs = [x, b_val, s_val, zp_val]
            if bias is not None:
                inputs += [None, bias]
            attrs = {"K": k, "N": n_out, "bits": bits, "block_size": block}
            if self.config.target == "cpu":
                attrs["accuracy_level"] = self.config.accuracy_level
            while inputs and inputs[-1] is None:
                inputs.pop()
            new = ir.node("MatMulNBits", inputs, attributes=attrs, domain=MS_DOMAIN, name=f"{node.name or base}_nbits")
            new.meta[meta.QUANT_KEY] = dq.meta.get(meta.QUANT_KEY)
            _replace(graph, node, new)
        plan_bits = _plan_bits(dq, bits)
        self._count(f"MatMulNBits {bits}-bit" + (f" ({plan_bits}-bit codes)" if plan_bits != bits else ""))
        return True

    def _to_gather_block_quantized(self, model, dq, uses, q, scale, zp, bits, block) -> bool:
        if bits not in (4, 8) or block < 16 or block & (block - 1):
            self._count(f"kept Q/DQ: {bits}-bit embedding (GatherBlockQuantized runs 4 and 8 bits)")
            return False
        graph = dq.graph
        base = q.name.removesuffix("_q")
        codes = q.const_value.numpy()
        symmetric = q.dtype in _SIGNED
        if bits == 4:
            data = q  # int4/uint4 tables are read as they are
            inputs_zp = zp
        else:
            unsigned = packing.to_unsigned(codes, 8, symmetric)
            data = _initializer(graph, f"{base}_gbq_data", unsigned)
            if symmetric:
                inputs_zp = _initializer(
                    graph, f"{base}_gbq_zp", np.full(scale.const_value.shape, 128, dtype=np.uint8)
                )
            else:
                inputs_zp = zp
        for use in uses:
            node = use.node
            inputs = [data, node.inputs[1], scale] + ([inputs_zp] if inputs_zp is not None else [])
            attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block}
            if bits == 8:
                attrs["bits"] = 8
            new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=f"{node.name or base}_gbq")
            _replace(graph, node, new)
        self._count(f"GatherBlockQuantized {bits}-bit")
        return True


def _check_packed(name, codes, scales, zps, packed_b, packed_zp, bits, block, symmetric) -> None:
    """Asserts that the packed MatMulNBits weight dequantizes to the portable form's weight.

    Checked layer by layer, in numpy: an end-to-end comparison cannot tell a layout error from
    the arithmetic noise a badly conditioned (e.g. 2-bit) model amplifies.
    """
    n_out, k = codes.shape
    k_blocks = packed_b.shape[1]
    unpacked = packing.unpack_rows(packed_b.reshape(n_out, -1), bits, k_blocks * block)[:, :k].astype(np.int32)
    if packed_zp is None:
        zero = np.full((n_out, k_blocks), 1 << (bits - 1), dtype=np.int32)
        reference_zero = np.zeros((n_out, k_blocks), dtype=np.int32) if symmetric else zero
    else:
        zero = packing.unpack_rows(packed_zp.reshape(n_out, -1), bits, k_blocks).astype(np.int32)
        reference_zero = zps.astype(np.int32)
    expand = np.repeat(np.arange(k_blocks), block)[:k]
    lowered = (unpacked - zero[:, expand]) * scales[:, expand]
    portable = (codes.astype(np.int32) - reference_zero[:, expand]) * scales[:, expand]
    if not np.array_equal(lowered, portable):
        raise VerificationError(f"{name}: the packed MatMulNBits weight differs from the portable form (a hessc bug)")


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    graph.insert_before(old, new)
    out_old, out_new = old.outputs[0], new.outputs[0]
    name = out_old.name
    out_new.shape, out_new.type = out_old.shape, out_old.type
    ir.convenience.replace_all_uses_with(out_old, out_new, replace_graph_outputs=True)
    out_old.name = None
    out_new.name = name
    graph.remove(old, safe=True)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def lower(model: ir.Model, config: LowerConfig) -> tuple[ir.Model, dict[str, int]]:
    """Lowers the model for ``config.target``; returns it and what was rewritten, by kind."""
    lowering = LowerWeightsPass(config)
    lowering(model)
    summary = dict(lowering.summary)
    if config.fp16:
        model = to_fp16(model)
        summary["fp16 activations"] = 1
    return model, summary


def _const_scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _single_use_producer(value: ir.Value, op_type: str) -> ir.Node | None:
    node = value.producer()
    if node is None or node.op_type != op_type or len(list(value.uses())) != 1 or value.is_graph_output():
        return None
    return node


def fuse_rms_norms(model: ir.Model) -> int:
    """Rewrites decomposed RMSNorms into ONNX Runtime's ``SimplifiedLayerNormalization``.

    ``γ · x · 1/sqrt(mean(x², axis=-1) + ε)`` — ``Pow → ReduceMean → Add → Sqrt → Reciprocal →
    Mul(x, ·) → Mul(γ, ·)`` as exported — is exactly ``SimplifiedLayerNormalization(x, γ; ε)``,
    whose kernels accumulate the statistics in fp32 even for fp16 inputs. In fp16 the decomposed
    form overflows once ``|x| > 256`` (``mean(x²) = inf``, so the normalized output is 0).

    Returns:
        How many norms were fused.
    """
    fused = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Mul" or node.graph is None:
            continue
        gamma_index = next((i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None), None)
        if gamma_index is None:
            continue
        gamma, y = node.inputs[gamma_index], node.inputs[1 - gamma_index]
        if len(gamma.const_value.shape) != 1:
            continue
        mul = _single_use_producer(y, "Mul")
        if mul is None:
            continue
        for r_index in (0, 1):
            recip = _single_use_producer(mul.inputs[r_index], "Reciprocal")
            if recip is not None:
                x = mul.inputs[1 - r_index]
                break
        else:
            continue
        sqrt = _single_use_producer(recip.inputs[0], "Sqrt")
        add = sqrt and _single_use_producer(sqrt.inputs[0], "Add")
        if add is None:
            continue
        eps_index = next((i for i, v in enumerate(add.inputs) if _const_scalar(v) is not None), None)
        if eps_index is None:
            continue
        mean = _single_use_producer(add.inputs[1 - eps_index], "ReduceMean")
        if mean is None or not mean.attributes.get_int("keepdims", 1):
            continue
        axes = mean.inputs[1].const_value.numpy().tolist() if len(mean.inputs) > 1 and mean.inputs[1] is not None \
            else mean.attributes.get_ints("axes", [])
        rank = len(x.shape) if x.shape is not None else None
        if list(axes) not in ([-1], [rank - 1] if rank else [-1]):
            continue
        power = _single_use_producer(mean.inputs[0], "Pow")
        if power is None or power.inputs[0] is not x or _const_scalar(power.inputs[1]) != 2.0:
            continue
        new = ir.node(
            "SimplifiedLayerNormalization", [x, gamma],
            attributes={"axis": -1, "epsilon": _const_scalar(add.inputs[eps_index]), "stash_type": 1},
            name=f"{node.name or 'rms'}_fused",  # ORT registers it in the default domain
        )
        _replace(graph, node, new)
        for dead in (mul, recip, sqrt, add, mean, power):
            graph.remove(dead, safe=True)
        fused += 1
    return fused


def to_fp16(model: ir.Model) -> ir.Model:
    """Float tensors to fp16, keeping the graph's input and output types (for the CUDA provider).

    Decomposed RMSNorms are fused first (:func:`fuse_rms_norms`), so their statistics are
    accumulated in fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    metadata = dict(model.metadata_props)
    fused = fuse_rms_norms(model)
    logger.info("fused %d RMSNorms before fp16 conversion", fused)
    ir.external_data.load_to_model(model)  # the converter reads tensors inline
    proto = convert_float_to_float16(
        ir.to_proto(model), keep_io_types=True, disable_shape_infer=True, op_block_list=["RandomNormalLike"]
    )
    converted = ir.from_proto(proto)
    converted.metadata_props.update(metadata)
    return converted


def quantized_storage(model: ir.Model) -> tuple[int, int]:
    """Bytes stored for quantized weights (codes, scales, zero points) and their element count.

    Reads ``MatMulNBits``, ``GatherBlockQuantized`` and weight ``DequantizeLinear`` nodes, whoever
    wrote them, so every method is counted the same way.
    """
    total_bytes = 0
    numel = 0

    def nbytes(v: ir.Value | None) -> int:
        return int(v.const_value.nbytes) if v is not None and v.const_value is not None else 0

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ins = list(node.inputs) + [None] * 4
        if node.op_type == "MatMulNBits":
            numel += node.attributes.get_int("K") * node.attributes.get_int("N")
            total_bytes += nbytes(ins[1]) + nbytes(ins[2]) + nbytes(ins[3])
        elif node.op_type == "GatherBlockQuantized":
            data = ins[0]
            count = int(np.prod(data.const_value.shape))
            if data.dtype == ir.DataType.UINT8 and node.attributes.get_int("bits", 4) == 4:
                count *= 2  # two 4-bit codes per byte
            numel += count
            total_bytes += nbytes(ins[0]) + nbytes(ins[2]) + nbytes(ins[3])
        elif node.op_type == "DequantizeLinear" and ins[0] is not None and ins[0].const_value is not None:
            numel += int(np.prod(ins[0].const_value.shape))
            total_bytes += nbytes(ins[0]) + nbytes(ins[1]) + nbytes(ins[2])
    return total_bytes, numel
