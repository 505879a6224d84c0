"""Readable reports: the ``hessc.plan`` record as markdown, and the model inspection table."""

from __future__ import annotations

import collections
from typing import Any

import onnx_ir as ir

from hessc.ir import weights as qweights


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plan_markdown(
    record: dict, title: str = "hessc optimization report", timings: dict | None = None, latency: dict | None = None,
    plot: str | None = None,
) -> str:
    """The plan record (``metadata_props["hessc.plan"]``) as a markdown report.

    Args:
        record: the plan record.
        title: the report's heading.
        timings: seconds per pass (``model.meta["hessc.timings"]``), when known.
        latency: float vs optimized latency (``model.meta["hessc.latency"]``), when measured.
        plot: file name of the bits-against-sensitivity plot (:func:`allocation_plot`) to link.
    """
    s = record["summary"]
    timings = timings or {}
    out = [f"# {title}", ""]
    out.append(
        table(
            ["target", "weights before", "weights after", "ratio", "effective bits/weight", "quantized weights", "time"],
            [[
                s["target"], _fmt_bytes(s["bytes_before"]), _fmt_bytes(s["bytes_after"]),
                f"{s['bytes_before'] / max(s['bytes_after'], 1):.2f}x",
                s.get("effective_bits_per_weight"), s.get("quantized_weights"),
                f"{timings['total']:.1f} s" if "total" in timings else "-",
            ]],
        )
    )
    out += ["", "Effective bits per weight count codes at their stored width plus scales and zero points.", ""]
    ver = record.get("verification")
    if ver:
        out += ["## Verification", ""]
        rows = []
        skipped = []
        for key in ("vs_float", "vs_portable"):
            v = ver.get(key)
            if isinstance(v, dict) and all(k in v for k in ("samples", "rel_error", "cosine", "max_abs_error")):
                rows.append([key.replace("_", " "), v["samples"], f"{v['rel_error']:.4g}", f"{v['cosine']:.6f}", f"{v['max_abs_error']:.4g}"])
            elif v is not None:
                skipped.append(f"{key.replace('_', ' ')}: {v}")
        out.append(f"Ran on {ver.get('provider', '?')}: {ver.get('status')}.")
        out += [f"- {line}" for line in skipped]
        if rows:
            out += ["", table(["outputs", "samples", "relative error", "cosine", "max abs error"], rows)]
        out.append("")
    if latency and latency.get("skipped"):
        out += ["## Latency", "", f"Not measured: {latency['skipped']}.", ""]
    elif latency:
        shape = ", ".join(f"{k} {v}" for k, v in latency["input"].items())
        out += ["## Latency", "", f"Median of interleaved runs (about 0.3 s each) on {latency['provider']}, "
                f"input {shape}.", "",
                table(["float ms", "optimized ms", "speed-up"],
                      [[latency["float"], latency["optimized"], f"{latency['float'] / latency['optimized']:.2f}x"]]), ""]
        if latency.get("slower"):
            out += [f"Slower than float: {latency['slower']}.", ""]
    if record.get("tuning", {}).get("skipped"):
        out += ["## Kernel tuning", "", f"Skipped: {record['tuning']['skipped']}.", ""]
    elif record.get("tuning"):
        tuning = record["tuning"]
        shape = ", ".join(f"{k} {v}" for k, v in tuning["serving_input"].items())
        rows = [[t["layer"], t["nodes"], *(t["ms"].get(f, "-") for f in ("level-4", "level-1")),
                 t["fp32_matmul_ms"] or "-", t["chosen"], t["vs_fp32"] or "-"] for t in tuning["layers"]]
        out += ["## Kernel tuning", "", f"Each MatMulNBits layer timed at input {shape} on {tuning['machine']}.", "",
                table(["layer", "nodes", "int8 compute ms", "fp32 compute ms", "fp32 MatMul ms", "chosen", "vs fp32"],
                      rows), ""]
    if record.get("int8_regions"):
        regions = record["int8_regions"]
        shape = ", ".join(f"{k} {v}" for k, v in regions["serving_input"].items())
        rows = [[", ".join(g["layers"]), g["int8_ms"], g["float_ms"], g["chosen"]] for g in regions["groups"]]
        out += ["## Static int8 regions", "", f"Each connected part of the static int8 region timed in the whole model "
                f"at input {shape} on {regions['machine']}, against the same part with float activations (8-bit "
                "weights either way).", "",
                table(["layers", "int8 ms", "float activations ms", "chosen"], rows), ""]
    if record.get("lowering"):
        out += ["## Lowering", "", table(["rewrite", "count"], [[k, v] for k, v in record["lowering"].items()]), ""]
    out += ["## Weights", ""]
    rows = [
        [w["name"], w["op"], "×".join(map(str, w["shape"])), w["bits"], w["group_size"] or "channel",
         "sym" if w["symmetric"] else "asym", w.get("method", "rtn"), _fmt_bytes(w["bytes"])]
        for w in record.get("weights", [])
    ]
    out.append(table(["weight", "op", "shape", "bits", "group", "zero point", "method", "bytes"], rows))
    if record.get("allocation"):
        out += ["", *_allocation_markdown(record, plot)]
    if record.get("skipped"):
        out += ["", "## Kept in float", "", table(["weight", "reason"], [[k, v] for k, v in record["skipped"].items()])]
    if timings:
        out += ["", "## Pass timings", "", table(["pass", "seconds"], [[k, v] for k, v in timings.items()])]
    return "\n".join(out) + "\n"


