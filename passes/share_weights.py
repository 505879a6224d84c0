r"""Cross-layer weight sharing as graph colouring (Geo-Sharing, ALGORITHMS.md §3(b)).

Weights of one *role* (the same shape and the same place in their block, found from the graph:
:func:`roles`) are the nodes of a graph. A colour ``c`` (a set of layers) shares one basis
``B_c`` (k × in) and keeps private coefficients ``C_l`` (out × k): ``W_l ≈ C_l B_c``, so the layer
becomes ``MatMul(MatMul(x, B_cᵀ), C_lᵀ)`` and ``B_c`` is one initializer read by every layer of
the colour (stored once). A colour of ``s`` layers costs ``k (in + s · out)`` numbers.

The basis of a colour is the whitened SVD of its stacked weights (Basis Sharing): with
``S Sᵀ = Σ_{l∈c} A_l``, the top ``k`` right singular vectors of ``[W_1; …; W_s] S`` give
``B = V_kᵀ S⁻¹``; then each ``C_l = W_l A_l Bᵀ (B A_l Bᵀ)⁻¹`` is refitted in its own layer's
metric. A colour's cost is the loss change the Taylor model predicts for its layers::

    Φ(c) = Σ_{l∈c} ⟨∇_{W_l} L, δ_l⟩ + ½ tr(G_l δ_l A_l δ_lᵀ),     δ_l = C_l B_c − W_l

(the allocator's prediction, :func:`hessc.passes.allocate_bits.predict_delta_loss`: K-FAC where
``G`` was measured; the curvature energy of the change, which is what projecting onto the
high-curvature eigen-directions approximates). Every layer starts as its own colour at the rank
that removes the asked share of its parameters (per-layer whitened SVD, SVD-LLM); then, greedily,
the two colours whose merge at the same parameter count (the merged colour's rank re-solved)
lowers ``Φ`` most are merged, **adjacent or not**, while a merge lowers it and every layer of the
merged colour stays inside the trust region (relative layer-output error ``≤ trust_radius``).
Costs are fitted on one half of the calibration's ``A`` and scored on the other where both were
measured. ``adjacent_only`` restricts merges to colours that hold consecutive layers (the Basis
Sharing baseline).

The new weights carry statistics that stay true: each ``C_l`` the projected ones
(:meth:`~hessc.ir.meta.HessianStats.projected`: it reads ``B x``); a shared ``B`` none (it has
several inputs), so an allocator keeps it on the uniform plan.
"""

from __future__ import annotations

import dataclasses
import itertools
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

__all__ = ["SHARE_KEY", "ShareConfig", "ShareWeightsPass", "roles"]

SHARE_KEY = "hessc.sharing"
"""``model.meta`` key: the sharing record (colours, ranks, predicted loss changes)."""

TRUST_RADIUS = 0.35
"""Largest relative layer-output error ``√(tr(δ A δᵀ) / tr(W A Wᵀ))`` a merged colour may give
any of its layers (ALGORITHMS.md §3(b): τ = 0.35)."""


@dataclasses.dataclass(frozen=True)
class ShareConfig:
    """Configuration of :class:`ShareWeightsPass`.

    Attributes:
        reduction: the share of each role's parameters removed (0 < reduction < 1).
        adjacent_only: merge only colours holding consecutive layers (Basis Sharing).
        trust_radius: see :data:`TRUST_RADIUS`.
        max_colour: the most layers one colour may hold.
        neighbours: merges of a colour are scored only with the colours whose layers' weight
            subspaces overlap its own most (this many; :func:`_overlaps`), so a role of L layers
            costs about ``L · neighbours`` fits, not ``L²/2``.
    """

    reduction: float = 0.2
    adjacent_only: bool = False
    trust_radius: float = TRUST_RADIUS
    max_colour: int = 8
    neighbours: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.reduction < 1:
            raise InputError(f"--share {self.reduction}: give the share of parameters to remove, between 0 and 1")
        if self.max_colour < 1:
            raise InputError(f"max_colour {self.max_colour} must be at least 1")
        if self.neighbours < 1:
            raise InputError(f"neighbours {self.neighbours} must be at least 1")
        if not self.trust_radius > 0:
            raise InputError(f"trust radius {self.trust_radius} must be positive")


