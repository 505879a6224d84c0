r"""Mixed-precision bit allocation: one grouped knapsack over (bits × method) items per weight.

For a weight ``W`` (out × in, ``y = W x``) and a candidate item ``b`` (bits, quantizer), the
weight change is ``Δ_b = Q_b(W) − W`` and the loss change is predicted by the second-order Taylor
model with the K-FAC block ``H ≈ A ⊗ G`` (ALGORITHMS.md §1.2, §3(c))::

    c(b) = ⟨∇_W L, Δ_b⟩ + ½ tr(G Δ_b A Δ_bᵀ)                                   (K-FAC)
    c(b) = ⟨∇_W L, Δ_b⟩ + ½ Σ_o G_oo (Δ_b A Δ_bᵀ)_oo                           (only diag G)
    c(b) = ⟨∇_W L, Δ_b⟩ + ½ γ tr(Δ_b A Δ_bᵀ)                                   (layer-wise)

``A = E[x xᵀ]``; ``G = E[g gᵀ]`` with ``g = ∂ℓ/∂y``; the gradient term is dropped where the
gradient was not measured. The layer-wise estimator is GPTQ's proxy ``G = γ I``, with ``γ`` the
scalar that puts it in the loss's units, taken from the first statistic available:
``γ = tr(G)/m`` (the mean output curvature, when G or diag G was measured);
``γ = tr(H_l) / (m · tr A)`` (Hutchinson trace of the layer block, since ``tr(A ⊗ γI) = γ m tr A``);
``γ = λ_max(H_l) / λ_max(A)``. With none of them ``γ = 1``: the prediction is then the layer-output
error ``½ E‖Δ x‖²``, not a loss change, so the gradient term is dropped and ``lossless`` is refused.

Each item costs its true stored bytes (:func:`hessc.passes.quantize.stored_bytes`: codes at their
container width plus scales and zero points). Conv weights are items too wherever the target
quantizes them (the portable ``onnx`` target): per output channel, or in input-channel groups for
1×1 convs (:func:`hessc.passes.quantize.group_size_for`). A depthwise 3×3 conv has 9 weights per
scale, so its scale and zero point cost about as much as its codes at 4 bits (8 effective bits per
weight; 12.4 at 8 bits): the knapsack weighs that overhead against its predicted loss change. With ``kernel_layout`` (the cpu and cuda targets) a
3-bit MatMul/Gemm code costs 3 bits: it is stored at 3 bits and rebuilt into MatMulNBits' 4-bit
layout when ONNX Runtime opens the model (:mod:`hessc.runtime.lower`). In the portable form a 3-bit
code lives in a 4-bit container, so there a 3-bit item costs what the 4-bit item costs and is
(almost always) dominated.
With ``rtn-grad`` among the methods (``optimize(rounding="gradient")``) the allocator also offers
items at 4 and 8 bits whose weights near a rounding boundary round against the loss gradient (:func:`hessc.passes.quantizers.rtn`; ALGORITHMS.md §3(c),
rounding-direction extension). Its first-order term is the one that can make ``c`` negative for
real. The directions come from the even calibration feeds' gradient and the item is scored with the
odd feeds' (``grad_fit``/``grad_check``); the chosen item is quantized with the whole gradient.
One item per weight is chosen by the exact grouped-knapsack DP of :mod:`hessc.passes.allocate`::

    min Σ_l c_l(b_l)  s.t.  Σ_l bytes_l(b_l) ≤ B            (budget: bits/weight or bytes)
    min Σ_l bytes_l(b_l)  s.t.  Σ_l c_l(b_l) ≤ 0            ("lossless")

``budget_bits`` covers every quantized weight: the weights whose form is fixed (outside the
budget, below) take their stored bytes out of ``budget_bits / 8 · Σ numel`` over all of them, and
``B`` is what is left for the allocated weights (every planned MatMul/Gemm/Conv weight with
statistics), so the file's effective bits per weight, scales and zero points counted, stay within
the budget; where the fixed weights alone exceed it, the budget is refused with their share.
``budget_bytes`` bounds the allocated weights' stored bytes. A table tied to its head (a ``Gather`` and a
MatMul/Gemm reading one weight, :class:`hessc.passes.quantize.WeightGroup`) is one item: priced
at its bytes stored once, counted once in ``Σ numel``, scored with the head's curvature. The
lookup's own effect on the loss is not measured (its output error enters the residual stream,
which the statistics of the layers reading it do not price), so the prediction is the head's only.
An embedding table without a head keeps its uniform plan (no curvature is measured for a
lookup), as do static int8 convs, recurrent and ConvTranspose weights (8 bits, the one form their
kernels run) and weights inside subgraph bodies; the record lists them under ``outside_budget``
with their bytes, and ``planned_effective_bits`` counts every quantized weight, as the file
stores them. In lossless mode each weight may also stay in
float (cost 4 bytes per weight, ``c = 0``), which keeps the problem always feasible. A budget at
or above the float size of the allocated weights is an honest no-op: every weight stays in float
and the record says why.

The pass re-plans the MatMul/Gemm/Conv weights that plan-quantization planned and that carry
Hessian statistics, replacing their :class:`~hessc.ir.meta.QuantPlan` (bits and method), and records the
decision, every candidate's prediction and the budget accounting in
``model.meta["hessc.allocation"]`` (with a ``bits_override``/``method_override`` pair that
:class:`~hessc.passes.quantize.QuantConfig` honours, to replay the plan on a fresh copy).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.ir import weights as qweights
from hessc import progress
from hessc.passes import allocate, curvature, hessian, low_rank, quantize

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATION_KEY",
    "ESTIMATOR_KEY",
    "FLOAT_BITS",
    "AllocateBitsPass",
    "AllocationConfig",
    "Candidate",
    "WeightAllocation",
    "predict_delta_loss",
    "step_up",
]

ALLOCATION_KEY = "hessc.allocation"
"""``model.meta`` key: the allocation record (JSON-able dict) of the last allocate-bits run."""

ESTIMATOR_KEY = "hessc.estimator"
"""``model.meta`` key: the estimator (``kfac``/``layerwise``) Hessian annotation found to predict
true loss changes best; ``estimator="auto"`` follows it when present."""

FLOAT_BITS = 32
"""Bits of the keep-in-float item (the weight stays fp32: 4 bytes per weight)."""

ESTIMATORS = ("kfac", "layerwise", "auto")

ALLOCATED_OPS = ("MatMul", "Gemm", "Conv")

SPLIT_FRACTIONS = (0.25, 0.5, 0.75)
"""Split ranks offered, as fractions of the break-even rank ``out·in/(out+in)``
(:func:`hessc.passes.low_rank.ranks_for`)."""

COMPENSATION_RANKS = (16, 32, 64)
"""Ranks of the low-rank compensation items (ALGORITHMS.md §3(c); the issue's 8–64)."""

TRUST_RADIUS = 0.3
"""Default neighbourhood of the quadratic model (ALGORITHMS.md §3(c): only items with a small
enough perturbation are admissible, the 8-bit item always). Measured as the relative layer-output
error ρ at group 128, RTN, MiniLM: 2-bit items 0.31–0.60 (median 0.45), 3-bit 0.14–0.28, 4-bit
≤ 0.14, 8-bit ≤ 0.01. At a 3.5-bit budget the unrestricted knapsack put 4 of 36 layers at 2 bits
on their predicted gains and lost to uniform 3-bit (cosine to fp32 0.754 against 0.785 for RTN);
restricted it gives 0.832 (RTN) and 0.883 (GPTQ)."""

NEGLIGIBLE_SHARE = 0.1
"""An item beyond the trust radius is still admissible when its predicted (curvature) damage is
at most this share of a typical layer's 4-bit damage (the median over the allocated weights):
its layer's output may move a lot relative to itself, but the model barely sees it (a layer
behind a 1000× smaller input, say), so even a prediction off by a few times leaves it negligible.
Judged only by the layer's own relative error, such a weight was held at 4 bits and a 5.5-bit
budget went unspent (4.28 bits used)."""


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
    """Configuration of :class:`AllocateBitsPass`; exactly one of the three budgets is set.

    Attributes:
        budget_bits: average stored bits per allocated weight (scales and zero points counted).
        budget_bytes: stored bytes of the allocated weights.
        lossless: the cheapest allocation whose summed predicted loss change is at most 0.
        candidate_bits: bit widths offered per weight.
        methods: quantizers offered per weight (``gptq`` only where ``A`` was measured).
        group_size: weights per scale along the input dimension (for Conv weights, as
            :func:`hessc.passes.quantize.group_size_for` resolves it).
        symmetric: no zero points.
        estimator: ``kfac``, ``layerwise`` or ``auto`` (see the module docstring).
        scale_bytes: bytes per stored scale (4 for fp32, 2 for fp16 kernels).
        kernel_layout: cost items in MatMulNBits' layout (blocks padded, zero points per row in
            whole bytes), as the cpu and cuda targets store them.
        trust_radius: the neighbourhood in which the second-order prediction is trusted, as the
            item's relative layer-output perturbation ``ρ = √(tr(Δ A Δᵀ) / tr(W A Wᵀ))``; items
            beyond it are admitted only when the budget cannot be met without them (None: all).
        static_int8_ops: ops the target runs as static int8 kernels: their weights have one
            form (8 bits, :func:`hessc.passes.quantize.static_int8_plan`) and are not allocated.
        low_rank: also offer low-rank items (:mod:`hessc.passes.low_rank`): splits at
            ``split_fractions`` of the break-even rank and at the whitened numerical ranks, with
            factors at ``split_bits``; compensation at ``compensation_ranks`` on the widths in
            ``compensation_bits``, factors at ``compensation_factor_bits``.
        float_only: offer no quantized item: each weight as it is or split into float factors
            (parameter reduction without quantization; needs ``low_rank``).
    """

    budget_bits: float | None = None
    budget_bytes: int | None = None
    lossless: bool = False
    candidate_bits: tuple[int, ...] = meta.SUPPORTED_BITS
    methods: tuple[str, ...] = ("rtn", "gptq")
    group_size: int = 32
    symmetric: bool = False
    estimator: str = "auto"
    scale_bytes: int = 4
    kernel_layout: bool = False
    trust_radius: float | None = TRUST_RADIUS
    static_int8_ops: frozenset[str] = frozenset()
    low_rank: bool = False
    split_fractions: tuple[float, ...] = SPLIT_FRACTIONS
    split_bits: tuple[int, ...] = (4, 8)
    compensation_ranks: tuple[int, ...] = COMPENSATION_RANKS
    compensation_bits: tuple[int, ...] = (2, 3, 4)
    compensation_factor_bits: int = 8
    float_only: bool = False

    def __post_init__(self) -> None:
        chosen = [self.budget_bits is not None, self.budget_bytes is not None, self.lossless]
        if sum(chosen) != 1:
            raise InputError("give exactly one budget: bits per weight, bytes, or lossless")
        if self.budget_bits is not None and not (math.isfinite(self.budget_bits) and self.budget_bits > 0):
            raise InputError(f"--bits {self.budget_bits} must be a positive number")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise InputError(f"--budget-bytes {self.budget_bytes} must be positive")
        if not self.candidate_bits:
            raise InputError("offer at least one candidate bit width")
        for bits in self.candidate_bits:
            quantize.validate_bits_and_group(bits, self.group_size)
        for method in self.methods:
            if method not in quantize.METHODS:
                raise InputError(f"unknown quantization method {method!r}; use one of {', '.join(quantize.METHODS)}")
        if "rtn" not in self.methods:
            raise InputError("the methods must include 'rtn' (weights without A can only use it)")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"unknown estimator {self.estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if self.float_only and not self.low_rank:
            raise InputError("float_only allocation chooses among low-rank splits: turn low_rank on")
        if any(not 0 < f < 1 for f in self.split_fractions):
            raise InputError(f"split fractions {self.split_fractions} must lie strictly between 0 and 1 "
                             "(of the break-even rank)")
        if any(r < 1 for r in self.compensation_ranks):
            raise InputError(f"compensation ranks {self.compensation_ranks} must be positive")
        for bits in (*self.split_bits, self.compensation_factor_bits):
            if bits != FLOAT_BITS:
                quantize.validate_bits_and_group(bits, self.group_size)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One item of a weight's group.

    Attributes:
        bits: bits per code, or :data:`FLOAT_BITS` for the keep-in-float item.
        method: ``rtn``, ``gptq`` or ``float``.
        bytes: true stored bytes.
        delta_loss: predicted loss change.
        first_order: the gradient term ``⟨∇L, Δ⟩`` (0 when not measured).
        perturbation: the relative layer-output error ``ρ = √(tr(Δ A Δᵀ) / tr(W A Wᵀ))``.
        form: ``""`` (the weight as it is), ``split`` (``W ≈ L R``: ``bits`` and ``method`` are
            the factors') or ``compensate`` (``Q(W) + L R``: ``bits``/``method`` are ``W``'s, the
            factors at ``factor_bits``); :mod:`hessc.passes.low_rank`.
        rank: the factors' rank (0 without a low-rank form).
        factor_bits: the factors' bits (32: float; 0 without a low-rank form).
    """

    bits: int
    method: str
    bytes: int
    delta_loss: float
    first_order: float
    perturbation: float = 0.0
    form: str = ""
    rank: int = 0
    factor_bits: int = 0

    @property
    def key(self) -> tuple:
        return self.bits, self.method, self.form, self.rank

    @property
    def keeps_float(self) -> bool:
        """The weight stays as it is, in float."""
        return self.method == "float" and not self.form

    def to_json(self) -> dict[str, Any]:
        out = {
            "bits": self.bits, "method": self.method, "bytes": self.bytes,
            "predicted_delta_loss": self.delta_loss, "first_order": self.first_order,
            "perturbation": round(self.perturbation, 6),
        }
        if self.form:
            out.update(form=self.form, rank=self.rank, factor_bits=self.factor_bits)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        return cls(d["bits"], d["method"], d["bytes"], d["predicted_delta_loss"], d.get("first_order", 0.0),
                   d.get("perturbation", 0.0), d.get("form", ""), d.get("rank", 0), d.get("factor_bits", 0))

    @property
    def damage(self) -> float:
        """The curvature part of the prediction (without the gradient term)."""
        return self.delta_loss - self.first_order

    def admissible(self, radius: float | None, negligible: float = 0.0) -> bool:
        """Inside the trusted neighbourhood (8-bit and float items always are), or predicted to
        damage the loss negligibly (at most ``negligible``) wherever its layer's output goes."""
        return (radius is None or self.bits >= 8 or self.perturbation <= radius
                or (negligible > 0 and self.damage <= negligible))


def negligible_damage(groups: Sequence[Sequence[Candidate]]) -> float:
    """:data:`NEGLIGIBLE_SHARE` of the median over weights of their best 4-bit item's damage (0
    when no weight has a 4-bit item)."""
    fours = [min(c.damage for c in cands if c.bits == 4) for cands in groups if any(c.bits == 4 for c in cands)]
    return NEGLIGIBLE_SHARE * max(float(np.median(fours)), 0.0) if fours else 0.0


@dataclasses.dataclass(frozen=True)
class WeightAllocation:
    """The candidates of one weight and the one chosen."""

    name: str
    shape: tuple[int, int]
    estimator: str
    candidates: tuple[Candidate, ...]
    chosen: Candidate
    curvature: dict[str, Any]
    tied: dict[str, Any] | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name, "shape": list(self.shape), "estimator": self.estimator,
            "bits": self.chosen.bits, "method": self.chosen.method, "bytes": self.chosen.bytes,
            "predicted_delta_loss": self.chosen.delta_loss,
            "candidates": [c.to_json() for c in self.candidates], "curvature": self.curvature,
        }
        if self.chosen.form:
            out.update(form=self.chosen.form, rank=self.chosen.rank, factor_bits=self.chosen.factor_bits)
        if self.tied is not None:
            out["tied"] = dict(self.tied)
        return out


