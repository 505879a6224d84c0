"""``hessc bench``: hessc against ONNX Runtime's own weight quantizers, side by side, in one run.

For every (bits, group size) and method, the same fp32 ONNX model is compressed, saved, and
measured on the same machine in the same process: the model's own quality metric on held-out data
(MODELS.md), file size on disk, effective bits per weight (one accounting for every method: code,
scale and zero-point bytes of each quantized weight over its element count), median latency on a
fixed input, and the time the method took. ``ort-*`` methods run
``onnxruntime.quantization.MatMulNBitsQuantizer`` (which quantizes MatMul weights only: not Gemm,
not Conv, so on EfficientNet it quantizes nothing); ``hessc-matmul`` restricts hessc to the same
scope so sizes compare like for like.

``--bits lossless`` needs a loss whose fp32 value is not its minimum. Where the model has no labels
(EfficientNet on unlabelled photos), the fp32 model's own top-1 classes on the calibration feeds are
the labels (cross-entropy to them; ``labels: fp32 top-1 pseudo-labels`` in the results).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from hessc.errors import InputError
from hessc.runtime import lower as lowering
from hessc.runtime import targets

logger = logging.getLogger(__name__)

HESSC_VARIANTS: dict[str, dict[str, Any]] = {
    "hessc": {},
    # The scope of ORT's quantizer (MatMul/Gemm weights; embeddings stay float), for like-for-like sizes.
    "hessc-matmul": {"quantize_embeddings": False},
    "hessc-gptq": {"quantize_embeddings": False, "method": "gptq"},
    # The budget's prediction trusted, not measured on held-out feeds (the allocator alone).
    "hessc-gptq-unchecked": {"quantize_embeddings": False, "method": "gptq", "check_allocation": False},
    "hessc-unchecked": {"check_allocation": False},
    # Gradient-directed rounding items (rtn-grad) beside the others; budgets and lossless only.
    "hessc-grad": {"quantize_embeddings": False, "rounding": "gradient"},
    "hessc-gptq-grad": {"quantize_embeddings": False, "method": "gptq", "rounding": "gradient"},
    # Activations: 8 = calibrated uint8 Q/DQ (the CPU kernel's int8 path), 16 = float compute.
    "hessc-a8": {"quantize_embeddings": False, "activations": 8},
    "hessc-a16": {"quantize_embeddings": False, "activations": 16},
    # An exact Hadamard rotation of the residual stream folded in first (pre-norm decoders).
    "hessc-hadamard": {"quantize_embeddings": False, "rotate": "hadamard"},
    "hessc-gptq-hadamard": {"quantize_embeddings": False, "method": "gptq", "rotate": "hadamard"},
    # Bit widths only: no low-rank split or compensation items.
    "hessc-nolr": {"low_rank": False},
    "hessc-gptq-nolr": {"quantize_embeddings": False, "method": "gptq", "low_rank": False},
    "hessc-int8-full": {"int8_range": "full"},
    "hessc-int8-reduced": {"int8_range": "reduced"},
}
"""hessc variants; a float ``--bits`` (3.0, 2.5) is an average-bits budget for the allocator."""
METHODS = (*HESSC_VARIANTS, "ort-rtn", "ort-default", "ort-hqq", "ort-gptq", "ort-kquant", "ort-static", "ort-dynamic")
INT8_PEERS = ("ort-static", "ort-dynamic")
"""ONNX Runtime's int8 quantizers (every op they quantize; the ``bits`` setting does not apply):
``quantize_static`` in QDQ form, uint8 activations, int8 per-channel weights, after
``quant_pre_process``, with ``reduce_range`` (7-bit weights) where this CPU's u8·s8 kernels saturate
(ORT's own advice for x86 without VNNI; hessc's ``int8_range="auto"`` does the same);
``quantize_dynamic`` (``MatMulInteger``/``ConvInteger``)."""

CALIBRATION_SAMPLES = {"efficientnet": 64, "minilm": 64}
"""Calibration feeds per zoo model (others: 8). An EfficientNet feed is one image, i.e. one row of
the classifier's input covariance (1,280 features), where a SmolLM2 feed is 512 token rows: with 8
images GPTQ fits the late layers to a rank-8 covariance and the allocator's predictions with it
(3.5-bit GPTQ budget: KL to fp32 on the evaluation photos 2.19 with 8 images, 1.24 with 64). A
MiniLM feed is one run of sentences (about 130 tokens) against 1,536-wide FFN inputs: with 8 the
3.5-bit GPTQ allocation put the last layer's FFN at 2 bits and reached cosine 0.67 to fp32 (below
uniform 3-bit's 0.87); with 64, 0.91."""

