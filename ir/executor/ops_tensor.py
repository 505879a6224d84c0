"""Type, shape and indexing operators (default domain).

Cast, Shape, Reshape, Flatten, Transpose, (Un)Squeeze, Concat, Split, Slice, Gather*, Scatter*,
Expand, Tile, Range, Constant, ConstantOfShape, Trilu, CumSum, NonZero, TopK, OneHot and Pad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hessc.errors import InputError, UnsupportedError
from hessc.ir.executor.core import _axis, _ints, _scalar
from hessc.ir.executor.registry import register_op


# ---- type and shape ops


@register_op("", "Cast")
def _cast(ctx, x):
    return x.to(ctx.torch_dtype(ctx.attr("to")))


@register_op("", "CastLike")
def _cast_like(ctx, x, like):
    return x.to(like.dtype)


@register_op("", "Shape")
def _shape(ctx, x):
    dims = list(x.shape)
    rank = len(dims)
    start = ctx.attr("start", 0)
    end = ctx.attr("end", rank)
    return torch.tensor(dims[start:end], dtype=torch.int64, device=ctx.device)


@register_op("", "Size")
def _size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=ctx.device)


@register_op("", "Reshape", 5)
def _reshape(ctx, x, shape):
    dims = _ints(shape)
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register_op("", "Flatten")
def _flatten(ctx, x):
    axis = _axis(ctx.attr("axis", 1), x.dim())
    outer = math.prod(x.shape[:axis])
    return x.reshape(outer, math.prod(x.shape[axis:]))


@register_op("", "Transpose")
def _transpose(ctx, x):
    perm = ctx.attr("perm") or list(range(x.dim() - 1, -1, -1))
    return x.permute(perm)


def _axes_arg(ctx, axes_input) -> list[int] | None:
    if axes_input is not None:
        return _ints(axes_input)
    axes = ctx.attr("axes")
    return list(axes) if axes is not None else None


@register_op("", "Unsqueeze")
def _unsqueeze(ctx, x, axes=None):
    axes = _axes_arg(ctx, axes) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@register_op("", "Squeeze")
def _squeeze(ctx, x, axes=None):
    axes = _axes_arg(ctx, axes)
    if axes is None:
        return x.squeeze()
    axes = [_axis(a, x.dim()) for a in axes]
    return x.squeeze(tuple(axes)) if axes else x


@register_op("", "Concat")
def _concat(ctx, *xs):
    return torch.cat([x for x in xs if x is not None], dim=ctx.attr("axis"))


@register_op("", "Split")
def _split(ctx, x, split=None):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    sizes = _ints(split) if split is not None else ctx.attr("split")
    if not sizes:
        n = ctx.attr("num_outputs", ctx.num_outputs)
        chunk = -(-x.shape[axis] // n)
        sizes = [chunk] * (n - 1) + [x.shape[axis] - chunk * (n - 1)]
    return list(torch.split(x, list(sizes), dim=axis))


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    if step == 0:
        raise InputError("Slice step cannot be 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        if start == 0 and end == dim and step == 1:
            return x
        idx = (slice(None),) * axis + (slice(start, end, step),)
        return x[idx]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    count = max(0, -(-(start - end) // -step))
    index = start + step * torch.arange(count, dtype=torch.int64, device=x.device)
    return x.index_select(axis, index)


@register_op("", "Slice")
def _slice_v1(ctx, x):
    axes = ctx.attr("axes") or list(range(len(ctx.attr("starts"))))
    for a, s, e in zip(axes, ctx.attr("starts"), ctx.attr("ends")):
        x = _slice_axis(x, _axis(a, x.dim()), s, e, 1)
    return x


@register_op("", "Slice", 10)
def _slice(ctx, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        x = _slice_axis(x, _axis(a, x.dim()), s, e, st)
    return x


def _wrap_index(idx: torch.Tensor, dim: int) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + dim, idx)


@register_op("", "Gather")
def _gather(ctx, x, idx):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    idx = _wrap_index(idx, x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])


@register_op("", "GatherElements")
def _gather_elements(ctx, x, idx):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    return torch.gather(x, axis, _wrap_index(idx, x.shape[axis]))


@register_op("", "GatherND")
def _gather_nd(ctx, x, idx):
    b = ctx.attr("batch_dims", 0)
    k = idx.shape[-1]
    batch_shape = x.shape[:b]
    nb = math.prod(batch_shape)
    data = x.reshape(nb, *x.shape[b:])
    ind = idx.reshape(nb, -1, k).to(torch.int64)
    comps = [_wrap_index(ind[..., i], data.shape[1 + i]) for i in range(k)]
    if k == 0:
        out = data.unsqueeze(1).expand(nb, ind.shape[1], *data.shape[1:])
    else:
        bidx = torch.arange(nb, device=x.device).reshape(nb, 1).expand_as(comps[0])
        out = data[(bidx, *comps)]
    return out.reshape(*batch_shape, *idx.shape[b:-1], *x.shape[b + k :])


def _flat_index(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    k = idx.shape[-1]
    flat = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    for i in range(k):
        flat = flat * shape[i] + _wrap_index(idx[..., i], shape[i])
    return flat.reshape(-1)


@register_op("", "ScatterND")
def _scatter_nd(ctx, x, idx, updates):
    k = idx.shape[-1]
    lead = math.prod(x.shape[:k])
    flat_x = x.reshape(lead, *x.shape[k:])
    flat_i = _flat_index(idx, x.shape)
    flat_u = updates.reshape(-1, *x.shape[k:]).to(x.dtype)
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        out = flat_x.index_copy(0, flat_i, flat_u)
    elif reduction == "add":
        out = flat_x.index_add(0, flat_i, flat_u)
    else:
        mode = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
        out = flat_x.index_reduce(0, flat_i, flat_u, mode)
    return out.reshape(x.shape)


@register_op("", "ScatterElements")
def _scatter_elements(ctx, x, idx, updates):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    idx = _wrap_index(idx, x.shape[axis])
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        return x.scatter(axis, idx, updates)
    mode = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return x.scatter_reduce(axis, idx, updates, mode, include_self=True)


@register_op("", "Expand")
def _expand(ctx, x, shape):
    out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(out)


@register_op("", "Tile")
def _tile(ctx, x, repeats):
    return x.repeat(_ints(repeats))


@register_op("", "Range")
def _range(ctx, start, limit, delta):
    s, l, d = _scalar(start), _scalar(limit), _scalar(delta)
    n = max(math.ceil((l - s) / d), 0)
    steps = torch.arange(n, dtype=start.dtype, device=start.device)
    return start.reshape(()) + steps * delta.reshape(())


@register_op("", "Constant")
def _constant(ctx, *_):
    device = ctx.device
    cached = ctx.cache.get("value")
    if cached is not None and cached.device == device:
        return cached
    attrs = ctx.attrs
    fdt = ctx.float_dtype or torch.float32
    if "value" in attrs:
        value = ctx.to_torch(attrs["value"])
    elif "value_float" in attrs or "value_floats" in attrs:
        value = torch.tensor(attrs.get("value_float", attrs.get("value_floats")), dtype=fdt)
    elif "value_int" in attrs or "value_ints" in attrs:
        value = torch.tensor(attrs.get("value_int", attrs.get("value_ints")), dtype=torch.int64)
    else:
        raise UnsupportedError(f"Constant attributes {sorted(attrs)} are not supported")
    ctx.cache["value"] = value = value.to(device)
    return value


@register_op("", "ConstantOfShape")
def _constant_of_shape(ctx, shape):
    value = ctx.attr("value")
    fill = ctx.to_torch(value).reshape(-1) if value is not None else None
    if fill is None:
        fill = torch.zeros(1, dtype=ctx.float_dtype or torch.float32, device=ctx.device)
    return fill.expand(_ints(shape)).clone() if shape.numel() else fill.reshape(())


@register_op("", "Trilu")
def _trilu(ctx, x, k=None):
    k = int(_scalar(k)) if k is not None else 0
    return torch.triu(x, k) if ctx.attr("upper", 1) else torch.tril(x, k)


@register_op("", "CumSum")
def _cumsum(ctx, x, axis):
    axis = _axis(int(_scalar(axis)), x.dim())
    if ctx.attr("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if ctx.attr("exclusive", 0):
        y = y - x
    if ctx.attr("reverse", 0):
        y = y.flip(axis)
    return y


@register_op("", "NonZero")
def _nonzero(ctx, x):
    return torch.nonzero(x).T.contiguous()


@register_op("", "TopK", 10)
def _topk(ctx, x, k):
    axis = _axis(ctx.attr("axis", -1), x.dim())
    values, indices = torch.topk(
        x, int(_scalar(k)), dim=axis, largest=bool(ctx.attr("largest", 1)), sorted=True
    )
    return values, indices


@register_op("", "OneHot")
def _one_hot(ctx, idx, depth, values):
    d = int(_scalar(depth))
    idx = _wrap_index(idx, d)
    axis = ctx.attr("axis", -1)
    hot = F.one_hot(idx.clamp(0, d - 1), d).bool() & ((idx >= 0) & (idx < d)).unsqueeze(-1)
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, _axis(axis, out.dim()))


@register_op("", "Pad", 11)
def _pad(ctx, x, pads, value=None, axes=None):
    pads = _ints(pads)
    rank = x.dim()
    axes = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + n]
    torch_pads: list[int] = []
    for a in range(rank - 1, -1, -1):
        torch_pads += [full[a], full[a + rank]]
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        v = _scalar(value) if value is not None and value.numel() else 0
        return F.pad(x, torch_pads, mode="constant", value=v)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    while torch_pads and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    spatial = len(torch_pads) // 2
    lead = rank - spatial
    y = x.reshape(1, max(1, math.prod(x.shape[:lead])), *x.shape[lead:])
    y = F.pad(y, torch_pads, mode=torch_mode)
    return y.reshape(*x.shape[:lead], *y.shape[2:])


@register_op("", "Pad", 2)
def _pad_v2(ctx, x):
    value = torch.tensor(ctx.attr("value", 0.0))
    return _pad(ctx, x, ctx.attr("pads"), value)
