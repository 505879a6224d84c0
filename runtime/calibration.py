"""Calibration feeds: the user's samples as a list of ``{input name: numpy array}`` dicts.

Accepted forms: an iterable of dicts (numpy arrays or torch tensors), an ``.npz`` file (one array
per graph input, first axis = samples, or keys ``name__i`` for sample ``i``), or a torch
``DataLoader`` yielding dicts, tuples or tensors in graph-input order. Every feed is checked
against the graph inputs (names, ranks, static dimensions, element types).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError

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
        # Samples run along the first axis: a new axis in front of the input's own dims (rank + 1),
        # or the input's batch axis (the same rank), sliced one sample at a time.
        count = data[names[0]].shape[0]
        ranks = {n: len(shapes[n]) if shapes.get(n) is not None else None for n in names}

        def sample(n: str, i: int) -> np.ndarray:
            array = data[n]
            return array[i] if ranks[n] is not None and array.ndim == ranks[n] + 1 else array[i : i + 1]

        return [{n: sample(n, i) for n in names} for i in range(count)]
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
    if isinstance(calibration, (str, os.PathLike)):
        shapes = {v.name: v.shape for v in model.graph.inputs}
        feeds = _from_npz(Path(calibration), names, shapes)
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
    for i, feed in enumerate(feeds):
        check_feed(feed, model, f"calibration sample {i}")
    return feeds[:limit] if limit else feeds


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
    """Raises when a feed's names, ranks, static dims or types do not match the graph inputs."""
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
        array = feed[name]
        if value.shape is not None:
            dims = list(value.shape)
            if len(dims) != array.ndim:
                raise InputError(
                    f"{what}: input {name!r} has shape {list(array.shape)} but the model expects rank "
                    f"{len(dims)} ({_fmt(dims)})"
                )
            for d, n in zip(dims, array.shape):
                if isinstance(d, int) and d != n:
                    raise InputError(
                        f"{what}: input {name!r} has shape {list(array.shape)} but the model expects {_fmt(dims)}"
                    )
        if value.dtype is not None:
            expected = value.dtype.numpy()
            if array.dtype != expected:
                if np.can_cast(array.dtype, expected, casting="same_kind"):
                    feed[name] = array.astype(expected)
                else:
                    raise InputError(
                        f"{what}: input {name!r} is {array.dtype} but the model expects {np.dtype(expected)}"
                    )


def _fmt(dims) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims) + "]"


def generated_feeds(model: ir.Model, count: int = 2, seed: int = 0) -> list[Feed]:
    """Random feeds for a model without calibration: token ids below the smallest table size."""
    rng = np.random.default_rng(seed)
    vocab = _smallest_table(model)
    feeds = []
    for _ in range(count):
        feed = {}
        for value in model.graph.inputs:
            if value.is_initializer():
                continue
            dims = [d if isinstance(d, int) else (1 if i == 0 else 16) for i, d in enumerate(value.shape or [])]
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            if np.issubdtype(dtype, np.integer):
                high = 2 if "mask" in (value.name or "").lower() else vocab
                feed[value.name] = (
                    np.ones(dims, dtype=dtype) if high == 2 else rng.integers(0, high, size=dims).astype(dtype)
                )
            elif dtype == np.bool_:
                feed[value.name] = np.ones(dims, dtype=bool)
            else:
                feed[value.name] = rng.standard_normal(dims).astype(dtype)
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
    """Min and max of the named values over the feeds, streamed feed by feed through ORT."""
    from hessc.runtime import sessions

    names = list(dict.fromkeys(names))
    taps = sessions.ValueTaps(model)
    try:
        sess = taps.session(names)
        ranges = {n: (np.inf, -np.inf) for n in names}
        for feed in feeds:
            for name, array in zip(names, sess.run(names, feed)):
                lo, hi = ranges[name]
                ranges[name] = (min(lo, float(np.min(array))), max(hi, float(np.max(array))))
    finally:
        taps.close()
    return ranges
