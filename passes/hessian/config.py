"""What curvature statistics to compute, on how much data (:class:`HessianConfig`).

Statistics cost very different amounts: ``A`` is one ONNX Runtime forward per feed, backward
statistics one torch forward+backward per feed, each Hessian-vector product a double backward; the
config says which to pay for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Union

import numpy as np
import torch

from hessc.errors import InputError

LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, np.ndarray]], torch.Tensor]
LOSSES = ("auto", "next-token", "ce", "kl", "mse")


@dataclasses.dataclass(frozen=True)
class HessianConfig:
    """What curvature statistics to compute, on how much data.

    Costs (SmolLM2-135M, 2 cores): ``A`` is one ORT forward per feed plus an ``in×in`` float64
    update per layer input (about 1.5 s per 256-token feed); backward statistics are one torch
    forward+backward per feed; ``lambda_max``, ``lanczos_k`` and ``hutchinson_probes`` cost one
    double-backward pass (≈ 2-3 forwards) per Hessian-vector product, i.e. per iteration and per
    layer: use them on a few layers (``hvp_layers``).

    Attributes:
        covariance: compute ``A = E[x xᵀ]``, its top eigenvalues and trace.
        kfac: compute the output factor ``G`` (its diagonal for layers wider than
            ``kfac_diag_above``).
        gradient: compute the mean gradient ``∇_W L`` (out × in).
        fisher_diag: compute the diagonal Fisher, summarised by its mean.
        weighted_covariance: compute ``A_u = Σ_t ‖u_t‖² x_t x_tᵀ / Σ_t ‖u_t‖²``, the input second
            moment with each row (token, pixel) weighted by its squared output gradient
            ``u_t = ∂L/∂y_t`` (the sampled-label Fisher's for ``kl``/``mse``). It is the curvature
            ``ΔᵀHΔ`` of the loss under a per-row isotropic ``G``: rows the loss reads heavily, such
            as an attention-sink token whose values every later token mixes in, count for what
            they cost rather than for one row each. GPTQ uses it when present.
        split_covariance: also keep ``A`` of the even feeds (``a_fit``) and of the odd feeds
            (``a_check``), so that a quantizer fitted to one half (GPTQ) is scored on the other:
            scored on the ``A`` it minimised, a GPTQ item's predicted damage is optimistic, the
            more so the fewer calibration rows there are per input dimension.
        split_gradient: also keep the gradient of the even feeds (``grad_fit``) and of the odd
            feeds (``grad_check``), so that rounding directed by one half's gradient
            (``rtn-grad``) is scored on the other: scored on the gradient that chose it, its
            first-order gain is optimistic by an order of magnitude (SmolLM2, 8 bits).
        lambda_max: top eigenvalue of each layer's Hessian block by power iteration.
        lanczos_k: top-k eigenvalues of each layer's Hessian block by Lanczos (0 = off).
        hutchinson_probes: Rademacher probes for the trace of each block (0 = off).
        top_eigs: how many top eigenvalues of ``A`` to keep.
        max_samples: calibration feeds used for ``A``.
        max_grad_samples: calibration feeds used for backward statistics (gradient, G, Fisher).
        hvp_samples: calibration feeds in the fixed batch of the Hessian-vector products.
        kfac_diag_above: keep only ``diag(G)`` for layers with more outputs than this.
        loss: ``"auto"``, ``"next-token"`` (LM logits ``[batch, seq, vocab]`` against the shifted
            ``input_ids``), ``"ce"`` (cross-entropy against ``labels``), ``"kl"``
            (``KL(p_fp32 ‖ p_θ)`` over the last axis of the first output), ``"mse"``
            (``½ ‖y − y_fp32‖²`` over the last axis of the first output, mean over the other
            axes) or a callable ``(outputs by name, feed) -> scalar tensor`` (a mean over the rows
            of the first output, for the scale of ``G``). ``"auto"`` picks ``ce`` when labels are
            given; else, when the first output's name contains ``logit``: ``next-token`` if it has
            rank 3 and an integer input named like ``input_ids`` exists, otherwise ``kl``; else
            ``mse``.
        labels: integer class labels, one array per calibration feed, of the first output's
            shape without its last axis (for ``ce``).
        seed: seed of the sampled labels, the probes and the starting vectors.
        cache: directory of the disk cache; None = ``$HESSC_CACHE/hessian``, else
            ``$XDG_CACHE_HOME/hessc/hessian`` or ``~/.cache/hessc/hessian``; False = no cache.
        hvp_iters: maximum power iterations.
        hvp_tol: relative tolerance of the power iteration.
        lanczos_steps: Lanczos steps (0 = ``max(4k, 40)``).
        hvp_layers: ``fnmatch`` patterns of the weight names that get HVP statistics (empty =
            every layer).
        precision: ``"float32"`` or ``"float64"``: compute dtype of the torch executor for the
            backward statistics.
        batch_size: feeds concatenated along axis 0 per ONNX Runtime run (1 = one feed per run).
        max_activation_bytes: bound on the activation bytes exposed per ORT session and run;
            layers are collected in groups (one forward over the calibration each) beyond it.
        threads: ONNX Runtime intra-op threads (None = ORT's default).
    """

    covariance: bool = True
    kfac: bool = False
    gradient: bool = False
    fisher_diag: bool = False
    weighted_covariance: bool = False
    split_covariance: bool = False
    split_gradient: bool = False
    lambda_max: bool = False
    lanczos_k: int = 0
    hutchinson_probes: int = 0
    top_eigs: int = 8
    max_samples: int = 128
    max_grad_samples: int = 4
    hvp_samples: int = 1
    kfac_diag_above: int = 4096
    loss: Union[str, LossFn] = "auto"
    labels: tuple[np.ndarray, ...] | None = None
    seed: int = 0
    cache: Path | str | bool | None = None
    hvp_iters: int = 100
    hvp_tol: float = 1e-4
    lanczos_steps: int = 0
    hvp_layers: tuple[str, ...] = ()
    precision: str = "float32"
    batch_size: int = 1
    max_activation_bytes: int = 1 << 30
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("lanczos_k", "hutchinson_probes", "top_eigs", "lanczos_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"HessianConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_samples", "max_grad_samples", "hvp_samples", "hvp_iters", "batch_size",
                     "kfac_diag_above", "max_activation_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"HessianConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.hvp_tol > 0:
            raise InputError(f"HessianConfig.hvp_tol must be > 0, got {self.hvp_tol}")
        if self.lanczos_steps and self.lanczos_steps < self.lanczos_k:
            raise InputError(
                f"HessianConfig.lanczos_steps={self.lanczos_steps} cannot give lanczos_k={self.lanczos_k} "
                "eigenvalues; use at least lanczos_k steps (or 0 for the default)"
            )
        if self.precision not in ("float32", "float64"):
            raise InputError(f"HessianConfig.precision must be 'float32' or 'float64', got {self.precision!r}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise InputError(f"HessianConfig.loss must be one of {LOSSES} or a callable, got {self.loss!r}")
        if self.loss == "ce" and self.labels is None:
            raise InputError("HessianConfig.loss='ce' needs labels (one integer array per calibration feed)")
        if self.labels is not None:
            labels = tuple(np.asarray(x) for x in self.labels)
            for i, x in enumerate(labels):
                if not np.issubdtype(x.dtype, np.integer):
                    raise InputError(f"HessianConfig.labels[{i}] must hold integer class indices, got {x.dtype}")
            object.__setattr__(self, "labels", labels)
        if isinstance(self.cache, str):
            object.__setattr__(self, "cache", Path(self.cache))
        if self.cache is True:
            object.__setattr__(self, "cache", None)
        if self.threads is not None and self.threads < 1:
            raise InputError(f"HessianConfig.threads must be >= 1 or None, got {self.threads}")
        if isinstance(self.hvp_layers, str):
            object.__setattr__(self, "hvp_layers", (self.hvp_layers,))

    @property
    def backward(self) -> bool:
        """Whether any statistic needs output gradients."""
        return self.kfac or self.gradient or self.fisher_diag or self.weighted_covariance

    @property
    def hvp(self) -> bool:
        """Whether any statistic needs Hessian-vector products."""
        return self.lambda_max or self.lanczos_k > 0 or self.hutchinson_probes > 0


def default_cache_dir() -> Path:
    """``hessian`` in hessc's cache (:func:`hessc.cache.cache_dir`), not created here."""
    from hessc import cache

    return cache.cache_dir("hessian", create=False)


def _torch_dtype(config: HessianConfig) -> torch.dtype:
    return torch.float64 if config.precision == "float64" else torch.float32
