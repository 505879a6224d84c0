"""The public API: ``optimize`` and ``save``.

``optimize`` loads the model, runs the pass pipeline (plan → materialize the portable Q/DQ form),
lowers it for the target, then opens the result in an ONNX Runtime session for that target and
compares its outputs with the float model's on the calibration (or generated) inputs before
returning it. The decisions, byte accounting and the comparison are recorded in
``metadata_props["hessc.plan"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from hessc import __version__
from hessc.errors import InputError, VerificationError
from hessc.ir import frontend, meta
from hessc.ir import weights as qweights
from hessc.passes import activations as act
from hessc.passes import allocate_bits, pipeline, quantize
from hessc.runtime import calibration as calib
from hessc.runtime import lower as lowering
from hessc.runtime import sessions

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as long steps advance."""

LOWERING_TOLERANCE = {"cpu": 0.05, "cuda": 0.02, "onnx": 1e-4}
"""Relative output error allowed between the lowered model and its portable Q/DQ form: the
kernels differ only in arithmetic (int8 activations at ``accuracy_level=4`` on the CPU, fp16 on
CUDA), so the difference must stay below this, or below half the quantization error itself
(a coarse model amplifies arithmetic noise). A larger difference means a broken rewrite, and the
result is refused. Models whose outputs are already more than 50% from float's are only
reported: their outputs amplify any arithmetic difference, and the weight-by-weight check of the
lowering (``runtime.lower``) is what guards them."""


@dataclasses.dataclass
class _Source:
    model: ir.Model
    path: Path | None


