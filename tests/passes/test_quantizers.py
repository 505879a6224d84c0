"""Tests for hessc.passes.quantizers: RTN (bit-exact against ONNX Runtime) and GPTQ."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from hessc.passes import quantizers as quantizers_module
from hessc.passes.quantizers import QuantizedWeight, gptq, rtn

BITS = [2, 3, 4, 8]


def _weight(out: int, n_in: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((out, n_in)) * scale).astype(np.float32)


def _correlated_inputs(n_in: int, n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs with a strongly correlated, anisotropic covariance; returns (X, A = XᵀX/N)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n_in, n_in)) / np.sqrt(n_in) + np.eye(n_in)
    mix *= np.exp(rng.uniform(-1.0, 1.0, n_in))[:, None]
    X = rng.standard_normal((n_samples, 8)) @ rng.standard_normal((8, n_in)) + 0.3 * (
        rng.standard_normal((n_samples, n_in)) @ mix
    )
    return X, X.T @ X / n_samples


def _proxy(W: np.ndarray, Wq: np.ndarray, A: np.ndarray) -> float:
    delta = Wq.astype(np.float64) - W.astype(np.float64)
    return float(np.trace(delta @ A @ delta.T))


def _step(q: QuantizedWeight) -> np.ndarray:
    return np.repeat(np.abs(q.scales.astype(np.float64)), q.block, axis=1)


# --------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [0, 16, 32])
def test_rtn_asymmetric_round_trip_within_half_a_step(bits: int, group_size: int) -> None:
    W = _weight(12, 64, seed=bits + group_size)
    q = rtn(W, bits, group_size, symmetric=False)
    assert q.codes.dtype == np.uint8 and q.zero_points is not None
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    assert q.zero_points.max() <= 2**bits - 1
    err = np.abs(q.dequantize().astype(np.float64) - W)
    assert np.all(err <= 0.5 * _step(q) * (1 + 1e-5))
    # Zero is representable exactly (the range is widened to contain it).
    zero = np.zeros_like(W)
    zero[:, 0] = W[:, 0]
    assert np.all(rtn(zero, bits, group_size).dequantize()[:, 1:] == 0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [0, 16])
def test_rtn_symmetric_conventions(bits: int, group_size: int) -> None:
    W = _weight(10, 48, seed=10 * bits + group_size)
    q = rtn(W, bits, group_size, symmetric=True)
    half = 2 ** (bits - 1)
    assert q.zero_points is None and q.codes.dtype == np.int8
    assert q.codes.min() >= -half and q.codes.max() <= half - 1
    # The element of largest |w| maps to exactly -2^(b-1).
    g = q.block
    groups = W.reshape(W.shape[0], -1, g)
    arg = np.abs(groups).argmax(axis=2)
    top_codes = np.take_along_axis(q.codes.reshape(groups.shape), arg[..., None], axis=2)
    assert np.all(top_codes == -half)
    m = np.take_along_axis(groups, arg[..., None], axis=2)[..., 0]
    np.testing.assert_array_equal(q.scales, (m / np.float32(-half)).astype(np.float32))
    # Half a step everywhere except the clipped top code (opposite sign to m), at most one step.
    err = np.abs(q.dequantize().astype(np.float64) - W)
    ratio = W / np.repeat(q.scales, g, axis=1)
    inside = ratio <= half - 0.5
    assert np.all(err[inside] <= 0.5 * _step(q)[inside] * (1 + 1e-5))
    assert np.all(err <= _step(q) * (1 + 1e-5))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_gradient_directed_rounding(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    grad = rng.standard_normal((16, 128))
    nearest = rtn(w, bits, 32, symmetric)
    assert np.array_equal(rtn(w, bits, 32, symmetric, grad, 0.0).codes, nearest.codes)
    directed = rtn(w, bits, 32, symmetric, grad, 0.1)
    np.testing.assert_array_equal(directed.scales, nearest.scales)  # the stored form is RTN's
    moved = directed.codes != nearest.codes
    assert 0 < moved.mean() < 0.3  # only weights in the band, and about a fifth of them land in it
    d_nearest = nearest.dequantize() - w
    d_directed = directed.dequantize() - w
    # Every moved weight now rounds against the gradient, and is one step from the nearest code.
    assert np.all(grad[moved] * d_directed[moved] < 0)
    assert np.all(np.abs(directed.codes.astype(int) - nearest.codes.astype(int)) <= 1)
    assert np.all(np.abs(d_directed[moved]) <= np.repeat(np.abs(nearest.scales), 32, axis=1)[moved] * 0.6 + 1e-6)
    assert np.sum(grad * d_directed) < np.sum(grad * d_nearest)
    everywhere = rtn(w, bits, 32, symmetric, grad, 0.5)
    d_everywhere = everywhere.dequantize() - w
    inside = (everywhere.codes > everywhere.codes.min()) & (everywhere.codes < everywhere.codes.max())
    assert np.all(grad[inside] * d_everywhere[inside] <= 1e-12)  # the band covers every weight
    with pytest.raises(ValueError, match="margin"):
        rtn(w, bits, 32, symmetric, grad, 0.7)


def test_rtn_per_channel_is_one_group_per_row() -> None:
    W = _weight(7, 40, seed=3)
    per_channel = rtn(W, 4, 0)
    whole = rtn(W, 4, 40)
    assert per_channel.scales.shape == (7, 1)
    np.testing.assert_array_equal(per_channel.codes, whole.codes)
    np.testing.assert_array_equal(per_channel.dequantize(), whole.dequantize())


def test_rtn_accepts_torch_and_float64() -> None:
    W = _weight(4, 32, seed=5)
    ref = rtn(W, 4, 16)
    for other in (torch.from_numpy(W), W.astype(np.float64), torch.from_numpy(W).double()):
        q = rtn(other, 4, 16)
        np.testing.assert_array_equal(q.codes, ref.codes)
        np.testing.assert_array_equal(q.scales, ref.scales)


def test_rtn_all_zero_group() -> None:
    W = _weight(3, 32, seed=6)
    W[1, :16] = 0
    for symmetric in (False, True):
        q = rtn(W, 4, 16, symmetric)
        assert q.scales[1, 0] == 1.0
        assert np.all(q.dequantize()[1, :16] == 0)


@pytest.mark.parametrize("group_size", [5, 7, 100, -1])
def test_bad_group_size_names_the_sizes(group_size: int) -> None:
    with pytest.raises(ValueError, match=str(group_size)) as info:
        rtn(_weight(4, 32, seed=0), 4, group_size)
    if group_size > 0:
        assert "32" in str(info.value)
    with pytest.raises(ValueError):
        gptq(_weight(4, 32, seed=0), np.eye(32), 4, group_size)


def test_bad_bits_and_shape() -> None:
    with pytest.raises(ValueError, match="bits"):
        rtn(_weight(4, 32, seed=0), 9, 0)
    with pytest.raises(ValueError, match="shape"):
        rtn(np.zeros((2, 3, 4), np.float32), 4, 0)


def test_stored_bytes() -> None:
    q = rtn(_weight(8, 64, seed=1), 3, 16)
    codes, groups = 8 * 64, 8 * 4
    assert q.stored_bytes() == codes * 3 // 8 + groups * 4 + groups * 3 // 8
    assert q.stored_bytes(container_bits=4) == codes // 2 + groups * 4 + groups // 2
    assert q.stored_bytes(container_bits=4, scale_bytes=2) == codes // 2 + groups * 2 + groups // 2
    s = rtn(_weight(8, 64, seed=1), 4, 0, symmetric=True)
    assert s.stored_bytes() == codes // 2 + 8 * 4
    with pytest.raises(ValueError):
        q.stored_bytes(container_bits=2)


# ----------------------------------------------------------------- bit-exactness against ORT's RTN


def _matmul_model(B: np.ndarray) -> onnx.ModelProto:
    K, N = B.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-end-first bit unpacking along the last axis, as MatMulNBits stores codes."""
    per_byte = 8 // bits
    parts = [(packed >> (bits * i)) & (2**bits - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[0], -1)[:, :count]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_rtn_is_bit_identical_to_ort_matmulnbits(
    bits: int, symmetric: bool, block_size: int
) -> None:
    out, n_in = 24, 256
    W = _weight(out, n_in, seed=bits * block_size + symmetric, scale=0.05)
    W[3, :block_size] = 0.0  # an all-zero block
    W[5] = np.round(W[5] * 40) / 40  # exact ties at several step sizes
    W[7] = np.abs(W[7])  # one-signed rows: vmin/vmax clamp to zero
    model = _matmul_model(np.ascontiguousarray(W.T))
    quantizer = MatMulNBitsQuantizer(
        copy.deepcopy(model), bits=bits, block_size=block_size, is_symmetric=symmetric
    )
    quantizer.process()
    qmodel = quantizer.model.model
    (node,) = qmodel.graph.node
    assert node.op_type == "MatMulNBits"
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    n_blocks = n_in // block_size
    ort_codes = _unpack(inits[node.input[1]].reshape(out, -1), bits, n_in).astype(np.int32)
    ort_scales = inits[node.input[2]].reshape(out, n_blocks)

    q = rtn(W, bits, block_size, symmetric)
    nonzero = ort_scales != 0
    np.testing.assert_array_equal(q.scales[nonzero], ort_scales[nonzero])
    assert np.all(q.scales[~nonzero] == 1.0)
    if symmetric:
        assert len(node.input) == 3  # implicit zero point 2^(b-1)
        np.testing.assert_array_equal(q.codes.astype(np.int32) + 2 ** (bits - 1), ort_codes)
    else:
        ort_zp = _unpack(inits[node.input[3]].reshape(out, -1), bits, n_blocks)
        np.testing.assert_array_equal(q.codes, ort_codes)
        np.testing.assert_array_equal(q.zero_points, ort_zp)

    # ORT's kernel computes with exactly our dequantized weight.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        qmodel.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((5, n_in)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    expected = x.astype(np.float64) @ q.dequantize().astype(np.float64).T
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# -------------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [0, 16, 64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_equals_rtn_for_identity_hessian(bits: int, group_size: int, symmetric: bool) -> None:
    W = _weight(16, 128, seed=bits + group_size)
    a = rtn(W, bits, group_size, symmetric)
    b = gptq(W, np.eye(128), bits, group_size, symmetric, block_size=32)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    if not symmetric:
        np.testing.assert_array_equal(a.zero_points, b.zero_points)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [0, 32])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, group_size: int) -> None:
    n_in = 128
    W = _weight(48, n_in, seed=bits)
    _, A = _correlated_inputs(n_in, 2048, seed=bits + 1)
    loss_rtn = _proxy(W, rtn(W, bits, group_size).dequantize(), A)
    q = gptq(W, A, bits, group_size, block_size=48)  # blocks not aligned to groups: rounded down
    assert q.scales.shape == (48, n_in // (group_size or n_in))
    loss_gptq = _proxy(W, q.dequantize(), A)
    assert loss_gptq < 0.5 * loss_rtn, (loss_gptq, loss_rtn)


def test_gptq_scale_invariant_in_h_and_deterministic() -> None:
    W = _weight(16, 64, seed=2)
    _, A = _correlated_inputs(64, 512, seed=3)
    a = gptq(W, A, 4, 16)
    b = gptq(torch.from_numpy(W), torch.from_numpy(2 * 512 * A), 4, 16)
    c = gptq(W, A, 4, 16)
    np.testing.assert_array_equal(a.codes, c.codes)
    # Same damping relative to mean(diag H); only float rounding differs.
    assert np.mean(a.codes != b.codes) < 0.01


@pytest.mark.parametrize("group_size", [0, 32])
def test_gptq_act_order(group_size: int) -> None:
    n_in = 128
    W = _weight(32, n_in, seed=4)
    _, A = _correlated_inputs(n_in, 2048, seed=5)
    q = gptq(W, A, 3, group_size, act_order=True, static_groups=bool(group_size))
    ref = rtn(W, 3, group_size)
    # Static groups (and per-channel) take scales from the original weight: RTN's scales, in the
    # original column order.
    np.testing.assert_array_equal(q.scales, ref.scales)
    np.testing.assert_array_equal(q.zero_points, ref.zero_points)
    loss_act = _proxy(W, q.dequantize(), A)
    assert loss_act < 0.5 * _proxy(W, ref.dequantize(), A)
    # Identity Hessian: the order does not matter, so act_order reproduces RTN.
    ident = gptq(W, np.eye(n_in), 3, group_size, act_order=True, static_groups=bool(group_size))
    np.testing.assert_array_equal(ident.codes, ref.codes)


def test_gptq_act_order_with_dynamic_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="static_groups"):
        gptq(_weight(4, 64, seed=0), np.eye(64), 4, 32, act_order=True)