def _stat(stats: Any, name: str) -> Any:
    return getattr(stats, name, None) if stats is not None else None


def _layerwise_scale(stats: Any, out_dim: int) -> float | None:
    """``γ`` of the layer-wise estimator ``G = γI`` in loss units, or None when unknown."""
    g, g_diag = _stat(stats, "g"), _stat(stats, "g_diag")
    if g is not None:
        return float(np.trace(g)) / out_dim
    if g_diag is not None:
        return float(np.sum(g_diag)) / out_dim
    a = _stat(stats, "a")
    trace = _stat(stats, "hutchinson_trace")
    if trace is not None and a is not None and np.trace(a) > 0:
        return float(trace) / (out_dim * float(np.trace(a)))
    lam = _stat(stats, "lambda_max")
    if lam is not None and a is not None:
        alpha = float(np.linalg.eigvalsh(np.asarray(a, dtype=np.float64))[-1])
        if alpha > 0:
            return float(lam) / alpha
    return None


def resolve_estimator(requested: str, stats: Any, model_choice: str | None) -> str:
    """The estimator used for one weight: ``kfac`` needs G or diag G; else ``layerwise``."""
    has_g = _stat(stats, "g") is not None or _stat(stats, "g_diag") is not None
    choice = requested
    if requested == "auto":
        choice = model_choice if model_choice in ("kfac", "layerwise") else "kfac"
    return "kfac" if choice == "kfac" and has_g else "layerwise"


