"""The options of one compile, frozen and checked once.

``optimize``'s arguments become a :class:`CompileOptions`; the pipeline builder
(:func:`hessc.passes.pipeline.build_pipeline`) reads it together with the
:class:`hessc.runtime.targets.Target`, and derives each pass family's configuration from the two.
Everything a user can get wrong is refused here, before any work, with the fix in the message.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from hessc.errors import InputError
from hessc.ir.meta import SUPPORTED_BITS
from hessc.runtime import targets

METHODS = ("rtn", "gptq")
ROUNDINGS = ("nearest", "gradient")


def parse_bits(bits: int | float | str) -> int | float | str:
    """``4`` → uniform 4-bit codes; ``3.5`` or ``3.0`` (a float) → an average-bits budget;
    ``"lossless"``; a string is parsed the same way (the CLI's ``--bits``)."""
    if isinstance(bits, bool):
        raise InputError(f"--bits {bits!r}: give a number of bits (4, 3.5) or 'lossless'")
    if isinstance(bits, str):
        text = bits.strip().lower()
        if text == "lossless":
            return "lossless"
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise InputError(f"--bits {bits!r}: give a number of bits (4, 3.5) or 'lossless'") from None
    return bits


CHECK_HOLDOUT_MIN = 16
"""Calibration feeds from which a checked budget holds a quarter out (see ``holds_out``)."""


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What the user asked for (see :func:`hessc.optimize` for each field's meaning).

    ``bits`` is an ``int`` (uniform codes), a ``float`` (an average-bits budget) or ``"lossless"``;
    ``budget_bytes`` replaces ``bits`` as the budget when set. ``passes`` (None: the default
    pipeline) and ``disabled_passes`` select the pipeline's steps by name. ``max_loss_increase``
    (nats of next-token loss, language models) and ``min_output_cosine`` (any model) say when a
    result counts as degraded: refused (exit 3) unless ``allow_degraded``.
    """

    target: str = "cpu"
    bits: int | float | str = 4
    group_size: int = 32
    seed: int = 0
    symmetric: bool = False
    method: str = "rtn"
    rounding: str = "nearest"
    budget_bytes: int | None = None
    activations: int | None = None
    quantize_embeddings: bool = True
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    fp16: bool | None = None
    verify: bool = True
    measure_latency: bool = False
    has_calibration: bool = False
    passes: tuple[str, ...] | None = None
    disabled_passes: tuple[str, ...] = ()
    custom_op_libraries: tuple[str, ...] = ()
    max_loss_increase: float = 1.0
    min_output_cosine: float = 0.5
    allow_degraded: bool = False
    rotate: str | None = None
    int8_range: str = "auto"
    tune: bool = True
    check_allocation: bool = True
    low_rank: bool = True
    share: float | None = None
    max_memory: int | None = None

    def __post_init__(self) -> None:
        target = targets.get(self.target)
        object.__setattr__(self, "bits", parse_bits(self.bits))
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; use 'rtn' or 'gptq'")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"unknown rounding {self.rounding!r}; use 'nearest' or 'gradient'")
        if self.activations not in (None, 8, 16):
            raise InputError(f"--activations {self.activations} is not supported; use 8 or 16")
        if self.int8_range not in targets.INT8_RANGES:
            raise InputError(f"unknown int8 range {self.int8_range!r}; use one of {', '.join(targets.INT8_RANGES)}")
        if self.rotate in ("none", ""):
            object.__setattr__(self, "rotate", None)
        if self.rotate == "learned":
            raise InputError("--rotate learned is not implemented yet; use --rotate hadamard")
        if self.rotate not in (None, "hadamard", "random"):
            raise InputError(f"unknown rotation {self.rotate!r}; use none, hadamard or random")
        if not (self.max_loss_increase > 0 and math.isfinite(self.max_loss_increase)):
            raise InputError(f"--max-loss-increase {self.max_loss_increase} must be a positive number of nats")
        if not -1.0 <= self.min_output_cosine <= 1.0:
            raise InputError(f"--min-output-cosine {self.min_output_cosine} must lie in [-1, 1]")
        if self.fp16 and target.name != "cuda":
            raise InputError("fp16 lowering is for target='cuda' only")
        if isinstance(self.bits, float) and not (math.isfinite(self.bits) and self.bits > 0):
            raise InputError(f"--bits {self.bits} must be a positive number")
        if isinstance(self.bits, int) and self.budget_bytes is None and self.bits not in SUPPORTED_BITS:
            raise InputError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}"
                             " (or a budget such as 3.5)")
        if self.rounding == "gradient" and not self.budgeted:
            raise InputError("rounding='gradient' is chosen by the bit allocator: give a budget (bits=3.5, "
                             "budget_bytes=N) or bits='lossless'")
        if self.max_memory is not None and not (isinstance(self.max_memory, int) and self.max_memory > 0):
            raise InputError(f"--max-memory {self.max_memory} must be a positive number of bytes")
        if self.share is not None and not (isinstance(self.share, (int, float)) and 0 < self.share < 1):
            raise InputError(f"--share {self.share}: give the share of the shared layers' parameters to remove, "
                             "between 0 and 1 (0.2 removes a fifth)")
        if self.needs_curvature and not self.has_calibration:
            what = ("a bit budget" if self.budgeted else "--share (colours are scored by the curvature)"
                    if self.share is not None else "method='gptq'")
            raise InputError(f"{what} needs calibration data for the curvature statistics; pass --calibration")
        if self.lossless and self.activations == 8:
            raise InputError("lossless is checked for weight quantization only; drop --activations 8")
        if self.static_activations(target) and not self.has_calibration:
            raise InputError("--activations 8 needs calibration data to set activation ranges; pass --calibration")

    @property
    def lossless(self) -> bool:
        return self.bits == "lossless"

    @property
    def budgeted(self) -> bool:
        """The bit allocator chooses the bits (a fractional budget, bytes, or lossless)."""
        return self.lossless or self.budget_bytes is not None or isinstance(self.bits, float)

    @property
    def checks_allocation(self) -> bool:
        """A budget (not lossless, which has its own check) whose prediction is measured on
        held-out feeds (:mod:`hessc.passes.check_allocation`)."""
        return self.budgeted and not self.lossless and self.check_allocation

    def holds_out(self, feeds: int) -> bool:
        """Whether a quarter of ``feeds`` calibration feeds is held out from the statistics for a
        check: always for ``lossless``; for a checked budget only from
        :data:`CHECK_HOLDOUT_MIN` feeds (with fewer, the statistics need every feed: SmolLM2 at 3.5
        bits lost 1.5 perplexity with 6 of its 8 windows, and the check measures in-sample)."""
        return self.lossless or (self.checks_allocation and feeds >= CHECK_HOLDOUT_MIN)

    @property
    def snapshots(self) -> bool:
        """plan-quantization keeps the model before planning, for a replay of the allocation."""
        return self.lossless or self.checks_allocation

    @property
    def uniform_bits(self) -> int:
        """The bits ``plan-quantization`` plans before the allocator (if any) re-plans."""
        return self.bits if isinstance(self.bits, int) and not self.budgeted else 4

    @property
    def needs_curvature(self) -> bool:
        """Hessian statistics are needed (the allocator, GPTQ, or sharing)."""
        return self.budgeted or self.method == "gptq" or self.share is not None

    def fp16_for(self, target: targets.Target) -> bool:
        return target.fp16_default if self.fp16 is None else self.fp16

    def static_activations(self, target: targets.Target) -> bool:
        """8-bit activations as calibrated Q/DQ (where the kernel has no dynamic int8 path)."""
        return self.activations == 8 and not target.dynamic_int8_activations

    def static_int8_ops(self, target: targets.Target) -> frozenset[str]:
        """The ops run as static int8 kernels: the target's, given calibration data for their
        activation ranges and unless float activations were asked for (``--activations 16``)."""
        if not target.static_int8_ops or not self.has_calibration or self.activations == 16:
            return frozenset()
        return target.static_int8_ops

    def static_int8_off_reason(self, target: targets.Target) -> str | None:
        """Why the target's static int8 ops stay in float, when they do."""
        if not target.static_int8_ops or self.static_int8_ops(target):
            return None
        ops = "/".join(sorted(target.static_int8_ops))
        if self.activations == 16:
            return f"{ops} runs as a static int8 kernel on {target.name}, and --activations 16 keeps activations in float"
        return (f"{ops} runs as a static int8 kernel on {target.name}, which needs calibration data for its "
                "activation ranges; pass --calibration")

    def allocator_methods(self) -> tuple[str, ...]:
        methods = ("rtn", "gptq") if self.method == "gptq" else ("rtn",)
        return (*methods, "rtn-grad") if self.rounding == "gradient" else methods

    @staticmethod
    def shapes(input_shapes: dict[str, Sequence[int]] | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``{"input_ids": [1, 128]}`` in the frozen form of :attr:`input_shapes`."""
        return tuple((name, tuple(int(d) for d in dims)) for name, dims in (input_shapes or {}).items())
