"""Tests for hessc.runtime.sessions: custom-op libraries and the errors of ops ONNX Runtime lacks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import builders as b
from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.runtime import calibration, sessions


def _custom_op_model(domain: str = "com.example", op: str = "MyOp", import_domain: bool = True) -> onnx.ModelProto:
    """``y = MatMul(x, W)`` (x: [2, 2]) followed by ``z = domain:op(y)``."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node(op, ["y"], ["z"], domain=domain)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])
    proto = b.make_model(nodes, [x], [z], {"W": np.array([[2, 1], [0, 4]], np.float32)})
    if import_domain:
        proto.opset_import.append(helper.make_opsetid(domain, 1))
    return proto


def _unchecked(proto: onnx.ModelProto) -> ir.Model:
    """The model as IR without the front door's domain check (what a pass or a caller may hold)."""
    return ir.serde.deserialize_model(proto)


# ---------------------------------------------------------------------------------- ops ORT lacks


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_session_on_an_unregistered_custom_op_names_op_and_domain(tmp_path, target) -> None:
    proto = _custom_op_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    message = r"op 'MyOp' of domain 'com.example'.*--custom-op-library PATH \(custom_op_libraries=\[\.\.\.\]\)"
    for source in (_unchecked(proto), path, str(path)):
        with pytest.raises(InputError, match=message):
            sessions.session(source, target)


def test_missing_opset_import_of_the_domain_names_op_and_domain() -> None:
    with pytest.raises(
        InputError,
        match=r"op 'MyOp' of domain 'com.example' but does not import that domain.*opset_imports\['com.example'\] = 1",
    ):
        sessions.session(_unchecked(_custom_op_model(import_domain=False)))


def test_unknown_op_of_an_onnx_runtime_domain_names_op_and_domain() -> None:
    with pytest.raises(InputError, match=r"op 'NoSuchOp' of domain 'com.microsoft'.*; upgrade onnxruntime, or pass"):
        sessions.session(_unchecked(_custom_op_model("com.microsoft", "NoSuchOp")))


def test_value_taps_on_an_unregistered_custom_op_names_op_and_domain() -> None:
    taps = sessions.ValueTaps(_unchecked(_custom_op_model()))
    try:
        with pytest.raises(InputError, match=r"op 'MyOp' of domain 'com.example'"):
            taps.session(["z"])
    finally:
        taps.close()


def test_other_session_errors_are_not_reported_as_custom_ops() -> None:
    # Add(float, int64) is an invalid graph, not a missing op: ORT's own error comes through.
    node = helper.make_node("Add", ["x", "n"], ["y"])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, ["B", 4])
    proto = b.make_model([node], [b.x_input(4), n], [b.y_output(4)])
    with pytest.raises(Exception) as info:
        sessions.session(_unchecked(proto))
    assert not isinstance(info.value, InputError)


# ---------------------------------------------------------------------------------- libraries


def test_missing_library_is_an_input_error_naming_the_path(tmp_path) -> None:
    missing = tmp_path / "libabsent.so"
    message = f"{missing}: no such custom-op library"
    with pytest.raises(InputError, match=message):
        sessions.session_options(custom_op_libraries=[str(missing)])
    with pytest.raises(InputError, match=message):
        sessions.session(b.load(b.matmul_model()), custom_op_libraries=[str(missing)])
    model = b.load(b.matmul_model())
    model.meta[meta.CUSTOM_OPS_KEY] = (str(missing),)  # the library went away after load
    with pytest.raises(InputError, match=message):
        sessions.session(model)


def test_a_file_that_is_not_a_library_is_an_input_error_naming_the_path(tmp_path) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not a shared library")
    with pytest.raises(InputError, match=f"{fake} is not a custom-op library ONNX Runtime can load"):
        sessions.session_options(custom_op_libraries=[str(fake)])


@pytest.fixture(scope="module")
def extensions_library() -> str:
    """The custom-op library of onnxruntime-extensions (ops of domain ``ai.onnx.contrib``)."""
    extensions = pytest.importorskip("onnxruntime_extensions")
    return extensions.get_library_path()


def test_sessions_on_a_loaded_model_register_its_libraries(extensions_library, tmp_path) -> None:
    proto = _custom_op_model("ai.onnx.contrib", "Inverse")
    with pytest.raises(InputError, match=r"op 'Inverse' of domain 'ai.onnx.contrib'"):
        frontend.load(proto)
    model = frontend.load(proto, custom_op_libraries=[extensions_library])
    x = np.array([[1, 0], [1, 1]], np.float32)
    expected = np.linalg.inv(x @ np.array([[2, 1], [0, 4]], np.float32))
    for source in (model, frontend.clone(model)):
        for optimize in (True, False):
            (z,) = sessions.session(source, optimize=optimize).run({"x": x})
            np.testing.assert_allclose(z, expected, rtol=1e-6)
    ranges = calibration.activation_ranges(model, ["y", "z"], [{"x": x}])  # ValueTaps sessions
    assert ranges["z"] == pytest.approx((float(expected.min()), float(expected.max())))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    (z,) = sessions.session(path, custom_op_libraries=[extensions_library]).run({"x": x})
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    with pytest.raises(InputError, match=r"op 'Inverse' of domain 'ai.onnx.contrib'"):
        sessions.session(path)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_cuda_session_on_an_unregistered_custom_op_names_op_and_domain(monkeypatch) -> None:
    if not sessions.cuda_available():
        # ORT's CPU build warns about the CUDA provider and opens the model on the CPU: the same
        # graph resolution fails on the same op, through the CUDA branch's error handling.
        monkeypatch.setattr(sessions, "cuda_available", lambda: True)
    for cuda_graph in (None, False):
        with pytest.raises(InputError, match=r"op 'MyOp' of domain 'com.example'"):
            sessions.session(_unchecked(_custom_op_model()), "cuda", cuda_graph=cuda_graph)