def _output_factor(stats: Any, estimator: str, out_dim: int) -> tuple[Any, np.ndarray | None, float, bool]:
    """The output factor ``G`` an estimator uses: ``(g, None, 1, True)`` for the full K-FAC
    factor, ``(None, g_diag, 1, True)`` for its diagonal, ``(None, None, γ, in_loss_units)`` for
    the layer-wise ``G = γI`` (γ = 1 and not in loss units where γ is unknown)."""
    g, g_diag = _stat(stats, "g"), _stat(stats, "g_diag")
    if estimator == "kfac" and g is not None:
        return g, None, 1.0, True
    if estimator == "kfac" and g_diag is not None:
        return None, np.asarray(g_diag, dtype=np.float64), 1.0, True
    gamma = _layerwise_scale(stats, out_dim)
    return None, None, (1.0 if gamma is None else gamma), gamma is not None


def predict_delta_loss(stats: Any, delta: np.ndarray, estimator: str) -> tuple[float, float]:
    """Predicted loss change of a weight change ``delta`` (out × in) and its first-order part.

    Args:
        stats: the weight's Hessian statistics (``a``, ``g``/``g_diag``, ``grad`` where measured).
        delta: ``Q(W) − W`` in the normalised (out, in) view.
        estimator: ``kfac`` or ``layerwise`` (as resolved by :func:`resolve_estimator`).

    Returns:
        ``(c, first_order)``: the full prediction and its gradient term.
    """
    a = _stat(stats, "a")
    if a is None:
        raise ValueError("predicting a loss change needs the input factor A")
    d = np.asarray(delta, dtype=np.float64)
    g, g_diag, gamma, in_loss_units = _output_factor(stats, estimator, d.shape[0])
    if g is not None:
        quadratic = curvature.kfac_quadratic(g, a, d)
    elif g_diag is not None:
        quadratic = 0.5 * float(np.sum(g_diag[:, None] * (d @ np.asarray(a, dtype=np.float64)) * d))
    else:
        quadratic = gamma * curvature.kfac_quadratic(None, a, d)
    grad = _stat(stats, "grad")
    first = float(np.sum(np.asarray(grad, dtype=np.float64) * d)) if grad is not None and in_loss_units else 0.0
    return first + quadratic, first


