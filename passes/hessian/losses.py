r"""The loss ``L`` the backward statistics differentiate.

Which output gradients ``u`` feed ``G`` and ``F`` depends on the loss: true-label gradients for
``next-token``, ``ce`` and custom losses (the empirical Fisher); for ``kl`` (``KL(p_fp32 ‖ p_θ)``)
sampled labels ``y ~ p_θ`` (an unbiased estimate of the Fisher, the Hessian of the KL at the fp32
point); for ``mse`` (``½‖y − y_fp32‖²``) ``u = ∂⟨ε, y⟩/∂y`` with ``ε ~ N(0, I)`` (an unbiased
estimate of the Gauss-Newton matrix). The gradient of ``kl`` and ``mse`` is zero at the fp32
point, so ``grad`` is zero for them: ask for ``loss="next-token"`` or give ``labels`` for a
meaningful gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from hessc.errors import InputError
from hessc.passes.hessian.config import HessianConfig


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
    """The token-ids input of a language model (:func:`hessc.ir.weights.token_ids_input`)."""
    from hessc.ir.weights import token_ids_input

    return token_ids_input(model)


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
