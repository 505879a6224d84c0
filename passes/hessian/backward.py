r"""Backward statistics: gradient, ``G``, diagonal Fisher and ``A_u`` through the torch executor.

Per feed ``f`` with ``B_f`` loss terms and output gradients ``u_p = ∂L_f/∂y_p``::

    ∇L_f = Σ_p u_p x_pᵀ,   G_f = B_f Σ_p u_p u_pᵀ,   F_f = B_f Σ_p (u_p ∘ u_p)(x_p ∘ x_p)ᵀ

averaged over feeds with weights ``B_f``; ``A_u = Σ_p ‖u_p‖² x_p x_pᵀ / Σ_p ‖u_p‖²``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from hessc import progress
from hessc.ir.executor import TorchExecutor
from hessc.passes.hessian.config import HessianConfig, _torch_dtype
from hessc.passes.hessian.layers import _acts_of, _output_rows, _rows, _Target
from hessc.passes.hessian.losses import _Loss

logger = logging.getLogger(__name__)


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
        progress.report("backward", i + 1, len(feeds))
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
