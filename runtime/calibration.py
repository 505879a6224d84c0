"""Calibration feeds: the user's samples as a list of ``{input name: numpy array}`` dicts.

Accepted forms: an iterable of dicts (numpy arrays or torch tensors), an ``.npz`` file (one array
per graph input, first axis = samples, or keys ``name__i`` for sample ``i``), or a torch
``DataLoader`` yielding dicts, tuples or tensors in graph-input order. Every feed is checked
against the graph inputs (names, ranks, static dimensions, element types, finite values) and
holds ``np.ndarray``s of the input's rank and type: a 0-d array for a scalar (rank-0) input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError
from hessc.runtime import decoder

Feed = dict[str, np.ndarray]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _from_npz(path: Path, names: list[str], shapes: dict) -> list[Feed]:
    if not path.exists():
        raise InputError(f"{path}: no such calibration file; check the path")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path} is not a readable .npz file ({e}); save it with numpy.savez") from None
    keys = list(data.keys())
    if all(k in keys for k in names):
        arrays = {n: data[n] for n in names}
        ranks = {n: len(shapes[n]) if shapes.get(n) is not None else None for n in names}
        counts = {n: a.shape[0] for n, a in arrays.items() if a.ndim > 0}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
            raise InputError(
                f"{path} holds arrays with different numbers of samples ({listed}); give every input "
                "the same first axis (one entry per sample)"
            )

        def sample(n: str, i: int) -> np.ndarray:
            # Samples run along the first axis: a new axis in front of the input's own dims
            # (rank + 1; ``[i, ...]`` keeps a 0-d array, where ``[i]`` would give a numpy scalar),
            # or the input's batch axis (the same rank). A 0-d array is every sample's scalar.
            array = arrays[n]
            if ranks[n] is not None and array.ndim == ranks[n] + 1:
                return array[i, ...]
            return array if array.ndim == 0 else array[i : i + 1]

        return [{n: sample(n, i) for n in names} for i in range(next(iter(counts.values()), 1))]
    per_sample: dict[int, Feed] = {}
    for key in keys:
        name, _, index = key.rpartition("__")
        if name in names and index.isdigit():
            per_sample.setdefault(int(index), {})[name] = data[key]
    if not per_sample:
        raise InputError(
            f"{path} holds arrays {keys[:6]} but the model's inputs are {names}; "
            "save one array per model input (first axis = samples), named after the input"
        )
    return [per_sample[i] for i in sorted(per_sample)]


def feeds_from(calibration: Any, model: ir.Model, limit: int | None = None) -> list[Feed]:
    """Normalises calibration data into checked feeds for the model's graph inputs."""
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    cache = decoder.find(model)
    if isinstance(calibration, (str, os.PathLike)):
        shapes = {v.name: v.shape for v in model.graph.inputs}
        path = Path(calibration)
        held = _npz_names(path) if cache is not None else set()
        if cache is not None and not set(cache.past_inputs) <= held:
            # token ids (and their mask) alone: the cache is computed below
            names = [n for n in (cache.ids, cache.mask, cache.positions) if n and n in held] or [cache.ids]
        feeds = _from_npz(path, names, shapes)
    else:
        feeds = []
        for item in _iterate(calibration):
            if isinstance(item, dict):
                feed = {k: _to_numpy(v) for k, v in item.items()}
            elif isinstance(item, (tuple, list)):
                feed = {n: _to_numpy(v) for n, v in zip(names, item)}
            else:
                feed = {names[0]: _to_numpy(item)}
            feeds.append(feed)
            if limit is not None and len(feeds) >= limit:
                break
    if not feeds:
        raise InputError("the calibration data is empty; pass at least one sample")
    if cache is not None and not all(n in feed for feed in feeds for n in cache.past_inputs):
        if limit:
            feeds = feeds[: -(-limit // decoder.STEPS_PER_SAMPLE)]
        feeds = decoder.expand(model, cache, feeds)
    for i, feed in enumerate(feeds):
        check_feed(feed, model, f"calibration sample {i}")
    return feeds[:limit] if limit else feeds


def _npz_names(path: Path) -> set[str]:
    """The input names an .npz holds, as one array or per sample (``name__i``)."""
    try:
        keys = set(np.load(path, allow_pickle=False).keys())
    except Exception:
        return set()  # _from_npz reports the unreadable file
    return keys | {k.rpartition("__")[0] for k in keys}


def _iterate(calibration: Any) -> Iterable:
    if isinstance(calibration, dict):
        return [calibration]
    try:
        return iter(calibration)
    except TypeError:
        raise InputError(
            f"calibration of type {type(calibration).__name__} is not supported; pass a list of "
            "input dicts, an .npz file path or a torch DataLoader"
        ) from None


def check_feed(feed: Feed, model: ir.Model, what: str) -> None:
    """Checks a feed against the graph inputs and makes each entry an ``np.ndarray`` of its input.

    Names, ranks and static dimensions must match. A rank-0 input given as a one-element vector
    (a DataLoader collates a scalar into shape ``[1]``) becomes a 0-d array.

    Element types follow one rule: an array of the input's kind is cast when no value changes
    beyond float rounding, anything else is refused. So a float input takes any real float array
    (float16, float64, ...), cast to its type, but a value that overflows that type is refused; an
    integer input takes any integer array whose values all fit its type (int32 or uint8 ids for
    int64, int64 ids below 2³¹ for int32); a bool input takes only bools. A change of kind (int ↔
    float, bool ↔ number, complex) is refused, never guessed. Float values must be finite: a NaN
    or infinity would poison every statistic (and verification then compares NaN to NaN).

    The feed is updated in place with the converted arrays.

    Raises:
        InputError: naming the input, what was given, what the model expects, and the fix.
    """
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    missing = sorted(set(inputs) - set(feed))
    extra = sorted(set(feed) - set(inputs))
    if missing or extra:
        raise InputError(
            f"{what} has inputs {sorted(feed)} but the model expects {sorted(inputs)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra})" if extra else "")
        )
    for name, value in inputs.items():
        array = np.asarray(feed[name])  # a numpy or Python scalar becomes a 0-d array
        if value.shape is not None:
            dims = list(value.shape)
            if not dims and array.shape == (1,):
                array = array.reshape(())
            if len(dims) != array.ndim:
                hint = (
                    "; a scalar input takes one value per sample (a DataLoader stacks scalars into a "
                    "vector: use batch_size=1)" if not dims and array.ndim == 1 else ""
                )
                raise InputError(
                    f"{what}: input {name!r} has shape {list(array.shape)} but the model expects rank "
                    f"{len(dims)} ({_fmt(dims)}){hint}"
                )
            for d, n in zip(dims, array.shape):
                if isinstance(d, int) and d != n:
                    raise InputError(
                        f"{what}: input {name!r} has shape {list(array.shape)} but the model expects {_fmt(dims)}"
                    )
        if value.dtype is not None:
            array = _cast(array, value.dtype, name, what)
        elif _kind(array.dtype) == "float":
            _check_finite(array, name, what)
        feed[name] = array


def _kind(dtype: np.dtype) -> str:
    """``float``, ``int`` or ``bool``; any other type by its name (``complex64``, ``<U3``)."""
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.integer):
        return "int"
    if np.issubdtype(dtype, np.floating):
        return "float"
    try:  # ml_dtypes (bfloat16, float8) are not numpy floating types
        return "float" if ir.DataType.from_numpy(dtype).is_floating_point() else dtype.name
    except (TypeError, ValueError, KeyError):
        return dtype.name