def _load_source(model: Any, example_inputs) -> _Source:
    if isinstance(model, (str, os.PathLike)):
        return _Source(frontend.load(model), Path(model))
    if isinstance(model, ir.Model):
        # Never change the caller's object: work on a copy.
        model = frontend.clone(model)
    return _Source(frontend.load(model, example_inputs), None)


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
        progress: called as long steps advance.

    Returns:
        The optimized model; ``metadata_props["hessc.plan"]`` records every decision.

    Raises:
        InputError: bad model, calibration or options (the message says how to fix it).
        UnsupportedError: the request cannot be run on the target.
        VerificationError: the result's outputs are far from the float model's.
    """
    started = time.perf_counter()
    if target not in lowering.TARGETS:
        raise InputError(f"unknown target {target!r}; use one of {', '.join(lowering.TARGETS)}")
    if method not in ("rtn", "gptq"):
        raise InputError(f"unknown method {method!r}; use 'rtn' or 'gptq'")
    if rounding not in ("nearest", "gradient"):
        raise InputError(f"unknown rounding {rounding!r}; use 'nearest' or 'gradient'")
    fp16 = (target == "cuda") if fp16 is None else fp16
    allocation, bits = _allocation_config(
        bits, budget_bytes, method, group_size, symmetric, scale_bytes=2 if fp16 else 4,
        kernel_layout=target in ("cpu", "cuda"), rounding=rounding,
    )
    if rounding == "gradient" and allocation is None:
        raise InputError("rounding='gradient' is chosen by the bit allocator: give a budget (bits=3.5, "
                         "budget_bytes=N) or bits='lossless'")
    if (allocation is not None or method == "gptq") and calibration is None:
        what = "a bit budget" if allocation is not None else "method='gptq'"
        raise InputError(f"{what} needs calibration data for the curvature statistics; pass --calibration")
    if allocation is not None and allocation.lossless and activations == 8:
        raise InputError("lossless is checked for weight quantization only; drop --activations 8")
    config = quantize.QuantConfig(
        bits=bits, group_size=group_size, symmetric=symmetric,
        quantize_conv=(target == "onnx"), quantize_embeddings=quantize_embeddings, method=method,
        embedding_min_bits=2 if target == "onnx" else 4,
    )
    if activations not in (None, 8, 16):
        raise InputError(f"--activations {activations} is not supported; use 8 or 16")
    # On the CPU, MatMulNBits' int8 path (accuracy_level 4) quantizes activations dynamically per
    # block: that is 8-bit activations, finer than calibrated per-tensor ranges, so no Q/DQ is added.
    static_activations = activations == 8 and target != "cpu"
    if activations == 8 and target == "cuda":
        logger.warning(
            "--activations 8 on cuda: the CUDA provider has no int8-activation MatMulNBits, so the uint8 "
            "activations run as Q/DQ around fp16 kernels (measured on an H100 for SmolLM2: slower, and "
            "perplexity 63.9 against 30.7 with fp16 activations); fp16 activations are the fast path there"
        )
    if static_activations and calibration is None:
        raise InputError("--activations 8 needs calibration data to set activation ranges; pass --calibration")
    lower_config = lowering.LowerConfig(
        target=target, fp16=fp16, accuracy_level=1 if activations == 16 else 4
    )
    source = _load_source(model, example_inputs)
    model = source.model
    if input_shapes:
        frontend.fix_input_shapes(model, input_shapes)
        source.path = None  # the reference must see the same static shapes

    feeds = (
        calib.feeds_from(calibration, model, limit=64)
        if calibration is not None
        else calib.generated_feeds(model, count=2, seed=seed)
    )
    bytes_before = _weight_bytes(model)
    reference = None
    if verify:
        reference = sessions.session(source.path if source.path else model, "cpu")

    def step(i: int, total: int, name: str) -> None:
        if progress:
            progress("quantize", i + 1, total)

    curvature = None
    if allocation is not None or method == "gptq":
        curvature = _Curvature.prepare(model, feeds, labels, allocation, method, progress, loss)
    steps = pipeline.build_quantization_pipeline(
        config, progress=step,
        annotate=curvature.annotate if curvature else None,
        allocate=allocate_bits.AllocateBitsPass(allocation) if allocation is not None else None,
        hessian_for=curvature.hessian_for if curvature else None,
        gradient_for=curvature.gradient_for if curvature else None,
    )
    split = [n for n, _ in steps].index("insert-qdq")
    timings = pipeline.run(model, steps[:split])
    if curvature:
        curvature.snapshot(model)
    timings += pipeline.run(model, steps[split:])
    allocation_record = model.meta.get(allocate_bits.ALLOCATION_KEY)
    lossless = None
    if allocation is not None and allocation.lossless:
        start = time.perf_counter()
        model, lossless, allocation_record = curvature.confirm_lossless(model, config, allocation, step)
        timings.append(pipeline.PassTiming("confirm-lossless", time.perf_counter() - start, bool(lossless["steps"])))
    if static_activations:
        start = time.perf_counter()
        names = list(act.quantized_layer_inputs(model))
        ranges = calib.activation_ranges(model, names, feeds)
        act.InsertActivationQDQPass(ranges)(model)
        timings.append(pipeline.PassTiming("insert-activation-qdq", time.perf_counter() - start, True))
    skipped = dict(model.meta.get("hessc.skipped", {}))
    # The portable form runs with ORT's fusions off: the plain float dequantization path.
    portable = sessions.session(model, "cpu", optimize=False) if verify and target != "onnx" else None
    record = build_plan_record(model, target, bytes_before, scale_bytes=2 if fp16 else 4)
    start = time.perf_counter()
    model, lowered = lowering.lower(model, lower_config)
    timings.append(pipeline.PassTiming("lower-" + target, time.perf_counter() - start, bool(lowered)))
    summary = record["summary"]
    summary["bytes_after"] = _weight_bytes(model)
    # Effective bits from what the lowered model stores (kernels may pad zero points per row).
    stored, numel = lowering.quantized_storage(model)
    summary["effective_bits_per_weight"] = round(8 * stored / numel, 4) if numel else None
    record["lowering"] = lowered
    record["skipped"] = skipped
    if curvature:
        _record_allocation(record, allocation_record, curvature.summaries, lossless)
    if verify:
        record["verification"] = _verify(model, reference, portable, feeds, target)
    meta.write_plan(model, record)
    # Wall-clock facts stay out of the saved model, so outputs are byte-identical for a seed.
    timings.append(pipeline.PassTiming("total", time.perf_counter() - started, True))
    model.meta[meta.TIMINGS_KEY] = {t.name: round(t.seconds, 3) for t in timings}
    if verify and measure_latency:
        model.meta[meta.LATENCY_KEY] = _latency(reference, model, target, feeds[0])
    return model


def _allocation_config(
    bits: int | float | str, budget_bytes: int | None, method: str, group_size: int, symmetric: bool,
    scale_bytes: int, kernel_layout: bool = False, rounding: str = "nearest",
) -> tuple[allocate_bits.AllocationConfig | None, int]:
    """The bit allocator's configuration (None for uniform bits) and the uniform bits to plan."""
    lossless = isinstance(bits, str) and bits.strip().lower() == "lossless"
    if isinstance(bits, str) and not lossless:
        try:
            bits = float(bits)
        except ValueError:
            raise InputError(f"--bits {bits!r}: give a number of bits (4, 3.5) or 'lossless'") from None
    if not lossless and budget_bytes is None and isinstance(bits, int):
        return None, bits  # an int is uniform codes; a float (3.0 included) is a budget
    methods = ("rtn", "gptq") if method == "gptq" else ("rtn",)
    if rounding == "gradient":
        methods = (*methods, "rtn-grad")
    common = dict(methods=methods, group_size=group_size, symmetric=symmetric, scale_bytes=scale_bytes,
                  kernel_layout=kernel_layout)
    if lossless:
        return allocate_bits.AllocationConfig(lossless=True, **common), 4
    if budget_bytes is not None:
        return allocate_bits.AllocationConfig(budget_bytes=int(budget_bytes), **common), 4
    return allocate_bits.AllocationConfig(budget_bits=float(bits), **common), 4


