"""``hessc bench --model forms``: a zoo of graph forms hessc must handle, each compiled for the
CPU with its default settings, verified in ONNX Runtime and timed against its float model.

The forms are where weights hide or where kernels differ: a weight in a ``Constant`` node, weights
in both branches of an ``If`` and in a ``Loop`` body, a scalar (0-d) input, depthwise, grouped and
transposed convs, an ``LSTM`` and a ``GRU``. Each row says what was compressed (file bytes), whether
verification passed, and the latency of the result against fp32 (interleaved, the serving shape
of the first calibration feed).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def _w(shape, seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits: dict, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "form", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _vi(name: str, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def constant_weight(width: int = 512) -> tuple[onnx.ModelProto, Callable]:
    """``relu(x @ W1) @ W2`` with ``W1`` in a ``Constant`` node."""
    nodes = [helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(_w((width, width), 0), "W1")),
             helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    model = _model(nodes, [_vi("x", ["B", width])], [_vi("y", ["B", width])], {"W2": _w((width, width), 1)})
    return model, lambda rng: {"x": rng.standard_normal((16, width)).astype(np.float32)}


def if_branches(width: int = 512) -> tuple[onnx.ModelProto, Callable]:
    """``cond ? relu(x @ W_then) @ W_shared : x @ W_shared``: a Constant weight in one branch, an
    outer-scope weight read by both."""
    out = lambda name: _vi(name, ["B", width])  # noqa: E731
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["W_then"], value=numpy_helper.from_array(_w((width, width), 2), "W_then")),
         helper.make_node("MatMul", ["x", "W_then"], ["t1"]), helper.make_node("Relu", ["t1"], ["t2"]),
         helper.make_node("MatMul", ["t2", "W_shared"], ["t"])], "then", [], [out("t")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W_shared"], ["e"])], "else", [], [out("e")])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    model = _model([node], [_vi("x", ["B", width]), _vi("cond", [], TensorProto.BOOL)], [out("y")],
                   {"W_shared": _w((width, width), 3)})
    return model, lambda rng: {"x": rng.standard_normal((16, width)).astype(np.float32), "cond": np.array(True)}


def loop_body(width: int = 512, steps: int = 4) -> tuple[onnx.ModelProto, Callable]:
    """``steps`` iterations of ``v ← tanh(v @ W)``, ``W`` an outer-scope weight."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["v", "W"], ["m"]),
         helper.make_node("Tanh", ["m"], ["v_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("v", ["B", width])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", ["B", width])])
    nodes = [helper.make_node("Loop", ["steps", "cond", "x"], ["y"], body=body)]
    inits = {"W": _w((width, width), 4, width**-0.5), "steps": np.array(steps, np.int64), "cond": np.array(True)}
    return _model(nodes, [_vi("x", ["B", width])], [_vi("y", ["B", width])], inits), \
        lambda rng: {"x": rng.standard_normal((16, width)).astype(np.float32)}


