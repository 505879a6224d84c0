"""The public API: ``optimize`` and ``save``.

``optimize`` turns its arguments into frozen :class:`~hessc.options.CompileOptions` and a
:class:`~hessc.runtime.targets.Target`, loads the model, attaches the calibration data and the
float reference to it, runs the one pipeline (:func:`hessc.passes.pipeline.build_pipeline`:
annotate → plan → materialize → lower → verify, every step a named pass) and records what was
decided and measured in ``metadata_props["hessc.plan"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from hessc import __version__, genai, progress as progress_channel
from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.options import CompileOptions
from hessc.runtime import calibration as calib
from hessc.runtime import decoder, fuse_attention, memory, targets

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as long steps advance."""


@dataclasses.dataclass
class _Source:
    model: ir.Model
    path: Path | None


def _load_source(model: Any, example_inputs, custom_op_libraries: Sequence[str] = (), kv_cache: bool = False) -> _Source:
    kwargs = {"custom_op_libraries": tuple(custom_op_libraries)} if custom_op_libraries else {}
    if kv_cache:
        kwargs["kv_cache"] = True
    if isinstance(model, (str, os.PathLike)):
        return _Source(frontend.load(model, **kwargs), Path(model))
    if isinstance(model, ir.Model):
        # Never change the caller's object: work on a copy.
        model = frontend.clone(model, annotations=False)
    return _Source(frontend.load(model, example_inputs, **kwargs), None)


