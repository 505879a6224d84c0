"""The disk cache of the statistics, under a key of (model content, calibration, settings).

Each entry is ``<model digest>/<key>.npz`` (every array, an array shared by layers once) and
``.json`` (the index), both written atomically; an entry of another key or version, or a damaged
one, is recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from hessc.ir import meta
from hessc.passes.hessian.config import HessianConfig, default_cache_dir

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
# Settings that change how statistics are computed but not their values.
_NOT_KEYED = ("cache", "max_activation_bytes", "threads")


def _update_tensor(h: Any, tensor: ir.TensorProtocol) -> None:
    h.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    try:
        array = np.ascontiguousarray(tensor.numpy())
        h.update(array.reshape(-1).view(np.uint8).data)
    except Exception:  # noqa: BLE001 - a tensor numpy cannot view: hash its serialized bytes
        h.update(tensor.tobytes())


def _hash_attr(h: Any, attr: ir.Attr) -> None:
    h.update(f"@{attr.name}:{attr.type}".encode())
    if attr.type == ir.AttributeType.TENSOR:
        _update_tensor(h, attr.value)
    elif attr.type == ir.AttributeType.TENSORS:
        for t in attr.value:
            _update_tensor(h, t)
    elif attr.type == ir.AttributeType.GRAPH:
        _hash_graph(h, attr.value)
    elif attr.type == ir.AttributeType.GRAPHS:
        for g in attr.value:
            _hash_graph(h, g)
    else:
        h.update(repr(attr.value).encode())


def _hash_graph(h: Any, graph: ir.Graph) -> None:
    for kind, values in (("in", graph.inputs), ("out", graph.outputs)):
        for v in values:
            h.update(f"{kind}:{v.name}:{v.dtype}:{v.shape}".encode())
    for node in graph:
        names = [v.name if v is not None else "" for v in node.inputs]
        outs = [v.name for v in node.outputs]
        h.update(f"node:{node.domain}:{node.op_type}:{node.overload}:{names}:{outs}".encode())
        for attr in sorted(node.attributes.values(), key=lambda a: a.name):
            _hash_attr(h, attr)
    for name in sorted(graph.initializers):
        value = graph.initializers[name]
        h.update(f"init:{name}".encode())
        if value.const_value is not None:
            _update_tensor(h, value.const_value)


def model_digest(model: ir.Model) -> str:
    """sha256 of the model's content: graph structure, opsets and every weight's bytes.

    External weights are hashed through their memory map, tensor by tensor, without a copy.
    """
    h = hashlib.sha256(b"hessc-model-v1")
    h.update(repr(sorted(model.opset_imports.items())).encode())
    _hash_graph(h, model.graph)
    for fn in model.functions.values():
        h.update(f"function:{fn.domain}:{fn.name}:{fn.overload}".encode())
        _hash_graph(h, fn.graph)
    return h.hexdigest()


def calibration_digest(feeds: Sequence[Mapping[str, np.ndarray]], labels: Sequence[np.ndarray] | None = None) -> str:
    """sha256 of calibration feeds (names, dtypes, shapes, bytes) and labels."""
    h = hashlib.sha256(b"hessc-calibration-v1")
    for i, feed in enumerate(feeds):
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            h.update(f"{i}:{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(array.reshape(-1).view(np.uint8).data)
    for i, array in enumerate(labels or ()):
        array = np.ascontiguousarray(array)
        h.update(f"label{i}:{array.dtype.str}:{array.shape}".encode())
        h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _callable_id(fn: Callable) -> str:
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_consts).encode())
    return f"{name}:{h.hexdigest()[:16]}"


def _config_digest(config: HessianConfig) -> str:
    fields = {}
    for f in dataclasses.fields(config):
        if f.name in _NOT_KEYED or f.name == "labels":
            continue
        value = getattr(config, f.name)
        fields[f.name] = _callable_id(value) if callable(value) else repr(value)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _cache_root(config: HessianConfig) -> Path | None:
    if config.cache is False:
        return None
    if config.cache is None:
        return default_cache_dir()
    return Path(config.cache).expanduser()


_ARRAY_FIELDS = (
    "a", "a_eig_top", "a_weighted", "a_fit", "a_check", "g", "g_diag", "grad", "grad_fit", "grad_check", "lanczos_eigs",
)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _store(path: Path, key: str, stats: dict[str, meta.HessianStats]) -> None:
    """``path.npz`` (every array, shared ones once) and ``path.json`` (the index), atomically."""
    arrays: dict[str, np.ndarray] = {}
    shared: dict[int, str] = {}
    index: dict[str, Any] = {"version": _CACHE_VERSION, "key": key, "weights": {}}
    for i, (name, s) in enumerate(stats.items()):
        entry: dict[str, Any] = {"arrays": {}, "scalars": {}}
        for f in dataclasses.fields(s):
            value = getattr(s, f.name)
            if f.name in _ARRAY_FIELDS:
                if value is None:
                    continue
                array_key = shared.get(id(value))
                if array_key is None:
                    array_key = shared[id(value)] = f"{i}.{f.name}"
                    arrays[array_key] = np.asarray(value)
                entry["arrays"][f.name] = array_key
            else:
                entry["scalars"][f.name] = value
        index["weights"][name] = entry
    _atomic_write(path.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(index).encode()))


def _load(path: Path, key: str) -> dict[str, meta.HessianStats] | None:
    index_path = path.with_suffix(".json")
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        if index.get("version") != _CACHE_VERSION or index.get("key") != key:
            return None
        loaded: dict[str, np.ndarray] = {}
        out = {}
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as npz:
            for name, entry in index["weights"].items():
                fields = dict(entry["scalars"])
                for field, array_key in entry["arrays"].items():
                    if array_key not in loaded:
                        loaded[array_key] = npz[array_key]
                    fields[field] = loaded[array_key]
                out[name] = meta.HessianStats(**fields)
        return out
    except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
        logger.warning("hessian cache entry %s is unreadable (%s); recomputing", path, e)
        return None
