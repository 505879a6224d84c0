"""``hessc bench --model memory``: the synthetic chain and the measured compiles."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from hessc.bench import memory


def test_the_chain_is_written_a_layer_at_a_time_as_external_data(tmp_path) -> None:
    width = memory.write_chain(tmp_path / "c.onnx", 0.004, layers=2)
    assert width == 640  # 0.004 GiB over two square fp32 layers, rounded down to 128s
    assert (tmp_path / "c.onnx.data").stat().st_size == 2 * width * width * 4
    model = onnx.load(str(tmp_path / "c.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    x = np.random.default_rng(0).standard_normal((3, width)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.shape == (3, width) and 0.5 < np.linalg.norm(y) / np.linalg.norm(x) < 2  # scaled to keep the norm


def test_each_compile_is_measured_and_the_bounded_one_verifies_weight_by_weight(tmp_path) -> None:
    results = memory.run_memory(tmp_path, size_gib=0.004, layers=2, methods=("rtn",), max_memory="200M")
    plain, bounded = results["rows"]
    assert plain["rc"] == bounded["rc"] == 0 and plain["options"] == "defaults"
    assert 0.05 < plain["peak_rss_gib"] < results["bound_gib"]
    assert "output cosine to fp32" in plain["last_line"]
    assert "verified weight by weight" in bounded["last_line"] and bounded["options"] == "--max-memory 200M"
    assert not (tmp_path / "chain.onnx.data").exists()  # the synthetic model is removed after