PSEUDO_LABELS = ("efficientnet",)
"""Zoo models whose ``lossless`` runs use the fp32 model's top-1 classes as labels."""


def _dir_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def effective_bits(path: Path) -> tuple[float | None, int]:
    """Stored bits per quantized weight of a saved model (see ``lower.quantized_storage``)."""
    from hessc.ir import meta
    from hessc.passes import low_rank

    model = ir.load(path)
    nbytes, numel = lowering.quantized_storage(model)
    plan = meta.read_plan(model) or {}
    if plan.get("low_rank"):  # factors counted, per weight of the original model
        extra_bytes, extra_numel = low_rank.storage_correction(plan["low_rank"])
        nbytes, numel = nbytes + extra_bytes, numel + extra_numel
    if plan.get("sharing"):
        numel += plan["sharing"]["params_before"] - plan["sharing"]["params_after"]
    return (8 * nbytes / numel if numel else None), numel


def _ort_quantize(
    src: Path, dst: Path, method: str, bits: int, group: int, external: bool, calibration: list | None = None
) -> None:
    """ONNX Runtime's own MatMulNBitsQuantizer with the named algorithm (MatMul weights only), or
    one of its int8 quantizers (:data:`INT8_PEERS`)."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list) -> None:
            self.feeds = list(feeds)
            self.index = 0

        def get_next(self):
            if self.index >= len(self.feeds):
                return None
            self.index += 1
            return self.feeds[self.index - 1]

    if method in INT8_PEERS:
        from onnxruntime import quantization as q

        pre = dst.with_name(dst.stem + "-pre.onnx")
        source = onnx.load(str(src))
        if next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 21) < 13:
            # per-channel DequantizeLinear (axis) needs opset 13; ORT's quantizer writes it regardless
            source = onnx.version_converter.convert_version(source, 13)
        onnx.save(source, str(pre))
        q.shape_inference.quant_pre_process(str(pre), str(pre))
        if method == "ort-static":
            q.quantize_static(str(pre), str(dst), Reader(calibration or []), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              reduce_range=targets.saturating_int8_products(), use_external_data_format=external)
        else:
            q.quantize_dynamic(str(pre), str(dst), weight_type=q.QuantType.QInt8, use_external_data_format=external)
        pre.unlink()
        return
    if method == "ort-rtn":
        algo = mnq.RTNWeightOnlyQuantConfig()
    elif method == "ort-kquant":
        algo = mnq.KQuantWeightOnlyQuantConfig()
    elif method == "ort-gptq":
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(calibration or []), block_size=group)
    elif method == "ort-hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
    else:
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=False, accuracy_level=4, bits=bits)
    model = onnx.load(str(src))
    quant = mnq.MatMulNBitsQuantizer(
        model, bits=bits, block_size=group, is_symmetric=False, accuracy_level=4, algo_config=algo
    )
    quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=external)


def _latency_feed(zoo_model, name: str, calibration: list[dict]) -> dict:
    feed = calibration[0]
    if name == "smollm2":  # a 128-token prompt
        return {k: v[:, :128] for k, v in feed.items()}
    return feed


def run_bench(
    model: str,
    *,
    bits: Sequence[int | float | str],
    group_sizes: Sequence[int],
    target: str,
    methods: Sequence[str],
    out_dir: Path,
    eval_tokens: int = 4096,
    latency_runs: int = 20,
    quiet: bool = False,
    threads: int | None = None,
    calibration_samples: int | None = None,
) -> dict[str, Any]:
    """Runs every method at every setting; writes ``results.json`` and ``results.md`` in out_dir."""
    import hessc
    from hessc.bench import zoo
    from hessc.runtime import sessions

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown bench methods {unknown}; use {', '.join(METHODS)}")
    if target != "cpu" and any(m.startswith("ort-") for m in methods):
        logger.info("ort-* methods produce CPU-tuned models; they run on %s as they are", target)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "models"
    work.mkdir(exist_ok=True)

    if model in zoo.ZOO_NAMES:
        zm = zoo.load_zoo(model, eval_tokens=eval_tokens)
        src = Path(zm.onnx_path)
        evaluate = zm.evaluate
        calibration = zm.calibration(calibration_samples or CALIBRATION_SAMPLES.get(model, 8), 0)
        name = model
    else:
        src = Path(model)
        if not src.exists():
            raise InputError(f"{model}: not a zoo model ({', '.join(zoo.ZOO_NAMES)}) nor an existing .onnx file")
        name = src.stem
        zm = None
        evaluate = None
        from hessc.runtime import calibration as calib

        calibration = calib.generated_feeds(hessc.load(src), count=calibration_samples or 4)
    external = src.with_name(src.name + ".data").exists() or src.stat().st_size > (1 << 30)
    feed = _latency_feed(zm, name, calibration)
    rows: list[dict[str, Any]] = []
    timed: list[tuple[dict[str, Any], Any]] = []

    def measure(method: str, path: Path, b: int | None, g: int | None, seconds: float, extra: dict | None = None) -> None:
        sess = sessions.session(path, target, threads=threads, spinning=False)
        row: dict[str, Any] = {
            "model": name, "method": method, "bits": b, "group_size": g, "target": target,
            "file_bytes": _dir_size(path), "optimize_seconds": round(seconds, 2),
        }
        row["session_rss_mib"] = session_rss_mib(path, target, feed, threads)
        ebits, numel = effective_bits(path) if method != "fp32" else (32.0, None)
        row["effective_bits_per_weight"] = None if ebits is None else round(ebits, 3)
        row["quantized_params"] = numel
        if evaluate is not None:
            row.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in evaluate(sess.run).items()})
        row.update(extra or {})
        rows.append(row)
        timed.append((row, sess))
        if not quiet:
            logger.info("%s", {k: v for k, v in row.items() if k not in ("model", "target")})

    measure("fp32", src, None, None, 0.0)
    for b in bits:
        for g in group_sizes:
            for method in methods:
                if not method.startswith("hessc") and not isinstance(b, int):
                    continue  # ONNX Runtime's quantizers take whole bits only
                if method in INT8_PEERS and (b, g) != (bits[0], group_sizes[0]):
                    continue  # one int8 model, whatever the setting
                dst = work / f"{name}-{method}-b{b}-g{g}.onnx"
                start = time.perf_counter()
                extra: dict[str, Any] = {}
                try:
                    if method.startswith("hessc"):
                        labels, loss, feeds = None, None, calibration
                        if b == "lossless" and name in PSEUDO_LABELS:
                            labels = pseudo_labels(src, calibration)
                            extra["labels"] = "fp32 top-1 pseudo-labels"
                        elif b == "lossless" and zm is not None and zm.task_loss is not None:
                            loss, feeds = zm.task_loss, zm.task_calibration(len(calibration), 0)
                            extra["labels"] = "task loss: " + " ".join(zm.task_loss.__doc__.split(".")[0].split())
                        m = hessc.optimize(
                            str(src), target=target, bits=b, group_size=g, calibration=feeds,
                            labels=labels, loss=loss, allow_degraded=True, **HESSC_VARIANTS[method],
                        )
                        hessc.save(m, dst, external_data=external)
                        extra.update(_optimize_facts(m))
                    else:
                        _ort_quantize(src, dst, method, b, g, external, calibration)
                except Exception as e:  # a method that cannot do this setting is reported, not hidden
                    logger.warning("%s at %s bits, group %d failed: %s", method, b, g, str(e)[:200])
                    rows.append({"model": name, "method": method, "bits": b, "group_size": g, "target": target,
                                 "error": f"{type(e).__name__}: {str(e)[:160]}"})
                    continue
                measure(method, dst, b, g, time.perf_counter() - start, extra)
    # Latency on a shared machine drifts: every model runs once per round, in turn, and each
    # reports its median over the rounds and its ratio to fp32's.
    for (row, _), ms in zip(timed, sessions.interleaved_latency_ms([s.run for _, s in timed], feed, latency_runs)):
        row["latency_ms"] = round(ms, 3)
        row["latency_vs_fp32"] = round(ms / timed[0][0]["latency_ms"], 3) if timed[0][0].get("latency_ms") else None
    timed.clear()
    results = {"model": name, "target": target, "machine": _machine(), "calibration_samples": len(calibration),
               "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_markdown(results))
    shutil.rmtree(work, ignore_errors=True)
    return results


_RSS_SCRIPT = """
import sys, numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from hessc.runtime import sessions
before = rss()
sess = sessions.session(sys.argv[1], sys.argv[2], threads=int(sys.argv[4]) or None, spinning=False,
                        prepacking=sys.argv[5] == "1")
