"""Bit packing for ONNX Runtime's low-bit contrib operators.

``com.microsoft.MatMulNBits`` computes ``Y = A · dequant(B)ᵀ`` with ``B`` stored per output
column ``n`` as ``[N, k_blocks, block_size · bits / 8]`` bytes, codes packed low bits first
(code ``j`` of a byte sits at bit ``j · bits``), scales ``[N, k_blocks]`` and zero points packed
the same way per row (``[N, ⌈k_blocks · bits / 8⌉]``), default ``2^(bits−1)`` when absent. A
symmetric signed code ``q`` is stored as ``q + 2^(bits−1)`` so that default applies.

MatMulNBits has no 3-bit kernel, so 3-bit codes run as 4-bit ``B``. To store them at 3 bits,
each code's 3-bit value ``v`` (the 4-bit code ``u`` itself for unsigned codes; ``u − 4`` for
symmetric ones, whose ``u = q + 8`` lies in ``[4, 12)``) is split into its low two bits and its high
bit (:func:`pack_three_bit`), laid out so that ONNX Runtime can rebuild ``B`` with few, small
operations (:func:`hessc.runtime.lower.unpack_three_bit_graph`; :func:`nibbles_from_three_bit` is
its numpy twin). In groups of 8 codes (``B``'s 4 bytes ``4g … 4g+3``):

* ``lows[n, g, i]`` (2 bytes a group) holds ``v & 3`` of codes ``4i, 4i+1, 4i+2, 4i+3`` at bits
  0, 4, 2, 6, so ``(lows >> 2s) & 0x33`` is the low half of both nibbles of byte ``2i + s``;
* ``highs[n, g]`` (1 byte a group) holds ``v >> 2`` of code ``j`` at bit ``j``, and a 256-entry
  table (:func:`high_bits_table`) turns it into the other half of the 4 bytes (``+4`` per nibble
  for symmetric codes).
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
    blob = block_size * bits // 8
    packed_b = np.empty((n_out, k_blocks, blob), dtype=np.uint8)
    with_zp = not symmetric and zero_points is not None
    zp_row = math.ceil(k_blocks * bits / 8)
    packed_zp = np.empty((n_out, zp_row), dtype=np.uint8) if with_zp else None
    fill = 1 << (bits - 1) if symmetric else 0
    step = max(1, PACK_CHUNK // max(1, k))  # rows pack independently: a block of rows at a time
    for i in range(0, n_out, step):
        rows = slice(i, min(i + step, n_out))
        padded = np.full((rows.stop - i, k_blocks * block_size), fill, dtype=np.uint8)
        padded[:, :k] = to_unsigned(codes[rows], bits, symmetric)
        if with_zp:
            # Padding codes equal to the block's zero point dequantize to exactly zero.
            padded[:, k:] = zero_points[rows, -1].astype(np.uint8)[:, None]
            packed_zp[rows] = pack_rows(zero_points[rows].astype(np.uint8), bits).reshape(rows.stop - i, zp_row)
        packed_b[rows] = pack_rows(padded.reshape(-1, block_size), bits).reshape(-1, k_blocks, blob)
    return packed_b, (packed_zp.reshape(-1) if with_zp else None)


PACK_CHUNK = 1 << 22
"""Codes packed at a time by :func:`matmul_nbits_weights` (its temporaries stay this small)."""


THREE_BIT_GROUP = 8  # codes per group: 2 bytes of lows and 1 byte of highs


def pack_three_bit(values: np.ndarray, fill: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Splits (N, K) 3-bit values into ``lows`` uint8 ``[N, G, 2, 1]`` and ``highs`` uint8 ``[N, G]``.

    ``G = ⌈K/8⌉``: rows are padded to whole groups of 8 codes only, not to whole blocks.

    Args:
        values: values in ``[0, 8)``.
        fill: the value (a scalar, or one per row) of the unused slots of each row's last group,
            so that the rebuilt 4-bit rows continue with the padding MatMulNBits expects.
    """
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= 8):
        raise ValueError("3-bit values lie in [0, 8)")
    n_out, k = values.shape
    groups = math.ceil(k / THREE_BIT_GROUP)
    padded = np.empty((n_out, groups * THREE_BIT_GROUP), dtype=np.uint8)
    padded[:, :k] = values
    padded[:, k:] = np.asarray(fill, dtype=np.uint8).reshape(-1, 1)
    low = (padded & 3).reshape(n_out, groups, 2, 4)  # [n, g, i, j]: code 4i + j of the group
    lows = low[..., 0] | (low[..., 1] << 4) | (low[..., 2] << 2) | (low[..., 3] << 6)
    highs = np.packbits((padded >> 2).reshape(n_out, groups, 8), axis=-1, bitorder="little")
    return lows.reshape(n_out, groups, 2, 1), highs.reshape(n_out, groups)


