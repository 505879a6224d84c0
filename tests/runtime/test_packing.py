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


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_three_bit_round_trip(rows: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 8, size=(rows, k)).astype(np.uint8)
    fill = rng.integers(0, 8, size=rows).astype(np.uint8)
    lows, highs = packing.pack_three_bit(values, fill)
    groups = math.ceil(k / 8)
    assert lows.dtype == highs.dtype == np.uint8
    assert lows.shape == (rows, groups, 2, 1) and highs.shape == (rows, groups)
    assert lows.nbytes + highs.nbytes == 3 * rows * groups, "3 bits per code"
    np.testing.assert_array_equal(packing.unpack_three_bit(lows, highs, k), values)
    # The unused slots of each row's last group hold that row's fill value.
    tail = packing.unpack_three_bit(lows, highs, groups * 8)[:, k:]
    np.testing.assert_array_equal(tail, np.broadcast_to(fill[:, None], tail.shape))


def test_three_bit_layout() -> None:
    values = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 5]], np.uint8)
    lows, highs = packing.pack_three_bit(values)
    # lows byte i: low 2 bits of codes 4i, 4i+1, 4i+2, 4i+3 at bits 0, 4, 2, 6 (1, 2, 3, 0 twice).
    expected_lows = [[[[0b00_10_11_01], [0b00_10_11_01]], [[0b00_00_00_01], [0]]]]
    np.testing.assert_array_equal(lows, np.array(expected_lows, np.uint8))
    # highs: bit j = high bit of code j (4, 5, 6, 7 have it); then code 8 (5) alone.
    np.testing.assert_array_equal(highs, np.array([[0b01111000, 0b1]], np.uint8))


def test_high_bits_table_places_bit_2_of_each_nibble() -> None:
    table = packing.high_bits_table(symmetric=False)
    assert table.shape == (256, 2, 2)
    np.testing.assert_array_equal(table[0b00000001].reshape(-1), [0x04, 0, 0, 0])  # code 0: byte 0, low nibble
    np.testing.assert_array_equal(table[0b10000000].reshape(-1), [0, 0, 0, 0x40])  # code 7: byte 3, high nibble
    np.testing.assert_array_equal(packing.high_bits_table(symmetric=True)[0].reshape(-1), [0x44] * 4)  # u = v + 4


@pytest.mark.parametrize(
    "codes, zps, symmetric",
    [
        (np.array([[8]], np.uint8), np.zeros((1, 1), np.uint8), False),
        (np.array([[4]], np.int8), None, True),
        (np.array([[1]], np.uint8), np.full((1, 1), 8, np.uint8), False),
        (np.array([[1]], np.uint8), None, False),
    ],
)
def test_three_bit_weights_refuse_what_3_bits_cannot_hold(codes, zps, symmetric: bool) -> None:
    with pytest.raises(ValueError):
        packing.three_bit_weights(codes, zps, symmetric)


@settings(max_examples=60, deadline=None)
@given(
    block=st.sampled_from([16, 32, 64, 128]),
    n_out=st.integers(1, 6),
    k=st.integers(1, 300),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_three_bit_codes_rebuild_the_4_bit_matmul_nbits_weight(block, n_out, k, symmetric, seed) -> None:
    """3-bit codes rebuild exactly the B that the 4-bit container packs, block padding included,
    while storing 3 bits per code and no padding to whole blocks; the table-based bytes (what the
    unpack graph computes) agree."""
    rng = np.random.default_rng(seed)
    k_blocks = math.ceil(k / block)
    if symmetric:
        codes = rng.integers(-4, 4, size=(n_out, k)).astype(np.int8)
        zps = None
    else:
        codes = rng.integers(0, 8, size=(n_out, k)).astype(np.uint8)
        zps = rng.integers(0, 8, size=(n_out, k_blocks)).astype(np.uint8)
    packed_b, packed_zp = packing.matmul_nbits_weights(codes, zps, 4, block, symmetric)
    lows, highs = packing.three_bit_weights(codes, zps, symmetric)
    assert lows.nbytes + highs.nbytes == 3 * n_out * math.ceil(k / 8)
    rebuilt = packing.nibbles_from_three_bit(lows, highs, packed_zp, k, block, symmetric)
    np.testing.assert_array_equal(rebuilt, packed_b)
    by_table = ((lows >> np.array([0, 2], np.uint8)) & 0x33) | packing.high_bits_table(symmetric)[highs]
    np.testing.assert_array_equal(by_table.reshape(n_out, -1), packed_b.reshape(n_out, -1)[:, : 4 * highs.shape[1]])
