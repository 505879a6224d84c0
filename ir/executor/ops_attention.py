"""Attention as decoders with a KV cache carry it: com.microsoft ``GroupQueryAttention`` and
``RotaryEmbedding``, the fused forms onnxruntime-genai's model builder and ORT's fusions emit.

``GroupQueryAttention`` follows ORT's CPU kernel: a packed ``query`` (Q, K and V side by side) or
separate ``key``/``value``; the new keys and values are written into the cache after the
``past_b = seqlens_k[b] + 1 - S`` entries batch row ``b`` already holds (0 on the first prompt,
``S == total_sequence_length``), into a present buffer as long as the past one when the two share
a buffer (the past as long as the whole context) and ``total_sequence_length`` long otherwise;
rotary embedding of Q and K at positions ``past_b + i`` (or ``position_ids``), causal attention
over the ``total_b = seqlens_k[b] + 1`` valid keys, optionally a window of the last
``local_window_size`` keys (its own included), a soft cap and a smooth softmax (a sink logit
of 0, or ``head_sink`` per head).
"""

from __future__ import annotations

import math

import torch

from hessc.ir.executor.core import ExecutionError
from hessc.ir.executor.registry import _MS_DOMAIN, register_op


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the last axis of ``x`` ([..., S, H]) with ``cos``/``sin`` ([..., S, R/2]).

    The first ``R`` channels rotate (pairs ``(i, i + R/2)``, or ``(2i, 2i + 1)`` interleaved); the
    rest pass through.
    """
    rot = 2 * cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., : rot // 2], head[..., rot // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, tail), dim=-1) if tail.shape[-1] else out


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, S, n·H]`` → ``[B, n, S, H]``."""
    b, s, _ = x.shape
    return x.reshape(b, s, n, -1).transpose(1, 2)


