"""Tests for hessc.ir.frontend: every input kind, input errors, opset checks, normalisation."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as b
import hessc
from hessc.errors import InputError, UnsupportedError
from hessc.ir import frontend, weights


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def torch_mlp():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    return module, (torch.randn(2, 64),)


# ---------------------------------------------------------------------------------- input kinds


def test_loads_path_and_model_proto(tmp_path) -> None:
    proto = b.matmul_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    for source in (path, str(path), proto):
        model = frontend.load(source)
        assert isinstance(model, ir.Model)
        assert [v.name for v in model.graph.inputs] == ["x"]
        assert [v.name for v in model.graph.outputs] == ["y"]
        np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), b.weight((64, 32)))


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_initializers_listed_as_graph_inputs_are_weights(tmp_path, target: str) -> None:
    """Older exporters list every initializer as a graph input too (IR < 4): compressed, such a
    weight must not be left as an input nothing can feed."""
    proto = b.mlp_model()
    proto.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in proto.graph.initializer)
    path = tmp_path / "listed.onnx"
    onnx.save(proto, path)
    out = hessc.optimize(str(path), target=target, bits=4)
    assert [v.name for v in out.graph.inputs] == ["x"]
    feed = b.x_feed(64)
    ref = b.run_ort(proto, feed)[0]
    got = b.run_ort(out, feed)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2  # 4-bit codes of random weights


@pytest.mark.parametrize("wrap", ["Identity", "Cast"])
def test_a_weight_read_through_an_identity_or_a_cast_is_found(wrap: str) -> None:
    """``MatMul(x, Identity(W))`` and ``MatMul(x, Cast(W16, to=float))`` read a weight: the front
    door folds the node, so the weight is planned (a float16 one at the float32 it is read as)."""
    w = b.weight((64, 32))
    stored = w.astype(np.float16) if wrap == "Cast" else w
    attrs = {"to": TensorProto.FLOAT} if wrap == "Cast" else {}
    nodes = [helper.make_node(wrap, ["W"], ["Wr"], **attrs), helper.make_node("MatMul", ["x", "Wr"], ["y"])]
    proto = b.make_model(nodes, [b.x_input(64)], [b.y_output(32)], {"W": stored})
    model = frontend.load(proto)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    (ref,) = weights.iter_weights(model)
    np.testing.assert_array_equal(ref.value.const_value.numpy(), stored.astype(np.float32))
    assert ref.name == "W" and ref.value.dtype == ir.DataType.FLOAT
    out = hessc.optimize(proto, target="onnx", bits=4)
    summary = hessc.ir.meta.read_plan(out)["summary"]
    assert summary["quantized_weights"] == 1 and summary["bytes_before"] == stored.nbytes


def test_onnx_ir_model_is_normalised_in_place_and_returned() -> None:
    model = ir.serde.deserialize_model(b.matmul_model())
    assert frontend.load(model) is model


@pytest.mark.torch
def test_loads_torch_module(torch_mlp) -> None:
    torch = pytest.importorskip("torch")
    module, example = torch_mlp
    module.train()
    model = frontend.load(module, example)
    assert module.training, "the module's train/eval mode is restored after export"
    refs, _ = weights.find_weights(model)
    assert sorted(r.name for r in refs) == ["0.weight", "2.weight"]
    x = example[0].numpy()
    (y,) = b.run_ort(model, {model.graph.inputs[0].name: x})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(example[0]).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_torch_module_without_example_inputs_is_an_input_error(torch_mlp) -> None:
    module, _ = torch_mlp
    with pytest.raises(InputError, match="example_inputs"):
        frontend.load(module)


@pytest.mark.torch
def test_a_module_returning_objects_beside_tensors_exports_its_tensors() -> None:
    """A transformers model returns its KV cache object beside the logits; torch.export cannot
    return such an object, so the module's tensors are exported, under their keys and the
    module's own input names."""
    torch = pytest.importorskip("torch")

    class State:  # an object torch.export does not know
        pass

    class WithState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 32)

        def forward(self, features):
            return {"logits": self.linear(features), "cache": State()}

    model = frontend.load(WithState(), (torch.randn(2, 64),))
    assert [v.name for v in model.graph.inputs] == ["features"]
    assert [v.name for v in model.graph.outputs] == ["logits"]


