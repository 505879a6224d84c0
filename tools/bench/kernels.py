"""``hessc bench --model kernels``: the CPU's MatMul kernels side by side on one layer: fp32
``MatMul``, ``MatMulNBits`` at 4 and 8 bits (int8 compute, ``accuracy_level=4``), and
``DynamicQuantizeMatMul`` (int8 weights per column, activations quantized to uint8 per tensor at
run time), at the shapes of MiniLM's and SmolLM2's layers, 128 rows and 1 row, interleaved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = ((128, 384, 1536), (128, 1536, 384), (128, 576, 1536), (1, 576, 1536))


def _dynamic_quantize_matmul(k: int, n: int, seed: int = 0) -> tuple[bytes, bytes]:
    """fp32 ``MatMul`` and its ``DynamicQuantizeMatMul`` (symmetric int8, one scale per column)."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]

    def model(node, inits) -> bytes:
        graph = helper.make_graph([node], "layer", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=opsets).SerializeToString()

    fp32 = model(helper.make_node("MatMul", ["x", "w"], ["y"]), {"w": w})
    dynamic = model(helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "z"], ["y"], domain="com.microsoft"),
                    {"q": codes, "s": scale, "z": np.zeros(n, np.int8)})
    return fp32, dynamic


def run_kernels(out_dir: Path) -> dict:
    from hessc.report import table
    from hessc.runtime import sessions, tune

    rows = []
    for m, k, n in SHAPES:
        fp32, dynamic = _dynamic_quantize_matmul(k, n)
        models = {"fp32 MatMul": fp32, "DynamicQuantizeMatMul (8-bit per column)": dynamic}
        for bits in (8, 4):
            layer = tune.NBitsLayer(m, k, n, bits, 32, False, False)
            models[f"MatMulNBits {bits}-bit g32 (accuracy_level 4)"] = tune._layer_model(layer, "level-4")
        runs = [sessions.session(v, "cpu", spinning=False).run for v in models.values()]
        feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
        ms = sessions.interleaved_latency_ms(runs, feed, None)
        for label, t in zip(models, ms):
            rows.append({"rows": m, "k": k, "n": n, "kernel": label, "ms": round(t, 4), "x_fp32": round(t / ms[0], 3)})
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"rows": rows}
    (out_dir / "kernels.json").write_text(json.dumps(results, indent=2))
    text = table(["rows × K × N", "kernel", "ms", "x fp32"],
                 [[f"{r['rows']} × {r['k']} × {r['n']}", r["kernel"], r["ms"], r["x_fp32"]] for r in rows])
    (out_dir / "kernels.md").write_text(text + "\n")
    print(text)
    return results
