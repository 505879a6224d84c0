"""Weights wherever the graph keeps them: ``Constant`` nodes and initializers inside ``If``/``Loop``
bodies, a weight read by both branches of an ``If``, main-graph weights read from a subgraph.

Each model is compressed through :func:`hessc.optimize` or the CLI and run in ONNX Runtime. The
portable form is compared with numpy run on the dequantized weights it holds (exact up to float32
accumulation), and with the float model analytically: RTN moves each weight by at most half a
step ``|s|/2``, so through layers ``y = f(x W)`` with ``f`` 1-Lipschitz (identity, tanh) the error
obeys ``|Δy| ≤ |Δx| · |Ŵ| + |x| · |s|/2``, with ``x`` the float layer input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as b
import hessc
from hessc import cli
from hessc.errors import InputError
from hessc.ir import frontend
from hessc.ir import weights as qweights
from hessc.passes.quantize import InsertQDQPass, PlanQuantizationPass, QuantConfig
from hessc.runtime import calibration as calib
from hessc.runtime.lower import LowerConfig, LowerWeightsPass

FLOAT = TensorProto.FLOAT


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _cond() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("cond", TensorProto.BOOL, [])


def if_model() -> onnx.ModelProto:
    """``y = cond ? (x Wt) Ws : (x Weᵀ + be) Ws``: ``Wt`` (64, 32) and ``We`` (32, 64, read by
    ``Gemm(transB=1)``) are ``Constant`` nodes of their branch, ``Ws`` (32, 32) a main-graph
    initializer read by both branches."""
    out = lambda name: helper.make_tensor_value_info(name, FLOAT, ["B", 32])  # noqa: E731
    then_g = helper.make_graph(
        [_const("Wt", b.weight((64, 32), 0, 0.2)), helper.make_node("MatMul", ["x", "Wt"], ["t0"], name="then_mm"),
         helper.make_node("MatMul", ["t0", "Ws"], ["t"], name="then_shared")],
        "then", [], [out("t")],
    )
    else_g = helper.make_graph(
        [_const("We", b.weight((32, 64), 1, 0.2)), _const("be", b.weight((32,), 2, 0.1)),
         helper.make_node("Gemm", ["x", "We", "be"], ["e0"], name="else_gemm", transB=1),
         helper.make_node("MatMul", ["e0", "Ws"], ["e"], name="else_shared")],
        "else", [], [out("e")],
    )
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    return b.make_model([node], [b.x_input(64), _cond()], [b.y_output(32)], {"Ws": b.weight((32, 32), 3, 0.2)})


def loop_model(nested_if: bool = False) -> onnx.ModelProto:
    """``h ← tanh(h W)`` for ``n`` (a scalar input) iterations of a ``Loop`` whose body holds
    ``W`` (64, 64) as an initializer; with ``nested_if``, the body's ``If(flag)`` (a scalar input
    read from the outer scope) computes ``tanh(h W)`` or ``−tanh(h W)``, both branches reading ``W``."""
    h = lambda name: helper.make_tensor_value_info(name, FLOAT, ["B", 64])  # noqa: E731
    scalar = lambda name, t: helper.make_tensor_value_info(name, t, [])  # noqa: E731
    if nested_if:
        then_g = helper.make_graph([helper.make_node("MatMul", ["h_in", "W"], ["a"]),
                                    helper.make_node("Tanh", ["a"], ["ta"])], "inner_then", [], [h("ta")])
        else_g = helper.make_graph([helper.make_node("MatMul", ["h_in", "W"], ["c"]),
                                    helper.make_node("Tanh", ["c"], ["tc"]),
                                    helper.make_node("Neg", ["tc"], ["nc"])], "inner_else", [], [h("nc")])
        step = [helper.make_node("If", ["flag"], ["h_out"], name="inner", then_branch=then_g, else_branch=else_g)]
    else:
        step = [helper.make_node("MatMul", ["h_in", "W"], ["a"], name="body_mm"),
                helper.make_node("Tanh", ["a"], ["h_out"])]
    body = helper.make_graph(
        [*step, helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [scalar("i", TensorProto.INT64), scalar("c_in", TensorProto.BOOL), h("h_in")],
        [scalar("c_out", TensorProto.BOOL), h("h_out")],
        initializer=[numpy_helper.from_array(b.weight((64, 64), 4, 0.125), "W")],
    )
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)
    inputs = [b.x_input(64), scalar("n", TensorProto.INT64)] + ([scalar("flag", TensorProto.BOOL)] if nested_if else [])
    return b.make_model([loop], inputs, [helper.make_tensor_value_info("y", FLOAT, ["B", 64])])


def _if_feeds(count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((3, 64)).astype(np.float32), "cond": np.array(i % 2 == 0)} for i in range(count)]


def _loop_feeds(count: int = 4, seed: int = 0, flag: bool | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32), "n": np.array(1 + i % 3, np.int64)}
             for i in range(count)]
    if flag is not None:
        for i, feed in enumerate(feeds):
            feed["flag"] = np.array(flag if i % 2 == 0 else not flag)
    return feeds


def _all_nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == op_type]


def _dequantized(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{weight: (dequant(W), |s|/2)}`` in the stored layout, from each weight DequantizeLinear."""
    out = {}
    for dq in _all_nodes(model, "DequantizeLinear"):
        _, scale, _ = b.dq_operands(dq)
        out[dq.inputs[0].name.removesuffix("_q")] = (b.dequantize_linear(dq), 0.5 * np.abs(scale) * (1 + 1e-6) + 1e-7)
    return out


