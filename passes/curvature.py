r"""Matrix-free curvature utilities and streaming second-moment statistics.

Everything spectral is built on a Hessian-vector product over a flat parameter vector
``θ ∈ R^n``. By double backward (Pearlmutter), with ``g(θ) = ∇L(θ)`` built once with a graph::

    H v = ∇_θ ⟨g(θ), v⟩

* **Power iteration** (top ``k`` by magnitude, with deflation): ``v ← Hv/‖Hv‖``,
  ``λ = vᵀHv``, every iterate Gram–Schmidt-orthogonalised against the eigenvectors already found;
  stop when ``|Δλ| ≤ tol·|λ|``.
* **Lanczos** (top ``k`` by algebraic value): ``m`` steps of ``β_{j+1} q_{j+1} = H q_j − α_j q_j
  − β_j q_{j−1}`` with full re-orthogonalisation, then the Ritz pairs ``(θ_i, Q s_i)`` of the
  tridiagonal ``T_m = tridiag(β, α, β)``.
* **Hutchinson**: ``tr(H) = E[zᵀ H z]`` for Rademacher ``z`` (variance ``2 Σ_{i≠j} H_ij²``).

For a linear layer ``y = W x`` (``W`` m×n) the K-FAC / Gauss–Newton block is ``H ≈ A ⊗ G`` with
``A = E[x xᵀ]`` and ``G = E[g gᵀ]`` (``g = ∂ℓ/∂y``), so for a weight change ``Δ``::

    ½ vec(Δ)ᵀ (A ⊗ G) vec(Δ) = ½ tr(G Δ A Δᵀ),      λ_max(A ⊗ G) = α_max γ_max

(column-major ``vec``; eigenpairs ``α_i γ_j``, ``u_i ⊗ v_j``). ``A`` is accumulated batch by batch
in float64 by :class:`CovarianceAccumulator`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CovarianceAccumulator",
    "HessianVectorProduct",
    "hutchinson_trace",
    "kfac_lambda_max",
    "kfac_quadratic",
    "lanczos",
    "make_hvp",
    "power_iteration",
]

HVP = Callable[[torch.Tensor], torch.Tensor]


class HessianVectorProduct:
    """``v ↦ H v`` for a scalar loss over a list of tensors, by double backward.

    The gradient graph is built once at construction and reused by every product.

    Attributes:
        n: total number of parameters (the length of ``v``).
        dtype: dtype of the parameters (``v`` is cast to it, the result is returned in it).
        device: device of the parameters.
    """

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("make_hvp needs at least one parameter tensor")
        for p in self.params:
            if not p.requires_grad:
                raise ValueError("every parameter must have requires_grad=True")
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        with torch.enable_grad():
            loss = loss_fn()
            if loss.numel() != 1:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        self._grads = [
            g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)
        ]
        self._live = [g.requires_grad for g in self._grads]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into tensors shaped like the parameters."""
        return [c.view(s) for c, s in zip(torch.split(v, self.sizes), self.shapes)]

    @property
    def gradient(self) -> torch.Tensor:
        """The flat gradient at the parameters (detached)."""
        return self.flatten([g.detach() for g in self._grads])

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``H v`` for a flat ``v`` of length ``n``."""
        if v.shape != (self.n,):
            raise ValueError(f"expected a vector of length {self.n}, got shape {tuple(v.shape)}")
        vs = self.unflatten(v.to(device=self.device, dtype=self.dtype))
        live = [i for i, ok in enumerate(self._live) if ok]
        out = [torch.zeros_like(p) for p in self.params]
        if live:
            hv = torch.autograd.grad(
                [self._grads[i] for i in live],
                self.params,
                grad_outputs=[vs[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            out = [h if h is not None else o for h, o in zip(hv, out)]
        return self.flatten([o.detach() for o in out])


def make_hvp(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> HessianVectorProduct:
    """Build the Hessian-vector product of ``loss_fn()`` w.r.t. ``params``.

    Args:
        loss_fn: computes the scalar loss from ``params`` (e.g. a closure over a model and one
            fixed calibration batch); called once.
        params: leaf tensors with ``requires_grad=True`` (e.g. one layer's weights for the
            layer-block Hessian).

    Returns:
        A callable ``hvp(v) -> H v`` on flat vectors, with ``.n`` the parameter count.
    """
    return HessianVectorProduct(loss_fn, params)


def _setup(
    hvp: HVP, n: int, seed: int, dtype: torch.dtype | None
) -> tuple[torch.dtype, torch.device, torch.Generator]:
    dt = dtype or getattr(hvp, "dtype", None) or torch.float64
    if not dt.is_floating_point:
        raise ValueError(f"need a floating dtype, got {dt}")
    dev = getattr(hvp, "device", None) or torch.device("cpu")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return dt, dev, gen


def _randn(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _orthogonalise(v: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Remove the span of ``basis`` (columns, orthonormal) from ``v``, twice for stability."""
    if basis is None or basis.shape[1] == 0:
        return v
    for _ in range(2):
        v = v - basis @ (basis.T @ v)
    return v


