r"""Curvature annotation: per-weight Hessian statistics for every MatMul/Gemm/Conv weight.

For a layer ``y = W x`` (``W`` out×in) and a scalar loss ``L`` (a mean over ``B`` loss terms), the
statistics are, over the rows ``p`` of the layer (tokens, pixels, samples), with
``u_p = ∂L/∂y_p``::

    A = E_p[x_p x_pᵀ]                    input factor (forward only, ONNX Runtime, float64)
    ∇_W L = Σ_p u_p x_pᵀ                 mean gradient (exact)
    G = B · Σ_p u_p u_pᵀ                 output factor, so that  H_W ≈ A ⊗ G  (K-FAC)
    F = B · Σ_p (u_p ∘ u_p)(x_p ∘ x_p)ᵀ  diagonal Fisher (≈ diag(A) ⊗ diag(G))

With one loss term per row (an MLP on samples) ``G = E[g gᵀ]`` for the per-sample output gradient
``g = ∂ℓ/∂y``; for next-token losses ``B`` = predicted tokens. ``A ⊗ G`` then is the K-FAC
approximation of the Gauss-Newton/Fisher block of ``L``; for convolutions (several rows per loss
term) it assumes the spatial rows uncorrelated, as KFC does. Statistics over several feeds are
averaged with weights ``B_f`` (the loss is the token-weighted mean over all feeds).

Which ``u`` feeds ``G`` and ``F`` depends on the loss: true-label gradients for ``next-token``,
``ce`` and custom losses (the empirical Fisher); for ``kl`` (``KL(p_fp32 ‖ p_θ)``) sampled labels
``y ~ p_θ`` (an unbiased estimate of the Fisher, the Hessian of the KL at the fp32 point); for
``mse`` (``½‖y − y_fp32‖²``) ``u = ∂⟨ε, y⟩/∂y`` with ``ε ~ N(0, I)`` (an unbiased estimate of the
Gauss-Newton matrix). The gradient of ``kl`` and ``mse`` is zero at the fp32 point, so ``grad`` is
zero for them: ask for ``loss="next-token"`` or give ``labels`` for a meaningful gradient.

The layer-block Hessian ``∇²_W L`` itself is reached matrix-free through Hessian-vector products
(double backward through :class:`hessc.ir.executor.TorchExecutor`): its top eigenvalue (power
iteration), top-k eigenvalues (Lanczos) and trace (Hutchinson), on ``hvp_samples`` fixed feeds.

Everything is cached on disk under a key of (model content, calibration, settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from hessc.errors import InputError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.ir.executor import TorchExecutor
from hessc.passes import curvature
from hessc.runtime import sessions

logger = logging.getLogger(__name__)

__all__ = [
    "AnnotateHessianPass",
    "HessianConfig",
    "LOSSES",
    "calibration_digest",
    "default_cache_dir",
    "gptq_hessian",
    "hessian_for",
    "make_layer_hvp",
    "model_digest",
    "resolve_loss",
]

LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, np.ndarray]], torch.Tensor]
Progress = Callable[[str, int, int], None]
LOSSES = ("auto", "next-token", "ce", "kl", "mse")
_CACHE_VERSION = 1
_LAYER_OPS = ("MatMul", "Gemm", "Conv")
# Settings that change how statistics are computed but not their values.
_NOT_KEYED = ("cache", "max_activation_bytes", "threads")


# --------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class HessianConfig:
    """What curvature statistics to compute, on how much data.

    Costs (SmolLM2-135M, 2 cores): ``A`` is one ORT forward per feed plus an ``in×in`` float64
    update per layer input (about 1.5 s per 256-token feed); backward statistics are one torch
    forward+backward per feed; ``lambda_max``, ``lanczos_k`` and ``hutchinson_probes`` cost one
    double-backward pass (≈ 2-3 forwards) per Hessian-vector product, i.e. per iteration and per
    layer: use them on a few layers (``hvp_layers``).

    Attributes:
        covariance: compute ``A = E[x xᵀ]``, its top eigenvalues and trace.
        kfac: compute the output factor ``G`` (its diagonal for layers wider than
            ``kfac_diag_above``).
        gradient: compute the mean gradient ``∇_W L`` (out × in).
        fisher_diag: compute the diagonal Fisher, summarised by its mean.
        weighted_covariance: compute ``A_u = Σ_t ‖u_t‖² x_t x_tᵀ / Σ_t ‖u_t‖²``, the input second
            moment with each row (token, pixel) weighted by its squared output gradient
            ``u_t = ∂L/∂y_t`` (the sampled-label Fisher's for ``kl``/``mse``). It is the curvature
            ``ΔᵀHΔ`` of the loss under a per-row isotropic ``G``: rows the loss reads heavily, such
            as an attention-sink token whose values every later token mixes in, count for what
            they cost rather than for one row each. GPTQ uses it when present.
        split_covariance: also keep ``A`` of the even feeds (``a_fit``) and of the odd feeds
            (``a_check``), so that a quantizer fitted to one half (GPTQ) is scored on the other:
            scored on the ``A`` it minimised, a GPTQ item's predicted damage is optimistic, the
            more so the fewer calibration rows there are per input dimension.
        split_gradient: also keep the gradient of the even feeds (``grad_fit``) and of the odd
            feeds (``grad_check``), so that rounding directed by one half's gradient
            (``rtn-grad``) is scored on the other: scored on the gradient that chose it, its
            first-order gain is optimistic by an order of magnitude (SmolLM2, 8 bits).
        lambda_max: top eigenvalue of each layer's Hessian block by power iteration.
        lanczos_k: top-k eigenvalues of each layer's Hessian block by Lanczos (0 = off).
        hutchinson_probes: Rademacher probes for the trace of each block (0 = off).
        top_eigs: how many top eigenvalues of ``A`` to keep.
        max_samples: calibration feeds used for ``A``.
        max_grad_samples: calibration feeds used for backward statistics (gradient, G, Fisher).
        hvp_samples: calibration feeds in the fixed batch of the Hessian-vector products.
        kfac_diag_above: keep only ``diag(G)`` for layers with more outputs than this.
        loss: ``"auto"``, ``"next-token"`` (LM logits ``[batch, seq, vocab]`` against the shifted
            ``input_ids``), ``"ce"`` (cross-entropy against ``labels``), ``"kl"``
            (``KL(p_fp32 ‖ p_θ)`` over the last axis of the first output), ``"mse"``
            (``½ ‖y − y_fp32‖²`` over the last axis of the first output, mean over the other
            axes) or a callable ``(outputs by name, feed) -> scalar tensor`` (a mean over the rows
            of the first output, for the scale of ``G``). ``"auto"`` picks ``ce`` when labels are
            given; else, when the first output's name contains ``logit``: ``next-token`` if it has
            rank 3 and an integer input named like ``input_ids`` exists, otherwise ``kl``; else
            ``mse``.
        labels: integer class labels, one array per calibration feed, of the first output's
            shape without its last axis (for ``ce``).
        seed: seed of the sampled labels, the probes and the starting vectors.
        cache: directory of the disk cache; None = ``$HESSC_CACHE/hessian``, else
            ``$XDG_CACHE_HOME/hessc/hessian`` or ``~/.cache/hessc/hessian``; False = no cache.
        hvp_iters: maximum power iterations.
        hvp_tol: relative tolerance of the power iteration.
        lanczos_steps: Lanczos steps (0 = ``max(4k, 40)``).
        hvp_layers: ``fnmatch`` patterns of the weight names that get HVP statistics (empty =
            every layer).
        precision: ``"float32"`` or ``"float64"``: compute dtype of the torch executor for the
            backward statistics.
        batch_size: feeds concatenated along axis 0 per ONNX Runtime run (1 = one feed per run).
        max_activation_bytes: bound on the activation bytes exposed per ORT session and run;
            layers are collected in groups (one forward over the calibration each) beyond it.
        threads: ONNX Runtime intra-op threads (None = ORT's default).
    """

    covariance: bool = True
    kfac: bool = False
    gradient: bool = False
    fisher_diag: bool = False
    weighted_covariance: bool = False
    split_covariance: bool = False
    split_gradient: bool = False
    lambda_max: bool = False
    lanczos_k: int = 0
    hutchinson_probes: int = 0
    top_eigs: int = 8
    max_samples: int = 128
    max_grad_samples: int = 4
    hvp_samples: int = 1
    kfac_diag_above: int = 4096
    loss: Union[str, LossFn] = "auto"
    labels: tuple[np.ndarray, ...] | None = None
    seed: int = 0
    cache: Path | str | bool | None = None
    hvp_iters: int = 100
    hvp_tol: float = 1e-4
    lanczos_steps: int = 0
    hvp_layers: tuple[str, ...] = ()
    precision: str = "float32"
    batch_size: int = 1
    max_activation_bytes: int = 1 << 30
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("lanczos_k", "hutchinson_probes", "top_eigs", "lanczos_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"HessianConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_samples", "max_grad_samples", "hvp_samples", "hvp_iters", "batch_size",
                     "kfac_diag_above", "max_activation_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"HessianConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.hvp_tol > 0:
            raise InputError(f"HessianConfig.hvp_tol must be > 0, got {self.hvp_tol}")
        if self.lanczos_steps and self.lanczos_steps < self.lanczos_k:
            raise InputError(
                f"HessianConfig.lanczos_steps={self.lanczos_steps} cannot give lanczos_k={self.lanczos_k} "
                "eigenvalues; use at least lanczos_k steps (or 0 for the default)"
            )
        if self.precision not in ("float32", "float64"):
            raise InputError(f"HessianConfig.precision must be 'float32' or 'float64', got {self.precision!r}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise InputError(f"HessianConfig.loss must be one of {LOSSES} or a callable, got {self.loss!r}")
        if self.loss == "ce" and self.labels is None:
            raise InputError("HessianConfig.loss='ce' needs labels (one integer array per calibration feed)")
        if self.labels is not None:
            labels = tuple(np.asarray(x) for x in self.labels)
            for i, x in enumerate(labels):
                if not np.issubdtype(x.dtype, np.integer):
                    raise InputError(f"HessianConfig.labels[{i}] must hold integer class indices, got {x.dtype}")
            object.__setattr__(self, "labels", labels)
        if isinstance(self.cache, str):
            object.__setattr__(self, "cache", Path(self.cache))
        if self.cache is True:
            object.__setattr__(self, "cache", None)
        if self.threads is not None and self.threads < 1:
            raise InputError(f"HessianConfig.threads must be >= 1 or None, got {self.threads}")
        if isinstance(self.hvp_layers, str):
            object.__setattr__(self, "hvp_layers", (self.hvp_layers,))

    @property
    def backward(self) -> bool:
        """Whether any statistic needs output gradients."""
        return self.kfac or self.gradient or self.fisher_diag or self.weighted_covariance

    @property
    def hvp(self) -> bool:
        """Whether any statistic needs Hessian-vector products."""
        return self.lambda_max or self.lanczos_k > 0 or self.hutchinson_probes > 0


def default_cache_dir() -> Path:
    """``$HESSC_CACHE/hessian``, else ``$XDG_CACHE_HOME/hessc/hessian``, else ``~/.cache/hessc/hessian``."""
    env = os.environ.get("HESSC_CACHE")
    if env:
        return Path(env).expanduser() / "hessian"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hessc" / "hessian"


WEIGHTED_SHARE = 0.5
"""Share of the gradient-weighted covariance in GPTQ's Hessian (see :func:`gptq_hessian`)."""


def gptq_hessian(stats: meta.HessianStats) -> np.ndarray | None:
    """The layer Hessian GPTQ minimises ``tr(Δ H Δᵀ)`` under, from a weight's statistics.

    ``A = E[x xᵀ]`` counts every row alike, which is wrong where the loss reads a few rows far
    more than the rest: on SmolLM2 the attention-sink token (position 0) is 1 row in 512 of a
    ``v_proj`` input but every later token attends to its value, and GPTQ with ``A`` alone moved
    error onto it (2-11x RTN's error there, 3-5x less elsewhere; perplexity 37.2 against RTN's
    30.9 at 4 bits). When the gradient-weighted covariance ``A_u`` was measured, the Hessian is
    the equal-trace blend ``(1 − s)·A/tr A + s·A_u/tr A_u`` with ``s =`` :data:`WEIGHTED_SHARE`:
    ``A_u`` puts the weight where the loss is and ``A`` keeps the estimate well conditioned
    (4-bit, group 128: perplexity 29.5 with ``A_u`` alone, 28.7 blended).
    """
    a, aw = stats.a, getattr(stats, "a_weighted", None)
    if a is None or aw is None:
        return a
    ta, tw = float(np.trace(a)), float(np.trace(aw))
    if not (ta > 0 and tw > 0):
        return a
    return (1.0 - WEIGHTED_SHARE) * (a / ta) + WEIGHTED_SHARE * (aw / tw)


def hessian_for(ref: qweights.WeightRef) -> np.ndarray | None:
    """GPTQ's Hessian (in × in, float64) of a weight (:func:`gptq_hessian`), or None.

    Reads the :class:`hessc.ir.meta.HessianStats` that :class:`AnnotateHessianPass` left on the
    weight value; use as ``InsertQDQPass(hessian_for=hessian_for)``.
    """
    stats = ref.value.meta.get(meta.HESSIAN_KEY)
    if not isinstance(stats, meta.HessianStats) or stats.a is None:
        return None
    if stats.a.shape[0] != ref.matrix_shape[1]:
        logger.warning("%s: A is %s but the weight has %d inputs; not used", ref.name, stats.a.shape, ref.matrix_shape[1])
        return None
    return gptq_hessian(stats)


def gradient_for(ref: qweights.WeightRef) -> np.ndarray | None:
    """The loss gradient ``∂L/∂W`` (out × in) that :class:`AnnotateHessianPass` left on a weight,
    or None; use as ``InsertQDQPass(gradient_for=gradient_for)`` (``rtn-grad``)."""
    stats = ref.value.meta.get(meta.HESSIAN_KEY)
    return stats.grad if isinstance(stats, meta.HessianStats) else None


# --------------------------------------------------------------------------------------------------
# layers: weights grouped by value, activations grouped by (value, im2col settings)


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


# --------------------------------------------------------------------------------------------------
# content hashes and the disk cache


def _update_tensor(h: Any, tensor: ir.TensorProtocol) -> None:
    h.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    try:
        array = np.ascontiguousarray(tensor.numpy())
        h.update(array.reshape(-1).view(np.uint8).data)
    except Exception:  # noqa: BLE001 - a tensor numpy cannot view: hash its serialized bytes
        h.update(tensor.tobytes())


def _hash_attr(h: Any, attr: ir.Attr) -> None:
    h.update(f"@{attr.name}:{attr.type}".encode())
    if attr.type == ir.AttributeType.TENSOR:
        _update_tensor(h, attr.value)
    elif attr.type == ir.AttributeType.TENSORS:
        for t in attr.value:
            _update_tensor(h, t)
    elif attr.type == ir.AttributeType.GRAPH:
        _hash_graph(h, attr.value)
    elif attr.type == ir.AttributeType.GRAPHS:
        for g in attr.value:
            _hash_graph(h, g)
    else:
        h.update(repr(attr.value).encode())


def _hash_graph(h: Any, graph: ir.Graph) -> None:
    for kind, values in (("in", graph.inputs), ("out", graph.outputs)):
        for v in values:
            h.update(f"{kind}:{v.name}:{v.dtype}:{v.shape}".encode())
    for node in graph:
        names = [v.name if v is not None else "" for v in node.inputs]
        outs = [v.name for v in node.outputs]
        h.update(f"node:{node.domain}:{node.op_type}:{node.overload}:{names}:{outs}".encode())
        for attr in sorted(node.attributes.values(), key=lambda a: a.name):
            _hash_attr(h, attr)
    for name in sorted(graph.initializers):
        value = graph.initializers[name]
        h.update(f"init:{name}".encode())
        if value.const_value is not None:
            _update_tensor(h, value.const_value)


def model_digest(model: ir.Model) -> str:
    """sha256 of the model's content: graph structure, opsets and every weight's bytes.

    External weights are hashed through their memory map, tensor by tensor, without a copy.
    """
    h = hashlib.sha256(b"hessc-model-v1")
    h.update(repr(sorted(model.opset_imports.items())).encode())
    _hash_graph(h, model.graph)
    for fn in model.functions.values():
        h.update(f"function:{fn.domain}:{fn.name}:{fn.overload}".encode())
        _hash_graph(h, fn.graph)
    return h.hexdigest()


def calibration_digest(feeds: Sequence[Mapping[str, np.ndarray]], labels: Sequence[np.ndarray] | None = None) -> str:
    """sha256 of calibration feeds (names, dtypes, shapes, bytes) and labels."""
    h = hashlib.sha256(b"hessc-calibration-v1")
    for i, feed in enumerate(feeds):
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            h.update(f"{i}:{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(array.reshape(-1).view(np.uint8).data)
    for i, array in enumerate(labels or ()):
        array = np.ascontiguousarray(array)
        h.update(f"label{i}:{array.dtype.str}:{array.shape}".encode())
        h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _callable_id(fn: Callable) -> str:
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_consts).encode())
    return f"{name}:{h.hexdigest()[:16]}"


def _config_digest(config: HessianConfig) -> str:
    fields = {}
    for f in dataclasses.fields(config):
        if f.name in _NOT_KEYED or f.name == "labels":
            continue
        value = getattr(config, f.name)
        fields[f.name] = _callable_id(value) if callable(value) else repr(value)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _cache_root(config: HessianConfig) -> Path | None:
    if config.cache is False:
        return None
    if config.cache is None:
        return default_cache_dir()
    return Path(config.cache).expanduser()


_ARRAY_FIELDS = (
    "a", "a_eig_top", "a_weighted", "a_fit", "a_check", "g", "g_diag", "grad", "grad_fit", "grad_check", "lanczos_eigs",
)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _store(path: Path, key: str, stats: dict[str, meta.HessianStats]) -> None:
    """``path.npz`` (every array, shared ones once) and ``path.json`` (the index), atomically."""
    arrays: dict[str, np.ndarray] = {}
    shared: dict[int, str] = {}
    index: dict[str, Any] = {"version": _CACHE_VERSION, "key": key, "weights": {}}
    for i, (name, s) in enumerate(stats.items()):
        entry: dict[str, Any] = {"arrays": {}, "scalars": {}}
        for f in dataclasses.fields(s):
            value = getattr(s, f.name)
            if f.name in _ARRAY_FIELDS:
                if value is None:
                    continue
                array_key = shared.get(id(value))
                if array_key is None:
                    array_key = shared[id(value)] = f"{i}.{f.name}"
                    arrays[array_key] = np.asarray(value)
                entry["arrays"][f.name] = array_key
            else:
                entry["scalars"][f.name] = value
        index["weights"][name] = entry
    _atomic_write(path.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(index).encode()))