def _sensitivity(weight: dict) -> float:
    """Predicted Δloss at the fewest bits with the chosen quantizer: how much the weight suffers."""
    same = [c for c in weight["candidates"] if c["method"] == weight["method"]]
    same = same or [c for c in weight["candidates"] if c["method"] == "rtn"]
    return min(same, key=lambda c: (c["bits"], c["bytes"]))["predicted_delta_loss"]


def _item(c: dict, long: bool = False) -> str:
    """An allocator item in a few characters: ``3g``, ``4r+c16`` (compensated at rank 16),
    ``split r96 8-bit``."""
    if c.get("form") == "split":
        factors = "float" if c["factor_bits"] >= 16 else f"{c['factor_bits']}-bit"
        return f"split rank {c['rank']} ({factors} factors)" if long else f"split{c['rank']}/{c['factor_bits']}"
    plain = f"{c['bits']}-bit {c['method']}" if long else f"{c['bits']}{c['method'][0]}"
    if c.get("form") == "compensate":
        return plain + (f" + rank-{c['rank']} compensation" if long else f"+c{c['rank']}")
    return plain


def _allocation_markdown(record: dict, plot: str | None) -> list[str]:
    s, alloc = record["summary"], record["allocation"]
    budget = (f"{s['budget_bits']} bits/weight" if s.get("budget_bits") is not None
              else "lossless" if s.get("allocation_mode") == "lossless" else _fmt_bytes(s.get("budget_bytes")))
    out = ["## Bit allocation", "",
           f"Budget {budget}; allocated {_fmt_bytes(s.get('allocated_bytes'))} "
           f"({s.get('allocated_effective_bits')} effective bits/weight); predicted Δloss "
           f"{s.get('predicted_delta_loss', 0.0):.4g} (estimator {alloc.get('estimator')}). "
           + ("3-bit codes are stored at 3 bits (MatMulNBits runs them as 4-bit)." if s.get("target") in ("cpu", "cuda")
              else "A 3-bit item costs its 4-bit container, so it is chosen only when it predicts less loss than 4 bits."),
           ""]
    if alloc.get("note"):
        out += [alloc["note"], ""]
    if "heldout_loss_fp32" in s:
        out += [f"Held-out loss: fp32 {s['heldout_loss_fp32']:.6g}, quantized {s['heldout_loss_quantized']:.6g}, "
                f"after {len(s.get('steps', []))} back-off steps.", ""]
    rows = []
    for w in alloc["weights"]:
        curv = w.get("curvature") or {}
        curv_text = ", ".join(f"{k} {curv[k]:.3g}" for k in ("a_trace", "g_trace", "grad_norm", "lambda_max") if k in curv) or "-"
        items = " · ".join(f"{_item(c)} {c['predicted_delta_loss']:.2e}" for c in w["candidates"]
                           if c["method"] != "float" and not c.get("form"))
        forms = [c for c in w["candidates"] if c.get("form")]
        if forms:  # the best low-rank item of each form, to show what it was up against
            best = [min((c for c in forms if c["form"] == f), key=lambda c: c["predicted_delta_loss"])
                    for f in dict.fromkeys(c["form"] for c in forms)]
            items += " · " + " · ".join(f"{_item(c)} {c['predicted_delta_loss']:.2e}" for c in best)
        rows.append([w["name"], f"{_item(w, long=True)} ({w.get('estimator', '?')})", f"{w['predicted_delta_loss']:.3e}",
                     _fmt_bytes(w["bytes"]), curv_text, items])
    out.append(table(["weight", "chosen", "predicted Δloss", "bytes", "curvature", "candidates (bits+method: Δloss)"], rows))
    if record.get("low_rank"):
        rows = [[name, r["form"], "×".join(map(str, r["shape"])), r["rank"],
                 "float" if r["factor_bits"] >= 16 else r["factor_bits"], r["params_saved"],
                 f"{r['macs_per_row'] / r['macs_per_row_before']:.2f}"] for name, r in record["low_rank"].items()]
        out += ["", "Low-rank forms (split: W ≈ L·R; compensate: Q(W) + L·R), factors fitted in the input "
                "covariance's metric:", "",
                table(["weight", "form", "shape", "rank", "factor bits", "params saved", "MACs vs W"], rows)]
    if plot:
        out += ["", f"![bits against sensitivity]({plot})"]
    return out