def power_iteration(
    hvp: HVP,
    n: int,
    iters: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    k: int = 1,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (largest ``|λ|``) by power iteration with deflation.

    Args:
        hvp: ``v ↦ H v`` for symmetric ``H`` (n×n).
        n: dimension.
        iters: maximum iterations per eigenpair.
        tol: stop when the relative change of the Rayleigh quotient is at most ``tol``; the error
            left is about ``tol · |λ₂| / (|λ₁| − |λ₂|)``, so use a smaller ``tol`` for small gaps.
        seed: seed of the random starting vectors.
        k: number of eigenpairs.
        dtype: working dtype; defaults to ``hvp.dtype`` if it has one, else float64.

    Returns:
        ``(eigenvalues (k,), eigenvectors (n, k))``, in the order found (decreasing ``|λ|``).
    """
    dt, dev, gen = _setup(hvp, n, seed, dtype)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    values: list[torch.Tensor] = []
    vectors = torch.zeros(n, 0, dtype=dt, device=dev)
    for index in range(k):
        v = _orthogonalise(_randn(n, gen, dt, dev), vectors)
        v = v / v.norm()
        lam = torch.zeros((), dtype=dt, device=dev)
        for step in range(iters):
            w = _orthogonalise(hvp(v).to(device=dev, dtype=dt), vectors)
            new = torch.dot(v, w)
            norm = w.norm()
            if norm == 0:
                lam = new
                break
            v = w / norm
            converged = step > 0 and abs(float(new - lam)) <= tol * abs(float(new))
            lam = new
            if converged:
                break
        logger.debug(
            "power iteration: eigenvalue %d = %g after %d steps", index, float(lam), step + 1
        )
        values.append(lam)
        vectors = torch.cat([vectors, v[:, None]], dim=1)
    return torch.stack(values), vectors


def lanczos(
    hvp: HVP,
    n: int,
    k: int,
    m: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (largest algebraic ``λ``) by Lanczos with full re-orthogonalisation.

    Args:
        hvp: ``v ↦ H v`` for symmetric ``H`` (n×n).
        n: dimension.
        k: number of eigenpairs.
        m: Lanczos steps (Krylov dimension); default ``min(n, max(4k, 40))``.
        seed: seed of the random starting vector (and of restarts after an invariant subspace).
        dtype: working dtype; defaults to ``hvp.dtype`` if it has one, else float64.

    Returns:
        ``(eigenvalues (k,) descending, Ritz vectors (n, k))``.
    """
    dt, dev, gen = _setup(hvp, n, seed, dtype)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    m = min(n, max(4 * k, 40)) if m is None else min(m, n)
    if m < k:
        raise ValueError(f"m = {m} Lanczos steps cannot give k = {k} eigenpairs")
    Q = torch.zeros(n, m, dtype=dt, device=dev)
    alpha = torch.zeros(m, dtype=torch.float64)
    beta = torch.zeros(max(m - 1, 0), dtype=torch.float64)
    q = _randn(n, gen, dt, dev)
    q = q / q.norm()
    scale = 0.0
    for j in range(m):
        Q[:, j] = q
        w = hvp(q).to(device=dev, dtype=dt)
        a = torch.dot(q, w)
        alpha[j] = float(a)
        w = _orthogonalise(w, Q[:, : j + 1])
        if j == m - 1:
            break
        b = float(w.norm())
        scale = max(scale, abs(float(a)), b)
        if b <= 1e-10 * max(scale, 1e-300):
            # Invariant subspace: continue from a fresh direction orthogonal to it (β = 0 splits T).
            w = _orthogonalise(_randn(n, gen, dt, dev), Q[:, : j + 1])
            b_new = float(w.norm())
            beta[j] = 0.0
            q = w / b_new
            continue
        beta[j] = b
        q = w / b
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)[:k]
    vectors = Q @ S[:, order].to(device=dev, dtype=dt)
    return theta[order].to(dtype=dt), vectors


def hutchinson_trace(
    hvp: HVP, n: int, probes: int = 100, seed: int = 0, dtype: torch.dtype | None = None
) -> float:
    """Hutchinson's estimate ``(1/K) Σ_k zₖᵀ H zₖ`` of ``tr(H)`` with Rademacher probes.

    Args:
        hvp: ``v ↦ H v``.
        n: dimension.
        probes: number of probe vectors ``K``.
        seed: seed of the probes.
        dtype: working dtype; defaults to ``hvp.dtype`` if it has one, else float64.

    Returns:
        The trace estimate.
    """
    dt, dev, gen = _setup(hvp, n, seed, dtype)
    if probes <= 0:
        raise ValueError(f"probes must be positive, got {probes}")
    total = 0.0
    for _ in range(probes):
        z = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device=dev, dtype=dt)
        total += float(torch.dot(z, hvp(z).to(device=dev, dtype=dt)))
    return total / probes