def optimize(
    model: Any,
    target: str = "cpu",
    bits: int | float | str = 4,
    group_size: int = 32,
    calibration: Any = None,
    seed: int = 0,
    *,
    symmetric: bool = False,
    example_inputs: tuple | dict | None = None,
    method: str = "rtn",
    rounding: str = "nearest",
    budget_bytes: int | None = None,
    labels: Sequence[np.ndarray] | None = None,
    loss: Callable[[dict, dict], Any] | None = None,
    activations: int | None = None,
    quantize_embeddings: bool = True,
    input_shapes: dict[str, Sequence[int]] | None = None,
    fp16: bool | None = None,
    verify: bool = True,
    measure_latency: bool = False,
    progress: Progress | None = None,
    passes: Sequence[str] | None = None,
    disable_passes: Sequence[str] = (),
    custom_op_libraries: Sequence[str | os.PathLike] = (),
    max_loss_increase: float = 1.0,
    min_output_cosine: float = 0.5,
    allow_degraded: bool = False,
    rotate: str | None = None,
    int8_range: str = "auto",
    tune: bool = True,
    check_allocation: bool = True,
    low_rank: bool = True,
    share: float | None = None,
    max_memory: int | str | None = None,
    kv_cache: bool = False,
) -> ir.Model:
    """Compresses a model's weights and lowers it for an ONNX Runtime target.

    Args:
        model: an ONNX path, ``onnx.ModelProto``, ``onnx_ir.Model``, ``torch.nn.Module`` or
            ``torch.fx.GraphModule`` (torch sources need ``example_inputs``).
        target: ``cpu`` (MatMulNBits with int8 compute), ``cuda`` (MatMulNBits, fp16 activations by
            default) or ``onnx`` (portable blocked QuantizeLinear/DequantizeLinear).
        bits: bits per weight: an ``int`` (2, 3, 4 or 8) for every weight; a ``float`` (``3.5``,
            ``3.0``) is a budget of average stored bits per MatMul/Gemm weight, and per Conv weight on
            ``target="onnx"`` (scales and zero points counted)
            that the bit allocator spends where the predicted loss change is largest;
            ``"lossless"`` asks for the smallest allocation whose predicted loss change is at most
            zero, confirmed on held-out calibration feeds. Both need calibration.
        group_size: weights per scale along the input dimension (16–256, a power of two).
        calibration: samples (list of input dicts, ``.npz`` path or torch DataLoader). Used for
            verification here; without it, generated inputs are used.
        seed: seed for anything random (generated inputs).
        symmetric: symmetric quantization (no zero points).
        example_inputs: inputs for exporting a torch module.
        method: ``rtn`` (round to nearest) or ``gptq`` (error feedback through the input
            covariance; needs calibration). With a bit budget: the quantizers the allocator may
            choose from (``gptq`` offers both).
        rounding: ``nearest``, or ``gradient``: with a bit budget or ``lossless`` the allocator
            also offers RTN items at 4 and 8 bits whose weights near a rounding boundary round
            against the calibration loss gradient (``rtn-grad``). Their gain is a fit to the
            calibration data: on SmolLM2 it held on other articles (lossless at 7.3 bits), on
            EfficientNet's 12 calibration photos it did not hold on other photos.
        budget_bytes: a budget of stored bytes for the same weights instead of ``bits``.
        labels: integer class labels, one array per calibration sample, for a cross-entropy
            loss in the curvature statistics (needed for ``lossless`` unless the model is a
            language model with ``input_ids``).
        loss: the task loss for the curvature statistics and the ``lossless`` check, as
            ``loss(outputs, feed) -> scalar torch tensor`` with ``outputs`` the model's outputs by
            name (torch tensors) and ``feed`` the calibration feed (e.g. a contrastive loss
            for a sentence encoder, whose outputs have no labels). Overrides ``labels``.
        activations: 8 quantizes the inputs of quantized MatMul/Gemm layers to uint8 with
            calibrated per-tensor ranges (needs calibration); on the CPU it is MatMulNBits' own
            dynamic per-block int8 path (``accuracy_level=4``, the CPU default), with no Q/DQ. 16 keeps float activations (on the CPU: ``accuracy_level=1``,
            slow for 2- and 8-bit weights). None: the target's fastest (int8 compute on the CPU).
        quantize_embeddings: quantize Gather embedding tables too.
        input_shapes: make these graph inputs static (``{"input_ids": [1, 128]}``), so that
            ``target="cuda"`` sessions can capture the model in a CUDA graph.
        fp16: fp16 activations (cuda only; default on for cuda).
        verify: compare the result with the float model in ORT before returning it.
        measure_latency: also time the float and the optimized model on the first calibration
            input (``model.meta["hessc.latency"]``; warns when the result is slower).
        progress: called as long steps advance (``progress(stage, done, total)``).
        passes: run exactly these passes, in this order (``hessc passes`` lists them); without
            ``insert-qdq`` the result is a float model, still verified.
        disable_passes: drop these passes from the pipeline.
        custom_op_libraries: shared libraries that register the model's custom operators with
            ONNX Runtime, for every session hessc opens.
        max_loss_increase: for a language model, the most its next-token loss on the
            verification feeds may rise (nats) before the result counts as degraded.
        min_output_cosine: the least cosine of the outputs to the float model's before the result
            counts as degraded.
        allow_degraded: return a degraded result (recorded as such) instead of refusing it.
        rotate: ``"hadamard"`` folds a random-sign Hadamard rotation of the residual stream into
            the weights of a pre-norm decoder before quantization (``"random"``: a random
            orthogonal matrix); the plan records what was folded, or why nothing was.
        int8_range: the grid of the CPU's static int8 weights (dense convs; depthwise convs
            run an int32 kernel and keep the full grid): ``"full"`` codes in [−127, 127],
            ``"reduced"`` in [−63, 63] (exact on x86 CPUs without VNNI, whose u8·s8 kernels
            saturate at full range: 3–6% output error per conv measured on such a CPU),
            ``"auto"``: reduced where the compiling machine's CPU saturates
            (:func:`hessc.runtime.targets.saturating_int8_products`). Compile for the machine
            that serves the model.
        tune: on ``cpu``, time each MatMulNBits layer at the serving shape (the first calibration
            feed's, else a generated one) with int8 and with fp32 compute and keep the faster
            (:mod:`hessc.runtime.tune`; timings cached per machine, so a second compile measures
            nothing and chooses the same), and each connected part of the static int8 conv region
            in the whole model against the same part with float activations, keeping int8 only
            where it is faster (:mod:`hessc.runtime.tune_regions`). Off where ``activations``
            fixes the compute (8: int8, 16: fp32).
        check_allocation: with a budget (not lossless), measure the allocation's loss change
            against its prediction on a held-out quarter of the calibration feeds (from 16 feeds;
            with fewer, on the statistics' own feeds); where
            it exceeds 1.5x the prediction, the weights most responsible are measured one by one
            and the budget re-solved with corrected predictions
            (:mod:`hessc.passes.check_allocation`; the plan records both).
        low_rank: with a budget, the allocator also offers each MatMul/Gemm weight (64 and more
            in both dimensions) low-rank forms beside its bit widths: split ``W ≈ L·R`` from the
            activation-whitened SVD (ranks below the break-even, factors at 4 or 8 bits) and
            compensation ``Q(W) + L·R`` (ranks 16–64, 8-bit factors fitted to the quantization
            residual), each priced at its stored bytes and scored by the same loss prediction
            (:mod:`hessc.passes.low_rank`); False offers bit widths only.
        share: remove this share (0–1) of the parameters of the layers that repeat by role
            (same shape and place in their block) by cross-layer sharing before quantization:
            each role's layers coloured greedily by the predicted loss change, non-adjacent
            layers allowed, one shared basis per colour stored once, private coefficients per
            layer (:mod:`hessc.passes.share_weights`). Needs calibration.
        max_memory: resident memory (bytes, or a size such as ``"2.5G"``) the compile may use
            beyond its streaming work: the end-to-end checks (verification against the float
            model, the latency check) hold the whole model in ONNX Runtime sessions and run only
            where they fit; where they do not, verification goes weight by weight and says so.
            None: they fit where they take at most 70% of the machine's available memory.
        kv_cache: a transformers causal LM (torch) is exported as a decoder with its KV cache
            (``past_key_values.N.key`` → ``present.N.key``, every length dynamic), as it is served;
            calibration is then token ids alone, run as prefill and continuation steps.

    Returns:
        The optimized model; ``metadata_props["hessc.plan"]`` records every decision.

    Raises:
        InputError: bad model, calibration or options (the message says how to fix it).
        UnsupportedError: the request cannot be run on the target.
        VerificationError: the result's outputs are far from the float model's.
    """
    started = time.perf_counter()
    options = CompileOptions(
        target=target, bits=bits, group_size=group_size, seed=seed, symmetric=symmetric, method=method,
        rounding=rounding, budget_bytes=budget_bytes, activations=activations,
        quantize_embeddings=quantize_embeddings, input_shapes=CompileOptions.shapes(input_shapes), fp16=fp16,
        verify=verify, measure_latency=measure_latency, has_calibration=calibration is not None,
        passes=tuple(passes) if passes is not None else None, disabled_passes=tuple(disable_passes),
        custom_op_libraries=tuple(str(p) for p in custom_op_libraries),
        max_loss_increase=max_loss_increase, min_output_cosine=min_output_cosine, allow_degraded=allow_degraded,
        rotate=rotate, int8_range=int8_range, tune=tune, check_allocation=check_allocation,
        low_rank=low_rank, share=share,
        max_memory=memory.parse_size(max_memory) if isinstance(max_memory, str) else max_memory,
    )
    target_record = targets.get(options.target)
    from hessc.passes import pipeline
    from hessc.runtime.verification import REFERENCE_KEY

    with progress_channel.listening(progress):
        source = _load_source(model, example_inputs, options.custom_op_libraries, kv_cache=kv_cache)
        model = source.model
        if input_shapes:
            frontend.fix_input_shapes(model, input_shapes)
            source.path = None  # the reference must see the same static shapes
        if calibration is not None:
            model.meta[meta.CALIBRATION_KEY] = _calibration(model, calibration, labels, loss, options)
        model.meta[REFERENCE_KEY] = source.path if source.path is not None else frontend.clone(model)
        folder = genai.source_folder(source.path)
        if folder is not None and decoder.find(model) is not None:
            model.meta[GENAI_KEY] = (folder, options.target, source.path.name)
        bytes_before = _weight_bytes(model, folded_copies=False)
        model.meta[memory.REFERENCE_BYTES_KEY] = bytes_before
        model = pipeline.run(pipeline.build_pipeline(options, target_record), model)
    meta.write_plan(model, _plan_record(model, options, target_record, bytes_before))
    # Wall-clock facts stay out of the saved model, so outputs are byte-identical for a seed.
    timings = {step["name"]: step["seconds"] for step in model.meta.get(pipeline.PASSES_KEY, [])}
    timings["total"] = round(time.perf_counter() - started, 3)
    model.meta[meta.TIMINGS_KEY] = timings
    if options.verify and options.measure_latency:
        model.meta[meta.LATENCY_KEY] = _latency(model, target_record.name, options.max_memory)
    return model


