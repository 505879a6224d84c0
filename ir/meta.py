"""Typed annotations stored on IR values and nodes.

Every annotation is a frozen dataclass under a namespaced key defined once here. Values that must
survive saving go to ``model.metadata_props`` as JSON (``PLAN_KEY``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
"""Weight code widths hessc plans (3-bit codes live in a 4-bit container in the portable form)."""

QUANT_KEY = "hessc.quant"
"""``node.meta`` key of a weight ``DequantizeLinear``: the :class:`QuantPlan` it materializes."""

HESSIAN_KEY = "hessc.hessian"
"""``value.meta`` key of a weight initializer: its curvature statistics."""

TIED_KEY = "hessc.tied_to"
"""``value.meta`` key: the embedding table a transposed weight copy was folded from (tied weights)."""

UNTIED_FROM_KEY = "hessc.untied_from"
"""``value.meta`` key: the embedding table an output head was tied to before a rewrite untied it
(``fold-rotation`` when the final norm's scale is folded into the head): still "the tied head"
for ``quantize_embeddings``, but stored and quantized on its own."""

WEIGHT_NAME_KEY = "hessc.weight_name"
"""``value.meta`` key: the user-facing name of a weight (the original parameter name)."""

SOURCE_BYTES_KEY = "hessc.source_bytes"
"""``value.meta`` key: the bytes the source model stores for a weight the front door re-typed (a
float16 weight cast to float32 where it is read), counted as the model's size before compression."""

TIMINGS_KEY = "hessc.timings"
"""``model.meta`` key: wall-clock seconds per pass of the last ``optimize`` (not saved)."""

LATENCY_KEY = "hessc.latency"
"""``model.meta`` key: float vs optimized latency measured by ``optimize`` (not saved)."""

PLAN_KEY = "hessc.plan"
"""``model.metadata_props`` key: the JSON record of every compression decision."""

CURVATURE_KEY = "hessc.curvature"
"""``model.meta`` key: ``{weight name: HessianStats.summary()}``, the JSON-able curvature record
that goes into the plan under each weight's ``curvature``."""

PREPLAN_KEY = "hessc.preplan"
"""``model.meta`` key: ``Model.clone()`` of the model as it stood before ``plan-quantization``,
kept for ``confirm-lossless`` (which re-runs plan → materialize on clones of it)."""

MATERIALIZED_KEY = "hessc.materialized"
"""``model.meta`` key: ``{weight name: QuantPlan}`` of the weights ``insert-qdq`` quantized."""

WEIGHT_ERRORS_KEY = "hessc.weight_errors"
"""``model.meta`` key: ``{weight name: ‖W − dequantized‖ / ‖W‖}`` of each weight ``insert-qdq``
quantized, measured against the float weight as it was read (verification's weight-by-weight check)."""

SKIPPED_KEY = "hessc.skipped"
"""``model.meta`` key: ``{weight name: reason}`` of the weights that stay in float."""

CALIBRATION_KEY = "hessc.calibration"
"""``model.meta`` key: the :class:`Calibration` data the analysis passes read."""

CUSTOM_OPS_KEY = "hessc.custom_op_libraries"
"""``model.meta`` key: the paths (a tuple of str) of the shared libraries that register the model's
custom ops with ONNX Runtime; every session hessc opens on the model loads them (not saved)."""

DECODER_CONFIG_KEY = "hessc.decoder_config"
"""In ``model.meta``: what a runtime needs to know of a decoder exported with its KV cache (the
transformers config's type, sizes and token ids, and the folder it was loaded from), for
writing an onnxruntime-genai folder (:mod:`hessc.genai`)."""

STALE_KEY = "hessc.stale"
"""``value.meta`` key: ``{annotation key: reason}`` of annotations a rewrite invalidated
(:func:`invalidate`); a pass that reads one of them refuses until it is recomputed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """Calibration data, attached to the model under :data:`CALIBRATION_KEY` for the passes.

    Attributes:
        feeds: the feeds statistics are computed from (``{input name: array}``, checked against
            the graph's inputs).
        heldout: feeds the statistics never see, for checks on held-out data (``lossless``).
        labels: one integer label array per feed (a cross-entropy loss), or None.
        heldout_labels: the labels of ``heldout``, or None.
        loss: a task loss ``loss(outputs, feed) -> torch scalar`` overriding the labels, or None.
    """

    feeds: tuple[dict[str, np.ndarray], ...]
    heldout: tuple[dict[str, np.ndarray], ...] = ()
    labels: tuple[np.ndarray, ...] | None = None
    heldout_labels: tuple[np.ndarray, ...] | None = None
    loss: Any = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.feeds):
            raise ValueError(f"Calibration: {len(self.labels)} label arrays for {len(self.feeds)} feeds")
        if self.heldout_labels is not None and len(self.heldout_labels) != len(self.heldout):
            raise ValueError(f"Calibration: {len(self.heldout_labels)} held-out labels for {len(self.heldout)} feeds")


def invalidate(value: Any, key: str, reason: str) -> bool:
    """Drops the annotation ``key`` of an IR value and records why (a rewrite changed what it
    describes and cannot transform it); True if there was one to drop."""
    had = value.meta.get(key) is not None
    value.meta.pop(key, None)
    stale = dict(value.meta.get(STALE_KEY) or {})
    stale[key] = reason
    value.meta[STALE_KEY] = stale
    return had


def stale_reason(value: Any, key: str) -> str | None:
    """Why the annotation ``key`` of a value was invalidated, or None when it was not."""
    return (value.meta.get(STALE_KEY) or {}).get(key)


def set_annotation(value: Any, key: str, annotation: Any) -> None:
    """Stores a fresh annotation (clearing any record that an older one went stale)."""
    value.meta[key] = annotation
    stale = dict(value.meta.get(STALE_KEY) or {})
    if stale.pop(key, None) is not None:
        if stale:
            value.meta[STALE_KEY] = stale
        else:
            value.meta.pop(STALE_KEY, None)


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """How one weight is quantized.

    Attributes:
        name: user-facing weight name.
        op: the consuming op (``MatMul``, ``Gemm``, ``Conv``, ``Gather``).
        shape: the stored weight shape.
        bits: bits per code (2, 3, 4 or 8).
        group_size: codes per scale along the input dimension; 0 means per output channel.
        symmetric: no zero point when true.
        method: the quantizer that chose the codes (``rtn``, ``gptq``).
        matrix_shape: (out, in) of the normalised weight view; groups run along ``in``.
        narrow: the code limit ``n`` of the static int8 kernels' grid: symmetric codes in
            ``[−n, n]`` with positive scales, instead of MatMulNBits' signed-extreme convention
            (127; 63 where x86 CPUs without VNNI would saturate, see
            :func:`hessc.runtime.targets.saturating_int8_products`). 0: not narrow.
    """

    name: str
    op: str
    shape: tuple[int, ...]
    bits: int
    group_size: int
    symmetric: bool
    method: str = "rtn"
    matrix_shape: tuple[int, int] = (0, 0)
    narrow: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d.pop("matrix_shape")
        if not self.narrow:
            d.pop("narrow")
        return d


RANK_KEY = "hessc.rank"
"""``value.meta`` key of a weight initializer: the :class:`RankPlan` the allocator chose for it
(``split-low-rank`` materializes it)."""

RANK_FORMS = ("split", "compensate")


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """A low-rank form of one MatMul/Gemm weight ``W`` (out × in), ALGORITHMS.md §3(c)–(d).

    ``split``: ``W ≈ L R`` with ``L`` (out × rank) and ``R`` (rank × in) from the activation-
    whitened SVD; the layer becomes ``MatMul(MatMul(x, Rᵀ), Lᵀ)`` and ``W`` is no longer stored.
    ``compensate``: ``W ≈ Q(W) + L R``, the factors fitted to the whitened residual of the weight's
    own quantization (its :class:`QuantPlan`), added to the quantized layer's output.

    Attributes:
        name: user-facing weight name.
        form: ``split`` or ``compensate``.
        rank: the inner dimension of the factors.
        factor_bits: bits of the factors' codes (2, 3, 4 or 8), or 32 for float factors.
        group_size: codes per scale of the factors (along their input dimension).
        symmetric: the factors' codes have no zero points.
    """

    name: str
    form: str
    rank: int
    factor_bits: int
    group_size: int = 32
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.form not in RANK_FORMS:
            raise ValueError(f"{self.name}: low-rank form {self.form!r} is not one of {', '.join(RANK_FORMS)}")
        if self.rank < 1:
            raise ValueError(f"{self.name}: a low-rank form needs rank >= 1, got {self.rank}")
        if self.factor_bits not in (*SUPPORTED_BITS, 32):
            raise ValueError(f"{self.name}: factor bits must be 2, 3, 4, 8 or 32 (float), got {self.factor_bits}")

    @property
    def float_factors(self) -> bool:
        return self.factor_bits >= 16

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_plan(model) -> dict[str, Any] | None:
    """The ``hessc.plan`` record of a model, or None when it has none."""
    raw = model.metadata_props.get(PLAN_KEY)
    return json.loads(raw) if raw else None


def write_plan(model, plan: dict[str, Any]) -> None:
    model.metadata_props[PLAN_KEY] = json.dumps(plan, sort_keys=True)


def _matrix(value: Any, what: str, square: bool = False) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim != 2 or (square and array.shape[0] != array.shape[1]):
        kind = "a square matrix" if square else "a matrix"
        raise ValueError(f"HessianStats.{what} must be {kind}, got shape {array.shape}")
    return array


def _vector(value: Any, what: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"HessianStats.{what} must be a vector, got shape {array.shape}")
    return array


def _top_eigenvalue(m: np.ndarray, iters: int = 200, tol: float = 1e-6) -> float:
    """The largest eigenvalue of a PSD matrix by power iteration (threaded LAPACK is slow here)."""
    v = np.random.default_rng(0).standard_normal(m.shape[0])
    value = 0.0
    for _ in range(iters):
        w = m @ v
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        new = float(v @ w) / float(v @ v)
        v = w / norm
        if abs(new - value) <= tol * abs(new):
            return new
        value = new
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class HessianStats:
    """Curvature statistics of one weight ``W`` (out × in), stored under :data:`HESSIAN_KEY`.

    Every field is optional except the sample counts: only what was asked for is computed.

    Attributes:
        samples: rows (tokens, pixels, samples) behind ``a``; 0 when ``a`` was not computed.
        a: input factor ``A = E[x xᵀ]`` (in × in, float64); layers that read the same input share
            one array (treat it as read-only).
        a_eig_top: the largest eigenvalues of ``a``, descending.
        a_trace: ``tr(A) = E[‖x‖²]``.
        a_weighted: ``Σ ‖u‖² x xᵀ / Σ ‖u‖²`` (in × in, float64), the input second moment with each
            row weighted by its squared output gradient ``u`` (see
            ``HessianConfig.weighted_covariance``).
        a_fit: ``A`` of the even calibration feeds, and ``a_check`` of the odd ones
            (``HessianConfig.split_covariance``): fit a quantizer on one, score it on the other.
        g: output factor ``G`` (out × out, float64) with ``H ≈ A ⊗ G`` (K-FAC).
        g_diag: ``diag(G)`` only (layers wider than ``HessianConfig.kfac_diag_above``).
        grad: mean gradient ``∇_W L = E[g xᵀ]`` (out × in, float64).
        grad_fit: the mean gradient of the even calibration feeds, and ``grad_check`` of the odd
            ones (``HessianConfig.split_gradient``): direct rounding by one, score it on the other.
        fisher_diag_mean: the mean of the diagonal Fisher ``E[(g xᵀ)²]`` over the weight.
        lambda_max: the top eigenvalue (largest magnitude) of the layer's Hessian block.
        lanczos_eigs: the top eigenvalues of the layer's Hessian block, descending (Lanczos).
        hutchinson_trace: Hutchinson's estimate of the trace of the layer's Hessian block.
        loss_name: the loss behind the backward statistics (``next-token``, ``ce``, ``kl``,
            ``mse``, ``custom``), None when only forward statistics were computed.
        grad_samples: rows behind the backward statistics (0 when none were computed).
    """

    samples: int = 0
    a: np.ndarray | None = None
    a_eig_top: np.ndarray | None = None
    a_trace: float | None = None
    a_weighted: np.ndarray | None = None
    a_fit: np.ndarray | None = None
    a_check: np.ndarray | None = None
    g: np.ndarray | None = None
    g_diag: np.ndarray | None = None
    grad: np.ndarray | None = None
    grad_fit: np.ndarray | None = None
    grad_check: np.ndarray | None = None
    fisher_diag_mean: float | None = None
    lambda_max: float | None = None
    lanczos_eigs: np.ndarray | None = None
    hutchinson_trace: float | None = None
    loss_name: str | None = None
    grad_samples: int = 0

    def __post_init__(self) -> None:
        if self.samples < 0 or self.grad_samples < 0:
            raise ValueError("HessianStats sample counts must be >= 0")
        a = _matrix(self.a, "a", square=True)
        for name in ("a_weighted", "a_fit", "a_check"):
            other = _matrix(getattr(self, name), name, square=True)
            if a is not None and other is not None and a.shape != other.shape:
                raise ValueError(f"HessianStats: {name} {other.shape} does not match A {a.shape}")
        g = _matrix(self.g, "g", square=True)
        grad = _matrix(self.grad, "grad")
        for name in ("grad_fit", "grad_check"):
            half = _matrix(getattr(self, name), name)
            if grad is not None and half is not None and half.shape != grad.shape:
                raise ValueError(f"HessianStats: {name} {half.shape} does not match grad {grad.shape}")
        g_diag = _vector(self.g_diag, "g_diag")
        _vector(self.a_eig_top, "a_eig_top")
        _vector(self.lanczos_eigs, "lanczos_eigs")
        if a is not None and self.samples == 0:
            raise ValueError("HessianStats.a is set but samples is 0")
        if g is not None and g_diag is not None:
            raise ValueError("HessianStats holds either g or g_diag, not both")
        out = g.shape[0] if g is not None else g_diag.shape[0] if g_diag is not None else None
        if grad is not None:
            if out is not None and grad.shape[0] != out:
                raise ValueError(f"HessianStats: grad {grad.shape} does not match G of size {out}")
            if a is not None and grad.shape[1] != a.shape[0]:
                raise ValueError(f"HessianStats: grad {grad.shape} does not match A {a.shape}")
        for name in ("a", "a_weighted", "a_fit", "a_check", "g", "g_diag", "grad", "grad_fit", "grad_check"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                raise ValueError(f"HessianStats.{name} has NaN or infinite entries")

    def rotated(self, q: np.ndarray) -> "HessianStats":
        """The statistics of ``W Q`` for an orthogonal (in × in) ``Q`` fed ``Qᵀ x``: exactly the
        same layer, its input space rotated.

        ``A = E[x xᵀ]`` becomes ``Qᵀ A Q`` (the weighted and half covariances alike), the gradient
        ``E[g xᵀ]`` becomes ``∇W · Q``; ``G``, the eigenvalues, traces and the Hessian block's
        spectrum are invariant under the similarity transform.
        """
        q = np.asarray(q, dtype=np.float64)
        n = next((getattr(self, f).shape[-1] for f in ("a", "grad", "a_weighted") if getattr(self, f) is not None), None)
        if q.ndim != 2 or q.shape[0] != q.shape[1] or (n is not None and q.shape[0] != n):
            raise ValueError(f"HessianStats.rotated: Q must be ({n}, {n}), got {q.shape}")
        if not np.allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-8):
            raise ValueError("HessianStats.rotated: Q is not orthogonal")

        def cov(m: np.ndarray | None) -> np.ndarray | None:
            if m is None:
                return None
            r = q.T @ m @ q
            return (r + r.T) / 2

        def grad(m: np.ndarray | None) -> np.ndarray | None:
            return None if m is None else m @ q

        return dataclasses.replace(
            self, a=cov(self.a), a_weighted=cov(self.a_weighted), a_fit=cov(self.a_fit), a_check=cov(self.a_check),
            grad=grad(self.grad), grad_fit=grad(self.grad_fit), grad_check=grad(self.grad_check),
        )

    def projected(self, basis: np.ndarray) -> "HessianStats":
        """The statistics of ``C`` in ``W ≈ C B`` for a fixed (k × in) ``B``: the layer ``C``
        reads ``t = B x``, so ``A → B A Bᵀ`` (and its halves), the gradient ``E[g xᵀ] → ∇W · Bᵀ``;
        ``G`` is unchanged (the same outputs); what describes the old input space's spectrum or the
        old layer's Hessian block (eigenvalues, λ_max, traces of the block) is dropped."""
        b = np.asarray(basis, dtype=np.float64)

        def cov(m: np.ndarray | None) -> np.ndarray | None:
            if m is None:
                return None
            r = b @ m @ b.T
            return (r + r.T) / 2

        def grad(m: np.ndarray | None) -> np.ndarray | None:
            return None if m is None else m @ b.T

        a = cov(self.a)
        return dataclasses.replace(
            self, a=a, a_weighted=cov(self.a_weighted), a_fit=cov(self.a_fit), a_check=cov(self.a_check),
            grad=grad(self.grad), grad_fit=grad(self.grad_fit), grad_check=grad(self.grad_check),
            a_eig_top=None, a_trace=None if a is None else float(np.trace(a)), lambda_max=None, lanczos_eigs=None,
            hutchinson_trace=None, fisher_diag_mean=None,
        )

    def summary(self) -> dict[str, Any]:
        """The JSON-able scalars of what was computed (for the plan record)."""
        out: dict[str, Any] = {}
        if self.a is not None:
            out["samples"] = int(self.samples)
        if self.a_eig_top is not None and len(self.a_eig_top):
            out["a_eig_max"] = float(self.a_eig_top[0])
        if self.a_trace is not None:
            out["a_trace"] = float(self.a_trace)
        g_max = None
        if self.g is not None:
            out["g_trace"] = float(np.trace(self.g))
            g_max = _top_eigenvalue(self.g)
        elif self.g_diag is not None:
            out["g_trace"] = float(np.sum(self.g_diag))
            g_max = float(np.max(self.g_diag))  # diag(G) only: max diag ≤ λ_max(G)
        # K-FAC closed forms, H ≈ A ⊗ G: eigenvalues α_i γ_j, trace tr(A) tr(G).
        if "g_trace" in out and self.a_trace is not None:
            out["kfac_trace"] = float(self.a_trace) * out["g_trace"]
        if g_max is not None and "a_eig_max" in out:
            out["kfac_lambda_max"] = out["a_eig_max"] * g_max
        if self.fisher_diag_mean is not None:
            out["fisher_diag_mean"] = float(self.fisher_diag_mean)
        if self.lambda_max is not None:
            out["lambda_max"] = float(self.lambda_max)
        if self.lanczos_eigs is not None:
            out["lanczos_eigs"] = [float(v) for v in self.lanczos_eigs]
        if self.hutchinson_trace is not None:
            out["hutchinson_trace"] = float(self.hutchinson_trace)
        if self.loss_name is not None:
            out["loss"] = self.loss_name
            out["grad_samples"] = int(self.grad_samples)
        return out
