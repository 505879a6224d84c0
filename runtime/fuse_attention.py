"""``fuse-attention``: a decoder's attention over its KV cache as one ``GroupQueryAttention``.

A decoder exported from torch computes attention as a few dozen standard operators per layer:
concatenate the cache, repeat the key/value heads for grouped queries (``Unsqueeze → Expand →
Reshape``), ``MatMul``, scale, add a causal mask built from ``attention_mask``, ``Softmax``,
``MatMul``. onnxruntime-genai's models run the same as one ``com.microsoft.GroupQueryAttention``
per layer, which reads the grouped cache as it is and appends the new keys and values itself.

This pass finds the attention with onnxscript's ORT fusion rule for scaled dot-product attention
(``onnxscript.rewriter.ort_fusions``' ``fuse_sdpa``, which matches the scale, mask and key-layout
variants) and extends it where it falls short for a cached decoder: its own GQA rule needs one
exporter's mask construction op for op, and its fallback (``MultiHeadAttention`` over the
repeated heads) is slower than the unfused graph on the CPU (SmolLM2, one token after 512:
27.1 ms unfused, 40.1 ms as MultiHeadAttention, 18.1 ms for genai's GQA model). Here, per
attention:

* the key and value must be the cache input concatenated with the new step's keys/values on the
  sequence axis (that concatenation being the matching cache output), possibly behind the
  head-repeat ``Unsqueeze(axis 2) → Expand → Reshape``;
* the mask's meaning is checked by running it, not by its form: the subgraph computing it from
  the graph inputs runs in ONNX Runtime on probes (cache of 0, 7 and 4,200 tokens and, where the
  decoder's context length is known, one step at its end; all-ones ``attention_mask``) and must
  equal the causal mask (query ``i`` sees keys ``j ≤ past + i``), which is what
  ``GroupQueryAttention`` computes from ``seqlens_k``, or the causal mask over a sliding window of
  the last ``w`` keys (Mistral, Gemma's local layers: the kernel's ``local_window_size``); no
  bidirectional prefix, no custom mask;
* the rotary embedding ``x·cos + rotate_half(x)·sin`` of the query and key, where present, moves
  into the kernel (``do_rotary``): its cos/sin tables are read off the model by running the
  subgraph that computes the angles for positions 0..context-1, and the probes must show the
  angles of positions ``past .. past + new - 1``, which is how the kernel counts them from
  ``seqlens_k``. Then nothing but the attention reads the cache inputs, and onnxruntime-genai may
  keep the cache in one preallocated buffer (:func:`cache_in_place`).

Then ``GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length[,
cos_cache, sin_cache])`` replaces the attention and writes the cache outputs (an embedding the
kernel cannot apply, partial or interleaved rotary, stays where the model computes it, ``do_rotary=0``). Like onnxruntime-genai's models, the fused form reads
``attention_mask`` as the count of valid tokens per row (``seqlens_k = sum(mask) - 1``), that is a
mask of ones over a prefix (no left padding). Where any attention does not qualify, nothing is
fused and the plan says why. ORT's CPU kernel takes head sizes that are multiples of 16.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from hessc.ir import frontend

logger = logging.getLogger(__name__)

FUSION_KEY = "hessc.fuse_attention"
"""``model.meta`` key: what the pass fused (``{"GroupQueryAttention": n}``) or why it did not."""

_SDPA_DOMAIN = "ai.onnxruntime._fusion"
_FUSED_ATTENTION = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention")
PROBES = ((0, 4), (7, 1), (4200, 2))
"""(cached tokens, new tokens) at which the mask and the rotary angles are checked."""


@dataclasses.dataclass(frozen=True)
class _Rotary:
    """A rotary embedding on a query or key: ``x·cos + rotate_half(x)·sin`` (halves not interleaved)."""

    raw: ir.Value  # x, [B, H, S, D]
    cos: ir.Value
    sin: ir.Value


@dataclasses.dataclass(frozen=True)
class _Attention:
    """One matched attention: the SDPA node, the cache it reads, and the rotary embedding of its
    query and key where it has one that ``GroupQueryAttention`` can apply itself."""

    node: ir.Node
    query: ir.Value  # [B, H, S, D]
    past_key: ir.Value
    new_key: ir.Value  # [B, Hkv, S, D]
    present_key: ir.Value
    past_value: ir.Value
    new_value: ir.Value
    present_value: ir.Value
    heads: int
    kv_heads: int
    head_size: int
    query_rotary: _Rotary | None = None
    key_rotary: _Rotary | None = None


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return [int(x) for x in tensor.numpy().reshape(-1)] if tensor is not None else None


def _cache_concat(value: ir.Value, pasts: dict[str, str]) -> tuple[ir.Value, ir.Value, ir.Value] | str:
    """(past, new, present) where ``value`` is ``Concat(past, new)`` on the sequence axis, behind
    the head repeat ``Reshape(Expand(Unsqueeze(·, 2)))`` or not; else why not."""
    node = value.producer()
    if node is not None and node.op_type == "Reshape":
        expand = node.inputs[0].producer() if node.inputs[0] is not None else None
        unsqueeze = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or _ints(unsqueeze.inputs[1]) != [2]:
            return f"{value.name}: a Reshape that is not the head repeat Unsqueeze(axis 2) -> Expand -> Reshape"
        node = unsqueeze.inputs[0].producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or _attr(node, "axis") not in (2, -2):
        return f"{value.name}: not the cache input concatenated with the new step on the sequence axis"
    past, new = node.inputs
    present = node.outputs[0]
    if past is None or not past.is_graph_input() or past.name not in pasts:
        return f"{value.name}: the concatenation does not start from a cache input"
    if not present.is_graph_output() or pasts[past.name] != present.name:
        return f"{value.name}: the concatenation is not the cache output paired with {past.name}"
    return past, new, present


def _slice_range(node: ir.Node | None, x: ir.Value, size: int) -> tuple[int, int] | None:
    """(start, end) of ``node`` when it is a unit-step ``Slice`` of ``x``'s last axis (of ``size``)."""
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x or len(node.inputs) < 4:
        return None
    starts, ends, axes = _ints(node.inputs[1]), _ints(node.inputs[2]), _ints(node.inputs[3])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if starts is None or ends is None or axes not in ([-1], [3]) or steps != [1] or len(starts) != 1:
        return None
    start, end = (v + size if v < 0 else v for v in (starts[0], ends[0]))
    return start, min(end, size)


