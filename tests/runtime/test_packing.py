"""Tests for hessc.runtime.packing: bit packing and the MatMulNBits weight layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hessc.runtime import packing


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 5),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(bits: int, rows: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n)).astype(np.uint8)
    packed = packing.pack_rows(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, math.ceil(n * bits / 8))
    np.testing.assert_array_equal(packing.unpack_rows(packed, bits, n), codes)


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (4, [[1, 2, 3]], [[0x21, 0x03]]),  # low nibble first, a partial byte padded with zeros
        (2, [[1, 2, 3, 0, 3]], [[0b00111001, 0b00000011]]),
        (8, [[7, 255]], [[7, 255]]),
    ],
)
def test_pack_rows_puts_code_j_at_bit_j_times_bits(bits, codes, expected) -> None:
    np.testing.assert_array_equal(packing.pack_rows(np.array(codes, np.uint8), bits), np.array(expected, np.uint8))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_to_unsigned_offsets_symmetric_codes(bits: int) -> None:
    signed = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.int8)
    np.testing.assert_array_equal(packing.to_unsigned(signed, bits, True), np.arange(2**bits, dtype=np.uint8))
    unsigned = np.arange(2**bits, dtype=np.uint8)
    np.testing.assert_array_equal(packing.to_unsigned(unsigned, bits, False), unsigned)


def _unpack_b(packed_b: np.ndarray, bits: int, block: int) -> np.ndarray:
    n_out, k_blocks, blob = packed_b.shape
    assert blob == block * bits // 8
    return packing.unpack_rows(packed_b.reshape(n_out * k_blocks, blob), bits, block).reshape(n_out, -1)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    block=st.sampled_from([16, 32, 64]),
    n_out=st.integers(1, 6),
    k=st.integers(1, 150),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_nbits_weights_layout(bits, block, n_out, k, symmetric, seed) -> None:
    rng = np.random.default_rng(seed)
    k_blocks = math.ceil(k / block)
    if symmetric:
        codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(n_out, k)).astype(np.int8)
        zps = None
    else:
        codes = rng.integers(0, 2**bits, size=(n_out, k)).astype(np.uint8)
        zps = rng.integers(0, 2**bits, size=(n_out, k_blocks)).astype(np.uint8)
    packed_b, packed_zp = packing.matmul_nbits_weights(codes, zps, bits, block, symmetric)

    # B: [N, k_blocks, block·bits/8], codes low bits first, the partial last block padded.
    assert packed_b.dtype == np.uint8 and packed_b.shape == (n_out, k_blocks, block * bits // 8)
    unpacked = _unpack_b(packed_b, bits, block)
    np.testing.assert_array_equal(unpacked[:, :k], packing.to_unsigned(codes, bits, symmetric))
    pad = unpacked[:, k:]
    # Padding dequantizes to exactly zero: the implicit zero point 2^(b−1), or the block's own.
    expected_pad = 2 ** (bits - 1) if symmetric else zps[:, -1:]
    np.testing.assert_array_equal(pad, np.broadcast_to(expected_pad, pad.shape))

    if symmetric:
        assert packed_zp is None
    else:
        per_row = math.ceil(k_blocks * bits / 8)
        assert packed_zp.dtype == np.uint8 and packed_zp.shape == (n_out * per_row,)
        np.testing.assert_array_equal(packing.unpack_rows(packed_zp.reshape(n_out, per_row), bits, k_blocks), zps)
