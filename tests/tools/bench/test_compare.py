"""Tests for hessc.bench: pseudo-labels for lossless on unlabelled classifiers, and the results table."""

from __future__ import annotations

import onnx
import pytest

import builders as b
from hessc.bench import compare as bench


def test_pseudo_labels_are_the_float_models_top1(tmp_path) -> None:
    proto = b.gemm_model(k=64, n=10, bias=False)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    feeds = [b.x_feed(64, batch=1, seed=s) for s in range(5)]
    labels = bench.pseudo_labels(path, feeds)
    w = b.weight((10, 64))
    assert [label.shape for label in labels] == [(1,)] * 5
    assert [int(label[0]) for label in labels] == [int((f["x"] @ w.T).argmax()) for f in feeds]


def _row(method: str, **kw) -> dict:
    row = {"model": "m", "method": method, "bits": 4, "group_size": 128, "target": "onnx", "file_bytes": 3 << 20,
           "optimize_seconds": 1.5, "effective_bits_per_weight": 4.297, "quantized_params": 4_606_464,
           "top1_agreement": 0.5, "kl_to_fp32": 0.7, "latency_ms": 2.0}
    row.update(kw)
    return row


def test_results_table_shows_sizes_scope_and_the_lossless_check() -> None:
    rows = [
        _row("fp32", bits=None, group_size=None, effective_bits_per_weight=32.0, quantized_params=None),
        _row("hessc"),
        _row("ort-default", effective_bits_per_weight=None, quantized_params=0),
        _row("hessc", bits="lossless", heldout_loss_fp32=1.7366, heldout_loss_quantized=1.7082),
        {"model": "m", "method": "ort-rtn", "bits": 4, "group_size": 128, "target": "onnx", "error": "ValueError: no"},
    ]
    text = bench.results_markdown({"model": "m", "target": "onnx", "machine": {"cpu_count": 2, "onnxruntime": "1"},
                                   "rows": rows})
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["method", "bits", "group", "top1_agreement", "kl_to_fp32"]
    assert {"held-out loss fp32 / quantized", "eff. bits/weight", "quantized M params", "file MiB"} <= set(header)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(c) == len(header) for c in cells)
    col = {name: header.index(name) for name in header}
    assert cells[1][col["quantized M params"]] == "4.61" and cells[1][col["file MiB"]] == "3.0"
    assert cells[2][col["quantized M params"]] == "0.00" and cells[2][col["eff. bits/weight"]] == "-"
    assert cells[3][col["held-out loss fp32 / quantized"]] == "1.737 / 1.708"
    assert cells[4][-1] == "ValueError: no"


def test_serving_lengths_are_for_language_models_and_repeat_the_feed(tmp_path) -> None:
    import numpy as np
    import pytest

    from hessc.bench import serving
    from hessc.errors import InputError

    with pytest.raises(InputError, match="language models"):
        serving.run_serving("efficientnet", [1], tmp_path)
    feed = {"input_ids": np.arange(5)[None], "attention_mask": np.ones((1, 5), np.int64)}
    long, one = serving._at_length(feed, 12), serving._at_length(feed, 1)
    assert long["input_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]] and one["input_ids"].tolist() == [[0]]
    assert long["attention_mask"].shape == (1, 12)


def test_session_memory_is_measured_in_a_fresh_process(tmp_path) -> None:
    """A session of a model with a 4 MiB weight holds at least that much; with prepacking off
    the same outputs come back."""
    import numpy as np
    import onnx

    import builders as b
    from hessc.runtime import sessions

    proto = b.matmul_model(k=1024, n=1024)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    feed = b.x_feed(1024)
    rss = bench.session_rss_mib(path, "cpu", feed)
    assert rss is not None and rss > 3.5
    packed = sessions.session(str(path), "cpu").run(feed)[0]
    unpacked = sessions.session(str(path), "cpu", prepacking=False).run(feed)[0]
    np.testing.assert_allclose(packed, unpacked, rtol=1e-4, atol=1e-4)  # another summation order


def test_parameter_reduction_refuses_what_it_cannot_measure(tmp_path) -> None:
    from hessc.bench import reduction
    from hessc.errors import InputError

    with pytest.raises(InputError, match="language models"):
        reduction.run_reduction("efficientnet", [10], tmp_path)
    with pytest.raises(InputError, match="between 0 and 100"):
        reduction.run_reduction("minilm", [150], tmp_path)
