"""Tests for the hessc.passes.hessian package: exact answers on tiny ONNX graphs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import builders
from hessc import progress
from hessc.errors import InputError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.passes import curvature, hessian
from hessc.passes.hessian import AnnotateHessianPass, HessianConfig, annotate, hessian_for, make_layer_hvp
from hessc.passes.hessian import forward, layers

F64 = dict(precision="float64", cache=False)


# ---------------------------------------------------------------------------------------- models


def shared_model() -> onnx.ModelProto:
    """x → MatMul W1 → Relu → r; r feeds both Gemm(W2, transB=1) and MatMul W3 (a shared input)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="gemm", transB=1),
        helper.make_node("MatMul", ["r", "W3"], ["z"], name="mm3"),
    ]
    inits = {"W1": builders.weight((6, 5), 0), "W2": builders.weight((4, 5), 1),
             "b2": builders.weight((4,), 2), "W3": builders.weight((5, 3), 3)}
    outs = [builders.y_output(4, "y"), builders.y_output(3, "z")]
    return builders.make_model(nodes, [builders.x_input(6)], outs, inits)


def conv_model() -> onnx.ModelProto:
    """A grouped, strided, padded, dilated Conv then a 1×1 Conv (auto_pad SAME_UPPER)."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 0, 2, 1], strides=[2, 1],
                         dilations=[1, 2], group=2),
        helper.make_node("Conv", ["c", "V"], ["y"], name="conv2", auto_pad="SAME_UPPER", strides=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 7, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = {"W": builders.weight((6, 2, 3, 2), 0), "V": builders.weight((5, 6, 1, 1), 1)}
    return builders.make_model(nodes, [x], [y], inits)


def lm_model(vocab: int = 11, dim: int = 4) -> onnx.ModelProto:
    """input_ids → Gather(E) → MatMul(W) → logits [B, T, vocab]."""
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W"], ["logits"], name="head"),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", vocab])
    inits = {"E": builders.weight((vocab, dim), 0), "W": builders.weight((dim, vocab), 1)}
    return builders.make_model(nodes, [ids], [out], inits)


def x_feeds(k: int, n: int, batch: int = 5) -> list[dict[str, np.ndarray]]:
    return [builders.x_feed(k, batch, seed=10 + i) for i in range(n)]


def stats_of(model: ir.Model, name: str) -> meta.HessianStats:
    return model.graph.initializers[name].meta[meta.HESSIAN_KEY]


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------------------- A


def test_covariance_matmul_gemm_and_shared_inputs(run_pass) -> None:
    model = builders.load(shared_model())
    feeds = x_feeds(6, 3)
    result = run_pass(AnnotateHessianPass(HessianConfig(cache=False, top_eigs=3), feeds), model)
    assert result.modified is False
    x = np.concatenate([f64(f["x"]) for f in feeds])
    r = np.maximum(np.concatenate([f["x"] @ builders.weight((6, 5), 0) for f in feeds]), 0).astype(np.float64)
    for name, data in (("W1", x), ("W2", r), ("W3", r)):
        s = stats_of(model, name)
        expected = data.T @ data / len(data)
        np.testing.assert_allclose(s.a, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.a_eig_top, np.linalg.eigvalsh(expected)[::-1][:3], rtol=1e-5)
        assert s.a_trace == pytest.approx(np.trace(expected), rel=1e-6)
        assert s.samples == 15 and s.g is None and s.grad is None and s.loss_name is None
    assert stats_of(model, "W2").a is stats_of(model, "W3").a  # one A per shared input
    assert stats_of(model, "b2") if False else "b2" not in [k for k in model.meta[meta.CURVATURE_KEY]]
    summary = model.meta[meta.CURVATURE_KEY]
    assert set(summary) == {"W1", "W2", "W3"}
    assert set(summary["W1"]) == {"samples", "a_eig_max", "a_trace"}
    json.dumps(summary)


def test_split_covariance_keeps_the_even_and_odd_feeds_halves() -> None:
    model = builders.load(shared_model())
    feeds = x_feeds(6, 3)
    AnnotateHessianPass(HessianConfig(cache=False, split_covariance=True), feeds)(model)
    s = stats_of(model, "W1")
    even = np.concatenate([f64(f["x"]) for f in feeds[0::2]])
    odd = np.concatenate([f64(f["x"]) for f in feeds[1::2]])
    np.testing.assert_allclose(s.a_fit, even.T @ even / len(even), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s.a_check, odd.T @ odd / len(odd), rtol=1e-6, atol=1e-8)
    everything = np.concatenate([even, odd])
    np.testing.assert_allclose(s.a, everything.T @ everything / len(everything), rtol=1e-6, atol=1e-8)


def test_a_weight_read_at_every_step_sums_its_inputs_in_one_buffer() -> None:
    """A weight read by several MatMuls (an unrolled recurrence's steps) gets A over all their
    rows, summed into one buffer as they stream in; an input another weight also reads is not
    pooled, and that weight's A stays its own input's."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h1"], name="step1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W"], ["h2"], name="step2"),
        helper.make_node("MatMul", ["h2", "V"], ["y"], name="head"),
    ]
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])
    model = builders.load(builders.make_model(nodes, [x_in], [y_out], {"W": builders.weight((6, 6), 0),
                                                                        "V": builders.weight((6, 3), 1)}))
    feeds = x_feeds(6, 4)
    targets = layers._targets(model)
    pooled = forward.pools([t.acts for t in targets])
    assert sorted({a.name for a in pooled}) == ["r1", "x"] and len(set(pooled.values())) == 1
    AnnotateHessianPass(HessianConfig(cache=False, split_covariance=True), feeds)(model)
    w = builders.weight((6, 6), 0)
    x = np.concatenate([f64(f["x"]) for f in feeds])
    r1 = np.maximum(x @ w, 0)
    rows = np.concatenate([x, r1])
    np.testing.assert_allclose(stats_of(model, "W").a, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    even = np.concatenate([np.concatenate([f64(f["x"]) for f in feeds[0::2]]),
                           np.maximum(np.concatenate([f64(f["x"]) for f in feeds[0::2]]) @ w, 0)])
    np.testing.assert_allclose(stats_of(model, "W").a_fit, even.T @ even / len(even), rtol=1e-5, atol=1e-6)
    h2 = r1 @ w
    np.testing.assert_allclose(stats_of(model, "V").a, h2.T @ h2 / len(h2), rtol=1e-5, atol=1e-6)
    assert stats_of(model, "W").samples == 2 * len(x)


def _patches(x: np.ndarray, kernel, strides, dilations, begin, end, groups) -> np.ndarray:
    """im2col by explicit loops: one row per (image, group, output pixel)."""
    xp = np.pad(x, ((0, 0), (0, 0), (begin[0], end[0]), (begin[1], end[1])))
    b, c, h, w = xp.shape
    kh, kw = kernel
    oh = (h - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    cg = c // groups
    rows = []
    for n in range(b):
        for g in range(groups):
            for i in range(oh):
                for j in range(ow):
                    patch = np.empty((cg, kh, kw))
                    for ci in range(cg):
                        for a in range(kh):
                            for d in range(kw):
                                patch[ci, a, d] = xp[n, g * cg + ci, i * strides[0] + a * dilations[0], j * strides[1] + d * dilations[1]]
                    rows.append(patch.reshape(-1))
    return np.array(rows)


def test_covariance_conv_is_im2col() -> None:
    model = builders.load(conv_model())
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 4, 7, 6)).astype(np.float32)} for _ in range(2)]
    AnnotateHessianPass(HessianConfig(cache=False), feeds)(model)
    x = np.concatenate([f64(f["x"]) for f in feeds])
    p = _patches(x, (3, 2), (2, 1), (1, 2), (1, 0), (2, 1), 2)
    s = stats_of(model, "W")
    assert s.a.shape == (12, 12) and s.samples == len(p)
    np.testing.assert_allclose(s.a, p.T @ p / len(p), rtol=1e-10, atol=1e-12)
    c = torch.nn.functional.conv2d(torch.from_numpy(np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))),
                                   torch.from_numpy(f64(builders.weight((6, 2, 3, 2), 0))), stride=(2, 1),
                                   dilation=(1, 2), groups=2).numpy()
    # 1×1 conv, SAME_UPPER with stride 2 on a 5×4 map: total pad (3-1)·2+1-5 = 0 rows, 0 cols.
    q = _patches(c, (1, 1), (2, 2), (1, 1), (0, 0), (0, 0), 1)
    v = stats_of(model, "V")
    np.testing.assert_allclose(v.a, q.T @ q / len(q), rtol=1e-5, atol=1e-5)
    assert v.samples == len(q)


