"""fuse-siblings: MatMulNBits layers that read one input become one kernel and a Split, with the
same outputs and the same stored bytes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import onnx
from onnx import helper

import builders
import hessc
from hessc.runtime import fuse, lower


def _gated_mlp(k: int = 64, hidden: int = 96) -> onnx.ModelProto:
    """``down(silu(x·G) * (x·U))`` plus ``x·V`` of another input: G and U are siblings."""
    nodes = [
        helper.make_node("MatMul", ["x", "G"], ["g"]), helper.make_node("MatMul", ["x", "U"], ["u"]),
        helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["a"]),
        helper.make_node("Mul", ["a", "u"], ["h"]), helper.make_node("MatMul", ["h", "D"], ["y"]),
    ]
    inits = {"G": builders.weight((k, hidden), 1), "U": builders.weight((k, hidden), 2), "D": builders.weight((hidden, k), 3)}
    return builders.make_model(nodes, [builders.x_input(k)], [builders.y_output(k)], inits)


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero-points", "symmetric"])
def test_siblings_fuse_into_one_kernel_with_the_same_outputs(symmetric):
    proto = _gated_mlp()
    feed = builders.x_feed(64, batch=3)
    unfused = hessc.optimize(builders.load(proto), target="cpu", bits=4, disable_passes=["fuse-siblings"], verify=False,
                             tune=False, symmetric=symmetric)
    fused = hessc.optimize(builders.load(proto), target="cpu", bits=4, verify=False, tune=False, symmetric=symmetric)
    assert builders.op_types(unfused).count("MatMulNBits") == 3
    assert builders.op_types(fused).count("MatMulNBits") == 2 and "Split" in builders.op_types(fused)
    (node,) = [n for n in fused.graph if n.op_type == "MatMulNBits" and n.attributes.get_int("N") == 192]
    assert node.attributes.get_int("K") == 64
    np.testing.assert_array_equal(builders.run_ort(fused, feed)[0], builders.run_ort(unfused, feed)[0])
    assert lower.quantized_storage(fused) == lower.quantized_storage(unfused)


def test_layers_that_differ_beyond_n_stay_apart():
    model = hessc.optimize(builders.load(_gated_mlp()), target="cpu", bits=4, disable_passes=["fuse-siblings"], verify=False, tune=False)
    gate = next(n for n in model.graph if n.op_type == "MatMulNBits")
    gate.attributes["bits"] = ir.AttrInt64("bits", 8)  # no longer a sibling of up
    assert fuse.fuse_siblings(model.graph) == 0


def test_the_pass_is_in_the_cpu_and_cuda_pipelines():
    from hessc.passes import pipeline
    from hessc.options import CompileOptions
    from hessc.runtime import targets

    assert "fuse-siblings" in pipeline.default_names(CompileOptions(target="cpu"), targets.get("cpu"))
    assert "fuse-siblings" in pipeline.default_names(CompileOptions(target="cuda"), targets.get("cuda"))
    assert "fuse-siblings" not in pipeline.default_names(CompileOptions(target="onnx"), targets.get("onnx"))


def test_weights_shared_across_layers_are_not_copied():
    """A weight that another layer reads too (ALBERT shares its layers) stays one weight."""
    model = hessc.optimize(builders.load(_gated_mlp()), target="cpu", bits=4, disable_passes=["fuse-siblings"], verify=False)
    gate = next(n for n in model.graph if n.op_type == "MatMulNBits")
    twin = ir.node("MatMulNBits", [model.graph.inputs[0], *gate.inputs[1:]], attributes=dict(gate.attributes),
                   domain=fuse.MS_DOMAIN)
    model.graph.append(twin)
    model.graph.outputs.append(twin.outputs[0])
    twin.outputs[0].name = "twin"
    assert fuse.fuse_siblings(model.graph) == 0