def _check_half_step(deq: dict, weights: dict[str, np.ndarray]) -> None:
    for name, w in weights.items():
        w_hat, half = deq[name]
        assert np.all(np.abs(w_hat - w) <= half), name


def _record(path: Path) -> dict:
    """The plan record a compiled model carries (``metadata_props["hessc.plan"]``)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["hessc.plan"])


def _saved_and_checked(model: ir.Model, tmp_path: Path) -> Path:
    path = hessc.save(model, tmp_path / "out.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    return path


# ------------------------------------------------------------------------------- the front door


def test_subgraph_constants_and_initializers_become_main_graph_weights() -> None:
    model = frontend.load(if_model())
    assert {"Wt", "We", "Ws"} <= set(model.graph.initializers)
    for graph in list(frontend.graphs(model))[1:]:
        assert not graph.initializers and "Constant" not in [n.op_type for n in graph]
    refs = qweights.iter_weights(model)
    found = sorted((r.name, r.op, r.graph.name, tuple(n.op_type for n in r.scope)) for r in refs)
    assert found == [("We", "Gemm", "else", ("If",)), ("Ws", "MatMul", "else", ("If",)),
                     ("Ws", "MatMul", "then", ("If",)), ("Wt", "MatMul", "then", ("If",))]
    for feed in _if_feeds(2):
        np.testing.assert_array_equal(b.run_ort(model, feed)[0], b.run_ort(if_model(), feed)[0])

    loop = frontend.load(loop_model())
    (body,) = list(frontend.graphs(loop))[1:]
    assert "W" in loop.graph.initializers and not body.initializers
    (ref,) = qweights.iter_weights(loop)
    assert ref.graph is body and [n.op_type for n in ref.scope] == ["Loop"] and ref.value.graph is loop.graph


def test_sibling_constants_of_one_name_stay_two_weights() -> None:
    """Both branches may define a ``Constant`` named ``W``; lifted, the second is renamed."""
    out = lambda name: helper.make_tensor_value_info(name, FLOAT, ["B", 32])  # noqa: E731
    branch = lambda tag, seed: helper.make_graph(  # noqa: E731
        [_const("W", b.weight((64, 32), seed)), helper.make_node("MatMul", ["x", "W"], [tag])], tag, [], [out(tag)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("t", 0), else_branch=branch("e", 1))
    proto = b.make_model([node], [b.x_input(64), _cond()], [b.y_output(32)])
    model = frontend.load(proto)
    refs = list(qweights.iter_weights(model))
    assert sorted(r.name for r in refs) == ["W", "W_1"] and refs[0].value is not refs[1].value
    for feed in _if_feeds(2):
        np.testing.assert_array_equal(b.run_ort(model, feed)[0], b.run_ort(proto, feed)[0])


def test_definition_point_is_the_innermost_graph_outside_loop_bodies() -> None:
    model = frontend.load(if_model())
    (if_node,) = model.graph
    by_name: dict[str, list[qweights.WeightRef]] = {}
    for ref in qweights.iter_weights(model):
        by_name.setdefault(ref.name, []).append(ref)
    assert qweights.definition_point(by_name["Ws"]) == (model.graph, if_node), "both branches: before the If"
    graph, first = qweights.definition_point(by_name["Wt"])
    assert graph.name == "then" and first.name == "then_mm", "one branch: in the branch"

    for nested in (False, True):
        loop = frontend.load(loop_model(nested_if=nested))
        refs = list(qweights.iter_weights(loop))
        assert len(refs) == (2 if nested else 1)
        assert qweights.definition_point(refs) == (loop.graph, next(iter(loop.graph))), "out of the loop body"
    with pytest.raises(ValueError):
        qweights.definition_point([])


# ---------------------------------------------------------------------------------- the passes


def test_insert_qdq_defines_each_weight_where_every_reader_sees_it(run_pass) -> None:
    model = b.load_upgraded(if_model())
    assert run_pass(PlanQuantizationPass(QuantConfig(bits=4)), model).modified
    assert run_pass(InsertQDQPass(), model).modified
    assert not run_pass(InsertQDQPass(), model).modified, "a second run finds no float weight"
    (if_node,) = [n for n in model.graph if n.op_type == "If"]
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "If"]
    assert model.graph.node(0).inputs[0].name == "Ws_q", "the shared weight: one DequantizeLinear, before the If"
    then_g, else_g = if_node.attributes["then_branch"].value, if_node.attributes["else_branch"].value
    assert [n.op_type for n in then_g] == ["DequantizeLinear", "MatMul", "MatMul"]
    assert [n.op_type for n in else_g] == ["DequantizeLinear", "Gemm", "MatMul"]
    shared = model.graph.node(0).outputs[0]
    assert {u.node.name for u in shared.uses()} == {"then_shared", "else_shared"}
    assert not {"Wt", "We", "Ws"} & {name for g in frontend.graphs(model) for name in g.initializers}


def test_lowering_rewrites_matmuls_inside_subgraphs_reading_an_outer_dequantize(run_pass) -> None:
    model = b.load_upgraded(loop_model(nested_if=True))
    run_pass(PlanQuantizationPass(QuantConfig(bits=4)), model)
    run_pass(InsertQDQPass(), model)
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "Loop"], "hoisted out of the body"
    deq, _ = _dequantized(model)["W"]
    portable = [b.run_ort(model, feed)[0] for feed in _loop_feeds(4, flag=True)]
    lowering = LowerWeightsPass(LowerConfig(target="cpu", accuracy_level=1))
    assert run_pass(lowering, model).modified
    assert not run_pass(lowering, model).modified
    assert not _all_nodes(model, "DequantizeLinear")
    nbits = _all_nodes(model, "MatMulNBits")
    assert len(nbits) == 2 and nbits[0].inputs[1] is nbits[1].inputs[1], "both branches read one packed B"
    assert nbits[0].inputs[1].name in model.graph.initializers
    assert all(not g.initializers for g in list(frontend.graphs(model))[1:])
    for feed, want in zip(_loop_feeds(4, flag=True), portable):
        np.testing.assert_allclose(b.run_ort(model, feed)[0], want, rtol=1e-4, atol=1e-5)
    # the portable form is the float computation on dequant(W)
    feed = _loop_feeds(1, flag=True)[0]
    h = feed["x"].astype(np.float64)
    for _ in range(int(feed["n"])):
        h = np.tanh(h @ deq)
    np.testing.assert_allclose(portable[0], h, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- end to end


def _if_reference(x: np.ndarray, cond: bool, w: dict[str, np.ndarray], half: dict[str, np.ndarray] | None = None):
    """The If model in numpy (float64) on weights ``w``; with ``half`` (per-weight ``|s|/2``, stored
    layout), also the bound on the output error against those weights' quantized values."""
    x = x.astype(np.float64)
    if cond:
        h = x @ w["Wt"]
        err = None if half is None else np.abs(x) @ half["Wt"]
    else:
        h = x @ w["We"].T + b.weight((32,), 2, 0.1)
        err = None if half is None else np.abs(x) @ half["We"].T
    y = h @ w["Ws"]
    if half is None:
        return y
    return y, err @ (np.abs(w["Ws"]) + half["Ws"]) + np.abs(h) @ half["Ws"]