def _signature(ref: qweights.WeightRef, depth: int = 2) -> tuple:
    """What places a layer in its block: the ops producing its input (``depth`` back along the
    first inputs), the shapes of the weights reading the same input, and its ordinal among those
    of its own shape (q, then k, then v)."""
    chain = []
    value = ref.node.inputs[0]
    for _ in range(depth):
        producer = value.producer() if value is not None else None
        if producer is None:
            chain.append("input")
            break
        chain.append(producer.op_type)
        value = producer.inputs[0] if producer.inputs else None
    x = ref.node.inputs[0]
    siblings = [u.node for u in x.uses() if u.node.op_type in ("MatMul", "Gemm") and u.idx == 0]
    shapes = []
    same = []
    for node in siblings:
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if w is not None and w.const_value is not None:
            shapes.append(tuple(w.const_value.shape))
            if tuple(w.const_value.shape) == ref.stored_shape:
                same.append(node)
    ordinal = next((i for i, n in enumerate(same) if n is ref.node), 0)
    return ref.op, ref.matrix_shape, tuple(chain), tuple(sorted(shapes)), ordinal


def roles(model: ir.Model) -> list[list[qweights.WeightRef]]:
    """The eligible MatMul/Gemm weights grouped by role, each role in graph order (two or more
    layers; read once, not tied, with curvature statistics)."""
    from hessc.passes import low_rank, quantize

    groups = quantize.weight_groups(list(qweights.iter_weights(model)))
    order = {id(n): i for i, n in enumerate(model.graph)}
    by_role: dict[tuple, list[qweights.WeightRef]] = {}
    for g in groups:
        ref = g.lead
        if g.tied or len(g.refs) != 1 or low_rank.supports(ref) is not None or ref.graph is not model.graph:
            continue
        stats = ref.value.meta.get(meta.HESSIAN_KEY)
        if stats is None or getattr(stats, "a", None) is None:
            continue
        by_role.setdefault(_signature(ref), []).append(ref)
    out = [sorted(refs, key=lambda r: order[id(r.node)]) for refs in by_role.values() if len(refs) >= 2]
    return sorted(out, key=lambda refs: order[id(refs[0].node)])


@dataclasses.dataclass
class _Colour:
    layers: tuple[int, ...]  # indices into the role
    rank: int
    basis: np.ndarray  # (k × in), float64
    coefficients: list[np.ndarray]  # (out × k) per layer
    cost: float  # Φ
    errors: list[float]  # relative layer-output error per layer


