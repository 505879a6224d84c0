"""Decoders with a KV cache: finding the cache in a graph, and feeds over prefill and decode steps.

A decoder with a cache takes its past keys and values as graph inputs and returns the present
ones as outputs (``past_key_values.3.key`` → ``present.3.key``, onnxruntime-genai's and
transformers' names, or any pair whose names differ only in ``past``/``present``), beside the
token ids, usually an ``attention_mask`` over past and new tokens, and sometimes
``position_ids``. Found from the graph's inputs, outputs and the operators reading the cache,
never from a model's name.

Calibration for such a model is token ids alone (what a user has); :func:`expand` turns each
sample into the two steps a served decoder runs: a **prefill** of its first half with an empty
cache, then a **continuation** of the second half on the real cache the float model computed
for the first (ORT's attention takes several new tokens on a cache for one sequence at a time, so
each batch row becomes its own sample). Generated feeds (no calibration) are a prefill and a
one-token **decode** step on a random cache: the serving shape of generation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError

Feed = dict[str, np.ndarray]

STEPS_PER_SAMPLE = 2
"""Feeds :func:`expand` makes of each calibration sample (prefill, continuation)."""

DECODE_CACHE = 15
"""Cached tokens of the generated decode step (with its one new token: a context of 16)."""


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Where a decoder's cache enters and leaves the graph.

    Attributes:
        ids: the token-ids input.
        mask: the attention-mask input (over past and new tokens), if any.
        positions: the position-ids input, if any.
        pairs: ``(past input, present output)`` per cache tensor, in input order.
        seq_axis: the axis of a cache tensor that grows with the context.
        shapes: per past input its shape with the batch axis and the sequence axis as ``-1`` and
            every other axis resolved to a size.
    """

    ids: str
    mask: str | None
    positions: str | None
    pairs: tuple[tuple[str, str], ...]
    seq_axis: int
    shapes: dict[str, tuple[int, ...]]

    @property
    def past_inputs(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.pairs)

    def empty_past(self, batch: int, dtype_of: dict[str, np.dtype]) -> Feed:
        """Zero-length past tensors for a prefill of ``batch`` rows."""
        return {name: np.zeros(self._shape(name, batch, 0), dtype=dtype_of[name]) for name in self.past_inputs}

    def _shape(self, name: str, batch: int, length: int) -> tuple[int, ...]:
        dims = list(self.shapes[name])
        dims[0], dims[self.seq_axis] = batch, length
        return tuple(dims)


_PAST = re.compile(r"past_key_values|past")
_PRESENT = re.compile(r"present_key_values|present")


def _pair_key(name: str, pattern: re.Pattern) -> str | None:
    lowered = name.lower()
    if not pattern.search(lowered):
        return None
    return pattern.sub("", lowered, count=1).strip("._/")


def find(model: ir.Model) -> KVCache | None:
    """The model's KV cache, or None when it has none.

    Raises:
        InputError: the model has past inputs and present outputs that do not pair up, or a
            cache dimension neither its shape nor the attention reading it tells.
    """
    from hessc.ir.weights import token_ids_input

    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    pasts = {k: v for v in inputs if (k := _pair_key(v.name or "", _PAST)) is not None and v.shape is not None}
    presents = {k: v for v in model.graph.outputs if (k := _pair_key(v.name or "", _PRESENT)) is not None}
    if not pasts or not presents:
        return None
    if set(pasts) != set(presents):
        unpaired = sorted({pasts[k].name for k in set(pasts) - set(presents)} | {presents[k].name for k in set(presents) - set(pasts)})
        raise InputError(
            f"the model's cache inputs and outputs do not pair up ({', '.join(unpaired[:4])} has no partner); "
            "name each past input like its present output (past_key_values.N.key -> present.N.key)"
        )
    ids = token_ids_input(model)
    if ids is None:
        raise InputError("the model has a KV cache but no integer token-ids input (input_ids); hessc cannot feed it")
    order = [v.name for v in inputs]
    pairs = tuple(sorted(((pasts[k].name, presents[k].name) for k in pasts), key=lambda p: order.index(p[0])))
    first_past, first_present = pasts[next(iter(pasts))], presents[next(iter(pasts))]
    seq_axis = _seq_axis(first_past, first_present)
    shapes = {value.name: _resolve(value, presents[k], seq_axis) for k, value in pasts.items()}
    names = {v.name: v for v in inputs}
    mask = next((n for n in names if "attention_mask" in n.lower()), None)
    positions = next((n for n in names if "position_ids" in n.lower()), None)
    return KVCache(ids, mask, positions, pairs, seq_axis, shapes)


