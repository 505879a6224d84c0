"""fuse-norms: a torch-exported decoder's decomposed RMSNorms and residual adds become ORT's fused
norms, with the same outputs; a model without them is left as it is."""

from __future__ import annotations

import collections

import numpy as np
import torch

import builders
import hessc
from hessc.ir import frontend
from hessc.runtime import decoder, fuse_norms


def test_rms_norms_and_residual_adds_fuse_with_the_same_outputs(tiny_llama, tmp_path):
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    plain = frontend.load(lm, kv_cache=True)
    fused = frontend.clone(plain)
    counts = fuse_norms.fuse_norms(fused)
    # 2 layers: 4 norms, the first reads the embedding (no residual yet), the final one the stream.
    assert counts == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    ops = collections.Counter(n.op_type for n in fused.graph)
    assert ops["ReduceMean"] == 0 and ops["Sqrt"] == 0
    hessc.save(plain, tmp_path / "plain.onnx")
    hessc.save(fused, tmp_path / "fused.onnx")
    cache = decoder.find(plain)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, 250, size=(1, 3)), "attention_mask": np.ones((1, 7), np.int64)}
    for name, _ in cache.pairs:
        feeds[name] = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    for want, got in zip(builders.run_ort(str(tmp_path / "plain.onnx"), feeds), builders.run_ort(str(tmp_path / "fused.onnx"), feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_model_without_norms_is_untouched():
    model = builders.load(builders.mlp_model())
    before = [n.op_type for n in model.graph]
    assert fuse_norms.fuse_norms(model) == {}
    assert [n.op_type for n in model.graph] == before
