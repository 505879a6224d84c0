r"""Curvature annotation: per-weight Hessian statistics for every MatMul/Gemm/Conv weight.

For a layer ``y = W x`` (``W`` out×in) and a scalar loss ``L`` (a mean over ``B`` loss terms), the
statistics are, over the rows ``p`` of the layer (tokens, pixels, samples), with
``u_p = ∂L/∂y_p``::

    A = E_p[x_p x_pᵀ]                    input factor (forward only, ONNX Runtime, float64)
    ∇_W L = Σ_p u_p x_pᵀ                 mean gradient (exact)
    G = B · Σ_p u_p u_pᵀ                 output factor, so that  H_W ≈ A ⊗ G  (K-FAC)
    F = B · Σ_p (u_p ∘ u_p)(x_p ∘ x_p)ᵀ  diagonal Fisher (≈ diag(A) ⊗ diag(G))

With one loss term per row (an MLP on samples) ``G = E[g gᵀ]`` for the per-sample output gradient
``g = ∂ℓ/∂y``; for next-token losses ``B`` = predicted tokens. ``A ⊗ G`` then is the K-FAC
approximation of the Gauss-Newton/Fisher block of ``L``; for convolutions (several rows per loss
term) it assumes the spatial rows uncorrelated, as KFC does. Statistics over several feeds are
averaged with weights ``B_f`` (the loss is the token-weighted mean over all feeds). The layer block
``∇²_W L`` itself is reached matrix-free through Hessian-vector products (:mod:`.hvp`).

Modules: :mod:`.config` (what to compute), :mod:`.layers` (the weights and their input rows),
:mod:`.forward` (``A``), :mod:`.losses` (which ``u``), :mod:`.backward` (gradient, ``G``, ``F``),
:mod:`.hvp` (spectra of the block), :mod:`.cache` (the disk cache), :mod:`.annotate` (the pass and
the readers of its annotations).
"""

from __future__ import annotations

from hessc.passes.hessian.annotate import WEIGHTED_SHARE, AnnotateHessianPass, gptq_hessian, gradient_for, hessian_for
from hessc.passes.hessian.cache import calibration_digest, model_digest
from hessc.passes.hessian.config import LOSSES, HessianConfig, LossFn, default_cache_dir
from hessc.passes.hessian.hvp import make_layer_hvp
from hessc.passes.hessian.losses import ids_input, resolve_loss

__all__ = [
    "AnnotateHessianPass",
    "HessianConfig",
    "LOSSES",
    "LossFn",
    "WEIGHTED_SHARE",
    "calibration_digest",
    "default_cache_dir",
    "gptq_hessian",
    "gradient_for",
    "hessian_for",
    "ids_input",
    "make_layer_hvp",
    "model_digest",
    "resolve_loss",
]
