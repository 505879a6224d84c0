"""Tests for hessc.passes.allocate: the grouped knapsack and its min-cost dual."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from hessc.passes.allocate import (
    InfeasibleBudget,
    InfeasibleLoss,
    Item,
    default_quantum,
    solve_knapsack,
    solve_min_cost,
)


def _groups(costs: list[list[float]], losses: list[list[float]]) -> list[list[Item]]:
    return [
        [Item((g, i), c, v) for i, (c, v) in enumerate(zip(cs, vs))]
        for g, (cs, vs) in enumerate(zip(costs, losses))
    ]


def _totals(items: list[Item]) -> tuple[float, float]:
    return sum(i.cost for i in items), sum(i.loss for i in items)


def _brute(groups: list[list[Item]]) -> list[tuple[float, float]]:
    return [_totals(list(combo)) for combo in itertools.product(*groups)]


def _one_per_group(groups: list[list[Item]], items: list[Item]) -> None:
    assert len(items) == len(groups)
    for group, item in zip(groups, items):
        assert any(item is candidate for candidate in group)


@st.composite
def _cases(draw: st.DrawFn, integer: bool) -> list[list[Item]]:
    n_groups = draw(st.integers(1, 6))
    groups = []
    for g in range(n_groups):
        n_items = draw(st.integers(1, 3))
        if integer:
            costs = draw(st.lists(st.integers(0, 20), min_size=n_items, max_size=n_items))
        else:
            costs = draw(
                st.lists(st.floats(0.0, 100.0), min_size=n_items, max_size=n_items)
            )
        losses = draw(
            st.lists(st.floats(-10.0, 10.0), min_size=n_items, max_size=n_items)
        )
        groups.append([Item((g, i), float(c), v) for i, (c, v) in enumerate(zip(costs, losses))])
    return groups


@settings(max_examples=300, deadline=None)
@given(groups=_cases(integer=True), slack=st.floats(0.0, 1.0))
def test_knapsack_matches_brute_force_on_integer_costs(
    groups: list[list[Item]], slack: float
) -> None:
    totals = _brute(groups)
    lo = min(c for c, _ in totals)
    hi = max(c for c, _ in totals)
    budget = float(round(lo + slack * (hi - lo)))
    for quantum in (1.0, None):
        items = solve_knapsack(groups, budget, quantum)
        _one_per_group(groups, items)
        cost, loss = _totals(items)
        assert cost <= budget
        best = min(v for c, v in totals if c <= budget)
        assert loss == pytest.approx(best, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(groups=_cases(integer=False), slack=st.floats(0.0, 1.0))
def test_knapsack_float_costs_feasible_and_optimal_up_to_quantum(
    groups: list[list[Item]], slack: float
) -> None:
    totals = _brute(groups)
    lo = min(c for c, _ in totals)
    hi = max(c for c, _ in totals)
    budget = lo + slack * (hi - lo)
    q = default_quantum(groups, budget)
    items = solve_knapsack(groups, budget)
    cost, loss = _totals(items)
    assert cost <= budget * (1 + 1e-9) + 1e-9
    # Sandwich: no worse than the optimum at a budget one quantum per group tighter.
    best = min(v for c, v in totals if c <= budget * (1 + 1e-9) + 1e-9)
    tighter = [v for c, v in totals if c <= budget - len(groups) * q]
    assert loss >= best - 1e-9
    if tighter:
        assert loss <= min(tighter) + 1e-9


@settings(max_examples=300, deadline=None)
@given(groups=_cases(integer=True), frac=st.floats(0.0, 1.0))
def test_min_cost_matches_brute_force(groups: list[list[Item]], frac: float) -> None:
    totals = _brute(groups)
    lo = min(v for _, v in totals)
    hi = max(v for _, v in totals)
    max_loss = lo + frac * (hi - lo)
    # The solver accepts a loss total within 1e-12 of the loss scale of the bound (sum rounding).
    slack = 1e-12 * max(1.0, sum(max(abs(i.loss) for i in g) for g in groups))
    for quantum in (1.0, None):
        items = solve_min_cost(groups, max_loss, quantum)
        _one_per_group(groups, items)
        cost, loss = _totals(items)
        assert loss <= max_loss + slack
        assert cost == min(c for c, v in totals if v <= max_loss + slack)


def test_budget_exactly_met() -> None:
    groups = _groups([[1, 4, 9], [2, 5, 7], [3, 6]], [[9.0, 4.0, 0.5], [8.0, 3.0, 1.0], [5.0, 2.0]])
    # 4 + 5 + 6 = 15 spends the budget exactly and is the only way to reach loss 9.
    for quantum in (1.0, None, 0.5):
        items = solve_knapsack(groups, 15.0, quantum)
        assert [i.key for i in items] == [(0, 1), (1, 1), (2, 1)]
        assert _totals(items) == (15.0, 9.0)
    # Decimal and large-integer costs that sum exactly to the budget: the default quantum is
    # their common grid, so the exact fit is found.
    groups = _groups([[0.1, 0.3], [0.2, 0.4], [0.0, 0.3]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert default_quantum(groups, 1.0) == pytest.approx(0.1)
    assert _totals(solve_knapsack(groups, 1.0))[1] == 0.0
    assert _totals(solve_knapsack(groups, 0.99))[1] == 1.0
    big = _groups([[4096, 8192 * 3], [65536, 65536 + 8192]], [[1.0, 0.0], [1.0, 0.0]])
    assert default_quantum(big, 65536 + 4096 + 8192 * 3) == 4096
    assert _totals(solve_knapsack(big, 65536 + 8192 + 8192 * 3))[1] == 0.0
    assert _totals(solve_knapsack(big, 65536 + 8192 + 8192 * 3 - 1))[1] == 1.0


def test_infeasible_budget_reports_the_minimum() -> None:
    groups = _groups([[3, 5], [2, 8]], [[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(InfeasibleBudget) as info:
        solve_knapsack(groups, 4.5)
    assert info.value.min_cost == 5.0
    assert isinstance(info.value, ValueError)
    assert "5" in str(info.value)
    assert _totals(solve_knapsack(groups, 5.0)) == (5.0, 2.0)


def test_infeasible_loss_reports_the_minimum() -> None:
    groups = _groups([[3, 5], [2, 8]], [[1.0, 0.5], [1.0, -0.25]])
    with pytest.raises(InfeasibleLoss) as info:
        solve_min_cost(groups, 0.0)
    assert info.value.min_loss == pytest.approx(0.25)
    assert _totals(solve_min_cost(groups, 0.25)) == (13.0, 0.25)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="group 1"):
        solve_knapsack(_groups([[1], []], [[0.0], []]), 10)
    with pytest.raises(ValueError, match="non-finite"):
        solve_knapsack(_groups([[1, np.inf]], [[0.0, 1.0]]), 10)
    with pytest.raises(ValueError, match="quantum"):
        solve_knapsack(_groups([[1, 2]], [[0.0, 1.0]]), 10, quantum=0.0)
    assert solve_knapsack([], 1.0) == []
    assert solve_min_cost([], 0.0) == []


def test_ties_prefer_cheaper_and_payload_is_returned() -> None:
    groups = [[Item("a", 1.0, 0.0, payload={"bits": 2}), Item("b", 2.0, 0.0, payload={"bits": 4})]]
    (item,) = solve_knapsack(groups, 10.0)
    assert item.key == "a" and item.payload == {"bits": 2}


def _milp(costs: np.ndarray, losses: np.ndarray, budget: float) -> float:
    n_groups, n_items = costs.shape
    n = n_groups * n_items
    one_each = np.kron(np.eye(n_groups), np.ones(n_items))
    res = milp(
        losses.ravel(),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(costs.ravel()[None, :], -np.inf, budget),
        ],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
    )
    assert res.success
    return float(res.fun)


def test_knapsack_agrees_with_milp_on_a_medium_case() -> None:
    rng = np.random.default_rng(7)
    n_groups, n_items = 40, 6
    # Bit-width-like items: cost grows, loss falls roughly geometrically, with noise.
    size = rng.uniform(1e4, 1e6, n_groups)[:, None]
    bits = np.arange(2, 2 + n_items)[None, :]
    costs = size * bits / 8 + rng.uniform(0, 50, (n_groups, n_items))
    losses = rng.uniform(0.5, 2.0, (n_groups, 1)) * 4.0 ** (-bits) * size / 1e5
    losses += rng.normal(0, 1e-4, losses.shape)
    budget = float(costs[:, 2].sum())
    groups = _groups(costs.tolist(), losses.tolist())
    q = default_quantum(groups, budget)
    items = solve_knapsack(groups, budget)
    cost, loss = _totals(items)
    assert cost <= budget
    opt = _milp(costs, losses, budget)
    opt_tight = _milp(costs, losses, budget - n_groups * q)
    assert opt - 1e-7 <= loss <= opt_tight + 1e-7
    # A finer quantum closes the gap.
    fine = _totals(solve_knapsack(groups, budget, quantum=q / 8))[1]
    assert opt - 1e-7 <= fine <= loss + 1e-12


def test_dp_is_fast() -> None:
    rng = np.random.default_rng(0)
    groups = [
        [Item((g, i), float(rng.uniform(1e5, 1e6)), float(rng.normal())) for i in range(8)]
        for g in range(200)
    ]
    budget = float(sum(np.mean([it.cost for it in g]) for g in groups))
    start = time.process_time()
    items = solve_knapsack(groups, budget)
    solve_min_cost(groups, 0.0)
    elapsed = time.process_time() - start
    assert _totals(items)[0] <= budget
    assert elapsed < 2.0  # ~0.05 s on 2 cores; generous against CI noise
