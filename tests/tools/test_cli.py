"""The ``hessc`` command line: exit codes, one-line errors, JSON output, reports, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import builders as b
import numpy as np
import onnx
import pytest

from hessc import cli
from hessc.ir import meta


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(b.mlp_model(), path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_writes_model_report_and_json(model_path: Path, tmp_path: Path, capsys) -> None:
    before = _digest(model_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.md"
    code = cli.main(["optimize", str(model_path), "-o", str(out), "--bits", "4", "--report", str(report),
                     "--json", "--quiet"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"]["effective_bits_per_weight"] == pytest.approx(4 + 1 + 4 / 32)
    assert printed["verification"]["status"] == "passed"
    assert _digest(model_path) == before, "the input is never modified"
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    plan = json.loads(next(p.value for p in saved.metadata_props if p.key == meta.PLAN_KEY))
    assert {w["name"] for w in plan["weights"]} == {"W1", "W2"}
    text = report.read_text()
    assert "| W1 | MatMul | 64×64 | 4 |" in text and "## Verification" in text and "## Latency" in text


def test_report_of_a_portable_result_says_what_was_not_compared(model_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.md"
    code = cli.main(["optimize", str(model_path), "-o", str(out), "--target", "onnx", "--report", str(report),
                     "--quiet"])
    assert code == 0
    text = report.read_text()
    assert "| vs float |" in text and "- vs portable: skipped" in text


def test_calibration_npz(model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 1, 64)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--calibration", str(data), "--quiet"]) == 0
    plan = json.loads(next(p.value for p in onnx.load(out).metadata_props if p.key == meta.PLAN_KEY))
    assert plan["verification"]["vs_float"]["samples"] == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "5"], "--bits 5 is not supported"),
        (["--group-size", "48"], "--group-size 48 is not supported"),
        (["--input-shape", "nope=1,2"], "names 'nope'"),
    ],
)
def test_bad_options_are_one_line_errors(model_path: Path, tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hessc: error: ") and message in err[0]
    assert not out.exists(), "no output on failure"


def test_bad_inputs(model_path: Path, tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model at all" * 10)
    cases = [
        ([str(tmp_path / "missing.onnx")], "no such file"),
        ([str(garbage)], "not a readable ONNX model"),
    ]
    for inp, message in cases:
        assert cli.main(["optimize", *inp, "-o", str(tmp_path / "o.onnx")]) == 2
        assert message in capsys.readouterr().err
    # Writing over the input is refused before anything runs.
    assert cli.main(["optimize", str(model_path), "-o", str(model_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    calib = tmp_path / "wrong.npz"
    np.savez(calib, not_x=np.zeros((2, 1, 64), np.float32))
    assert cli.main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calibration", str(calib)]) == 2
    assert "the model's inputs are ['x']" in capsys.readouterr().err


def test_inspect_json(model_path: Path, capsys) -> None:
    assert cli.main(["inspect", str(model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {w["name"] for w in info["compressible"]} == {"W1", "W2"}
    assert info["ops"] == {"MatMul": 2, "Relu": 1}


def test_console_script_runs_without_a_traceback(tmp_path: Path) -> None:
    """The installed entry point: a bad input exits 2 with one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "hessc.cli", "optimize", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.onnx")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_inspect_hessian_table_and_plot(model_path: Path, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((6, 3, 64)).astype(np.float32))
    plot = tmp_path / "curvature.png"
    code = cli.main(["inspect", str(model_path), "--hessian", "--calibration", str(calib), "--json",
                     "--plot", str(plot), "--quiet", "--samples", "6"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"W1", "W2"}
    traces = [r["trace"] for r in rows]
    assert traces == sorted(traces, reverse=True), "most sensitive first"
    x = np.load(calib)["x"].reshape(-1, 64).astype(np.float64)
    w1 = next(r for r in rows if r["name"] == "W1")
    # A = E[x xᵀ] of the first layer's input: its trace is the mean squared norm of the inputs.
    assert w1["a_trace"] == pytest.approx(float(np.mean(np.sum(x * x, axis=1))), rel=1e-6)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["inspect", str(model_path), "--hessian"]) == 2
    assert "needs calibration" in capsys.readouterr().err


