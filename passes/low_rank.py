r"""Low-rank forms of MatMul/Gemm weights: splitting and compensation (ALGORITHMS.md §3(c), §3(d)).

For a weight ``W`` (out × in, ``y = W x``) whose input covariance is ``A = E[x xᵀ]``, the
layer-output error of a replacement ``Ŵ`` is ``E‖(Ŵ − W) x‖² = tr((Ŵ − W) A (Ŵ − W)ᵀ) =
‖(Ŵ − W) S‖²_F`` for any ``S`` with ``S Sᵀ = A`` (here the Cholesky factor, damped where ``A`` is
singular: SVD-LLM's whitening). The best rank-``r`` ``Ŵ`` in that norm is the truncated SVD in the
whitened basis::

    W S = U Σ Vᵀ,      Ŵ_r = L R,   L = U_r Σ_r^{1/2}  (out × r),   R = Σ_r^{1/2} V_rᵀ S⁻¹  (r × in)

and the dropped output energy is ``Σ_{i>r} σ_i²`` (the test's bound). Two forms use it:

- **split** ``W → L R``: the layer becomes ``MatMul(MatMul(x, Rᵀ), Lᵀ)``; it stores
  ``r (out + in)`` numbers instead of ``out · in``, so it is offered only for ranks below the
  break-even ``out · in / (out + in)``, and it also saves multiply-adds there.
- **compensate** ``W → Q(W) + L R``: the factors fitted to the whitened residual ``W − Q(W)`` of
  the weight's own quantization (RTN or GPTQ at its bits); the layer becomes
  ``MatMul(x, Q(W)) + MatMul(MatMul(x, Rᵀ), Lᵀ)``.

The factors are quantizable themselves (RTN per group along their input dimension) or float.
Quantizing ``R`` first and refitting ``L`` to it in closed form (``L = T A R_qᵀ (R_q A R_qᵀ)⁻¹``
for the target ``T``, ``W`` or the residual) absorbs most of ``R``'s rounding error; then ``L`` is
rounded. The allocator (:mod:`hessc.passes.allocate_bits`) scores every (form, rank, bits) item
with the same Taylor model as the plain quantization items and picks among all of them under one
budget; :class:`SplitLowRankPass` (``split-low-rank``) materializes the chosen
:class:`~hessc.ir.meta.RankPlan` s, computing the very factors the allocator scored, and leaves
ordinary MatMul weights with ordinary :class:`~hessc.ir.meta.QuantPlan` s for ``insert-qdq``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from hessc import progress
from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.ir import weights as qweights

logger = logging.getLogger(__name__)

__all__ = [
    "LOW_RANK_KEY",
    "MIN_DIM",
    "Factors",
    "SplitLowRankPass",
    "Whitened",
    "attach",
    "break_even_rank",
    "compensation_factors",
    "factor_group",
    "factor_plans",
    "split_factors",
    "supports",
]

LOW_RANK_KEY = "hessc.low_rank"
"""``model.meta`` key: ``{weight name: record}`` of the low-rank forms ``split-low-rank`` wrote."""

MIN_DIM = 64
"""Weights with fewer rows or columns than this are not offered low-rank forms (ALGORITHMS.md
§3(d): restrict to layers with ``min(m, n) ≥ 64``): their factors would save almost nothing."""

_RIDGES = (1e-8, 1e-3)
"""Ridges of the left factor's refit (:func:`_fit`), relative to the mean diagonal of its Gram matrix."""

_DAMP = (1e-8, 1e-6, 1e-4, 1e-2)
"""Relative dampings (of ``mean diag A``) tried in turn until ``A + λI`` has a Cholesky factor."""


def supports(ref: qweights.WeightRef) -> str | None:
    """Why a weight gets no low-rank form, or None when it can have one."""
    if ref.op not in ("MatMul", "Gemm") or ref.position != 1:
        return f"low-rank forms are for MatMul/Gemm weights, not {ref.op}"
    if ref.in_subgraph:
        return "read inside an If/Loop/Scan body"
    if ref.op == "Gemm" and ref.node.attributes.get_float("alpha", 1.0) != 1.0:
        return "a Gemm with alpha != 1"
    if len({_reader_kind(u.node, u.idx, ref.graph) for u in ref.value.uses()}) != 1:
        return "read by nodes of different kinds or graphs"
    if min(ref.matrix_shape) < MIN_DIM:
        return f"smaller than {MIN_DIM} in one dimension"
    return None


