"""``hessc bench --model memory``: peak memory and wall time of ``hessc optimize`` on a synthetic
model of a chosen size, to hold the memory bound against (issue: compress models larger than
memory).

The model is a chain of ``layers`` square fp32 MatMuls whose weights sit in one external-data file
(written a layer at a time, never all in memory); each compile runs as a user would run it, the
``hessc`` command in a child process, and its peak resident memory is the child's own (its
``VmHWM`` as it exits), printed beside the bound ``1 GiB + 3 x the largest weight``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30


def write_chain(path: Path, size_gib: float, layers: int = 8, seed: int = 0) -> int:
    """Writes ``path`` (+ ``path.data``): ``x -> MatMul(W_1) -> ... -> MatMul(W_layers) -> y`` with
    random weights of about ``size_gib`` in all; returns the width."""
    import onnx
    from onnx import TensorProto, helper

    width = int(np.sqrt(size_gib * GIB / layers / 4)) // 128 * 128
    rng = np.random.default_rng(seed)
    data = path.with_name(path.name + ".data")
    initializers, nodes = [], []
    with open(data, "wb") as f:
        for i in range(layers):
            offset = f.tell()
            for rows in range(0, width, 1024):  # a block of rows at a time: memory stays small
                block = rng.standard_normal((min(1024, width - rows), width), dtype=np.float32)
                block *= np.float32(1 / np.sqrt(width))
                f.write(block.tobytes())
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[width, width],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                t.external_data.add(key=key, value=value)
            initializers.append(t)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"W{i}"],
                                          ["y" if i == layers - 1 else f"h{i + 1}"], name=f"layer{i}"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", width])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())
    return width


_CHILD = """import sys
from hessc.cli import main
code = main(sys.argv[1:])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(f"{PEAK_MARK} {peak}", file=sys.stderr)
sys.exit(code)
"""
PEAK_MARK = "hessc-peak-rss-kib"


def measure(arguments: list[str]) -> dict:
    """Runs ``hessc ARGUMENTS`` in a child process; its exit code, wall seconds, peak RSS and last line.

    The peak is the child's own high-water mark (``VmHWM``, read as it exits): ``ru_maxrss`` of a
    child started by ``vfork`` also counts the parent's pages at the time of the fork."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CHILD.replace("{PEAK_MARK}", PEAK_MARK), *arguments],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line.rstrip() for line in child.stdout]  # drain before waiting: no pipe deadlock
    rc = child.wait()
    peaks = [int(line.split()[1]) for line in lines if line.startswith(PEAK_MARK)]
    lines = [line for line in lines if not line.startswith(PEAK_MARK)]
    return {"rc": rc, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(peaks[-1] * 1024 / GIB, 2) if peaks else None,
            "last_line": lines[-1] if lines else "", "log": lines}


def run_memory(out_dir: Path, size_gib: float = 8.0, layers: int = 8, methods=("rtn",), bits: int = 4,
               max_memory: str | None = None) -> dict:
    """Each method once with the defaults and, with ``max_memory``, once more under ``--max-memory``."""
    from hessc.report import table

    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "chain.onnx"
    width = write_chain(src, size_gib, layers)
    weight_gib = width * width * 4 / GIB
    bound = 1 + 3 * weight_gib
    rows = []
    runs = [(m, []) for m in methods] + [(m, ["--max-memory", max_memory]) for m in methods if max_memory]
    for method, extra in runs:
        out = out_dir / f"out-{method}.onnx"
        command = ["optimize", str(src), "-o", str(out), "--bits", str(bits), "--method", method, *extra]
        if method == "gptq":
            calibration = out_dir / "calibration.npz"
            np.savez(calibration, x=np.random.default_rng(1).standard_normal((8, 4, width), dtype=np.float32))
            command += ["--calibration", str(calibration)]
        row = {"method": method, "options": " ".join(extra) or "defaults", **measure(command)}
        (out_dir / f"log-{method}{'-bounded' if extra else ''}.txt").write_text("\n".join(row.pop("log")) + "\n")
        rows.append(row)
        print(json.dumps(row), flush=True)
        for path in (out, out.with_name(out.name + ".data")):
            path.unlink(missing_ok=True)
    results = {"model_gib": round(layers * weight_gib, 2), "layers": layers, "width": width,
               "largest_weight_gib": round(weight_gib, 2), "bound_gib": round(bound, 2), "rows": rows}
    (out_dir / "memory.json").write_text(json.dumps(results, indent=2))
    text = table(["method", "options", "rc", "peak RSS GiB", "bound GiB", "wall s", "result"],
                 [[r["method"], r["options"], r["rc"], r["peak_rss_gib"], results["bound_gib"], r["seconds"], r["last_line"][:120]]
                  for r in rows])
    head = f"### {results['model_gib']} GiB model ({layers} MatMuls {width}x{width}, fp32, external data)\n\n"
    (out_dir / "memory.md").write_text(head + text + "\n")
    print(head + text)
    src.unlink()
    src.with_name(src.name + ".data").unlink()
    return results
