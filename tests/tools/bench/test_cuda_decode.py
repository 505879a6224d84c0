"""The CUDA decode benchmark's steps, run on the CPU with a tiny shape: random checkpoint, genai's
builder, hessc's compile, one bound decode step per variant, genai's Generator."""

from __future__ import annotations

import pytest

from hessc.bench import cuda_decode


@pytest.mark.slow
def test_every_variant_is_built_and_timed(tiny_llama, tmp_path):
    result = cuda_decode.run("tiny", tmp_path, tiny_llama, provider="cpu", cache=64, rounds=1, runs=2, hessc_bits=[4], torch_export=True)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"genai fp16", "genai int4", "hessc 4", "hessc 4 from torch (kv_cache=True)"}
    for label in ("genai int4", "hessc 4", "hessc 4 from torch (kv_cache=True)"):  # genai's fp16 model is for CUDA: its CPU graph does not run
        assert rows[label]["step_ms_cache_64"] > 0 and rows[label]["genai_tok_s_128_to_512"] > 0
    assert rows["hessc 4"]["stored_mb"] < rows["genai fp16"]["stored_mb"] / 2
