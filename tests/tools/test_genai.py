"""A decoder from an onnxruntime-genai folder goes in and comes out as one that
``onnxruntime_genai`` loads and generates with (a tiny random-weight Llama from genai's builder)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx

import builders

from hessc import cli


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_optimize_writes_a_genai_folder_that_generates(tiny_decoder, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(tiny_decoder, source)
    before = _files(source)
    out = tmp_path / "out"
    assert cli.main(["optimize", str(source / "model.onnx"), "-o", str(out), "--bits", "4", "--quiet"]) == 0
    assert _files(source) == before  # the input folder is untouched
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((out / "genai_config.json").read_text())
    original = json.loads(before["genai_config.json"])
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert config["model"]["decoder"]["num_key_value_heads"] == original["model"]["decoder"]["num_key_value_heads"]
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized"} <= ops and "MatMul" not in ops
    # the tied table is stored once: the lookup reads the head's 4-bit bytes, not a float copy
    stored = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
    float_bytes = sum(p.stat().st_size for p in source.iterdir() if p.name.startswith("model.onnx"))
    assert stored < 0.4 * float_bytes
    tokens = builders.genai_greedy(out, [1, 40, 41, 42], 12)
    assert len(tokens) == 12 and all(0 <= t < config["model"]["vocab_size"] for t in tokens)


def test_an_onnx_output_path_inside_a_folder_keeps_that_name(tiny_decoder, tmp_path):
    out = tmp_path / "served" / "decoder-int4.onnx"
    assert cli.main(["optimize", str(tiny_decoder / "model.onnx"), "-o", str(out), "--bits", "8", "--quiet",
                     "--target", "cuda", "--no-verify"]) == 0
    config = json.loads((out.parent / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "decoder-int4.onnx"
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_budget_with_calibration_runs_the_curvature_through_the_cache(tiny_decoder, tmp_path):
    """A fractional budget needs the Hessian annotation, through GroupQueryAttention, over prefill
    and continuation steps the calibration's token ids become."""
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input_ids=np.random.default_rng(0).integers(3, 250, size=(6, 1, 24)))
    out = tmp_path / "out"
    assert cli.main(["optimize", str(tiny_decoder / "model.onnx"), "-o", str(out), "--bits", "3.5",
                     "--calibration", str(calibration), "--quiet", "--report", str(tmp_path / "r.md")]) == 0
    assert len(builders.genai_greedy(out, [1, 40, 41], 6)) == 6
    assert "3.5" in (tmp_path / "r.md").read_text()


def test_for_cuda_the_cache_is_fp16_and_the_result_verifies(tiny_decoder):
    """fp16 lowering keeps the graph's input and output types except the KV cache (genai's CUDA
    models hold it in fp16); verification feeds each input in its declared type."""
    import onnx_ir as ir

    import hessc
    from hessc.ir import meta

    compiled = hessc.optimize(str(tiny_decoder / "model.onnx"), target="cuda", bits=4, tune=False)
    types = {v.name: v.dtype for v in (*compiled.graph.inputs, *compiled.graph.outputs)}
    assert types["past_key_values.0.key"] == ir.DataType.FLOAT16 and types["present.1.value"] == ir.DataType.FLOAT16
    assert types["logits"] == ir.DataType.FLOAT and types["input_ids"] == ir.DataType.INT64
    assert meta.read_plan(compiled)["verification"]["status"] == "passed"