def _is_rotate_half(value: ir.Value | None, x: ir.Value, head_size: int) -> bool:
    """Whether ``value`` is ``Concat(-x[..., D/2:], x[..., :D/2])`` on the last axis."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or _attr(node, "axis") not in (-1, 3):
        return False
    negated = node.inputs[0].producer() if node.inputs[0] is not None else None
    if negated is None or negated.op_type != "Neg":
        return False
    upper = _slice_range(negated.inputs[0].producer(), x, head_size)
    lower = _slice_range(node.inputs[1].producer() if node.inputs[1] is not None else None, x, head_size)
    half = head_size // 2
    return upper == (half, head_size) and lower == (0, half)


def _rotary(value: ir.Value, head_size: int) -> _Rotary | None:
    """The rotary embedding ``value`` is the output of, when it is ``x·cos + rotate_half(x)·sin``
    over the whole head (the operands in either order); else None."""
    node = value.producer()
    if node is None or node.op_type != "Add" or len(node.inputs) != 2 or head_size % 2:
        return None
    products = [i.producer() if i is not None else None for i in node.inputs]
    if any(p is None or p.op_type != "Mul" for p in products):
        return None
    for plain, rotated in (products, products[::-1]):
        for x, cos in (plain.inputs, plain.inputs[::-1]):
            for half, sin in (rotated.inputs, rotated.inputs[::-1]):
                if x is not None and _is_rotate_half(half, x, head_size):
                    return _Rotary(x, cos, sin)
    return None


def _match(node: ir.Node, pasts: dict[str, str]) -> _Attention | str:
    if _attr(node, "key_format") != "BHSd" or len(node.inputs) < 4 or node.inputs[3] is None:
        return f"{node.name}: attention without a mask or with keys not in [B, H, S, D]"
    query, key, value = node.inputs[:3]
    found_k, found_v = _cache_concat(key, pasts), _cache_concat(value, pasts)
    for found in (found_k, found_v):
        if isinstance(found, str):
            return found
    dims = list(query.shape or [])
    past_dims = list(found_k[0].shape or [])
    if len(dims) != 4 or len(past_dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3], past_dims[1])):
        return f"{node.name}: head counts or head size not static"
    heads, head_size, kv_heads = dims[1], dims[3], past_dims[1]
    if heads % kv_heads or head_size % 16:
        return f"{node.name}: {heads} heads over {kv_heads} KV heads of size {head_size} (GroupQueryAttention needs a multiple of 16)"
    query_rotary, key_rotary = _rotary(query, head_size), _rotary(found_k[1], head_size)
    if query_rotary is None or key_rotary is None or (query_rotary.cos, query_rotary.sin) != (key_rotary.cos, key_rotary.sin):
        query_rotary = key_rotary = None
    return _Attention(node, query, *found_k, *found_v, heads, kv_heads, head_size, query_rotary, key_rotary)


def _inputs_of(value: ir.Value) -> list[ir.Value]:
    """The graph inputs ``value`` is computed from."""
    found, seen, stack = [], set(), [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            found.append(v)
        elif v.producer() is not None:
            stack.extend(i for i in v.producer().inputs if i is not None)
    return found


class _Probe:
    """Runs the part of ``model`` that computes ``outputs`` from the graph inputs, fed as one
    decoding step of ``new`` tokens after ``past`` cached ones (batch 1, an all-ones mask)."""

    def __init__(self, model: ir.Model, outputs: list[ir.Value], cache):
        from hessc.runtime import sessions
        from hessc.runtime.verification import cut

        self.needed = list({id(v): v for out in outputs for v in _inputs_of(out)}.values())
        self.cache = cache
        self.unknown = next((v.name for v in self.needed if not self._known(v.name)), None)
        if self.unknown is None:
            part = cut(model, [v.name for v in self.needed], [v.name for v in outputs])
            self.session = sessions.session(part, "cpu", optimize=False)

    def _known(self, name: str) -> bool:
        return name in (self.cache.ids, self.cache.mask, self.cache.positions) or name in self.cache.shapes

    def run(self, past: int, new: int) -> list[np.ndarray]:
        cache, feeds = self.cache, {}
        for v in self.needed:
            if v.name == cache.ids:
                feeds[v.name] = np.full((1, new), 3, np.int64)
            elif v.name == cache.mask:
                feeds[v.name] = np.ones((1, past + new), v.dtype.numpy())
            elif v.name == cache.positions:
                feeds[v.name] = np.arange(past, past + new, dtype=np.int64)[None]
            else:
                shape = [1 if d == -1 else d for d in cache.shapes[v.name]]
                shape[cache.seq_axis] = past
                feeds[v.name] = np.zeros(shape, v.dtype.numpy())
        return [np.asarray(x) for x in self.session.run(feeds)]


def _mask_window(model: ir.Model, mask: ir.Value, cache, context_length: int | None) -> int | None | str:
    """The attention window ``mask`` keeps, read off the probes (and one step at the end of the
    context when its length is known): None for the plain causal mask (query ``i`` sees keys
    ``j ≤ past + i``), ``w`` for a sliding window (the ``w`` keys ``past + i - w < j ≤ past + i``),
    or why it is neither."""
    probe = _Probe(model, [mask], cache)
    if probe.unknown is not None:
        return f"the mask reads the input {probe.unknown!r}, which the fusion cannot account for"
    probes = list(PROBES)
    if context_length and context_length > max(p + n for p, n in PROBES):
        probes.append((context_length - 1, 1))
    seen = []
    for past, new in probes:
        (got,) = probe.run(past, new)
        allowed = got if got.dtype == np.bool_ else got > -1.0
        if allowed.ndim != 4 or allowed.shape[-2:] != (new, past + new):
            return f"the mask {mask.name!r} is not one row of keys per query at {past} cached and {new} new tokens"
        rows = allowed.reshape(-1, new, past + new)
        if not (rows == rows[:1]).all():
            return f"the mask {mask.name!r} differs between heads"
        seen.append((past, new, rows[0]))
    limited = [int(rows[-1].sum()) for past, new, rows in seen if rows[-1].sum() < past + new]
    window = limited[0] if limited else None
    for past, new, rows in seen:
        keys, queries = np.arange(past + new)[None, :], past + np.arange(new)[:, None]
        want = (keys <= queries) & ((keys > queries - window) if window else True)
        if not (rows == want).all():
            return (f"the mask {mask.name!r} is not causal at {past} cached and {new} new tokens, with or without "
                    "a sliding window (a bidirectional prefix or a custom mask)")
    return window


def _rotary_tables(model: ir.Model, rotary: _Rotary, cache, length: int,
                   head_size: int) -> tuple[np.ndarray, np.ndarray] | str:
    """``GroupQueryAttention``'s ``cos_cache`` and ``sin_cache`` ([length, D/2]) for ``rotary``,
    read off the model by running its cos/sin subgraph for positions 0..length-1; or why the
    embedding cannot be handed to the kernel: the angles must repeat over the two halves of the
    head (not interleaved) and, on the probes, be the table's rows ``past .. past + new - 1``
    (positions counted from the cache length, as the kernel counts them from ``seqlens_k``)."""
    probe = _Probe(model, [rotary.cos, rotary.sin], cache)
    if probe.unknown is not None:
        return f"the rotary angles read the input {probe.unknown!r}"

    def angles(past: int, new: int) -> tuple[np.ndarray, np.ndarray] | None:
        cos, sin = probe.run(past, new)
        if cos.size != new * head_size or sin.size != new * head_size:
            return None
        return cos.reshape(new, head_size), sin.reshape(new, head_size)

    table = angles(0, length)
    if table is None:
        return "the rotary angles are not one row of head size per position"
    half = head_size // 2
    if any(not np.array_equal(t[:, :half], t[:, half:]) for t in table):
        return "the rotary angles differ between the two halves of the head (interleaved or partial rotary)"
    for past, new in PROBES:
        if past + new <= length:
            got = angles(past, new)
            if got is None or any(not np.allclose(g, t[past:past + new], rtol=0, atol=1e-6) for g, t in zip(got, table)):
                return f"the rotary angles at {past} cached tokens are not those of positions {past}..{past + new - 1}"
    return table[0][:, :half].copy(), table[1][:, :half].copy()


def _insert(graph: ir.Graph, tape: ir.tape.Tape, before: ir.Node | None) -> None:
    """The tape's initializers and nodes into ``graph``, the nodes before ``before`` (else at the end)."""
    for value in tape.initializers:
        graph.initializers.add(value)
    if before is None:
        graph.extend(tape.nodes)
    else:
        graph.insert_before(before, tape.nodes)