def _seq_axis(past: ir.Value, present: ir.Value) -> int:
    """The axis whose size differs between past and present (both symbolic), else the second last."""
    a, b = list(past.shape), list(present.shape or [])
    if len(a) == len(b):
        for axis in range(1, len(a)):
            if not isinstance(a[axis], int) and not isinstance(b[axis], int) and str(a[axis]) != str(b[axis]):
                return axis
    return len(a) - 2


def _resolve(past: ir.Value, present: ir.Value, seq_axis: int) -> tuple[int, ...]:
    """The past input's shape: batch and sequence as -1, every other axis a size."""
    dims = list(past.shape)
    out = list(present.shape) if present.shape is not None and len(present.shape) == len(dims) else [None] * len(dims)
    resolved = []
    for axis, d in enumerate(dims):
        if axis in (0, seq_axis):
            resolved.append(-1)
        elif isinstance(d, int):
            resolved.append(d)
        elif isinstance(out[axis], int):
            resolved.append(out[axis])
        else:
            size = _size_from_readers(past, axis, len(dims))
            if size is None:
                raise InputError(
                    f"cannot tell the size of axis {axis} ({d}) of the cache input {past.name!r}; "
                    f"fix it with --input-shape {past.name}=..."
                )
            resolved.append(size)
    return tuple(resolved)


def _size_from_readers(past: ir.Value, axis: int, rank: int) -> int | None:
    """A cache axis's size from the attention that reads it: the head size of a
    ``GroupQueryAttention`` (``[B, kv_heads, S, head]``), or the other input of a ``Concat``, read
    through the ``Cast`` an fp16 lowering puts between a float32 cache input and its reader."""
    for node, past in _readers_through_casts(past):
        if node.op_type == "GroupQueryAttention" and rank == 4 and axis in (1, 3):
            attrs = {a.name: a.value for a in node.attributes.values()}
            heads, kv_heads = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
            if axis == 1:
                return kv_heads or None
            query, key = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
            width = query.shape[-1] if query is not None and query.shape is not None else None
            if not isinstance(width, int):
                width = _last_dim_of_weight(query)
            if isinstance(width, int) and heads:
                return width // (heads + 2 * kv_heads) if key is None else width // heads
        if node.op_type == "Concat":
            for other in node.inputs:
                if other is not past and other is not None and other.shape is not None and len(other.shape) == rank:
                    if isinstance(other.shape[axis], int):
                        return other.shape[axis]
    return None


def _readers_through_casts(value: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
    """(reader, the value it reads) for the readers of ``value`` and, through ``Cast`` nodes, of
    its casts."""
    found, stack = [], [value]
    while stack:
        v = stack.pop()
        for use in v.uses():
            if use.node.op_type == "Cast":
                stack.extend(use.node.outputs)
            else:
                found.append((use.node, v))
    return found


def _last_dim_of_weight(value: ir.Value | None) -> int | None:
    """The output width of the MatMul/Gemm/MatMulNBits that produces ``value`` (a projection)."""
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        n = next((a.value for a in node.attributes.values() if a.name == "N"), None)
        return int(n) if n is not None else None
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
        weight = node.inputs[1]
        if weight is not None and weight.const_value is not None:
            shape = weight.const_value.shape
            trans = node.op_type == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values())
            return int(shape[0] if trans else shape[-1])
    if node.op_type in ("Add", "Cast"):  # a bias after the projection, an fp16 cast
        for x in node.inputs:
            width = _last_dim_of_weight(x)
            if width is not None:
                return width
    return None


# --------------------------------------------------------------------------------------------------
# feeds


def _dtypes(model: ir.Model, names: Sequence[str]) -> dict[str, np.dtype]:
    values = {v.name: v for v in model.graph.inputs}
    return {n: np.dtype(values[n].dtype.numpy()) if values[n].dtype is not None else np.dtype(np.float32) for n in names}