def test_gptq_static_groups_without_act_order() -> None:
    W = _weight(16, 64, seed=8)
    _, A = _correlated_inputs(64, 1024, seed=9)
    q = gptq(W, A, 4, 16, static_groups=True)
    np.testing.assert_array_equal(q.scales, rtn(W, 4, 16).scales)
    assert _proxy(W, q.dequantize(), A) < _proxy(W, rtn(W, 4, 16).dequantize(), A)


def test_gptq_dead_columns_and_singular_h() -> None:
    n_in = 64
    W = _weight(8, n_in, seed=11)
    X, _ = _correlated_inputs(n_in, 16, seed=12)  # rank <= 16: singular without damping
    X[:, [3, 40]] = 0.0
    A = X.T @ X / len(X)
    q = gptq(W, A, 4, 16)
    Wq = q.dequantize()
    assert np.all(np.isfinite(Wq))
    assert np.all(Wq[:, [3, 40]] == 0.0)
    for symmetric in (False, True):
        assert np.all(gptq(W, A, 4, 0, symmetric).dequantize()[:, [3, 40]] == 0.0)


def test_gptq_rejects_mismatched_h() -> None:
    with pytest.raises(ValueError, match="expected"):
        gptq(_weight(4, 32, seed=0), np.eye(16), 4, 0)


