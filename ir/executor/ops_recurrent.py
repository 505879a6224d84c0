"""Recurrent operators: LSTM, GRU and RNN, unrolled over the sequence in torch (so autograd
differentiates through every step).

ONNX's conventions: ``X`` is (seq, batch, in) (``layout=1``: (batch, seq, in)); ``W`` is
(directions, gates · hidden, in), ``R`` (directions, gates · hidden, hidden), ``B`` the input
then the recurrent biases, (directions, 2 · gates · hidden); gates in the order ``iofc`` (LSTM),
``zrh`` (GRU). ``Y`` is (seq, directions, batch, hidden), ``Y_h``/``Y_c`` (directions, batch,
hidden). With ``sequence_lens``, a batch entry's steps past its length leave its state as it was
and write zeros to ``Y``; the reverse direction starts at each entry's last step.
"""

from __future__ import annotations

import torch

from hessc.errors import UnsupportedError
from hessc.ir.executor.registry import register_op

_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}


def _activations(ctx, defaults: list[str]) -> list:
    names = ctx.attr("activations") or defaults
    if ctx.attr("activation_alpha") or ctx.attr("activation_beta"):
        raise UnsupportedError(f"{ctx.node.op_type} with activation_alpha/activation_beta")
    fns = []
    for name in names:
        name = name.decode() if isinstance(name, bytes) else name
        if name not in _ACTIVATIONS:
            raise UnsupportedError(f"{ctx.node.op_type} with the {name} activation")
        fns.append(_ACTIVATIONS[name])
    return fns


def _directions(ctx) -> list[bool]:
    """Per direction, whether it runs in reverse."""
    direction = ctx.attr("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


def _run(ctx, x, w, r, b, lens, initial, step, gates: int, states: int):
    """Unrolls ``step(x_t W^T + wb, h, r, rb, state) -> state`` (``state[0]`` is ``H``) over the
    sequence in each direction; returns ``Y`` and the last state of each kind."""
    layout = ctx.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        initial = [None if s is None else s.transpose(0, 1) for s in initial]
    seq, batch, _ = x.shape
    hidden = ctx.attr("hidden_size") or r.shape[-1]
    ys, lasts = [], [[] for _ in range(states)]
    for d, reverse in enumerate(_directions(ctx)):
        wb = rb = 0
        if b is not None:
            wb, rb = b[d, : gates * hidden], b[d, gates * hidden:]
        projected = x @ w[d].transpose(0, 1) + wb  # every step's input projection at once
        state = [initial[k][d] if initial[k] is not None else x.new_zeros(batch, hidden) for k in range(states)]
        out = [None] * seq
        for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
            new = step(d, projected[t], r[d], rb, state)
            if lens is not None:
                live = (t < lens).to(x.dtype).unsqueeze(1)
                new = [live * n + (1 - live) * s for n, s in zip(new, state)]
                out[t] = live * new[0]
            else:
                out[t] = new[0]
            state = new
        ys.append(torch.stack(out))
        for k in range(states):
            lasts[k].append(state[k])
    y = torch.stack(ys, dim=1)  # (seq, directions, batch, hidden)
    finals = [torch.stack(s) for s in lasts]
    if layout:
        y = y.permute(2, 0, 1, 3)  # (batch, seq, directions, hidden)
        finals = [f.transpose(0, 1) for f in finals]
    return (y, *finals)[: ctx.num_outputs]


def _clip(ctx):
    limit = ctx.attr("clip")
    return (lambda v: v) if limit is None else (lambda v: torch.clamp(v, -limit, limit))


@register_op("", "LSTM", 7)
def _lstm(ctx, x, w, r, b=None, lens=None, h0=None, c0=None, p=None):
    if ctx.attr("input_forget", 0):
        raise UnsupportedError("LSTM with input_forget=1")
    acts = _activations(ctx, ["Sigmoid", "Tanh", "Tanh"] * len(_directions(ctx)))
    clip = _clip(ctx)
    hidden = r.shape[-1]

    def step(d, xw, rd, rb, state):
        f_act, g_act, h_act = acts[3 * d: 3 * d + 3]
        h, c = state
        z = xw + h @ rd.transpose(0, 1) + rb
        i, o, f, cand = z.split(hidden, dim=-1)
        if p is not None:
            pi, po, pf = p[d].split(hidden)
            i, f = i + pi * c, f + pf * c
        i, f = f_act(clip(i)), f_act(clip(f))
        c = f * c + i * g_act(clip(cand))
        if p is not None:
            o = o + po * c
        return [f_act(clip(o)) * h_act(c), c]

    return _run(ctx, x, w, r, b, lens, [h0, c0], step, gates=4, states=2)


@register_op("", "GRU", 7)
def _gru(ctx, x, w, r, b=None, lens=None, h0=None):
    acts = _activations(ctx, ["Sigmoid", "Tanh"] * len(_directions(ctx)))
    clip = _clip(ctx)
    hidden = r.shape[-1]
    before_reset = bool(ctx.attr("linear_before_reset", 0))

    def step(d, xw, rd, rb, state):
        f_act, g_act = acts[2 * d: 2 * d + 2]
        (h,) = state
        xz, xr, xh = xw.split(hidden, dim=-1)
        rz, rr, rh = rd.split(hidden, dim=0)
        bz, br, bh = rb.split(hidden) if isinstance(rb, torch.Tensor) else (0, 0, 0)
        zt = f_act(clip(xz + h @ rz.transpose(0, 1) + bz))
        rt = f_act(clip(xr + h @ rr.transpose(0, 1) + br))
        if before_reset:
            ht = g_act(clip(xh + rt * (h @ rh.transpose(0, 1) + bh)))
        else:
            ht = g_act(clip(xh + (rt * h) @ rh.transpose(0, 1) + bh))
        return [(1 - zt) * ht + zt * h]

    return _run(ctx, x, w, r, b, lens, [h0], step, gates=3, states=1)


@register_op("", "RNN", 7)
def _rnn(ctx, x, w, r, b=None, lens=None, h0=None):
    acts = _activations(ctx, ["Tanh"] * len(_directions(ctx)))
    clip = _clip(ctx)

    def step(d, xw, rd, rb, state):
        (h,) = state
        return [acts[d](clip(xw + h @ rd.transpose(0, 1) + rb))]

    return _run(ctx, x, w, r, b, lens, [h0], step, gates=1, states=1)