def test_conv_covariance_predicts_the_real_output_error_of_a_weight_change() -> None:
    """For ``y = Conv(x, W)`` and any change ``Δ`` of ``W``, the mean over output positions of
    ``‖Conv(x, Δ)‖²`` is ``tr(Δ A Δᵀ)`` with ``Δ`` read as ``Δ.reshape(out, −1)``: the feature order
    of the annotated ``A`` is the column order of the weight's matrix view (what GPTQ and the bit
    allocator use). Features in kernel-offset-major order would not give it."""
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2])
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 7, 6])
    w = builders.weight((5, 3, 3, 2), 0)
    model = builders.load(builders.make_model([node], [x_info], [builders.y_output(None)], {"W": w}))
    feeds = [{"x": builders.images(2, 3, 7, seed)[:, :, :, :6].copy()} for seed in range(3)]
    AnnotateHessianPass(HessianConfig(cache=False), feeds)(model)
    (ref,) = qweights.iter_weights(model)
    a = stats_of(model, "W").a
    assert a.shape == (18, 18) and ref.matrix_shape == (5, 18)
    x = torch.from_numpy(np.concatenate([f64(f["x"]) for f in feeds]))
    delta = np.random.default_rng(3).standard_normal(w.shape)
    dy = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 1, 2)), torch.from_numpy(delta),
                                     stride=(2, 1), dilation=(1, 2)).numpy()
    real = float(np.mean(np.sum(dy**2, axis=1)))  # mean over (image, position) of ‖Δ x_p‖²
    d = delta.reshape(5, -1)
    assert float(np.trace(d @ a @ d.T)) == pytest.approx(real, rel=1e-9)
    offset_major = np.arange(18).reshape(3, 6).T.reshape(-1)
    assert float(np.trace(d @ a[offset_major][:, offset_major] @ d.T)) != pytest.approx(real, rel=1e-2)


