"""The torch executor's GroupQueryAttention and RotaryEmbedding against ONNX Runtime's kernels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import builders
from hessc.ir.executor import TorchExecutor

HEADS, KV_HEADS, HEAD = 4, 2, 16


def _rotary_tables(positions: int, rot: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.arange(positions)[:, None] * (1.0 / 10000 ** (np.arange(0, rot, 2) / rot))[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _gqa_model(rotary: bool, window: int, softcap: float, interleaved: bool, smooth: bool, packed: bool):
    width = (HEADS + 2 * KV_HEADS) * HEAD if packed else HEADS * HEAD
    inputs = [helper.make_tensor_value_info("q", T.FLOAT, ["B", "S", width])]
    names = ["q", "", ""] if packed else ["q", "k", "v"]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, T.FLOAT, ["B", "S", KV_HEADS * HEAD]) for n in ("k", "v")]
    inputs += [helper.make_tensor_value_info(n, T.FLOAT, ["B", KV_HEADS, "P", HEAD]) for n in ("pk", "pv")]
    inputs += [helper.make_tensor_value_info("seqlens", T.INT32, ["B"]), helper.make_tensor_value_info("total", T.INT32, [])]
    names += ["pk", "pv", "seqlens", "total"]
    inits = []
    if rotary:
        cos, sin = _rotary_tables(64, HEAD)
        inits = [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")]
        names += ["cos", "sin"]
    node = helper.make_node(
        "GroupQueryAttention", names, ["o", "ok", "ov"], domain="com.microsoft", num_heads=HEADS,
        kv_num_heads=KV_HEADS, do_rotary=int(rotary), local_window_size=window, softcap=softcap,
        rotary_interleaved=int(interleaved), smooth_softmax=int(smooth),
    )
    graph = helper.make_graph([node], "gqa", inputs, [helper.make_tensor_value_info(n, T.FLOAT, None) for n in ("o", "ok", "ov")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


CONFIGS = {
    "packed-rotary": dict(rotary=True, window=-1, softcap=0.0, interleaved=False, smooth=False, packed=True),
    "window-interleaved": dict(rotary=True, window=3, softcap=0.0, interleaved=True, smooth=False, packed=False),
    "softcap-smooth": dict(rotary=False, window=-1, softcap=5.0, interleaved=False, smooth=True, packed=False),
    "everything": dict(rotary=True, window=4, softcap=2.0, interleaved=False, smooth=True, packed=True),
}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("batch,new,past", [(2, 7, 0), (1, 5, 6), (2, 1, 9)], ids=["prompt", "continuation", "decode"])
def test_group_query_attention_matches_ort(config, batch, new, past):
    proto = _gqa_model(**CONFIGS[config])
    rng = np.random.default_rng(batch * 100 + new * 10 + past)
    width = (HEADS + 2 * KV_HEADS) * HEAD if CONFIGS[config]["packed"] else HEADS * HEAD
    feed = {
        "q": rng.standard_normal((batch, new, width)).astype(np.float32),
        "pk": rng.standard_normal((batch, KV_HEADS, past, HEAD)).astype(np.float32),
        "pv": rng.standard_normal((batch, KV_HEADS, past, HEAD)).astype(np.float32),
        "seqlens": np.full(batch, past + new - 1, np.int32), "total": np.array(past + new, np.int32),
    }
    if not CONFIGS[config]["packed"]:
        feed["k"] = rng.standard_normal((batch, new, KV_HEADS * HEAD)).astype(np.float32)
        feed["v"] = rng.standard_normal((batch, new, KV_HEADS * HEAD)).astype(np.float32)
    ref = builders.run_ort(proto, feed)
    got = TorchExecutor(ir.from_proto(proto)).run(feed)
    for name, r in zip(("o", "ok", "ov"), ref):
        np.testing.assert_allclose(got[name].detach().numpy(), r, atol=2e-5, err_msg=name)


def test_group_query_attention_shared_buffer_keeps_its_length():
    """With the past as long as the whole context (onnxruntime-genai's shared buffer), the present
    is that long too, its first ``total`` entries the cache plus the new keys."""
    proto = _gqa_model(**CONFIGS["packed-rotary"])
    rng = np.random.default_rng(3)
    feed = {
        "q": rng.standard_normal((2, 1, (HEADS + 2 * KV_HEADS) * HEAD)).astype(np.float32),
        "pk": rng.standard_normal((2, KV_HEADS, 32, HEAD)).astype(np.float32),
        "pv": rng.standard_normal((2, KV_HEADS, 32, HEAD)).astype(np.float32),
        "seqlens": np.array([9, 9], np.int32), "total": np.array(10, np.int32),
    }
    ref = builders.run_ort(proto, feed)
    got = TorchExecutor(ir.from_proto(proto)).run(feed)
    assert got["ok"].shape == (2, KV_HEADS, 32, HEAD)
    for name, r in zip(("o", "ok", "ov"), ref):
        np.testing.assert_allclose(got[name].detach().numpy()[..., :10, :] if name != "o" else got[name].detach().numpy(),
                                   r[..., :10, :] if name != "o" else r, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_matches_ort(layout, interleaved):
    cos, sin = _rotary_tables(32, HEAD)
    shape = ["B", "S", HEADS * HEAD] if layout == "3d" else ["B", HEADS, "S", HEAD]
    attrs = {"interleaved": int(interleaved)}
    if layout == "3d":
        attrs["num_heads"] = HEADS
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "rope", [helper.make_tensor_value_info("x", T.FLOAT, shape), helper.make_tensor_value_info("pos", T.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, HEADS * HEAD) if layout == "3d" else (2, HEADS, 6, HEAD)).astype(np.float32)
    feed = {"x": x, "pos": np.stack([np.arange(6), np.arange(3, 9)]).astype(np.int64)}
    (ref,) = builders.run_ort(proto, feed)
    got = TorchExecutor(ir.from_proto(proto)).run(feed)["y"].detach().numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)
