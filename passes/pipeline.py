"""The pass pipeline: a named builder whose list reads in execution order.

Each pass has a stable kebab-case name, so a pipeline can be written as data and a pass disabled
by name. Timing and verify-after-each-pass live in one instrumenting wrapper, not in the passes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import onnx_ir as ir

from hessc.errors import HesscError
from hessc.ir import verify
from hessc.passes import quantize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    modified: bool


class InstrumentedPass(ir.passes.PassBase):
    """Runs a pass, records its wall time, and optionally verifies the IR after it."""

    in_place = True
    changes_input = True

    def __init__(self, name: str, inner: ir.passes.PassBase, timings: list[PassTiming], check: bool) -> None:
        super().__init__()
        self.name = name
        self.inner = inner
        self.timings = timings
        self.check = check

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        result = self.inner(model)
        elapsed = time.perf_counter() - start
        self.timings.append(PassTiming(self.name, elapsed, result.modified))
        logger.info("pass %s: %.2f s (modified=%s)", self.name, elapsed, result.modified)
        if self.check:
            verify.verify_model(result.model, after=self.name)
        return result


def build_quantization_pipeline(
    config: quantize.QuantConfig,
    *,
    annotate: ir.passes.PassBase | None = None,
    allocate: ir.passes.PassBase | None = None,
    hessian_for: Callable | None = None,
    gradient_for: Callable | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    disabled: Sequence[str] = (),
) -> list[tuple[str, ir.passes.PassBase]]:
    """The default pipeline, top to bottom in execution order.

    ``allocate`` (the bit allocator) re-plans, after plan-quantization, the weights it has
    Hessian statistics for.
    """
    steps: list[tuple[str, ir.passes.PassBase]] = []
    if annotate is not None:
        steps.append(("annotate-hessian", annotate))
    steps.append(("plan-quantization", quantize.PlanQuantizationPass(config)))
    if allocate is not None:
        steps.append(("allocate-bits", allocate))
    steps.append(("insert-qdq", quantize.InsertQDQPass(hessian_for=hessian_for, progress=progress, gradient_for=gradient_for)))
    return [(name, p) for name, p in steps if name not in disabled]


def run(
    model: ir.Model, steps: Sequence[tuple[str, ir.passes.PassBase]], *, check: bool = False
) -> list[PassTiming]:
    """Runs the steps in order on the model (in place); returns per-pass timings."""
    timings: list[PassTiming] = []
    manager = ir.passes.PassManager([InstrumentedPass(n, p, timings, check) for n, p in steps])
    try:
        manager(model)
    except ir.passes.PassError as e:
        # onnx_ir wraps what a pass raises (once per layer of pass managers); a user error keeps its
        # own type, so callers and the CLI can act on it (exit code 2 and the fix, not "internal error").
        cause: BaseException | None = e
        while isinstance(cause, ir.passes.PassError):
            cause = cause.__cause__
        if isinstance(cause, HesscError):
            raise cause from None
        raise
    return timings