feed = dict(np.load(sys.argv[3]))
sess.run(feed)
print(rss() - before)
"""


def session_rss_mib(path: Path, target: str, feed: dict, threads: int | None = None,
                    prepacking: bool = True) -> float | None:
    """Resident memory an ORT session of the model adds once it has run a feed (MiB), measured in
    a fresh process (what the session holds: weights after ORT's prepacking, arenas), or None
    where it cannot be measured (no ``/proc``)."""
    import subprocess
    import sys
    import tempfile

    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="hessc-rss-") as tmp:
        npz = Path(tmp) / "feed.npz"
        np.savez(npz, **feed)
        done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), target, str(npz), str(threads or 0),
                               "1" if prepacking else "0"],
                              capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        logger.warning("session memory of %s not measured: %s", path.name, done.stderr.strip()[-200:])
        return None
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def pseudo_labels(src: Path, calibration: Sequence[dict]) -> list[np.ndarray]:
    """The fp32 model's top-1 class for every calibration feed (labels for a classifier's
    cross-entropy where no labelled data exists), one integer array per feed."""
    from hessc.runtime import sessions

    sess = sessions.session(src, "cpu")
    return [np.asarray(sess.run(feed)[0]).argmax(-1) for feed in calibration]


def _optimize_facts(model: ir.Model) -> dict[str, Any]:
    """What ``optimize`` recorded that a results row should carry: pass timings and, for budgets,
    the allocation and the lossless held-out check."""
    from hessc.ir import meta

    plan = meta.read_plan(model) or {}
    summary = plan.get("summary", {})
    facts: dict[str, Any] = {"pass_seconds": dict(model.meta.get(meta.TIMINGS_KEY, {}))}
    quality = plan.get("verification", {}).get("quality", {})
    if quality.get("degraded"):
        facts["degraded"] = "; ".join(quality.get("reasons", []))
    if plan.get("rotation"):
        facts["rotation"] = plan["rotation"].get("folded")
    for key in ("allocated_effective_bits", "predicted_delta_loss", "measured_delta_loss", "heldout_loss_fp32",
                "heldout_loss_quantized", "lossless_confirmed"):
        if summary.get(key) is not None:
            facts[key] = summary[key]
    if plan.get("low_rank"):
        forms = [r["form"] for r in plan["low_rank"].values()]
        facts["low_rank"] = {form: forms.count(form) for form in sorted(set(forms))}
    if isinstance(summary.get("steps"), list):
        facts["lossless_steps"] = len(summary["steps"])
    return facts


def _machine() -> dict:
    import platform

    import onnxruntime

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "onnxruntime": onnxruntime.__version__}


METRIC_COLUMNS = (
    "cosine_to_fp32", "lee_pearson", "lee_spearman", "perplexity", "top1_agreement", "kl_to_fp32", "ce_to_fp32_top1",
)


def results_markdown(results: dict) -> str:
    from hessc.report import table

    rows = results["rows"]
    metrics = [m for m in METRIC_COLUMNS if any(m in r for r in rows)]
    heldout = any("heldout_loss_quantized" in r for r in rows)
    checked = any("measured_delta_loss" in r or "predicted_delta_loss" in r for r in rows)
    headers = ["method", "bits", "group", *metrics, *(["held-out loss fp32 / quantized"] if heldout else []),
               *(["Δloss predicted / measured"] if checked else []),
               "eff. bits/weight", "quantized M params", "file MiB", "session RSS MiB", "latency ms", "x fp32",
               "optimize s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["method"], r["bits"], r["group_size"], *(["-"] * (len(metrics) + heldout + checked)), "-", "-",
                         "-", "-", "-", "-", r["error"]])
            continue
        loss = []
        if heldout:
            loss = [f"{r['heldout_loss_fp32']:.4g} / {r['heldout_loss_quantized']:.4g}"
                    if "heldout_loss_quantized" in r else "-"]
        if checked:
            loss.append(f"{_fmt(r.get('predicted_delta_loss'))} / {_fmt(r.get('measured_delta_loss'))}")
        numel = r.get("quantized_params")
        body.append([
            r["method"], r["bits"] or "-", r["group_size"] or "-",
            *[_fmt(r.get(m)) for m in metrics], *loss,
            _fmt(r.get("effective_bits_per_weight")), "-" if numel is None else f"{numel / 1e6:.2f}",
            f"{r['file_bytes'] / 2**20:.1f}", _fmt(r.get("session_rss_mib")), _fmt(r.get("latency_ms")), _fmt(r.get("latency_vs_fp32")),
            _fmt(r.get("optimize_seconds")),
        ])
    head = (f"{results['model']} on {results['target']} ({results['machine']['cpu_count']} cores, "
            f"onnxruntime {results['machine']['onnxruntime']})")
    return f"### {head}\n\n" + table(headers, body) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def cuda_latency(
    onnx_path: Path,
    out_dir: Path,
    *,
    prompt: int = 128,
    bits: int = 4,
    group_size: int = 32,
    runs: int = 100,
) -> dict[str, Any]:
    """Batch-1 latency on the CUDA provider: a ``prompt``-token forward and a one-token step.

    Compares the fp16 model, ONNX Runtime's own 4-bit model (MatMulNBitsQuantizer, fp16), and
    hessc's ``target="cuda"`` model with fp16 and with fp32 activations; every model has static
    input shapes and runs with and without a captured CUDA graph. Needs onnxruntime-gpu.
    """
    import hessc
    from hessc.ir import frontend
    from hessc.runtime import lower as lowering
    from hessc.runtime import sessions

    out_dir.mkdir(parents=True, exist_ok=True)
    base = frontend.load(onnx_path)
    name = base.graph.inputs[0].name
    rows = []
    for seq in (prompt, 1):
        shapes = {name: [1, seq]}
        feed = {name: np.random.default_rng(0).integers(0, 1000, size=(1, seq)).astype(np.int64)}
        candidates: dict[str, Path] = {}
        fp32 = frontend.load(onnx_path)
        frontend.fix_input_shapes(fp32, shapes)
        candidates["fp16"] = hessc.save(lowering.to_fp16(fp32), out_dir / f"fp16-{seq}.onnx", external_data=True)
        ort_path = out_dir / f"ort-{seq}.onnx"
        fp32_static = hessc.save(fp32, out_dir / f"fp32-{seq}.onnx", external_data=True)
        _ort_quantize(fp32_static, ort_path, "ort-default", bits, group_size, True)
        candidates[f"ort-default {bits}-bit fp16"] = hessc.save(
            lowering.to_fp16(frontend.load(ort_path)), out_dir / f"ort16-{seq}.onnx", external_data=True)
        for fp16 in (True, False):
            start = time.perf_counter()
            m = hessc.optimize(str(onnx_path), target="cuda", bits=bits, group_size=group_size,
                               input_shapes=shapes, fp16=fp16)
            label = f"hessc {bits}-bit {'fp16' if fp16 else 'fp32'} act"
            candidates[label] = hessc.save(m, out_dir / f"hessc-{fp16}-{seq}.onnx", external_data=True)
            logger.info("%s optimized in %.1f s", label, time.perf_counter() - start)
        reference = sessions.session(fp32_static, "cpu").run(feed)[0].astype(np.float64)
        for label, path in candidates.items():
            for graph in (False, True):
                rel = None
                try:
                    sess = sessions.session(path, "cuda", cuda_graph=graph)
                    out = sess.run(feed)[0].astype(np.float64)
                    rel = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                    ms = sessions.median_latency_ms(sess.run_bound, feed, runs)
                    err = None
                except Exception as e:
                    ms, err = None, f"{type(e).__name__}: {str(e)[:200]}"
                rows.append({"model": label, "tokens": seq, "cuda_graph": graph, "latency_ms": ms,
                             "rel_error_vs_fp32": rel, "file_bytes": _dir_size(path), "error": err})
                logger.info("%s", rows[-1])
    results = {"rows": rows}
    (out_dir / "cuda_latency.json").write_text(json.dumps(results, indent=2))
    return results
