"""Control-flow operators (default domain): If and Loop, which run their subgraphs."""

from __future__ import annotations

import onnx_ir as ir
import torch

from hessc.ir.executor.core import _scalar
from hessc.ir.executor.registry import register_op


# ---- control flow


@register_op("", "If")
def _if(ctx, cond):
    branch = ctx.attr("then_branch") if bool(_scalar(cond)) else ctx.attr("else_branch")
    outs = ctx.run_subgraph(branch, [])
    return outs if len(outs) > 1 else outs[0]


@register_op("", "Loop")
def _loop(ctx, max_trip=None, cond=None, *carried):
    body: ir.Graph = ctx.attr("body")
    n_carried = len(carried)
    trips = int(_scalar(max_trip)) if max_trip is not None else None
    keep_going = bool(_scalar(cond)) if cond is not None else True
    state = list(carried)
    scans: list[list[torch.Tensor]] = [[] for _ in range(len(body.outputs) - 1 - n_carried)]
    i = 0
    while keep_going and (trips is None or i < trips):
        outs = ctx.run_subgraph(
            body,
            [
                torch.tensor(i, dtype=torch.int64, device=ctx.device),
                torch.tensor(keep_going, device=ctx.device),
                *state,
            ],
        )
        keep_going = bool(_scalar(outs[0]))
        state = list(outs[1 : 1 + n_carried])
        for s, v in zip(scans, outs[1 + n_carried :]):
            s.append(v)
        i += 1
    stacked = [torch.stack(s) if s else torch.zeros(0, device=ctx.device) for s in scans]
    result = state + stacked
    return result if len(result) != 1 else result[0]
