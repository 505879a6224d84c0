"""Elementwise, linear-algebra and reduction operators (default domain).

Unary and binary elementwise ops, comparisons and logic, variadic Max / Min / Sum / Mean, MatMul,
Gemm, Einsum, DFT, the Reduce* family, ArgMax and ArgMin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hessc.ir.executor.core import _axis
from hessc.ir.executor.ops_tensor import _axes_arg
from hessc.ir.executor.registry import register_op


# ==================================================================================================
# operator implementations (default domain)


def _register_unary(op: str, fn: Callable[[torch.Tensor], torch.Tensor], since: int = 1) -> None:
    register_op("", op, since)(lambda ctx, x: fn(x))


for _op, _fn in {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softsign": F.softsign,
    "Softplus": F.softplus,
    "Mish": F.mish,
    "Identity": lambda x: x,
}.items():
    _register_unary(_op, _fn)


@register_op("", "Add")
def _add(ctx, a, b):
    return a + b


@register_op("", "Sub")
def _sub(ctx, a, b):
    return a - b


@register_op("", "Mul")
def _mul(ctx, a, b):
    return a * b


@register_op("", "Div")
def _div(ctx, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@register_op("", "Pow")
def _pow(ctx, a, b):
    r = torch.pow(a, b)
    return r if r.dtype == a.dtype else r.to(a.dtype)


@register_op("", "Mod")
def _mod(ctx, a, b):
    if ctx.attr("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@register_op("", "BitShift")
def _bitshift(ctx, a, b):
    left = ctx.attr("direction") == "LEFT"
    return torch.bitwise_left_shift(a, b) if left else torch.bitwise_right_shift(a, b)


for _op, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}.items():
    register_op("", _op)(functools.partial(lambda fn, ctx, a, b: fn(a, b), _fn))


@register_op("", "IsInf")
def _isinf(ctx, x):
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@register_op("", "Where")
def _where(ctx, c, a, b):
    return torch.where(c, a, b)


def _variadic(fn):
    return lambda ctx, *xs: functools.reduce(fn, [x for x in xs if x is not None])


register_op("", "Max")(_variadic(torch.maximum))
register_op("", "Min")(_variadic(torch.minimum))
register_op("", "Sum")(_variadic(torch.add))


@register_op("", "Mean")
def _mean(ctx, *xs):
    xs = [x for x in xs if x is not None]
    return functools.reduce(torch.add, xs) / len(xs)


# ---- linear algebra


@register_op("", "MatMul")
def _matmul(ctx, a, b):
    return torch.matmul(a, b)


@register_op("", "Gemm")
def _gemm(ctx, a, b, c=None):
    if ctx.attr("transA", 0):
        a = a.T
    if ctx.attr("transB", 0):
        b = b.T
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@register_op("", "Einsum")
def _einsum(ctx, *xs):
    return torch.einsum(ctx.attr("equation").replace(" ", ""), *xs)


# ---- spectral


def _dft(ctx, x, dft_length, axis: int):
    """ONNX DFT: the last dimension holds (real) or (real, imaginary); ``axis`` is a signal axis."""
    axis = axis + x.dim() if axis < 0 else axis
    signal = torch.complex(x[..., 0], x[..., 1]) if x.shape[-1] == 2 else x[..., 0]
    n = None if dft_length is None else int(dft_length.reshape(-1)[0])
    if ctx.attr("inverse", 0):
        y = torch.fft.ifft(signal, n=n, dim=axis)
    else:
        y = torch.fft.fft(signal, n=n, dim=axis)
    if ctx.attr("onesided", 0):
        y = y.narrow(axis, 0, y.shape[axis] // 2 + 1)
    return torch.view_as_real(y.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)).to(x.dtype)


@register_op("", "DFT", 17)
def _dft17(ctx, x, dft_length=None):
    return _dft(ctx, x, dft_length, int(ctx.attr("axis", 1)))


@register_op("", "DFT", 20)
def _dft20(ctx, x, dft_length=None, axis=None):
    return _dft(ctx, x, dft_length, -2 if axis is None else int(axis.reshape(-1)[0]))


# ---- reductions


def _reduce(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]):
    def impl(ctx, x, axes=None):
        ax = _axes_arg(ctx, axes)
        keep = bool(ctx.attr("keepdims", 1))
        if not ax:
            if ctx.attr("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        ax = sorted(_axis(a, x.dim()) for a in ax)
        if x.dim() == 0:
            return fn(x.reshape(1), [0], False).reshape(())
        return fn(x, ax, keep)

    return impl


def _prod(x, ax, keep):
    for a in reversed(ax):
        x = torch.prod(x, a, keepdim=keep)
    return x


for _op, _fn in {
    "ReduceMean": lambda x, ax, k: torch.mean(x, ax, keepdim=k),
    "ReduceSum": lambda x, ax, k: torch.sum(x, ax, keepdim=k),
    "ReduceMax": lambda x, ax, k: torch.amax(x, ax, keepdim=k),
    "ReduceMin": lambda x, ax, k: torch.amin(x, ax, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, ax, k: torch.sum(torch.abs(x), ax, keepdim=k),
    "ReduceL2": lambda x, ax, k: torch.sqrt(torch.sum(x * x, ax, keepdim=k)),
    "ReduceSumSquare": lambda x, ax, k: torch.sum(x * x, ax, keepdim=k),
    "ReduceLogSum": lambda x, ax, k: torch.log(torch.sum(x, ax, keepdim=k)),
    "ReduceLogSumExp": lambda x, ax, k: torch.logsumexp(x, ax, keepdim=k),
}.items():
    register_op("", _op)(_reduce(_fn))


def _arg_reduce(largest: bool):
    def impl(ctx, x):
        axis = _axis(ctx.attr("axis", 0), x.dim())
        keep = bool(ctx.attr("keepdims", 1))
        last = ctx.attr("select_last_index", 0)
        y = x.flip(axis) if last else x
        arg = torch.argmax if largest else torch.argmin
        idx = arg(y, axis, keepdim=keep)
        return x.shape[axis] - 1 - idx if last else idx

    return impl


register_op("", "ArgMax")(_arg_reduce(True))
register_op("", "ArgMin")(_arg_reduce(False))