def _rewrite(graph: ir.Graph, found: _Attention, seqlens: ir.Value, total: ir.Value, index: int,
             rotary_tables: tuple[ir.Value, ir.Value] | None, window: int | None) -> None:
    """``found``'s attention as a ``GroupQueryAttention`` that also writes the cache outputs,
    applies the rotary embedding itself from ``rotary_tables`` (cos, sin) when given, and sees the
    last ``window`` keys, the query's own included, when given (the kernel's ``local_window_size``;
    measured against the exported mask, the test of Mistral's window)."""
    tape = ir.tape.Tape()
    to_bsd = tape.initializer(ir.tensor(np.array([0, 0, -1], np.int64)), name=f"gqa{index}_to_bsd")
    to_bhsd = tape.initializer(ir.tensor(np.array([0, 0, found.heads, found.head_size], np.int64)),
                               name=f"gqa{index}_to_bhsd")

    def bsd(x: ir.Value, heads: int) -> ir.Value:
        merged = _merged_heads_source(x, heads, found.head_size)
        if merged is not None:  # the projection's output, before the model split it into heads
            return merged
        return tape.op("Reshape", [tape.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), to_bsd])

    query, key, extra = found.query, found.new_key, []
    attrs = {"num_heads": found.heads, "kv_num_heads": found.kv_heads, "do_rotary": 0}
    if window is not None:
        attrs["local_window_size"] = window
    if rotary_tables is not None:
        query, key, extra = found.query_rotary.raw, found.key_rotary.raw, list(rotary_tables)
        attrs.update(do_rotary=1, rotary_interleaved=0)
    scale = _attr(found.node, "scale")
    if scale is not None:
        attrs["scale"] = float(scale)
    out, present_key, present_value = tape.op_multi_out(
        "GroupQueryAttention",
        [bsd(query, found.heads), bsd(key, found.kv_heads), bsd(found.new_value, found.kv_heads), found.past_key,
         found.past_value, seqlens, total, *extra],
        attrs, num_outputs=3, domain="com.microsoft",
    )
    # where the model merges the heads back ([B, S, H·D], the output projection's input), it reads
    # the kernel's output as it is; other readers get [B, H, S, D]
    for merge in _head_merges(found.node.outputs[0], found.heads * found.head_size):
        ir.convenience.replace_all_uses_with(merge, out)
    attention = tape.op("Transpose", [tape.op("Reshape", [out, to_bhsd])], {"perm": [0, 2, 1, 3]})
    _insert(graph, tape, found.node)
    ir.convenience.replace_all_uses_with(found.node.outputs[0], attention)
    for old, new in ((found.present_key, present_key), (found.present_value, present_value)):
        new.shape, new.type = old.shape, old.type
        position = list(graph.outputs).index(old)
        name = old.name
        old.name = f"{name}__unfused"
        new.name = name
        graph.outputs[position] = new