def test_if_with_branch_constants_and_a_shared_weight_compresses_and_runs(tmp_path: Path) -> None:
    weights = {"Wt": b.weight((64, 32), 0, 0.2), "We": b.weight((32, 64), 1, 0.2), "Ws": b.weight((32, 32), 3, 0.2)}
    model = hessc.optimize(if_model(), target="onnx", calibration=_if_feeds())
    path = _saved_and_checked(model, tmp_path)
    dq = _all_nodes(model, "DequantizeLinear")
    assert sorted(n.inputs[0].name for n in dq) == ["We_q", "Ws_q", "Wt_q"], "one DequantizeLinear per weight"
    deq = _dequantized(model)
    _check_half_step(deq, weights)
    for feed in _if_feeds(4, seed=7):
        (y,) = b.run_ort(str(path), feed)
        (y_float,) = b.run_ort(if_model(), feed)
        cond = bool(feed["cond"])
        np.testing.assert_allclose(y, _if_reference(feed["x"], cond, {k: v[0] for k, v in deq.items()}),
                                   rtol=1e-5, atol=1e-5)
        _, bound = _if_reference(feed["x"], cond, weights, {k: v[1] for k, v in deq.items()})
        assert np.all(np.abs(y - y_float) <= bound + 1e-5)
        assert np.abs(y - y_float).max() > 0, "the weights were quantized"

    # cpu: MatMulNBits inside both branches, the shared weight packed once, in the main graph
    lowered = hessc.optimize(if_model(), calibration=_if_feeds(), activations=16)
    path = _saved_and_checked(lowered, tmp_path)
    assert not _all_nodes(lowered, "DequantizeLinear")
    kernels = {n.name: n for n in _all_nodes(lowered, "MatMulNBits")}
    assert len(kernels) == 4 and {n.graph.name for n in kernels.values()} == {"then", "else"}
    shared = [n for n in kernels.values() if n.inputs[1].name == "Ws_nbits_B"]
    assert len(shared) == 2 and shared[0].inputs[1] is shared[1].inputs[1]
    stored = {name for g in frontend.graphs(lowered) for name in g.initializers}
    assert stored == set(lowered.graph.initializers), "packed weights live in the main graph"
    summary = json.loads(lowered.metadata_props["hessc.plan"])["summary"]
    assert summary["quantized_weights"] == 3
    assert summary["bytes_after"] == sum(v.const_value.nbytes for v in lowered.graph.initializers.values())
    for feed in _if_feeds(4, seed=7):
        want = _if_reference(feed["x"], bool(feed["cond"]), {k: v[0] for k, v in deq.items()})
        np.testing.assert_allclose(b.run_ort(str(path), feed)[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["onnx", "cpu"])
def test_loop_body_initializer_is_compressed_once_outside_the_body(target: str, tmp_path: Path) -> None:
    w = b.weight((64, 64), 4, 0.125)
    model = hessc.optimize(loop_model(), target=target, calibration=_loop_feeds(), activations=16 if target == "cpu" else None)
    path = _saved_and_checked(model, tmp_path)
    (loop,) = [n for n in model.graph if n.op_type == "Loop"]
    body = loop.attributes["body"].value
    if target == "onnx":
        assert [n.op_type for n in model.graph] == ["DequantizeLinear", "Loop"]
        assert [n.op_type for n in body] == ["MatMul", "Tanh", "Identity"]
    else:
        assert [n.op_type for n in body] == ["MatMulNBits", "Tanh", "Identity"]
        assert not _all_nodes(model, "DequantizeLinear")
    portable = model if target == "onnx" else hessc.optimize(loop_model(), target="onnx", calibration=_loop_feeds())
    deq, half = _dequantized(portable)["W"]
    _check_half_step({"W": (deq, half)}, {"W": w})
    for feed in _loop_feeds(3, seed=5):
        (y,) = b.run_ort(str(path), feed)
        (y_float,) = b.run_ort(loop_model(), feed)
        h, h_float, err = (feed["x"].astype(np.float64),) * 2 + (np.zeros((3, 64)),)
        for _ in range(int(feed["n"])):
            err = err @ (np.abs(w) + half) + np.abs(h_float) @ half  # tanh is 1-Lipschitz
            h, h_float = np.tanh(h @ deq), np.tanh(h_float @ w)
        np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4 if target == "cpu" else 1e-5)
        assert np.all(np.abs(y - y_float) <= err + 1e-5) and np.abs(y - y_float).max() > 0


