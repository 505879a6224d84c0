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
        (
            lambda s: s.update(ids=s["ids"].astype(np.float32)),
            r"input 'ids' is float32 but the model expects int64; convert it \(arr.astype\(np.int64\)\)",
        ),
        (
            lambda s: s.update(x=s["x"].astype(np.int64)),
            r"input 'x' is int64 but the model expects float32; convert it \(arr.astype\(np.float32\)\)",
        ),
        (lambda s: s.update(x=s["x"] > 0), r"input 'x' is bool but the model expects float32"),
        (lambda s: s.update(ids=s["ids"] > 0), r"input 'ids' is bool but the model expects int64"),
        (lambda s: s.update(x=s["x"].astype(np.complex64)), r"input 'x' is complex64 but the model expects float32"),
    ],
    ids=["missing", "renamed", "rank", "static-dim", "float-for-int", "int-for-float", "bool-for-float",
         "bool-for-int", "complex"],
)
def test_mismatched_feed_is_an_input_error_naming_the_input(two_inputs, change, message) -> None:
    samples = _samples(2)
    change(samples[1])
    with pytest.raises(InputError, match=message.replace("sample 0", "sample 1")):
        calib.feeds_from(samples, two_inputs)


@pytest.mark.parametrize(
    "given, expected",
    [
        (np.float16, np.float32),
        (np.float64, np.float32),
        (np.int32, np.int64),
        (np.uint8, np.int64),
    ],
    ids=["float16", "float64", "int32", "uint8"],
)
def test_a_cast_within_the_kind_is_applied(given, expected) -> None:
    kind = "x" if np.issubdtype(expected, np.floating) else "ids"
    model = _identity({"x": TensorProto.FLOAT, "ids": TensorProto.INT64}[kind], kind)
    array = np.arange(6).reshape(2, 3).astype(given)
    (feed,) = calib.feeds_from([{kind: array}], model)
    assert feed[kind].dtype == expected
    np.testing.assert_array_equal(feed[kind], array)


def _identity(elem_type: int, name: str, shape=("B", 3)) -> ir.Model:
    """``y = Identity(name)`` with one input of the element type and shape."""
    node = helper.make_node("Identity", [name], ["y"])
    value = helper.make_tensor_value_info(name, elem_type, list(shape))
    return b.load(b.make_model([node], [value], [helper.make_tensor_value_info("y", elem_type, list(shape))]))


def test_integers_that_do_not_fit_the_input_type_are_refused() -> None:
    model = _identity(TensorProto.INT32, "ids")
    (feed,) = calib.feeds_from([{"ids": np.array([[1, 2, 3]], np.int64)}], model)
    assert feed["ids"].dtype == np.int32
    too_big = np.array([[1, 2, 2**40]], np.int64)
    message = r"calibration sample 0: input 'ids' is int64 with values from 1 to 1099511627776, beyond the int32"
    with pytest.raises(InputError, match=message):
        calib.feeds_from([{"ids": too_big}], model)
    with pytest.raises(InputError, match=r"input 'ids' is uint64 with values from 1 to 9223372036854775808, beyond"):
        calib.feeds_from([{"ids": np.array([[1, 2, 2**63]], np.uint64)}], model)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_calibration_values_are_refused(two_inputs, bad) -> None:
    samples = _samples(3)
    samples[2]["x"][0, :3] = bad
    with pytest.raises(
        InputError, match=r"calibration sample 2: input 'x' has 3 NaN or infinite values; remove or replace them"
    ):
        calib.feeds_from(samples, two_inputs)


def test_non_finite_values_in_an_npz_are_refused(two_inputs, tmp_path) -> None:
    sample = _samples(1)[0]
    sample["x"][1, 5] = np.nan
    path = tmp_path / "calib.npz"
    np.savez(path, **sample)
    with pytest.raises(InputError, match=r"calibration sample 1: input 'x' has 1 NaN or infinite values"):
        calib.feeds_from(path, two_inputs)


def test_float64_values_beyond_float32_are_refused(two_inputs) -> None:
    sample = _samples(1)[0]
    sample["x"] = sample["x"].astype(np.float64)
    sample["x"][0, 0] = 1e300
    message = r"input 'x' has 1 values beyond the range of float32 \(the model's input type\); rescale or clip them"
    with pytest.raises(InputError, match=message):
        calib.feeds_from([sample], two_inputs)


# ---------------------------------------------------------------------------------- scalar inputs


@pytest.fixture(scope="module")
def with_scalar() -> ir.Model:
    """``y = x * float(sr)``: ``x`` float [B, 4] and the scalar ``sr`` int64 [] (a sample rate)."""
    nodes = [helper.make_node("Cast", ["sr"], ["s"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "s"], ["y"])]
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    return b.load(b.make_model(nodes, [b.x_input(4), sr], [b.y_output(4)]))


def _assert_scalar_feeds_run(feeds, model, rates) -> None:
    """Every feed holds arrays (a 0-d int64 array for ``sr``) that ONNX Runtime runs."""
    assert [int(f["sr"]) for f in feeds] == list(rates)
    for feed in feeds:
        assert all(type(a) is np.ndarray for a in feed.values()), {k: type(a) for k, a in feed.items()}
        assert feed["sr"].shape == () and feed["sr"].dtype == np.int64
        (y,) = b.run_ort(model, feed)
        np.testing.assert_allclose(y, feed["x"] * float(feed["sr"]), rtol=1e-6)


