"""fuse-attention: a torch-exported decoder's attention over its KV cache becomes one
GroupQueryAttention per layer, with the same outputs in ONNX Runtime, and only where the mask is
the plain causal mask."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

import builders
import hessc
from hessc.ir import frontend, meta
from hessc.runtime import decoder, fuse_attention


@pytest.fixture(scope="module")
def exported(tiny_llama):
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    return frontend.load(lm, (torch.ones((1, 5), dtype=torch.int64),), kv_cache=True)


def _feeds(cache, past: int, new: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {cache.ids: rng.integers(3, 250, size=(1, new)).astype(np.int64),
             cache.mask: np.ones((1, past + new), np.int64)}
    for name, _ in cache.pairs:
        shape = [1 if d == -1 else d for d in cache.shapes[name]]
        shape[cache.seq_axis] = past
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _same_outputs(plain: ir.Model, fused: ir.Model, tmp_path, steps) -> None:
    cache = decoder.find(plain)
    hessc.save(plain, tmp_path / "plain.onnx")
    hessc.save(fused, tmp_path / "fused.onnx")
    for past, new in steps:
        feeds = _feeds(cache, past, new)
        want = builders.run_ort(str(tmp_path / "plain.onnx"), feeds)
        got = builders.run_ort(str(tmp_path / "fused.onnx"), feeds)
        for w, g in zip(want, got):  # logits, then every present key and value
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_cached_attention_becomes_group_query_attention_with_the_same_outputs(exported, tmp_path):
    fused = frontend.clone(exported)
    assert fuse_attention.fuse_attention(fused).record() == {"GroupQueryAttention": 2, "rotary_in_kernel": 2}
    ops = collections.Counter(n.op_type for n in fused.graph)
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0
    # the rotary embedding is the kernel's: no angles are computed in the graph, and nothing but
    # the attention reads the cache, so it may live in one preallocated buffer
    assert ops["Cos"] == ops["Sin"] == 0
    # the kernel reads the projections and feeds the output projection in their own [B, S, H·D]
    # layout: the exporter's head split and merge are gone
    assert ops["Transpose"] == ops["Reshape"] == 0
    assert all(n.attributes["do_rotary"].value == 1 for n in fused.graph if n.op_type == "GroupQueryAttention")
    assert fuse_attention.cache_in_place(fused) and not fuse_attention.cache_in_place(exported)
    assert [v.name for v in fused.graph.outputs] == [v.name for v in exported.graph.outputs]
    _same_outputs(exported, fused, tmp_path, ((0, 5), (6, 1), (6, 3), (200, 2)))


def test_a_cache_read_for_its_batch_size_runs_in_place_one_read_for_its_length_does_not(exported):
    fused = frontend.clone(exported)
    fuse_attention.fuse_attention(fused)
    past = next(v for v in fused.graph.inputs if v.name == decoder.find(fused).pairs[0][0])
    batch = ir.node("Shape", [past], attributes={"start": 0, "end": 1}, name="batch_of_cache")
    fused.graph.append(batch)
    assert fuse_attention.cache_in_place(fused)
    length = ir.node("Shape", [past], attributes={"start": 2, "end": 3}, name="length_of_cache")
    fused.graph.append(length)
    assert not fuse_attention.cache_in_place(fused)


def test_without_a_context_length_the_rotary_embedding_stays_in_the_graph(exported, tmp_path):
    model = frontend.clone(exported)
    model.meta[meta.DECODER_CONFIG_KEY] = {**model.meta[meta.DECODER_CONFIG_KEY], "context_length": None}
    fused = fuse_attention.fuse_attention(model)
    assert (fused.attentions, fused.rotary) == (2, 0) and "context length" in fused.rotary_skipped
    assert all(n.attributes["do_rotary"].value == 0 for n in model.graph if n.op_type == "GroupQueryAttention")
    assert not fuse_attention.cache_in_place(model)  # the angles are counted from the cache's length
    _same_outputs(exported, model, tmp_path, ((0, 5), (6, 1)))


def test_a_mask_that_is_not_causal_is_left_unfused(exported):
    # Found by onnxscript's SDPA rule on a copy: the value the attention adds to its scores.
    probe = frontend.clone(exported)
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    fuse_sdpa(probe, apply_shape_inference=True)
    mask_name = next(n.inputs[3].name for n in probe.graph if n.op_type == "SDPA")
    model = frontend.clone(exported)
    mask = next(v for n in model.graph for v in n.outputs if v.name == mask_name)
    zero = ir.val("zero", const_value=ir.tensor(np.zeros((), mask.dtype.numpy())))
    model.graph.initializers.add(zero)
    uses = list(mask.uses())
    seen_everywhere = ir.node("Mul", [mask, zero], name="bidirectional")
    model.graph.insert_after(mask.producer(), seen_everywhere)
    for use in uses:
        use.node.replace_input_with(use.idx, seen_everywhere.outputs[0])
    fused = fuse_attention.fuse_attention(model)
    assert fused.attentions == 0 and "is not causal" in fused.skipped
    assert not any(n.op_type in ("GroupQueryAttention", "SDPA") for n in model.graph)


def test_the_pass_runs_for_the_cpu_and_cuda_targets_only():
    from hessc.options import CompileOptions
    from hessc.passes import pipeline
    from hessc.runtime import targets

    for target, fused in (("cpu", True), ("cuda", True), ("onnx", False)):
        names = pipeline.default_names(CompileOptions(target=target), targets.get(target))
        assert ("fuse-attention" in names) is fused
        if fused:
            assert names.index("fuse-attention") == names.index(f"lower-{target}") - 2


def test_a_compiled_decoder_runs_group_query_attention_and_passes_verification(exported):
    calibration = [{"input_ids": np.random.default_rng(i).integers(3, 250, size=(1, 16))} for i in range(2)]
    compiled = hessc.optimize(frontend.clone(exported), target="cpu", bits=4, calibration=calibration, tune=False)
    attentions = [n for n in compiled.graph if n.op_type == "GroupQueryAttention"]
    assert len(attentions) == 2
    # fuse-siblings ran Q, K and V as one MatMulNBits, which the kernel reads packed (no Split)
    assert all(n.inputs[0].producer().op_type == "MatMulNBits" and n.inputs[1] is None for n in attentions)
    assert compiled.meta[fuse_attention.FUSION_KEY] == {"GroupQueryAttention": 2, "rotary_in_kernel": 2}
    assert meta.read_plan(compiled)["verification"]["status"] == "passed"
    unfused = hessc.optimize(frontend.clone(exported), target="cpu", bits=4, calibration=calibration, tune=False,
                             disable_passes=["fuse-attention"])
    assert not any(n.op_type == "GroupQueryAttention" for n in unfused.graph)


def test_a_sliding_window_becomes_the_kernels_local_window(tmp_path):
    """Mistral's sliding window (8 keys here) is read off its mask and kept by the kernel: the
    fused decoder matches the exported one with the cache well past the window."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    exported = frontend.load(transformers.MistralForCausalLM(config).eval(), kv_cache=True)
    fused = frontend.clone(exported)
    assert fuse_attention.fuse_attention(fused).record() == {
        "GroupQueryAttention": 2, "rotary_in_kernel": 2, "sliding_windows": [8]}
    _same_outputs(exported, fused, tmp_path, ((0, 12), (20, 1), (20, 3), (62, 1)))


def test_a_model_without_cache_is_not_touched():
    model = builders.load(builders.mlp_model())
    before = [n.op_type for n in model.graph]
    assert fuse_attention.fuse_attention(model).record() == {"skipped": "no KV cache"}
    assert [n.op_type for n in model.graph] == before


def test_a_decoder_whose_attention_is_fused_already_is_not_touched(tiny_decoder):
    model = frontend.load(tiny_decoder / "model.onnx")
    assert fuse_attention.fuse_attention(model).skipped == "the attention is already fused (GroupQueryAttention)"