@pytest.mark.parametrize("limit", [127, 63])
def test_the_narrow_grid_keeps_codes_within_its_limit_for_rtn_and_gptq(limit: int) -> None:
    """``narrow=n``: positive per-channel scales ``max|w| / n`` and signed codes in [−n, n] (the
    channel's extreme weight on ±n); GPTQ rounds onto the same grid."""
    W = _weight(16, 64, 7)
    _, A = _correlated_inputs(64, 256, 7)
    q = rtn(W, 8, 0, narrow=limit)
    np.testing.assert_allclose(q.scales[:, 0], np.abs(W).max(axis=1) / limit, rtol=1e-6)
    assert np.abs(q.codes.astype(np.int32)).max(axis=1).tolist() == [limit] * 16
    g = gptq(W, A, 8, 0, narrow=limit)
    assert np.all(g.scales > 0) and np.abs(g.codes.astype(np.int32)).max() <= limit
    with pytest.raises(ValueError, match="code limit"):
        rtn(W, 8, 0, narrow=128)


@pytest.mark.parametrize("symmetric", [False, True])
def test_large_weights_are_rounded_in_blocks_of_rows_to_the_same_codes(monkeypatch, symmetric: bool) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 64)).astype(np.float32)
    grad = rng.standard_normal(w.shape).astype(np.float32)
    whole = rtn(w, 4, 16, symmetric, grad, 0.1)
    monkeypatch.setattr(quantizers_module, "RTN_CHUNK", 5 * 64)  # blocks of 5 rows, the last of 2
    blocks = rtn(w, 4, 16, symmetric, grad, 0.1)
    np.testing.assert_array_equal(blocks.codes, whole.codes)
    np.testing.assert_array_equal(blocks.scales, whole.scales)
    if not symmetric:
        np.testing.assert_array_equal(blocks.zero_points, whole.zero_points)