def scalar_input(width: int = 512) -> tuple[onnx.ModelProto, Callable]:
    """``(x @ W) · t`` with ``t`` a 0-d input."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "t"], ["y"])]
    model = _model(nodes, [_vi("x", ["B", width]), _vi("t", [])], [_vi("y", ["B", width])], {"W": _w((width, width), 5)})
    return model, lambda rng: {"x": rng.standard_normal((16, width)).astype(np.float32),
                               "t": np.array(rng.uniform(0.5, 2.0), np.float32)}


def _conv_net(mid: list, channels: int, size: int) -> tuple[onnx.ModelProto, Callable]:
    """stem 3×3 conv → ``mid`` → 1×1 head conv (the output), ReLUs between."""
    nodes = [helper.make_node("Conv", ["x", "Ws"], ["s"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["s"], ["a"])]
    inits = {"Ws": _w((channels, 3, 3, 3), 6, 0.3)}
    nodes += mid[0]
    inits.update(mid[1])
    out_c, out_size = mid[2], mid[3]
    nodes.append(helper.make_node("Conv", ["m", "Wh"], ["y"]))
    inits["Wh"] = _w((8, out_c, 1, 1), 7, 0.2)
    model = _model(nodes, [_vi("x", [1, 3, size, size])], [_vi("y", [1, 8, out_size, out_size])], inits)
    return model, lambda rng: {"x": rng.random((1, 3, size, size)).astype(np.float32)}


def depthwise_conv(channels: int = 64, size: int = 56) -> tuple[onnx.ModelProto, Callable]:
    mid = ([helper.make_node("Conv", ["a", "Wd"], ["d"], group=channels, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["d"], ["dr"]), helper.make_node("Conv", ["dr", "Wp"], ["p"]),
            helper.make_node("Relu", ["p"], ["m"])],
           {"Wd": _w((channels, 1, 3, 3), 8, 0.3), "Wp": _w((2 * channels, channels, 1, 1), 9, 0.15)}, 2 * channels, size)
    return _conv_net(mid, channels, size)


def grouped_conv(channels: int = 64, size: int = 56, groups: int = 4) -> tuple[onnx.ModelProto, Callable]:
    mid = ([helper.make_node("Conv", ["a", "Wg"], ["g"], group=groups, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["g"], ["m"])],
           {"Wg": _w((channels, channels // groups, 3, 3), 10, 0.15)}, channels, size)
    return _conv_net(mid, channels, size)


def transposed_conv(channels: int = 64, size: int = 28) -> tuple[onnx.ModelProto, Callable]:
    mid = ([helper.make_node("ConvTranspose", ["a", "Wt"], ["u"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["u"], ["m"])],
           {"Wt": _w((channels, channels // 2, 4, 4), 11, 0.1)}, channels // 2, 2 * size)
    return _conv_net(mid, channels, size)


def _recurrent(op: str, gates: int, hidden: int = 256, inputs: int = 128, seq: int = 50):
    nodes = [helper.make_node(op, ["x", "W", "R", "B"], ["h"], hidden_size=hidden, direction="bidirectional"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["ht", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "Wo"], ["y"])]
    inits = {"W": _w((2, gates * hidden, inputs), 12), "R": _w((2, gates * hidden, hidden), 13),
             "B": _w((2, 2 * gates * hidden), 14), "shape": np.array([0, 0, 2 * hidden], np.int64),
             "Wo": _w((2 * hidden, 64), 15)}
    model = _model(nodes, [_vi("x", [seq, 1, inputs])], [_vi("y", [seq, 1, 64])], inits)
    return model, lambda rng: {"x": rng.standard_normal((seq, 1, inputs)).astype(np.float32)}


def lstm() -> tuple[onnx.ModelProto, Callable]:
    return _recurrent("LSTM", 4)


def gru() -> tuple[onnx.ModelProto, Callable]:
    return _recurrent("GRU", 3)


FORMS: dict[str, Callable[[], tuple[onnx.ModelProto, Callable]]] = {
    "constant-weight": constant_weight, "if-branches": if_branches, "loop-body": loop_body,
    "scalar-input": scalar_input, "depthwise-conv": depthwise_conv, "grouped-conv": grouped_conv,
    "conv-transpose": transposed_conv, "lstm": lstm, "gru": gru,
}


def compile_form(name: str, work: Path, target: str = "cpu", samples: int = 8,
                 built: tuple[onnx.ModelProto, Callable] | None = None) -> dict:
    """One form (``built``: the form built at another size) compiled with the defaults: its plan's
    verdicts and the file sizes."""
    import hessc
    from hessc.ir import meta

    model, feed = built or FORMS[name]()
    src = work / f"{name}.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    feeds = [feed(rng) for _ in range(samples)]
    out = hessc.optimize(str(src), target=target, calibration=feeds)
    dst = work / f"{name}-hessc.onnx"
    hessc.save(out, dst)
    record = meta.read_plan(out)
    return {"form": name, "src": str(src), "dst": str(dst), "feed": feeds[0],
            "float_bytes": src.stat().st_size, "file_bytes": dst.stat().st_size,
            "quantized_weights": len(record["weights"]), "verification": record["verification"]["status"],
            "kept_float": {k: v for k, v in record.get("skipped", {}).items()}}


def run_forms(out_dir: Path, runs: int | None = None, target: str = "cpu") -> dict:
    from hessc.report import table
    from hessc.runtime import sessions

    rows = []
    with tempfile.TemporaryDirectory(prefix="hessc-forms-") as tmp:
        for name in FORMS:
            row = compile_form(name, Path(tmp), target)
            runners = [sessions.session(p, "cpu", spinning=False).run for p in (row["src"], row["dst"])]
            fp, q = sessions.interleaved_latency_ms(runners, row.pop("feed"), runs)
            row.update(float_ms=round(fp, 3), hessc_ms=round(q, 3), x_fp32=round(q / fp, 3))
            for key in ("src", "dst"):
                row.pop(key)
            rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"target": target, "rows": rows}
    (out_dir / "forms.json").write_text(json.dumps(results, indent=2))
    text = table(["form", "weights quantized", "file x float", "verification", "fp32 ms", "hessc ms", "x fp32"],
                 [[r["form"], r["quantized_weights"], round(r["file_bytes"] / r["float_bytes"], 3), r["verification"],
                   r["float_ms"], r["hessc_ms"], r["x_fp32"]] for r in rows])
    (out_dir / "forms.md").write_text(text + "\n")
    print(text)
    return results