def test_batch_streaming_equals_one_shot() -> None:
    feeds = x_feeds(6, 6)
    one_shot = [{"x": np.concatenate([f["x"] for f in feeds])}]
    results = []
    for fs, batch_size, budget in ((feeds, 1, 1 << 30), (feeds, 4, 1 << 30), (one_shot, 1, 1 << 30), (feeds, 1, 8)):
        model = builders.load(shared_model())
        AnnotateHessianPass(HessianConfig(cache=False, batch_size=batch_size, max_activation_bytes=budget), fs)(model)
        results.append({n: stats_of(model, n) for n in ("W1", "W2", "W3")})
    for other in results[1:]:
        for n in ("W1", "W2", "W3"):
            np.testing.assert_allclose(other[n].a, results[0][n].a, rtol=1e-12, atol=1e-14)
            assert other[n].samples == results[0][n].samples == 30


def test_max_samples_limits_the_feeds() -> None:
    feeds = x_feeds(6, 5)
    model = builders.load(shared_model())
    AnnotateHessianPass(HessianConfig(cache=False, max_samples=2), feeds)(model)
    x = np.concatenate([f64(f["x"]) for f in feeds[:2]])
    np.testing.assert_allclose(stats_of(model, "W1").a, x.T @ x / len(x), rtol=1e-12)


# ---------------------------------------------------------------------------------------- HVPs


D_IN, HIDDEN, CLASSES, N = 5, 4, 3, 16


def classifier() -> tuple[ir.Model, list[dict], tuple[np.ndarray, ...]]:
    model = builders.load(builders.mlp_model(D_IN, HIDDEN, CLASSES, seed=3))
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((N, D_IN)).astype(np.float32)} for _ in range(2)]
    labels = tuple(rng.integers(0, CLASSES, size=N) for _ in range(2))
    return model, feeds, labels


def torch_loss(w1: torch.Tensor, w2: torch.Tensor, feeds, labels) -> torch.Tensor:
    """The token-weighted mean cross-entropy of y = relu(x W1) W2 over the feeds."""
    parts = []
    for feed, y in zip(feeds, labels):
        x = torch.from_numpy(f64(feed["x"]))
        logits = torch.relu(x @ w1) @ w2
        parts.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="sum"))
    return sum(parts) / sum(len(y) for y in labels)


@pytest.fixture(scope="module")
def exact_blocks():
    model, feeds, labels = classifier()
    w1 = torch.from_numpy(f64(builders.weight((D_IN, HIDDEN), 3)))
    w2 = torch.from_numpy(f64(builders.weight((HIDDEN, CLASSES), 4)))
    h1 = torch.autograd.functional.hessian(lambda w: torch_loss(w.view(D_IN, HIDDEN), w2, feeds, labels), w1.reshape(-1))
    h2 = torch.autograd.functional.hessian(lambda w: torch_loss(w1, w.view(HIDDEN, CLASSES), feeds, labels), w2.reshape(-1))
    return model, feeds, labels, {"W1": (w1, h1), "W2": (w2, h2)}, (w1, w2)