@pytest.mark.torch
def test_an_unexportable_module_is_refused_with_the_exporters_reason() -> None:
    torch = pytest.importorskip("torch")

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x[: int(x.sum().item() > 0)] if x.sum() > 0 else x  # Python control flow on values

    with pytest.raises(InputError, match=r"torch.onnx.export failed for DataDependent: \w+"):
        frontend.load(DataDependent(), (torch.randn(4, 8),))


def test_unknown_source_type_is_an_input_error() -> None:
    with pytest.raises(InputError, match="cannot load a int"):
        frontend.load(42)


# ---------------------------------------------------------------------------------- bad inputs


def test_missing_file_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file; check the path"):
        frontend.load(tmp_path / "absent.onnx")


def test_directory_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="is a directory; pass the .onnx file inside it"):
        frontend.load(tmp_path)


@pytest.mark.parametrize("content", [b"this is not a model\x00\xff\xfe", b'{"not": "onnx"}'])
def test_garbage_file_is_an_input_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a readable ONNX model.*pass a .onnx file"):
        frontend.load(path)


@pytest.mark.parametrize("content", [b"", b"\x08\x96\x01" * 7], ids=["empty", "protobuf-varints"])
def test_file_that_parses_as_an_empty_protobuf_is_an_input_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError):
        frontend.load(path)


def test_opset_too_high_is_unsupported() -> None:
    proto = b.matmul_model(opset=frontend.max_ort_opset() + 1)
    with pytest.raises(UnsupportedError, match=f"opset {frontend.max_ort_opset() + 1}"):
        frontend.load(proto)


def test_opset_too_low_is_unsupported() -> None:
    proto = b.matmul_model()
    proto.opset_import[0].version = 6
    with pytest.raises(UnsupportedError, match="convert_version"):
        frontend.load(proto)


