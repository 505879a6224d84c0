r"""Hessian-vector products of one layer block, and the spectral statistics they give.

The block ``∇²_W L`` is reached matrix-free: ``v ↦ ∇_W ⟨∇_W L, v⟩`` (double backward through
:class:`hessc.ir.executor.TorchExecutor`) on ``hvp_samples`` fixed feeds; its top eigenvalue by
power iteration, its top-k eigenvalues by Lanczos, its trace by Hutchinson
(``tr H = E[zᵀ H z]`` for Rademacher ``z``).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from hessc import progress
from hessc.errors import InputError
from hessc.ir import weights as qweights
from hessc.ir.executor import TorchExecutor
from hessc.passes import curvature
from hessc.passes.hessian.config import HessianConfig, _torch_dtype
from hessc.passes.hessian.layers import _Target
from hessc.passes.hessian.losses import _Loss, resolve_loss

logger = logging.getLogger(__name__)


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
        progress.report("hvp", j + 1, len(chosen))
    return out