@pytest.mark.parametrize("name", ["W1", "W2"])
def test_layer_hvp_matches_exact_hessian_and_finite_differences(exact_blocks, name: str) -> None:
    model, feeds, labels, blocks, (w1, w2) = exact_blocks
    config = HessianConfig(labels=labels, **F64)
    hvp = make_layer_hvp(model, name, feeds, config)
    w, H = blocks[name]
    assert hvp.n == w.numel() and hvp.dtype == torch.float64

    def grad(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.clone().requires_grad_()
        args = (flat.view(w.shape), w2) if name == "W1" else (w1, flat.view(w.shape))
        return torch.autograd.grad(torch_loss(*args, feeds, labels), flat)[0]

    torch.testing.assert_close(hvp.gradient, grad(w.reshape(-1)), rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(hvp.n, generator=gen, dtype=torch.float64)
        hv = hvp(v)
        torch.testing.assert_close(hv, H @ v, rtol=1e-9, atol=1e-11)
        eps = 1e-5
        fd = (grad(w.reshape(-1) + eps * v) - grad(w.reshape(-1) - eps * v)) / (2 * eps)
        assert (hv - fd).norm() <= 1e-6 * hv.norm()


def test_spectral_statistics_match_eigh(exact_blocks) -> None:
    model, feeds, labels, blocks, _ = exact_blocks
    config = HessianConfig(labels=labels, lambda_max=True, lanczos_k=3, hutchinson_probes=200, hvp_samples=2,
                           hvp_tol=1e-8, hvp_iters=500, covariance=False, **F64)
    result = AnnotateHessianPass(config, feeds)(model)
    assert result.modified is False
    for name, (_, H) in blocks.items():
        s = stats_of(model, name)
        eigs = np.linalg.eigvalsh(H.numpy())
        top = eigs[np.argmax(np.abs(eigs))]
        assert abs(s.lambda_max - top) <= 1e-3 * abs(top)
        np.testing.assert_allclose(s.lanczos_eigs, eigs[::-1][:3], rtol=1e-3)
        # The pass's probes are curvature.hutchinson_trace's: same estimate as on the exact block.
        exact_h = lambda v, H=H: H @ v  # noqa: E731
        same = curvature.hutchinson_trace(exact_h, H.shape[0], probes=200, seed=0, dtype=torch.float64)
        assert s.hutchinson_trace == pytest.approx(same, rel=1e-9)
        # Within 5% at 200 probes where the estimator's sd allows it (W1: sd 2.8% of the trace);
        # W2's block is nearly rank-deficient with large off-diagonals (sd = 4.3%): 3 sd there.
        trace = float(np.trace(H.numpy()))
        sd = float(torch.sqrt(2 * ((H**2).sum() - (H.diagonal() ** 2).sum()) / 200))
        assert abs(s.hutchinson_trace - trace) <= (0.05 * trace if name == "W1" else 3 * sd)
        assert s.loss_name == "ce" and s.a is None and s.samples == 0
    summary = model.meta[meta.CURVATURE_KEY]["W2"]
    assert set(summary) == {"lambda_max", "lanczos_eigs", "hutchinson_trace", "loss", "grad_samples"}


def test_hvp_layers_selects_layers() -> None:
    model, feeds, labels = classifier()
    config = HessianConfig(labels=labels, lambda_max=True, hvp_layers=("W2",), covariance=False, **F64)
    AnnotateHessianPass(config, feeds)(model)
    assert stats_of(model, "W2").lambda_max is not None
    assert stats_of(model, "W1").lambda_max is None


# ---------------------------------------------------------------------------------------- backward


def test_gradient_matches_finite_differences(exact_blocks) -> None:
    model, feeds, labels, blocks, (w1, w2) = exact_blocks
    config = HessianConfig(labels=labels, gradient=True, covariance=False, **F64)
    AnnotateHessianPass(config, feeds)(model)
    eps = 1e-6
    for name, (w, _) in blocks.items():
        grad = stats_of(model, name).grad  # (out, in) = stored.T for MatMul
        assert grad.shape == (w.shape[1], w.shape[0])
        rng = np.random.default_rng(1)
        for _ in range(3):
            d = torch.from_numpy(rng.standard_normal(tuple(w.shape)))
            plus = (w + eps * d, w2) if name == "W1" else (w1, w + eps * d)
            minus = (w - eps * d, w2) if name == "W1" else (w1, w - eps * d)
            fd = float(torch_loss(*plus, feeds, labels) - torch_loss(*minus, feeds, labels)) / (2 * eps)
            assert np.sum(grad * d.numpy().T) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_split_gradient_keeps_the_even_and_odd_feeds_gradients() -> None:
    model, feeds, labels = classifier()
    config = HessianConfig(labels=labels, gradient=True, split_gradient=True, covariance=False, **F64)
    AnnotateHessianPass(config, feeds)(model)
    w1 = torch.from_numpy(f64(builders.weight((D_IN, HIDDEN), 3))).requires_grad_()
    w2 = torch.from_numpy(f64(builders.weight((HIDDEN, CLASSES), 4))).requires_grad_()
    for field, part in (("grad_fit", slice(0, None, 2)), ("grad_check", slice(1, None, 2))):
        expected = torch.autograd.grad(torch_loss(w1, w2, feeds[part], labels[part]), (w1, w2))
        for name, e in zip(("W1", "W2"), expected):  # stats are (out, in): the stored MatMul weight's transpose
            np.testing.assert_allclose(getattr(stats_of(model, name), field), e.numpy().T, rtol=1e-9, atol=1e-12)
    s = stats_of(model, "W1")
    assert not np.allclose(s.grad_fit, s.grad_check)
    np.testing.assert_allclose((s.grad_fit + s.grad_check) / 2, s.grad, rtol=1e-9, atol=1e-12)  # equal-sized feeds


def test_kfac_and_fisher_match_per_sample_outer_products() -> None:
    model, feeds, labels = classifier()
    config = HessianConfig(labels=labels, kfac=True, fisher_diag=True, gradient=True, weighted_covariance=True, **F64)
    AnnotateHessianPass(config, feeds)(model)
    w1 = torch.from_numpy(f64(builders.weight((D_IN, HIDDEN), 3)))
    w2 = torch.from_numpy(f64(builders.weight((HIDDEN, CLASSES), 4)))
    xs, hs, gh, gy = [], [], [], []
    for feed, y in zip(feeds, labels):
        x = torch.from_numpy(f64(feed["x"]))
        h = (x @ w1).requires_grad_()
        r = torch.relu(h)
        logits = (r @ w2).requires_grad_()
        # Per-sample output gradients of ℓ_i: rows are independent, so ∂(Σ ℓ)/∂y_i = ∂ℓ_i/∂y_i.
        loss = torch.nn.functional.cross_entropy(r @ w2, torch.from_numpy(y), reduction="sum")
        g_h, = torch.autograd.grad(loss, h)
        p = torch.softmax(logits.detach(), -1)
        g_y = p - torch.nn.functional.one_hot(torch.from_numpy(y), CLASSES)
        xs.append(x), hs.append(r.detach()), gh.append(g_h), gy.append(g_y)
    for name, inp, g in (("W1", torch.cat(xs), torch.cat(gh)), ("W2", torch.cat(hs), torch.cat(gy))):
        s = stats_of(model, name)
        n = len(g)
        np.testing.assert_allclose(s.g, (g.T @ g / n).numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.grad, (g.T @ inp / n).numpy(), rtol=1e-10, atol=1e-12)
        fisher = ((g * g).T @ (inp * inp) / n).mean()
        assert s.fisher_diag_mean == pytest.approx(float(fisher), rel=1e-10)
        r = (g * g).sum(1, keepdim=True)  # each row weighted by its squared output gradient
        np.testing.assert_allclose(s.a_weighted, ((inp * r).T @ inp / r.sum()).numpy(), rtol=1e-10, atol=1e-12)
        assert s.grad_samples == n and s.loss_name == "ce"
        assert model.meta[meta.CURVATURE_KEY][name]["g_trace"] == pytest.approx(float(np.trace(s.g)))


def test_next_token_loss_auto_and_diagonal_g() -> None:
    model = builders.load(lm_model())
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 11, size=(2, 6))} for _ in range(2)]
    assert hessian.resolve_loss(HessianConfig(), model) == "next-token"
    AnnotateHessianPass(HessianConfig(kfac=True, gradient=True, **F64), feeds)(model)
    E, W = f64(builders.weight((11, 4), 0)), f64(builders.weight((4, 11), 1))
    xs, gs = [], []
    for feed in feeds:
        ids = feed["input_ids"]
        h = E[ids]  # [B, T, 4]
        logits = h @ W
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        g = p[:, :-1] - np.eye(11)[ids[:, 1:]]  # per predicted token: softmax − one-hot(next)
        xs.append(h[:, :-1].reshape(-1, 4)), gs.append(g.reshape(-1, 11))
    x, g = np.concatenate(xs), np.concatenate(gs)
    s = stats_of(model, "W")
    np.testing.assert_allclose(s.g, g.T @ g / len(g), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.grad, g.T @ x / len(g), rtol=1e-9, atol=1e-12)
    assert s.loss_name == "next-token"
    # A wide layer keeps diag(G) only.
    model2 = builders.load(lm_model())
    AnnotateHessianPass(HessianConfig(kfac=True, kfac_diag_above=8, **F64), feeds)(model2)
    s2 = stats_of(model2, "W")
    assert s2.g is None
    np.testing.assert_allclose(s2.g_diag, np.diag(s.g), rtol=1e-12)