def test_scalar_input_from_npz_with_a_sample_axis(with_scalar, tmp_path) -> None:
    path = tmp_path / "calib.npz"
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.savez(path, x=x, sr=np.array([8000, 16000, 22050], np.int64))
    _assert_scalar_feeds_run(calib.feeds_from(path, with_scalar), with_scalar, [8000, 16000, 22050])


def test_npz_scalar_without_a_sample_axis_is_the_same_for_every_sample(with_scalar, tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.ones((2, 4), np.float32), sr=np.int64(16000))
    _assert_scalar_feeds_run(calib.feeds_from(path, with_scalar), with_scalar, [16000, 16000])


def test_npz_arrays_with_different_sample_counts_are_an_input_error(with_scalar, tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.ones((3, 4), np.float32), sr=np.array([8000, 16000], np.int64))
    with pytest.raises(InputError, match=r"different numbers of samples \(x: 3, sr: 2\)"):
        calib.feeds_from(path, with_scalar)


def test_scalar_input_from_npz_with_one_array_per_sample(with_scalar, tmp_path) -> None:
    path = tmp_path / "calib.npz"
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    np.savez(path, x__0=x, sr__0=np.int64(16000), x__1=x, sr__1=np.array(8000))
    _assert_scalar_feeds_run(calib.feeds_from(path, with_scalar), with_scalar, [16000, 8000])


def test_scalar_input_from_numpy_and_python_scalars(with_scalar) -> None:
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    samples = [{"x": x, "sr": np.int64(16000)}, {"x": x, "sr": 8000}, {"x": x, "sr": np.array(22050, np.int32)}]
    _assert_scalar_feeds_run(calib.feeds_from(samples, with_scalar), with_scalar, [16000, 8000, 22050])


@pytest.mark.torch
def test_scalar_input_from_a_torch_dataloader(with_scalar) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(3, 4)
    sr = torch.tensor([8000, 16000, 22050])
    rates = [8000, 16000, 22050]
    tuples = DataLoader(TensorDataset(x, sr), batch_size=1)  # collates each scalar into shape [1]
    _assert_scalar_feeds_run(calib.feeds_from(tuples, with_scalar), with_scalar, rates)
    dicts = DataLoader([{"x": x[i], "sr": sr[i]} for i in range(3)], batch_size=1)
    _assert_scalar_feeds_run(calib.feeds_from(dicts, with_scalar), with_scalar, rates)
    _assert_scalar_feeds_run(
        calib.feeds_from([{"x": x[i : i + 1], "sr": sr[i]} for i in range(3)], with_scalar), with_scalar, rates
    )
    batched = DataLoader(TensorDataset(x, sr), batch_size=3)
    with pytest.raises(InputError, match=r"input 'sr' has shape \[3\] but the model expects rank 0.*batch_size=1"):
        calib.feeds_from(batched, with_scalar)


def test_generated_feeds_of_a_scalar_input_are_0d_arrays(with_scalar) -> None:
    feeds = calib.generated_feeds(with_scalar, count=2)
    for feed in feeds:
        assert all(type(a) is np.ndarray for a in feed.values())
        assert feed["sr"].shape == () and feed["sr"].dtype == np.int64
        b.run_ort(with_scalar, feed)
    untyped = _identity(TensorProto.FLOAT, "x", shape=())
    (feed,) = calib.generated_feeds(untyped, count=1)
    assert type(feed["x"]) is np.ndarray and feed["x"].shape == () and feed["x"].dtype == np.float32


def _switch_model() -> ir.Model:
    """``y = cond ? x : −x`` with ``cond`` bool [], ``mask`` bool [B, 4] and ``k`` int64 [] beside
    the token ids ``ids`` [B, 5] of a table of 100 rows (``y2 = E[ids] · k``, masked)."""
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", 4])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Gather", ["E", "ids"], ["g"]),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["g", "kf"], ["gk"]),
        helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mf"], ["y2"], keepdims=0),
    ]
    inputs = [b.x_input(4), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 4]),
              helper.make_tensor_value_info("k", TensorProto.INT64, []),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 5])]
    outputs = [b.y_output(4), helper.make_tensor_value_info("gk", TensorProto.FLOAT, ["B", 5, 8]),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [])]
    return b.load(b.make_model(nodes, inputs, outputs, {"E": b.weight((100, 8))}))


def test_generated_scalar_switches_take_both_branches_and_counts_are_positive() -> None:
    """Without calibration, a bool scalar (an ``If`` condition) alternates so that both branches
    run, and an integer scalar (a trip count, a scale) is at least 1; tensors keep their fill."""
    model = _switch_model()
    feeds = calib.generated_feeds(model, count=4, seed=0)
    assert [bool(f["cond"]) for f in feeds] == [True, False, True, False]
    for feed in feeds:
        calib.check_feed(feed, model, "generated")
        assert feed["cond"].shape == () and feed["k"].shape == () and feed["mask"].all()
        assert 0 <= feed["ids"].min() and feed["ids"].max() < 100
        y, _, _ = b.run_ort(model, feed)
        np.testing.assert_array_equal(y, feed["x"] if feed["cond"] else -feed["x"])
    ks = [int(f["k"]) for seed in range(20) for f in calib.generated_feeds(model, count=2, seed=seed)]
    assert min(ks) >= 1 and max(ks) < 100 and len(set(ks)) > 1


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
