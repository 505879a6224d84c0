"""Tests for hessc.ir.weights: which nodes hold weights, their (out, in) view, and skipped cases."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import builders as b
from hessc.ir import frontend, weights


def _only(model_proto: onnx.ModelProto) -> weights.WeightRef:
    refs, skipped = weights.find_weights(frontend.load(model_proto))
    assert len(refs) == 1 and not skipped, (refs, skipped)
    return refs[0]


def _check_view(ref: weights.WeightRef, proto: onnx.ModelProto, expected: np.ndarray) -> None:
    """The normalised matrix is the expected (out, in) array, and ``y = W x`` holds for it."""
    assert ref.matrix_shape == expected.shape
    np.testing.assert_array_equal(ref.matrix(), expected)
    assert ref.matrix().dtype == np.float32
    assert ref.numel == expected.size


def test_matmul_weight_is_stored_transposed() -> None:
    proto = b.matmul_model(k=64, n=32)
    ref = _only(proto)
    assert (ref.name, ref.op, ref.transposed, ref.stored_shape) == ("W", "MatMul", True, (64, 32))
    _check_view(ref, proto, b.weight((64, 32)).T)
    # y = x @ B = (W x)ᵀ for each row x: the view is the layer's (out, in) matrix.
    x = b.x_feed(64)["x"]
    np.testing.assert_allclose(b.run_ort(proto, {"x": x})[0], x @ ref.matrix().T, rtol=1e-5, atol=1e-5)
    assert ref.activation is ref.node.inputs[0] and ref.activation.name == "x"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_view_follows_trans_b(trans_b: int) -> None:
    proto = b.gemm_model(k=64, n=32, trans_b=trans_b)
    ref = _only(proto)
    stored = b.weight((32, 64) if trans_b else (64, 32))
    assert ref.op == "Gemm" and ref.transposed == (not trans_b)
    _check_view(ref, proto, stored if trans_b else stored.T)
    x = b.x_feed(64)["x"]
    bias = b.weight((32,), 1)
    np.testing.assert_allclose(b.run_ort(proto, {"x": x})[0], x @ ref.matrix().T + bias, rtol=1e-5, atol=1e-5)


def test_conv_weight_is_viewed_per_output_channel() -> None:
    proto = b.conv_model(c_in=8, c_out=16, kernel=3)
    ref = _only(proto)
    assert ref.op == "Conv" and not ref.transposed and ref.stored_shape == (16, 8, 3, 3)
    _check_view(ref, proto, b.weight((16, 8, 3, 3)).reshape(16, 72))


def test_gather_embedding_table_is_the_matrix() -> None:
    proto = b.gather_model(vocab=100, dim=64)
    ref = _only(proto)
    assert ref.op == "Gather" and not ref.transposed and ref.activation is None
    _check_view(ref, proto, b.weight((100, 64)))


def _gather_constant_ids(ids_as_constant_node: bool) -> onnx.ModelProto:
    ids = helper.make_tensor("ids", TensorProto.INT64, [2], [1, 3])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["g"]), helper.make_node("Add", ["g", "x"], ["y"])]
    inits = {"E": b.weight((100, 64))}
    if ids_as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["ids"], value=ids))
    else:
        inits["ids"] = np.array([1, 3], dtype=np.int64)
    return b.make_model(nodes, [b.x_input(64)], [b.y_output(64)], inits)


def test_gather_with_constant_indices_is_not_a_weight() -> None:
    assert weights.find_weights(frontend.load(_gather_constant_ids(False))) == ([], [])


def test_gather_with_constant_node_indices_is_not_a_weight() -> None:
    assert weights.find_weights(frontend.load(_gather_constant_ids(True))) == ([], [])


def test_matmul_of_two_activations_is_not_a_weight() -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 32])
    proto = b.make_model([node], [b.x_input(64), w], [b.y_output(32)])
    assert weights.find_weights(frontend.load(proto)) == ([], [])


# ---------------------------------------------------------------------------------- skipped


def _skipped(proto: onnx.ModelProto) -> weights.Skipped:
    refs, skipped = weights.find_weights(frontend.load(proto))
    assert not refs and len(skipped) == 1, (refs, skipped)
    return skipped[0]


def test_3d_matmul_weight_is_skipped_with_a_reason() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "B", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "B", 8])
    s = _skipped(b.make_model([node], [x], [y], {"W": b.weight((4, 16, 8))}))
    assert (s.name, s.op) == ("W", "MatMul")
    assert "3-D MatMul weight" in s.reason


def test_gemm_with_trans_a_is_skipped_with_a_reason() -> None:
    s = _skipped(b.gemm_model(trans_a=1))
    assert (s.name, s.op, s.reason) == ("W", "Gemm", "Gemm with transA=1")


@pytest.mark.parametrize("dtype", [np.int8, np.int32])
def test_integer_weight_is_skipped_with_a_reason(dtype) -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    x = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["B", 64])
    y = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["B", 32])
    s = _skipped(b.make_model([node], [x], [y], {"W": np.ones((64, 32), dtype=dtype)}))
    assert s.name == "W" and "is not a float type" in s.reason


def test_gather_on_axis_1_is_skipped_with_a_reason() -> None:
    node = helper.make_node("Gather", ["E", "ids"], ["y"], axis=1)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [100, "B"])
    s = _skipped(b.make_model([node], [ids], [y], {"E": b.weight((100, 64))}))
    assert "axis 0" in s.reason


# ---------------------------------------------------------------------------------- names


def _with_value_metadata(proto: onnx.ModelProto, name: str, key: str, value: str) -> onnx.ModelProto:
    init = next(i for i in proto.graph.initializer if i.name == name)
    info = helper.make_tensor_value_info(name, init.data_type, list(init.dims))
    entry = info.metadata_props.add()
    entry.key, entry.value = key, value
    proto.graph.value_info.append(info)
    return proto


def test_name_comes_from_the_exporters_folded_from_metadata() -> None:
    proto = _with_value_metadata(b.matmul_model(), "W", frontend.FOLDED_FROM_KEY, "['encoder.fc1.weight']")
    assert _only(proto).name == "encoder.fc1.weight"


def test_ambiguous_folded_from_keeps_the_value_name() -> None:
    proto = _with_value_metadata(b.matmul_model(), "W", frontend.FOLDED_FROM_KEY, "['a.weight', 'b.weight']")
    assert _only(proto).name == "W"


@pytest.mark.torch
def test_names_of_an_exported_torch_model_are_the_parameter_names() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            self.proj = torch.nn.Linear(32, 16, bias=False)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    net = Net()
    model = frontend.load(net, (torch.randint(0, 50, (2, 5)),))
    refs, skipped = weights.find_weights(model)
    assert not skipped
    by_name = {r.name: r for r in refs}
    assert set(by_name) == {"emb.weight", "proj.weight"}
    assert by_name["proj.weight"].op == "MatMul"  # 3-D activations: MatMul on the folded Wᵀ
    np.testing.assert_array_equal(by_name["proj.weight"].matrix(), net.proj.weight.detach().numpy())
    np.testing.assert_array_equal(by_name["emb.weight"].matrix(), net.emb.weight.detach().numpy())
