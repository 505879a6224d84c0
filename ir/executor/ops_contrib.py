"""com.microsoft fused operators that ORT's optimizers produce.

Gelu, BiasGelu, FastGelu, QuickGelu, FusedMatMul, SkipLayerNormalization and
SkipSimplifiedLayerNormalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hessc.ir.executor.ops_nn import _normalize, _stash
from hessc.ir.executor.registry import _MS_DOMAIN, register_op


# ==================================================================================================
# com.microsoft fused ops ORT's optimizers produce


@register_op(_MS_DOMAIN, "Gelu")
def _ms_gelu(ctx, x):
    return F.gelu(x)


@register_op(_MS_DOMAIN, "BiasGelu")
def _ms_bias_gelu(ctx, x, bias):
    return F.gelu(x + bias)


@register_op(_MS_DOMAIN, "FastGelu")
def _ms_fast_gelu(ctx, x, bias=None):
    return F.gelu(x + bias if bias is not None else x, approximate="tanh")


@register_op(_MS_DOMAIN, "QuickGelu")
def _ms_quick_gelu(ctx, x):
    return x * torch.sigmoid(ctx.attr("alpha", 1.702) * x)


@register_op(_MS_DOMAIN, "FusedMatMul")
def _ms_fused_matmul(ctx, a, b):
    if ctx.attr("transA", 0):
        a = a.transpose(-1, -2)
    if ctx.attr("transB", 0):
        b = b.transpose(-1, -2)
    return ctx.attr("alpha", 1.0) * torch.matmul(a, b)


def _skip_norm(center: bool):
    def impl(ctx, x, skip, gamma, beta=None, bias=None):
        if not center:  # SkipSimplifiedLayerNormalization: (input, skip, gamma, bias)
            bias, beta = beta, None
        s = x + skip
        if bias is not None:
            s = s + bias
        y, mean, inv = _normalize(_stash(ctx, s), -1, ctx.attr("epsilon", 1e-12), center)
        y = y.to(s.dtype) * gamma
        if beta is not None:
            y = y + beta
        if ctx.num_outputs == 1:
            return y
        return [y, mean, inv, s][: ctx.num_outputs]

    return impl


register_op(_MS_DOMAIN, "SkipLayerNormalization")(_skip_norm(True))
register_op(_MS_DOMAIN, "SkipSimplifiedLayerNormalization")(_skip_norm(False))
