r"""Grouped (multiple-choice) knapsack: pick one configuration per layer under a budget.

Each group ``l`` (a layer, or a (layer, tensor) pair) offers items ``b`` with a cost ``w_l(b)``
(bytes, bits, BOPs) and a predicted loss change ``c_l(b)``. Exactly one item is taken per group::

    min Σ_l c_l(b_l)   s.t.   Σ_l w_l(b_l) ≤ B                       (solve_knapsack)
    min Σ_l w_l(b_l)   s.t.   Σ_l c_l(b_l) ≤ C_max                   (solve_min_cost, "lossless")

Both are solved by one exact dynamic programme over a discretised cost axis. Costs are measured
above the cheapest item of each group (so the mandatory part costs no resolution) and rounded *up*
to whole quanta ``q``; with ``u_l(b) = ⌈(w_l(b) − min_b w_l)/q⌉`` and
``S = ⌊(B − Σ_l min_b w_l)/q⌋``::

    D_0[s] = 0 if s = 0 else ∞,     D_l[s] = min_b D_{l−1}[s − u_l(b)] + c_l(b)

and the answer is ``min_{s ≤ S} D_L[s]``, traced back through the stored argmins. Because
``Σ ⌈x_l⌉ ≤ S`` implies ``Σ x_l ≤ S``, a solution never exceeds the budget; it is optimal among all
selections whose cost is at most ``B − L·q`` (and exactly optimal when every cost is a multiple of
``q``, e.g. integer bytes with ``q = 1``). Each group is one vectorised ``min`` over
``(items × states)``, so ``O(L · |items| · S)`` work in numpy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STATES",
    "InfeasibleBudget",
    "InfeasibleLoss",
    "Item",
    "default_quantum",
    "solve_knapsack",
    "solve_min_cost",
]

DEFAULT_STATES = 4000
"""Number of cost quanta the default quantum divides the free cost range into."""

_SNAP = 1e-9
"""Relative tolerance under which a cost/quantum ratio counts as a whole number."""

_MAX_LEVELS = 10_000_000
"""Refuse DP tables with more cost levels than this (an explicit quantum far too fine)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One candidate configuration of a group.

    Attributes:
        key: identifies the choice (e.g. ``("layer3", 4)``).
        cost: what it spends of the budget (bytes, bits, BOPs); any real number.
        loss: predicted loss change when it is chosen (may be negative).
        payload: anything the caller wants back with the choice.
    """

    key: Hashable
    cost: float
    loss: float
    payload: Any = None


class InfeasibleBudget(ValueError):
    """Even the cheapest item of every group exceeds the budget.

    Attributes:
        budget: the budget asked for.
        min_cost: the smallest feasible total cost.
    """

    def __init__(self, budget: float, min_cost: float) -> None:
        self.budget = budget
        self.min_cost = min_cost
        super().__init__(
            f"budget {budget:g} is below the smallest achievable cost {min_cost:g}; "
            "raise the budget or offer cheaper choices"
        )


class InfeasibleLoss(ValueError):
    """No selection keeps the total loss within the bound.

    Attributes:
        max_loss: the bound asked for.
        min_loss: the smallest achievable total loss.
    """

    def __init__(self, max_loss: float, min_loss: float) -> None:
        self.max_loss = max_loss
        self.min_loss = min_loss
        super().__init__(
            f"loss bound {max_loss:g} is below the smallest achievable loss {min_loss:g}; "
            "relax the bound or offer more accurate choices"
        )


def _arrays(groups: Sequence[Sequence[Item]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    costs, losses = [], []
    for index, group in enumerate(groups):
        if len(group) == 0:
            raise ValueError(f"group {index} has no items; every group needs at least one choice")
        c = np.array([float(item.cost) for item in group], dtype=np.float64)
        v = np.array([float(item.loss) for item in group], dtype=np.float64)
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(v))):
            raise ValueError(
                f"group {index} has a non-finite cost or loss; leave impossible choices out instead"
            )
        costs.append(c)
        losses.append(v)
    return costs, losses


def _units(x: np.ndarray | float, quantum: float, up: bool, cap: int) -> np.ndarray:
    """Whole quanta in ``x``, rounded up (costs) or down (budgets), snapping near-integers.

    Results are clipped to ``cap`` (a level past the last state: unreachable) before the integer
    cast, so a tiny quantum cannot overflow.
    """
    r = np.asarray(x, dtype=np.float64) / quantum
    near = np.rint(r)
    snapped = np.abs(r - near) <= _SNAP * np.maximum(1.0, np.abs(r))
    rounded = np.where(snapped, near, np.ceil(r) if up else np.floor(r))
    return np.clip(rounded, 0, cap).astype(np.int64)


def _grid(increments: np.ndarray, max_decimals: int = 6) -> float | None:
    """The coarsest decimal grid ``gcd · 10^-k`` holding every increment, or None."""
    nonzero = increments[increments > 0]
    if nonzero.size == 0:
        return None
    for k in range(max_decimals + 1):
        scaled = nonzero * 10.0**k
        if scaled.max() > 2.0**52:
            return None
        near = np.rint(scaled)
        if np.all(near >= 1.0) and np.all(np.abs(scaled - near) <= _SNAP * scaled):
            return float(np.gcd.reduce(near.astype(np.int64))) / 10.0**k
    return None


def default_quantum(
    groups: Sequence[Sequence[Item]], budget: float | None = None, states: int = DEFAULT_STATES
) -> float:
    """The cost resolution the solvers use when no quantum is given.

    The free range is ``R = Σ_l (max w_l − min w_l)``, capped at ``budget − Σ_l min w_l`` when a
    budget is given. If every cost increment ``w_l(b) − min w_l`` lies on a common grid
    ``gcd · 10^-k`` (``k ≤ 6``: integer bytes, decimal costs) with at most ``states`` points in
    ``R``, that grid is used and the solvers are exact; otherwise ``q = R / states``.

    Args:
        groups: the items, one sequence per group.
        budget: the budget of :func:`solve_knapsack`, or None for :func:`solve_min_cost`.
        states: the number of quanta to divide the free range into.

    Returns:
        A positive quantum.
    """
    costs, _ = _arrays(groups)
    base = sum(float(c.min()) for c in costs)
    free = sum(float(c.max() - c.min()) for c in costs)
    if budget is not None:
        free = min(free, max(budget - base, 0.0))
    if free <= 0.0:
        return 1.0
    grid = _grid(np.concatenate([c - c.min() for c in costs]))
    if grid is not None and free / grid <= states:
        return grid
    quantum = free / states
    return quantum if quantum > 0.0 else free  # a subnormal free range: one quantum spans it


def _dp(
    units: list[np.ndarray], losses: list[np.ndarray], n_states: int
) -> tuple[np.ndarray, np.ndarray]:
    """``D_L`` over ``n_states`` cost levels, and the argmin item per (group, level)."""
    best = np.full(n_states, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(units), n_states), dtype=np.int16)
    for g, (u, v) in enumerate(zip(units, losses)):
        cand = np.full((len(u), n_states), np.inf)
        for i, (ui, vi) in enumerate(zip(u, v)):
            if ui < n_states:
                cand[i, ui:] = best[: n_states - ui] + vi
        choice[g] = np.argmin(cand, axis=0)
        best = cand[choice[g], np.arange(n_states)]
    return best, choice


def _trace(units: list[np.ndarray], choice: np.ndarray, level: int) -> list[int]:
    picks = []
    for g in range(len(units) - 1, -1, -1):
        i = int(choice[g, level])
        picks.append(i)
        level -= int(units[g][i])
    assert level == 0
    return picks[::-1]


def _shifted_units(costs: list[np.ndarray], quantum: float, cap: int) -> list[np.ndarray]:
    return [_units(c - c.min(), quantum, up=True, cap=cap) for c in costs]


def solve_knapsack(
    groups: Sequence[Sequence[Item]], budget: float, quantum: float | None = None
) -> list[Item]:
    """Minimise the total loss, one item per group, with total cost at most ``budget``.

    Args:
        groups: the items, one non-empty sequence per group.
        budget: the cost ceiling; the result never exceeds it (up to a relative 1e-9).
        quantum: the cost resolution; None picks :func:`default_quantum` (≤ 4000 levels).

    Returns:
        The chosen item of each group, in group order.

    Raises:
        InfeasibleBudget: the cheapest items together already cost more than ``budget``.
        ValueError: an empty group, a non-finite cost or loss, or a non-positive quantum.
    """
    if len(groups) == 0:
        return []
    costs, losses = _arrays(groups)
    base = sum(float(c.min()) for c in costs)
    if base > budget + _SNAP * max(1.0, abs(budget)):
        raise InfeasibleBudget(budget, base)
    q = default_quantum(groups, budget) if quantum is None else float(quantum)
    if not q > 0:
        raise ValueError(f"quantum must be positive, got {quantum}")
    slack = int(_units(budget - base, q, up=False, cap=_MAX_LEVELS + 1))
    units = _shifted_units(costs, q, cap=_MAX_LEVELS + 1)
    n_states = min(slack, int(sum(int(u.max()) for u in units))) + 1
    if n_states > _MAX_LEVELS:
        raise ValueError(f"quantum {q:g} needs {n_states} cost levels; use a coarser quantum")
    best, choice = _dp(units, losses, n_states)
    level = int(np.argmin(best))  # first minimum: the cheapest of equally good selections
    picks = _trace(units, choice, level)
    logger.debug(
        "knapsack: %d groups, %d levels of %g, loss %g", len(groups), n_states, q, best[level]
    )
    return [groups[g][i] for g, i in enumerate(picks)]


def solve_min_cost(
    groups: Sequence[Sequence[Item]], max_loss: float, quantum: float | None = None
) -> list[Item]:
    """Minimise the total cost, one item per group, with total loss at most ``max_loss``.

    The loss bound is exact (up to a slack of 1e-12 times the loss scale ``Σ_l max_b |c_l(b)|``, for
    summation rounding); costs are rounded up to ``quantum``, so the result is the cheapest
    selection up to ``len(groups) · quantum`` (exactly the cheapest for costs on the quantum grid).

    Args:
        groups: the items, one non-empty sequence per group.
        max_loss: the bound on the summed predicted loss change (0 for "lossless").
        quantum: the cost resolution; None picks :func:`default_quantum` (≤ 4000 levels).

    Returns:
        The chosen item of each group, in group order.

    Raises:
        InfeasibleLoss: even the most accurate items together exceed ``max_loss``.
        ValueError: an empty group, a non-finite cost or loss, or a non-positive quantum.
    """
    if len(groups) == 0:
        if max_loss < 0:
            raise InfeasibleLoss(max_loss, 0.0)
        return []
    costs, losses = _arrays(groups)
    q = default_quantum(groups) if quantum is None else float(quantum)
    if not q > 0:
        raise ValueError(f"quantum must be positive, got {quantum}")
    units = _shifted_units(costs, q, cap=_MAX_LEVELS + 1)
    n_states = int(sum(int(u.max()) for u in units)) + 1
    if n_states > _MAX_LEVELS:
        raise ValueError(f"quantum {q:g} needs {n_states} cost levels; use a coarser quantum")
    best, choice = _dp(units, losses, n_states)
    tol = 1e-12 * max(1.0, float(np.sum([np.abs(v).max() for v in losses])))
    ok = np.flatnonzero(best <= max_loss + tol)
    if ok.size == 0:
        raise InfeasibleLoss(max_loss, float(sum(float(v.min()) for v in losses)))
    level = int(ok[0])
    picks = _trace(units, choice, level)
    logger.debug(
        "min-cost: %d groups, %d levels of %g, loss %g", len(groups), n_states, q, best[level]
    )
    return [groups[g][i] for g, i in enumerate(picks)]
