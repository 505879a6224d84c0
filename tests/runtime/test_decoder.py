"""Decoders with a KV cache: the cache found in the graph, and calibration over prefill and
continuation steps on the real cache (an onnxruntime-genai decoder, built by its builder)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import builders
from hessc.errors import InputError
from hessc.ir import frontend
from hessc.runtime import calibration as calib
from hessc.runtime import decoder


@pytest.fixture
def model(tiny_decoder) -> ir.Model:
    return frontend.load(tiny_decoder / "model.onnx")


def test_find_pairs_every_past_with_its_present(model):
    cache = decoder.find(model)
    assert cache is not None
    assert cache.ids == "input_ids" and cache.mask == "attention_mask" and cache.positions is None
    assert len(cache.pairs) == 4  # 2 layers x key, value
    assert ("past_key_values.1.value", "present.1.value") in cache.pairs
    assert cache.seq_axis == 2
    # the builder leaves the head size symbolic (kv_cache_dim): read from GroupQueryAttention
    assert cache.shapes["past_key_values.0.key"] == (-1, 2, -1, 16)


def test_a_model_without_a_cache_has_none():
    assert decoder.find(builders.load(builders.matmul_model())) is None


def test_unpaired_cache_names_are_refused(model):
    model.graph.outputs[1].name = "present_other"
    with pytest.raises(InputError, match="do not pair up"):
        decoder.find(model)


def test_continuation_on_the_real_cache_reproduces_the_whole_sequence(model, tiny_decoder):
    """The continuation step reads the cache the float model computed for the prefill: its logits
    are those of one pass over all the tokens."""
    ids = np.random.default_rng(0).integers(3, 250, size=(1, 12)).astype(np.int64)
    feeds = calib.feeds_from([{"input_ids": ids}], model)
    assert len(feeds) == decoder.STEPS_PER_SAMPLE
    prefill, continuation = feeds
    assert prefill["input_ids"].shape == (1, 6) and prefill["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert continuation["input_ids"].shape == (1, 6) and continuation["past_key_values.0.key"].shape == (1, 2, 6, 16)
    assert continuation["attention_mask"].shape == (1, 12)
    whole = calib.feeds_from([{"input_ids": ids}], model)  # the same split, run again: deterministic
    np.testing.assert_array_equal(whole[1]["past_key_values.1.value"], continuation["past_key_values.1.value"])
    full = {"input_ids": ids, "attention_mask": np.ones((1, 12), np.int64),
            **decoder.find(model).empty_past(1, {n: np.dtype(np.float32) for n in decoder.find(model).past_inputs})}
    (ref,) = builders.run_ort(str(tiny_decoder / "model.onnx"), full)[:1]
    (got,) = builders.run_ort(str(tiny_decoder / "model.onnx"), continuation)[:1]
    np.testing.assert_allclose(got, ref[:, 6:], atol=1e-4)


def test_batched_samples_become_one_sequence_each(model):
    ids = np.random.default_rng(1).integers(3, 250, size=(3, 8)).astype(np.int64)
    feeds = calib.feeds_from([{"input_ids": ids}], model)
    assert len(feeds) == 3 * decoder.STEPS_PER_SAMPLE
    assert all(f["input_ids"].shape[0] == 1 for f in feeds)


def test_token_ids_from_an_npz(model, tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=np.random.default_rng(2).integers(3, 250, size=(4, 1, 10)))
    feeds = calib.feeds_from(str(path), model, limit=6)
    assert len(feeds) == 6  # 3 samples x (prefill, continuation)
    assert feeds[1]["past_key_values.0.key"].shape == (1, 2, 5, 16)


def test_samples_with_other_inputs_but_no_cache_are_refused(model):
    with pytest.raises(InputError, match="cache inputs"):
        calib.feeds_from([{"input_ids": np.ones((1, 4), np.int64), "past_key_values.0.key": np.zeros((1, 2, 0, 16), np.float32)}], model)


def test_generated_feeds_are_a_prefill_and_a_decode_step(model, tiny_decoder):
    prefill, decode = calib.generated_feeds(model, count=2)
    assert prefill["past_key_values.0.key"].shape[2] == 0
    assert decode["input_ids"].shape == (1, 1)
    assert decode["past_key_values.0.key"].shape == (1, 2, decoder.DECODE_CACHE, 16)
    assert decode["attention_mask"].shape == (1, decoder.DECODE_CACHE + 1)
    for feed in (prefill, decode):  # both run in ORT as they are
        builders.run_ort(str(tiny_decoder / "model.onnx"), feed)