class LowRankScore:
    """:func:`predict_delta_loss` and the output error (:func:`_perturbation`) of every change
    ``Δ = D + L R`` of one weight with a fixed part ``D`` (``−W`` for a split, ``Q(W) − W`` for a
    compensation) and low-rank factors ``L`` (out × r), ``R`` (r × in), from r×r forms:

        tr(G Δ A Δᵀ) = tr(G D A Dᵀ) + 2 Σ L ∘ (G D A Rᵀ) + Σ (Lᵀ G L) ∘ (R A Rᵀ)

    (``G``, ``A`` symmetric; ``G = I`` gives the output energy), so each candidate costs
    ``O(r (out·in + out² + in²))`` instead of ``O(out·in (out + in))``; ``G D A`` is formed once.

    Args:
        stats: the weight's statistics (scored on: the held-out ``A`` where split).
        estimator: as :func:`predict_delta_loss`.
        fixed: ``D`` (out × in).
        base: ``tr(W A Wᵀ)``, :func:`_output_energy` of the weight.
    """

    def __init__(self, stats: Any, estimator: str, fixed: np.ndarray, base: float) -> None:
        a = _stat(stats, "a")
        if a is None:
            raise ValueError("predicting a loss change needs the input factor A")
        self.a = np.asarray(a, dtype=np.float64)
        d = np.asarray(fixed, dtype=np.float64)
        g, self.g_diag, self.gamma, in_loss_units = _output_factor(stats, estimator, d.shape[0])
        self.g = None if g is None else np.asarray(g, dtype=np.float64)
        grad = _stat(stats, "grad")
        self.grad = np.asarray(grad, dtype=np.float64) if grad is not None and in_loss_units else None
        self.base = base
        self.da = d @ self.a
        self.gda = self._g(self.da)
        self.quad0 = float(np.sum(self.gda * d))
        self.energy0 = float(np.sum(self.da * d))
        self.first0 = float(np.sum(self.grad * d)) if self.grad is not None else 0.0

    def _g(self, m: np.ndarray) -> np.ndarray:
        if self.g is not None:
            return self.g @ m
        if self.g_diag is not None:
            return self.g_diag[:, None] * m
        return m

    def __call__(self, left: np.ndarray, right: np.ndarray) -> tuple[float, float, float]:
        """``(c, first_order, rho)`` of ``Δ = D + left · right``: as :func:`predict_delta_loss`
        and :func:`_perturbation`."""
        left = np.asarray(left, dtype=np.float64)
        right = np.asarray(right, dtype=np.float64)
        rar = right @ self.a @ right.T
        quad = self.quad0 + 2 * float(np.sum(left * (self.gda @ right.T))) + float(np.sum((left.T @ self._g(left)) * rar))
        energy = self.energy0 + 2 * float(np.sum(left * (self.da @ right.T))) + float(np.sum((left.T @ left) * rar))
        first = self.first0 + (float(np.sum(left * (self.grad @ right.T))) if self.grad is not None else 0.0)
        rho = math.sqrt(max(energy, 0.0) / self.base) if self.base > 0 else 0.0
        return first + 0.5 * self.gamma * quad, first, rho