def _reader_kind(node: ir.Node, index: int, graph: ir.Graph) -> tuple:
    """What must agree among the readers of one weight for its factors to replace it in all."""
    return (node.op_type, index, node.graph is graph, node.attributes.get_int("transB", 0),
            node.attributes.get_float("alpha", 1.0))


def _readers(ref: qweights.WeightRef) -> list[ir.Node]:
    """Every node reading the weight (a weight shared by several layers, as in ALBERT, has many:
    its factors replace it in all of them)."""
    return [u.node for u in ref.value.uses()]


def break_even_rank(shape: tuple[int, int]) -> int:
    """The largest rank whose two factors hold fewer numbers than the weight."""
    out_dim, in_dim = shape
    return (out_dim * in_dim - 1) // (out_dim + in_dim)


def factor_group(rank: int, group_size: int) -> int:
    """The group size of the left factor, whose input dimension is the rank: the configured
    group, or the largest power of two ≤ rank (at least 16) when the rank is smaller."""
    if rank >= group_size:
        return group_size
    return max(16, 1 << (max(rank, 1).bit_length() - 1))


class Whitened:
    """The whitening ``S`` (``S Sᵀ = A``, lower triangular) of one input covariance, and its inverse.

    Args:
        a: ``A`` (in × in).
    """

    def __init__(self, a: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.float64)
        scale = max(float(np.mean(np.diag(a))), 1e-30)
        for damp in _DAMP:
            try:
                self.s = np.linalg.cholesky(a + damp * scale * np.eye(len(a)))
                break
            except np.linalg.LinAlgError:
                continue
        else:
            raise InputError("the input covariance of a layer is not positive semi-definite; recompute the statistics")
        self.damping = damp
        self.s_inv = np.linalg.inv(self.s)
        self.a = a

    def svd(self, target: np.ndarray, max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``U, σ, Vᵀ`` of ``target · S`` (thin; the top ``max_rank`` triples when given, by a
        seeded randomized range finder with two power iterations)."""
        m = np.asarray(target, dtype=np.float64) @ self.s
        if max_rank is None or 2 * (max_rank + 16) >= min(m.shape):
            # From the eigenvectors of the smaller Gram matrix (float64: the squared condition
            # number only blurs singular values far below the ones any rank keeps).
            small = m.shape[1] <= m.shape[0]
            values, vectors = np.linalg.eigh(m.T @ m if small else m @ m.T)
            order = np.argsort(values)[::-1]
            sigma = np.sqrt(np.clip(values[order], 0.0, None))
            vectors = vectors[:, order]
            inv = np.where(sigma > sigma[0] * 1e-12, 1.0 / np.maximum(sigma, 1e-300), 0.0) if sigma.size else sigma
            if small:
                return (m @ vectors) * inv, sigma, vectors.T
            return vectors, sigma, (vectors.T @ m) * inv[:, None]
        k = max_rank + 16
        rng = np.random.default_rng(0)
        basis = np.linalg.qr(m @ rng.standard_normal((m.shape[1], k)))[0]
        for _ in range(2):
            basis = np.linalg.qr(m @ (m.T @ basis))[0]
        u, sigma, vt = np.linalg.svd(basis.T @ m, full_matrices=False)
        return basis @ u, sigma, vt

    def factors(self, svd: tuple[np.ndarray, np.ndarray, np.ndarray], rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The balanced factors ``L`` (out × r), ``R`` (r × in) of the rank-``r`` truncation."""
        u, sigma, vt = svd
        root = np.sqrt(sigma[:rank])
        return u[:, :rank] * root, (root[:, None] * vt[:rank]) @ self.s_inv


_WHITENED: dict[bytes, Whitened] = {}


def whitened(a: np.ndarray) -> Whitened:
    """:class:`Whitened` of ``A``, shared by the layers that read one input (q/k/v, gate/up)."""
    key = hashlib.sha1(np.ascontiguousarray(a, dtype=np.float64).tobytes()).digest()
    if key not in _WHITENED:
        if len(_WHITENED) > 8:
            _WHITENED.clear()
        _WHITENED[key] = Whitened(a)
    return _WHITENED[key]


@dataclasses.dataclass(frozen=True)
class Factors:
    """The stored factors of a low-rank form and what they compute.

    Attributes:
        left: ``L`` (out × r) as stored (float32; rounded by ``insert-qdq`` when quantized).
        right: ``R`` (r × in) as stored.
        left_q: ``L_q``, what ``insert-qdq`` makes of ``left`` (float64).
        right_q: ``R_q`` (float64).
    """

    left: np.ndarray
    right: np.ndarray
    left_q: np.ndarray
    right_q: np.ndarray

    @property
    def product(self) -> np.ndarray:
        """``L_q R_q``, the matrix the factors compute once rounded (float64)."""
        return self.left_q @ self.right_q


def factor_plans(name: str, shape: tuple[int, int], rank: int, bits: int, group_size: int,
                 symmetric: bool) -> tuple[meta.QuantPlan | None, meta.QuantPlan | None]:
    """The :class:`~hessc.ir.meta.QuantPlan` s of the left and right factors of a weight of
    ``shape`` (out, in), as MatMul weights stored ``(r, out)`` and ``(in, r)``; None for float."""
    if bits >= 16:
        return None, None
    out_dim, in_dim = shape
    left = meta.QuantPlan(f"{name}.lr_left", "MatMul", (rank, out_dim), bits, factor_group(rank, group_size), symmetric,
                          "rtn", (out_dim, rank))
    right = meta.QuantPlan(f"{name}.lr_right", "MatMul", (in_dim, rank), bits, group_size, symmetric, "rtn",
                           (rank, in_dim))
    return left, right


def _rounded(matrix: np.ndarray, plan: meta.QuantPlan | None) -> np.ndarray:
    """What ``insert-qdq`` makes of a float32 factor (out × in view) under its plan."""
    if plan is None:
        return matrix.astype(np.float64)
    from hessc.passes import quantize

    q, in_dim = quantize.quantize_matrix(matrix, plan)
    return q.dequantize()[:, :in_dim].astype(np.float64)


def _fit(white: Whitened, svd, target: np.ndarray, rank: int, plans) -> Factors:
    left, right = white.factors(svd, rank)
    left_plan, right_plan = plans
    right32 = right.astype(np.float32)
    right_q = _rounded(right32, right_plan)
    if right_plan is None:
        return Factors(left.astype(np.float32), right32, left, right_q)
    target = np.asarray(target, np.float64)
    a_rt = white.a @ right_q.T  # (in × r)
    gram = right_q @ a_rt  # R_q A R_qᵀ
    cross = target @ a_rt  # T A R_qᵀ
    mean = max(float(np.trace(gram)) / rank, 1e-30)
    # L as it comes, and refitted to the rounded R: min tr((T − L R_q) A (T − L R_q)ᵀ) (+ a
    # ridge): the refit absorbs R's rounding, but a poorly conditioned R_q gives an L whose own
    # rounding costs more; the one that computes T best once rounded is kept, judged by
    # tr(L_q G L_qᵀ) − 2 tr(L_q Cᵀ) (the error up to the constant tr(T A Tᵀ)).
    best = None
    for trial in [left, *(np.linalg.solve(gram + ridge * mean * np.eye(rank), cross.T).T for ridge in _RIDGES)]:
        left32 = trial.astype(np.float32)
        left_q = _rounded(left32, left_plan)
        err = float(np.sum((left_q @ gram) * left_q) - 2 * np.sum(left_q * cross))
        if best is None or err < best[0]:
            best = (err, left32, left_q)
    return Factors(best[1], right32, best[2], right_q)


def split_factors(matrix: np.ndarray, a: np.ndarray, ranks: Sequence[int] | None, bits: Sequence[int],
                  group_size: int, symmetric: bool, name: str = "w",
                  fractions: Sequence[float] = ()) -> dict[tuple[int, int], Factors]:
    """The split ``W ≈ L R`` at each (factor bits, rank), factors at those bits (32: float).

    ``ranks=None`` offers :func:`ranks_for` at ``fractions`` of the break-even rank and the
    whitened numerical ranks (:data:`ENERGY_SHARES`, :func:`energy_ranks`) below the break-even.
    """
    white = whitened(a)
    svd = white.svd(matrix)
    shape = tuple(matrix.shape)
    if ranks is None:
        top = break_even_rank(shape)
        ranks = sorted(set(ranks_for(shape, fractions)) | {r for r in energy_ranks(svd[1], ENERGY_SHARES) if r <= top})
    return {(b, r): _fit(white, svd, matrix, r, factor_plans(name, shape, r, b, group_size, symmetric))
            for b in bits for r in ranks}


ENERGY_SHARES = (0.9, 0.99, 0.999)
"""Shares of the whitened output energy ``Σ σ_i²`` whose numerical ranks are offered as split
ranks (a weight of rank r plus noise gets rank r)."""


def energy_ranks(sigma: np.ndarray, shares: Sequence[float], multiple: int = 8) -> list[int]:
    """The smallest ranks keeping each share of ``Σ σ_i²``, rounded up to ``multiple``."""
    energy = np.cumsum(np.asarray(sigma, np.float64) ** 2)
    if energy.size == 0 or energy[-1] <= 0:
        return []
    out = set()
    for share in shares:
        r = int(np.searchsorted(energy, share * energy[-1]) + 1)
        out.add(min(len(sigma), -(-r // multiple) * multiple))
    return sorted(out)


def compensation_factors(matrix: np.ndarray, quantized: np.ndarray, a: np.ndarray, ranks: Sequence[int], bits: int,
                         group_size: int, symmetric: bool, name: str = "w") -> dict[int, Factors]:
    """The compensation ``W − Q(W) ≈ L R`` at each rank, factors at ``bits`` (32: float)."""
    white = whitened(a)
    residual = np.asarray(matrix, np.float64) - quantized
    svd = white.svd(residual, max(ranks))
    shape = tuple(matrix.shape)
    return {r: _fit(white, svd, residual, r, factor_plans(name, shape, r, bits, group_size, symmetric))
            for r in ranks}


def attach(model: ir.Model, overrides: Sequence[Sequence[Any]], group_size: int, symmetric: bool) -> int:
    """Puts the allocation record's low-rank choices (``[name, form, rank, factor_bits]``) back
    on a planned model's weights, for a replay; returns how many were attached."""
    wanted = {str(name): (str(form), int(rank), int(bits)) for name, form, rank, bits in overrides}
    count = 0
    for ref in qweights.iter_weights(model):
        if ref.name in wanted and supports(ref) is None:
            form, rank, bits = wanted[ref.name]
            ref.value.meta[meta.RANK_KEY] = meta.RankPlan(ref.name, form, rank, bits, group_size, symmetric)
            count += 1
    return count


class SplitLowRankPass(ir.passes.InPlacePass):
    """Materializes each weight's :class:`~hessc.ir.meta.RankPlan` (module docstring).

    Runs after ``allocate-bits`` (which chose the forms) and before ``insert-qdq`` (which rounds
    the factors and the compensated weights under their plans). The factors are new MatMul
    initializers ``<weight>_lr_right`` (in × r) and ``<weight>_lr_left`` (r × out) with their own
    QuantPlans; a split weight is removed, a compensated one keeps its plan. The records go to
    ``model.meta[LOW_RANK_KEY]``.

    Args:
        whiten: fit in the input covariance's metric (the allocator's); False: plain SVD
            (``A = I``), a baseline.
    """

    def __init__(self, whiten: bool = True) -> None:
        super().__init__()
        self.whiten = whiten

    def requires(self, model: ir.Model) -> None:
        for ref in self._planned(model):
            plan: meta.RankPlan = ref.value.meta[meta.RANK_KEY]
            why = supports(ref)
            if why is not None:
                raise ir.passes.PreconditionError(f"{ref.name}: no low-rank form here ({why})")
            stats = ref.value.meta.get(meta.HESSIAN_KEY)
            if self.whiten and (stats is None or getattr(stats, "a", None) is None):
                raise ir.passes.PreconditionError(
                    f"{ref.name}: a low-rank form is fitted in the input covariance's metric; run annotate-hessian first")
            if plan.rank > min(ref.matrix_shape):
                raise ir.passes.PreconditionError(
                    f"{ref.name}: rank {plan.rank} exceeds the weight's smaller dimension {min(ref.matrix_shape)}")
            if plan.form == "compensate" and ref.value.meta.get(meta.QUANT_KEY) is None:
                raise ir.passes.PreconditionError(
                    f"{ref.name}: compensation fits the residual of the weight's quantization, and it has no QuantPlan")

    @staticmethod
    def _planned(model: ir.Model) -> list[qweights.WeightRef]:
        seen: set[int] = set()
        out = []
        for ref in qweights.iter_weights(model):
            if ref.value.meta.get(meta.RANK_KEY) is not None and id(ref.value) not in seen:
                seen.add(id(ref.value))
                out.append(ref)
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        planned = self._planned(model)
        records = dict(model.meta.get(LOW_RANK_KEY) or {})
        for i, ref in enumerate(planned):
            records[ref.name] = self._materialize(ref)
            progress.report("low-rank", i + 1, len(planned))
        if planned:
            model.meta[LOW_RANK_KEY] = records
        return ir.passes.PassResult(model, bool(planned))

    def _materialize(self, ref: qweights.WeightRef) -> dict[str, Any]:
        from hessc.passes import hessian, quantize

        plan: meta.RankPlan = ref.value.meta.pop(meta.RANK_KEY)
        a = ref.value.meta[meta.HESSIAN_KEY].a if self.whiten else np.eye(ref.matrix_shape[1])
        matrix = ref.matrix().astype(np.float64)
        if plan.form == "split":
            factors = split_factors(matrix, a, [plan.rank], [plan.factor_bits], plan.group_size,
                                    plan.symmetric, ref.name)[(plan.factor_bits, plan.rank)]
        else:
            qplan: meta.QuantPlan = ref.value.meta[meta.QUANT_KEY]
            h = hessian.hessian_for(ref) if qplan.method == "gptq" else None
            g = hessian.gradient_for(ref) if qplan.method == "rtn-grad" else None
            q, in_dim = quantize.quantize_matrix(ref.matrix(), qplan, h, g)
            factors = compensation_factors(matrix, q.dequantize()[:, :in_dim].astype(np.float64), a,
                                           [plan.rank], plan.factor_bits, plan.group_size, plan.symmetric,
                                           ref.name)[plan.rank]
        left_plan, right_plan = factor_plans(ref.name, ref.matrix_shape, plan.rank, plan.factor_bits,
                                             plan.group_size, plan.symmetric)
        graph = ref.graph
        base = ref.value.name
        dtype = ref.value.dtype.numpy()
        right = frontend.new_initializer(graph, f"{base}_lr_right", np.ascontiguousarray(factors.right.T.astype(dtype)))
        # The left factor replaces W in its own layout (Gemm with transB=1 stores (out, r)).
        split_gemm = plan.form == "split" and ref.op == "Gemm" and not ref.transposed
        left_array = factors.left if split_gemm else factors.left.T
        left = frontend.new_initializer(graph, f"{base}_lr_left", np.ascontiguousarray(left_array.astype(dtype)))
        for value, side, fplan in ((left, "left", left_plan), (right, "right", right_plan)):
            value.meta[meta.WEIGHT_NAME_KEY] = f"{ref.name}.lr_{side}"
            if fplan is not None:
                value.meta[meta.QUANT_KEY] = fplan
        for k, node in enumerate(_readers(ref)):
            tag = base if k == 0 else f"{base}_{k}"
            inner = ir.node("MatMul", [node.inputs[0], right], name=f"{tag}_lr_in", num_outputs=1)
            inner.outputs[0].name = f"{tag}_lr_t"
            inner.outputs[0].type = ir.TensorType(ref.value.dtype)
            graph.insert_before(node, inner)
            if plan.form == "split":
                node.replace_input_with(0, inner.outputs[0])
                node.replace_input_with(1, left)
            else:
                outer = ir.node("MatMul", [inner.outputs[0], left], name=f"{tag}_lr_out", num_outputs=1)
                outer.outputs[0].name = f"{tag}_lr_c"
                outer.outputs[0].type = ir.TensorType(ref.value.dtype)
                graph.insert_after(node, outer)
                _add_to_output(graph, node, outer, tag)
        if plan.form == "split" and not ref.value.uses() and ref.value.name in graph.initializers:
            graph.initializers.pop(ref.value.name)
        out_dim, in_dim = ref.matrix_shape
        stored = plan.rank * (out_dim + in_dim)
        bytes_ = 4 * stored if left_plan is None else sum(quantize.stored_bytes(p, 4) for p in (left_plan, right_plan))
        logger.debug("%s: %s at rank %d (%s factors)", ref.name, plan.form, plan.rank,
                     "float" if left_plan is None else f"{plan.factor_bits}-bit")
        return {
            "form": plan.form, "rank": plan.rank, "factor_bits": plan.factor_bits, "shape": [out_dim, in_dim],
            "factors": [f"{ref.name}.lr_left", f"{ref.name}.lr_right"],
            "factor_params": stored, "params_saved": out_dim * in_dim - stored if plan.form == "split" else -stored,
            "macs_per_row": stored, "macs_per_row_before": out_dim * in_dim,
            "whitening_damping": whitened(a).damping if self.whiten else None, "factor_bytes_portable": bytes_,
        }


def storage_correction(records: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """What the low-rank forms change in a quantized-storage count (bytes, weights) taken from
    the stored tensors (:func:`hessc.runtime.lower.quantized_storage`), so that effective bits
    stay per weight of the original model: a split weight's ``out·in`` weights replace its
    factors' ``r (out + in)`` elements; compensation factors add bytes, not weights; float
    factors are not among the quantized tensors, so their bytes (``float_factor_bytes``, as
    stored) are added here.
    """
    extra_bytes = extra_numel = 0
    for r in records.values():
        original = r["shape"][0] * r["shape"][1]
        factors = r["factor_params"]
        if r["factor_bits"] >= 16:
            extra_bytes += int(r.get("float_factor_bytes", 4 * factors))
            extra_numel += original if r["form"] == "split" else 0
        else:
            extra_numel += original - factors if r["form"] == "split" else -factors
    return extra_bytes, extra_numel


def _add_to_output(graph: ir.Graph, node: ir.Node, branch: ir.Node, base: str) -> None:
    """``y → Add(y, branch)`` for every reader of ``node``'s output (graph outputs included)."""
    y = node.outputs[0]
    add = ir.node("Add", [y, branch.outputs[0]], name=f"{base}_lr_add", num_outputs=1)
    add.outputs[0].type = y.type
    add.outputs[0].shape = y.shape
    graph.insert_after(branch, add)
    for use in list(y.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, add.outputs[0])
    outputs = list(graph.outputs)
    if y in outputs:
        name = y.name
        y.name = f"{name}_lr_base"
        add.outputs[0].name = name
        for i, v in enumerate(outputs):
            if v is y:
                graph.outputs[i] = add.outputs[0]
    else:
        add.outputs[0].name = f"{y.name}_lr_sum"


def ranks_for(shape: tuple[int, int], fractions: Sequence[float], multiple: int = 16) -> list[int]:
    """Split ranks at ``fractions`` of the break-even rank, rounded down to ``multiple``."""
    top = break_even_rank(shape)
    out = sorted({int(math.floor(f * top / multiple)) * multiple for f in fractions})
    return [r for r in out if 0 < r <= top]
