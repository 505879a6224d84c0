"""The compile pipeline: one builder whose list reads top to bottom in execution order.

Every step is an ``onnx_ir`` pass with a stable kebab-case name, so a pipeline can be written as
data (``hessc optimize --passes a,b,c``), listed (``hessc passes``) and a step dropped by name
(``--disable-pass NAME``). Each pass family's configuration is derived here from the frozen
:class:`hessc.options.CompileOptions` and the :class:`hessc.runtime.targets.Target`; data (the
calibration feeds, the float reference) travels through ``model.meta``. Timing, the record of
which passes ran and verify-after-each-pass are one instrumenting wrapper, not code in the passes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import onnx_ir as ir

from hessc.errors import HesscError, InputError
from hessc.ir import verify

logger = logging.getLogger(__name__)

PASSES_KEY = "hessc.passes"
"""``model.meta`` key: ``[{"name", "seconds", "modified"}]`` of the passes that ran, in order."""

CALIBRATION_LIMIT = 64
"""Calibration feeds read at most (statistics and held-out check together)."""


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One step of the pipeline.

    Attributes:
        name: the stable kebab-case name (``lower-<target>`` is spelled with the target's name).
        summary: one line for ``hessc passes``.
        build: ``build(options, target) -> pass``.
        default: ``default(options, target)``: whether the default pipeline runs it.
        available: False for a slot whose pass does not exist yet.
    """

    name: str
    summary: str
    build: Callable[..., ir.passes.PassBase] | None
    default: Callable[..., bool]
    available: bool = True


def _quant_config(options, target):
    from hessc.passes import quantize
    from hessc.runtime.targets import int8_code_limit

    static = options.static_int8_ops(target)
    return quantize.QuantConfig(
        bits=options.uniform_bits, group_size=options.group_size, symmetric=options.symmetric,
        quantize_conv=target.quantizes_conv and (not target.static_int8_ops or bool(static)),
        conv_off_reason=options.static_int8_off_reason(target),
        quantize_embeddings=options.quantize_embeddings,
        method=options.method, embedding_min_bits=target.embedding_min_bits, static_int8_ops=static,
        static_int8_limit=int8_code_limit(options.int8_range) if static else 127,
        float_ops=target.float_ops,
        # The CPU's int8 kernels (its dynamic int8 activation path, the LSTM's) multiply u8·s8.
        recurrent_limit=int8_code_limit(options.int8_range) if target.dynamic_int8_activations else 127,
    )


def allocation_config(options, target):
    """The bit allocator's configuration for a budgeted compile."""
    from hessc.passes import allocate_bits

    common = dict(methods=options.allocator_methods(), group_size=options.group_size, symmetric=options.symmetric,
                  scale_bytes=target.scale_bytes(options.fp16_for(target)), kernel_layout=target.kernel_layout,
                  static_int8_ops=options.static_int8_ops(target), low_rank=options.low_rank)
    if options.lossless:
        return allocate_bits.AllocationConfig(lossless=True, **common)
    if options.budget_bytes is not None:
        return allocate_bits.AllocationConfig(budget_bytes=int(options.budget_bytes), **common)
    return allocate_bits.AllocationConfig(budget_bits=float(options.bits), **common)


def hessian_config(options):
    """What the curvature annotation computes: backward statistics for the allocator, the
    gradient-weighted covariance for GPTQ (:func:`hessc.passes.hessian.gptq_hessian`)."""
    from hessc.passes import hessian

    backward = options.budgeted
    weighted = options.method == "gptq"
    return hessian.HessianConfig(
        covariance=True, kfac=backward, gradient=backward, weighted_covariance=weighted,
        # Halves of A to fit on one and score on the other: GPTQ items, low-rank items.
        split_covariance=backward and (weighted or options.low_rank), split_gradient=backward and options.rounding == "gradient",
        max_samples=CALIBRATION_LIMIT, max_grad_samples=16,
    )


def _upgrade_opset(options, target):
    from hessc.passes import opset

    uniform_two = options.uniform_bits == 2 and not options.budgeted
    return opset.UpgradeOpsetPass(opset.needed_opset(2) if uniform_two else opset.needed_opset(4))


def _fold_rotation(options, target):
    from hessc.passes import rotation

    return rotation.FoldRotationPass(rotation.RotationConfig(mode=options.rotate or "hadamard", seed=options.seed))