def _cast(array: np.ndarray, dtype: ir.DataType, name: str, what: str) -> np.ndarray:
    """The array in the input's type under :func:`check_feed`'s rule, or an InputError."""
    expected = np.dtype(dtype.numpy())
    kind = _kind(array.dtype)
    if kind != _kind(expected):
        numpy_name = f"np.{expected.name}" if hasattr(np, expected.name) else f"ml_dtypes.{expected.name}"
        raise InputError(
            f"{what}: input {name!r} is {array.dtype} but the model expects {expected}; convert it "
            f"(arr.astype({numpy_name}))"
        )
    if kind == "float":
        _check_finite(array, name, what)
        if array.dtype != expected:
            with np.errstate(over="ignore"):  # an overflow is counted and reported just below
                array = array.astype(expected)
            overflow = int(np.count_nonzero(~np.isfinite(array)))
            if overflow:
                raise InputError(
                    f"{what}: input {name!r} has {overflow} values beyond the range of {expected} (the "
                    "model's input type); rescale or clip them"
                )
        return array
    if kind == "int" and array.dtype != expected and array.size:
        info = np.iinfo(expected)
        lo, hi = int(array.min()), int(array.max())
        if lo < info.min or hi > info.max:
            raise InputError(
                f"{what}: input {name!r} is {array.dtype} with values from {lo} to {hi}, beyond the "
                f"{expected} range the model expects ({info.min} to {info.max}); check the data"
            )
    return array if array.dtype == expected else array.astype(expected)