def test_nothing_to_compress_only_when_true_naming_each_weight() -> None:
    out = lambda name: helper.make_tensor_value_info(name, FLOAT, ["B", 8])  # noqa: E731
    small = lambda tag, seed: helper.make_graph(  # noqa: E731
        [_const(f"W{tag}", b.weight((64, 8), seed)), helper.make_node("MatMul", ["x", f"W{tag}"], [tag])],
        tag, [], [out(tag)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=small("t", 0), else_branch=small("e", 1))
    proto = b.make_model([node], [b.x_input(64), _cond()], [b.y_output(8)])
    with pytest.raises(InputError, match=r"nothing hessc can compress \(We: small \(512 < 1024 elements\); "
                                         r"Wt: small \(512 < 1024 elements\)\)"):
        hessc.optimize(proto, target="onnx", calibration=_if_feeds())


# ---------------------------------------------------------------------- scalar inputs and the CLI


def test_scalar_condition_from_npz_through_the_cli(tmp_path: Path, capsys) -> None:
    """``hessc optimize MODEL -o OUT --calibration X.npz`` with a 0-d ``cond``: one bool per sample."""
    model_path = tmp_path / "if.onnx"
    onnx.save(if_model(), model_path)
    npz = tmp_path / "calib.npz"
    feeds = _if_feeds(4)
    np.savez(npz, x=np.stack([f["x"] for f in feeds]), cond=np.array([bool(f["cond"]) for f in feeds]))
    loaded = calib.feeds_from(npz, frontend.load(if_model()))
    assert [f["cond"].shape for f in loaded] == [()] * 4 and [bool(f["cond"]) for f in loaded] == [True, False] * 2
    for target in ("cpu", "onnx"):
        out = tmp_path / f"{target}.onnx"
        code = cli.main(["optimize", str(model_path), "-o", str(out), "--calibration", str(npz), "--target", target,
                         "--json", "--quiet"])
        printed = json.loads(capsys.readouterr().out)
        assert code == 0 and printed["verification"]["status"] == "passed"
        assert sorted(w["name"] for w in _record(out)["weights"]) == ["We", "Ws", "Wt"]
        onnx.checker.check_model(str(out), full_check=True)
        for feed in _if_feeds(2, seed=3):
            (y,) = b.run_ort(str(out), feed)
            (y_float,) = b.run_ort(if_model(), feed)
            rel = np.linalg.norm(y - y_float) / np.linalg.norm(y_float)
            assert 0 < rel < 0.2, (target, bool(feed["cond"]), rel)


def test_budget_keeps_subgraph_weights_on_the_uniform_plan(tmp_path: Path, capsys) -> None:
    """``--bits 6.0``: the curvature annotation sees the main graph only; the branch weights keep
    the uniform 4-bit RTN plan, recorded outside the budget (their bytes taken out of it), and the
    main-graph weight is allocated what is left."""
    proto = if_model()
    graph = proto.graph
    graph.initializer.append(numpy_helper.from_array(b.weight((64, 64), 9, 0.2), "W0"))
    graph.node.insert(0, helper.make_node("MatMul", ["x0", "W0"], ["h0"], name="first"))
    graph.node.insert(1, helper.make_node("Tanh", ["h0"], ["x"]))
    graph.input[0].name = "x0"
    model_path, npz = tmp_path / "mixed.onnx", tmp_path / "calib.npz"
    onnx.save(proto, model_path)
    feeds = _if_feeds(8)
    np.savez(npz, x0=np.stack([f["x"] for f in feeds]), cond=np.array([bool(f["cond"]) for f in feeds]))
    out = tmp_path / "out.onnx"
    code = cli.main(["optimize", str(model_path), "-o", str(out), "--calibration", str(npz), "--bits", "6.0",
                     "--json", "--quiet", "--allow-degraded", "--no-low-rank"])
    capsys.readouterr()
    assert code == 0
    record = _record(out)
    outside = {w["name"]: w for w in record["allocation"]["outside_budget"]}
    assert set(outside) == {"Wt", "We", "Ws"} and all("If/Loop/Scan body" in w["reason"] for w in outside.values())
    plans = {w["name"]: (w["bits"], w["method"]) for w in record["weights"]}
    assert {plans[n] for n in outside} == {(4, "rtn")} and "W0" in plans
    assert [w["name"] for w in record["allocation"]["weights"]] == ["W0"]
    assert record["summary"]["effective_bits_per_weight"] <= 6.0
    onnx.checker.check_model(str(out), full_check=True)
    for feed in _if_feeds(2, seed=3):
        b.run_ort(str(out), {"x0": feed["x"], "cond": feed["cond"]})