def test_passes_lists_the_pipeline_in_order(capsys) -> None:
    assert cli.main(["passes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names.index("upgrade-opset") < names.index("plan-quantization") < names.index("insert-qdq") \
        < names.index("lower-cpu") < names.index("tune-kernels") < names.index("verify-in-ort")
    # With calibration data (as `hessc passes` assumes) the CPU's convs are static int8.
    assert {r["name"] for r in rows if r["default"]} == {
        "upgrade-opset", "plan-quantization", "insert-qdq", "annotate-activation-ranges", "tune-int8-regions",
        "insert-activation-qdq", "fuse-attention", "fuse-norms", "lower-cpu", "fuse-siblings", "tune-kernels",
        "verify-in-ort"}
    assert all(r["available"] for r in rows)
    assert cli.main(["passes", "--bits", "3.5", "--target", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "* allocate-bits" in text and "* lower-cuda" in text and "* split-low-rank" in text
    assert "  share-weights" in text  # only with --share


def test_passes_and_disable_pass_choose_the_steps(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--disable-pass", "insert-qdq", "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in printed["passes"]] == ["upgrade-opset", "plan-quantization", "fuse-attention", "fuse-norms",
                                                      "lower-cpu", "fuse-siblings", "tune-kernels", "verify-in-ort"]
    assert printed["verification"]["status"] == "passed"
    assert {n.op_type for n in onnx.load(out).graph.node} == {"MatMul", "Relu"}, "a float model"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--passes", "upgrade-opset,plan-quantization,insert-qdq",
                     "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in printed["passes"]] == ["upgrade-opset", "plan-quantization", "insert-qdq"]
    assert printed["verification"]["status"].startswith("skipped")
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--passes", "plan-quantization,nope", "--quiet"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_a_degraded_result_exits_3_unless_allowed(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--bits", "2", "--min-output-cosine", "0.9999"]) == 3
    captured = capsys.readouterr()
    assert "degraded" in captured.err and "--allow-degraded" in captured.err
    assert "target cpu, 2 bits, group 32, method rtn" in captured.err, "the chosen settings on one line"
    assert not out.exists(), "nothing is written"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--bits", "2", "--min-output-cosine", "0.9999",
                     "--allow-degraded", "--quiet"]) == 0
    plan = json.loads(next(p.value for p in onnx.load(out).metadata_props if p.key == meta.PLAN_KEY))
    assert plan["verification"]["quality"]["degraded"]
    assert "cosine" in plan["verification"]["quality"]["reasons"][0]
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--max-loss-increase", "0", "--quiet"]) == 2


def test_no_tune_and_int8_range_reach_the_compile(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--no-tune", "--int8-range", "reduced",
                     "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "tune-kernels" not in [p["name"] for p in printed["passes"]]
    levels = {a.i for n in onnx.load(out).graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--json", "--quiet"]) == 0
    assert "tune-kernels" in [p["name"] for p in json.loads(capsys.readouterr().out)["passes"]]
    with pytest.raises(SystemExit):
        cli.main(["optimize", str(model_path), "-o", str(out), "--int8-range", "7bit"])


def test_float_embeddings_and_the_allocation_check_reach_the_compile(tmp_path: Path, capsys) -> None:
    path, out = tmp_path / "lookup.onnx", tmp_path / "out.onnx"
    onnx.save(b.gather_model(vocab=256, dim=64), path)
    assert cli.main(["optimize", str(path), "-o", str(out), "--json", "--quiet"]) == 0
    assert "GatherBlockQuantized" in [n.op_type for n in onnx.load(out).graph.node]
    capsys.readouterr()
    # The table is the only weight: kept in float there is nothing to compress (exit 2, said why).
    assert cli.main(["optimize", str(path), "-o", str(out), "--float-embeddings", "--quiet"]) == 2
    assert "embedding quantization is off" in capsys.readouterr().err
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 2, 64)).astype(np.float32))
    mlp = tmp_path / "mlp.onnx"
    onnx.save(b.mlp_model(), mlp)
    assert cli.main(["optimize", str(mlp), "-o", str(out), "--bits", "5.5", "--target", "onnx", "--calibration",
                     str(calib), "--no-allocation-check", "--json", "--quiet"]) == 0
    assert "check-allocation" not in [p["name"] for p in json.loads(capsys.readouterr().out)["passes"]]
    assert cli.main(["optimize", str(mlp), "-o", str(out), "--bits", "5.5", "--target", "onnx", "--calibration",
                     str(calib), "--json", "--quiet"]) == 0
    assert "check-allocation" in [p["name"] for p in json.loads(capsys.readouterr().out)["passes"]]