def _annotate_hessian(options, target):
    from hessc.passes import hessian

    return hessian.AnnotateHessianPass(hessian_config(options))


def _share_weights(options, target):
    from hessc.passes import share_weights

    if options.share is None:
        raise InputError("share-weights removes a share of the repeated layers' parameters: give it with --share "
                         "FRACTION (e.g. 0.2)")
    return share_weights.ShareWeightsPass(share_weights.ShareConfig(reduction=options.share))


def _plan(options, target):
    from hessc.passes import quantize

    return quantize.PlanQuantizationPass(_quant_config(options, target), snapshot=options.snapshots)


def _allocate(options, target):
    from hessc.passes import allocate_bits

    return allocate_bits.AllocateBitsPass(allocation_config(options, target), plan_config=_quant_config(options, target))


def _split_low_rank(options, target):
    from hessc.passes import low_rank

    return low_rank.SplitLowRankPass()


def _insert_qdq(options, target):
    from hessc.passes import quantize

    return quantize.InsertQDQPass()


def _confirm_lossless(options, target):
    from hessc.passes import lossless

    return lossless.ConfirmLosslessPass(_quant_config(options, target), allocation_config(options, target).candidate_bits)


def _check_allocation(options, target):
    from hessc.passes import check_allocation

    return check_allocation.CheckAllocationPass(_quant_config(options, target), allocation_config(options, target))


def _activation_ranges(options, target):
    from hessc.passes import activations

    return activations.AnnotateActivationRangesPass(options.static_activations(target), options.static_int8_ops(target))


def _tune_regions(options, target):
    from hessc.runtime import tune_regions

    # Under a size budget the weights keep the 8-bit codes the budget priced; float weights
    # (a latency choice of 32 bits each) would break it.
    size_budget = options.budgeted and not options.lossless
    return tune_regions.TuneStaticRegionsPass(options.static_int8_ops(target), float_weights=not size_budget)


def _activation_qdq(options, target):
    from hessc.passes import activations

    if target.name == "cuda" and options.static_activations(target):
        logger.warning(
            "--activations 8 on cuda: the CUDA provider has no int8-activation MatMulNBits, so the uint8 "
            "activations run as Q/DQ around fp16 kernels (measured on an H100 for SmolLM2: slower, and "
            "perplexity 63.9 against 30.7 with fp16 activations); fp16 activations are the fast path there"
        )

    return activations.InsertActivationQDQPass(options.static_activations(target), options.static_int8_ops(target))


def _lower(options, target):
    from hessc.runtime import lower

    return lower.LowerWeightsPass(lower.LowerConfig(
        target=target.name, fp16=options.fp16_for(target), accuracy_level=1 if options.activations == 16 else 4,
        keep_portable=options.verify, max_memory=options.max_memory,
    ))


def _fuse_attention(options, target):
    from hessc.runtime import fuse_attention

    return fuse_attention.FuseAttentionPass()


def _fuse_norms(options, target):
    from hessc.runtime import fuse_norms

    return fuse_norms.FuseNormsPass()


def _fuse(options, target):
    from hessc.runtime import fuse

    return fuse.FuseSiblingsPass()


def _tune(options, target):
    from hessc.runtime import tune

    return tune.TuneKernelsPass(max_memory=options.max_memory)


def _verify(options, target):
    from hessc.runtime import verification

    return verification.VerifyInORTPass(
        target, seed=options.seed, max_loss_increase=options.max_loss_increase,
        min_output_cosine=options.min_output_cosine, allow_degraded=options.allow_degraded,
        max_memory=options.max_memory,
    )


def _never(options, target) -> bool:
    return False


def _always(options, target) -> bool:
    return True


def _ort_kernels(options, target) -> bool:
    """Targets that run ONNX Runtime's contrib kernels (the fusions write com.microsoft ops)."""
    return target.name in ("cpu", "cuda")


