"""The kernel benchmark's models compute the layer they time: DynamicQuantizeMatMul with int8
per-column weights agrees with the fp32 MatMul to the error of 8-bit weights and activations."""

from __future__ import annotations

import numpy as np

from hessc.bench import kernels
from hessc.runtime import sessions


def test_dynamic_quantize_matmul_computes_the_matmul() -> None:
    fp32, dynamic = kernels._dynamic_quantize_matmul(96, 64)
    x = {"x": np.random.default_rng(2).standard_normal((8, 96)).astype(np.float32)}
    want = sessions.session(fp32, "cpu").run(x)[0]
    got = sessions.session(dynamic, "cpu").run(x)[0]
    assert got.shape == want.shape == (8, 64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