def _dims(value: ir.Value) -> list | None:
    return list(value.shape) if value.shape is not None else None


def _merged_heads_source(x: ir.Value, heads: int, head_size: int) -> ir.Value | None:
    """``y`` where ``x = Transpose(Reshape(y, [B, S, heads, head_size]), perm=[0, 2, 1, 3])`` and
    ``y`` is [B, S, heads·head_size] (a projection split into heads: ``y`` is ``x`` in the kernel's
    [B, S, H·D] layout); else None."""
    transpose = x.producer()
    if transpose is None or transpose.op_type != "Transpose" or list(_attr(transpose, "perm") or []) != [0, 2, 1, 3]:
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    source, split = reshape.inputs[0], _dims(reshape.outputs[0])
    merged = _dims(source) if source is not None else None
    if merged is None or split is None or len(merged) != 3 or len(split) != 4:
        return None
    if split[2:] != [heads, head_size] or merged[2] != heads * head_size:
        return None
    return source


def _head_merges(value: ir.Value, width: int) -> list[ir.Value]:
    """The values ``Reshape(Transpose(value, perm=[0, 2, 1, 3]), [B, S, width])`` in the graph."""
    found = []
    for use in value.uses():
        transpose = use.node
        if transpose.op_type != "Transpose" or list(_attr(transpose, "perm") or []) != [0, 2, 1, 3]:
            continue
        for inner in transpose.outputs[0].uses():
            merged = _dims(inner.node.outputs[0]) if inner.node.op_type == "Reshape" and inner.idx == 0 else None
            if merged is not None and len(merged) == 3 and merged[2] == width and not inner.node.outputs[0].is_graph_output():
                found.append(inner.node.outputs[0])
    return found


