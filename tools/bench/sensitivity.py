"""``hessc bench --sensitivity``: which curvature estimate predicts the real loss change?

For every linear layer ``W`` (out × in) and a ``b``-bit RTN perturbation ``δ = Q_b(W) − W``, the
Taylor model (ALGORITHMS.md §1.2) predicts

    ΔL ≈ ⟨∇_W L, δ⟩ + ½ tr(G δ A δᵀ)          (K-FAC, with the gradient term)
    ΔL ≈ ½ tr(G δ A δᵀ)                       (K-FAC, quadratic only)
    ΔL ∝ ½ tr(δ A δᵀ)                         (layer-wise proxy, G = I: GPTQ's objective)

from statistics on calibration data. Each prediction is compared with the measured increase of
the held-out loss when only that layer is quantized (all others float), by Spearman rank
correlation over layers. The measurement runs the model with the one quantized weight swapped in:
in hessc's torch executor of the IR (``measure="onnx"``: any ONNX graph), or, several times
faster, in the model's own torch module (``measure="torch"``, zoo models), whose parameter names
are the names the exporter kept.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)


def predictions(stats, delta: np.ndarray) -> dict[str, float | None]:
    """Predicted loss changes of a perturbation ``delta`` (out × in) from a layer's statistics."""
    a = stats.a
    if a is None:
        return {"kfac": None, "kfac_quadratic": None, "layerwise": None}
    da = delta @ a  # (out, in)
    layerwise = 0.5 * float(np.einsum("oi,oi->", da, delta))
    if stats.g is not None:
        quadratic = 0.5 * float(np.einsum("po,oi,pi->", stats.g, da, delta))
    elif stats.g_diag is not None:
        quadratic = 0.5 * float(np.einsum("o,oi,oi->", stats.g_diag, da, delta))
    else:
        quadratic = None
    first = float(np.sum(stats.grad * delta)) if stats.grad is not None else 0.0
    return {
        "kfac": None if quadratic is None else first + quadratic,
        "kfac_quadratic": quadratic,
        "layerwise": layerwise,
    }


def run_sensitivity(
    model_name: str,
    out_dir: Path,
    *,
    bits: int = 3,
    group_size: int = 128,
    calibration_samples: int = 32,
    grad_samples: int = 8,
    seq_len: int = 256,
    eval_tokens: int = 1024,
    layers: int | None = None,
    measure: str = "torch",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Measures predicted vs real per-layer loss changes; writes ``sensitivity.json`` in out_dir."""
    import torch
    from scipy import stats as scipy_stats

    from hessc.bench import zoo
    from hessc.ir import frontend, meta
    from hessc.ir import weights as qweights
    from hessc.ir.executor import TorchExecutor
    from hessc.passes import quantize
    from hessc.passes.hessian import AnnotateHessianPass, HessianConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    zm = zoo.load_zoo(model_name, eval_tokens=eval_tokens)
    model = frontend.load(zm.onnx_path)
    feeds = zm.calibration(calibration_samples, 0)
    if "input_ids" in feeds[0]:
        feeds = [{k: v[:, :seq_len] for k, v in f.items()} for f in feeds]
    config = HessianConfig(kfac=True, gradient=True, max_samples=calibration_samples, max_grad_samples=grad_samples)
    start = time.perf_counter()
    from hessc import progress as progress_channel

    with progress_channel.listening(progress):
        AnnotateHessianPass(config, feeds)(model)
    annotate_seconds = time.perf_counter() - start

    if measure == "torch":
        module = zm.torch_module().eval()
        params = dict(module.named_parameters())

        def run(overrides: dict) -> Callable:
            def run_fn(feed):
                saved = {name: params[name].detach().clone() for name in overrides}
                try:
                    with torch.no_grad():
                        for name, value in overrides.items():
                            params[name].copy_(value)
                        out = module(*[torch.from_numpy(feed[n]) for n in zm.input_names])
                finally:
                    with torch.no_grad():
                        for name, value in saved.items():
                            params[name].copy_(value)
                return [(out[0] if isinstance(out, (tuple, list)) else out).numpy()]
            return run_fn
    else:
        executor = TorchExecutor(model)
        output = executor.output_names[0]

        def run(overrides: dict) -> Callable:
            def run_fn(feed):
                with torch.no_grad():
                    return [executor.run(feed, outputs=[output], overrides=overrides)[output].numpy()]
            return run_fn

    base = zm.evaluate(run({}))
    metric = "loss" if "loss" in base else next(iter(base))
    refs = [
        r for r in qweights.iter_weights(model)
        if r.op in ("MatMul", "Gemm") and meta.HESSIAN_KEY in r.value.meta and r.graph is model.graph
        and (measure != "torch" or r.name in params)
    ]
    refs = refs[:layers] if layers else refs
    rows = []
    for i, ref in enumerate(refs):
        w = ref.matrix().astype(np.float64)
        plan = meta.QuantPlan(ref.name, ref.op, ref.stored_shape, bits, group_size, False, "rtn", ref.matrix_shape)
        q, in_dim = quantize.quantize_matrix(w.astype(np.float32), plan)
        delta = q.dequantize()[:, :in_dim].astype(np.float64) - w
        predicted = predictions(ref.value.meta[meta.HESSIAN_KEY], delta)
        if measure == "torch":  # torch Linear weights are (out, in)
            override = {ref.name: torch.from_numpy(np.ascontiguousarray(w + delta, dtype=np.float32))}
        else:
            stored = (w + delta).T if ref.transposed else (w + delta)
            override = {ref.value.name: torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))}
        measured = zm.evaluate(run(override))[metric] - base[metric]
        rows.append({"name": ref.name, "shape": list(w.shape), "measured": measured, **predicted})
        logger.info("%d/%d %s: measured %.4g, kfac %s", i + 1, len(refs), ref.name, measured, predicted["kfac"])
        if progress:
            progress("layers", i + 1, len(refs))

    measured = np.array([r["measured"] for r in rows])
    correlation = {}
    for key in ("kfac", "kfac_quadratic", "layerwise"):
        values = np.array([r[key] if r[key] is not None else np.nan for r in rows], dtype=np.float64)
        ok = np.isfinite(values)
        correlation[key] = float(scipy_stats.spearmanr(values[ok], measured[ok]).statistic) if ok.sum() > 2 else None
    best = max((k for k, v in correlation.items() if v is not None), key=lambda k: correlation[k], default=None)
    result = {
        "model": model_name, "bits": bits, "group_size": group_size, "metric": metric,
        "baseline": base, "calibration_samples": calibration_samples, "grad_samples": grad_samples,
        "seq_len": seq_len, "eval_tokens": eval_tokens, "annotate_seconds": round(annotate_seconds, 1),
        "measure": measure,
        "spearman": correlation, "best_estimator": best, "layers": rows,
    }
    (out_dir / "sensitivity.json").write_text(json.dumps(result, indent=2))
    return result