class CovarianceAccumulator:
    """Streaming second moment ``A = E[x xᵀ]`` (and first moment ``E[x]``) in float64.

    Feed batches ``x`` of shape ``(..., n)``; every leading index is one sample (token, pixel).

    Attributes:
        n: feature dimension.
        count: number of samples seen.
    """

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.n = n
        self.count = 0
        self._sum_xx = torch.zeros(n, n, dtype=torch.float64)
        self._sum_x = torch.zeros(n, dtype=torch.float64)

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add a batch of samples (last axis = features)."""
        t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if t.shape[-1] != self.n:
            raise ValueError(f"expected samples with {self.n} features, got shape {tuple(t.shape)}")
        t = t.reshape(-1, self.n).to(device="cpu", dtype=torch.float64)
        self._sum_xx.addmm_(t.T, t)
        self._sum_x += t.sum(dim=0)
        self.count += t.shape[0]

    def merge(self, other: CovarianceAccumulator) -> None:
        """Add the samples of another accumulator (e.g. from another worker)."""
        if other.n != self.n:
            raise ValueError(f"cannot merge n={other.n} into n={self.n}")
        self._sum_xx += other._sum_xx
        self._sum_x += other._sum_x
        self.count += other.count

    def _need_data(self) -> None:
        if self.count == 0:
            raise ValueError("no samples accumulated yet")

    def mean(self) -> torch.Tensor:
        """``A = (1/N) Σ x xᵀ`` (n×n, float64, symmetric)."""
        self._need_data()
        A = self._sum_xx / self.count
        return (A + A.T) / 2

    def mean_x(self) -> torch.Tensor:
        """``E[x]`` (n, float64)."""
        self._need_data()
        return self._sum_x / self.count

    def trace(self) -> float:
        """``tr(A) = E[‖x‖²]``."""
        self._need_data()
        return float(self._sum_xx.diagonal().sum()) / self.count

    def eig_top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` eigenpairs of ``A``: ``(values (k,) descending, vectors (n, k))``."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be in [1, {self.n}], got {k}")
        values, vectors = torch.linalg.eigh(self.mean())
        return values.flip(0)[:k], vectors.flip(1)[:, :k]


def _as_f64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device="cpu", dtype=torch.float64)


def kfac_quadratic(
    G: torch.Tensor | np.ndarray | None,
    A: torch.Tensor | np.ndarray,
    delta: torch.Tensor | np.ndarray,
) -> float:
    """``½ tr(G Δ A Δᵀ) = ½ vec(Δ)ᵀ (A ⊗ G) vec(Δ)``, the K-FAC second-order term.

    Args:
        G: (m, m) output-gradient factor, or None for the identity (the GPTQ proxy).
        A: (n, n) input factor.
        delta: (m, n) weight change.

    Returns:
        The quadratic form, computed in float64.
    """
    d = _as_f64(delta)
    a = _as_f64(A)
    if d.ndim != 2 or a.shape != (d.shape[1], d.shape[1]):
        raise ValueError(f"A has shape {tuple(a.shape)}, expected ({d.shape[1]}, {d.shape[1]})")
    left = d
    if G is not None:
        g = _as_f64(G)
        if g.shape != (d.shape[0], d.shape[0]):
            raise ValueError(f"G has shape {tuple(g.shape)}, expected ({d.shape[0]}, {d.shape[0]})")
        left = g @ d
    # tr(M Δᵀ) = Σ_ij M_ij Δ_ij with M = G Δ A.
    return 0.5 * float(((left @ a) * d).sum())


def kfac_lambda_max(
    G: torch.Tensor | np.ndarray | None, A: torch.Tensor | np.ndarray
) -> float:
    """Largest eigenvalue of ``A ⊗ G``: ``α_max γ_max`` for positive semi-definite factors.

    For indefinite factors the largest of the four products of extreme eigenvalues is returned,
    which is still exact.

    Args:
        G: (m, m) symmetric output factor, or None for the identity.
        A: (n, n) symmetric input factor.

    Returns:
        ``λ_max(A ⊗ G)``.
    """
    alpha = torch.linalg.eigvalsh(_as_f64(A))
    if G is None:
        gamma = torch.ones(1, dtype=torch.float64)
    else:
        gamma = torch.linalg.eigvalsh(_as_f64(G))
    ends_a = (float(alpha[0]), float(alpha[-1]))
    ends_g = (float(gamma[0]), float(gamma[-1]))
    return max(a * g for a in ends_a for g in ends_g)
