r"""Forward statistics: the input factor ``A = E_p[x_p x_pᵀ]`` through ONNX Runtime.

Layer inputs are tapped as extra outputs of the graph, in groups whose activations stay under
``HessianConfig.max_activation_bytes`` (one pass over the calibration per group), and summed in
float64 batch by batch: ``Σ_p x_p x_pᵀ`` and the row count, divided at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from hessc import progress
from hessc.passes.hessian.config import HessianConfig
from hessc.passes.hessian.layers import _Act, _rows
from hessc.runtime import sessions

logger = logging.getLogger(__name__)


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


def pools(groups: Sequence[Sequence[_Act]]) -> dict[_Act, _Act]:
    """Layer inputs that are only ever summed together, each mapped to the first of its group.

    ``groups`` are the inputs of each weight (one per reader: a weight read by every step of an
    unrolled recurrence has one input per step). A group is pooled, its inputs summed into one
    buffer as they stream in, when none of its inputs belongs to another group: an unrolled
    LSTM's 20 steps of a 4096-wide input then hold one 128 MiB sum, not 20.
    """
    owners: dict[_Act, set[tuple[_Act, ...]]] = {}
    for group in groups:
        for a in group:
            owners.setdefault(a, set()).add(tuple(group))
    out: dict[_Act, _Act] = {}
    for group in {tuple(g) for g in groups if len(g) > 1}:
        if all(owners[a] == {group} for a in group):
            out.update({a: group[0] for a in group})
    return out


def _collect_forward(
    model: ir.Model,
    acts: Sequence[_Act],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: HessianConfig,
    pooled: Mapping[_Act, _Act] | None = None,
) -> dict[_Act, tuple[torch.Tensor | None, int]]:
    """``(Σ x xᵀ, count)`` in float64 for every layer input, streamed batch by batch.

    The inputs of a pool (:func:`pools`) are summed into their first input's entry as they come;
    the others' entries are ``(None, 0)``.
    """
    pooled = pooled or {}
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
        for act in by_name[name]:
            rows = _rows(x, act).reshape(-1, act.features).to(torch.float64)
            a = pooled.get(act, act)
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
                progress.report("covariance", done, total)
            del session
    finally:
        if source is not None:
            source.close()
    out: dict[_Act, tuple[torch.Tensor | None, int]] = {}
    for a in acts:
        if pooled.get(a, a) is not a:
            out[a] = (None, 0)
        else:
            out[a] = (sums.get(a, torch.zeros(a.features, a.features, dtype=torch.float64)), counts[a])
    return out


def _mean_covariance(sums: Mapping, acts: Sequence[_Act]) -> tuple[np.ndarray | None, int]:
    """``E[x xᵀ]`` over the rows of the inputs ``acts`` (summed as one layer's), symmetrised."""
    count = sum(sums[a][1] for a in acts)
    if count == 0:
        return None, 0
    parts = [sums[a][0] for a in acts if sums[a][0] is not None]  # a pool's sum sits in one entry
    total = parts[0].clone()
    for extra in parts[1:]:
        total += extra
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
