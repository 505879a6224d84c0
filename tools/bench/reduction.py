"""``hessc bench --model smollm2 --param-reduction 10,20,30``: float low-rank splitting, hessc's
loss-driven ranks against uniform ratios, at equal parameter counts, in one run.

The model's MatMul/Gemm weights that can have a low-rank form (:func:`hessc.passes.low_rank.supports`:
64 and more in both dimensions, not tied to an embedding) lose the given share of their parameters
three ways, with float factors (no quantization):

- ``svd-uniform``: every weight at the rank that removes that share of its own parameters, plain
  truncated SVD (``A = I``);
- ``whitened-uniform``: the same ranks, activation-whitened SVD (SVD-LLM);
- ``hessc``: whitened SVD with each weight's rank chosen by the grouped knapsack on the predicted
  loss change (:class:`~hessc.passes.allocate_bits.AllocateBitsPass` with ``float_only``) under the
  same parameter budget;
- ``share-adjacent`` / ``share-hessc``: cross-layer sharing of the repeated layers
  (:class:`~hessc.passes.share_weights.ShareWeightsPass`) at the same share of their parameters,
  merges restricted to consecutive layers (Basis Sharing) or free (hessc's colouring); where no
  merge pays, each layer keeps a private whitened factorization, the ``whitened-uniform`` model.

All three read one curvature annotation of the same calibration feeds; the quality metric is the
zoo model's own on its held-out data (perplexity, Lee Pearson and cosine to fp32).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from hessc.errors import InputError
from hessc.report import table

logger = logging.getLogger(__name__)

LATENCY_MS = 300.0
"""Time per model of the interleaved latency rounds."""

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
"""Split ranks the knapsack chooses among, as fractions of the break-even rank (finer than the
quantized budget's, since no bit widths compete here)."""


def _annotated(src: Path, feeds: list[dict], progress=None):
    """The model with its curvature statistics (K-FAC, gradients) over ``feeds``."""
    import hessc
    from hessc import options as opts
    from hessc.ir import meta
    from hessc.passes import pipeline
    from hessc.runtime import targets

    model = hessc.load(src)
    model.meta[meta.CALIBRATION_KEY] = meta.Calibration(feeds=tuple(feeds))
    options = opts.CompileOptions(target="onnx", bits=3.5, has_calibration=True,
                                  passes=("upgrade-opset", "annotate-hessian"))
    return pipeline.run(pipeline.build_pipeline(options, targets.get("onnx")), model)


def _eligible(model) -> list:
    from hessc.ir import meta
    from hessc.ir import weights as qweights
    from hessc.passes import low_rank, quantize

    groups = quantize.weight_groups(list(qweights.iter_weights(model)))
    return [g.lead for g in groups if not g.tied and low_rank.supports(g.lead) is None
            and g.lead.value.meta.get(meta.HESSIAN_KEY) is not None]


def _uniform(model, share: float, whiten: bool) -> dict[str, Any]:
    from hessc.ir import meta
    from hessc.passes import low_rank

    params = 0
    for ref in _eligible(model):
        m, n = ref.matrix_shape
        rank = max(1, math.floor((1 - share) * m * n / (m + n)))
        ref.value.meta[meta.RANK_KEY] = meta.RankPlan(ref.name, "split", rank, 32)
        params += m * n - rank * (m + n)
    low_rank.SplitLowRankPass(whiten=whiten)(model)
    return {"params_removed": params}


def _shared(model, share: float, adjacent: bool) -> dict[str, Any]:
    from hessc.passes import share_weights

    share_weights.ShareWeightsPass(share_weights.ShareConfig(reduction=share, adjacent_only=adjacent))(model)
    record = model.meta[share_weights.SHARE_KEY]
    colours = [c for r in record["roles"] for c in r["colours"] if len(c["layers"]) > 1]
    return {"params_removed": record["params_before"] - record["params_after"], "shared_bases": len(colours),
            "shared_layers": sum(len(c["layers"]) for c in colours),
            "predicted_delta_loss": record["predicted_delta_loss"]}


def _knapsack(model, share: float) -> dict[str, Any]:
    from hessc.ir import meta
    from hessc.ir import weights as qweights
    from hessc.passes import allocate_bits, low_rank, quantize

    quantize.PlanQuantizationPass(quantize.QuantConfig(bits=8))(model)
    eligible = {id(r.value) for r in _eligible(model)}
    refs = [g.lead for g in quantize.weight_groups(list(qweights.iter_weights(model)))
            if g.plan() is not None and g.lead.op in allocate_bits.ALLOCATED_OPS
            and g.lead.value.meta.get(meta.HESSIAN_KEY) is not None]
    total = sum(r.numel for r in refs)
    removable = sum(r.numel for r in refs if id(r.value) in eligible)
    budget = int(4 * (total - share * removable))
    config = allocate_bits.AllocationConfig(budget_bytes=budget, low_rank=True, float_only=True,
                                            split_fractions=FRACTIONS)
    allocate_bits.AllocateBitsPass(config)(model)
    record = model.meta[allocate_bits.ALLOCATION_KEY]
    low_rank.SplitLowRankPass()(model)
    for ref in qweights.iter_weights(model):  # float only: the plan-quantization plans go
        ref.value.meta.pop(meta.QUANT_KEY, None)
    ranks = [w.get("rank", 0) for w in record["weights"] if w.get("form") == "split"]
    forms = model.meta.get(low_rank.LOW_RANK_KEY, {})
    return {"params_removed": sum(r["params_saved"] for r in forms.values()), "split_weights": len(ranks),
            "predicted_delta_loss": record["predicted_delta_loss"]}


def run_reduction(model: str, shares_percent: Sequence[int], out_dir: Path, eval_tokens: int = 2048,
                  calibration_samples: int | None = None) -> dict[str, Any]:
    """Every variant at every share; writes ``reduction.json`` and ``reduction.md`` in out_dir."""
    import hessc
    from hessc.bench import compare, zoo
    from hessc.ir import frontend
    from hessc.passes import quantize
    from hessc.runtime import sessions

    if model not in ("minilm", "smollm2"):
        raise InputError(f"--param-reduction is for the language models minilm and smollm2, not {model!r}")
    if any(not 0 < p < 100 for p in shares_percent):
        raise InputError(f"--param-reduction {shares_percent}: give percentages between 0 and 100")
    zm = zoo.load_zoo(model, eval_tokens=eval_tokens)
    feeds = zm.calibration(calibration_samples or compare.CALIBRATION_SAMPLES.get(model, 8), 0)
    start = time.perf_counter()
    base = _annotated(Path(zm.onnx_path), feeds)
    annotate_s = time.perf_counter() - start
    removable = sum(r.numel for r in _eligible(base))
    rows = [{"method": "fp32", "reduction_percent": 0, "params_removed": 0,
             **zm.evaluate(sessions.session(zm.onnx_path, "cpu").run)}]
    work = Path(tempfile.mkdtemp(prefix="hessc-reduction-"))
    paths = [Path(zm.onnx_path)]
    for percent in shares_percent:
        share = percent / 100
        for method in ("svd-uniform", "whitened-uniform", "hessc", "share-adjacent", "share-hessc"):
            candidate = frontend.clone(base)
            began = time.perf_counter()
            if method == "hessc":
                facts = _knapsack(candidate, share)
            elif method.startswith("share"):
                facts = _shared(candidate, share, adjacent=method == "share-adjacent")
            else:
                facts = _uniform(candidate, share, whiten=method == "whitened-uniform")
            quantize.InsertQDQPass()(candidate)  # nothing to quantize: opset and ties as a compile leaves them
            seconds = time.perf_counter() - began
            metrics = zm.evaluate(sessions.session(candidate, "cpu").run)
            paths.append(hessc.save(candidate, work / f"{method}-{percent}.onnx", external_data=True))
            row = {"method": method, "reduction_percent": percent, **facts,
                   "removed_share_of_linears": round(facts["params_removed"] / removable, 4),
                   "seconds": round(seconds, 1), **metrics}
            rows.append(row)
            logger.info("%s", row)
    # Memory and speed of every variant in fresh sessions, latency interleaved; a shared basis read
    # by several MatMuls is prepacked once per reader unless prepacking is off.
    feed = compare._latency_feed(zm, model, feeds)
    for row, path in zip(rows, paths):
        row["session_rss_mib"] = compare.session_rss_mib(path, "cpu", feed)
        if row["method"].startswith("share"):
            row["session_rss_mib_no_prepacking"] = compare.session_rss_mib(path, "cpu", feed, prepacking=False)
    runners = [sessions.session(p, "cpu", spinning=False).run for p in paths]
    for row, ms in zip(rows, sessions.interleaved_latency_ms(runners, feed, None, target_ms=LATENCY_MS)):
        row["latency_ms"] = round(ms, 3)
        row["latency_vs_fp32"] = round(ms / rows[0]["latency_ms"], 3)
    shutil.rmtree(work, ignore_errors=True)
    result = {"model": model, "removable_params": removable, "annotate_seconds": round(annotate_s, 1),
              "calibration_feeds": len(feeds), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reduction.json").write_text(json.dumps(result, indent=2))
    metric_keys = [k for k in dict.fromkeys(k for r in rows for k in r)
                   if k not in ("method", "reduction_percent", "params_removed", "split_weights", "predicted_delta_loss",
                                "seconds", "removed_share_of_linears", "shared_bases", "shared_layers")]
    text = table(["method", "reduction %", "params removed", "share of the linears", "shared bases (layers)",
                  *metric_keys],
                 [[r["method"], r["reduction_percent"], r["params_removed"], r.get("removed_share_of_linears", 0),
                   f"{r['shared_bases']} ({r['shared_layers']})" if "shared_bases" in r else "-",
                   *[round(r[k], 4) if isinstance(r.get(k), float) else r.get(k) for k in metric_keys]] for r in rows])
    (out_dir / "reduction.md").write_text(text + "\n")
    print(text)
    return result