def _custom_op_model(domain: str = "com.example", op: str = "MyOp", import_domain: bool = True) -> onnx.ModelProto:
    """``y = MatMul(x, W)`` followed by ``z = domain:op(y)``."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node(op, ["y"], ["z"], domain=domain)]
    proto = b.make_model(nodes, [b.x_input(8)], [b.y_output(8, "z")], {"W": b.weight((8, 8))})
    if import_domain:
        proto.opset_import.append(helper.make_opsetid(domain, 1))
    return proto


def test_op_of_an_unknown_domain_is_an_input_error_naming_op_and_domain() -> None:
    with pytest.raises(
        InputError,
        match=r"op 'MyOp' of domain 'com.example'.*--custom-op-library PATH \(custom_op_libraries=\[\.\.\.\]\)",
    ):
        frontend.load(_custom_op_model())


def test_unknown_ops_are_found_in_subgraphs_and_functions_and_listed_once() -> None:
    model = ir.serde.deserialize_model(_custom_op_model(op="Second"))
    first = helper.make_node("First", ["x"], ["t"], domain="org.acme")
    then_g = helper.make_graph([first], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    proto = b.make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=then_g)],
        [b.x_input(8), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [b.y_output()],
    )
    assert frontend.check_domains(ir.serde.deserialize_model(proto), ["lib.so"]) == [("org.acme", "First")]
    inner = helper.make_node("Inner", ["a"], ["b"], domain="org.acme")
    wrap = helper.make_function("local.fns", "Wrap", ["a"], ["b"], [inner], [helper.make_opsetid("org.acme", 1)])
    proto.functions.append(wrap)  # a local function whose body calls a custom op
    assert frontend.check_domains(ir.serde.deserialize_model(proto), ["lib.so"]) == [
        ("org.acme", "First"), ("org.acme", "Inner"),
    ]
    assert frontend.check_domains(model, ["lib.so"]) == [("com.example", "Second")]
    with pytest.raises(InputError, match=r"op 'First' of domain 'org.acme'"):
        frontend.check_domains(ir.serde.deserialize_model(proto))


def test_ops_of_onnx_runtime_domains_and_local_functions_are_known() -> None:
    nodes = [
        helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
        helper.make_node("Double", ["g"], ["y"], domain="local.fns"),
    ]
    proto = b.make_model(nodes, [b.x_input(8)], [b.y_output(8)])
    proto.opset_import.extend([helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("local.fns", 1)])
    proto.functions.append(
        helper.make_function(
            "local.fns", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
            [helper.make_opsetid("", b.OPSET)],
        )
    )
    model = frontend.load(proto)
    assert frontend.check_domains(model) == []
    feed = b.x_feed(8)
    x = feed["x"]
    gelu = 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    np.testing.assert_allclose(b.run_ort(model, feed)[0], 2 * gelu, rtol=1e-5, atol=1e-6)


def test_custom_op_libraries_are_recorded_on_the_model(tmp_path) -> None:
    from hessc.ir import meta

    library = tmp_path / "libmyops.so"
    library.write_bytes(b"")  # only its existence is checked at load; sessions load it
    model = frontend.load(_custom_op_model(), custom_op_libraries=[library])
    assert model.meta[meta.CUSTOM_OPS_KEY] == (str(library.resolve()),)
    assert frontend.clone(model).meta[meta.CUSTOM_OPS_KEY] == (str(library.resolve()),)
    again = frontend.load(model)  # a loaded model keeps its libraries
    assert again.meta[meta.CUSTOM_OPS_KEY] == (str(library.resolve()),)
    plain = frontend.load(b.matmul_model())
    assert meta.CUSTOM_OPS_KEY not in plain.meta


def test_missing_custom_op_library_is_an_input_error_naming_the_path(tmp_path) -> None:
    missing = tmp_path / "libabsent.so"
    with pytest.raises(InputError, match=f"{missing}: no such custom-op library"):
        frontend.load(_custom_op_model(), custom_op_libraries=[missing])
    with pytest.raises(InputError, match=f"{tmp_path}: no such custom-op library"):
        frontend.load(_custom_op_model(), custom_op_libraries=[tmp_path])
    with pytest.raises(InputError, match=f"{missing}: no such custom-op library"):
        frontend.load(_custom_op_model(), custom_op_libraries=str(missing))  # one path, not its letters


# ---------------------------------------------------------------------------------- normalisation


def test_weight_in_constant_node_is_lifted_to_an_initializer() -> None:
    w = b.weight((64, 32))
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc")),
        helper.make_node("MatMul", ["x", "Wc"], ["y"]),
    ]
    proto = b.make_model(nodes, [b.x_input(64)], [b.y_output(32)])
    model = frontend.load(proto)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert "Wc" in model.graph.initializers
    refs, skipped = weights.find_weights(model)
    assert [(r.name, r.op) for r in refs] == [("Wc", "MatMul")] and not skipped
    feed = b.x_feed(64)
    np.testing.assert_array_equal(b.run_ort(model, feed)[0], b.run_ort(proto, feed)[0])


def test_weights_inside_if_subgraphs_are_found() -> None:
    model = frontend.load(b.if_model())
    refs, skipped = weights.find_weights(model)
    found = {r.name: r for r in refs}
    assert set(found) == {"W_then", "W_else"} and not skipped
    assert found["W_then"].graph.name == "then" and found["W_else"].graph.name == "else"
    assert found["W_then"].graph is not model.graph
    np.testing.assert_array_equal(found["W_then"].matrix(), b.weight((64, 32), 0).T)
    for cond in (True, False):
        feed = {**b.x_feed(64), "cond": np.array(cond)}
        np.testing.assert_array_equal(b.run_ort(model, feed)[0], b.run_ort(b.if_model(), feed)[0])


def _transposed_weight_model(perm=(1, 0), folded_from: str | None = None) -> onnx.ModelProto:
    """``y = x @ Transpose(Wp)`` with the parameter ``Wp`` stored (out=32, in=64) as torch does."""
    nodes = [
        helper.make_node("Transpose", ["Wp"], ["Wt"], perm=list(perm)),
        helper.make_node("MatMul", ["x", "Wt"], ["y"]),
    ]
    proto = b.make_model(nodes, [b.x_input(64)], [b.y_output(32)], {"Wp": b.weight((32, 64), 3)})
    if folded_from is not None:
        # The exporter's optimizer records it on the value (saved as value_info metadata).
        info = helper.make_tensor_value_info("Wp", TensorProto.FLOAT, [32, 64])
        entry = info.metadata_props.add()
        entry.key, entry.value = frontend.FOLDED_FROM_KEY, folded_from
        proto.graph.value_info.append(info)
    return proto


def test_transpose_of_weight_is_folded_and_keeps_the_parameter_name() -> None:
    proto = _transposed_weight_model()
    model = frontend.load(proto)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert "Wp" not in model.graph.initializers, "the untransposed copy is removed"
    (ref,), _ = weights.find_weights(model)
    assert ref.name == "Wp" and ref.op == "MatMul" and ref.transposed
    np.testing.assert_array_equal(ref.value.const_value.numpy(), b.weight((32, 64), 3).T)
    np.testing.assert_array_equal(ref.matrix(), b.weight((32, 64), 3))
    assert frontend.original_name(ref.value) == "Wp"
    feed = b.x_feed(64)
    np.testing.assert_allclose(b.run_ort(model, feed)[0], b.run_ort(proto, feed)[0], rtol=1e-6, atol=1e-6)


def test_folded_transpose_keeps_the_exporter_folded_from_name() -> None:
    model = frontend.load(_transposed_weight_model(folded_from="['layers.0.fc.weight']"))
    (ref,), _ = weights.find_weights(model)
    assert ref.name == "layers.0.fc.weight"


def test_transpose_feeding_a_non_matmul_is_not_folded() -> None:
    nodes = [
        helper.make_node("Transpose", ["Wp"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["y"]),
        helper.make_node("Identity", ["Wt"], ["z"]),
    ]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 32])
    proto = b.make_model(nodes, [b.x_input(64)], [b.y_output(32), z], {"Wp": b.weight((32, 64), 3)})
    model = frontend.load(proto)
    assert [n.op_type for n in model.graph] == ["Transpose", "MatMul", "Identity"]


def test_load_and_optimize_do_not_modify_the_input_file(tmp_path) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(b.mlp_model(), path)
    before = _sha(path)
    frontend.load(path)
    model = hessc.optimize(path, target="cpu", bits=4)
    hessc.save(model, tmp_path / "out.onnx")
    assert _sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_clone_keeps_external_data_readable(tmp_path) -> None:
    import onnx_ir as ir

    model = b.load(b.mlp_model())
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    loaded = frontend.load(tmp_path / "m.onnx")
    copy = frontend.clone(loaded)
    for name, value in loaded.graph.initializers.items():
        np.testing.assert_array_equal(copy.graph.initializers[name].const_value.numpy(), value.const_value.numpy())
    ir.save(copy, tmp_path / "copy.onnx", external_data="copy.onnx.data")


def test_clone_keeps_the_weight_name_and_the_tie_of_a_folded_output_projection() -> None:
    from hessc.ir import meta

    # A tied table E (vocab=40, dim=16): Gather(E) embeds, x @ Transpose(E) projects back.
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["y"]),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])
    proto = b.make_model(nodes, [ids], [b.y_output(40)], {"E": b.weight((40, 16), 5)})
    model = frontend.load(proto)
    copy = frontend.clone(model)
    for m in (model, copy):
        refs = {r.op: r for r in weights.iter_weights(m)}
        assert refs["MatMul"].name == "E" and refs["MatMul"].value.meta[meta.TIED_KEY] == "E"
