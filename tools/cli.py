"""The ``hessc`` command line, fit for build systems.

Exit codes: 0 success, 2 bad input or unsupported request (one line on stderr saying what is wrong
and how to fix it), 3 a produced model failed verification, 1 an internal error. No prompts;
``--quiet`` silences progress; ``--json`` prints machine-readable results on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from hessc.errors import HesscError, InputError
from hessc.runtime.targets import TARGETS


def _progress_factory(quiet: bool):
    """A ``progress(stage, done, total)`` callback drawing one tqdm bar per stage on stderr."""
    if quiet:
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bits(text: str) -> int | float | str:
    """``4`` → uniform 4-bit codes; ``3.5`` or ``3.0`` (a decimal point) → an average-bits budget."""
    from hessc.options import parse_bits

    try:
        return parse_bits(text)
    except InputError:
        raise argparse.ArgumentTypeError(f"expected a number of bits (4, 3.5) or 'lossless', got {text!r}") from None


def _size(text: str) -> int:
    from hessc.runtime.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _name_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _bits_list(text: str) -> list[int | float | str]:
    return [_bits(item) for item in text.split(",") if item.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hessc", description="Curvature-guided compression of ONNX models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="compress and lower a model")
    o.add_argument("input", help="the fp32 .onnx model")
    o.add_argument("-o", "--output", required=True, help="where to write the optimized .onnx")
    o.add_argument("--target", choices=list(TARGETS), default="cpu")
    o.add_argument("--bits", type=_bits, default=4,
                   help="bits per weight: 2, 3, 4 or 8 (uniform); a number with a decimal point (3.5, 3.0) is an "
                        "average-bits budget over every quantized weight (scales and zero points counted) for the "
                        "bit allocator; 'lossless' the smallest allocation not worse on held-out data (default 4)")
    o.add_argument("--budget-bytes", type=int, help="instead of --bits: stored bytes for the weights --bits would budget")
    o.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="quantizer (gptq needs --calibration); with a budget, the quantizers offered")
    o.add_argument("--rounding", choices=["nearest", "gradient"], default="nearest",
                   help="with a budget or lossless: also offer 4- and 8-bit items that round weights near a "
                        "rounding boundary against the calibration loss gradient")
    o.add_argument("--group-size", type=int, default=32, help="weights per scale, 16-256 (default 32)")
    o.add_argument("--symmetric", action="store_true", help="no zero points")
    o.add_argument("--calibration", help=".npz with one array per model input (first axis = samples)")
    o.add_argument("--report", help="write a markdown report here")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="make a graph input static (repeatable); needed for CUDA graphs")
    o.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    o.add_argument("--no-verify", action="store_true", help="skip the ORT comparison with the float model")
    o.add_argument("--passes", type=_name_list, metavar="A,B,...",
                   help="run exactly these passes, in this order (`hessc passes` lists them)")
    o.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help="drop a pass from the pipeline (repeatable)")
    o.add_argument("--rotate", choices=["none", "hadamard", "random", "learned"], default="none",
                   help="fold an orthogonal rotation of the residual stream into a pre-norm decoder's weights "
                        "before quantizing (exact; makes low-bit codes fit better)")
    o.add_argument("--int8-range", choices=["auto", "full", "reduced"], default="auto",
                   help="static int8 conv weights on [-127,127] (full: CPUs with VNNI, ARM) or [-63,63] (reduced: "
                        "x86 without VNNI, whose u8*s8 kernels saturate); auto: as this machine's CPU needs")
    o.add_argument("--no-allocation-check", action="store_true",
                   help="with a fractional budget, trust the allocator's predicted loss change instead of measuring "
                        "it on the calibration data (a held-out quarter from 16 samples) and correcting the "
                        "allocation where it is exceeded")
    o.add_argument("--no-low-rank", action="store_true",
                   help="with a budget, offer the allocator bit widths only (no low-rank split or compensation items)")
    o.add_argument("--share", type=float, metavar="FRACTION",
                   help="cross-layer weight sharing first: remove this share of the repeated layers' parameters "
                        "(e.g. 0.2), layers of one role sharing bases where the loss predicts it pays")
    o.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="resident memory for the whole-model checks (e.g. 2.5G): verification against the float "
                        "model and the latency check run only where their sessions fit, else verification goes "
                        "weight by weight (default: 70%% of the memory this machine has available)")
    o.add_argument("--float-embeddings", action="store_true",
                   help="keep embedding tables (and output heads tied to them) in float")
    o.add_argument("--no-tune", action="store_true",
                   help="on cpu, keep int8 compute for every MatMulNBits and every static int8 conv instead of timing "
                        "them at the serving shape and keeping the faster of int8 and float compute")
    o.add_argument("--max-loss-increase", type=float, default=1.0, metavar="NATS",
                   help="a language model whose next-token loss rises by more is degraded (default 1.0)")
    o.add_argument("--min-output-cosine", type=float, default=0.5,
                   help="a result whose outputs' cosine to the float model is lower is degraded (default 0.5)")
    o.add_argument("--allow-degraded", action="store_true",
                   help="write a degraded result (recorded in the plan) instead of exiting with code 3")
    o.add_argument("--custom-op-library", action="append", default=[], metavar="PATH",
                   help="a shared library registering the model's custom operators with ONNX Runtime (repeatable)")
    o.add_argument("--quiet", action="store_true")
    o.add_argument("--json", action="store_true", help="print the plan summary as JSON")

    ps = sub.add_parser("passes", help="list the default pipeline's passes in execution order")
    ps.add_argument("--target", choices=list(TARGETS), default="cpu")
    ps.add_argument("--bits", type=_bits, default=4, help="the pipeline for these bits (a budget adds the allocator)")
    ps.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    ps.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="list weights, sizes, ops and what can be compressed")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.add_argument("--calibration", help=".npz calibration data (for --hessian)")
    i.add_argument("--hessian", action="store_true",
                   help="per-layer curvature table (input covariance and K-FAC factors), sorted by sensitivity")
    i.add_argument("--hvp", action="store_true",
                   help="with --hessian: also exact lambda_max and Hutchinson trace by Hessian-vector products (slow)")
    i.add_argument("--samples", type=int, default=32, help="calibration samples for the covariance (default 32)")
    i.add_argument("--plot", help="with --hessian: draw sensitivity and spectra to this PNG")
    i.add_argument("--quiet", action="store_true")

    b = sub.add_parser("bench", help="compare hessc with ONNX Runtime's quantizers on a real model")
    b.add_argument("--model", required=True, help="minilm, smollm2, efficientnet, forms (a zoo of graph forms), families (random-weight models of "
                   "many transformers architectures, exported as a user would), kernels (the CPU's MatMul "
                   "kernels on one layer), memory (peak memory of optimize on a synthetic model of --size-gib), "
                   "or a .onnx path")
    b.add_argument("--bits", type=_bits_list, default=[4],
                   help="comma-separated: integers, fractional budgets (3.5) or 'lossless' (hessc methods)")
    b.add_argument("--group-size", type=_int_list, default=[32])
    b.add_argument("--target", choices=list(TARGETS), default="cpu")
    b.add_argument("--methods", default="hessc,ort-rtn,ort-default")
    b.add_argument("--out", required=True, help="directory for results.json and results.md")
    b.add_argument("--eval-tokens", type=int, default=4096, help="smollm2 perplexity tokens")
    b.add_argument("--latency-runs", type=int, default=20)
    b.add_argument("--calibration-samples", type=int,
                   help="calibration feeds (default: 64 for efficientnet and minilm, 8 sequences for smollm2)")
    b.add_argument("--sensitivity", type=int, metavar="BITS",
                   help="instead: correlate predicted per-layer loss changes of a BITS-bit RTN "
                        "perturbation with measured held-out loss changes (Spearman)")
    b.add_argument("--layers", type=int, help="with --sensitivity: only the first N layers")
    b.add_argument("--param-reduction", type=_int_list, metavar="P,Q",
                   help="minilm/smollm2: float low-rank splitting removing P%%, Q%% of the linears' parameters: hessc's "
                        "knapsack ranks vs plain and whitened SVD at a uniform ratio")
    b.add_argument("--serving-tokens", type=_int_list, metavar="N,M",
                   help="minilm/smollm2: 4-bit hessc (tuned at each length) vs fp32 and ORT's 4-bit RTN, latency at "
                        "these sequence lengths")
    b.add_argument("--decode", action="store_true",
                   help="smollm2: decoding with a KV cache in onnxruntime-genai, hessc at --bits against genai's builder "
                        "(fp32, int4): perplexity, prefill ms, decode tokens/s to 512 and at 2048 cached tokens, greedy agreement")
    b.add_argument("--rounds", type=int, default=3, help="--decode: interleaved timing rounds")
    b.add_argument("--size-gib", type=float, default=8.0, help="memory: the synthetic model's size (default 8)")
    b.add_argument("--max-memory", help="memory: also run each method under this --max-memory (e.g. 2.5G)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="all-MiniLM-L6-v2 through optimize for the CPU, before and after")
    d.add_argument("--bits", type=int, default=4)
    d.add_argument("--group-size", type=int, default=32)
    d.add_argument("--quiet", action="store_true")
    return p


def _input_shapes(specs: list[str]) -> dict[str, list[int]] | None:
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise InputError(f"--input-shape {spec!r}: write NAME=D1,D2,... with integer dims") from None
    return shapes or None


def _cmd_optimize(args) -> int:
    import hessc
    from hessc import api, report
    from hessc.ir import meta

    inp = Path(args.input)
    if not inp.exists():
        raise InputError(f"{inp}: no such file; check the path")
    api.check_output_path(inp, args.output)
    if args.calibration and not Path(args.calibration).exists():
        raise InputError(f"{args.calibration}: no such calibration file; check the path")
    if not args.quiet:
        budget = "lossless" if args.bits == "lossless" else (f"budget {args.budget_bytes} bytes" if args.budget_bytes
                 else (f"{args.bits} bits" if isinstance(args.bits, int) else f"budget {args.bits} bits/weight"))
        print(f"hessc: target {args.target}, {budget}, group {args.group_size}, method {args.method}"
              f"{', symmetric' if args.symmetric else ''}, rounding {args.rounding}, seed {args.seed}", file=sys.stderr)
    model = hessc.optimize(
        str(inp), target=args.target, bits=args.bits, group_size=args.group_size,
        budget_bytes=args.budget_bytes, method=args.method, rounding=args.rounding,
        calibration=args.calibration, seed=args.seed, symmetric=args.symmetric,
        verify=not args.no_verify, progress=_progress_factory(args.quiet),
        input_shapes=_input_shapes(args.input_shape), measure_latency=True,
        passes=args.passes, disable_passes=args.disable_pass, custom_op_libraries=args.custom_op_library,
        max_loss_increase=args.max_loss_increase, min_output_cosine=args.min_output_cosine,
        allow_degraded=args.allow_degraded, rotate=args.rotate, int8_range=args.int8_range,
        tune=not args.no_tune, check_allocation=not args.no_allocation_check,
        low_rank=not args.no_low_rank, share=args.share,
        quantize_embeddings=not args.float_embeddings, max_memory=args.max_memory,
    )
    written = api.save(model, args.output, external_data=True if args.external_data else None)
    record = meta.read_plan(model)
    if args.report:
        plot = Path(args.report).with_suffix(".png")
        plot.parent.mkdir(parents=True, exist_ok=True)
        has_plot = report.allocation_plot(record, plot)
        _write_text(Path(args.report), report.plan_markdown(
            record, timings=model.meta.get(meta.TIMINGS_KEY), latency=model.meta.get(meta.LATENCY_KEY),
            plot=plot.name if has_plot else None))
    s = record["summary"]
    if args.json:
        print(json.dumps({"output": str(written), "summary": s, "verification": record.get("verification"),
                          "passes": record.get("passes"), "seconds": model.meta.get(meta.TIMINGS_KEY)}, indent=2))
    elif not args.quiet:
        ver = record.get("verification", {}).get("vs_float")
        extra = f", output cosine to fp32 {ver['cosine']:.4f}" if ver else ""
        if record.get("verification", {}).get("mode") == "weight by weight":
            extra += ", verified weight by weight (the float model's session does not fit: the plan's verification)"
        latency = model.meta.get(meta.LATENCY_KEY)
        if latency and "skipped" not in latency:
            extra += f", latency {latency['float']:.2f} -> {latency['optimized']:.2f} ms at {latency['input']}"
            if "cached_tokens" in latency:
                extra += f" after {latency['cached_tokens']} cached tokens"
        bits = (f"{s['effective_bits_per_weight']} effective bits/weight" if s.get("effective_bits_per_weight")
                else f"no weight stored quantized ({len(record.get('skipped') or {})} kept in float: the plan's "
                     "`skipped` says why)")
        print(f"wrote {written}: weights {s['bytes_before'] / 2**20:.1f} MiB -> {s['bytes_after'] / 2**20:.1f} MiB, "
              f"{bits}{extra}")
    return 0


def _cmd_inspect(args) -> int:
    import hessc
    from hessc import report

    model = hessc.load(args.model)
    if not args.hessian:
        if args.plot or args.calibration:
            raise InputError("--calibration and --plot go with --hessian")
        info = report.inspect_model(model)
        print(json.dumps(info, indent=2) if args.json else report.inspect_markdown(info), end="\n" if args.json else "")
        return 0
    if not args.calibration:
        raise InputError("--hessian needs calibration data: pass --calibration DATA.npz")
    from hessc import progress
    from hessc.passes.hessian import AnnotateHessianPass, HessianConfig
    from hessc.runtime import calibration

    feeds = calibration.feeds_from(args.calibration, model, limit=args.samples)
    config = HessianConfig(
        kfac=True, max_samples=args.samples, lambda_max=args.hvp, hutchinson_probes=50 if args.hvp else 0,
    )
    with progress.listening(_progress_factory(args.quiet)):
        AnnotateHessianPass(config, feeds)(model)
    rows = report.curvature_rows(model)
    if args.plot:
        report.plot_curvature(model, rows, Path(args.plot))
    print(json.dumps(rows, indent=2) if args.json else report.curvature_markdown(rows))
    return 0


def _cmd_passes(args) -> int:
    from hessc.options import CompileOptions
    from hessc.passes import pipeline
    from hessc.runtime import targets

    target = targets.get(args.target)
    options = CompileOptions(target=args.target, bits=args.bits, method=args.method, has_calibration=True)
    default = set(pipeline.default_names(options, target))
    rows = [{"name": pipeline.spec_name(spec, target), "summary": spec.summary,
             "default": pipeline.spec_name(spec, target) in default, "available": spec.available}
            for spec in pipeline.PASSES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["default"] else ("-" if not r["available"] else " ")
        print(f"{mark} {r['name']:<{width}}  {r['summary']}")
    missing = "; - not implemented yet" if any(not r["available"] for r in rows) else ""
    print(f"\n* runs by default for --target {args.target} --bits {args.bits} --method {args.method}{missing}")
    return 0


def _cmd_bench(args) -> int:
    from hessc.bench import compare as bench

    if args.sensitivity:
        from hessc.bench import sensitivity

        result = sensitivity.run_sensitivity(
            args.model, Path(args.out), bits=args.sensitivity, group_size=args.group_size[0],
            eval_tokens=args.eval_tokens, layers=args.layers, progress=_progress_factory(args.quiet),
        )
        summary = {k: result[k] for k in ("model", "bits", "group_size", "metric", "spearman", "best_estimator")}
        print(json.dumps(summary if not args.json else result, indent=2))
        return 0

    if args.model == "forms":
        from hessc.bench import forms

        forms.run_forms(Path(args.out), target=args.target)  # rounds by duration: the forms run in microseconds
        return 0
    if args.model == "families":
        from hessc.bench import families

        families.run_families(Path(args.out), target=args.target, bits=args.bits)
        return 0
    if args.model == "memory":
        from hessc.bench import memory

        methods = [m.strip() for m in args.methods.split(",") if m.strip() in ("rtn", "gptq")] or ["rtn"]
        bits = args.bits[0] if args.bits and isinstance(args.bits[0], int) else 4
        memory.run_memory(Path(args.out), args.size_gib, methods=methods, bits=bits, max_memory=args.max_memory)
        return 0
    if args.model == "kernels":
        from hessc.bench import kernels

        kernels.run_kernels(Path(args.out))
        return 0

    if args.decode:
        from hessc.bench import decode

        decode.check_model(args.model)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if methods == ["hessc", "ort-rtn", "ort-default"]:  # the default --methods: hessc's default quantizer
            methods = ["rtn"]
        decode.run_decode(args.bits, Path(args.out), eval_tokens=args.eval_tokens, rounds=args.rounds,
                          calibration_samples=args.calibration_samples or 8, methods=methods,
                          group_sizes=args.group_size)
        return 0
    if args.param_reduction:
        from hessc.bench import reduction

        reduction.run_reduction(args.model, args.param_reduction, Path(args.out), eval_tokens=args.eval_tokens,
                                calibration_samples=args.calibration_samples)
        return 0
    if args.serving_tokens:
        from hessc.bench import serving

        bits = args.bits[0] if args.bits and isinstance(args.bits[0], int) else 4
        serving.run_serving(args.model, args.serving_tokens, Path(args.out), group_size=args.group_size[0],
                            runs=args.latency_runs, bits=bits)
        return 0

    results = bench.run_bench(
        args.model, bits=args.bits, group_sizes=args.group_size, target=args.target,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], out_dir=Path(args.out),
        eval_tokens=args.eval_tokens, latency_runs=args.latency_runs, quiet=args.quiet,
        calibration_samples=args.calibration_samples,
    )
    if args.json:
        print(json.dumps(results, indent=2))
    elif not args.quiet:
        print((Path(args.out) / "results.md").read_text())
    return 0


def _cmd_demo(args) -> int:
    from hessc.bench import demo

    demo.run(bits=args.bits, group_size=args.group_size, quiet=args.quiet)
    return 0


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


COMMANDS = {"optimize": _cmd_optimize, "passes": _cmd_passes, "inspect": _cmd_inspect, "bench": _cmd_bench, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if quiet else logging.INFO),
        format="%(message)s" if not args.debug else "%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        for noisy in ("onnx_ir", "onnxscript", "onnxruntime", "torch", "transformers", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except HesscError as e:
        if args.debug:
            raise
        print(f"hessc: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader of stdout went away (`hessc passes | head`)
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("hessc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: one line, the details with --debug
        if args.debug:
            raise
        where = "".join(f" ({note})" for note in getattr(e, "__notes__", ()))
        print(f"hessc: internal error{where}: {type(e).__name__}: {e} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
