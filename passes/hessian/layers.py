r"""The layers that get statistics, and their inputs as rows.

A weight value read by several MatMul/Gemm/Conv nodes is one target; each node contributes its
input ``x``. A Conv ``y = W * x`` is a matrix product on patches, ``y_p = W_mat x_p`` with
``W_mat = W.reshape(out, −1)``, so its rows ``p`` are the im2col patches of ``x`` (feature order:
channel, then kernel offsets, that of ``W_mat``'s columns) and the layer-output rows are ``y``'s
pixels in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import onnx_ir as ir
import torch
import torch.nn.functional as F

from hessc.ir import weights as qweights

logger = logging.getLogger(__name__)

_LAYER_OPS = ("MatMul", "Gemm", "Conv")


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    groups: int


@dataclasses.dataclass(frozen=True)
class _Act:
    """One layer input: a value name and, for Conv, how it is unfolded into patches."""

    name: str
    conv: _ConvSpec | None
    features: int


@dataclasses.dataclass
class _Target:
    """One weight value and the nodes that read it."""

    name: str
    value: ir.Value
    refs: list[qweights.WeightRef]
    acts: list[_Act]

    @property
    def key(self) -> str:
        return self.value.name


def _conv_spec(ref: qweights.WeightRef) -> _ConvSpec | None:
    node = ref.node
    shape = ref.stored_shape
    kernel = tuple(int(k) for k in node.attributes.get_ints("kernel_shape", shape[2:]))
    rank = len(kernel)
    if rank not in (1, 2):
        return None
    strides = tuple(node.attributes.get_ints("strides", [1] * rank))
    dilations = tuple(node.attributes.get_ints("dilations", [1] * rank))
    pads = tuple(node.attributes.get_ints("pads", [0] * (2 * rank)))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    return _ConvSpec(kernel, strides, dilations, pads, auto_pad, node.attributes.get_int("group", 1))


def _targets(model: ir.Model) -> list[_Target]:
    refs, _ = qweights.find_weights(model)
    by_value: dict[ir.Value, _Target] = {}
    for ref in refs:
        if ref.op not in _LAYER_OPS:
            continue
        if ref.graph is not model.graph:
            logger.info("%s is in a subgraph; no curvature statistics for it", ref.name)
            continue
        conv = None
        if ref.op == "Conv":
            conv = _conv_spec(ref)
            if conv is None:
                logger.info("%s: %d-D convolution; no curvature statistics for it", ref.name, len(ref.stored_shape) - 2)
                continue
        act = _Act(ref.activation.name, conv, ref.matrix_shape[1])
        target = by_value.setdefault(ref.value, _Target(ref.name, ref.value, [], []))
        target.refs.append(ref)
        if act not in target.acts:
            target.acts.append(act)
    return list(by_value.values())


def _same_pads(size: int, k: int, s: int, d: int, upper: bool) -> tuple[int, int]:
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _im2col(x: torch.Tensor, spec: _ConvSpec) -> torch.Tensor:
    """Patches of ``x`` [B, C, *spatial] as (rows, groups, C/groups · prod(kernel)).

    The feature order (channel, then kernel offsets) is that of ``W.reshape(out, -1)``.
    """
    kernel, strides, dilations = list(spec.kernel), list(spec.strides), list(spec.dilations)
    rank = len(kernel)
    spatial = list(x.shape[2:])
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [_same_pads(n, k, s, d, spec.auto_pad == "SAME_UPPER")
                 for n, k, s, d in zip(spatial, kernel, strides, dilations)]
        begin, end = [p[0] for p in pairs], [p[1] for p in pairs]
    elif spec.auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    else:
        begin, end = list(spec.pads[:rank]), list(spec.pads[rank:])
    if rank == 1:
        x = x.unsqueeze(2)
        kernel, strides, dilations = [1] + kernel, [1] + strides, [1] + dilations
        begin, end = [0] + begin, [0] + end
    # F.pad takes (last-dim begin, last-dim end, previous dim ...).
    x = F.pad(x, (begin[1], end[1], begin[0], end[0]))
    cols = F.unfold(x, kernel, dilation=dilations, stride=strides)  # [B, C·kh·kw, L]
    batch, feats, length = cols.shape
    cols = cols.view(batch, spec.groups, feats // spec.groups, length)
    return cols.permute(0, 3, 1, 2).reshape(batch * length, spec.groups, feats // spec.groups)


def _rows(x: torch.Tensor, act: _Act) -> torch.Tensor:
    """The layer input as (rows, groups, features)."""
    if act.conv is not None:
        return _im2col(x, act.conv)
    return x.reshape(-1, 1, x.shape[-1])


def _acts_of(target: _Target) -> list[_Act]:
    """The input spec of each of the target's nodes, in ``refs`` order."""
    out = []
    for ref in target.refs:
        conv = _conv_spec(ref) if ref.op == "Conv" else None
        out.append(_Act(ref.activation.name, conv, ref.matrix_shape[1]))
    return out


def _output_rows(u: torch.Tensor, act: _Act) -> torch.Tensor:
    """A layer-output gradient as (rows, out), rows ordered like :func:`_rows`."""
    if act.conv is not None:
        if u.ndim == 3:  # 1-D conv
            return u.permute(0, 2, 1).reshape(-1, u.shape[1])
        return u.permute(0, 2, 3, 1).reshape(-1, u.shape[1])
    return u.reshape(-1, u.shape[-1])
