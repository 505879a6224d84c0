"""Targets as data: what each ONNX Runtime target runs, stores and tolerates.

A :class:`Target` is the one place that says, for ``cpu``, ``cuda`` and ``onnx``, which provider
runs the result, which ops get quantized weights, how embeddings and activations are handled, how
bytes are laid out (and so what an allocator item costs) and how far the lowered model may drift
from its portable Q/DQ form. The pipeline builder and the passes read these fields; nothing else
switches on the target's name.
"""

from __future__ import annotations

import dataclasses
import functools
import platform

from hessc.errors import InputError

INT8_RANGES = ("auto", "full", "reduced")
"""Choices of the static int8 weight grid: ``full`` codes in [−127, 127], ``reduced`` in
[−63, 63], ``auto`` as this machine's CPU needs (:func:`saturating_int8_products`)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One lowering target.

    Attributes:
        name: ``cpu``, ``cuda`` or ``onnx``; the lowering pass is ``lower-<name>``.
        provider: the ONNX Runtime execution provider that runs and verifies the result.
        kernel_layout: weights are stored in MatMulNBits' layout (blocks padded, zero points
            packed per row), which the allocator prices items in.
        quantized_ops: ops whose constant weights are quantized.
        embedding_min_bits: the fewest bits of an embedding table (GatherBlockQuantized runs
            4 and 8 bits; the portable form can take 2).
        embedding_whole_blocks: the embedding kernel is only correct when a table row is a whole
            number of blocks; other tables stay in the portable form (ORT 1.31's CUDA
            GatherBlockQuantized indexes blocks over the flattened table).
        fp16_default: activations in fp16 unless the user asks otherwise.
        dynamic_int8_activations: 8-bit activations are the kernel's own dynamic per-block int8
            path (MatMulNBits ``accuracy_level=4``), so no activation Q/DQ is inserted.
        static_int8_ops: ops run as static int8 kernels: 8-bit symmetric per-output-channel weights
            and calibrated uint8 activations on their inputs and outputs, in the Q/DQ form that
            ONNX Runtime fuses into ``QLinearConv`` and its neighbours (``QLinearAdd``,
            ``QLinearConcat``, ...). On the CPU a conv has no faster low-bit kernel: u8s4 Q/DQ
            convs ran 2x slower than fp32 on EfficientNet-Lite0, u8s8 4x faster.
        float_ops: weight-bearing ops whose weights stay in float on this target, each with the
            reason (the recurrent ops and ``ConvTranspose`` are quantized at 8 bits elsewhere; on
            the CPU an ``LSTM`` lowers to ``DynamicQuantizeLSTM``).
        lowers_weights: DequantizeLinear → MatMul/Gemm/Gather patterns become contrib kernels.
        tolerance: the relative output error allowed between the lowered model and its portable
            form (kernel arithmetic only: int8 compute on the CPU, fp16 on CUDA).
    """

    name: str
    provider: str
    kernel_layout: bool
    quantized_ops: frozenset[str]
    embedding_min_bits: int
    embedding_whole_blocks: bool
    fp16_default: bool
    dynamic_int8_activations: bool
    lowers_weights: bool
    tolerance: float
    static_int8_ops: frozenset[str] = frozenset()
    float_ops: tuple[tuple[str, str], ...] = ()

    def scale_bytes(self, fp16: bool) -> int:
        """Bytes per stored scale: fp16 scales where activations are fp16."""
        return 2 if fp16 else 4

    @property
    def quantizes_conv(self) -> bool:
        return "Conv" in self.quantized_ops


TARGETS: dict[str, Target] = {
    "cpu": Target(
        name="cpu", provider="CPUExecutionProvider", kernel_layout=True,
        quantized_ops=frozenset({"MatMul", "Gemm", "Conv", "Gather"}), embedding_min_bits=4,
        embedding_whole_blocks=False, fp16_default=False, dynamic_int8_activations=True, lowers_weights=True,
        tolerance=0.05, static_int8_ops=frozenset({"Conv"}),
        float_ops=(*((op, "ONNX Runtime's CPU has no int8 kernel for this recurrent op, and weights dequantized on "
                         "every run are slower than float (an LSTM step with DequantizeLinear weights: 1.6x its float "
                         "time); --target onnx stores them at 8 bits") for op in ("GRU", "RNN")),
                   ("ConvTranspose", "ONNX Runtime's CPU has no int8 ConvTranspose kernel (it does not fuse a Q/DQ "
                    "ConvTranspose), and weights dequantized on every run are slower than float (1.11x on a 64->32 "
                    "4x4 stride-2 layer); --target onnx stores them at 8 bits")),
    ),
    "cuda": Target(
        name="cuda", provider="CUDAExecutionProvider", kernel_layout=True,
        quantized_ops=frozenset({"MatMul", "Gemm", "Gather"}), embedding_min_bits=4, embedding_whole_blocks=True,
        fp16_default=True, dynamic_int8_activations=False, lowers_weights=True, tolerance=0.02,
        float_ops=(*((op, "recurrent weights stay in float on cuda (their quantized form is not measured there)")
                     for op in ("LSTM", "GRU", "RNN")),
                   ("ConvTranspose", "ConvTranspose weights stay in float on cuda (no low-bit kernel)")),
    ),
    "onnx": Target(
        name="onnx", provider="CPUExecutionProvider", kernel_layout=False,
        quantized_ops=frozenset({"MatMul", "Gemm", "Conv", "Gather"}), embedding_min_bits=2,
        embedding_whole_blocks=False, fp16_default=False, dynamic_int8_activations=False, lowers_weights=False,
        tolerance=1e-4,
    ),
}


@functools.cache
def saturating_int8_products() -> bool:
    """Whether this machine's int8 CPU kernels saturate u8·s8 products at full range.

    x86 CPUs without VNNI (AVX2, AVX-512 without ``avx512_vnni``/``avx_vnni``) multiply uint8
    activations by int8 weights with ``vpmaddubsw``, which adds each pair of products in int16
    with saturation: 255·127·2 = 64 770 does not fit, and a ``QLinearConv`` on such a CPU
    drifted 3% from its Q/DQ form on random 3×3 convs with full-range weights (0 with codes in
    [−63, 63]). VNNI's ``vpdpbusd`` and ARM's dot products accumulate in int32. Unknown x86
    CPUs count as saturating.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def int8_code_limit(int8_range: str) -> int:
    """The static int8 weights' code limit for ``--int8-range``: 127 (``full``), 63 (``reduced``);
    ``auto``: 63 where :func:`saturating_int8_products`, else 127."""
    if int8_range not in INT8_RANGES:
        raise InputError(f"unknown int8 range {int8_range!r}; use one of {', '.join(INT8_RANGES)}")
    if int8_range == "auto":
        return 63 if saturating_int8_products() else 127
    return 127 if int8_range == "full" else 63


def get(name: str) -> Target:
    """The target called ``name``; an :class:`InputError` naming the choices otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}; use one of {', '.join(TARGETS)}") from None