def _check_finite(array: np.ndarray, name: str, what: str) -> None:
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(f"{what}: input {name!r} has {bad} NaN or infinite values; remove or replace them")


def _fmt(dims) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims) + "]"


def generated_feeds(model: ir.Model, count: int = 2, seed: int = 0) -> list[Feed]:
    """Random feeds for a model without calibration: token ids below the smallest table size.

    A decoder with a KV cache gets a prefill on an empty cache, then a one-token decode step on a
    random one, alternately (:func:`hessc.runtime.decoder.generated`).

    A scalar input is more often a switch or a count than data: a bool scalar (an ``If``
    condition) alternates True, False from feed to feed, so both branches run, and an integer
    scalar (a ``Loop`` trip count) is at least 1, so the body runs.
    """
    rng = np.random.default_rng(seed)
    vocab = _smallest_table(model)
    cache = decoder.find(model)
    skip = set(cache.past_inputs) | {cache.mask, cache.positions} if cache is not None else set()
    feeds = []
    for sample in range(count):
        feed = {}
        for value in model.graph.inputs:
            if value.is_initializer() or value.name in skip:
                continue
            dims = [d if isinstance(d, int) else (1 if i == 0 else 16) for i, d in enumerate(value.shape or [])]
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            scalar = value.shape is not None and not dims
            if np.issubdtype(dtype, np.integer):
                high = 2 if "mask" in (value.name or "").lower() else vocab
                if high == 2 or (scalar and high < 2):
                    array = np.ones(dims, dtype=dtype)
                else:
                    array = rng.integers(1 if scalar else 0, high, size=dims)
            elif dtype == np.bool_:
                array = np.full(dims, sample % 2 == 0 if scalar else True, dtype=bool)
            else:
                array = rng.standard_normal(dims)
            feed[value.name] = np.asarray(array, dtype=dtype)  # a 0-d array for a scalar input
        if cache is not None:  # a prefill, then a one-token decode step on a cache
            feed = decoder.generated(model, cache, feed, rng, decode=sample % 2 == 1)
        feeds.append(feed)
    return feeds


def _smallest_table(model: ir.Model) -> int:
    sizes = [
        node.inputs[0].const_value.shape[0]
        for node in model.graph
        if node.op_type in ("Gather", "GatherBlockQuantized")
        and node.inputs[0] is not None
        and node.inputs[0].const_value is not None
    ]
    return int(min(sizes)) if sizes else 2


def activation_ranges(model: ir.Model, names: Sequence[str], feeds: Sequence[Feed]) -> dict[str, tuple[float, float]]:
    """Min and max of the named values (intermediate values or graph inputs) over the feeds,
    streamed feed by feed through ORT.

    Min/max rather than a clipped range: on a uint8 grid, clipping pays (by mean squared error)
    only for a tail mass below about ``1 / (12 · 255²) ≈ 1.3e-6`` of the values, rarer than one
    value in the 262 k a 64-feed calibration of a small tensor holds.
    """
    from hessc.runtime import sessions

    names = list(dict.fromkeys(names))
    inputs = {v.name for v in model.graph.inputs}
    tapped = [n for n in names if n not in inputs]
    ranges = {n: (np.inf, -np.inf) for n in names}
    taps = sessions.ValueTaps(model) if tapped else None
    try:
        sess = taps.session(tapped) if taps is not None else None
        for feed in feeds:
            arrays = dict(zip(tapped, sess.run(tapped, feed))) if sess is not None else {}
            arrays.update({n: np.asarray(feed[n]) for n in names if n in inputs})
            for name in names:
                array = np.asarray(arrays[name])
                if array.size == 0:
                    continue
                lo, hi = ranges[name]
                ranges[name] = (min(lo, float(np.min(array))), max(hi, float(np.max(array))))
    finally:
        if taps is not None:
            taps.close()
    return {n: (lo, hi) if lo <= hi else (0.0, 0.0) for n, (lo, hi) in ranges.items()}