def _calibration(model: ir.Model, calibration: Any, labels, loss, options: CompileOptions) -> meta.Calibration:
    """The checked calibration feeds; ``lossless`` and a checked budget hold out the last quarter
    for their checks."""
    from hessc.passes.pipeline import CALIBRATION_LIMIT

    feeds = calib.feeds_from(calibration, model, limit=CALIBRATION_LIMIT)
    labels = [np.asarray(x) for x in labels] if labels is not None else None
    if labels is not None and len(labels) < len(feeds):
        raise InputError(f"got {len(labels)} label arrays for {len(feeds)} calibration samples; give one per sample")
    if loss is not None:
        labels = None  # a task loss overrides labels
    stat, held = list(feeds), []
    if options.lossless and len(feeds) < 2:
        raise InputError("lossless needs at least 2 calibration samples (a quarter is held out); pass more")
    if options.holds_out(len(feeds)) and len(feeds) >= 2:
        n_held = max(1, len(feeds) // 4)
        stat, held = feeds[:-n_held], feeds[-n_held:]
    return meta.Calibration(
        feeds=tuple(stat), heldout=tuple(held),
        labels=tuple(labels[: len(stat)]) if labels is not None else None,
        heldout_labels=tuple(labels[len(stat): len(feeds)]) if labels is not None and held else None,
        loss=loss,
    )


def _plan_record(model: ir.Model, options: CompileOptions, target: targets.Target, bytes_before: int) -> dict:
    """The saved record: per-weight plans, byte accounting, the passes that ran, what stayed in
    float and why, the allocation and the verification."""
    from hessc.passes import allocate_bits, lossless, low_rank, pipeline
    from hessc.runtime import lower as lowering
    from hessc.runtime.verification import VERIFICATION_KEY

    record = build_plan_record(model, target.name, bytes_before, scale_bytes=target.scale_bytes(options.fp16_for(target)))
    summary = record["summary"]
    # Effective bits from what the lowered model stores (kernels may pad zero points per row).
    stored, numel = lowering.quantized_storage(model)
    forms = model.meta.get(low_rank.LOW_RANK_KEY)
    if forms:  # per weight of the original model, factors counted (low_rank.storage_correction)
        per_float = 2 if options.fp16_for(target) else 4
        record["low_rank"] = {name: {**r, "float_factor_bytes": per_float * r["factor_params"]} if r["factor_bits"] >= 16
                              else dict(r) for name, r in forms.items()}
        extra_bytes, extra_numel = low_rank.storage_correction(record["low_rank"])
        stored, numel = stored + extra_bytes, numel + extra_numel
    from hessc.passes.share_weights import SHARE_KEY

    sharing = model.meta.get(SHARE_KEY)
    if sharing:  # shared bases and coefficients stand for the layers they replaced
        record["sharing"] = sharing
        numel += sharing["params_before"] - sharing["params_after"]
    summary["effective_bits_per_weight"] = round(8 * stored / numel, 4) if numel else None
    record["passes"] = [{"name": p["name"], "modified": p["modified"]} for p in model.meta.get(pipeline.PASSES_KEY, [])]
    record["lowering"] = model.meta.get(lowering.LOWERING_KEY, {})
    record["skipped"] = dict(model.meta.get(meta.SKIPPED_KEY, {}))
    for name, r in (forms or {}).items():  # the factors' entries name the weight they stand for
        for entry in record["weights"]:
            if entry["name"] in r["factors"]:
                entry["low_rank_of"] = name
    if model.meta.get(meta.CURVATURE_KEY) is not None or model.meta.get(allocate_bits.ALLOCATION_KEY) is not None:
        _record_allocation(record, model.meta.get(allocate_bits.ALLOCATION_KEY), model.meta.get(meta.CURVATURE_KEY, {}),
                           model.meta.get(lossless.LOSSLESS_KEY))
    _check_stored_bits(summary, numel)
    from hessc.passes.rotation import ROTATION_KEY

    if model.meta.get(ROTATION_KEY) is not None:
        record["rotation"] = model.meta[ROTATION_KEY].to_json()
    from hessc.passes.check_allocation import CHECK_KEY
    from hessc.runtime.tune import TUNE_KEY
    from hessc.runtime.tune_regions import REGIONS_KEY

    if model.meta.get(CHECK_KEY) is not None:
        record.setdefault("allocation", {})["check"] = model.meta[CHECK_KEY]
        rounds = model.meta[CHECK_KEY].get("rounds")
        if rounds:
            record["summary"].update(predicted_delta_loss=rounds[-1]["predicted"],
                                     measured_delta_loss=rounds[-1]["measured"])

    if model.meta.get(TUNE_KEY) is not None:
        record["tuning"] = model.meta[TUNE_KEY]
    if model.meta.get(REGIONS_KEY) is not None:
        record["int8_regions"] = model.meta[REGIONS_KEY]
    if VERIFICATION_KEY in model.meta:
        record["verification"] = model.meta[VERIFICATION_KEY]
    else:
        record["verification"] = {"status": "skipped: verify-in-ort was not in the pipeline"}
    return record


STORED_BITS_SLACK = 0.02
"""How far (in bits per weight) the file may store more than the allocation planned (packing
rounds zero points and padding per row) before the gap is reported as a pricing error."""


def _check_stored_bits(summary: dict, weights: int) -> None:
    """Says loudly, in the log and the summary, where the file holds more bits per weight than
    the allocation planned, or fewer quantized weights: the allocator priced some weight in a
    form lowering did not write. ``weights``: how many of the original model's weights the file
    stores quantized (low-rank factors and shared bases counted as the weights they stand for)."""
    planned, stored = summary.get("planned_effective_bits"), summary.get("effective_bits_per_weight")
    if planned is not None and stored is not None and stored > planned + STORED_BITS_SLACK:
        summary["stored_over_plan_bits"] = round(stored - planned, 4)
        logger.warning("the file stores %.4f effective bits per weight where the allocation planned %.4f "
                       "(a hessc pricing bug: the plan's `lowering` lists the forms written)", stored, planned)
    priced = summary.get("planned_quantized_params")
    if priced is not None and weights < priced:
        summary["priced_params_in_float"] = priced - weights
        logger.warning("%d of the %d weights the budget priced as quantized are stored in float: the file is "
                       "larger than the budget (a hessc bug)", priced - weights, priced)


def _record_allocation(record: dict, allocation: dict | None, curvature: dict, lossless: dict | None) -> None:
    """Adds the allocator's decisions, predictions and budget accounting to the plan record."""
    for entry in record["weights"]:
        if entry["name"] in curvature:
            entry.setdefault("curvature", curvature[entry["name"]])
    if allocation is None:
        return
    by_name = {w["name"]: w for w in allocation["weights"]}
    for entry in record["weights"]:
        if entry["name"] in by_name:
            entry["predicted_delta_loss"] = by_name[entry["name"]]["predicted_delta_loss"]
    summary = record["summary"]
    summary.update(
        budget_bits=allocation["budget_bits"], budget_bytes=allocation["budget_bytes"],
        allocated_bytes=allocation["used_bytes"], allocated_effective_bits=allocation["effective_bits"],
        predicted_delta_loss=allocation["predicted_delta_loss"], allocation_mode=allocation["mode"],
    )
    if lossless is not None:
        summary.update(
            heldout_loss_fp32=lossless["heldout_loss_fp32"], heldout_loss_quantized=lossless["heldout_loss_quantized"],
            steps=lossless["steps"], lossless_confirmed=lossless["confirmed"],
        )
    if allocation.get("planned_effective_bits") is not None:
        summary["planned_effective_bits"] = allocation["planned_effective_bits"]
    if allocation.get("planned_quantized_params") is not None and allocation["mode"] == "budget":
        summary["planned_quantized_params"] = allocation["planned_quantized_params"]
    record["allocation"] = {
        key: allocation[key] for key in ("estimator", "note", "not_allocated") if allocation.get(key) is not None
    }
    if allocation.get("outside_budget"):  # planned weights the budget does not cover, with their bytes
        record["allocation"]["outside_budget"] = allocation["outside_budget"]
    record["allocation"]["weights"] = [
        {key: w[key] for key in ("name", "shape", "bits", "method", "bytes", "predicted_delta_loss", "estimator",
                                 "form", "rank", "factor_bits", "candidates", "curvature", "tied") if key in w}
        for w in allocation["weights"]
    ]


LATENCY_MS = 300.0
"""Time per model of the float-vs-optimized latency check (interleaved rounds, 5 to 500)."""


def _latency(model: ir.Model, target: str, max_memory: int | None) -> dict | None:
    """Median latency of the float and the optimized model at the serving shape (the first
    calibration feed's, else a generated one), interleaved; a warning names what runs slower.
    Not saved: wall-clock values would make outputs differ run to run."""
    from hessc.runtime import sessions, tune
    from hessc.runtime.verification import REFERENCE_KEY

    if target == "cuda" and not sessions.cuda_available():
        return None
    too_large = memory.whole_model_check(model, max_memory)
    if too_large:
        logger.info("latency check skipped: %s", too_large)
        return {"skipped": too_large}
    reference_source = model.meta[REFERENCE_KEY]
    reference = sessions.session(str(reference_source) if isinstance(reference_source, Path) else reference_source, "cpu",
                                 custom_op_libraries=model.meta.get(meta.CUSTOM_OPS_KEY, ()), spinning=False)
    feed = tune.serving_feed(model)
    candidate = sessions.session(model, "cpu" if target == "onnx" else target, spinning=False)
    fp, opt = sessions.interleaved_latency_ms([reference.run, candidate.run], feed, None, target_ms=LATENCY_MS)
    latency = {
        "float": round(fp, 3), "optimized": round(opt, 3),
        "input": {k: list(v.shape) for k, v in feed.items()}, "provider": candidate.inner.get_providers()[0],
    }
    cache = decoder.find(model)
    if cache is not None:  # a decode step: its new tokens and the cache it reads
        latency["input"] = {k: v for k, v in latency["input"].items() if k not in cache.past_inputs}
        latency["cached_tokens"] = int(feed[cache.past_inputs[0]].shape[cache.seq_axis])
    if latency["optimized"] > 1.05 * latency["float"]:
        latency["slower"] = _slower_reason(model, target)
        logger.warning("the optimized model runs slower than the float model at this input (%.2f ms vs %.2f ms): %s",
                       latency["optimized"], latency["float"], latency["slower"])
    return latency


def _slower_reason(model: ir.Model, target: str) -> str:
    """Why a result may run slower than float, from what the plan knows."""
    from hessc.runtime.tune import TUNE_KEY

    reasons = []
    tuning = model.meta.get(TUNE_KEY)
    if tuning and tuning.get("slower_than_fp32"):
        reasons.append(tuning["slower_than_fp32"] + " (the plan's `tuning` lists each layer)")
    if target == "onnx":
        reasons.append("the portable form dequantizes its weights on every run; use --target cpu for kernels")
    from hessc.runtime.tune_regions import REGIONS_KEY

    regions = model.meta.get(REGIONS_KEY)
    if regions and regions["float_layers"]:
        reasons.append(f"{regions['float_layers']} convs keep float activations (their static int8 form measured "
                       "slower: the plan's `int8_regions`) and dequantize their 8-bit weights on every run")
    if any(n.op_type == "QuantizeLinear" for g in frontend.graphs(model) for n in g):
        reasons.append("static int8 layers pay a quantize/dequantize at every boundary of the int8 region, which "
                       "small convs do not earn back; --activations 16 keeps them in float")
    return "; ".join(reasons) or "low-bit kernels pay off at small batch x sequence; measure at your serving shape"


def _weight_bytes(model: ir.Model, *, folded_copies: bool = True) -> int:
    """Bytes of the initializers of every graph (subgraphs keep the codes their readers alone
    dequantize), each stored tensor once.

    Args:
        model: the model.
        folded_copies: count the transposed copies the front door folded from tied embedding
            tables (``meta.TIED_KEY``) and re-typed weights at their size. False for the model as
            loaded: there a copy is the table itself, which the source stores once, and a cast
            weight counts the bytes the source stores (``meta.SOURCE_BYTES_KEY``); once compiled,
            whatever is left is stored.
    """
    total = 0
    for graph in frontend.graphs(model):
        for v in graph.initializers.values():
            if v.const_value is None:
                continue
            if not folded_copies and v.meta.get(meta.TIED_KEY) in graph.initializers:
                continue
            nbytes = v.const_value.nbytes
            # As loaded, a weight the front door cast counts what the source stores.
            total += int(nbytes if folded_copies else v.meta.get(meta.SOURCE_BYTES_KEY, nbytes))
    return total


def build_plan_record(model: ir.Model, target: str, bytes_before: int, scale_bytes: int = 4) -> dict:
    """One entry per quantized weight and a summary with honest byte accounting."""
    from hessc.passes import quantize

    entries = []
    plans = model.meta.get(meta.MATERIALIZED_KEY) or {}
    ties = model.meta.get(quantize.TIED_WEIGHTS_KEY) or {}
    quant_bytes = 0
    quant_numel = 0
    for plan in plans.values():
        nbytes = quantize.stored_bytes(plan, scale_bytes)
        entry = plan.to_json()
        entry["bytes"] = nbytes
        if plan.name in ties:  # one table read by a lookup and a head: stored and counted once
            entry["tied"] = dict(ties[plan.name])
        entries.append(entry)
        quant_bytes += nbytes
        quant_numel += int(np.prod(plan.shape))
    bytes_after = _weight_bytes(model)
    return {
        "weights": sorted(entries, key=lambda e: e["name"]),
        "summary": {
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "quantized_weights": len(entries),
            "quantized_params": quant_numel,
            "effective_bits_per_weight": round(8 * quant_bytes / quant_numel, 4) if quant_numel else None,
            "target": target,
            "hessc_version": __version__,
        },
    }


GENAI_KEY = "hessc.genai_source"
"""In ``model.meta``: (source folder, target, model file name) of a decoder read from an
onnxruntime-genai folder, which :func:`save` writes back as one."""


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Saves a model atomically (no half-written file on failure).

    A decoder read from an onnxruntime-genai folder is written as one: ``path`` may name the
    folder (the model keeps its file name), and its ``genai_config.json`` and tokenizer files are
    written beside the model (:mod:`hessc.genai`). A decoder exported with its cache
    (``kv_cache=True``) saved to a folder (a path without ``.onnx``) is written as a genai folder
    too: ``model.onnx``, a config from its transformers config, its tokenizer files.

    Args:
        model: the model.
        path: the ``.onnx`` file to write (or, for a genai decoder, its folder).
        external_data: store weights in ``<name>.data`` beside it. Default: when over 1 GiB, or
            when the model still reads weights from another file (a model loaded with external
            data): the saved model never points at files that are not beside it. False loads
            such weights into memory to write one self-contained file.

    Returns:
        The written path.
    """
    source = model.meta.get(GENAI_KEY)
    exported = model.meta.get(meta.DECODER_CONFIG_KEY)
    requested = Path(path)
    path = genai.output_file(requested, source is not None or exported is not None, source[2] if source else "model.onnx")
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass a file path ending in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    total = _weight_bytes(model)
    external = any(
        isinstance(v.const_value, ir.ExternalTensor) for g in frontend.graphs(model) for v in g.initializers.values()
    )
    if external_data is None:
        external_data = total > (1 << 30) or external
    elif not external_data and external:
        ir.external_data.load_to_model(model)
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=".hessc-", dir=path.parent))
    try:
        tmp_model = tmp / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            ir.save(model, tmp_model)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if source is not None:
        written = genai.write_folder(source[0], path, source[1])
        logger.info("wrote the onnxruntime-genai folder %s (%s)", path.parent, ", ".join(written))
    elif exported is not None and path != requested:  # a decoder exported with its cache, saved to a folder
        target = ((meta.read_plan(model) or {}).get("summary") or {}).get("target", "cpu")
        cache = decoder.find(model)
        written = genai.write_config(exported, cache, path, target, fuse_attention.cache_in_place(model, cache))
        logger.info("wrote the onnxruntime-genai folder %s (%s)", path.parent, ", ".join(written))
    return path


def check_output_path(input_path: str | os.PathLike | None, output: str | os.PathLike) -> None:
    """Refuses an output that would overwrite the input model or its external data."""
    if input_path is None:
        return
    output = genai.output_file(output, genai.source_folder(input_path) is not None, Path(input_path).name)
    src, dst = Path(input_path).resolve(), Path(output).resolve()
    if src == dst or dst == src.with_name(src.name + ".data"):
        raise InputError(f"the output {output} would overwrite the input model; choose another -o path")
    if isinstance(input_path, (str, os.PathLike)) and Path(input_path).exists():
        return
    raise InputError(f"{input_path}: no such input file; check the path")
