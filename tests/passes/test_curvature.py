"""Tests for hessc.passes.curvature (ALGORITHMS.md §7 step 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hessc.passes.curvature import (
    CovarianceAccumulator,
    hutchinson_trace,
    kfac_lambda_max,
    kfac_quadratic,
    lanczos,
    make_hvp,
    power_iteration,
)

D_IN, HIDDEN, D_OUT, N_SAMPLES = 4, 6, 2, 32


def _mlp_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N_SAMPLES, D_OUT, generator=gen, dtype=torch.float64)
    shapes = [(HIDDEN, D_IN), (HIDDEN,), (D_OUT, HIDDEN), (D_OUT,)]
    params = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    return x, y, params


def _mlp_loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    return 0.5 * ((out - y) ** 2).mean()


def _flat_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    shapes = [(HIDDEN, D_IN), (HIDDEN,), (D_OUT, HIDDEN), (D_OUT,)]
    sizes = [int(np.prod(s)) for s in shapes]
    parts = [c.view(s) for c, s in zip(torch.split(theta, sizes), shapes)]
    return _mlp_loss(parts, x, y)


@pytest.fixture(scope="module")
def mlp() -> tuple:
    x, y, params = _mlp_data()
    hvp = make_hvp(lambda: _mlp_loss(params, x, y), params)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(lambda t: _flat_loss(t, x, y), theta)
    return hvp, H, theta, x, y


def test_hvp_matches_exact_hessian_and_finite_differences(mlp: tuple) -> None:
    hvp, H, theta, x, y = mlp
    n = theta.numel()
    assert hvp.n == n and hvp.dtype == torch.float64
    assert torch.allclose(H, H.T, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    grad = lambda t: torch.func.grad(lambda s: _flat_loss(s, x, y))(t)  # noqa: E731
    for _ in range(5):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        hv = hvp(v)
        torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
        eps = 1e-5
        fd = (grad(theta + eps * v) - grad(theta - eps * v)) / (2 * eps)
        assert (hv - fd).norm() <= 1e-7 * hv.norm()
    torch.testing.assert_close(hvp.gradient, grad(theta), rtol=1e-12, atol=1e-14)


def test_hvp_handles_unused_and_linear_parameters() -> None:
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    lin = torch.randn(4, dtype=torch.float64, requires_grad=True)
    hvp = make_hvp(lambda: (a**3).sum() + lin.sum(), [a, unused, lin])
    v = torch.ones(9, dtype=torch.float64)
    expected = torch.cat([6 * a.detach(), torch.zeros(6, dtype=torch.float64)])
    torch.testing.assert_close(hvp(v), expected)
    linear_only = make_hvp(lambda: lin.sum(), [lin])
    assert torch.all(linear_only(torch.ones(4, dtype=torch.float64)) == 0)
    with pytest.raises(ValueError, match="length"):
        hvp(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar"):
        make_hvp(lambda: a * 2, [a])


def test_power_iteration_top_eigenvalue(mlp: tuple) -> None:
    hvp, H, theta, *_ = mlp
    evals = torch.linalg.eigvalsh(H)
    top = evals[evals.abs().argmax()]
    # |λ2/λ1| = 0.83 here: the stopping rule (relative change <= tol) leaves an error of about
    # tol·λ2/(λ1 − λ2), so ask for tol = 1e-4 to be within 1e-3.
    lam, vec = power_iteration(hvp, theta.numel(), iters=300, tol=1e-4)
    assert abs(float(lam[0] - top)) < 1e-3 * abs(float(top))
    rough, _ = power_iteration(hvp, theta.numel())  # PyHessian defaults: 100 steps, tol 1e-3
    assert abs(float(rough[0] - top)) < 1e-2 * abs(float(top))
    assert vec.shape == (theta.numel(), 1)
    residual = (H @ vec[:, 0] - lam[0] * vec[:, 0]).norm()
    assert residual < 0.05 * abs(float(top))


def test_power_iteration_top_k_by_deflation() -> None:
    gen = torch.Generator().manual_seed(3)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    rest = torch.rand(n - 3, generator=gen, dtype=torch.float64)
    spectrum = torch.cat([torch.tensor([10.0, -7.0, 5.0], dtype=torch.float64), rest])
    H = Q @ torch.diag(spectrum) @ Q.T
    lam, vecs = power_iteration(lambda v: H @ v, n, iters=500, tol=1e-10, k=3)
    torch.testing.assert_close(lam, spectrum[:3], rtol=1e-6, atol=0)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_lanczos_top_five_vs_eigh(mlp: tuple) -> None:
    hvp, H, theta, *_ = mlp
    n = theta.numel()
    exact = torch.linalg.eigvalsh(H).flip(0)[:5]
    theta_k, vecs = lanczos(hvp, n, k=5)
    rel = ((theta_k - exact).abs() / exact.abs()).max()
    assert rel < 1e-3
    for i in range(5):  # Ritz vectors are eigenvectors.
        r = H @ vecs[:, i] - theta_k[i] * vecs[:, i]
        assert r.norm() < 1e-3 * exact[0].abs()


def test_lanczos_on_a_larger_matrix_with_fewer_steps() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 400
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    noise = 5 * torch.rand(n, generator=gen, dtype=torch.float64)
    spectrum = 100.0 * 0.8 ** torch.arange(n, dtype=torch.float64) - noise
    H = Q @ torch.diag(spectrum) @ Q.T
    exact = torch.linalg.eigvalsh(H).flip(0)[:5]
    calls = []
    theta_k, _ = lanczos(lambda v: calls.append(1) or H @ v, n, k=5, m=40)
    assert len(calls) == 40
    assert ((theta_k - exact).abs() / exact.abs()).max() < 1e-3


def test_lanczos_restarts_after_an_invariant_subspace() -> None:
    # Rank-2 operator: the Krylov space closes after 2 steps; later eigenvalues are 0.
    u = torch.zeros(10, 2, dtype=torch.float64)
    u[0, 0], u[1, 1] = 1.0, 1.0
    H = u @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ u.T
    vals, vecs = lanczos(lambda v: H @ v, 10, k=3, m=10)
    expected = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(vals, expected, atol=1e-10, rtol=0)
    assert torch.isfinite(vecs).all()


def test_hutchinson_within_five_percent() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 300
    off = 0.05 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = torch.diag(1.0 + torch.rand(n, generator=gen, dtype=torch.float64)) + (off + off.T) / 2
    est = hutchinson_trace(lambda v: H @ v, n, probes=200)
    assert abs(est - float(H.trace())) < 0.05 * float(H.trace())
    assert est == hutchinson_trace(lambda v: H @ v, n, probes=200)  # deterministic


def test_mlp_hvp_in_float32_keeps_dtype() -> None:
    x, y, params = _mlp_data(seed=2)
    params32 = [p.detach().float().requires_grad_() for p in params]
    hvp = make_hvp(lambda: _mlp_loss(params32, x.float(), y.float()), params32)
    lam, vec = power_iteration(hvp, hvp.n, k=1)
    assert lam.dtype == torch.float32 and vec.dtype == torch.float32
    est = hutchinson_trace(hvp, hvp.n, probes=10)
    assert np.isfinite(est)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_kfac_identity(m: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Ga, Aa = rng.standard_normal((m, m + 2)), rng.standard_normal((n, n + 2))
    G, A = Ga @ Ga.T, Aa @ Aa.T
    delta = rng.standard_normal((m, n))
    vec = delta.T.reshape(-1)  # column-major vec
    expected = 0.5 * vec @ np.kron(A, G) @ vec
    assert kfac_quadratic(G, A, delta) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert kfac_quadratic(None, A, delta) == pytest.approx(
        0.5 * np.trace(delta @ A @ delta.T), rel=1e-10, abs=1e-12
    )
    assert kfac_quadratic(torch.from_numpy(G), torch.from_numpy(A), torch.from_numpy(delta)) == (
        pytest.approx(expected, rel=1e-10, abs=1e-12)
    )
    assert kfac_lambda_max(G, A) == pytest.approx(np.linalg.eigvalsh(np.kron(A, G)).max(), rel=1e-9)
    assert kfac_lambda_max(None, A) == pytest.approx(np.linalg.eigvalsh(A).max(), rel=1e-9)


def test_kfac_lambda_max_indefinite_and_shape_errors() -> None:
    A = np.diag([2.0, -3.0])
    G = np.diag([1.0, -4.0])
    assert kfac_lambda_max(G, A) == pytest.approx(np.linalg.eigvalsh(np.kron(A, G)).max())
    with pytest.raises(ValueError, match="A has shape"):
        kfac_quadratic(None, np.eye(3), np.ones((2, 2)))
    with pytest.raises(ValueError, match="G has shape"):
        kfac_quadratic(np.eye(3), np.eye(2), np.ones((2, 2)))


def test_covariance_accumulator_matches_numpy() -> None:
    rng = np.random.default_rng(6)
    n = 12
    batches = [
        rng.standard_normal((5, n)).astype(np.float32),
        rng.standard_normal((2, 3, n)),
        torch.from_numpy(rng.standard_normal((7, n))).float(),
        rng.standard_normal((1, n)) + 3.0,
    ]
    acc = CovarianceAccumulator(n)
    for b in batches:
        acc.update(b)
    X = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, n) for b in batches])
    assert acc.count == len(X) == 19
    np.testing.assert_allclose(acc.mean().numpy(), X.T @ X / len(X), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(acc.mean_x().numpy(), X.mean(axis=0), rtol=1e-12, atol=1e-14)
    assert acc.trace() == pytest.approx(float((X**2).sum(axis=1).mean()), rel=1e-12)
    vals, vecs = acc.eig_top(3)
    ref_vals, ref_vecs = np.linalg.eigh(X.T @ X / len(X))
    np.testing.assert_allclose(vals.numpy(), ref_vals[::-1][:3], rtol=1e-10)
    for i in range(3):
        overlap = float(vecs[:, i] @ torch.from_numpy(ref_vecs[:, -1 - i]))
        assert abs(overlap) == pytest.approx(1.0, abs=1e-8)
    # Merging two halves equals one pass.
    first, second = CovarianceAccumulator(n), CovarianceAccumulator(n)
    for b in batches[:2]:
        first.update(b)
    for b in batches[2:]:
        second.update(b)
    first.merge(second)
    torch.testing.assert_close(first.mean(), acc.mean(), rtol=1e-12, atol=1e-14)
    assert first.count == acc.count


def test_covariance_accumulator_errors() -> None:
    acc = CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="no samples"):
        acc.mean()
    with pytest.raises(ValueError, match="4 features"):
        acc.update(np.ones((3, 5)))
    with pytest.raises(ValueError):
        acc.merge(CovarianceAccumulator(3))