def test_kl_sampled_fisher_estimates_the_fisher() -> None:
    """For KL on logits, E[G] = mean_i (diag p_i − p_i p_iᵀ) for the last layer."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="head")]
    proto = builders.make_model(nodes, [builders.x_input(3)], [builders.y_output(4, "logits")],
                                {"W": builders.weight((3, 4), 0, 0.5)})
    model = builders.load(proto)
    feeds = [{"x": np.random.default_rng(0).standard_normal((4000, 3)).astype(np.float32)}]
    assert hessian.resolve_loss(HessianConfig(), model) == "kl"
    AnnotateHessianPass(HessianConfig(kfac=True, gradient=True, **F64), feeds)(model)
    s = stats_of(model, "W")
    logits = f64(feeds[0]["x"]) @ f64(builders.weight((3, 4), 0, 0.5))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    fisher = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
    assert np.linalg.norm(s.g - fisher) <= 0.05 * np.linalg.norm(fisher)
    assert not s.grad.any() and s.loss_name == "kl"  # zero gradient at the fp32 point


def test_mse_gauss_newton_g_for_last_layer_is_about_identity() -> None:
    model = builders.load(shared_model())
    feeds = x_feeds(6, 1, batch=3000)
    assert hessian.resolve_loss(HessianConfig(), model) == "mse"
    AnnotateHessianPass(HessianConfig(kfac=True, **F64), feeds)(model)
    np.testing.assert_allclose(stats_of(model, "W2").g, np.eye(4), atol=0.08)


def test_custom_loss_callable() -> None:
    model, feeds, labels = classifier()

    def loss(outputs, feed):
        return (outputs["y"] ** 2).sum(-1).mean()

    AnnotateHessianPass(HessianConfig(loss=loss, gradient=True, covariance=False, **F64), feeds)(model)
    s = stats_of(model, "W2")
    r = [np.maximum(f64(f["x"]) @ f64(builders.weight((D_IN, HIDDEN), 3)), 0) for f in feeds]
    w2 = f64(builders.weight((HIDDEN, CLASSES), 4))
    expected = sum(2 * (ri @ w2).T @ ri for ri in r) / (2 * N)
    np.testing.assert_allclose(s.grad, expected, rtol=1e-10)
    assert s.loss_name == "custom"


# ---------------------------------------------------------------------------------------- cache


def _count_collectors(monkeypatch) -> dict[str, int]:
    calls = {"forward": 0, "backward": 0}
    forward, backward = annotate._collect_forward, annotate._collect_backward

    def f(*a, **k):
        calls["forward"] += 1
        return forward(*a, **k)

    def b(*a, **k):
        calls["backward"] += 1
        return backward(*a, **k)

    monkeypatch.setattr(annotate, "_collect_forward", f)
    monkeypatch.setattr(annotate, "_collect_backward", b)
    return calls


def test_cache_hits_and_misses(tmp_path, monkeypatch) -> None:
    model, feeds, labels = classifier()
    config = HessianConfig(labels=labels, kfac=True, gradient=True, precision="float64", cache=tmp_path)
    AnnotateHessianPass(config, feeds)(model)
    first = {n: stats_of(model, n) for n in ("W1", "W2")}
    assert list(tmp_path.glob("*/*.json")) and list(tmp_path.glob("*/*.npz"))
    assert not list(tmp_path.rglob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("collected although cached")

    with monkeypatch.context() as m:
        m.setattr(annotate, "_collect_forward", boom)
        m.setattr(annotate, "_collect_backward", boom)
        again = builders.copy(model)
        AnnotateHessianPass(config, feeds)(again)
    for n in ("W1", "W2"):
        s = stats_of(again, n)
        for field in ("a", "a_eig_top", "g", "grad"):
            np.testing.assert_array_equal(getattr(s, field), getattr(first[n], field))
        assert s.samples == first[n].samples and s.loss_name == first[n].loss_name
    assert again.meta[meta.CURVATURE_KEY] == model.meta[meta.CURVATURE_KEY]

    calls = _count_collectors(monkeypatch)
    changed = builders.copy(model)
    w = changed.graph.initializers["W2"]
    w.const_value = ir.tensor(w.const_value.numpy() + np.float32(1e-3), name="W2")
    AnnotateHessianPass(config, feeds)(changed)
    assert calls == {"forward": 1, "backward": 1}
    other_feeds = [dict(f, x=f["x"] * np.float32(1.001)) for f in feeds]
    AnnotateHessianPass(config, other_feeds)(builders.copy(model))
    assert calls == {"forward": 2, "backward": 2}
    AnnotateHessianPass(dataclasses.replace(config, top_eigs=2), feeds)(builders.copy(model))
    assert calls == {"forward": 3, "backward": 3}
    other_labels = tuple((y + 1) % CLASSES for y in labels)
    AnnotateHessianPass(dataclasses.replace(config, labels=other_labels), feeds)(builders.copy(model))
    assert calls == {"forward": 4, "backward": 4}
    AnnotateHessianPass(config, feeds)(builders.copy(model))  # the original is still cached
    assert calls == {"forward": 4, "backward": 4}


def test_cache_false_writes_nothing_and_default_follows_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path / "env"))
    assert hessian.default_cache_dir() == tmp_path / "env" / "hessian"
    monkeypatch.delenv("HESSC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hessian.default_cache_dir() == tmp_path / "xdg" / "hessc" / "hessian"
    model = builders.load(shared_model())
    AnnotateHessianPass(HessianConfig(cache=False), x_feeds(6, 2))(model)
    assert not any(tmp_path.rglob("*"))
    AnnotateHessianPass(HessianConfig(), x_feeds(6, 2))(builders.load(shared_model()))
    assert list((tmp_path / "xdg" / "hessc" / "hessian").glob("*/*.json"))


def test_digests_see_content() -> None:
    a, b = builders.load(shared_model()), builders.load(shared_model())
    assert hessian.model_digest(a) == hessian.model_digest(b)
    b.graph.node(0).attributes["dummy"] = ir.AttrInt64("dummy", 1)
    assert hessian.model_digest(a) != hessian.model_digest(b)
    feeds = x_feeds(6, 2)
    assert hessian.calibration_digest(feeds) != hessian.calibration_digest(feeds[:1])


# ---------------------------------------------------------------------------------------- the pass


def _snapshot(model: ir.Model):
    nodes = [(n.name, n.op_type, [v.name if v else None for v in n.inputs], [v.name for v in n.outputs],
              sorted(n.attributes)) for n in model.graph]
    inits = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    outs = [v.name for v in model.graph.outputs]
    return nodes, inits, outs, [v.name for v in model.graph.inputs]


def test_pass_leaves_graph_unchanged_and_is_idempotent(run_pass) -> None:
    model, feeds, labels = classifier()
    before = _snapshot(model)
    config = HessianConfig(labels=labels, kfac=True, gradient=True, fisher_diag=True, lambda_max=True, **F64)
    for _ in range(2):
        result = run_pass(AnnotateHessianPass(config, feeds), model)
        assert result.modified is False
        after = _snapshot(model)
        assert after[0] == before[0] and after[2:] == before[2:]
        assert after[1].keys() == before[1].keys()
        for k in before[1]:
            np.testing.assert_array_equal(after[1][k], before[1][k])


def test_hessian_for_and_gptq_feed() -> None:
    model = builders.load(shared_model())
    refs = {r.name: r for r in qweights.iter_weights(model)}
    assert hessian_for(refs["W1"]) is None
    AnnotateHessianPass(HessianConfig(cache=False), x_feeds(6, 2))(model)
    a = hessian_for(refs["W1"])
    assert a is stats_of(model, "W1").a and a.shape == (refs["W1"].matrix_shape[1],) * 2
    from hessc.passes import quantizers

    q = quantizers.gptq(refs["W1"].matrix(), a, 4, 0)
    assert q.codes.shape == refs["W1"].matrix_shape


def test_gptq_hessian_blends_the_gradient_weighted_covariance() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4))
    a = x.T @ x / 50
    w = np.r_[100.0, np.ones(49)]  # one row the loss reads a hundred times harder
    aw = (x * w[:, None]).T @ x / w.sum()
    assert hessian.gptq_hessian(meta.HessianStats(samples=50, a=a)) is a
    h = hessian.gptq_hessian(meta.HessianStats(samples=50, a=a, a_weighted=aw))
    s = hessian.WEIGHTED_SHARE
    np.testing.assert_allclose(h, (1 - s) * a / np.trace(a) + s * aw / np.trace(aw))
    # The heavy row's direction gains weight relative to plain A.
    d = x[0] / np.linalg.norm(x[0])
    assert d @ h @ d / np.trace(h) > d @ a @ d / np.trace(a)
    with pytest.raises(ValueError, match="a_weighted"):
        meta.HessianStats(samples=50, a=a, a_weighted=np.eye(3))


def test_gather_and_subgraph_weights_get_no_statistics() -> None:
    model = builders.load(lm_model())
    feeds = [{"input_ids": np.zeros((1, 4), dtype=np.int64)}]
    AnnotateHessianPass(HessianConfig(cache=False), feeds)(model)
    assert meta.HESSIAN_KEY not in model.graph.initializers["E"].meta
    assert set(model.meta[meta.CURVATURE_KEY]) == {"W"}


def test_precondition_without_feeds() -> None:
    with pytest.raises(ir.passes.PreconditionError, match="calibration feeds.*hessc.calibration"):
        AnnotateHessianPass(HessianConfig(cache=False))(builders.load(shared_model()))
    model = builders.load(shared_model())
    model.meta[meta.CALIBRATION_KEY] = x_feeds(6, 2)  # bare feeds, not a Calibration
    with pytest.raises(ir.passes.PreconditionError, match="not the hessc.ir.meta.Calibration"):
        AnnotateHessianPass(HessianConfig(cache=False))(model)


# ---------------------------------------------------------------------------------------- calibration in the IR


def _all_stats(model: ir.Model) -> dict[str, meta.HessianStats]:
    return {k: v.meta[meta.HESSIAN_KEY] for k, v in model.graph.initializers.items() if meta.HESSIAN_KEY in v.meta}


def assert_same_stats(a: ir.Model, b: ir.Model) -> None:
    sa, sb = _all_stats(a), _all_stats(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        for field in dataclasses.fields(sa[name]):
            x, y = getattr(sa[name], field.name), getattr(sb[name], field.name)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y, err_msg=f"{name}.{field.name}")
            else:
                assert x == y, f"{name}.{field.name}"
    assert a.meta[meta.CURVATURE_KEY] == b.meta[meta.CURVATURE_KEY]


def test_feeds_from_the_model_calibration_equal_explicit_feeds(run_pass) -> None:
    feeds = x_feeds(6, 3)
    explicit = builders.load(shared_model())
    run_pass(AnnotateHessianPass(HessianConfig(cache=False, kfac=True), feeds), explicit)
    model = builders.load(shared_model())
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(tuple(feeds))
    p = AnnotateHessianPass(HessianConfig(cache=False, kfac=True))
    state = dict(vars(p))
    for _ in range(2):
        result = run_pass(p, model)
        assert result.modified is False
        assert vars(p) == state  # no state kept between calls
        assert_same_stats(model, explicit)


def test_explicit_feeds_win_over_the_model_calibration() -> None:
    model, feeds, labels = classifier()
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(tuple(x_feeds(D_IN, 2)), labels=labels)
    AnnotateHessianPass(HessianConfig(gradient=True, **F64), feeds)(model)
    reference, _, _ = classifier()
    AnnotateHessianPass(HessianConfig(gradient=True, **F64), feeds)(reference)
    assert_same_stats(model, reference)
    assert stats_of(model, "W1").loss_name == "mse"  # the calibration's labels come with its feeds only


def test_labels_from_the_model_calibration_equal_config_labels() -> None:
    model, feeds, labels = classifier()
    explicit = builders.copy(model)
    config = HessianConfig(gradient=True, kfac=True, **F64)
    AnnotateHessianPass(dataclasses.replace(config, labels=labels), feeds)(explicit)
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(tuple(feeds), labels=labels)
    p = AnnotateHessianPass(config)
    p(model)
    assert_same_stats(model, explicit)
    assert stats_of(model, "W2").loss_name == "ce" and p.config is config and config.labels is None
    # Labels in the config win over the calibration's.
    other = tuple((y + 1) % CLASSES for y in labels)
    AnnotateHessianPass(dataclasses.replace(config, labels=other))(model)
    assert not np.allclose(stats_of(model, "W2").grad, stats_of(explicit, "W2").grad)


def test_loss_from_the_model_calibration_equals_config_loss() -> None:
    model, feeds, _ = classifier()

    def loss(outputs, feed):
        return (outputs["y"] ** 2).sum(-1).mean()

    explicit = builders.copy(model)
    AnnotateHessianPass(HessianConfig(loss=loss, gradient=True, **F64), feeds)(explicit)
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(tuple(feeds), loss=loss)
    AnnotateHessianPass(HessianConfig(gradient=True, **F64))(model)
    assert_same_stats(model, explicit)
    assert stats_of(model, "W2").loss_name == "custom"


def test_cache_key_includes_the_calibration_labels_and_loss(tmp_path, monkeypatch) -> None:
    model, feeds, labels = classifier()
    calls = _count_collectors(monkeypatch)
    config = HessianConfig(gradient=True, precision="float64", cache=tmp_path)

    def run(calibration: meta.Calibration) -> np.ndarray:
        m = builders.copy(model)
        m.meta[meta.CALIBRATION_KEY] = calibration
        AnnotateHessianPass(config)(m)
        return stats_of(m, "W2").grad

    first = run(meta.Calibration(tuple(feeds), labels=labels))
    assert calls == {"forward": 1, "backward": 1}
    np.testing.assert_array_equal(run(meta.Calibration(tuple(feeds), labels=labels)), first)
    assert calls == {"forward": 1, "backward": 1}  # cached
    other = run(meta.Calibration(tuple(feeds), labels=tuple((y + 1) % CLASSES for y in labels)))
    assert calls == {"forward": 2, "backward": 2} and not np.allclose(other, first)
    run(meta.Calibration(tuple(feeds), labels=labels, loss=lambda outputs, feed: outputs["y"].sum()))
    assert calls == {"forward": 3, "backward": 3}


def test_annotations_clear_a_stale_record() -> None:
    model = builders.load(shared_model())
    w1 = model.graph.initializers["W1"]
    meta.invalidate(w1, meta.HESSIAN_KEY, "a rewrite changed W1")
    AnnotateHessianPass(HessianConfig(cache=False), x_feeds(6, 2))(model)
    assert meta.stale_reason(w1, meta.HESSIAN_KEY) is None and meta.STALE_KEY not in w1.meta
    assert isinstance(w1.meta[meta.HESSIAN_KEY], meta.HessianStats)


def test_progress_is_reported_per_stage() -> None:
    model, feeds, labels = classifier()
    events: list[tuple[str, int, int]] = []
    config = HessianConfig(labels=labels, gradient=True, lambda_max=True, hvp_iters=3, **F64)
    with progress.listening(lambda stage, done, total: events.append((stage, done, total))):
        AnnotateHessianPass(config, feeds)(model)
    covariance = [e for e in events if e[0] == "covariance"]
    assert covariance == [("covariance", i + 1, len(covariance)) for i in range(len(covariance))] and covariance
    assert [e for e in events if e[0] == "backward"] == [("backward", 1, 2), ("backward", 2, 2)]
    assert [e for e in events if e[0] == "hvp"] == [("hvp", 1, 2), ("hvp", 2, 2)]
    assert {e[0] for e in events} == {"covariance", "backward", "hvp"}
    AnnotateHessianPass(HessianConfig(cache=False), feeds)(classifier()[0])  # nobody listening
    assert len(events) == len(covariance) + 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_samples=0), "max_samples"),
        (dict(lanczos_k=-1), "lanczos_k"),
        (dict(loss="hinge"), "loss must be one of"),
        (dict(loss="ce"), "needs labels"),
        (dict(precision="float16"), "precision"),
        (dict(lanczos_k=8, lanczos_steps=4), "lanczos_steps"),
        (dict(labels=(np.zeros(3),)), "integer"),
        (dict(hvp_tol=0.0), "hvp_tol"),
    ],
)
def test_config_validation(kwargs, match: str) -> None:
    with pytest.raises(InputError, match=match):
        HessianConfig(**kwargs)


def test_stats_validation_and_summary() -> None:
    with pytest.raises(ValueError, match="square"):
        meta.HessianStats(samples=1, a=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="samples is 0"):
        meta.HessianStats(a=np.eye(2))
    with pytest.raises(ValueError, match="either g or g_diag"):
        meta.HessianStats(g=np.eye(2), g_diag=np.ones(2))
    with pytest.raises(ValueError, match="does not match A"):
        meta.HessianStats(samples=1, a=np.eye(2), grad=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        meta.HessianStats(samples=1, a=np.full((2, 2), np.nan))
    s = meta.HessianStats(samples=4, a=np.eye(2), a_eig_top=np.array([1.0, 1.0]), a_trace=2.0, g_diag=np.ones(3))
    summary = s.summary()
    assert {k: summary[k] for k in ("samples", "a_eig_max", "a_trace", "g_trace")} == {
        "samples": 4, "a_eig_max": 1.0, "a_trace": 2.0, "g_trace": 3.0}
    assert not {"lambda_max", "hutchinson_trace", "fisher_diag_mean", "loss"} & set(summary)


@pytest.mark.models
def test_smollm2_covariance_smoke(tmp_path) -> None:
    from hessc.bench import zoo

    z = zoo.load_zoo("smollm2")
    model = builders.frontend.load(str(z.onnx_path))
    feeds = [{"input_ids": f["input_ids"][:, :32]} for f in z.calibration(2, 0)]
    AnnotateHessianPass(HessianConfig(cache=tmp_path, kfac=True, max_grad_samples=1), feeds)(model)
    summary = model.meta[meta.CURVATURE_KEY]
    assert len(summary) == 211
    head = summary["lm.lm_head.weight"]
    assert head["samples"] == 64 and head["loss"] == "next-token"
    refs = [r for r in qweights.iter_weights(model) if r.op == "MatMul"]
    assert all(hessian_for(r).shape == (r.matrix_shape[1],) * 2 for r in refs)