def allocation_plot(record: dict, path) -> bool:
    """Chosen bits against sensitivity (predicted Δloss at the fewest bits), one point per weight,
    as a PNG (matplotlib, Agg backend); False when the record has no allocation."""
    alloc = record.get("allocation")
    if not alloc or not alloc.get("weights"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = alloc["weights"]
    x = [max(abs(_sensitivity(w)), 1e-30) for w in weights]
    y = [w["bits"] for w in weights]
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"gptq": "tab:orange", "rtn-grad": "tab:green"}
    ax.scatter(x, y, c=[colours.get(w["method"], "tab:blue") for w in weights])
    ax.set_xscale("log")
    ax.set_xlabel("|predicted Δloss| at the fewest bits (chosen quantizer)")
    ax.set_ylabel("chosen bits (32 = float)")
    ax.set_title("bits against sensitivity (orange: GPTQ, green: RTN gradient-directed, blue: RTN)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def inspect_model(model: ir.Model) -> dict:
    """Weights, sizes, ops, and what hessc can and cannot compress."""
    refs, skipped = qweights.find_weights(model)
    ops = collections.Counter(
        (n.domain + "::" if n.domain not in ("", "ai.onnx") else "") + n.op_type
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    weights = [
        {
            "name": r.name, "op": r.op, "shape": list(r.stored_shape), "params": r.numel,
            "dtype": r.value.dtype.name, "bytes": int(r.value.const_value.nbytes),
            "matrix": list(r.matrix_shape),
        }
        for r in refs
    ]
    return {
        "opset": model.opset_imports.get(""),
        "inputs": [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
                    "dtype": v.dtype.name if v.dtype else None} for v in model.graph.inputs],
        "outputs": [v.name for v in model.graph.outputs],
        "ops": dict(ops.most_common()),
        "initializer_bytes": int(total),
        "compressible": weights,
        "compressible_bytes": int(sum(w["bytes"] for w in weights)),
        "not_compressible": [{"name": s.name, "op": s.op, "reason": s.reason} for s in skipped],
    }


def inspect_markdown(info: dict) -> str:
    out = [
        f"opset {info['opset']}; initializers {_fmt_bytes(info['initializer_bytes'])}, of which "
        f"{_fmt_bytes(info['compressible_bytes'])} in {len(info['compressible'])} compressible weights",
        "",
        table(["weight", "op", "shape", "params", "dtype", "bytes"],
              [[w["name"], w["op"], "×".join(map(str, w["shape"])), w["params"], w["dtype"], _fmt_bytes(w["bytes"])]
               for w in info["compressible"]]),
    ]
    if info["not_compressible"]:
        out += ["", "Not compressible:", "",
                table(["weight", "op", "reason"], [[s["name"], s["op"], s["reason"]] for s in info["not_compressible"]])]
    out += ["", "Ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items())]
    return "\n".join(out) + "\n"


def curvature_rows(model: ir.Model) -> list[dict]:
    """One row per annotated weight, most sensitive first.

    Sensitivity is the trace of the layer's Hessian block (the expected loss increase under
    isotropic weight noise): Hutchinson's estimate when measured, else the K-FAC closed form
    ``tr(A) tr(G)``, else ``tr(A)`` (the layer-wise proxy).
    """
    from hessc.ir import meta

    rows = []
    for ref in qweights.iter_weights(model):
        stats = ref.value.meta.get(meta.HESSIAN_KEY)
        if stats is None:
            continue
        s = stats.summary()
        trace = s.get("hutchinson_trace", s.get("kfac_trace", s.get("a_trace")))
        rows.append({
            "name": ref.name, "op": ref.op, "shape": list(ref.matrix_shape),
            "a_eig_max": s.get("a_eig_max"), "a_trace": s.get("a_trace"),
            "lambda_max": s.get("lambda_max", s.get("kfac_lambda_max")),
            "lambda_max_source": "hvp" if "lambda_max" in s else ("kfac" if "kfac_lambda_max" in s else None),
            "trace": trace,
            "trace_source": "hutchinson" if "hutchinson_trace" in s else ("kfac" if "kfac_trace" in s else "a"),
            "a_eig_top": [float(v) for v in (stats.a_eig_top if stats.a_eig_top is not None else [])],
        })
    rows.sort(key=lambda r: -(r["trace"] or 0.0))
    return rows


def curvature_markdown(rows: list[dict]) -> str:
    def g(v) -> str:
        return "-" if v is None else f"{v:.4g}"

    body = [[r["name"], "×".join(map(str, r["shape"])), g(r["a_eig_max"]), g(r["a_trace"]),
             g(r["lambda_max"]) + (f" ({r['lambda_max_source']})" if r["lambda_max_source"] else ""),
             g(r["trace"]) + f" ({r['trace_source']})"] for r in rows]
    return table(["weight", "out×in", "a_eig_max", "a_trace", "lambda_max", "trace (sensitivity)"], body) + "\n"


def plot_curvature(model: ir.Model, rows: list[dict], path) -> None:
    """Per-layer sensitivity (bars, log scale) and the input-covariance spectra of the top layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    left.bar(range(len(rows)), [max(r["trace"] or 0.0, 1e-30) for r in rows])
    left.set_yscale("log")
    left.set_xlabel("layer (most sensitive first)")
    left.set_ylabel("Hessian trace estimate")
    left.set_title("per-layer sensitivity")
    for r in rows[:5]:
        if r["a_eig_top"]:
            right.semilogy(range(1, len(r["a_eig_top"]) + 1), r["a_eig_top"], marker="o", label=r["name"][-40:])
    right.set_xlabel("eigenvalue index")
    right.set_ylabel("eigenvalue of A = E[x xᵀ]")
    right.set_title("input-covariance spectra, 5 most sensitive layers")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