class _Curvature:
    """Hessian annotation for GPTQ and the bit allocator, and the lossless held-out check.

    For ``lossless`` the last quarter of the calibration feeds is held out: the statistics never
    see it, and the quantized portable model's loss on it must not exceed the float model's. While
    it does, the allocation backs off (:func:`hessc.passes.allocate_bits.step_up`: the worst 10% of
    layers by predicted Δloss move up one bit level) and is re-checked.
    """

    def __init__(self, annotate, float_copy, held, held_labels, loss_name: str | None, ids_name: str | None,
                 loss_fn: Callable | None = None) -> None:
        self.annotate = annotate
        self.float_copy = float_copy
        self.held = held
        self.held_labels = held_labels
        self.loss_name = loss_name
        self.ids_name = ids_name
        self.a_by_name: dict[str, np.ndarray] = {}
        self.grad_by_name: dict[str, np.ndarray] = {}
        self.summaries: dict[str, Any] = {}
        self.loss_fn = loss_fn

    @classmethod
    def prepare(cls, model: ir.Model, feeds, labels, allocation, method: str, progress: Progress | None,
                loss: Callable | None = None) -> "_Curvature":
        from hessc.passes import hessian

        # Raise the opset before annotating: a conversion later would rebuild the graph's meta.
        quantize.ensure_opset(model, 21)
        labels = list(labels) if labels is not None else None
        if labels is not None and len(labels) < len(feeds):
            raise InputError(f"got {len(labels)} label arrays for {len(feeds)} calibration samples; give one per sample")
        lossless = allocation is not None and allocation.lossless
        stat_feeds, held, held_labels = list(feeds), [], None
        if lossless:
            if len(feeds) < 2:
                raise InputError("lossless needs at least 2 calibration samples (a quarter is held out); pass more")
            n_held = max(1, len(feeds) // 4)
            stat_feeds, held = list(feeds[:-n_held]), list(feeds[-n_held:])
            if labels is not None:
                held_labels = labels[len(stat_feeds): len(feeds)]
        stat_labels = tuple(labels[: len(stat_feeds)]) if labels is not None else None
        backward = allocation is not None
        # GPTQ weighs each input row by its output gradient (hessian.gptq_hessian).
        weighted = method == "gptq"
        config = hessian.HessianConfig(
            covariance=True, kfac=backward, gradient=backward, weighted_covariance=weighted,
            split_covariance=backward and weighted, split_gradient=backward and "rtn-grad" in allocation.methods,
            max_samples=len(stat_feeds), max_grad_samples=min(len(stat_feeds), 16),
            labels=stat_labels if (backward or weighted) and loss is None else None,
            loss=loss if loss is not None else "auto",
        )
        loss_name = hessian.resolve_loss(config, model) if backward or weighted else None
        if lossless and loss_name not in ("next-token", "ce", "custom"):
            raise InputError(
                f"lossless needs a loss whose fp32 value is not already its minimum; the model's loss is {loss_name!r} "
                "(zero at the float weights): give labels (cross-entropy), a task loss (loss=), or use a language "
                "model with input_ids"
            )

        def annotate_progress(stage: str, done: int, total: int) -> None:
            if progress:
                progress(stage, done, total)

        annotate = hessian.AnnotateHessianPass(config, stat_feeds, progress=annotate_progress)
        float_copy = frontend.clone(model) if lossless else None
        return cls(annotate, float_copy, held, held_labels, loss_name, hessian.ids_input(model), loss)

    def hessian_for(self, ref: qweights.WeightRef) -> np.ndarray | None:
        """GPTQ's Hessian of a weight, by name (so that a fresh copy of the model can be re-quantized)."""
        return self.a_by_name.get(ref.name)

    def gradient_for(self, ref: qweights.WeightRef) -> np.ndarray | None:
        """The loss gradient of a weight, by name (for ``rtn-grad`` on a fresh copy)."""
        return self.grad_by_name.get(ref.name)

    def snapshot(self, model: ir.Model) -> None:
        from hessc.passes import hessian

        for ref in qweights.iter_weights(model):
            h = hessian.hessian_for(ref)
            if h is not None:
                self.a_by_name[ref.name] = h
            g = hessian.gradient_for(ref)
            if g is not None:
                self.grad_by_name[ref.name] = g
        self.summaries = dict(model.meta.get(meta.CURVATURE_KEY, {}))

    def _loss(self, model: ir.Model) -> float:
        sess = sessions.session(model, "cpu", optimize=False)
        outputs = [sess.run(feed) for feed in self.held]
        if self.loss_fn is not None:
            return _custom_loss(self.loss_fn, sess.output_names, outputs, self.held)
        return allocate_bits.heldout_loss(outputs, self.held, self.loss_name, self.ids_name, self.held_labels)

    def confirm_lossless(self, model: ir.Model, config: quantize.QuantConfig, allocation, progress) -> tuple[ir.Model, dict, dict]:
        record = model.meta[allocate_bits.ALLOCATION_KEY]
        fp32 = self._loss(self.float_copy)
        quantized = self._loss(model)
        steps: list[dict] = []
        logger.info("lossless: held-out loss %.6g (fp32) vs %.6g (quantized)", fp32, quantized)
        while quantized > fp32:
            weights = allocate_bits.step_up(record, allocation.candidate_bits)
            if weights is None:
                break
            raised = [w["name"] for w, old in zip(weights, record["weights"]) if w["bits"] != old["bits"]]
            record = allocate_bits.with_weights(record, weights)
            replay = dataclasses.replace(
                config, bits_override=tuple((n, b) for n, b in record["bits_override"]),
                method_override=tuple((n, m) for n, m in record["method_override"]),
            )
            candidate = frontend.clone(self.float_copy)
            try:
                pipeline.run(candidate, pipeline.build_quantization_pipeline(
                    replay, hessian_for=self.hessian_for, gradient_for=self.gradient_for, progress=progress
                ))
            except InputError:  # everything is back in float: the float model itself
                candidate = frontend.clone(self.float_copy)
            model = candidate
            quantized = self._loss(model)
            steps.append({"raised": raised, "heldout_loss_quantized": quantized, "used_bytes": record["used_bytes"]})
            logger.info("lossless: raised %s; held-out loss %.6g", ", ".join(raised), quantized)
        model.meta[allocate_bits.ALLOCATION_KEY] = record
        confirmed = quantized <= fp32
        if not confirmed:
            logger.warning(
                "lossless not confirmed: held-out loss %.6g is above fp32's %.6g after %d steps", quantized, fp32, len(steps)
            )
        info = {"heldout_loss_fp32": fp32, "heldout_loss_quantized": quantized, "heldout_samples": len(self.held),
                "loss": self.loss_name, "steps": steps, "confirmed": confirmed}
        return model, info, record


def _custom_loss(loss_fn: Callable, names: Sequence[str], outputs, feeds) -> float:
    """The mean of a user's task loss over held-out feeds, from ORT outputs."""
    import torch

    values = []
    with torch.no_grad():
        for outs, feed in zip(outputs, feeds):
            named = {n: torch.from_numpy(np.asarray(o)).to(torch.float64) for n, o in zip(names, outs)}
            values.append(float(loss_fn(named, feed)))
    return float(np.mean(values))


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
    record["allocation"] = {
        key: allocation[key] for key in ("estimator", "note", "not_allocated") if allocation.get(key) is not None
    }
    record["allocation"]["weights"] = [
        {key: w[key] for key in ("name", "shape", "bits", "method", "bytes", "predicted_delta_loss", "estimator", "candidates", "curvature")}
        for w in allocation["weights"]
    ]


def _verify(model: ir.Model, reference, portable, feeds, target: str) -> dict:
    """Runs the result on its target: its error against the float model (reported) and against
    its own portable Q/DQ form (which must agree: lowering changes kernels, not values)."""
    if target == "cuda" and not sessions.cuda_available():
        try:
            candidate = sessions.session(model, "cpu")
        except Exception as e:
            logger.warning("no CUDA provider here and the CPU provider cannot run the cuda model: %s", e)
            return {"status": "not run: no CUDA provider on this machine"}
        where = "CPUExecutionProvider (no CUDA provider on this machine)"
    else:
        candidate = sessions.session(model, target)
        where = candidate.inner.get_providers()[0]
        if target == "cuda":
            sessions.check_cuda_placement(model, feeds[0])
    record = {"status": "passed", "provider": where, "vs_float": sessions.compare(reference, candidate, feeds).to_json()}
    if portable is not None:
        lowered = sessions.compare(portable, candidate, feeds)
        record["vs_portable"] = lowered.to_json()
        limit = max(LOWERING_TOLERANCE[target], 0.5 * record["vs_float"]["rel_error"])
        # Lowering is checked weight by weight (runtime.lower); end to end, a model whose outputs
        # are already far from float's amplifies kernel arithmetic noise without bound.
        conditioned = record["vs_float"]["rel_error"] < 0.5
        if not math.isfinite(lowered.rel_error) or (conditioned and lowered.rel_error > limit):
            raise VerificationError(
                f"the lowered {target} model differs from its portable Q/DQ form by {lowered.rel_error:.2%} "
                f"(limit {limit:.2%}); this is a hessc bug: rerun with --target onnx and report it"
            )
    if not math.isfinite(record["vs_float"]["rel_error"]):
        raise VerificationError("the optimized model produces non-finite outputs; use more bits")
    return record


def _latency(reference, model: ir.Model, target: str, feed) -> dict | None:
    """Median latency of the float and the optimized model on one calibration input (not saved:
    wall-clock values would make outputs differ run to run)."""
    if target == "cuda" and not sessions.cuda_available():
        return None
    candidate = sessions.session(model, "cpu" if target == "onnx" else target)
    latency = {
        "float": sessions.median_latency_ms(reference.run, feed, 5),
        "optimized": sessions.median_latency_ms(candidate.run, feed, 5),
        "input": {k: list(v.shape) for k, v in feed.items()}, "provider": candidate.inner.get_providers()[0],
    }
    if latency["optimized"] > 1.05 * latency["float"]:
        logger.warning(
            "the optimized model runs slower than the float model on this input (%.2f ms vs %.2f ms): "
            "low-bit kernels pay off at small batch x sequence; measure at your serving shape",
            latency["optimized"], latency["float"],
        )
    return latency


def _weight_bytes(model: ir.Model) -> int:
    return sum(
        int(v.const_value.nbytes)
        for v in model.graph.initializers.values()
        if v.const_value is not None
    )


def build_plan_record(model: ir.Model, target: str, bytes_before: int, scale_bytes: int = 4) -> dict:
    """One entry per quantized weight and a summary with honest byte accounting."""
    entries = []
    plans = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        plan = node.meta.get(meta.QUANT_KEY)
        if isinstance(plan, meta.QuantPlan):
            plans[plan.name] = plan
    quant_bytes = 0
    quant_numel = 0
    for plan in plans.values():
        nbytes = quantize.stored_bytes(plan, scale_bytes)
        entry = plan.to_json()
        entry["bytes"] = nbytes
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


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Saves a model atomically (no half-written file on failure).

    Args:
        model: the model.
        path: the ``.onnx`` file to write.
        external_data: store weights in ``<name>.data`` beside it. Default: when over 1 GiB, or
            when the model still reads weights from another file (a model loaded with external
            data): the saved model never points at files that are not beside it. False loads
            such weights into memory to write one self-contained file.

    Returns:
        The written path.
    """
    path = Path(path)
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
    return path


def check_output_path(input_path: str | os.PathLike | None, output: str | os.PathLike) -> None:
    """Refuses an output that would overwrite the input model or its external data."""
    if input_path is None:
        return
    src, dst = Path(input_path).resolve(), Path(output).resolve()
    if src == dst or dst == src.with_name(src.name + ".data"):
        raise InputError(f"the output {output} would overwrite the input model; choose another -o path")
    if isinstance(input_path, (str, os.PathLike)) and Path(input_path).exists():
        return
    raise InputError(f"{input_path}: no such input file; check the path")
