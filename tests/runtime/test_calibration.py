"""Tests for hessc.runtime.calibration: every accepted form of calibration data, and its checks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import builders as b
from hessc.errors import InputError
from hessc.runtime import calibration as calib


@pytest.fixture(scope="module")
def two_inputs() -> ir.Model:
    """Inputs ``x`` float [B, 64] (dynamic batch) and ``ids`` int64 [B, 5] (static length)."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["s"], keepdims=0, axes=[1]),
        helper.make_node("Add", ["s", "x"], ["y"]),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 5])
    return b.load(b.make_model(nodes, [b.x_input(64), ids], [b.y_output(64)], {"E": b.weight((100, 64))}, opset=17))


def _samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((2, 64)).astype(np.float32), "ids": rng.integers(0, 100, (2, 5)).astype(np.int64)}
        for _ in range(count)
    ]


def _assert_feeds_equal(feeds, expected) -> None:
    assert len(feeds) == len(expected)
    for got, want in zip(feeds, expected):
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])


# ---------------------------------------------------------------------------------- forms


def test_list_of_dicts(two_inputs) -> None:
    samples = _samples(3)
    _assert_feeds_equal(calib.feeds_from(samples, two_inputs), samples)
    _assert_feeds_equal(calib.feeds_from(samples, two_inputs, limit=2), samples[:2])
    _assert_feeds_equal(calib.feeds_from(samples[0], two_inputs), samples[:1])  # a single dict


def test_list_of_dicts_of_torch_tensors(two_inputs) -> None:
    torch = pytest.importorskip("torch")
    samples = _samples(2)
    as_torch = [{k: torch.from_numpy(v) for k, v in s.items()} for s in samples]
    _assert_feeds_equal(calib.feeds_from(as_torch, two_inputs), samples)


def test_npz_with_one_array_per_input(two_inputs, tmp_path) -> None:
    samples = _samples(1)[0]  # first axis = samples: 2 samples of batch 1
    path = tmp_path / "calib.npz"
    np.savez(path, **samples)
    expected = [{k: v[i : i + 1] for k, v in samples.items()} for i in range(2)]
    _assert_feeds_equal(calib.feeds_from(path, two_inputs), expected)
    _assert_feeds_equal(calib.feeds_from(str(path), two_inputs), expected)


def test_npz_with_one_array_per_sample(two_inputs, tmp_path) -> None:
    samples = _samples(3)
    path = tmp_path / "calib.npz"
    np.savez(path, **{f"{name}__{i}": a for i, s in enumerate(samples) for name, a in s.items()})
    _assert_feeds_equal(calib.feeds_from(path, two_inputs), samples)


@pytest.mark.torch
def test_torch_dataloader_of_dicts_tuples_and_tensors(two_inputs) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    samples = _samples(1)[0]
    x, ids = torch.from_numpy(samples["x"]), torch.from_numpy(samples["ids"])
    expected = [{"x": samples["x"][i : i + 1], "ids": samples["ids"][i : i + 1]} for i in range(2)]

    tuples = DataLoader(TensorDataset(x, ids), batch_size=1)
    _assert_feeds_equal(calib.feeds_from(tuples, two_inputs), expected)

    dicts = DataLoader([{"x": x[i], "ids": ids[i]} for i in range(2)], batch_size=1)
    _assert_feeds_equal(calib.feeds_from(dicts, two_inputs), expected)

    single = b.load(b.matmul_model())
    tensors = DataLoader(x, batch_size=2)
    _assert_feeds_equal(calib.feeds_from(tensors, single), [{"x": samples["x"]}])


# ---------------------------------------------------------------------------------- checks


def test_float64_data_is_cast_to_the_input_type(two_inputs) -> None:
    sample = _samples(1)[0]
    sample["x"] = sample["x"].astype(np.float64)
    (feed,) = calib.feeds_from([sample], two_inputs)
    assert feed["x"].dtype == np.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("ids"), r"calibration sample 0 has inputs \['x'\] .*\(missing \['ids'\]\)"),
        (lambda s: s.update(input_ids=s.pop("ids")), r"\(missing \['ids'\]\) \(unknown \['input_ids'\]\)"),
        (lambda s: s.update(x=s["x"][0]), r"input 'x' has shape \[64\] but the model expects rank 2 \(\[B, 64\]\)"),
        (lambda s: s.update(ids=s["ids"][:, :4]), r"input 'ids' has shape \[2, 4\] but the model expects \[B, 5\]"),
        (lambda s: s.update(ids=s["ids"].astype(np.float32)), r"input 'ids' is float32 but the model expects int64"),
        (lambda s: s.update(x=s["x"].astype(np.complex64)), r"input 'x' is complex64 but the model expects float32"),
    ],
    ids=["missing", "renamed", "rank", "static-dim", "dtype", "complex"],
)
def test_mismatched_feed_is_an_input_error_naming_the_input(two_inputs, change, message) -> None:
    samples = _samples(2)
    change(samples[1])
    with pytest.raises(InputError, match=message.replace("sample 0", "sample 1")):
        calib.feeds_from(samples, two_inputs)


def test_npz_with_unknown_names_is_an_input_error(two_inputs, tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=np.zeros((2, 5), np.int64))
    with pytest.raises(InputError, match=r"holds arrays \['input_ids'\] but the model's inputs are \['x', 'ids'\]"):
        calib.feeds_from(path, two_inputs)


def test_missing_or_unreadable_npz_is_an_input_error(two_inputs, tmp_path) -> None:
    with pytest.raises(InputError, match="no such calibration file"):
        calib.feeds_from(tmp_path / "absent.npz", two_inputs)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="not a readable .npz file"):
        calib.feeds_from(bad, two_inputs)


@pytest.mark.parametrize("empty", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_data_is_an_input_error(two_inputs, empty) -> None:
    with pytest.raises(InputError, match="the calibration data is empty"):
        calib.feeds_from(empty, two_inputs)


def test_empty_npz_and_dataloader_are_input_errors(two_inputs, tmp_path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 64), np.float32), ids=np.zeros((0, 5), np.int64))
    with pytest.raises(InputError, match="the calibration data is empty"):
        calib.feeds_from(path, two_inputs)
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    with pytest.raises(InputError, match="the calibration data is empty"):
        calib.feeds_from(DataLoader(torch.zeros(0, 64)), two_inputs)


def test_unsupported_type_is_an_input_error(two_inputs) -> None:
    with pytest.raises(InputError, match="calibration of type int is not supported"):
        calib.feeds_from(3, two_inputs)


def test_generated_feeds_fit_the_model(two_inputs) -> None:
    feeds = calib.generated_feeds(two_inputs, count=2, seed=0)
    assert len(feeds) == 2
    for feed in feeds:
        calib.check_feed(feed, two_inputs, "generated")
        assert feed["ids"].max() < 100 and feed["ids"].min() >= 0
    again = calib.generated_feeds(two_inputs, count=2, seed=0)
    _assert_feeds_equal(again, feeds)


def test_npz_samples_of_a_static_shape_input(tmp_path) -> None:
    node = helper.make_node("Identity", ["ids"], ["y"])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])
    model = b.load(b.make_model([node], [ids], [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 5])]))
    stacked = np.arange(30, dtype=np.int64).reshape(3, 2, 5)
    path = tmp_path / "calib.npz"
    np.savez(path, ids=stacked)
    _assert_feeds_equal(calib.feeds_from(path, model), [{"ids": s} for s in stacked])