@register_op(_MS_DOMAIN, "GroupQueryAttention")
def _group_query_attention(
    ctx, query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
    total_sequence_length=None, cos_cache=None, sin_cache=None, position_ids=None,
    attention_bias=None, head_sink=None,
):
    num_heads, kv_heads = int(ctx.attr("num_heads")), int(ctx.attr("kv_num_heads"))
    if ctx.output_used(3):
        raise ExecutionError("GroupQueryAttention: the output_qk output is not supported")
    b, s, width = query.shape
    if key is None:  # packed: Q, K and V side by side
        head = width // (num_heads + 2 * kv_heads)
        q, k, v = torch.split(query, [num_heads * head, kv_heads * head, kv_heads * head], dim=-1)
    else:
        head = width // num_heads
        q, k, v = query, key, value
    q, k, v = _heads(q, num_heads), _heads(k, kv_heads), _heads(v, kv_heads)

    total = int(torch.as_tensor(total_sequence_length).reshape(-1)[0])
    lengths = [int(n) + 1 for n in torch.as_tensor(seqlens_k).reshape(-1).tolist()]
    first_prompt = s == total
    pasts = [0 if first_prompt else n - s for n in lengths]
    if any(p < 0 for p in pasts):
        raise ExecutionError(f"GroupQueryAttention: seqlens_k {[n - 1 for n in lengths]} is shorter than the {s} new tokens")

    if ctx.attr("do_rotary", 0):
        if cos_cache is None or sin_cache is None:
            raise ExecutionError("GroupQueryAttention: do_rotary needs cos_cache and sin_cache")
        if position_ids is not None:
            positions = torch.as_tensor(position_ids).long().reshape(b, s)
        else:
            offsets = torch.arange(s, device=q.device)
            positions = torch.stack([p + offsets for p in pasts])
        cos = cos_cache[positions].unsqueeze(1).to(q.dtype)  # [B, 1, S, R/2]
        sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
        interleaved = bool(ctx.attr("rotary_interleaved", 0))
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)

    past_len = past_key.shape[2] if past_key is not None else 0
    present_len = max(past_len, total)
    rows_k, rows_v = [], []
    for i in range(b):
        parts_k = [past_key[i, :, : pasts[i]]] if past_key is not None and pasts[i] else []
        parts_v = [past_value[i, :, : pasts[i]]] if past_value is not None and pasts[i] else []
        if pasts[i] and past_key is None:
            raise ExecutionError("GroupQueryAttention: a continuation step needs past_key and past_value")
        end = pasts[i] + s
        pad = present_len - end
        row_k = torch.cat(parts_k + [k[i]], dim=1)
        row_v = torch.cat(parts_v + [v[i]], dim=1)
        if pad > 0:  # a shared buffer keeps its tail
            tail_k = past_key[i, :, end:] if past_key is not None and past_len >= present_len else k.new_zeros(kv_heads, pad, head)
            tail_v = past_value[i, :, end:] if past_value is not None and past_len >= present_len else v.new_zeros(kv_heads, pad, head)
            row_k, row_v = torch.cat((row_k, tail_k), dim=1), torch.cat((row_v, tail_v), dim=1)
        rows_k.append(row_k)
        rows_v.append(row_v)
    present_k, present_v = torch.stack(rows_k), torch.stack(rows_v)

    groups = num_heads // kv_heads
    keys = present_k.repeat_interleave(groups, dim=1)
    values = present_v.repeat_interleave(groups, dim=1)
    scale = ctx.attr("scale", 0.0) or 1.0 / math.sqrt(head)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [B, N, S, L]
    softcap = float(ctx.attr("softcap", 0.0) or 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_bias is not None:
        scores = scores + attention_bias[..., :present_len].to(scores.dtype)

    key_pos = torch.arange(present_len, device=q.device)
    window = int(ctx.attr("local_window_size", -1))
    masks = []
    for i in range(b):
        query_pos = (pasts[i] + torch.arange(s, device=q.device))[:, None]
        allowed = (key_pos[None, :] <= query_pos) & (key_pos[None, :] < lengths[i])
        if window > 0:
            allowed &= key_pos[None, :] > query_pos - window
        masks.append(allowed)
    mask = torch.stack(masks)[:, None]  # [B, 1, S, L]
    scores = scores.masked_fill(~mask, float("-inf"))

    if ctx.attr("smooth_softmax", 0) or head_sink is not None:
        sink = (
            head_sink.to(scores.dtype).reshape(1, num_heads, 1, 1).expand(b, num_heads, s, 1)
            if head_sink is not None else scores.new_zeros(b, num_heads, s, 1)
        )
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(b, s, num_heads * head)
    return [out, present_k, present_v][: ctx.num_outputs]


@register_op(_MS_DOMAIN, "RotaryEmbedding")
def _rotary_embedding(ctx, x, position_ids, cos_cache, sin_cache):
    interleaved = bool(ctx.attr("interleaved", 0))
    rot = int(ctx.attr("rotary_embedding_dim", 0) or 0)
    num_heads = int(ctx.attr("num_heads", 0) or 0)
    if ctx.attr("is_packed_batching", 0):
        raise ExecutionError("RotaryEmbedding: packed batching is not supported")
    if ctx.attr("scale", 1.0) not in (1.0, None):
        raise ExecutionError("RotaryEmbedding: a scale other than 1 is not supported")
    three_d = x.dim() == 3
    if three_d:  # [B, S, N·H]
        head = (x.shape[-1] // num_heads) if num_heads else 2 * cos_cache.shape[-1]
        x4 = x.reshape(x.shape[0], x.shape[1], -1, head).transpose(1, 2)
    else:  # [B, N, S, H]
        x4 = x
    b, _, s, _ = x4.shape
    if cos_cache.dim() == 3:  # already gathered per position: [B, S, R/2]
        cos, sin = cos_cache, sin_cache
    else:
        positions = torch.as_tensor(position_ids).long()
        if positions.numel() == 1:  # one start offset for every row
            positions = positions.reshape(1, 1) + torch.arange(s, device=x.device)[None]
        cos, sin = cos_cache[positions], sin_cache[positions]
    if rot:
        cos, sin = cos[..., : rot // 2], sin[..., : rot // 2]
    cos, sin = cos.unsqueeze(1).to(x4.dtype), sin.unsqueeze(1).to(x4.dtype)
    out = _rotate(x4, cos.expand(b, 1, s, -1), sin.expand(b, 1, s, -1), interleaved)
    return out.transpose(1, 2).reshape(x.shape) if three_d else out