class _Role:
    """The layers of one role with their matrices and statistics; fits and scores colours."""

    def __init__(self, refs: Sequence[qweights.WeightRef]) -> None:
        self.refs = list(refs)
        self.matrices = [r.matrix().astype(np.float64) for r in refs]
        self.stats = [r.value.meta[meta.HESSIAN_KEY] for r in refs]
        self.out_dim, self.in_dim = refs[0].matrix_shape
        fits = [getattr(s, "a_fit", None) for s in self.stats]
        checks = [getattr(s, "a_check", None) for s in self.stats]
        cross = all(f is not None for f in fits) and all(c is not None for c in checks)
        self.fit_a = fits if cross else [s.a for s in self.stats]
        self.scored = [dataclasses.replace(s, a=c) for s, c in zip(self.stats, checks)] if cross else self.stats

    def params(self, size: int, rank: int) -> int:
        return rank * (self.in_dim + size * self.out_dim)

    def rank_for(self, size: int, params: float) -> int:
        return max(1, min(self.in_dim, int(params // (self.in_dim + size * self.out_dim))))

    def fit(self, layers: tuple[int, ...], rank: int, a: Sequence[np.ndarray] | None = None) -> _Colour:
        from hessc.passes import allocate_bits, low_rank

        a = self.fit_a if a is None else a
        white = low_rank.Whitened(sum(a[i] for i in layers))
        stacked = np.concatenate([self.matrices[i] for i in layers]) @ white.s
        values, vectors = np.linalg.eigh(stacked.T @ stacked)
        top = vectors[:, np.argsort(values)[::-1][:rank]]  # right singular vectors of W S
        basis = top.T @ white.s_inv  # (k × in)
        coefficients, cost, errors = [], 0.0, []
        for i in layers:
            ab = a[i] @ basis.T
            gram = basis @ ab
            gram += 1e-10 * max(float(np.trace(gram)) / rank, 1e-30) * np.eye(rank)
            c = np.linalg.solve(gram, (self.matrices[i] @ ab).T).T
            delta = c @ basis - self.matrices[i]
            scored = self.scored[i]
            estimator = allocate_bits.resolve_estimator("kfac", scored, None)
            loss, _ = allocate_bits.predict_delta_loss(scored, delta, estimator)
            base = allocate_bits._output_energy(scored.a, self.matrices[i])
            errors.append(allocate_bits._perturbation(scored.a, delta, base))
            coefficients.append(c)
            cost += loss
        return _Colour(layers, rank, basis, coefficients, cost, errors)


def _overlaps(role: _Role, rank: int) -> np.ndarray:
    """``‖Q_iᵀ Q_j‖²_F / r`` for orthonormal bases ``Q`` of the input directions each layer's
    whitened rank-``r`` factor reads: 1 where two layers read the same directions, near
    ``r / in`` where they are unrelated. Cheap (one SVD per layer), it only decides which merges
    are scored."""
    from hessc.passes import low_rank

    bases = []
    for m, a in zip(role.matrices, role.fit_a):
        white = low_rank.whitened(a)
        _, _, vt = white.svd(m)
        # The input directions the layer's rank-r factor reads, ``R = V_rᵀ S⁻¹``, orthonormalized.
        bases.append(np.linalg.qr(white.s_inv.T @ vt[:rank].T)[0])
    n = len(bases)
    out = np.ones((n, n))
    for i, j in itertools.combinations(range(n), 2):
        out[i, j] = out[j, i] = float(np.sum((bases[i].T @ bases[j]) ** 2)) / rank
    return out


class ShareWeightsPass(ir.passes.InPlacePass):
    """Colours each role's layers and rewrites every colour into one shared basis and private
    coefficients (module docstring); records the plan under ``model.meta[SHARE_KEY]``."""

    def __init__(self, config: ShareConfig) -> None:
        super().__init__()
        self.config = config

    def requires(self, model: ir.Model) -> None:
        refs = list(qweights.iter_weights(model))
        if not any(r.value.meta.get(meta.HESSIAN_KEY) is not None for r in refs):
            raise ir.passes.PreconditionError(
                "share-weights scores colours by the curvature statistics; run annotate-hessian with calibration first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = roles(model)
        records = []
        for i, refs in enumerate(found):
            role = _Role(refs)
            colours = self._colour(role)
            records.append(self._materialize(model, role, colours, i))
            progress.report("share", i + 1, len(found))
        before = sum(r["params_before"] for r in records)
        after = sum(r["params_after"] for r in records)
        model.meta[SHARE_KEY] = {
            "reduction_asked": self.config.reduction, "adjacent_only": self.config.adjacent_only,
            "params_before": before, "params_after": after,
            "predicted_delta_loss": float(sum(r["predicted_delta_loss"] for r in records)), "roles": records,
        }
        logger.info("share-weights: %d roles, %d -> %d parameters, %d shared bases", len(records), before, after,
                    sum(1 for r in records for c in r["colours"] if len(c["layers"]) > 1))
        return ir.passes.PassResult(model, bool(records))

    def _colour(self, role: _Role) -> list[_Colour]:
        config = self.config
        n = len(role.refs)
        start_params = (1 - config.reduction) * role.out_dim * role.in_dim
        rank = role.rank_for(1, start_params)
        colours = [role.fit((i,), rank) for i in range(n)]
        budget = {c.layers: role.params(1, rank) for c in colours}
        cache: dict[tuple, _Colour | None] = {}

        def merged(x: _Colour, y: _Colour) -> _Colour | None:
            layers = tuple(sorted(x.layers + y.layers))
            if layers not in cache:
                params = budget[x.layers] + budget[y.layers]
                candidate = role.fit(layers, role.rank_for(len(layers), params))
                ok = len(layers) <= config.max_colour and max(candidate.errors) <= config.trust_radius
                cache[layers] = candidate if ok else None
            return cache[layers]

        def adjacent(x: _Colour, y: _Colour) -> bool:
            return min(abs(i - j) for i in x.layers for j in y.layers) == 1

        overlap = _overlaps(role, rank)

        def near(x: _Colour, y: _Colour) -> bool:
            """y among x's closest colours by subspace overlap, or x among y's."""
            def closest(c: _Colour) -> set[tuple[int, ...]]:
                others = [o for o in colours if o is not c]
                score = {o.layers: max(overlap[i, j] for i in c.layers for j in o.layers) for o in others}
                return set(sorted(score, key=score.get, reverse=True)[: config.neighbours])
            return y.layers in closest(x) or x.layers in closest(y)

        while len(colours) > 1:
            best = None
            for x, y in itertools.combinations(colours, 2):
                if config.adjacent_only and not adjacent(x, y):
                    continue
                if not config.adjacent_only and not near(x, y):
                    continue
                m = merged(x, y)
                if m is None:
                    continue
                gain = m.cost - x.cost - y.cost
                if gain < 0 and (best is None or gain < best[0]):
                    best = (gain, x, y, m)
            if best is None:
                break
            _, x, y, m = best
            budget[m.layers] = budget.pop(x.layers) + budget.pop(y.layers)
            colours = [c for c in colours if c is not x and c is not y] + [m]
        return sorted(colours, key=lambda c: c.layers)

    def _materialize(self, model: ir.Model, role: _Role, colours: list[_Colour], index: int) -> dict[str, Any]:
        graph = model.graph
        dtype = role.refs[0].value.dtype.numpy()
        record_colours = []
        for ci, colour in enumerate(colours):
            # The full-precision A (not a half) for the stored factors: refit on it.
            final = role.fit(colour.layers, colour.rank, [s.a for s in role.stats])
            shared_name = f"shared_basis_{index}_{ci}"
            basis = frontend.new_initializer(graph, shared_name, np.ascontiguousarray(final.basis.T.astype(dtype)))
            basis.meta[meta.WEIGHT_NAME_KEY] = shared_name
            names = []
            for layer, coeff in zip(colour.layers, final.coefficients):
                ref = role.refs[layer]
                node = ref.node
                base = ref.value.name
                inner = ir.node("MatMul", [node.inputs[0], basis], name=f"{base}_sh_in", num_outputs=1)
                inner.outputs[0].name = f"{base}_sh_t"
                inner.outputs[0].type = ir.TensorType(ref.value.dtype)
                graph.insert_before(node, inner)
                stored = coeff if (ref.op == "Gemm" and not ref.transposed) else coeff.T
                c = frontend.new_initializer(graph, f"{base}_sh_coeff", np.ascontiguousarray(stored.astype(dtype)))
                c.meta[meta.WEIGHT_NAME_KEY] = f"{ref.name}.coefficients"
                stats = ref.value.meta.get(meta.HESSIAN_KEY)
                if stats is not None:
                    c.meta[meta.HESSIAN_KEY] = stats.projected(final.basis)
                node.replace_input_with(0, inner.outputs[0])
                node.replace_input_with(1, c)
                if not ref.value.uses() and ref.value.name in graph.initializers:
                    graph.initializers.pop(ref.value.name)
                names.append(ref.name)
            record_colours.append({
                "layers": names, "rank": colour.rank, "basis": shared_name,
                "params": role.params(len(colour.layers), colour.rank),
                "predicted_delta_loss": colour.cost, "max_relative_error": round(max(colour.errors), 4),
            })
        return {
            "shape": [role.out_dim, role.in_dim], "layers": [r.name for r in role.refs],
            "params_before": len(role.refs) * role.out_dim * role.in_dim,
            "params_after": sum(c["params"] for c in record_colours),
            "predicted_delta_loss": float(sum(c["predicted_delta_loss"] for c in record_colours)),
            "colours": record_colours,
        }
