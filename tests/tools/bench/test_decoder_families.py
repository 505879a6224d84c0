"""The decoder-families benchmark's row: a family compiled through the torch front door runs in
onnxruntime-genai with transformers' logits."""

from __future__ import annotations

from hessc.bench import decoder_families


def test_a_family_row_is_generated_and_compared(tmp_path):
    (row,) = decoder_families.run(["qwen2"], tmp_path, 8)
    assert "error" not in row, row
    assert row["tokens"] > 0 and row["min_logits_cosine"] > 0.999
    assert row["fuse_attention"]["rotary_in_kernel"] == 2 and row["cache_in_place"] is True
