"""Tests for hessc.runtime.lower: the portable Q/DQ form → MatMulNBits / GatherBlockQuantized.

The lowered model must compute what its portable form computes. Tolerances: at
``accuracy_level=0`` MatMulNBits dequantizes to float32 and only the summation order differs
(relative error ≤ 1e-4); at ``accuracy_level=4`` the CPU kernel quantizes the activations to int8
per block (a rounding error of up to half of ``max|x_block|/127`` per element, ~0.4 % of the
block's largest activation), so the outputs agree to a relative error of 2e-2, not better.
An embedding lookup reads the same codes and scales, so GatherBlockQuantized is exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import builders as b
from hessc.errors import InputError
from hessc.passes.quantize import InsertQDQPass, PlanQuantizationPass, QuantConfig
from hessc.runtime import lower as lower_module
from hessc.runtime.lower import LOWERING_KEY, MS_DOMAIN, LowerConfig, LowerWeightsPass, lower

KINDS = {
    "matmul": (b.matmul_model, "MatMulNBits"),
    "gemm-bias": (lambda: b.gemm_model(trans_b=1, bias=True), "MatMulNBits"),
    "gather": (b.gather_model, "GatherBlockQuantized"),
}


def _portable(run_pass, proto: onnx.ModelProto, bits: int, symmetric: bool, group: int = 32) -> ir.Model:
    model = b.load_upgraded(proto)
    run_pass(PlanQuantizationPass(QuantConfig(bits=bits, group_size=group, symmetric=symmetric)), model)
    run_pass(InsertQDQPass(), model)
    return model


def _feed(kind: str, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "gather":
        return {"ids": rng.integers(0, 100, size=(4, 5)).astype(np.int64)}
    return {"x": rng.standard_normal((8, 64)).astype(np.float32)}


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("accuracy_level, tolerance", [(4, 2e-2), (0, 1e-4)])
def test_lowered_model_matches_its_portable_form(
    run_pass, kind: str, bits: int, symmetric: bool, accuracy_level: int, tolerance: float
) -> None:
    build, kernel = KINDS[kind]
    model = _portable(run_pass, build(), bits, symmetric)
    portable = b.to_bytes(model)
    feed = _feed(kind)
    (expected,) = b.run_ort(portable, feed, optimize=False)

    lowering = LowerWeightsPass(LowerConfig(target="cpu", accuracy_level=accuracy_level))
    result = run_pass(lowering, model)
    if kind == "gather" and bits == 2:  # GatherBlockQuantized runs 4 and 8 bits only
        assert not result.modified
        assert model.meta[LOWERING_KEY] == {"kept Q/DQ: 2-bit embedding (GatherBlockQuantized runs 4 and 8 bits)": 1}
        assert b.op_types(model) == ["DequantizeLinear", "Gather"]
        return
    assert result.modified
    assert model.meta[LOWERING_KEY] == {f"{kernel} {bits}-bit": 1}
    (node,) = list(model.graph)
    assert (node.op_type, node.domain) == (kernel, MS_DOMAIN)
    assert model.opset_imports[MS_DOMAIN] == 1
    used = {v.name for v in node.inputs if v is not None}
    assert set(model.graph.initializers) <= used, "the portable initializers no longer read are removed"
    if kernel == "MatMulNBits":
        attrs = {k: node.attributes.get_int(k) for k in ("K", "N", "bits", "block_size", "accuracy_level")}
        assert attrs == {"K": 64, "N": 32, "bits": bits, "block_size": 32, "accuracy_level": accuracy_level}
        zp = node.inputs[3] if len(node.inputs) > 3 else None
        assert (zp is None) == symmetric, "zero points only when asymmetric"
        if kind == "gemm-bias":
            assert len(node.inputs) == 6 and node.inputs[5].name == "b"
    else:
        assert node.attributes.get_int("block_size") == 32 and node.attributes.get_int("quantize_axis") == 1

    (actual,) = b.run_ort(model, feed, optimize=True)
    assert actual.shape == expected.shape
    if kind == "gather":
        np.testing.assert_array_equal(actual, expected)
    else:
        assert _rel(actual, expected) <= tolerance

    again = LowerWeightsPass(LowerConfig(target="cpu", accuracy_level=accuracy_level))
    assert not run_pass(again, model).modified


def _folded(model: ir.Model, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs: its level-1 (constant-folded) form, dumped at session creation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "folded.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(b.to_bytes(model), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "folded.onnx"))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_three_bit_codes_are_stored_at_3_bits_and_run_as_four_bit_kernels(
    run_pass, tmp_path, symmetric: bool, accuracy_level: int
) -> None:
    """K = 80 and 100 are not multiples of the block (32; 3 and 4 blocks, so the last zero point is
    a low and a high nibble) and 100 not of 8: the codes are not padded to whole blocks, and the
    unpack graph must add the padding codes the 4-bit kernel layout has."""

    def portable_model() -> ir.Model:
        return _portable(run_pass, b.mlp_model(k=80, hidden=100, n=24), 3, symmetric=symmetric)

    model = portable_model()
    feed = {"x": np.random.default_rng(5).standard_normal((8, 80)).astype(np.float32)}
    (portable,) = b.run_ort(model, feed)
    container, summary4 = lower(
        portable_model(), LowerConfig(target="cpu", accuracy_level=accuracy_level, three_bit=False)
    )
    float_path, _ = lower(portable_model(), LowerConfig(target="cpu", accuracy_level=0, three_bit=False))
    lowering = LowerWeightsPass(LowerConfig(target="cpu", accuracy_level=accuracy_level))
    assert run_pass(lowering, model).modified
    assert summary4 == {"MatMulNBits 4-bit (3-bit codes)": 2}
    assert model.meta[LOWERING_KEY] == {"MatMulNBits 4-bit (3-bit codes stored at 3 bits)": 2}
    kernels = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert [n.attributes.get_int("bits") for n in kernels] == [4, 4]
    assert all(n.inputs[1].producer() is not None for n in kernels), "B is computed from the 3-bit codes"
    shapes = {v.name: v.shape.dims for v in model.graph.initializers.values() if v.name.endswith(("_lows", "_highs"))}
    assert shapes == {  # groups of 8 codes: ⌈80/8⌉ = 10, ⌈100/8⌉ = 13, not whole blocks (12, 16)
        "W1_nbits_lows": (100, 10, 2, 1), "W1_nbits_highs": (100, 10),
        "W2_nbits_lows": (24, 13, 2, 1), "W2_nbits_highs": (24, 13),
    }
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)

    # ORT folds the unpack graph into exactly the 4-bit container's B when the session opens.
    folded = _folded(model, tmp_path)
    assert [n.op_type for n in folded.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    folded_inits = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    container_inits = {v.name: v.const_value.numpy() for v in container.graph.initializers.values()}
    for node in folded.graph.node:
        if node.op_type == "MatMulNBits":
            assert node.input[1] in folded_inits, "MatMulNBits reads an initializer after folding"
            np.testing.assert_array_equal(folded_inits[node.input[1]], container_inits[node.input[1]])

    (expected,) = b.run_ort(container, feed, optimize=True)
    (actual,) = b.run_ort(model, feed, optimize=True)
    np.testing.assert_array_equal(actual, expected)
    # With ORT's optimizations off the unpack graph runs on every call, and MatMulNBits, whose B is
    # then not a constant it can prepack, takes its float path (accuracy_level 0's values).
    (unoptimized,) = b.run_ort(model, feed, optimize=False)
    np.testing.assert_array_equal(unoptimized, b.run_ort(float_path, feed, optimize=True)[0])
    if accuracy_level == 0:
        assert _rel(actual, portable) <= 1e-4
    assert not run_pass(LowerWeightsPass(LowerConfig(target="cpu")), model).modified


def test_three_bit_codes_survive_fp16_lowering(run_pass) -> None:
    """The cuda target's fp16 conversion leaves the integer unpack graph alone (its kernels are
    provider-independent: only the folded B reaches the CUDA provider)."""
    model = _portable(run_pass, b.mlp_model(k=80, hidden=100, n=24), 3, symmetric=False)
    feed = {"x": np.random.default_rng(5).standard_normal((8, 80)).astype(np.float32)}
    container, _ = lower(
        _portable(run_pass, b.mlp_model(k=80, hidden=100, n=24), 3, symmetric=False),
        LowerConfig(target="cuda", fp16=True, three_bit=False),
    )
    lowered, summary = lower(model, LowerConfig(target="cuda", fp16=True))
    assert summary["MatMulNBits 4-bit (3-bit codes stored at 3 bits)"] == 2
    for node in (n for n in lowered.graph if n.op_type == "MatMulNBits"):
        unpack, stack = [], [node.inputs[1].producer()]
        while stack:
            producer = stack.pop()
            unpack.append(producer)
            stack += [v.producer() for v in producer.inputs if v is not None and v.producer() is not None]
        casts = [n.attributes.get_int("to") for n in unpack if n.op_type == "Cast"]
        assert casts == [ir.DataType.INT32], "only the table index is cast; no float casts were added"
        tensors = [n.attributes["value"].value for n in unpack if n.op_type == "Constant"]
        tensors += [v.const_value for n in unpack for v in n.inputs if v is not None and v.const_value is not None]
        assert {t.dtype for t in tensors} == {ir.DataType.UINT8, ir.DataType.INT64}
    scales = [n.inputs[2] for n in lowered.graph if n.op_type == "MatMulNBits"]
    assert all(s.dtype == ir.DataType.FLOAT16 for s in scales)
    np.testing.assert_array_equal(b.run_ort(lowered, feed, optimize=True)[0], b.run_ort(container, feed, optimize=True)[0])


@pytest.mark.parametrize("part", [0, 1], ids=["lows", "highs"])
def test_corrupt_three_bit_codes_are_caught_weight_by_weight(run_pass, monkeypatch, part: int) -> None:
    from hessc.errors import VerificationError
    from hessc.runtime import packing

    model = _portable(run_pass, b.mlp_model(), 3, symmetric=False)
    good = packing.three_bit_weights

    def one_bit_flipped(*args, **kwargs):
        split = [a.copy() for a in good(*args, **kwargs)]
        split[part][-1].reshape(-1)[0] ^= 1  # a bit of a code of the last row
        return tuple(split)

    monkeypatch.setattr(packing, "three_bit_weights", one_bit_flipped)
    monkeypatch.setattr(lower_module, "CHECK_CHUNK", 64)  # checked a few rows at a time: still caught
    with pytest.raises(VerificationError, match="differs from the portable form"):
        lower(model, LowerConfig(target="cpu"))


def test_target_onnx_leaves_the_model_unchanged(run_pass) -> None:
    model = _portable(run_pass, b.mlp_model(), 4, symmetric=False)
    before = b.to_bytes(model)
    lowering = LowerWeightsPass(LowerConfig(target="onnx"))
    assert not run_pass(lowering, model).modified
    assert model.meta[LOWERING_KEY] == {}
    assert b.to_bytes(model) == before


@pytest.mark.parametrize("bits,bias", [(4, True), (3, False)])
def test_gemm_without_trans_b_runs_as_matmul_nbits(run_pass, bits: int, bias: bool) -> None:
    """``Gemm(x, W[K,N], c)`` (GPT-2's Conv1D layers export so): quantized along K (axis 0), it
    runs as ``MatMulNBits`` on the transposed codes, with the bias, and computes the portable form."""
    model = _portable(run_pass, b.gemm_model(trans_b=0, bias=bias), bits, symmetric=False)
    feed = _feed("x")
    (expected,) = b.run_ort(model, feed)
    assert run_pass(LowerWeightsPass(LowerConfig(target="cpu", accuracy_level=0)), model).modified
    assert "Gemm" not in b.op_types(model) and "MatMulNBits" in b.op_types(model)
    nbits = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert (nbits.attributes.get_int("K"), nbits.attributes.get_int("N")) == (64, 32)
    assert len(nbits.inputs) == (6 if bias else 4)
    assert _rel(b.run_ort(model, feed)[0], expected) <= 1e-4


def test_mlp_lowers_every_matmul_and_keeps_graph_io(run_pass) -> None:
    model = _portable(run_pass, b.mlp_model(), 4, symmetric=True)
    io = [(v.name, v.shape, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]]
    feed = b.x_feed(64)
    (expected,) = b.run_ort(model, feed)
    model, summary = lower(model, LowerConfig(target="cpu", accuracy_level=0))
    assert summary == {"MatMulNBits 4-bit": 2}
    assert b.op_types(model) == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert [(v.name, v.shape, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]] == io
    assert _rel(b.run_ort(model, feed)[0], expected) <= 1e-4
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


@pytest.mark.parametrize("kwargs", [{"target": "tpu"}, {"target": "cpu", "fp16": True}])
def test_bad_lower_config_is_an_input_error(kwargs) -> None:
    with pytest.raises(InputError):
        LowerConfig(**kwargs)


def test_a_packing_error_is_caught_weight_by_weight(run_pass, monkeypatch) -> None:
    from hessc.errors import VerificationError
    from hessc.runtime import packing

    model = _portable(run_pass, b.mlp_model(), 4, symmetric=False)
    good = packing.matmul_nbits_weights

    def swapped_nibbles(*args, **kwargs):
        packed_b, zp = good(*args, **kwargs)
        return (packed_b >> 4) | (packed_b << 4), zp  # high and low codes exchanged

    monkeypatch.setattr(packing, "matmul_nbits_weights", swapped_nibbles)
    with pytest.raises(VerificationError, match="differs from the portable form"):
        lower(model, LowerConfig(target="cpu"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("target, scale_bytes", [("cpu", 4), ("cuda", 2)])
def test_kernel_layout_bytes_match_what_the_lowered_model_stores(
    run_pass, bits: int, symmetric: bool, target: str, scale_bytes: int
) -> None:
    """What the allocator prices an item at is what the saved model stores (``cuda``: fp16 scales)."""
    from hessc.ir import meta
    from hessc.passes.quantize import stored_bytes
    from hessc.runtime.lower import quantized_storage

    model = _portable(run_pass, b.matmul_model(k=80, n=24), bits, symmetric=symmetric)  # 80 = 2.5 blocks of 32
    (plan,) = [n.meta[meta.QUANT_KEY] for n in model.graph if meta.QUANT_KEY in n.meta]
    lowered, _ = lower(model, LowerConfig(target=target, fp16=target == "cuda"))
    stored, numel = quantized_storage(ir.from_proto(ir.to_proto(lowered)))  # as saved
    assert numel == 80 * 24
    assert stored == stored_bytes(plan, scale_bytes, kernel_layout=True)
    if bits == 3:  # 3 bits per code, rows padded to groups of 8 codes only; 4-bit zero points, 3 blocks a row
        assert stored == 3 * 24 * 10 + 24 * 3 * scale_bytes + (0 if symmetric else 24 * 2)
        assert stored < stored_bytes(plan, scale_bytes), "3 bits cost less than the 4-bit container"
    else:
        assert stored > stored_bytes(plan, scale_bytes), "blocks padded to whole groups cost more than the portable form"


# ------------------------------------------------------------------------ tied tables and heads


def _tied_portable(run_pass, bits: int, symmetric: bool, width: int = 32, tied: str = "transpose",
                   group: int = 16) -> ir.Model:
    return _portable(run_pass, b.decoder_model(width=width, blocks=1, tied=tied), bits, symmetric, group)


def _tie_model(vocab: int = 40, dim: int = 48) -> onnx.ModelProto:
    """``emb = E[ids]`` and ``y = x @ Eᵀ`` as two outputs: the lookup and the head of one table."""
    nodes = [
        onnx.helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        onnx.helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["x", "Et"], ["y"], name="head"),
    ]
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"])
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", dim])
    emb = onnx.helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, ["N", dim])
    return b.make_model(nodes, [ids, x], [emb, b.y_output(vocab)], {"E": b.weight((vocab, dim), 5)})


def _flat_zero_points_differ(bits: int, symmetric: bool, width: int, group: int = 16) -> bool:
    """Whether MatMulNBits' per-row zero points differ from zero points packed over the table."""
    container = 4 if bits == 3 else bits
    return not symmetric and (-(-width // group) * container) % 8 != 0


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("width", [32, 48, 40], ids=["2-blocks", "3-blocks", "partial-block"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_tied_table_is_lowered_onto_one_packed_table(run_pass, tmp_path, bits, symmetric, width, target) -> None:
    """The head is MatMulNBits; the lookup reads MatMulNBits' bytes (GatherBlockQuantized through
    Reshape views, or, where cuda's kernel reads zero points over the whole table and they differ,
    a float table dequantized from them when the session opens). The file stores the codes once."""
    from hessc.runtime.lower import _stored_sources, quantized_storage

    model = _tied_portable(run_pass, bits, symmetric, width)
    feed = b.ids_feed(40, (2, 7))
    (expected,) = b.run_ort(model, feed)
    portable_bytes, portable_numel = quantized_storage(model)
    assert run_pass(LowerWeightsPass(LowerConfig(target=target, accuracy_level=0)), model).modified
    (key,) = [k for k in model.meta[LOWERING_KEY] if k.startswith("tied table stored once")]
    assert "MatMulNBits" in key
    assert not any(n.op_type in ("DequantizeLinear", "Transpose") for n in model.graph)
    (head,) = [n for n in model.graph if n.op_type == "MatMulNBits" and n.name == "lm_head_nbits"]
    assert (head.attributes.get_int("N"), head.attributes.get_int("K")) == (40, width)
    codes = {id(v) for v in _stored_sources(head.inputs[1])}
    (embed,) = [n for n in model.graph if n.op_type in ("GatherBlockQuantized", "Gather") and n.inputs[1].name == "ids"]
    if target == "cuda" and _flat_zero_points_differ(bits, symmetric, width):
        assert embed.op_type == "Gather" and "float table dequantized from the same bytes" in key
    else:
        assert embed.op_type == "GatherBlockQuantized"
        assert embed.attributes.get_int("bits") == (4 if bits == 3 else bits)
        assert {id(v) for v in _stored_sources(embed.inputs[2])} == {id(v) for v in _stored_sources(head.inputs[2])}
        assert ("sliced to" in key) == (width % 16 != 0)
    head_operands = {id(v) for i in head.inputs[1:4] for v in _stored_sources(i)}
    read = {id(v) for v in _stored_sources(embed.inputs[0])}
    assert codes <= read <= head_operands, "the lookup reads the head's codes (and scales and zero points)"
    table_inits = [v for v in model.graph.initializers.values() if v.name.startswith("E_")]
    assert sorted(v.name for v in table_inits) == sorted(
        ["E_nbits_scales"] + ([] if symmetric else ["E_nbits_zp"])
        + (["E_nbits_lows", "E_nbits_highs"] if bits == 3 else ["E_nbits_B"]))
    stored, numel = quantized_storage(ir.from_proto(ir.to_proto(model)))
    assert numel == portable_numel, "each weight's elements once"
    assert stored == sum(v.const_value.nbytes for v in model.graph.initializers.values() if "_nbits_" in v.name)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for optimize in (False, True):  # the Reshape views and the table graph run, or are folded
        (actual,) = b.run_ort(model, feed, optimize=optimize)
        assert actual.shape == expected.shape and _rel(actual, expected) <= 1e-4
    assert not run_pass(LowerWeightsPass(LowerConfig(target=target, accuracy_level=0)), model).modified


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("dim", [48, 40])
def test_the_lookup_and_the_head_read_the_same_values(run_pass, dim: int, target: str) -> None:
    """Looked up row by row and multiplied by the identity, the lowered table is the portable one."""
    model = _portable(run_pass, _tie_model(dim=dim), 4, symmetric=False, group=16)
    (dq,) = b.nodes_of(model, "DequantizeLinear")
    table = b.dequantize_linear(dq)
    lowered, summary = lower(model, LowerConfig(target=target, accuracy_level=0))
    assert len(summary) == 1 and next(iter(summary)).startswith("tied table stored once")
    feed = {"ids": np.arange(40, dtype=np.int64), "x": np.eye(dim, dtype=np.float32)}
    for optimize in (False, True):
        emb, y = b.run_ort(lowered, feed, optimize=optimize)
        np.testing.assert_allclose(emb, table, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(y.T, table, rtol=1e-6, atol=1e-7)


def test_a_gemm_tied_table_is_lowered_onto_one_packed_table(run_pass) -> None:
    model = _tied_portable(run_pass, 4, symmetric=False, width=32, tied="gemm")
    feed = b.ids_feed(40, (16,))
    (expected,) = b.run_ort(model, feed)
    lowered, summary = lower(model, LowerConfig(target="cpu", accuracy_level=0))
    assert "tied table stored once: MatMulNBits 4-bit + GatherBlockQuantized 4-bit on the same bytes" in summary
    (head,) = [n for n in lowered.graph if n.name == "lm_head_nbits"]
    assert head.inputs[1].name == "E_nbits_B"
    assert _rel(b.run_ort(lowered, feed)[0], expected) <= 1e-4


def test_a_tied_table_stays_portable_without_quantized_lookups(run_pass) -> None:
    model = _tied_portable(run_pass, 4, symmetric=False)
    lowered, summary = lower(model, LowerConfig(target="cpu", gather_quantized=False))
    assert summary["kept Q/DQ: tied table (quantized lookups are off)"] == 1
    (dq,) = [n for n in lowered.graph if n.op_type == "DequantizeLinear"]
    assert sorted(u.node.op_type for u in dq.outputs[0].uses()) == ["Gather", "Transpose"]