def _step(cache: KVCache, model: ir.Model, ids: np.ndarray, past: Feed, past_len: int, mask: np.ndarray | None) -> Feed:
    """One step's feed: ``ids`` [B, S] after ``past_len`` cached tokens."""
    dtypes = _dtypes(model, [n for n in (cache.ids, cache.mask, cache.positions) if n] + list(cache.past_inputs))
    b, s = ids.shape
    feed = {cache.ids: ids.astype(dtypes[cache.ids])}
    if cache.mask:
        feed[cache.mask] = (mask if mask is not None else np.ones((b, past_len + s))).astype(dtypes[cache.mask])
    if cache.positions:
        feed[cache.positions] = np.broadcast_to(np.arange(past_len, past_len + s), (b, s)).astype(dtypes[cache.positions])
    feed.update(past)
    return feed


def expand(model: ir.Model, cache: KVCache, samples: Sequence[Feed]) -> list[Feed]:
    """Prefill and continuation feeds of token-id samples, the continuation on the real cache.

    Each sample (``{ids: [B, T]}``, optionally its mask over the ``T`` tokens) becomes, per batch
    row, a prefill of its first ``T // 2`` tokens and a continuation of the rest; a one-token
    sample is a prefill alone. The float model computes the cache the continuation reads.
    """
    from hessc.runtime import sessions

    dtypes = _dtypes(model, cache.past_inputs)
    outputs = [present for _, present in cache.pairs]
    session = None
    feeds: list[Feed] = []
    for index, sample in enumerate(samples):
        unknown = sorted(set(sample) - {cache.ids, cache.mask, cache.positions} - {None})
        if unknown:
            raise InputError(
                f"calibration sample {index} gives {unknown} but not the cache inputs; give token ids "
                f"({cache.ids!r}, optionally {cache.mask!r}) and hessc runs the cache itself, or every input"
            )
        if cache.ids not in sample:
            raise InputError(f"calibration sample {index} has no {cache.ids!r}; give the token ids of each sample")
        ids = np.asarray(sample[cache.ids])
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise InputError(f"calibration sample {index}: {cache.ids!r} has shape {list(ids.shape)}; give [batch, tokens]")
        mask = np.asarray(sample[cache.mask]) if cache.mask and cache.mask in sample else None
        if mask is not None and mask.shape != ids.shape:
            raise InputError(
                f"calibration sample {index}: {cache.mask!r} has shape {list(mask.shape)} but the ids "
                f"{list(ids.shape)}; give one mask entry per token"
            )
        for row in range(ids.shape[0]):
            row_ids, row_mask = ids[row : row + 1], (mask[row : row + 1] if mask is not None else None)
            split = max(row_ids.shape[1] // 2, 1)
            prefill = _step(cache, model, row_ids[:, :split], cache.empty_past(1, dtypes), 0,
                            row_mask[:, :split] if row_mask is not None else None)
            feeds.append(prefill)
            if split == row_ids.shape[1]:
                continue
            if session is None:
                session = sessions.session(model, "cpu", optimize=False)
            presents = session.inner.run(outputs, prefill)
            past = {name: np.asarray(value) for name, value in zip(cache.past_inputs, presents)}
            feeds.append(_step(cache, model, row_ids[:, split:], past, split, row_mask))
    return feeds


def generated(model: ir.Model, cache: KVCache, token_feed: Feed, rng: np.random.Generator, decode: bool) -> Feed:
    """A generated feed: ``token_feed``'s ids as a prefill, or their first token as a decode step
    after :data:`DECODE_CACHE` random cached tokens."""
    dtypes = _dtypes(model, cache.past_inputs)
    ids = np.asarray(token_feed[cache.ids])
    if ids.ndim != 2:
        ids = ids.reshape(1, -1)
    b = ids.shape[0]
    if not decode:
        return _step(cache, model, ids, cache.empty_past(b, dtypes), 0, None)
    past = {
        name: rng.standard_normal(cache._shape(name, b, DECODE_CACHE)).astype(dtypes[name])
        for name in cache.past_inputs
    }
    return _step(cache, model, ids[:, :1], past, DECODE_CACHE, None)
