"""Quantization operators: linear (de)quantization, and matmul / gather on packed low-bit weights.

QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear (default domain); MatMulNBits and
GatherBlockQuantized (com.microsoft).
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from hessc.errors import UnsupportedError
from hessc.ir.executor.core import _axis, _torch_dtype
from hessc.ir.executor.ops_tensor import _wrap_index
from hessc.ir.executor.registry import _MS_DOMAIN, register_op


# ==================================================================================================
# quantization


_QUANT_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT2: (-2, 1),
    ir.DataType.UINT2: (0, 3),
}


def _quant_dtype(ctx, zp_index: int) -> ir.DataType:
    """The ONNX integer type a Q/DQ node works in, from the IR's static types."""
    node = ctx.node
    out_dtype = ctx.attr("output_dtype", 0)
    if node.op_type == "QuantizeLinear":
        if out_dtype:
            return ir.DataType(out_dtype)
        if node.outputs[0].dtype is not None:
            return node.outputs[0].dtype
    else:
        if node.inputs[0] is not None and node.inputs[0].dtype is not None:
            return node.inputs[0].dtype
    zp = node.inputs[zp_index] if len(node.inputs) > zp_index else None
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    return ir.DataType.UINT8


def _expand_quant_param(p: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """Broadcast a per-tensor, per-axis or blocked scale / zero point to the shape of ``x``."""
    if p.numel() == 1 and p.dim() <= 1:
        return p.reshape(())
    axis = _axis(axis, x.dim())
    if p.dim() == 1 and not block:
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)
    if block:
        p = p.repeat_interleave(block, dim=axis)
        return p.narrow(axis, 0, x.shape[axis])
    return p


@register_op("", "DequantizeLinear")
def _dequantize_linear(ctx, x, scale, zp=None):
    axis, block = ctx.attr("axis", 1), ctx.attr("block_size", 0)
    s = _expand_quant_param(scale, x, axis, block)
    fdt = scale.dtype if scale.is_floating_point() else (ctx.float_dtype or torch.float32)
    xf = x.to(fdt)
    if zp is not None:
        xf = xf - _expand_quant_param(zp, x, axis, block).to(fdt)
    return xf * s


@register_op("", "QuantizeLinear")
def _quantize_linear(ctx, x, scale, zp=None):
    qtype = _quant_dtype(ctx, 2)
    if qtype not in _QUANT_RANGES:
        raise UnsupportedError(f"QuantizeLinear to {qtype.name} is not supported")
    lo, hi = _QUANT_RANGES[qtype]
    axis, block = ctx.attr("axis", 1), ctx.attr("block_size", 0)
    s = _expand_quant_param(scale, x, axis, block).to(x.dtype)
    q = torch.round(x / s)
    if zp is not None:
        q = q + _expand_quant_param(zp, x, axis, block).to(q.dtype)
    return torch.clamp(q, lo, hi).to(_torch_dtype(qtype, None))


@register_op("", "DynamicQuantizeLinear")
def _dynamic_quantize_linear(ctx, x):
    lo = torch.clamp(x.min(), max=0)
    hi = torch.clamp(x.max(), min=0)
    scale = (hi - lo) / 255
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255).to(torch.uint8)
    return q, scale.to(x.dtype), zp.to(torch.uint8)


def _unpack_low_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 bytes holding ``8 // bits`` codes each, low bits first, along the last dim."""
    if bits == 8:
        return packed.to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _matmulnbits_weight(ctx, b, scales, zp) -> torch.Tensor:
    """Dequantized ``W`` of shape [N, K] from MatMulNBits' packed inputs."""
    k, n = ctx.attr("K"), ctx.attr("N")
    bits, block = ctx.attr("bits", 4), ctx.attr("block_size")
    if bits not in (2, 4, 8):
        raise UnsupportedError(f"MatMulNBits with bits={bits}")
    n_blocks = -(-k // block)
    q = _unpack_low_bits(b.reshape(n, n_blocks, -1), bits)  # [N, n_blocks, block]
    fdt = scales.dtype
    s = scales.reshape(n, n_blocks, 1)
    if zp is None:
        z = torch.full((), float(1 << (bits - 1)), dtype=fdt, device=scales.device)
    elif zp.is_floating_point():
        z = zp.reshape(n, n_blocks, 1)
    else:
        z = _unpack_low_bits(zp.reshape(n, -1), bits)[:, :n_blocks].reshape(n, n_blocks, 1)
        z = z.to(fdt)
    w = (q.to(fdt) - z) * s
    return w.reshape(n, -1)[:, :k]


@register_op(_MS_DOMAIN, "MatMulNBits")
def _matmul_nbits(ctx, a, b, scales, zp=None, g_idx=None, bias=None):
    if g_idx is not None:
        raise UnsupportedError("MatMulNBits with g_idx")
    w = _matmulnbits_weight(ctx, b, scales, zp).to(a.dtype)
    y = torch.matmul(a, w.T)
    return y + bias if bias is not None else y


@register_op(_MS_DOMAIN, "GatherBlockQuantized")
def _gather_block_quantized(ctx, data, idx, scales, zp=None):
    bits = ctx.attr("bits", 4)
    block = ctx.attr("block_size", 128)
    qaxis = ctx.attr("quantize_axis", 1)
    gaxis = ctx.attr("gather_axis", 0)
    dtype = ctx.node.inputs[0].dtype
    packed = dtype == ir.DataType.UINT8
    if packed:
        q = _unpack_low_bits(data, bits)
        default_zp = float(1 << (bits - 1))
        if zp is not None:
            zp = _unpack_low_bits(zp, bits)[..., : scales.shape[-1]]
    else:
        q = data.to(torch.int32)
        default_zp = 0.0
    qaxis = _axis(qaxis, q.dim())
    fdt = scales.dtype
    s = _expand_quant_param(scales, q, qaxis, block)
    z = (
        _expand_quant_param(zp, q, qaxis, block).to(fdt)
        if zp is not None
        else torch.tensor(default_zp, dtype=fdt, device=scales.device)
    )
    w = (q.to(fdt) - z) * s
    gaxis = _axis(gaxis, w.dim())
    idx = _wrap_index(idx, w.shape[gaxis])
    out = w.index_select(gaxis, idx.reshape(-1))
    return out.reshape(w.shape[:gaxis] + idx.shape + w.shape[gaxis + 1 :])
