"""Neural-network operators: activations, softmax, dropout, normalization, convolution, pooling.

All in the default domain, except ``SimplifiedLayerNormalization``, registered in com.microsoft too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hessc.errors import UnsupportedError
from hessc.ir.executor.core import _axis
from hessc.ir.executor.registry import _MS_DOMAIN, register_op


# ---- activations


@register_op("", "Gelu", 20)
def _gelu(ctx, x):
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


@register_op("", "LeakyRelu")
def _leaky_relu(ctx, x):
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@register_op("", "Elu")
def _elu(ctx, x):
    return F.elu(x, ctx.attr("alpha", 1.0))


@register_op("", "Celu")
def _celu(ctx, x):
    return F.celu(x, ctx.attr("alpha", 1.0))


@register_op("", "Selu")
def _selu(ctx, x):
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register_op("", "HardSigmoid")
def _hard_sigmoid(ctx, x):
    return torch.clamp(ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5), 0, 1)


@register_op("", "HardSwish")
def _hard_swish(ctx, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@register_op("", "PRelu")
def _prelu(ctx, x, slope):
    return torch.where(x >= 0, x, x * slope)


@register_op("", "ThresholdedRelu")
def _thresholded_relu(ctx, x):
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros_like(x))


@register_op("", "Clip")
def _clip_v1(ctx, x):
    return torch.clamp(x, ctx.attr("min", -math.inf), ctx.attr("max", math.inf))


@register_op("", "Clip", 11)
def _clip(ctx, x, lo=None, hi=None):
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _softmax_2d(fn):
    def impl(ctx, x):
        axis = _axis(ctx.attr("axis", 1), x.dim())
        shape = x.shape
        flat = x.reshape(math.prod(shape[:axis]), -1)
        return fn(flat, dim=1).reshape(shape)

    return impl


def _softmax_axis(fn):
    return lambda ctx, x: fn(x, dim=ctx.attr("axis", -1))


register_op("", "Softmax")(_softmax_2d(torch.softmax))
register_op("", "Softmax", 13)(_softmax_axis(torch.softmax))
register_op("", "LogSoftmax")(_softmax_2d(torch.log_softmax))
register_op("", "LogSoftmax", 13)(_softmax_axis(torch.log_softmax))


@register_op("", "Dropout")
def _dropout(ctx, x, *_):
    if ctx.output_used(1):
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


# ---- normalization


def _normalize(x, axis, eps, center: bool):
    dims = tuple(range(_axis(axis, x.dim()), x.dim()))
    mean = x.mean(dims, keepdim=True) if center else None
    xc = x - mean if center else x
    var = (xc * xc).mean(dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    return xc * inv, mean, inv


def _stash(ctx, x):
    """Upcast for the statistics as ``stash_type`` asks (float32 unless the executor is wider)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


@register_op("", "LayerNormalization", 17)
def _layer_norm(ctx, x, scale, bias=None):
    xs = _stash(ctx, x)
    y, mean, inv = _normalize(xs, ctx.attr("axis", -1), ctx.attr("epsilon", 1e-5), True)
    y = y.to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv) if ctx.num_outputs > 1 else y


@register_op("", "RMSNormalization", 23)
def _rms_norm(ctx, x, scale):
    xs = _stash(ctx, x)
    y, _, _ = _normalize(xs, ctx.attr("axis", -1), ctx.attr("epsilon", 1e-5), False)
    return y.to(x.dtype) * scale


@register_op("", "SimplifiedLayerNormalization")
@register_op(_MS_DOMAIN, "SimplifiedLayerNormalization")
def _simplified_layer_norm(ctx, x, scale):
    xs = _stash(ctx, x)
    y, _, inv = _normalize(xs, ctx.attr("axis", -1), ctx.attr("epsilon", 1e-5), False)
    y = y.to(x.dtype) * scale
    return (y, inv) if ctx.num_outputs > 1 else y


@register_op("", "BatchNormalization", 9)
def _batch_norm(ctx, x, scale, bias, mean, var):
    if ctx.attr("training_mode", 0):
        raise UnsupportedError("BatchNormalization with training_mode=1 is not supported")
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var.reshape(shape) + ctx.attr("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


@register_op("", "InstanceNormalization")
def _instance_norm(ctx, x, scale, bias):
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) * torch.rsqrt(var + ctx.attr("epsilon", 1e-5))
    return y * scale.reshape(shape) + bias.reshape(shape)


@register_op("", "LpNormalization")
def _lp_norm(ctx, x):
    return F.normalize(x, p=ctx.attr("p", 2), dim=ctx.attr("axis", -1), eps=0.0)


# ---- convolution and pooling


def _conv_pads(ctx, x, kernel: Sequence[int], strides, dilations) -> list[int]:
    """ONNX pads ``[b1.., e1..]`` after resolving ``auto_pad``."""
    nd = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(ctx.attr("pads") or [0] * (2 * nd))


