"""Bit packing for ONNX Runtime's low-bit contrib operators.

``com.microsoft.MatMulNBits`` computes ``Y = A · dequant(B)ᵀ`` with ``B`` stored per output
column ``n`` as ``[N, k_blocks, block_size · bits / 8]`` bytes, codes packed low bits first
(code ``j`` of a byte sits at bit ``j · bits``), scales ``[N, k_blocks]`` and zero points packed
the same way per row (``[N, ⌈k_blocks · bits / 8⌉]``), default ``2^(bits−1)`` when absent. A
symmetric signed code ``q`` is stored as ``q + 2^(bits−1)`` so that default applies.
"""

from __future__ import annotations

import math

import numpy as np


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes (rows, n) into bytes (rows, ⌈n·bits/8⌉), low bits first."""
    per_byte = 8 // bits
    rows, n = codes.shape
    width = math.ceil(n / per_byte) * per_byte
    padded = np.zeros((rows, width), dtype=np.uint8)
    padded[:, :n] = codes.astype(np.uint8)
    padded = padded.reshape(rows, -1, per_byte)
    out = np.zeros(padded.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        out |= (padded[:, :, j] & ((1 << bits) - 1)) << (j * bits)
    return out


def unpack_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: (rows, bytes) → unsigned codes (rows, n)."""
    per_byte = 8 // bits
    parts = [(packed >> (j * bits)) & ((1 << bits) - 1) for j in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[0], -1)[:, :n]


def to_unsigned(codes: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Codes in ``[0, 2^bits)``: symmetric signed codes are offset by ``2^(bits−1)``."""
    codes = codes.astype(np.int16)
    return (codes + (1 << (bits - 1)) if symmetric else codes).astype(np.uint8)


def matmul_nbits_weights(
    codes: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The packed ``B`` and zero points of MatMulNBits from (N, K) codes and (N, k_blocks) zps.

    Returns:
        ``B`` as uint8 ``[N, k_blocks, block_size·bits/8]`` and zero points as uint8
        ``[N·⌈k_blocks·bits/8⌉]`` (None when symmetric).
    """
    n_out, k = codes.shape
    k_blocks = math.ceil(k / block_size)
    unsigned = to_unsigned(codes, bits, symmetric)
    fill = 1 << (bits - 1) if symmetric else 0
    padded = np.full((n_out, k_blocks * block_size), fill, dtype=np.uint8)
    padded[:, :k] = unsigned
    if not symmetric and zero_points is not None:
        # Padding codes equal to the block's zero point dequantize to exactly zero.
        last = zero_points[:, -1].astype(np.uint8)
        padded[:, k:] = last[:, None]
    blob = block_size * bits // 8
    packed_b = pack_rows(padded.reshape(n_out * k_blocks, block_size), bits).reshape(n_out, k_blocks, blob)
    if symmetric or zero_points is None:
        return packed_b, None
    zp = pack_rows(zero_points.astype(np.uint8), bits).reshape(-1)
    return packed_b, zp
