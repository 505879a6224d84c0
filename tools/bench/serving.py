"""``hessc bench --model minilm --serving-tokens 128,1``: 4-bit language models on the CPU at
their serving lengths, hessc (kernels tuned at that length) against fp32 and ORT's 4-bit RTN
(``MatMulNBitsQuantizer``, block 32, at ``accuracy_level`` 0 and 4), latency interleaved."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from hessc.errors import InputError
from hessc.report import table


def _at_length(feed: dict[str, np.ndarray], tokens: int) -> dict[str, np.ndarray]:
    """The feed's sequences repeated or cut to ``tokens`` along the sequence axis."""
    return {k: np.ascontiguousarray(np.tile(v, (1, -(-tokens // v.shape[1])))[:, :tokens]) for k, v in feed.items()}


def run_serving(model: str, tokens: Sequence[int], out_dir: Path, group_size: int = 32, runs: int = 30,
                bits: int = 4) -> dict:
    """Compiles ``model`` at ``bits`` (4 or 8) for each length (the calibration cut to it, so the tuning
    sees that serving shape) and times it beside fp32 and ORT's 4-bit models at that length."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    import hessc
    from hessc.bench import zoo
    from hessc.runtime import sessions

    if model not in ("minilm", "smollm2"):
        raise InputError(f"--serving-tokens is for the language models minilm and smollm2, not {model!r}")
    zm = zoo.load_zoo(model)
    src = str(zm.onnx_path)
    calibration = zm.calibration(8, 0)
    results: dict = {"model": model, "group_size": group_size, "rows": []}
    with tempfile.TemporaryDirectory(prefix="hessc-serving-") as tmp:
        peers = {}
        for level in (0, 4):
            q = mnq.MatMulNBitsQuantizer(onnx.load(src), block_size=group_size, is_symmetric=False, accuracy_level=level)
            q.process()
            peers[f"ort-rtn-4 (accuracy_level {level})"] = path = str(Path(tmp) / f"ort-{level}.onnx")
            q.model.save_model_to_file(path, use_external_data_format=True)
        for length in tokens:
            feeds = [_at_length(f, length) for f in calibration]
            compiled = hessc.optimize(src, target="cpu", bits=bits, group_size=group_size, calibration=feeds)
            path = str(Path(tmp) / f"hessc-{length}.onnx")
            hessc.save(compiled, path, external_data=True)
            paths = {"fp32": src, f"hessc-{bits} (tuned at this length)": path, **peers}
            runners = [sessions.session(p, "cpu", spinning=False).run for p in paths.values()]
            ms = sessions.interleaved_latency_ms(runners, feeds[0], runs if length > 1 else 3 * runs)
            for label, t in zip(paths, ms):
                results["rows"].append({"tokens": length, "method": label, "latency_ms": round(t, 3),
                                        "x_fp32": round(t / ms[0], 3)})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(results, indent=2))
    text = table(["tokens", "method", "latency ms", "x fp32"],
                 [[r["tokens"], r["method"], r["latency_ms"], r["x_fp32"]] for r in results["rows"]])
    (out_dir / "serving.md").write_text(text + "\n")
    print(text)
    return results