def _sequence_lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's ``seqlens_k`` (valid tokens per row, minus one) and
    ``total_sequence_length`` from the 2-D ``attention_mask``, at the top of the graph."""
    tape = ir.tape.Tape()
    one = tape.initializer(ir.tensor(np.array([1], np.int64)), name="gqa_one")
    valid = tape.op("Cast", [tape.op("ReduceSum", [mask, one], {"keepdims": 0})], {"to": ir.DataType.INT64})
    seqlens = tape.op("Cast", [tape.op("Sub", [valid, one])], {"to": ir.DataType.INT32})
    total_1d = tape.op("Shape", [mask], {"start": 1, "end": 2})
    total = tape.op("Cast", [tape.op("Squeeze", [total_1d])], {"to": ir.DataType.INT32})
    seqlens.name, total.name = "gqa_seqlens_k", "gqa_total_sequence_length"
    _insert(graph, tape, next(iter(graph), None))
    return seqlens, total


@dataclasses.dataclass
class Fused:
    """What :func:`fuse_attention` did: attentions fused, how many apply the rotary embedding in
    the kernel, or why nothing was fused, and why the rotary embedding stayed in the graph."""

    attentions: int = 0
    rotary: int = 0
    skipped: str | None = None
    rotary_skipped: str | None = None
    windows: list[int] = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        if not self.attentions:
            return {"skipped": self.skipped}
        out = {"GroupQueryAttention": self.attentions, "rotary_in_kernel": self.rotary}
        if self.windows:
            out["sliding_windows"] = self.windows
        if self.rotary_skipped:
            out["rotary_skipped"] = self.rotary_skipped
        return out


def fuse_attention(model: ir.Model, context_length: int | None = None) -> Fused:
    """Rewrites every cached attention of ``model`` into ``GroupQueryAttention`` in place; the
    rotary embedding moves into the kernel where its tables (``context_length`` positions; the
    exported decoder's own by default) can be read off the model. A model that does not qualify
    is left untouched (the check runs on a copy first)."""
    from hessc.ir import meta
    from hessc.runtime import decoder

    cache = decoder.find(model)
    if cache is None:
        return Fused(skipped="no KV cache")
    fused = sorted({n.op_type for n in model.graph if n.op_type in _FUSED_ATTENTION})
    if fused:
        return Fused(skipped=f"the attention is already fused ({', '.join(fused)})")
    if cache.mask is None:
        return Fused(skipped="no attention_mask input to count the valid tokens from")
    if context_length is None:
        context_length = (model.meta.get(meta.DECODER_CONFIG_KEY) or {}).get("context_length")
    # onnxscript's SDPA fusion rewrites the graph before anything is known: match and check on a
    # copy, then fuse the model with what the copy showed (keyed by value names, which a copy keeps)
    trial = frontend.clone(model)
    checked = _check(trial, cache, context_length)
    if isinstance(checked, Fused):
        return checked
    return _fuse(model, cache, checked)


@dataclasses.dataclass
class _Checked:
    """What the probes showed on a copy: the window of each mask (None: plain causal) and the
    rotary tables of each (cos, sin) pair (None: the embedding stays in the graph), by value name."""

    windows: dict[str, int | None]
    tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None]
    rotary_skipped: str | None = None


def _matched(model: ir.Model, cache) -> list[_Attention] | str:
    """Every attention of ``model`` (after onnxscript's SDPA fusion, in place), or why not all qualify."""
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    fuse_sdpa(model, apply_shape_inference=True)
    sdpas = [n for n in model.graph if n.op_type == "SDPA" and n.domain == _SDPA_DOMAIN]
    if not sdpas:
        return "no scaled dot-product attention found"
    pasts = dict(cache.pairs)
    matched = []
    for node in sdpas:
        found = _match(node, pasts)
        if isinstance(found, str):
            return found
        matched.append(found)
    if len({id(m.past_key) for m in matched}) != len(matched):
        return "two attentions read one cache input"
    return matched


def _rotary_key(found: _Attention) -> tuple[str, str] | None:
    rotary = found.query_rotary
    return (rotary.cos.name, rotary.sin.name) if rotary is not None else None


def _check(model: ir.Model, cache, context_length: int | None) -> _Checked | Fused:
    """Matches and probes every attention of ``model`` (a copy: the SDPA fusion stays in it)."""
    matched = _matched(model, cache)
    if isinstance(matched, str):
        return Fused(skipped=matched)
    checked = _Checked(windows={}, tables={})
    for mask in {m.node.inputs[3].name: m.node.inputs[3] for m in matched}.values():
        window = _mask_window(model, mask, cache, context_length)
        if isinstance(window, str):
            return Fused(skipped=window)
        checked.windows[mask.name] = window
    for found in matched:
        key = _rotary_key(found)
        if key is None or key in checked.tables:
            continue
        tables = None
        if not context_length:
            checked.rotary_skipped = "the context length is not known (the size of the rotary tables)"
        else:
            tables = _rotary_tables(model, found.query_rotary, cache, int(context_length), found.head_size)
            if isinstance(tables, str):
                tables, checked.rotary_skipped = None, tables
        checked.tables[key] = tables
    return checked


def _fuse(model: ir.Model, cache, checked: _Checked) -> Fused:
    """Rewrites every attention of ``model`` as :func:`_check` found them on its copy."""
    matched = _matched(model, cache)
    if isinstance(matched, str) or any(m.node.inputs[3].name not in checked.windows for m in matched):
        raise RuntimeError(f"fuse-attention: the model does not match as its copy did ({matched!r:.200})")
    graph = model.graph
    initializers: dict[tuple[str, str], tuple[ir.Value, ir.Value]] = {}
    for key, tables in checked.tables.items():
        if tables is not None:
            dtype = next(m.query.dtype for m in matched if _rotary_key(m) == key) or ir.DataType.FLOAT
            initializers[key] = tuple(
                ir.Value(name=f"gqa_{kind}_cache{len(initializers)}", const_value=ir.tensor(t.astype(dtype.numpy())))
                for kind, t in zip(("cos", "sin"), tables))
            for value in initializers[key]:
                graph.initializers.add(value)
    mask_input = next(v for v in graph.inputs if v.name == cache.mask)
    seqlens, total = _sequence_lengths(graph, mask_input)
    result = Fused(attentions=len(matched), rotary_skipped=checked.rotary_skipped,
                   windows=sorted({w for w in checked.windows.values() if w}))
    for index, found in enumerate(matched):
        tables = initializers.get(_rotary_key(found))
        result.rotary += tables is not None
        _rewrite(graph, found, seqlens, total, index, tables, checked.windows[found.node.inputs[3].name])
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return result


def cache_in_place(model: ir.Model, cache=None) -> bool:
    """Whether the decoder may run its cache in one preallocated buffer (onnxruntime-genai's
    ``past_present_share_buffer``): every cache input is read as the past key or value of one
    ``GroupQueryAttention``, which writes the matching output, and otherwise only by ``Shape``
    nodes that skip its sequence axis (an exporter may take the batch size from it). Nothing else
    then depends on the cache input's length, which in that mode is the buffer's, not the tokens cached (a rotary
    embedding or learned positions counted from it would be wrong). ``cache``: the model's
    :class:`~hessc.runtime.decoder.KVCache` where the caller has found it already."""
    from hessc.runtime import decoder

    cache = cache if cache is not None else decoder.find(model)
    if cache is None:
        return False
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}

    def length_blind(node: ir.Node) -> bool:  # a Shape that reads other dims (the batch), not the length
        if node.op_type != "Shape":
            return False
        rank = len(cache.shapes[node.inputs[0].name])
        start, end = (_attr(node, "start", 0), _attr(node, "end", rank))
        start, end = (v + rank if v < 0 else v for v in (start, end))
        return not start <= cache.seq_axis < end

    for past, present in cache.pairs:
        uses = list(inputs[past].uses())
        attention = [u.node for u in uses if u.node.op_type == "GroupQueryAttention" and u.idx in (3, 4)]
        if len(attention) != 1 or any(u.node is not attention[0] and not length_blind(u.node) for u in uses):
            return False
        if outputs[present].producer() is not attention[0]:
            return False
    return True


class FuseAttentionPass(ir.passes.InPlacePass):
    """A cached decoder's attention as ``GroupQueryAttention`` (:mod:`hessc.runtime.fuse_attention`)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = fuse_attention(model)
        model.meta[FUSION_KEY] = fused.record()
        if fused.attentions:
            logger.info("fuse-attention: %d attentions over the KV cache as GroupQueryAttention, %d with the rotary "
                        "embedding in the kernel%s", fused.attentions, fused.rotary,
                        f" ({fused.rotary_skipped})" if fused.rotary_skipped else "")
        elif fused.skipped != "no KV cache":
            logger.info("fuse-attention: nothing fused (%s)", fused.skipped)
        return ir.passes.PassResult(model, bool(fused.attentions))
