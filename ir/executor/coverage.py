"""Reports on the torch executor: operator coverage of a model, and deviation from ONNX Runtime."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from hessc.ir import frontend
from hessc.ir.executor.core import ExecutionError, TorchExecutor, _opset_of
from hessc.ir.executor.registry import _domain_label, _norm_domain, lookup_op

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# reports


def _model_ops(model: ir.Model) -> collections.Counter[tuple[str, str, int]]:
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
    opsets = dict(model.opset_imports)
    for graph in frontend.graphs(model):
        for node in graph:
            domain = _norm_domain(node.domain)
            counts[(domain, node.op_type, _opset_of(opsets, domain))] += 1
    return counts


def coverage_report(model: ir.Model) -> dict[str, Any]:
    """Which operators of a model (subgraphs included) the torch executor supports.

    Args:
        model: the model to inspect.

    Returns:
        ``{"ops": {"domain::op_type": {"opset", "count", "supported"}}, "supported": [...],
        "unsupported": [...], "all_supported": bool}`` with op keys sorted.
    """
    ops: dict[str, dict[str, Any]] = {}
    for (domain, op_type, opset), count in sorted(_model_ops(model).items()):
        key = f"{_domain_label(domain)}::{op_type}"
        ops[key] = {
            "opset": opset,
            "count": count,
            "supported": lookup_op(domain, op_type, opset) is not None,
        }
    unsupported = [k for k, v in ops.items() if not v["supported"]]
    return {
        "ops": ops,
        "supported": [k for k, v in ops.items() if v["supported"]],
        "unsupported": unsupported,
        "all_supported": not unsupported,
    }


def _ort_session(model: ir.Model):
    """ORT with graph optimizations off (models with external data go through a temporary file)."""
    from hessc.runtime import sessions

    return sessions.session(model, "cpu", optimize=False).inner


def max_deviation_vs_ort(
    model: ir.Model,
    feeds: Mapping[str, Any],
    dtype: torch.dtype | None = torch.float32,
    outputs: Sequence[str] | None = None,
) -> float:
    """Largest relative deviation of the torch executor from ONNX Runtime on one input.

    ORT runs with its graph optimizations off. Per output the deviation is
    ``max|torch - ort| / max|ort|`` (absolute when the ORT output is all zero); the largest is
    returned. Non-float outputs are compared exactly the same way.

    Args:
        model: the model.
        feeds: graph inputs as numpy arrays.
        dtype: the executor's compute dtype.
        outputs: graph outputs to compare; defaults to all.

    Returns:
        The largest relative deviation over the compared outputs.
    """
    np_feeds = {
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in feeds.items()
    }
    names = list(outputs) if outputs is not None else [v.name for v in model.graph.outputs]
    ref = _ort_session(model).run(names, np_feeds)
    with torch.no_grad():
        got = TorchExecutor(model, dtype=dtype).run(np_feeds, outputs=names)
    worst = 0.0
    for name, r in zip(names, ref):
        r64 = np.asarray(r, dtype=np.float64)
        g64 = got[name].detach().to(torch.float64).cpu().numpy()
        if r64.shape != g64.shape:
            raise ExecutionError(f"output {name!r}: shape {g64.shape} vs ORT {r64.shape}")
        if r64.size == 0:
            continue
        diff = float(np.max(np.abs(g64 - r64)))
        scale = float(np.max(np.abs(r64)))
        dev = diff / scale if scale > 0 else diff
        logger.debug("output %s: max abs diff %.3g, relative %.3g", name, diff, dev)
        worst = max(worst, dev)
    return worst