def _load(path: Path, key: str) -> dict[str, meta.HessianStats] | None:
    index_path = path.with_suffix(".json")
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        if index.get("version") != _CACHE_VERSION or index.get("key") != key:
            return None
        loaded: dict[str, np.ndarray] = {}
        out = {}
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as npz:
            for name, entry in index["weights"].items():
                fields = dict(entry["scalars"])
                for field, array_key in entry["arrays"].items():
                    if array_key not in loaded:
                        loaded[array_key] = npz[array_key]
                    fields[field] = loaded[array_key]
                out[name] = meta.HessianStats(**fields)
        return out
    except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
        logger.warning("hessian cache entry %s is unreadable (%s); recomputing", path, e)
        return None


# --------------------------------------------------------------------------------------------------
# forward statistics: A through ONNX Runtime


def _dim_env(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    env: dict[str, int] = {}
    for v in model.graph.inputs:
        if v.name in feed and v.shape is not None:
            for d, n in zip(v.shape, np.shape(feed[v.name])):
                if not isinstance(d, int) and getattr(d, "value", None):
                    env[str(d.value)] = int(n)
    return env


def _estimate_bytes(value: ir.Value, env: Mapping[str, int], fallback: int) -> int:
    """Bytes of one value for one feed, from its (symbolic) shape; ``fallback`` when unknown."""
    if value.shape is None:
        return fallback
    total = 1
    for d in value.shape:
        if isinstance(d, int):
            total *= d
        elif getattr(d, "value", None) in env:
            total *= env[d.value]
        else:
            return fallback
    itemsize = float(value.dtype.itemsize) if value.dtype is not None else 4.0
    return int(total * itemsize)


def _batches(feeds: Sequence[Mapping[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Feeds concatenated ``size`` at a time along axis 0 (only where their shapes agree)."""
    out: list[dict[str, np.ndarray]] = []
    i = 0
    while i < len(feeds):
        chunk = [feeds[i]]
        while len(chunk) < size and i + len(chunk) < len(feeds):
            nxt = feeds[i + len(chunk)]
            if set(nxt) != set(chunk[0]) or any(np.shape(nxt[k])[1:] != np.shape(chunk[0][k])[1:] for k in nxt):
                break
            chunk.append(nxt)
        out.append(chunk[0] if len(chunk) == 1 else {k: np.concatenate([c[k] for c in chunk]) for k in chunk[0]})
        i += len(chunk)
    return out


def _collect_forward(
    model: ir.Model,
    acts: Sequence[_Act],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: HessianConfig,
    progress: Progress | None,
) -> dict[_Act, tuple[torch.Tensor, int]]:
    """``(Σ x xᵀ, count)`` in float64 for every layer input, streamed batch by batch."""
    values: dict[str, ir.Value] = {}
    for node in model.graph:
        for v in node.outputs:
            values[v.name] = v
    for v in model.graph.inputs:
        values[v.name] = v
    inputs = {v.name for v in model.graph.inputs}
    names = list(dict.fromkeys(a.name for a in acts))
    env = _dim_env(model, feeds[0])
    fallback = 4 * max(int(np.size(a)) for a in feeds[0].values()) * max(a.features for a in acts)
    per_feed = {n: _estimate_bytes(values[n], env, fallback) if n in values else fallback for n in names}
    # Groups of values whose activations for one run stay under the budget (at least one each).
    groups: list[list[str]] = [[]]
    budget = config.max_activation_bytes / config.batch_size
    used = 0
    for n in names:
        if n in inputs:
            continue
        if groups[-1] and used + per_feed[n] > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += per_feed[n]
    groups = [g for g in groups if g]
    by_name: dict[str, list[_Act]] = {}
    for a in acts:
        by_name.setdefault(a.name, []).append(a)
    sums: dict[_Act, torch.Tensor] = {}
    counts = {a: 0 for a in acts}
    batches = _batches(feeds, config.batch_size)
    from_inputs = [n for n in names if n in inputs]
    if from_inputs:
        groups.append(from_inputs)  # graph inputs need no session
    source = sessions.ValueTaps(model, config.threads) if any(n not in inputs for g in groups for n in g) else None
    total = len(groups) * len(batches)
    done = 0
    logger.debug("covariance: %d layer inputs in %d group(s), %d run(s)", len(names), len(groups), len(batches))

    def accumulate(name: str, array: np.ndarray) -> None:
        x = torch.from_numpy(np.asarray(array))
        for a in by_name[name]:
            rows = _rows(x, a).reshape(-1, a.features).to(torch.float64)
            if a in sums:
                sums[a].addmm_(rows.T, rows)
            else:
                sums[a] = rows.T @ rows
            counts[a] += rows.shape[0]

    try:
        for group in groups:
            session = None if group[0] in inputs else source.session(group)
            for batch in batches:
                if session is None:
                    outs = [batch[n] for n in group]
                else:
                    outs = session.run(group, {k: v for k, v in batch.items()})
                for name, array in zip(group, outs):
                    accumulate(name, array)
                done += 1
                if progress:
                    progress("covariance", done, total)
            del session
    finally:
        if source is not None:
            source.close()
    return {a: (sums.get(a, torch.zeros(a.features, a.features, dtype=torch.float64)), counts[a]) for a in acts}


# --------------------------------------------------------------------------------------------------
# losses


def resolve_loss(config: HessianConfig, model: ir.Model) -> str:
    """The loss ``config.loss`` stands for on this model (see :class:`HessianConfig`)."""
    if callable(config.loss):
        return "custom"
    if config.loss != "auto":
        return config.loss
    if config.labels is not None:
        return "ce"
    if not model.graph.outputs:
        raise InputError("the model has no outputs to define a loss on")
    out = model.graph.outputs[0]
    if "logit" in (out.name or "").lower():
        rank = len(out.shape) if out.shape is not None else None
        if rank in (3, None) and ids_input(model) is not None:
            return "next-token"
        return "kl"
    return "mse"


def ids_input(model: ir.Model) -> str | None:
    for v in model.graph.inputs:
        if "input_ids" in (v.name or "") and v.dtype in (ir.DataType.INT64, ir.DataType.INT32):
            return v.name
    return None


@dataclasses.dataclass
class _Loss:
    """A resolved loss: ``value`` is the mean loss of one feed and its number of loss terms;
    ``fisher`` the loss whose output gradients estimate the Fisher / Gauss-Newton matrix."""

    name: str
    model: ir.Model
    config: HessianConfig

    def __post_init__(self) -> None:
        self.ids = ids_input(self.model)
        if self.name == "next-token" and self.ids is None:
            raise InputError("loss='next-token' needs an integer graph input named like 'input_ids'")

    @property
    def empirical(self) -> bool:
        return self.name not in ("kl", "mse")

    def value(
        self, outputs: Mapping[str, torch.Tensor], feed: Mapping[str, np.ndarray],
        reference: torch.Tensor | None, index: int,
    ) -> tuple[torch.Tensor, int]:
        first = next(iter(outputs.values()))
        rows = max(first.numel() // max(first.shape[-1], 1), 1) if first.ndim else 1
        if self.name == "custom":
            return self.config.loss(outputs, feed), rows
        if self.name == "next-token":
            ids = torch.as_tensor(np.asarray(feed[self.ids]), dtype=torch.long)
            if first.ndim != 3 or tuple(first.shape[:2]) != tuple(ids.shape):
                raise InputError(
                    f"loss='next-token' needs logits [batch, seq, vocab] matching input_ids {tuple(ids.shape)}, "
                    f"got {tuple(first.shape)}"
                )
            logits = first[:, :-1].reshape(-1, first.shape[-1])
            target = ids[:, 1:].reshape(-1)
            return F.cross_entropy(logits, target), max(int(target.numel()), 1)
        if self.name == "ce":
            labels = self.config.labels
            if labels is None or index >= len(labels):
                raise InputError(f"loss='ce' needs a label array for calibration feed {index}")
            y = torch.as_tensor(labels[index], dtype=torch.long)
            if tuple(y.shape) != tuple(first.shape[:-1]):
                raise InputError(f"labels[{index}] has shape {tuple(y.shape)}, expected {tuple(first.shape[:-1])}")
            return F.cross_entropy(first.reshape(-1, first.shape[-1]), y.reshape(-1)), rows
        assert reference is not None
        if self.name == "kl":
            logp = torch.log_softmax(first, dim=-1)
            logp0 = torch.log_softmax(reference, dim=-1)
            return (logp0.exp() * (logp0 - logp)).sum(-1).mean(), rows
        return 0.5 * ((first - reference) ** 2).sum(-1).mean(), rows  # mse

    def fisher(
        self, outputs: Mapping[str, torch.Tensor], rows: int, gen: torch.Generator
    ) -> torch.Tensor:
        """A loss whose output gradients ``u`` have ``B·E[u uᵀ]`` = the Fisher/GN (kl, mse)."""
        first = next(iter(outputs.values()))
        if self.name == "kl":
            logits = first.reshape(-1, first.shape[-1])
            probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
            y = torch.multinomial(probs, 1, generator=gen).reshape(-1)
            return F.cross_entropy(logits, y)
        eps = torch.randn(first.shape, generator=gen, dtype=torch.float64).to(first.dtype)
        return (eps * first).sum() / rows


def _torch_dtype(config: HessianConfig) -> torch.dtype:
    return torch.float64 if config.precision == "float64" else torch.float32


# --------------------------------------------------------------------------------------------------
# backward statistics: gradient, G, diagonal Fisher through the torch executor


@dataclasses.dataclass
class _Backward:
    weight: float = 0.0
    rows: int = 0
    grad: torch.Tensor | None = None
    g: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    a_weighted: torch.Tensor | None = None
    row_weight: float = 0.0
    halves: list = dataclasses.field(default_factory=lambda: [None, None])  # gradient sums, even/odd feeds
    half_weight: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])


def _collect_backward(
    model: ir.Model,
    targets: Sequence[_Target],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: HessianConfig,
    loss: _Loss,
    progress: Progress | None,
) -> dict[str, _Backward]:
    """Per target: gradient, G (or its diagonal) and the diagonal Fisher, averaged over feeds."""
    ex = TorchExecutor(model, dtype=_torch_dtype(config))
    out_names = ex.output_names
    gen = torch.Generator().manual_seed(config.seed)
    wanted = list(out_names)
    for t in targets:
        for ref in t.refs:
            wanted += [ref.node.outputs[0].name, ref.activation.name]
    wanted = list(dict.fromkeys(wanted))
    acc = {t.key: _Backward() for t in targets}
    need_grad = config.gradient and loss.empirical
    need_fisher_side = config.kfac or config.fisher_diag or config.weighted_covariance
    if config.gradient and not loss.empirical:
        logger.info("the gradient of loss=%s is zero at the fp32 point; grad is recorded as zero", loss.name)
    for i, feed in enumerate(feeds):
        overrides = {t.key: ex.weights[t.key].detach().requires_grad_() for t in targets}
        with torch.enable_grad():
            res = ex.run(feed, outputs=wanted, overrides=overrides)
            outputs = {n: res[n] for n in out_names}
            first = outputs[out_names[0]]
            reference = None if loss.empirical else first.detach()
            value, terms = loss.value(outputs, feed, reference, i)
            ys = []
            for t in targets:
                ys += [res[ref.node.outputs[0].name] for ref in t.refs]
            u_true = u_fisher = None
            if need_grad or (need_fisher_side and loss.empirical):
                u_true = torch.autograd.grad(value, ys, allow_unused=True, retain_graph=not loss.empirical)
                u_fisher = u_true
            if need_fisher_side and not loss.empirical:
                rows = max(first.numel() // max(first.shape[-1], 1), 1)
                u_fisher = torch.autograd.grad(loss.fisher(outputs, rows, gen), ys, allow_unused=True)
        k = 0
        for t in targets:
            out_dim = t.refs[0].matrix_shape[0]
            st = acc[t.key]
            grad_f = g_f = fisher_f = None
            for ref, act in zip(t.refs, _acts_of(t)):
                x = _rows(res[ref.activation.name].detach(), act).to(torch.float64)  # (rows, groups, in)
                rows, groups = x.shape[0], x.shape[1]
                if need_grad:
                    u = _output_rows(_or_zeros(u_true[k], ys[k]), act).to(torch.float64)
                    part = torch.einsum("ngo,ngf->gof", u.view(rows, groups, -1), x).reshape(out_dim, -1)
                    grad_f = part if grad_f is None else grad_f + part
                if need_fisher_side:
                    u = _output_rows(_or_zeros(u_fisher[k], ys[k]), act).to(torch.float64)
                    if config.kfac:
                        part = (u * u).sum(0) if out_dim > config.kfac_diag_above else u.T @ u
                        g_f = part if g_f is None else g_f + part
                    if config.fisher_diag:
                        uu = (u * u).view(rows, groups, -1)
                        part = torch.einsum("ngo,ngf->gof", uu, x * x).mean()
                        fisher_f = part if fisher_f is None else fisher_f + part
                    if config.weighted_covariance:
                        r = (u * u).view(rows, groups, -1).sum(-1)
                        flat = x.reshape(-1, x.shape[-1])
                        part = flat.T @ (flat * r.reshape(-1, 1))
                        st.a_weighted = part if st.a_weighted is None else st.a_weighted + part
                        st.row_weight += float(r.sum())
                st.rows += rows
                k += 1
            w = float(terms)
            # Per feed: ∇L_f = Σ u xᵀ, G_f = B_f Σ u uᵀ, F_f = B_f Σ u² x²ᵀ; averaged with weights B_f.
            for field, part, scale in (("grad", grad_f, 1.0), ("g", g_f, w), ("fisher", fisher_f, w)):
                if part is None:
                    continue
                cur = getattr(st, field)
                setattr(st, field, w * scale * part if cur is None else cur + w * scale * part)
            if config.split_gradient and grad_f is not None:
                half = st.halves[i % 2]
                st.halves[i % 2] = w * grad_f if half is None else half + w * grad_f
                st.half_weight[i % 2] += w
            st.weight += w
        del res, ys, u_true, u_fisher
        if progress:
            progress("backward", i + 1, len(feeds))
    for st in acc.values():
        for field in ("grad", "g", "fisher"):
            cur = getattr(st, field)
            if cur is not None:
                setattr(st, field, cur / st.weight)
        st.halves = [h / wt if h is not None and wt > 0 else None for h, wt in zip(st.halves, st.half_weight)]
        if st.a_weighted is not None and st.row_weight > 0:
            st.a_weighted = (st.a_weighted + st.a_weighted.T) / (2 * st.row_weight)
        else:
            st.a_weighted = None
    return acc


def _or_zeros(u: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if u is None else u


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


# --------------------------------------------------------------------------------------------------
# Hessian-vector products of one layer block


def make_layer_hvp(
    model: ir.Model | TorchExecutor,
    weight: str | qweights.WeightRef,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: HessianConfig = HessianConfig(),
) -> curvature.HessianVectorProduct:
    """``v ↦ (∇²_W L) v`` for one weight (flat, in the stored layout), on a fixed batch of feeds.

    Args:
        model: the model, or a :class:`TorchExecutor` of it (reused, e.g. across layers).
        weight: the weight's initializer name or its :class:`WeightRef`.
        feeds: the fixed batch; ``L`` is the token-weighted mean of the per-feed losses.
        config: the loss (``loss``, ``labels``) and the precision (when a model is given).

    Returns:
        A :class:`hessc.passes.curvature.HessianVectorProduct` (``.n``, ``.gradient``).
    """
    ex = model if isinstance(model, TorchExecutor) else TorchExecutor(model, dtype=_torch_dtype(config))
    name = weight.value.name if isinstance(weight, qweights.WeightRef) else weight
    if name not in ex.weights:
        raise InputError(f"{name!r} is not an initializer of the model")
    loss = _Loss(resolve_loss(config, ex.model), ex.model, config)
    references: list[torch.Tensor | None] = []
    for feed in feeds:
        if loss.empirical:
            references.append(None)
        else:
            with torch.no_grad():
                references.append(ex.run(feed)[ex.output_names[0]].detach())
    w = ex.weights[name].detach().clone().requires_grad_()

    def total() -> torch.Tensor:
        parts, weights = [], []
        for i, (feed, ref) in enumerate(zip(feeds, references)):
            res = ex.run(feed, overrides={name: w})
            value, terms = loss.value({n: res[n] for n in ex.output_names}, feed, ref, i)
            parts.append(value * terms)
            weights.append(terms)
        return torch.stack(parts).sum() / sum(weights)

    return curvature.make_hvp(total, [w])


def _collect_hvp(
    model: ir.Model,
    targets: Sequence[_Target],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: HessianConfig,
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    ex = TorchExecutor(model, dtype=_torch_dtype(config))
    chosen = [t for t in targets if not config.hvp_layers or any(fnmatch.fnmatchcase(t.name, p) for p in config.hvp_layers)]
    out: dict[str, dict[str, Any]] = {}
    for j, t in enumerate(chosen):
        start = time.perf_counter()
        hvp = make_layer_hvp(ex, t.key, feeds, config)
        res: dict[str, Any] = {}
        if config.lambda_max:
            values, _ = curvature.power_iteration(hvp, hvp.n, iters=config.hvp_iters, tol=config.hvp_tol, seed=config.seed)
            res["lambda_max"] = float(values[0])
        if config.lanczos_k:
            k = min(config.lanczos_k, hvp.n)
            values, _ = curvature.lanczos(hvp, hvp.n, k, m=config.lanczos_steps or None, seed=config.seed)
            res["lanczos_eigs"] = values.detach().to(torch.float64).numpy()
        if config.hutchinson_probes:
            res["hutchinson_trace"] = curvature.hutchinson_trace(hvp, hvp.n, probes=config.hutchinson_probes, seed=config.seed)
        out[t.key] = res
        del hvp
        logger.debug("hvp statistics of %s: %.2f s", t.name, time.perf_counter() - start)
        if progress:
            progress("hvp", j + 1, len(chosen))
    return out


# --------------------------------------------------------------------------------------------------
# the pass


class AnnotateHessianPass(ir.passes.InPlacePass):
    """Annotates every MatMul/Gemm/Conv weight with :class:`hessc.ir.meta.HessianStats`.

    An analysis pass: the graph is never changed (``modified=False``). Each weight value gets
    ``value.meta[HESSIAN_KEY]``; ``model.meta[CURVATURE_KEY]`` maps each weight's user-facing name
    to the JSON-able summary for the plan record. Embedding tables (``Gather``) and weights inside
    subgraphs get no statistics.

    Args:
        config: what to compute.
        feeds: calibration feeds (a list of ``{input name: array}``, or anything
            :func:`hessc.runtime.calibration.feeds_from` accepts).
        progress: called as ``progress(stage, done, total)`` with stage ``covariance``,
            ``backward`` or ``hvp``.
    """

    def __init__(self, config: HessianConfig = HessianConfig(), feeds: Any = None,
                 progress: Progress | None = None) -> None:
        super().__init__()
        self.config = config
        self.feeds = feeds
        self.progress = progress

    def requires(self, model: ir.Model) -> None:
        if self.feeds is None:
            raise ir.passes.PreconditionError(
                "AnnotateHessianPass needs calibration feeds: pass feeds=[{input name: array}, ...]"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from hessc.runtime import calibration

        config = self.config
        n_feeds = max(config.max_samples if config.covariance else 0,
                      config.max_grad_samples if config.backward else 0,
                      config.hvp_samples if config.hvp else 0, 1)
        feeds = calibration.feeds_from(self.feeds, model, limit=n_feeds)
        targets = _targets(model)
        stats = self._cached_or_computed(model, targets, feeds)
        summaries = {}
        for t in targets:
            s = stats.get(t.key)
            if s is None:
                continue
            t.value.meta[meta.HESSIAN_KEY] = s
            summaries[t.name] = s.summary()
        model.meta[meta.CURVATURE_KEY] = summaries
        return ir.passes.PassResult(model, modified=False)

    def _cached_or_computed(self, model, targets, feeds) -> dict[str, meta.HessianStats]:
        config = self.config
        root = _cache_root(config)
        path = key = None
        if root is not None:
            start = time.perf_counter()
            m_digest = model_digest(model)
            c_digest = calibration_digest(feeds, config.labels)
            key = hashlib.sha256(f"{m_digest}:{c_digest}:{_config_digest(config)}:{_CACHE_VERSION}".encode()).hexdigest()
            path = root / m_digest[:24] / key[:32]
            logger.debug("hessian cache key %s (hashing %.2f s)", key[:16], time.perf_counter() - start)
            loaded = _load(path, key)
            if loaded is not None and set(loaded) == {t.key for t in targets}:
                logger.info("hessian statistics of %d weights loaded from cache %s", len(loaded), path.parent)
                return loaded
        stats = self._compute(model, targets, feeds)
        if path is not None:
            try:
                _store(path, key, stats)
            except OSError as e:
                logger.warning("could not write the hessian cache %s (%s)", path, e)
        return stats

    def _compute(self, model, targets, feeds) -> dict[str, meta.HessianStats]:
        config = self.config
        fields: dict[str, dict[str, Any]] = {t.key: {} for t in targets}
        if not targets:
            return {}
        if config.covariance:
            start = time.perf_counter()
            acts = list(dict.fromkeys(a for t in targets for a in t.acts))
            used = feeds[: config.max_samples]
            halves = None
            if config.split_covariance and len(used) >= 2:
                halves = [_collect_forward(model, acts, part, config, self.progress) for part in (used[0::2], used[1::2])]
                sums = {a: (halves[0][a][0] + halves[1][a][0], halves[0][a][1] + halves[1][a][1]) for a in acts}
            else:
                sums = _collect_forward(model, acts, used, config, self.progress)
            eig_cache: dict[tuple, tuple] = {}
            for t in targets:
                key = tuple(t.acts)
                if key not in eig_cache:
                    a, count = _mean_covariance(sums, t.acts)
                    if a is None:
                        continue
                    split = tuple(_mean_covariance(h, t.acts)[0] for h in halves) if halves else (None, None)
                    eig_cache[key] = (a, _top_eigs(a, config.top_eigs), float(np.trace(a)), count, split)
                a, eigs, trace, count, (a_fit, a_check) = eig_cache[key]
                fields[t.key].update(a=a, a_eig_top=eigs, a_trace=trace, samples=count)
                if a_fit is not None and a_check is not None:
                    fields[t.key].update(a_fit=a_fit, a_check=a_check)
            logger.info("hessian: covariance of %d layer inputs over %d feeds in %.1f s",
                        len(eig_cache), min(len(feeds), config.max_samples), time.perf_counter() - start)
        if config.backward:
            start = time.perf_counter()
            loss = _Loss(resolve_loss(config, model), model, config)
            acc = _collect_backward(model, targets, feeds[: config.max_grad_samples], config, loss, self.progress)
            for t in targets:
                st = acc[t.key]
                f = fields[t.key]
                f.update(loss_name=loss.name, grad_samples=st.rows)
                if config.gradient:
                    f["grad"] = (st.grad.numpy() if st.grad is not None
                                 else np.zeros(t.refs[0].matrix_shape, dtype=np.float64))
                if config.split_gradient and all(h is not None for h in st.halves):
                    f["grad_fit"], f["grad_check"] = (h.numpy() for h in st.halves)
                if config.kfac and st.g is not None:
                    f["g_diag" if st.g.ndim == 1 else "g"] = st.g.numpy()
                if config.fisher_diag and st.fisher is not None:
                    f["fisher_diag_mean"] = float(st.fisher)
                if config.weighted_covariance and st.a_weighted is not None:
                    f["a_weighted"] = st.a_weighted.numpy()
            logger.info("hessian: backward statistics (loss %s) over %d feeds in %.1f s",
                        loss.name, min(len(feeds), config.max_grad_samples), time.perf_counter() - start)
        if config.hvp:
            start = time.perf_counter()
            res = _collect_hvp(model, targets, feeds[: config.hvp_samples], config, self.progress)
            for key, values in res.items():
                fields[key].update(values)
                fields[key].setdefault("loss_name", resolve_loss(config, model))
            logger.info("hessian: HVP statistics of %d layers in %.1f s", len(res), time.perf_counter() - start)
        return {k: meta.HessianStats(**v) for k, v in fields.items()}


def _mean_covariance(sums: Mapping, acts: Sequence[_Act]) -> tuple[np.ndarray | None, int]:
    """``E[x xᵀ]`` over the rows of the inputs ``acts`` (summed as one layer's), symmetrised."""
    count = sum(sums[a][1] for a in acts)
    if count == 0:
        return None, 0
    total = sums[acts[0]][0].clone()
    for extra in acts[1:]:
        total += sums[extra][0]
    mean = total / count
    return ((mean + mean.T) / 2).numpy(), count


def _top_eigs(a: np.ndarray, k: int) -> np.ndarray:
    n = a.shape[0]
    k = min(k, n)
    if k == 0:
        return np.zeros(0)
    # LAPACK's threaded symmetric tridiagonalisation is 10-20× slower than one thread on small
    # (≤ 4096) matrices here (thread ping-pong in the level-2 reductions), so run it on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values = torch.linalg.eigvalsh(torch.from_numpy(a))
    finally:
        torch.set_num_threads(threads)
    return np.ascontiguousarray(values.numpy()[::-1][:k])