def unpack_three_bit(lows: np.ndarray, highs: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_three_bit`: the (N, K) values."""
    n_out, groups = highs.shape
    lows = lows.reshape(n_out, groups, 2, 1)
    low = np.concatenate([lows & 3, (lows >> 4) & 3, (lows >> 2) & 3, (lows >> 6) & 3], axis=-1)
    high = np.unpackbits(highs[..., None], axis=-1, bitorder="little")
    return (low.reshape(n_out, -1) | (high.reshape(n_out, -1) << 2))[:, :k]


def high_bits_table(symmetric: bool) -> np.ndarray:
    """uint8 ``[256, 2, 2]``: for a ``highs`` byte, bits 2 and 6 of ``B``'s 4 bytes of its group
    (``[i, s]`` is byte ``2i + s``), plus 4 per nibble for symmetric codes (``u = v + 4``)."""
    h = np.arange(256, dtype=np.uint16)[:, None]
    t = np.arange(4, dtype=np.uint16)[None, :]
    table = (((h >> (2 * t)) & 1) << 2) | (((h >> (2 * t + 1)) & 1) << 6)
    if symmetric:
        table = table + 0x44
    return table.astype(np.uint8).reshape(256, 2, 2)


def three_bit_weights(
    codes: np.ndarray, zero_points: np.ndarray | None, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The ``lows`` and ``highs`` that rebuild :func:`matmul_nbits_weights`' 4-bit ``B`` of 3-bit codes.

    Args:
        codes: (N, K) codes: unsigned in ``[0, 8)``, or symmetric signed in ``[−4, 4)``.
        zero_points: (N, k_blocks) zero points in ``[0, 8)`` (None when symmetric); the last
            block's is the padding code of each row, as in :func:`matmul_nbits_weights`.
        symmetric: signed codes, stored by MatMulNBits as ``q + 8`` with the implicit zero point 8.
    """
    if symmetric:
        if codes.size and (codes.min() < -4 or codes.max() > 3):
            raise ValueError("symmetric 3-bit codes lie in [-4, 4)")
        return pack_three_bit(codes.astype(np.int16) + 4, fill=4)  # padding u = 8, so v = 4
    if zero_points is None:
        raise ValueError("unsigned 3-bit codes need their zero points")
    if zero_points.size and zero_points.max() >= 8:
        raise ValueError("3-bit zero points lie in [0, 8)")
    return pack_three_bit(codes, fill=zero_points[:, -1])


def nibbles_from_three_bit(
    lows: np.ndarray, highs: np.ndarray, packed_zp: np.ndarray | None, k: int, block_size: int, symmetric: bool
) -> np.ndarray:
    """What the unpack graph computes, in numpy: ``B`` uint8 ``[N, k_blocks, block_size/2]``.

    Codes past ``8·G`` take the padding code of :func:`matmul_nbits_weights`: 8 when symmetric,
    otherwise the row's last zero point (read from the packed 4-bit zero points).
    """
    n_out, groups = highs.shape
    k_blocks = math.ceil(k / block_size)
    codes = unpack_three_bit(lows, highs, groups * THREE_BIT_GROUP) + (4 if symmetric else 0)
    if symmetric:
        fill = np.full((n_out, 1), 8, dtype=np.uint8)
    else:
        fill = unpack_rows(packed_zp.reshape(n_out, -1), 4, k_blocks)[:, -1:].astype(np.uint8)
    width = k_blocks * block_size
    full = np.concatenate([codes, np.broadcast_to(fill, (n_out, width - codes.shape[1]))], axis=1)
    return pack_rows(full, 4).reshape(n_out, k_blocks, block_size // 2)