def _output_energy(a: np.ndarray, m: np.ndarray) -> float:
    """``tr(M A Mᵀ)``: the layer-output energy of a weight (or of a weight change) under ``A``."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.sum((np.asarray(m, dtype=np.float64) @ a) * m))


def _perturbation(a: np.ndarray, delta: np.ndarray, base: float) -> float:
    """``√(tr(Δ A Δᵀ) / tr(W A Wᵀ))``, the layer-output error relative to the output, given
    ``base = tr(W A Wᵀ)`` (:func:`_output_energy` of the weight, the same for all its items)."""
    return math.sqrt(max(_output_energy(a, delta), 0.0) / base) if base > 0 else 0.0


def _curvature_summary(stats: Any) -> dict[str, Any]:
    summary = getattr(stats, "summary", None)
    out: dict[str, Any] = dict(summary()) if callable(summary) else {}
    a = _stat(stats, "a")
    if a is not None and "a_trace" not in out:
        out["a_trace"] = float(np.trace(a))
    grad = _stat(stats, "grad")
    if grad is not None:
        out["grad_norm"] = float(np.linalg.norm(grad))
    return out


class AllocateBitsPass(ir.passes.InPlacePass):
    """Chooses bits and quantizer per MatMul/Gemm/Conv weight by a grouped knapsack on predicted Δloss.

    Runs after plan-quantization (which decides *which* weights are quantized, with what group
    size) and before insert-qdq; see the module docstring for the maths.
    """

    def __init__(self, config: AllocationConfig, plan_config: quantize.QuantConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.plan_config = plan_config

    def precheck(self, model: ir.Model) -> None:
        """Refuses a bit budget that cannot be met, before the curvature is measured: the weights
        with a fixed form (the CPU's static int8 convs, recurrent weights, tables without a head)
        and the smallest plain items of the weights that can have no low-rank form exceed it.
        Planned on a copy with ``plan_config`` (the pipeline's planning), priced as :meth:`call`
        prices them."""
        if self.plan_config is None or self.config.budget_bits is None:
            return
        copy = frontend.clone(model, annotations=False)
        quantize.PlanQuantizationPass(self.plan_config).call(copy)
        config = self.config
        targets = self._targets(copy)
        fixed_numel, fixed_bytes = _fixed(self._outside_budget(copy, {id(r.value) for r in targets}))
        numel = sum(r.matrix_shape[0] * r.matrix_shape[1] for r in targets)
        # A lower bound on the allocated weights' bytes: the smallest plain item of each weight
        # that can have no low-rank form (those can be smaller still, so they count nothing).
        bits = [b for b in config.candidate_bits if b != FLOAT_BITS]
        least = sum(min(quantize.stored_bytes(self._plan(r, b, "rtn"), _scale_bytes(config.scale_bytes, r),
                                              config.kernel_layout) for b in bits)
                    for r in targets if bits and not (config.low_rank and low_rank.supports(r) is None))
        if 8 * (fixed_bytes + least) > config.budget_bits * (numel + fixed_numel):
            raise InputError(_budget_message(config, least, numel, fixed_bytes, fixed_numel))

    @staticmethod
    def _groups(model: ir.Model) -> list[quantize.WeightGroup]:
        """The planned weights, one per stored weight (a tied table and its head are one)."""
        return [g for g in quantize.weight_groups(list(qweights.iter_weights(model))) if g.plan() is not None]

    def _targets(self, model: ir.Model) -> list[qweights.WeightRef]:
        """The allocated weights, each by the use that carries its curvature (a tie by its head)."""
        return [g.lead for g in self._groups(model)
                if g.lead.op in ALLOCATED_OPS and g.lead.op not in self.config.static_int8_ops
                and not g.lead.in_subgraph]

    def requires(self, model: ir.Model) -> None:
        refs = self._targets(model)
        if not refs and not self._groups(model):
            raise ir.passes.PreconditionError(
                "allocate-bits found no planned MatMul/Gemm/Conv weights; run plan-quantization first"
            )
        stale = [(r.name, meta.stale_reason(r.value, meta.HESSIAN_KEY)) for r in refs
                 if r.value.meta.get(meta.HESSIAN_KEY) is None and meta.stale_reason(r.value, meta.HESSIAN_KEY)]
        if stale:
            name, why = stale[0]
            raise ir.passes.PreconditionError(
                f"allocate-bits: the Hessian statistics of {len(stale)} weights are invalid ({name}: {why}); "
                "run annotate-hessian again after the pass that changed them"
            )
        if refs and not any(_stat(r.value.meta.get(meta.HESSIAN_KEY), "a") is not None for r in refs):
            raise ir.passes.PreconditionError(
                "allocate-bits needs Hessian statistics (at least A) on the weights; run annotate-hessian "
                "with calibration data first"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        if not self._targets(model):
            outside = self._outside_budget(model, set())
            fixed_numel, fixed_bytes = _fixed(outside)
            if config.budget_bits is not None and fixed_numel and 8 * fixed_bytes > config.budget_bits * fixed_numel:
                raise InputError(_budget_message(config, 0.0, 0, fixed_bytes, fixed_numel))
            note = (f"nothing to allocate: the allocator prices none of the {len(outside)} planned weights; "
                    "each keeps its uniform plan (outside_budget says why)")
            logger.warning(note)
            model.meta[ALLOCATION_KEY] = with_weights(
                {"mode": "lossless" if config.lossless else "budget", "budget_bits": config.budget_bits,
                 "budget_bytes": config.budget_bytes, "allocated_params": 0, "not_allocated": [],
                 "outside_budget": outside, "note": note}, [])
            return ir.passes.PassResult(model, False)
        refs = [r for r in self._targets(model) if _stat(r.value.meta.get(meta.HESSIAN_KEY), "a") is not None]
        allocated = {id(r.value) for r in refs}
        unallocated = [r.name for r in self._targets(model) if id(r.value) not in allocated]
        if unallocated:
            logger.warning("no Hessian statistics for %d weights; they keep the uniform plan: %s",
                           len(unallocated), ", ".join(unallocated[:5]))
        model_choice = model.meta.get(ESTIMATOR_KEY)
        numel = sum(r.matrix_shape[0] * r.matrix_shape[1] for r in refs)
        float_bytes = sum(int(r.value.dtype.itemsize) * r.matrix_shape[0] * r.matrix_shape[1] for r in refs)
        outside = self._outside_budget(model, allocated)
        fixed_numel, fixed_bytes = _fixed(outside)
        budget = None
        if config.budget_bits is not None:  # over every quantized weight: the fixed ones' bytes come off
            budget = config.budget_bits / 8 * (numel + fixed_numel) - fixed_bytes
        elif config.budget_bytes is not None:
            budget = float(config.budget_bytes)
        if config.lossless and any(
            resolve_estimator(config.estimator, r.value.meta[meta.HESSIAN_KEY], model_choice) == "layerwise"
            and _layerwise_scale(r.value.meta[meta.HESSIAN_KEY], r.matrix_shape[0]) is None
            for r in refs
        ):
            raise InputError(
                "lossless allocation needs curvature in loss units (G, a Hessian trace or lambda_max) "
                "and gradients; run Hessian annotation with backward statistics"
            )
        no_op = budget is not None and budget >= float_bytes
        ties = {id(g.lead.value): g for g in self._groups(model) if g.tied}
        allocations = []
        for i, r in enumerate(refs):
            allocations.append(self._candidates(r, model_choice, with_float=config.lossless or no_op,
                                                low_rank_forms=not no_op and id(r.value) not in ties))
            progress.report("allocate", i + 1, len(refs))

        if no_op:
            picks = [next(c for c in cands if c.keeps_float) for _, cands, _ in allocations]
            note = (
                f"the budget ({budget:.0f} bytes) is at or above the float size of the weights "
                f"({float_bytes} bytes): nothing to compress, every weight stays in float"
            )
            logger.warning(note)
        else:
            try:
                if budget is not None and budget <= 0:
                    raise allocate.InfeasibleBudget(budget, 0.0)
                picks, note = choose([cands for _, cands, _ in allocations], budget, config)
            except allocate.InfeasibleBudget:
                min_bytes = sum(min(c.bytes for c in cands) for _, cands, _ in allocations)
                raise InputError(_budget_message(config, min_bytes, numel, fixed_bytes, fixed_numel)) from None
            if note:
                logger.warning(note)

        results = [
            WeightAllocation(ref.name, ref.matrix_shape, est, tuple(cands), pick,
                             _curvature_summary(ref.value.meta[meta.HESSIAN_KEY]),
                             _tie_record(ties[id(ref.value)]) if id(ref.value) in ties else None)
            for (ref, cands, est), pick in zip(allocations, picks)
        ]
        modified = self._apply(model, results)
        record: dict[str, Any] = {
            "mode": "lossless" if config.lossless else "budget",
            "budget_bits": config.budget_bits,
            "trust_radius": config.trust_radius,
            "budget_bytes": None if budget is None else int(math.floor(budget)),
            "estimator": config.estimator,
            "allocated_params": numel,
            "not_allocated": unallocated,
            "outside_budget": outside,
        }
        record = with_weights(record, [r.to_json() for r in results])
        if note:
            record["note"] = note
        model.meta[ALLOCATION_KEY] = record
        logger.info(
            "allocated %d weights: %.3f effective bits (%.3f over every quantized weight, %d outside the budget), "
            "predicted Δloss %.4g",
            len(results), record["effective_bits"] or 0.0, record["planned_effective_bits"] or 0.0, len(outside),
            record["predicted_delta_loss"],
        )
        return ir.passes.PassResult(model, modified)

    def _outside_budget(self, model: ir.Model, allocated: set[int]) -> list[dict[str, Any]]:
        """The planned weights the knapsack does not decide, with what they store under their
        uniform plan: embedding tables without a head (no curvature is measured for a lookup) and
        weights without statistics."""
        out = []
        for group in self._groups(model):
            if id(group.lead.value) in allocated:
                continue
            plan = group.plan()
            if group.lead.op in self.config.static_int8_ops:
                reason = "a static int8 kernel on this target: 8 bits is the one form it runs"
            elif group.lead.recurrent:
                reason = "a recurrent op's weight: 8 bits per gate unit, the form ORT's quantized LSTM runs"
            elif group.lead.op == "ConvTranspose":
                reason = "a ConvTranspose weight: no curvature is measured for it, 8 bits per output channel"
            elif group.lead.op not in ALLOCATED_OPS:
                reason = "an embedding table: no curvature is measured for a lookup"
            elif group.lead.in_subgraph:
                reason = "read inside an If/Loop/Scan body, where no curvature is measured"
            else:
                reason = "no Hessian statistics"
            out.append({
                "name": group.name, "op": group.lead.op, "shape": list(group.lead.matrix_shape), "bits": plan.bits,
                "bytes": quantize.stored_bytes(plan, _scale_bytes(self.config.scale_bytes, group.lead),
                                               self.config.kernel_layout),
                "reason": reason + "; it keeps the uniform plan",
            })
        return out

    def _candidates(
        self, ref: qweights.WeightRef, model_choice: str | None, with_float: bool, low_rank_forms: bool = True,
    ) -> tuple[qweights.WeightRef, list[Candidate], str]:
        config = self.config
        stats = ref.value.meta[meta.HESSIAN_KEY]
        estimator = resolve_estimator(config.estimator, stats, model_choice)
        matrix = ref.matrix()
        # GPTQ items are fitted on one half of the calibration and scored on the other (the
        # chosen item is then quantized with the whole): scored on the A it minimised, GPTQ's
        # predicted damage is optimistic (MiniLM, 3.5-bit budget: the in-sample scores put 2-bit
        # GPTQ layers in and the result was worse than uniform 3-bit).
        fit, check = _stat(stats, "a_fit"), _stat(stats, "a_check")
        cross = fit is not None and check is not None
        h = None
        if "gptq" in config.methods:
            h = hessian.gptq_hessian(dataclasses.replace(stats, a=fit) if cross else stats)
        # Likewise rounding directed by the even feeds' gradient is scored on the odd feeds'.
        grad_fit, grad_check = _stat(stats, "grad_fit"), _stat(stats, "grad_check")
        bases: dict[int, float] = {}  # tr(W A Wᵀ) per A the items are scored on
        out: list[Candidate] = []
        quantized: dict[tuple[int, str], np.ndarray] = {}  # (bits, method) → Q(W)
        for bits in () if config.float_only else sorted(set(config.candidate_bits)):
            for method in config.methods:
                if method == "rtn-grad" and (grad_fit is None or grad_check is None or bits not in quantize.DIRECTED_MARGIN):
                    continue
                plan = self._plan(ref, bits, method)
                q, in_dim = quantize.quantize_matrix(matrix, plan, h if method == "gptq" else None,
                                                     grad_fit if method == "rtn-grad" else None)
                delta = q.dequantize()[:, :in_dim].astype(np.float64) - matrix
                scored = stats
                if method == "gptq" and cross:
                    scored = dataclasses.replace(stats, a=check)
                elif method == "rtn-grad":
                    scored = dataclasses.replace(stats, grad=grad_check)
                loss, first = predict_delta_loss(scored, delta, estimator)
                a = _stat(scored, "a")
                if id(a) not in bases:
                    bases[id(a)] = _output_energy(a, matrix)
                rho = _perturbation(a, delta, bases[id(a)])
                out.append(Candidate(bits, method, quantize.stored_bytes(plan, _scale_bytes(config.scale_bytes, ref),
                                                                          config.kernel_layout),
                                     loss, first, rho))
                quantized[(bits, method)] = delta + matrix
                logger.debug("%s: %d-bit %s predicts %.4g", ref.name, bits, method, loss)
        if with_float or config.float_only:
            out.append(Candidate(FLOAT_BITS, "float", int(ref.value.dtype.itemsize) * ref.numel, 0.0, 0.0))
        if config.low_rank and low_rank_forms and low_rank.supports(ref) is None:
            out.extend(self._low_rank_candidates(ref, matrix, stats, estimator, out, quantized, with_float))
        return ref, out, estimator

    def _low_rank_candidates(self, ref, matrix, stats, estimator, plain, quantized, with_float) -> list[Candidate]:
        """The split items (ranks × factor bits, float factors where float items are offered)
        and the compensation items (ranks, on the best-predicted quantizer of each offered width)."""
        config = self.config
        group = quantize.group_size_for(ref, config.group_size)
        # Fitted on one half of the calibration, scored on the other, where both were measured:
        # a low-rank form puts its whole error where the sample A has least energy, so scored on
        # the A it was fitted to it looks far better than it is (a 64-wide layer calibrated on 64
        # rows: split at half rank, output error 0.46 of the output on fresh inputs).
        fit_a, check_a = _stat(stats, "a_fit"), _stat(stats, "a_check")
        cross = fit_a is not None and check_a is not None
        on = dataclasses.replace(stats, a=check_a) if cross else stats
        if not cross:
            fit_a = stats.a
        base = _output_energy(on.a, matrix)

        def scored(form, rank, bits, method, factor_bits, score: LowRankScore, f, extra_bytes) -> Candidate:
            loss, first, rho = score(f.left_q, f.right_q)
            return Candidate(bits, method, extra_bytes, loss, first, rho, form, rank, factor_bits)

        def factor_bytes(rank: int, bits: int) -> int:
            plans = low_rank.factor_plans(ref.name, ref.matrix_shape, rank, bits, group, config.symmetric)
            if plans[0] is None:
                return int(ref.value.dtype.itemsize) * rank * sum(ref.matrix_shape)
            return sum(quantize.stored_bytes(p, _scale_bytes(config.scale_bytes, ref), config.kernel_layout)
                       for p in plans)

        out: list[Candidate] = []
        split_bits = [b for b in config.split_bits if b != FLOAT_BITS] + ([FLOAT_BITS] if with_float else [])
        if config.float_only:
            split_bits = [FLOAT_BITS]
        fits = low_rank.split_factors(matrix, fit_a, None, split_bits, group, config.symmetric, ref.name,
                                      config.split_fractions)
        split_score = LowRankScore(on, estimator, -matrix, base)
        for (bits, rank), f in fits.items():
            out.append(scored("split", rank, bits, "float" if bits == FLOAT_BITS else "rtn", bits, split_score, f,
                              factor_bytes(rank, bits)))
        ranks = [] if config.float_only else [r for r in config.compensation_ranks if r <= min(ref.matrix_shape) // 4]
        for bits in sorted(set(config.compensation_bits) & set(config.candidate_bits)):
            items = [c for c in plain if c.bits == bits and not c.form]
            if not items or not ranks:
                continue
            best = min(items, key=lambda c: c.delta_loss)
            q = quantized[(best.bits, best.method)]
            fits = low_rank.compensation_factors(matrix, q, fit_a, ranks, config.compensation_factor_bits, group,
                                                 config.symmetric, ref.name)
            score = LowRankScore(on, estimator, q - matrix, base)
            for rank, f in fits.items():
                out.append(scored("compensate", rank, bits, best.method, config.compensation_factor_bits, score, f,
                                  best.bytes + factor_bytes(rank, config.compensation_factor_bits)))
        return out

    def _plan(self, ref: qweights.WeightRef, bits: int, method: str) -> meta.QuantPlan:
        return meta.QuantPlan(
            ref.name, ref.op, ref.stored_shape, bits, quantize.group_size_for(ref, self.config.group_size),
            self.config.symmetric, method, ref.matrix_shape,
        )

    def _apply(self, model: ir.Model, results: Sequence[WeightAllocation]) -> bool:
        """Re-plans every value of each allocated weight (a tied table with its head)."""
        modified = False
        by_name = {r.name: r for r in results}
        skip_log = model.meta.setdefault(meta.SKIPPED_KEY, {})
        for group in self._groups(model):
            ref = group.lead
            result = by_name.get(ref.name)
            if result is None or ref.op not in ALLOCATED_OPS:
                continue
            chosen = result.chosen
            rank_plan = None
            if chosen.form:
                rank_plan = meta.RankPlan(ref.name, chosen.form, chosen.rank, chosen.factor_bits,
                                          quantize.group_size_for(ref, self.config.group_size), self.config.symmetric)
            for value in group.values:
                if value.meta.get(meta.RANK_KEY) != rank_plan:
                    if rank_plan is None:
                        value.meta.pop(meta.RANK_KEY, None)
                    else:
                        value.meta[meta.RANK_KEY] = rank_plan
                    modified = True
            if chosen.method == "float" or chosen.form == "split":
                for value in group.values:
                    if value.meta.get(meta.QUANT_KEY) is not None:
                        del value.meta[meta.QUANT_KEY]
                        modified = True
                if chosen.form != "split":
                    skip_log[ref.name] = "kept in float by the bit allocator"
                continue
            plan = self._plan(ref, result.chosen.bits, result.chosen.method)
            for value in group.values:
                if value.meta.get(meta.QUANT_KEY) != plan:
                    value.meta[meta.QUANT_KEY] = plan
                    modified = True
        return modified


def choose(
    candidates: Sequence[Sequence[Candidate]], budget: float | None, config: AllocationConfig
) -> tuple[list[Candidate], str | None]:
    """One item per weight: the grouped knapsack under ``budget`` (or, for a lossless config, the
    cheapest allocation predicted to lose nothing), among the items inside the trust radius, or
    among all when the budget cannot be met inside it (then with a note saying so).

    Raises:
        allocate.InfeasibleBudget: not even the smallest items fit the budget.
    """
    negligible = negligible_damage(candidates)

    def solve(radius: float | None) -> list[Candidate]:
        groups = [[allocate.Item(c.key, c.bytes, c.delta_loss, c) for c in cands
                   if c.admissible(radius, negligible)] for cands in candidates]
        if config.lossless:
            chosen = allocate.solve_min_cost(groups, max_loss=0.0, quantum=_quantum(groups, None))
        else:
            chosen = allocate.solve_knapsack(groups, budget, quantum=_quantum(groups, budget))
        return [item.payload for item in chosen]

    try:
        return solve(config.trust_radius), None
    except allocate.InfeasibleBudget:
        picks = solve(None)
    outside = sum(not p.admissible(config.trust_radius, negligible) for p in picks)
    return picks, (
        f"the budget cannot be met inside the trusted neighbourhood (relative layer-output error "
        f"<= {config.trust_radius}); {outside} weights use items beyond it, where the second-order "
        "prediction is unreliable (usually 2-bit codes): expect more loss than predicted"
    )


def _scale_bytes(target_bytes: int, ref: qweights.WeightRef) -> int:
    """Bytes per stored scale: the target's, or fewer where the weight itself is float16 (its
    scales are stored in its own type)."""
    return min(target_bytes, int(ref.value.dtype.itemsize))


def _fixed(outside: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Weights and stored bytes of the planned weights outside the budget."""
    return sum(w["shape"][0] * w["shape"][1] for w in outside), sum(w["bytes"] for w in outside)


def _tie_record(group: quantize.WeightGroup) -> dict[str, Any]:
    """What the allocation record says about a tied table: stored and priced once, scored by its head."""
    out = group.to_json()
    out["note"] = (f"one weight read by {' and '.join(group.uses)}: stored and priced once, scored with the "
                   f"{group.lead.op} use's curvature; the Gather use is not measured")
    return out


def _quantum(groups: Sequence[Sequence[allocate.Item]], budget: float | None) -> float:
    """Whole bytes when that keeps the DP small (exact); else the solver's default resolution."""
    free = sum(max(i.cost for i in g) - min(i.cost for i in g) for g in groups)
    if budget is not None:
        free = min(free, budget)
    return 1.0 if free <= 200_000 else allocate.default_quantum(groups, budget)


def _budget_message(config: AllocationConfig, min_bytes: float, numel: int, fixed_bytes: float = 0.0,
                    fixed_numel: int = 0) -> str:
    if config.budget_bits is None:
        return (f"--budget-bytes {config.budget_bytes} is below what the smallest items allow: "
                f"{int(math.ceil(min_bytes))} bytes ({min(config.candidate_bits)}-bit codes with their scales and "
                f"zero points at group size {config.group_size}); ask for at least that, or use a larger --group-size")
    min_bits = 8 * (min_bytes + fixed_bytes) / (numel + fixed_numel)
    fixed = ""
    if fixed_numel:
        fixed = (f"; {fixed_numel} of the {numel + fixed_numel} quantized weights have a fixed form on this target "
                 f"(static int8 convs, recurrent weights, embedding tables without a head: the plan's "
                 f"outside_budget) and take {8 * fixed_bytes / fixed_numel:.2f} bits each")
    return (
        f"--bits {config.budget_bits:g} is below what the smallest items allow: {min_bits:.4f} bits per weight "
        f"over every quantized weight ({min(config.candidate_bits)}-bit codes with their scales and zero points at "
        f"group size {config.group_size}{fixed}); ask for at least {math.ceil(min_bits * 100) / 100:g}, use a "
        "larger --group-size" + (", --float-embeddings (tables outside the quantized weights), or --target onnx "
                                 "(low-bit conv and recurrent weights in the portable form)" if fixed_numel else "")
    )


def with_weights(record: dict[str, Any], weights: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A copy of an allocation record with these per-weight entries and the totals recomputed
    (used bytes, effective bits, predicted Δloss, and the ``bits_override``/``method_override``
    pair that replays the allocation through :class:`~hessc.passes.quantize.QuantConfig`)."""
    numel = sum(w["shape"][0] * w["shape"][1] for w in weights)
    used = sum(w["bytes"] for w in weights)
    outside = record.get("outside_budget") or []
    all_numel = numel + sum(w["shape"][0] * w["shape"][1] for w in outside)
    all_bytes = used + sum(w["bytes"] for w in outside)
    out = dict(record)
    out.update(
        weights=[dict(w) for w in weights],
        allocated_params=numel,
        used_bytes=used,
        effective_bits=round(8 * used / numel, 4) if numel else None,
        # Over the allocated weights (float items at 32 bits) and the tables outside the budget.
        planned_effective_bits=round(8 * all_bytes / all_numel, 4) if all_numel else None,
        planned_quantized_params=all_numel - sum(w["shape"][0] * w["shape"][1] for w in weights
                                                 if w["method"] == "float"),
        predicted_delta_loss=float(sum(w["predicted_delta_loss"] for w in weights)),
        # A split weight is not quantized itself (its factors are): it replays as float + its form.
        bits_override=[[w["name"], FLOAT_BITS if w.get("form") == "split" else w["bits"]] for w in weights],
        method_override=[[w["name"], w["method"]] for w in weights if w["method"] != "float" and w.get("form") != "split"],
        rank_override=[[w["name"], w["form"], w["rank"], w["factor_bits"]] for w in weights if w.get("form")],
    )
    return out


def heldout_loss(
    outputs: Sequence[Sequence[np.ndarray]], feeds: Sequence[dict[str, np.ndarray]], loss_name: str,
    ids_name: str | None = None, labels: Sequence[np.ndarray] | None = None,
    reference: Sequence[Sequence[np.ndarray]] | None = None,
) -> float:
    """The annotation's loss (:mod:`hessc.passes.hessian`) on ORT outputs, in float64.

    ``next-token``: cross-entropy of ``logits[:, :-1]`` against ``input_ids[:, 1:]``; ``ce``:
    cross-entropy of the first output against ``labels``; ``kl``: KL(float ‖ result) of the
    first outputs' softmax, ``mse``: half their squared distance, both against the float model's
    ``reference`` outputs. Over several feeds, the mean weighted by each feed's number of loss
    terms (as the annotation averages its statistics).

    Args:
        outputs: per feed, the model's outputs (the first is the logits).
        feeds: the feeds the outputs came from.
        loss_name: ``next-token``, ``ce``, ``kl`` or ``mse``.
        ids_name: the ``input_ids`` input (``next-token``).
        labels: one integer array per feed (``ce``).
        reference: per feed, the float model's outputs (``kl``, ``mse``).

    Returns:
        The mean loss.
    """
    total, count = 0.0, 0
    for i, (outs, feed) in enumerate(zip(outputs, feeds)):
        logits = np.asarray(outs[0], dtype=np.float64)
        if loss_name in ("kl", "mse"):
            y, y0 = (np.asarray(v, np.float64) for v in (logits, reference[i][0]))
            y, y0 = (v.reshape(-1, v.shape[-1] if v.ndim else 1) for v in (y, y0))
            if loss_name == "kl":
                logp, logp0 = log_softmax(y), log_softmax(y0)
                total += float((np.exp(logp0) * (logp0 - logp)).sum())
            else:
                total += float(0.5 * ((y - y0) ** 2).sum())
            count += y.shape[0]
            continue
        if loss_name == "next-token":
            ids = np.asarray(feed[ids_name])
            logits, target = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        elif loss_name == "ce":
            logits, target = logits.reshape(-1, logits.shape[-1]), np.asarray(labels[i]).reshape(-1)
        else:
            raise ValueError(f"no held-out loss for {loss_name!r}: use 'next-token', 'ce', 'kl' or 'mse'")
        logp = log_softmax(logits)
        total += float(-logp[np.arange(len(target)), target].sum())
        count += len(target)
    return total / max(count, 1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """``log softmax`` along the last axis, stable."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def chosen_candidate(w: dict[str, Any]) -> dict[str, Any] | None:
    """The candidate entry of a weight's record that it chose (bits, method and low-rank form)."""
    key = (w["bits"], w["method"], w.get("form", ""), w.get("rank", 0))
    return next((c for c in w.get("candidates", ())
                 if (c["bits"], c["method"], c.get("form", ""), c.get("rank", 0)) == key), None)


def step_up(record: dict[str, Any], candidate_bits: Sequence[int], fraction: float = 0.1) -> list[dict[str, Any]] | None:
    """One backing-off step of a lossless allocation that failed its held-out check.

    The ``ceil(fraction · L)`` weights with the largest predicted damage that are not yet in float
    move up one bit level: to the best-predicted item of the next wider bit width offered that
    costs more bytes (3-bit codes in a 4-bit container are no level), past the widest to float.

    The damage is the quadratic (curvature) part of the prediction, without the gradient term: a
    failed check means the predicted gains did not hold on held-out data, and the gradient term,
    estimated from a few calibration feeds, is the noisy part. Ranked by the full prediction, a
    2-bit item whose gradient term happened to be negative was raised only after every 8-bit item
    had gone to float (SmolLM2 lossless: 29.7 bits per allocated weight before; see README).

    Args:
        record: the allocation record (``model.meta["hessc.allocation"]``); not changed.
        candidate_bits: the bit widths offered.
        fraction: the share of weights moved per step.

    Returns:
        The new ``weights`` entries (same schema, ``bits``/``method``/``bytes``/
        ``predicted_delta_loss`` updated), or None when every weight is already in float.
    """
    weights = [dict(w) for w in record["weights"]]
    movable = [w for w in weights if w["bits"] != FLOAT_BITS]
    if not movable:
        return None
    count = max(1, math.ceil(fraction * len(weights)))

    def damage(w: dict[str, Any]) -> float:
        chosen = chosen_candidate(w)
        first = chosen.get("first_order", 0.0) if chosen else 0.0
        return w["predicted_delta_loss"] - first

    for w in sorted(movable, key=damage, reverse=True)[:count]:
        # A low-rank form steps up to the plain weight (the same bits, or the next width).
        wider = [c for c in w["candidates"] if not c.get("form") and c["bits"] in candidate_bits
                 and c["bytes"] > w["bytes"] and (c["bits"] > w["bits"] or (w.get("form") and c["bits"] == w["bits"]))]
        # A width that costs what a wider one costs is no level (3-bit codes in a 4-bit container).
        wider = [c for c in wider if not any(d["bits"] > c["bits"] and d["bytes"] <= c["bytes"] for d in wider)]
        if wider:
            target = min(c["bits"] for c in wider)
            best = min((c for c in wider if c["bits"] == target), key=lambda c: c["predicted_delta_loss"])
        else:
            best = {"bits": FLOAT_BITS, "method": "float", "bytes": 4 * w["shape"][0] * w["shape"][1],
                    "predicted_delta_loss": 0.0}
        for key in ("form", "rank", "factor_bits"):
            w.pop(key, None)
        w.update(bits=best["bits"], method=best["method"], bytes=best["bytes"],
                 predicted_delta_loss=best["predicted_delta_loss"])
    return weights