PASSES: tuple[PassSpec, ...] = (
    PassSpec("upgrade-opset", "raise the default-domain opset to what the quantized form needs (21; 25 for 2-bit)",
             _upgrade_opset, _always),
    # A Hadamard rotation needs no curvature and invalidates most of it: it runs before annotation.
    PassSpec("fold-rotation", "an orthogonal rotation of the residual stream folded exactly into the weights "
             "(pre-norm decoders; norm scales folded first)", _fold_rotation, lambda o, t: o.rotate is not None),
    PassSpec("annotate-hessian", "curvature statistics per weight: input covariance A, K-FAC G, gradients (analysis)",
             _annotate_hessian, lambda o, t: o.needs_curvature),
    PassSpec("share-weights", "cross-layer weight sharing: layers of one role coloured greedily (non-adjacent "
             "merges allowed) by the predicted loss change; one shared basis per colour", _share_weights,
             lambda o, t: o.share is not None),
    PassSpec("plan-quantization", "decide bits, group size and method per weight (QuantPlan on each weight)",
             _plan, _always),
    PassSpec("allocate-bits", "re-plan bits and quantizer per weight under the budget (grouped knapsack)",
             _allocate, lambda o, t: o.budgeted),
    PassSpec("split-low-rank", "materialize the allocator's low-rank forms: W → L·R (whitened SVD) or "
             "Q(W) + L·R (the quantization residual's), factors as MatMul weights with their own plans",
             _split_low_rank, lambda o, t: o.budgeted and o.low_rank),
    PassSpec("insert-qdq", "materialize the plans as blocked DequantizeLinear weights (the portable form)",
             _insert_qdq, _always),
    PassSpec("check-allocation", "measure the budget's predicted loss change on held-out feeds; where it is "
             "exceeded, measure the weights most responsible and re-solve the budget with corrected predictions; "
             "keep low-rank items only where they measure better than plain items",
             _check_allocation, lambda o, t: o.checks_allocation),
    PassSpec("confirm-lossless", "check the allocation on held-out feeds and back off until it holds",
             _confirm_lossless, lambda o, t: o.lossless),
    PassSpec("annotate-activation-ranges", "calibrated ranges of the activations to quantize: quantized "
             "layers' inputs, the static int8 region's values (analysis)",
             _activation_ranges, lambda o, t: o.static_activations(t) or bool(o.static_int8_ops(t))),
    PassSpec("tune-int8-regions", "time each connected part of the static int8 region at the serving shape "
             "against float activations (cached per machine) and keep int8 only where it is faster",
             _tune_regions, lambda o, t: o.tune and bool(o.static_int8_ops(t)) and not o.static_activations(t)),
    PassSpec("insert-activation-qdq", "uint8 per-tensor Q/DQ on those activations (the static int8 region "
             "in the form ORT fuses into QLinearConv, QLinearAdd, ...)",
             _activation_qdq, lambda o, t: o.static_activations(t) or bool(o.static_int8_ops(t))),
    PassSpec("fuse-attention", "a KV-cache decoder's attention (found by onnxscript's SDPA fusion, the cache "
             "concatenation and head repeat matched, the mask run and checked causal or a sliding window, the rotary "
             "embedding moved into the kernel) as one GroupQueryAttention per layer (onnxruntime-genai's form)", _fuse_attention, _ort_kernels),
    PassSpec("fuse-norms", "decomposed RMSNorms and the residual adds before them (and LayerNorm's) as ORT's "
             "fused norms (onnxscript's ORT fusion rules)", _fuse_norms, _ort_kernels),
    PassSpec("lower-<target>", "rewrite the portable form into the target's kernels (MatMulNBits, "
             "GatherBlockQuantized, fp16)", _lower, _always),
    PassSpec("fuse-siblings", "fuse MatMulNBits layers that read the same input (gate and up, Q, K and V) into "
             "one kernel and a Split (none where GroupQueryAttention reads Q, K and V packed): fewer kernels per token "
             "(measured on the CPU and on CUDA)",
             _fuse, _ort_kernels),
    PassSpec("tune-kernels", "time each MatMulNBits layer at the serving shape at int8 and fp32 compute "
             "(cached per machine) and keep the faster; not where --activations fixes the compute",
             _tune, lambda o, t: o.tune and t.name == "cpu" and o.activations is None),
    PassSpec("verify-in-ort", "run the result on its target in ONNX Runtime and compare it (analysis)",
             _verify, lambda o, t: o.verify),
)


def spec_name(spec: PassSpec, target) -> str:
    return spec.name.replace("<target>", target.name) if target is not None else spec.name


def default_names(options, target) -> list[str]:
    """The default pipeline's pass names for these options, in order."""
    return [spec_name(s, target) for s in PASSES if s.available and s.default(options, target)]


