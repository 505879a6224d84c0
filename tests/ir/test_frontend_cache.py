"""The torch front door exports a transformers decoder with its KV cache (``kv_cache=True``), and
hessc compiles it over prefill and continuation steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import builders
import hessc
from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.runtime import decoder


@pytest.fixture(scope="module")
def lm(tiny_llama):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()


def test_export_with_cache_runs_prefill_and_continuation_like_torch(lm, tmp_path):
    model = frontend.load(lm, (torch.ones((1, 5), dtype=torch.int64),), kv_cache=True)
    cache = decoder.find(model)
    assert cache is not None and len(cache.pairs) == 4 and cache.seq_axis == 2
    assert cache.shapes["past_key_values.1.value"] == (-1, 2, -1, 16)
    ids = np.random.default_rng(0).integers(3, 250, size=(1, 10)).astype(np.int64)
    prefill, continuation = decoder.expand(model, cache, [{"input_ids": ids}])
    path = tmp_path / "decoder.onnx"
    hessc.save(model, path)
    (got,) = builders.run_ort(str(path), continuation)[:1]
    with torch.no_grad():
        ref = lm(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, ref[:, 5:], atol=1e-4)


def test_optimize_a_decoder_with_its_cache(lm):
    calibration = [{"input_ids": np.random.default_rng(i).integers(3, 250, size=(1, 16))} for i in range(4)]
    out = hessc.optimize(lm, example_inputs=(torch.ones((1, 8), dtype=torch.int64),), kv_cache=True, bits=4,
                         calibration=calibration)
    record = meta.read_plan(out)
    assert record["verification"]["status"] == "passed"
    assert record["verification"]["vs_float"]["samples"] == 4 * decoder.STEPS_PER_SAMPLE
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in out.graph}


def _generates_as_torch_does(folder, lm, prompt=(1, 40, 41, 42, 43), new: int = 12) -> None:
    """onnxruntime-genai's greedy tokens from ``folder`` are transformers' own from ``lm``."""
    with torch.no_grad():
        ref = lm.generate(torch.tensor([list(prompt)]), max_new_tokens=new, do_sample=False, min_new_tokens=new)
    assert builders.genai_greedy(folder, list(prompt), new) == ref[0].tolist()[len(prompt):]


def test_kv_cache_needs_a_transformers_decoder():
    with pytest.raises(InputError, match="transformers causal LM"):
        frontend.load(torch.nn.Linear(4, 4), (torch.ones((1, 4)),), kv_cache=True)


def test_saved_to_a_folder_it_generates_in_onnxruntime_genai_as_torch_does(lm, tiny_llama, tmp_path):
    """The exported decoder (kept in float: insert-qdq off) saved to a folder is a genai folder
    whose greedy tokens are transformers' own."""
    import json

    out = hessc.optimize(lm, example_inputs=(torch.ones((1, 8), dtype=torch.int64),), kv_cache=True,
                         disable_passes=["insert-qdq"])
    folder = tmp_path / "genai"
    assert hessc.save(out, folder) == folder / "model.onnx"
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    # the rotary embedding runs in GroupQueryAttention, so genai keeps the cache in one buffer
    assert config["search"]["past_present_share_buffer"] is True
    assert (folder / "tokenizer.json").is_file()
    _generates_as_torch_does(folder, lm)


def test_a_decoder_exports_with_its_cache_without_example_inputs(lm):
    """Token ids set only ranks and types (every dim is dynamic): no example is needed."""
    cache = decoder.find(frontend.load(lm, kv_cache=True))
    assert cache is not None and len(cache.pairs) == 4 and cache.mask == "attention_mask"


def test_a_family_genai_has_no_name_for_generates_there_as_torch_does(tmp_path):
    """OPT (LayerNorm, learned positions, no rotary; onnxruntime-genai knows no ``opt`` type) is
    written as genai's generic decoder and generates transformers' own greedy tokens."""
    import json

    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    lm = transformers.OPTForCausalLM(config).eval()
    folder = tmp_path / "opt"
    hessc.save(hessc.optimize(lm, kv_cache=True, disable_passes=["insert-qdq"]), folder)
    _generates_as_torch_does(folder, lm)
    # OPT's learned positions are cut at the cache input's length: a shared buffer would shift them
    assert json.loads((folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