def _apply_pads(x, pads: Sequence[int], value: float = 0.0):
    """Symmetric part for the torch op, asymmetric rest applied with F.pad."""
    nd = len(pads) // 2
    sym = [min(pads[i], pads[i + nd]) for i in range(nd)]
    extra: list[int] = []
    for i in range(nd - 1, -1, -1):
        extra += [pads[i] - sym[i], pads[i + nd] - sym[i]]
    if any(extra):
        x = F.pad(x, extra, value=value)
    return x, sym


@register_op("", "Conv")
def _conv(ctx, x, w, b=None):
    nd = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = ctx.attr("strides") or [1] * nd
    dilations = ctx.attr("dilations") or [1] * nd
    pads = _conv_pads(ctx, x, kernel, strides, dilations)
    x, sym = _apply_pads(x, pads)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, strides, sym, dilations, ctx.attr("group", 1))


@register_op("", "ConvTranspose")
def _conv_transpose(ctx, x, w, b=None):
    nd = w.dim() - 2
    strides = ctx.attr("strides") or [1] * nd
    dilations = ctx.attr("dilations") or [1] * nd
    if ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or ctx.attr("output_shape"):
        raise UnsupportedError("ConvTranspose with auto_pad SAME or output_shape")
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    out_pad = list(ctx.attr("output_padding") or [0] * nd)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = conv(x, w, b, strides, 0, out_pad, ctx.attr("group", 1), dilations)
    idx = [slice(None), slice(None)]
    for i in range(nd):
        idx.append(slice(pads[i], y.shape[2 + i] - pads[i + nd]))
    return y[tuple(idx)]


@register_op("", "GlobalAveragePool")
def _global_avg_pool(ctx, x):
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


@register_op("", "GlobalMaxPool")
def _global_max_pool(ctx, x):
    return x.amax(tuple(range(2, x.dim())), keepdim=True)


def _pool_args(ctx, x):
    kernel = list(ctx.attr("kernel_shape"))
    nd = len(kernel)
    strides = ctx.attr("strides") or [1] * nd
    dilations = ctx.attr("dilations") or [1] * nd
    return kernel, strides, dilations, _conv_pads(ctx, x, kernel, strides, dilations)


@register_op("", "MaxPool")
def _max_pool(ctx, x):
    kernel, strides, dilations, pads = _pool_args(ctx, x)
    nd = len(kernel)
    x, sym = _apply_pads(x, pads, value=-math.inf)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return pool(x, kernel, strides, sym, dilations, ceil_mode=bool(ctx.attr("ceil_mode", 0)))


@register_op("", "AveragePool")
def _avg_pool(ctx, x):
    kernel, strides, dilations, pads = _pool_args(ctx, x)
    nd = len(kernel)
    if any(d != 1 for d in dilations):
        raise UnsupportedError("AveragePool with dilations")
    ceil = bool(ctx.attr("ceil_mode", 0))
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    torch_pads: list[int] = []
    for i in range(nd - 1, -1, -1):
        torch_pads += [pads[i], pads[i + nd]]
    # All padding is explicit, so the divisor is fixed here: the window size when padding counts,
    # otherwise the number of real elements (a pooled mask of ones).
    total = pool(F.pad(x, torch_pads), kernel, strides, 0, ceil, True)
    if ctx.attr("count_include_pad", 0):
        return total
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    count = pool(F.pad(ones, torch_pads), kernel, strides, 0, ceil, True)
    return total / count


@register_op("", "Resize", 11)
def _resize(ctx, x, roi=None, scales=None, sizes=None):
    """Resize of the spatial axes (N and C kept) in the modes torch's ``interpolate`` computes
    exactly: ``nearest`` (asymmetric coordinates with ``floor``, or any coordinates at integer
    scales), ``linear`` with ``half_pixel``/``pytorch_half_pixel`` or ``align_corners``."""
    mode = ctx.attr("mode", "nearest")
    coords = ctx.attr("coordinate_transformation_mode", "half_pixel")
    spatial = x.dim() - 2
    if sizes is not None and sizes.numel():
        size = [int(v) for v in sizes.reshape(-1).tolist()]
        if size[:2] != list(x.shape[:2]):
            raise UnsupportedError("Resize of the batch or channel axis")
        factors = [size[2 + i] / x.shape[2 + i] for i in range(spatial)]
        target = {"size": size[2:]}
    elif scales is not None and scales.numel():
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise UnsupportedError("Resize of the batch or channel axis")
        factors = factors[2:]
        target = {"scale_factor": factors}
    else:
        raise UnsupportedError("Resize without scales or sizes")
    if spatial < 1 or spatial > 3:
        raise UnsupportedError(f"Resize of {spatial} spatial axes")
    if mode == "nearest":
        whole = all(float(f).is_integer() and f >= 1 for f in factors)
        if not whole and (coords != "asymmetric" or ctx.attr("nearest_mode", "round_prefer_floor") != "floor"):
            raise UnsupportedError("Resize nearest at non-integer scales other than asymmetric/floor")
        return F.interpolate(x, mode="nearest", **target)
    if mode == "linear" and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = ("linear", "bilinear", "trilinear")[spatial - 1]
        return F.interpolate(x, mode=kind, align_corners=coords == "align_corners", **target)
    raise UnsupportedError(f"Resize mode {mode!r} with {coords!r} coordinates")