def _lookup(name: str, target) -> PassSpec:
    for spec in PASSES:
        if spec_name(spec, target) == name:
            if not spec.available:
                raise InputError(f"the pass {name!r} is not implemented yet; `hessc passes` lists what exists")
            return spec
    known = ", ".join(spec_name(s, target) for s in PASSES if s.available)
    raise InputError(f"unknown pass {name!r}; the passes are: {known}")


def _return_freed_memory() -> None:
    """Hands the C heap's free pages back to the system (glibc's ``malloc_trim``) between passes.

    A pass that works weight by weight frees many temporaries of a few MiB; glibc keeps those
    pages in its heap, so the process stays as large as its largest pass had been (a 1 GiB model:
    ~0.4 GiB held after quantization and lowering). Elsewhere than glibc this does nothing."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class InstrumentedPass(ir.passes.PassBase):
    """Runs a pass under its name, records its wall time and ``modified`` in
    ``model.meta[PASSES_KEY]``, and optionally verifies the IR after it."""

    def __init__(self, name: str, inner: ir.passes.PassBase, check: bool = False) -> None:
        super().__init__()
        self.name = name
        self.inner = inner
        self.check = check

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        try:
            result = self.inner(model)
        except Exception as e:
            if not isinstance(e, (HesscError, ir.passes.PassError)):
                e.add_note(f"in pass {self.name}")  # onnx_ir's PassError names no pass
            raise
        _return_freed_memory()
        elapsed = time.perf_counter() - start
        ran = list(model.meta.get(PASSES_KEY, []))
        ran.append({"name": self.name, "seconds": round(elapsed, 3), "modified": bool(result.modified)})
        result.model.meta[PASSES_KEY] = ran
        logger.info("pass %s: %.2f s (modified=%s)", self.name, elapsed, result.modified)
        if self.check:
            verify.verify_model(result.model, after=self.name)
        return result


class Pipeline(ir.passes.PassManager):
    """A pass manager whose passes are :class:`InstrumentedPass` steps; before anything runs, every
    step's ``precheck(model)`` (where it has one) refuses inputs the step could not handle, so a
    bad request fails before the expensive steps, not after them."""

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for step in self.passes:
            precheck = getattr(step.inner, "precheck", None)
            if precheck is not None:
                precheck(model)
        return super().call(model)


def build_pipeline(
    options, target, *, check: bool = False, extra: Sequence[tuple[str, str, ir.passes.PassBase]] = ()
) -> Pipeline:
    """The pipeline for a compile, top to bottom in execution order.

    Args:
        options: the :class:`~hessc.options.CompileOptions`; ``options.passes`` (when set) is the
            exact list of passes to run, ``options.disabled_passes`` are dropped.
        target: the :class:`~hessc.runtime.targets.Target`.
        check: verify the IR after every pass.
        extra: ``(before, name, pass)`` steps inserted before the named step (a pass under test).

    Returns:
        The pipeline; run it with :func:`run`.
    """
    names = list(options.passes) if options.passes is not None else default_names(options, target)
    for name in options.disabled_passes:
        _lookup(name, target)
    steps: list[InstrumentedPass] = []
    for name in names:
        if name in options.disabled_passes:
            continue
        spec = _lookup(name, target)
        for before, extra_name, extra_pass in extra:
            if before == name:
                steps.append(InstrumentedPass(extra_name, extra_pass, check))
        steps.append(InstrumentedPass(name, spec.build(options, target), check))
    if not steps:
        raise InputError("the pipeline is empty: --passes and --disable-pass left no pass to run")
    return Pipeline(steps)


def run(pipeline: ir.passes.PassBase, model: ir.Model) -> ir.Model:
    """Runs the pipeline on the model; returns the result (the same object for in-place pipelines).

    onnx_ir wraps what a pass raises in ``PassError`` (once per layer of pass managers); what the
    pass raised comes out as itself: hessc's own errors so that callers and the CLI can act on them
    (exit code 2 and the fix, not "internal error"), anything else with the pass it came from noted.
    """
    try:
        return pipeline(model).model
    except ir.passes.PassError as e:
        cause: BaseException | None = e
        while isinstance(cause, ir.passes.PassError):
            cause = cause.__cause__
        if isinstance(cause, HesscError):
            raise cause from None
        if cause is None:
            raise
        raise cause from e
