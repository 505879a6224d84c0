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
  the graph inputs runs in ONNX Runtime on probes (cache of 0, 7 and 4,200 tokens, all-ones
  ``attention_mask``) and must equal the plain causal mask (query ``i`` sees keys ``j ≤ past + i``),
  which is what ``GroupQueryAttention`` computes from ``seqlens_k`` (no sliding window, no
  bidirectional prefix).

Then ``GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length)``
(``do_rotary=0``: the rotary embedding stays where the model computes it) replaces the attention
and writes the cache outputs. Like onnxruntime-genai's models, the fused form reads
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
"""(cached tokens, new tokens) at which the mask must be the plain causal mask."""


@dataclasses.dataclass(frozen=True)
class _Attention:
    """One matched attention: the SDPA node and the cache it reads."""

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
    return _Attention(node, query, *found_k, *found_v, heads, kv_heads, head_size)


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


def _causal_mask_problem(model: ir.Model, mask: ir.Value, cache) -> str | None:
    """Why ``mask`` is not the plain causal mask on the probes (None when it is)."""
    from hessc.runtime import sessions
    from hessc.runtime.verification import cut

    needed = _inputs_of(mask)
    part = cut(model, [v.name for v in needed], [mask.name])
    session = sessions.session(part, "cpu", optimize=False)
    for past, new in PROBES:
        feeds = {}
        for v in needed:
            dims = list(v.shape or [])
            if v.name == cache.ids:
                feeds[v.name] = np.full((1, new), 3, np.int64)
            elif v.name == cache.mask:
                feeds[v.name] = np.ones((1, past + new), v.dtype.numpy())
            elif v.name == cache.positions:
                feeds[v.name] = np.arange(past, past + new, dtype=np.int64)[None]
            elif v.name in cache.shapes:
                shape = [1 if d == -1 else d for d in cache.shapes[v.name]]
                shape[cache.seq_axis] = past
                feeds[v.name] = np.zeros(shape, v.dtype.numpy())
            else:
                return f"the mask reads the input {v.name!r} ({dims}), which the fusion cannot account for"
        got = np.asarray(session.run(feeds)[0])
        allowed = got if got.dtype == np.bool_ else got > -1.0
        want = np.arange(past + new)[None, :] <= past + np.arange(new)[:, None]
        if allowed.ndim != 4 or allowed.shape[-2:] != want.shape or not (allowed == want).all():
            return (f"the mask {mask.name!r} is not the plain causal mask at {past} cached and {new} new tokens "
                    "(a sliding window, a bidirectional prefix or a custom mask)")
    return None


def _insert(graph: ir.Graph, tape: ir.tape.Tape, before: ir.Node | None) -> None:
    """The tape's initializers and nodes into ``graph``, the nodes before ``before`` (else at the end)."""
    for value in tape.initializers:
        graph.initializers.add(value)
    if before is None:
        graph.extend(tape.nodes)
    else:
        graph.insert_before(before, tape.nodes)


def _rewrite(graph: ir.Graph, found: _Attention, seqlens: ir.Value, total: ir.Value, index: int) -> None:
    """``found``'s attention as a ``GroupQueryAttention`` that also writes the cache outputs."""
    tape = ir.tape.Tape()
    to_bsd = tape.initializer(ir.tensor(np.array([0, 0, -1], np.int64)), name=f"gqa{index}_to_bsd")
    to_bhsd = tape.initializer(ir.tensor(np.array([0, 0, found.heads, found.head_size], np.int64)),
                               name=f"gqa{index}_to_bhsd")

    def bsd(x: ir.Value) -> ir.Value:
        return tape.op("Reshape", [tape.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), to_bsd])

    attrs = {"num_heads": found.heads, "kv_num_heads": found.kv_heads, "do_rotary": 0}
    scale = _attr(found.node, "scale")
    if scale is not None:
        attrs["scale"] = float(scale)
    out, present_key, present_value = tape.op_multi_out(
        "GroupQueryAttention",
        [bsd(found.query), bsd(found.new_key), bsd(found.new_value), found.past_key, found.past_value, seqlens, total],
        attrs, num_outputs=3, domain="com.microsoft",
    )
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


def fuse_attention(model: ir.Model) -> tuple[int, str | None]:
    """Rewrites every cached attention of ``model`` into ``GroupQueryAttention`` in place; returns
    (count, None), or (0, why not) with the model's attention as it was (the check runs on a copy
    first, so a model that does not qualify is left untouched)."""
    from hessc.runtime import decoder

    cache = decoder.find(model)
    if cache is None:
        return 0, "no KV cache"
    fused = sorted({n.op_type for n in model.graph if n.op_type in _FUSED_ATTENTION})
    if fused:
        return 0, f"the attention is already fused ({', '.join(fused)})"
    if cache.mask is None:
        return 0, "no attention_mask input to count the valid tokens from"
    trial = frontend.clone(model)
    problem = _fuse(trial, cache, check=True)
    if isinstance(problem, str):
        return 0, problem
    count = _fuse(model, cache, check=False)
    return count, None


def _fuse(model: ir.Model, cache, check: bool) -> int | str:
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    fuse_sdpa(model, apply_shape_inference=True)
    graph = model.graph
    sdpas = [n for n in graph if n.op_type == "SDPA" and n.domain == _SDPA_DOMAIN]
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
    if check:
        for mask in {id(m.node.inputs[3]): m.node.inputs[3] for m in matched}.values():
            problem = _causal_mask_problem(model, mask, cache)
            if problem is not None:
                return problem
        return len(matched)
    mask_input = next(v for v in graph.inputs if v.name == cache.mask)
    seqlens, total = _sequence_lengths(graph, mask_input)
    for index, found in enumerate(matched):
        _rewrite(graph, found, seqlens, total, index)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return len(matched)


class FuseAttentionPass(ir.passes.InPlacePass):
    """A cached decoder's attention as ``GroupQueryAttention`` (:mod:`hessc.runtime.fuse_attention`)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count, reason = fuse_attention(model)
        model.meta[FUSION_KEY] = {"GroupQueryAttention": count} if count else {"skipped": reason}
        if count:
            logger.info("fuse-attention: %d attentions over the KV cache as GroupQueryAttention", count)
        elif reason != "no KV cache":
            logger.info("fuse-attention: nothing fused (%s)", reason)
        return ir.passes.PassResult(model, bool(count))
