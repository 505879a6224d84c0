"""A differentiable torch executor for ``onnx_ir`` models.

Each ONNX operator is mapped to a torch function through a registry keyed by
``(domain, op_type, since_version)``; running a graph is a walk over its nodes in order, so every
value is an ordinary torch tensor and ``torch.autograd`` / ``torch.func`` differentiate through the
whole model. That is what lets the curvature passes compute, on an ONNX-only model,

    ∇_W L,    H v = ∇_W (∇_W L · v)    and    ∂L/∂x_l

for any initializer ``W`` (selected by name, or swapped per call through ``overrides``) and any
intermediate value ``x_l`` (returned by name through ``outputs``).

Conventions:
    * Floating-point values (initializers, inputs, ``Cast`` targets, constants) are computed in one
      dtype, ``float32`` by default or ``float64`` for exact Hessian tests; ``dtype=None`` keeps the
      model's own float types.
    * Integer values stay integer tensors; shape-valued tensors (``Shape`` → ``Reshape``) are read
      back to python ints where an op needs them, so dynamic sizes come from the actual tensors.
    * Sub-4-bit ONNX integer types (``INT4``/``UINT4``/``INT2``/``UINT2``) are held unpacked in
      ``int8``/``uint8`` tensors.

Example:
    >>> ex = TorchExecutor(model, dtype=torch.float64)
    >>> (w,) = ex.make_trainable(["lm_head.weight"]).values()
    >>> loss = ex.run({"input_ids": ids})["logits"].logsumexp(-1).mean()
    >>> (g,) = torch.autograd.grad(loss, [w])
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from hessc.errors import InputError, UnsupportedError
from hessc.ir import frontend

logger = logging.getLogger(__name__)

__all__ = [
    "ExecutionError",
    "OpContext",
    "TorchExecutor",
    "coverage_report",
    "lookup_op",
    "max_deviation_vs_ort",
    "register_op",
    "supported_ops",
]

OpFunction = Callable[..., Any]
"""``fn(ctx: OpContext, *inputs) -> Tensor | Sequence[Tensor]``; absent optional inputs are None."""

_MS_DOMAIN = "com.microsoft"
_REGISTRY: dict[tuple[str, str], list[tuple[int, OpFunction]]] = collections.defaultdict(list)


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _domain_label(domain: str) -> str:
    return "ai.onnx" if domain == "" else domain


def register_op(
    domain: str, op_type: str, since_version: int = 1
) -> Callable[[OpFunction], OpFunction]:
    """Register a torch implementation of an ONNX operator.

    Lookups pick the entry with the highest ``since_version`` not above the model's opset for the
    domain, so an operator whose semantics changed is registered once per changing version.

    Args:
        domain: operator domain (``""`` or ``"ai.onnx"`` for the default domain).
        op_type: operator name, e.g. ``"MatMul"``.
        since_version: first opset version this implementation applies to.

    Returns:
        A decorator that registers ``fn(ctx, *inputs)`` and returns it unchanged.
    """

    def deco(fn: OpFunction) -> OpFunction:
        entries = _REGISTRY[(_norm_domain(domain), op_type)]
        entries[:] = [e for e in entries if e[0] != since_version]
        entries.append((since_version, fn))
        entries.sort(key=lambda e: e[0])
        return fn

    return deco


def lookup_op(domain: str, op_type: str, opset: int) -> OpFunction | None:
    """The implementation registered for ``domain::op_type`` at ``opset``, or None."""
    best = None
    for since, fn in _REGISTRY.get((_norm_domain(domain), op_type), ()):
        if since <= opset:
            best = fn
    return best


def supported_ops() -> list[str]:
    """Every registered operator as ``"domain::op_type"``, sorted."""
    return sorted(f"{_domain_label(d)}::{o}" for (d, o) in _REGISTRY)


class ExecutionError(RuntimeError):
    """An operator failed while running; the message names the node and the operator."""


# --------------------------------------------------------------------------------------------------
# dtypes and tensor conversion

_FLOAT_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E4M3FNUZ,
        ir.DataType.FLOAT8E5M2,
        ir.DataType.FLOAT8E5M2FNUZ,
        ir.DataType.FLOAT4E2M1,
        ir.DataType.FLOAT8E8M0,
    }
)

# Types torch lacks are widened (unsigned to the next signed type, sub-byte ints to 8 bits).
_TORCH_DTYPES: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.INT16: torch.int16,
    ir.DataType.UINT16: torch.int32,
    ir.DataType.INT32: torch.int32,
    ir.DataType.UINT32: torch.int64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.UINT64: torch.int64,
    ir.DataType.BOOL: torch.bool,
    ir.DataType.INT4: torch.int8,
    ir.DataType.UINT4: torch.uint8,
    ir.DataType.INT2: torch.int8,
    ir.DataType.UINT2: torch.uint8,
}

_QUANT_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT2: (-2, 1),
    ir.DataType.UINT2: (0, 3),
}


def _torch_dtype(dtype: ir.DataType, float_dtype: torch.dtype | None) -> torch.dtype:
    if dtype in _FLOAT_TYPES:
        if float_dtype is not None:
            return float_dtype
        return _TORCH_DTYPES.get(dtype, torch.float32)
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise UnsupportedError(f"ONNX type {dtype.name} has no torch equivalent") from None


def _ir_tensor_to_torch(tensor: ir.TensorProtocol, float_dtype: torch.dtype | None) -> torch.Tensor:
    """Convert an IR tensor (initializer or attribute) to a fresh torch tensor."""
    arr = np.asarray(tensor.numpy())
    dtype = tensor.dtype
    target = _torch_dtype(dtype, float_dtype)
    if dtype in _FLOAT_TYPES:
        np_dtype = np.float64 if dtype == ir.DataType.DOUBLE else np.float32
        arr = arr.astype(np_dtype)
    elif dtype in (ir.DataType.INT4, ir.DataType.INT2):
        arr = arr.astype(np.int8)
    elif dtype in (ir.DataType.UINT4, ir.DataType.UINT2):
        arr = arr.astype(np.uint8)
    elif dtype in (ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64):
        arr = arr.astype(np.int64)
    else:
        arr = np.array(arr, copy=True)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(target)


def _ints(x: Any) -> list[int]:
    """A shape-like value (tensor, sequence or scalar) as a list of python ints."""
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    return [int(x)]


def _scalar(x: Any) -> Any:
    return x.reshape(-1)[0].item() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------------------------------
# the executor


@dataclasses.dataclass
class OpContext:
    """What an operator implementation sees besides its inputs.

    Attributes:
        node: the IR node being run.
        opset: the opset version of the node's domain.
        attrs: the node's attributes as python values (tensors stay ``ir`` tensors, graphs stay
            ``ir.Graph``).
        executor: the running :class:`TorchExecutor`.
        scope: the value environment at the call (used to run subgraphs).
    """

    node: ir.Node
    opset: int
    attrs: dict[str, Any]
    executor: TorchExecutor
    scope: Mapping[ir.Value, Any] | None = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute value, or ``default`` when the node does not carry it."""
        return self.attrs.get(name, default)

    @property
    def num_outputs(self) -> int:
        """How many outputs the node declares."""
        return len(self.node.outputs)

    def output_used(self, index: int) -> bool:
        """Whether the node's ``index``-th output exists and has a name."""
        outs = self.node.outputs
        return index < len(outs) and bool(outs[index].name)

    @property
    def device(self) -> torch.device:
        """The device new tensors are created on."""
        return self.executor.device

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The executor's compute dtype for floating-point values."""
        return self.executor.dtype

    def torch_dtype(self, dtype: ir.DataType | int) -> torch.dtype:
        """The torch dtype used for an ONNX type (floats map to the compute dtype)."""
        return _torch_dtype(ir.DataType(dtype), self.executor.dtype)

    def to_torch(self, tensor: ir.TensorProtocol) -> torch.Tensor:
        """Convert an IR tensor attribute with the executor's dtype rules, on its device."""
        return _ir_tensor_to_torch(tensor, self.executor.dtype).to(self.device)

    def run_subgraph(self, graph: ir.Graph, inputs: Sequence[Any]) -> list[Any]:
        """Run a subgraph (If/Loop body) in the current scope; returns its outputs."""
        return self.executor._run_subgraph(graph, inputs, self.scope or {})


@dataclasses.dataclass
class _Step:
    node: ir.Node
    fn: OpFunction | None
    ctx: OpContext
    label: str
    deps: tuple[ir.Value, ...]


def _attr_value(attr: ir.Attr) -> Any:
    if attr.is_ref():
        raise UnsupportedError(f"attribute reference {attr.name!r} outside a function")
    value = attr.value
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(value)
    return value


def _opset_of(opsets: Mapping[str, int], domain: str) -> int:
    domain = _norm_domain(domain)
    if domain == "":
        return opsets.get("", opsets.get("ai.onnx", 1))
    return opsets.get(domain, 1)


def _captured(graph: ir.Graph) -> set[ir.Value]:
    """Values a subgraph reads from enclosing scopes."""
    local: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    needed: set[ir.Value] = set()
    for node in graph:
        for v in node.inputs:
            if v is not None and v not in local:
                needed.add(v)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                needed |= {v for v in _captured(attr.value) if v not in local}
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    needed |= {v for v in _captured(g) if v not in local}
        local.update(node.outputs)
    for v in graph.outputs:
        if v not in local:
            needed.add(v)
    return needed


class TorchExecutor(torch.nn.Module):
    """Run an ``onnx_ir.Model`` with torch ops, differentiably.

    Initializers become torch tensors (``weights``); :meth:`make_trainable` turns chosen ones into
    ``nn.Parameter`` s, and :meth:`run` takes per-call ``overrides`` so ``torch.func`` transforms
    can treat any weight as a function argument.

    Args:
        model: the model to run (not modified).
        dtype: compute dtype of every floating-point value; None keeps the model's float types.
        strict: raise :class:`hessc.errors.UnsupportedError` at construction when an operator has
            no implementation; when False the executor is built anyway, :meth:`unsupported_ops`
            lists the gaps and running such a node raises.

    Raises:
        UnsupportedError: ``strict`` and some operator (listed in the message) is not supported.
    """

    def __init__(
        self, model: ir.Model, dtype: torch.dtype | None = torch.float32, strict: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self._opsets = dict(model.opset_imports)
        self._values_by_name: dict[str, ir.Value] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._weight_values: dict[ir.Value, str] = {}
        self._weight_keys: dict[str, ir.Value] = {}
        self._trainable = torch.nn.ParameterDict()
        self._steps: dict[ir.Graph, list[_Step]] = {}
        self._unsupported: list[str] = []
        self._plans: dict[tuple[str, ...], tuple[list[_Step], dict[ir.Value, int]]] = {}

        for graph in frontend.graphs(model):
            for v in graph.inputs:
                self._name(v)
            for name, v in graph.initializers.items():
                self._name(v)
                if v.const_value is None:
                    raise InputError(f"initializer {name!r} has no data")
                key = name if name not in self._weights else f"{graph.name}/{name}"
                if key != name:
                    logger.debug("subgraph initializer %r shadows a name; kept as %r", name, key)
                self._weights[key] = _ir_tensor_to_torch(v.const_value, dtype)
                self._weight_values[v] = key
                self._weight_keys[key] = v
            steps = []
            for node in graph:
                for v in node.outputs:
                    self._name(v)
                steps.append(self._compile(node))
            self._steps[graph] = steps
        if self._unsupported:
            msg = "unsupported operators: " + "; ".join(self._unsupported)
            if strict:
                raise UnsupportedError(msg)
            logger.warning(msg)
        logger.debug(
            "TorchExecutor: %d nodes, %d initializers, dtype %s",
            sum(len(s) for s in self._steps.values()),
            len(self._weights),
            dtype,
        )

    # ---------------------------------------------------------------- construction helpers

    def _name(self, value: ir.Value) -> None:
        if value.name:
            self._values_by_name.setdefault(value.name, value)

    def _compile(self, node: ir.Node) -> _Step:
        opset = _opset_of(self._opsets, node.domain)
        if node.graph is not None and node.graph is not self.model.graph:
            opset = _opset_of({**self._opsets, **node.graph.opset_imports}, node.domain)
        label = f"{_domain_label(_norm_domain(node.domain))}::{node.op_type} (opset {opset})"
        fn = lookup_op(node.domain, node.op_type, opset)
        if fn is None:
            self._unsupported.append(f"{label} at node {node.name!r}")
        attrs = {name: _attr_value(a) for name, a in node.attributes.items()}
        ctx = OpContext(node=node, opset=opset, attrs=attrs, executor=self)
        deps: set[ir.Value] = {v for v in node.inputs if v is not None}
        for a in node.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                deps |= _captured(a.value)
            elif a.type == ir.AttributeType.GRAPHS:
                for g in a.value:
                    deps |= _captured(g)
        return _Step(node=node, fn=fn, ctx=ctx, label=label, deps=tuple(deps))

    # ---------------------------------------------------------------- public API

    def unsupported_ops(self) -> list[str]:
        """Nodes whose operator has no implementation: ``"domain::op (opset n) at node 'x'"``."""
        return list(self._unsupported)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Initializer tensors by value name (trainable ones are their ``nn.Parameter``)."""
        return dict(self._weights)

    @property
    def input_names(self) -> list[str]:
        """Names of the main graph's inputs that are not initializers."""
        inits = self.model.graph.initializers
        return [v.name for v in self.model.graph.inputs if v.name not in inits]

    @property
    def output_names(self) -> list[str]:
        """Names of the main graph's outputs."""
        return [v.name for v in self.model.graph.outputs]

    def value_names(self) -> list[str]:
        """Every named value of the model (inputs, initializers, node outputs, subgraphs too)."""
        return list(self._values_by_name)

    def make_trainable(self, names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
        """Turn initializers into ``requires_grad`` parameters registered on this module.

        Args:
            names: initializer value names.

        Returns:
            The parameters by value name; they replace the initializers in every later run.

        Raises:
            InputError: a name is not an initializer, or is not floating point.
        """
        out: dict[str, torch.nn.Parameter] = {}
        for name in names:
            if name not in self._weights:
                raise InputError(f"{name!r} is not an initializer of the model")
            w = self._weights[name]
            if not isinstance(w, torch.nn.Parameter):
                if not w.is_floating_point():
                    raise InputError(f"initializer {name!r} is {w.dtype}; only floats train")
                w = torch.nn.Parameter(w.detach().clone(), requires_grad=True)
                self._weights[name] = w
                key = re.sub(r"[^0-9A-Za-z_]", "_", name)
                while key in self._trainable:
                    key += "_"
                self._trainable[key] = w
            out[name] = w
        return out

    def forward(self, *args: Any, **feeds: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the model like a module: positional inputs in graph order, or by name.

        Returns:
            The single graph output, or a tuple of them in graph order.
        """
        names = self.input_names
        if len(args) > len(names):
            raise InputError(f"model takes {len(names)} inputs, got {len(args)}")
        all_feeds = dict(zip(names, args))
        all_feeds.update(feeds)
        result = self.run(all_feeds)
        outs = tuple(result[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run(
        self,
        feeds: Mapping[str, Any] | Sequence[Any],
        outputs: Sequence[str] | None = None,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the main graph.

        Args:
            feeds: graph inputs by name (numpy arrays, torch tensors or python numbers), or a
                sequence in graph-input order. Floats are cast to the compute dtype, other types to
                the declared input type.
            outputs: names of the values to return (any value: inputs, initializers,
                intermediates, graph outputs); defaults to the graph outputs. Only the nodes they
                need are run.
            overrides: tensors that replace named values for this call: initializers (the usual
                case, e.g. under ``torch.func.grad``), ``Constant`` outputs or intermediates (a
                node whose outputs are all overridden is skipped). Used as given, not cast.

        Returns:
            The requested values by name.

        Raises:
            InputError: an unknown name, or a missing graph input.
            ExecutionError: an operator failed; the message names the node.
        """
        graph = self.model.graph
        wanted = list(outputs) if outputs is not None else self.output_names
        env: dict[ir.Value, Any] = {v: self._weights[k] for v, k in self._weight_values.items()}
        if not isinstance(feeds, Mapping):
            feeds = dict(zip(self.input_names, feeds))
        for name, x in feeds.items():
            value = self._values_by_name.get(name)
            if value is None or value not in graph.inputs:
                raise InputError(
                    f"{name!r} is not an input of the model; inputs: {self.input_names}"
                )
            env[value] = self._feed_tensor(value, x)
        override_values: set[ir.Value] = set()
        for name, x in (overrides or {}).items():
            value = self._weight_keys.get(name) or self._values_by_name.get(name)
            if value is None:
                raise InputError(f"override {name!r} names no value of the model")
            env[value] = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
            override_values.add(value)
        targets = []
        for name in wanted:
            value = self._values_by_name.get(name)
            if value is None:
                raise InputError(f"requested output {name!r} names no value of the model")
            targets.append(value)
        missing = [
            v.name for v in graph.inputs if v not in env and v.name not in graph.initializers
        ]
        plan, last_use = self._plan(tuple(wanted), frozenset(override_values))
        needed_missing = [
            n for n in missing if self._values_by_name[n] in last_use or n in wanted
        ]
        if needed_missing:
            raise InputError(f"missing graph inputs: {needed_missing}")
        keep = set(targets)
        self._execute(plan, env, override_values, last_use, keep)
        return {name: env[v] for name, v in zip(wanted, targets)}

    # ---------------------------------------------------------------- execution

    def _feed_tensor(self, value: ir.Value, x: Any) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if value.dtype is not None and value.dtype != ir.DataType.UNDEFINED:
            target = _torch_dtype(value.dtype, self.dtype)
        elif t.is_floating_point() and self.dtype is not None:
            target = self.dtype
        else:
            target = t.dtype
        return t.to(device=self.device, dtype=target)

    @property
    def device(self) -> torch.device:
        """The device the weights live on (CPU unless the module was moved with ``.to``)."""
        for w in self._weights.values():
            return w.device
        return torch.device("cpu")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kw: Any):
        # nn.Module.to()/.cuda() only see parameters and buffers; move the plain weights too.
        super()._apply(fn, *args, **kw)
        for key, w in self._weights.items():
            if not isinstance(w, torch.nn.Parameter):
                self._weights[key] = fn(w)
        return self

    def _plan(
        self, wanted: tuple[str, ...], overridden: frozenset[ir.Value]
    ) -> tuple[list[_Step], dict[ir.Value, int]]:
        """The steps needed for ``wanted`` and, per value, the index of its last reader."""
        key = (*wanted, "|", *sorted(v.name for v in overridden))
        if key in self._plans:
            return self._plans[key]
        steps = self._steps[self.model.graph]
        need = {self._values_by_name[n] for n in wanted}
        chosen: list[int] = []
        for i in range(len(steps) - 1, -1, -1):
            step = steps[i]
            outs = [v for v in step.node.outputs if v.name]
            if not any(v in need for v in step.node.outputs):
                continue
            if outs and all(v in overridden for v in outs):
                continue
            chosen.append(i)
            need.update(step.deps)
        chosen.reverse()
        plan = [steps[i] for i in chosen]
        last_use: dict[ir.Value, int] = {}
        for j, step in enumerate(plan):
            for v in step.deps:
                last_use[v] = j
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = (plan, last_use)
        return plan, last_use

    def _execute(
        self,
        plan: Sequence[_Step],
        env: dict[ir.Value, Any] | collections.ChainMap,
        overridden: set[ir.Value],
        last_use: Mapping[ir.Value, int] | None,
        keep: set[ir.Value],
    ) -> None:
        for j, step in enumerate(plan):
            node = step.node
            if overridden and all(v in overridden for v in node.outputs if v.name):
                continue
            if step.fn is None:
                raise ExecutionError(
                    f"no torch implementation of {step.label} (node {node.name!r}); "
                    "register one with hessc.ir.executor.register_op"
                )
            try:
                args = [None if v is None else env[v] for v in node.inputs]
            except KeyError as e:
                raise ExecutionError(
                    f"node {node.name!r} ({step.label}) reads {e.args[0].name!r}, "
                    "which has no value (missing input?)"
                ) from None
            step.ctx.scope = env
            try:
                result = step.fn(step.ctx, *args)
            except (ExecutionError, InputError, UnsupportedError):
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the node named
                raise ExecutionError(f"{step.label} failed at node {node.name!r}: {e}") from e
            finally:
                step.ctx.scope = None
            if isinstance(result, (list, tuple)):
                for v, r in zip(node.outputs, result):
                    if v.name and v not in overridden:
                        env[v] = r
            else:
                v = node.outputs[0]
                if v not in overridden:
                    env[v] = result
            if last_use is not None:
                for v in step.deps:
                    if last_use.get(v) == j and v not in keep and v.producer() is not None:
                        env.pop(v, None)

    def _run_subgraph(
        self, graph: ir.Graph, inputs: Sequence[Any], scope: Mapping[ir.Value, Any]
    ) -> list[Any]:
        # subgraph initializers were put in the top-level environment by run()
        local: dict[ir.Value, Any] = {}
        for v, x in zip(graph.inputs, inputs):
            local[v] = x
        env = collections.ChainMap(local, scope)  # type: ignore[arg-type]
        self._execute(self._steps[graph], env, set(), None, set())
        return [env[v] for v in graph.outputs]


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


# ==================================================================================================
# operator implementations (default domain)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _register_unary(op: str, fn: Callable[[torch.Tensor], torch.Tensor], since: int = 1) -> None:
    register_op("", op, since)(lambda ctx, x: fn(x))


for _op, _fn in {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softsign": F.softsign,
    "Softplus": F.softplus,
    "Mish": F.mish,
    "Identity": lambda x: x,
}.items():
    _register_unary(_op, _fn)


@register_op("", "Add")
def _add(ctx, a, b):
    return a + b


@register_op("", "Sub")
def _sub(ctx, a, b):
    return a - b


@register_op("", "Mul")
def _mul(ctx, a, b):
    return a * b


@register_op("", "Div")
def _div(ctx, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@register_op("", "Pow")
def _pow(ctx, a, b):
    r = torch.pow(a, b)
    return r if r.dtype == a.dtype else r.to(a.dtype)


@register_op("", "Mod")
def _mod(ctx, a, b):
    if ctx.attr("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@register_op("", "BitShift")
def _bitshift(ctx, a, b):
    left = ctx.attr("direction") == "LEFT"
    return torch.bitwise_left_shift(a, b) if left else torch.bitwise_right_shift(a, b)


for _op, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}.items():
    register_op("", _op)(functools.partial(lambda fn, ctx, a, b: fn(a, b), _fn))


@register_op("", "IsInf")
def _isinf(ctx, x):
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@register_op("", "Where")
def _where(ctx, c, a, b):
    return torch.where(c, a, b)


def _variadic(fn):
    return lambda ctx, *xs: functools.reduce(fn, [x for x in xs if x is not None])


register_op("", "Max")(_variadic(torch.maximum))
register_op("", "Min")(_variadic(torch.minimum))
register_op("", "Sum")(_variadic(torch.add))


@register_op("", "Mean")
def _mean(ctx, *xs):
    xs = [x for x in xs if x is not None]
    return functools.reduce(torch.add, xs) / len(xs)


# ---- activations


@register_op("", "Gelu", 20)
def _gelu(ctx, x):
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


@register_op("", "LeakyRelu")
def _leaky_relu(ctx, x):
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@register_op("", "Elu")
def _elu(ctx, x):
    return F.elu(x, ctx.attr("alpha", 1.0))


@register_op("", "Celu")
def _celu(ctx, x):
    return F.celu(x, ctx.attr("alpha", 1.0))


@register_op("", "Selu")
def _selu(ctx, x):
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register_op("", "HardSigmoid")
def _hard_sigmoid(ctx, x):
    return torch.clamp(ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5), 0, 1)


@register_op("", "HardSwish")
def _hard_swish(ctx, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@register_op("", "PRelu")
def _prelu(ctx, x, slope):
    return torch.where(x >= 0, x, x * slope)


@register_op("", "ThresholdedRelu")
def _thresholded_relu(ctx, x):
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros_like(x))


@register_op("", "Clip")
def _clip_v1(ctx, x):
    return torch.clamp(x, ctx.attr("min", -math.inf), ctx.attr("max", math.inf))


@register_op("", "Clip", 11)
def _clip(ctx, x, lo=None, hi=None):
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _softmax_2d(fn):
    def impl(ctx, x):
        axis = _axis(ctx.attr("axis", 1), x.dim())
        shape = x.shape
        flat = x.reshape(math.prod(shape[:axis]), -1)
        return fn(flat, dim=1).reshape(shape)

    return impl


def _softmax_axis(fn):
    return lambda ctx, x: fn(x, dim=ctx.attr("axis", -1))


register_op("", "Softmax")(_softmax_2d(torch.softmax))
register_op("", "Softmax", 13)(_softmax_axis(torch.softmax))
register_op("", "LogSoftmax")(_softmax_2d(torch.log_softmax))
register_op("", "LogSoftmax", 13)(_softmax_axis(torch.log_softmax))


# ---- type and shape ops


@register_op("", "Cast")
def _cast(ctx, x):
    return x.to(ctx.torch_dtype(ctx.attr("to")))


@register_op("", "CastLike")
def _cast_like(ctx, x, like):
    return x.to(like.dtype)


@register_op("", "Shape")
def _shape(ctx, x):
    dims = list(x.shape)
    rank = len(dims)
    start = ctx.attr("start", 0)
    end = ctx.attr("end", rank)
    return torch.tensor(dims[start:end], dtype=torch.int64, device=ctx.device)


@register_op("", "Size")
def _size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=ctx.device)


@register_op("", "Reshape", 5)
def _reshape(ctx, x, shape):
    dims = _ints(shape)
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register_op("", "Flatten")
def _flatten(ctx, x):
    axis = _axis(ctx.attr("axis", 1), x.dim())
    outer = math.prod(x.shape[:axis])
    return x.reshape(outer, math.prod(x.shape[axis:]))


@register_op("", "Transpose")
def _transpose(ctx, x):
    perm = ctx.attr("perm") or list(range(x.dim() - 1, -1, -1))
    return x.permute(perm)


def _axes_arg(ctx, axes_input) -> list[int] | None:
    if axes_input is not None:
        return _ints(axes_input)
    axes = ctx.attr("axes")
    return list(axes) if axes is not None else None


@register_op("", "Unsqueeze")
def _unsqueeze(ctx, x, axes=None):
    axes = _axes_arg(ctx, axes) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@register_op("", "Squeeze")
def _squeeze(ctx, x, axes=None):
    axes = _axes_arg(ctx, axes)
    if axes is None:
        return x.squeeze()
    axes = [_axis(a, x.dim()) for a in axes]
    return x.squeeze(tuple(axes)) if axes else x


@register_op("", "Concat")
def _concat(ctx, *xs):
    return torch.cat([x for x in xs if x is not None], dim=ctx.attr("axis"))


@register_op("", "Split")
def _split(ctx, x, split=None):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    sizes = _ints(split) if split is not None else ctx.attr("split")
    if not sizes:
        n = ctx.attr("num_outputs", ctx.num_outputs)
        chunk = -(-x.shape[axis] // n)
        sizes = [chunk] * (n - 1) + [x.shape[axis] - chunk * (n - 1)]
    return list(torch.split(x, list(sizes), dim=axis))


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    if step == 0:
        raise InputError("Slice step cannot be 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        if start == 0 and end == dim and step == 1:
            return x
        idx = (slice(None),) * axis + (slice(start, end, step),)
        return x[idx]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    count = max(0, -(-(start - end) // -step))
    index = start + step * torch.arange(count, dtype=torch.int64, device=x.device)
    return x.index_select(axis, index)


@register_op("", "Slice")
def _slice_v1(ctx, x):
    axes = ctx.attr("axes") or list(range(len(ctx.attr("starts"))))
    for a, s, e in zip(axes, ctx.attr("starts"), ctx.attr("ends")):
        x = _slice_axis(x, _axis(a, x.dim()), s, e, 1)
    return x


@register_op("", "Slice", 10)
def _slice(ctx, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        x = _slice_axis(x, _axis(a, x.dim()), s, e, st)
    return x


def _wrap_index(idx: torch.Tensor, dim: int) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + dim, idx)


@register_op("", "Gather")
def _gather(ctx, x, idx):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    idx = _wrap_index(idx, x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])


@register_op("", "GatherElements")
def _gather_elements(ctx, x, idx):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    return torch.gather(x, axis, _wrap_index(idx, x.shape[axis]))


@register_op("", "GatherND")
def _gather_nd(ctx, x, idx):
    b = ctx.attr("batch_dims", 0)
    k = idx.shape[-1]
    batch_shape = x.shape[:b]
    nb = math.prod(batch_shape)
    data = x.reshape(nb, *x.shape[b:])
    ind = idx.reshape(nb, -1, k).to(torch.int64)
    comps = [_wrap_index(ind[..., i], data.shape[1 + i]) for i in range(k)]
    if k == 0:
        out = data.unsqueeze(1).expand(nb, ind.shape[1], *data.shape[1:])
    else:
        bidx = torch.arange(nb, device=x.device).reshape(nb, 1).expand_as(comps[0])
        out = data[(bidx, *comps)]
    return out.reshape(*batch_shape, *idx.shape[b:-1], *x.shape[b + k :])


def _flat_index(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    k = idx.shape[-1]
    flat = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    for i in range(k):
        flat = flat * shape[i] + _wrap_index(idx[..., i], shape[i])
    return flat.reshape(-1)


@register_op("", "ScatterND")
def _scatter_nd(ctx, x, idx, updates):
    k = idx.shape[-1]
    lead = math.prod(x.shape[:k])
    flat_x = x.reshape(lead, *x.shape[k:])
    flat_i = _flat_index(idx, x.shape)
    flat_u = updates.reshape(-1, *x.shape[k:]).to(x.dtype)
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        out = flat_x.index_copy(0, flat_i, flat_u)
    elif reduction == "add":
        out = flat_x.index_add(0, flat_i, flat_u)
    else:
        mode = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
        out = flat_x.index_reduce(0, flat_i, flat_u, mode)
    return out.reshape(x.shape)


@register_op("", "ScatterElements")
def _scatter_elements(ctx, x, idx, updates):
    axis = _axis(ctx.attr("axis", 0), x.dim())
    idx = _wrap_index(idx, x.shape[axis])
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        return x.scatter(axis, idx, updates)
    mode = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return x.scatter_reduce(axis, idx, updates, mode, include_self=True)


@register_op("", "Expand")
def _expand(ctx, x, shape):
    out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(out)


@register_op("", "Tile")
def _tile(ctx, x, repeats):
    return x.repeat(_ints(repeats))


@register_op("", "Range")
def _range(ctx, start, limit, delta):
    s, l, d = _scalar(start), _scalar(limit), _scalar(delta)
    n = max(math.ceil((l - s) / d), 0)
    steps = torch.arange(n, dtype=start.dtype, device=start.device)
    return start.reshape(()) + steps * delta.reshape(())


@register_op("", "Constant")
def _constant(ctx, *_):
    device = ctx.device
    cached = ctx.cache.get("value")
    if cached is not None and cached.device == device:
        return cached
    attrs = ctx.attrs
    fdt = ctx.float_dtype or torch.float32
    if "value" in attrs:
        value = ctx.to_torch(attrs["value"])
    elif "value_float" in attrs or "value_floats" in attrs:
        value = torch.tensor(attrs.get("value_float", attrs.get("value_floats")), dtype=fdt)
    elif "value_int" in attrs or "value_ints" in attrs:
        value = torch.tensor(attrs.get("value_int", attrs.get("value_ints")), dtype=torch.int64)
    else:
        raise UnsupportedError(f"Constant attributes {sorted(attrs)} are not supported")
    ctx.cache["value"] = value = value.to(device)
    return value


@register_op("", "ConstantOfShape")
def _constant_of_shape(ctx, shape):
    value = ctx.attr("value")
    fill = ctx.to_torch(value).reshape(-1) if value is not None else None
    if fill is None:
        fill = torch.zeros(1, dtype=ctx.float_dtype or torch.float32, device=ctx.device)
    return fill.expand(_ints(shape)).clone() if shape.numel() else fill.reshape(())


@register_op("", "Trilu")
def _trilu(ctx, x, k=None):
    k = int(_scalar(k)) if k is not None else 0
    return torch.triu(x, k) if ctx.attr("upper", 1) else torch.tril(x, k)


@register_op("", "Dropout")
def _dropout(ctx, x, *_):
    if ctx.output_used(1):
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@register_op("", "CumSum")
def _cumsum(ctx, x, axis):
    axis = _axis(int(_scalar(axis)), x.dim())
    if ctx.attr("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if ctx.attr("exclusive", 0):
        y = y - x
    if ctx.attr("reverse", 0):
        y = y.flip(axis)
    return y


@register_op("", "NonZero")
def _nonzero(ctx, x):
    return torch.nonzero(x).T.contiguous()


@register_op("", "TopK", 10)
def _topk(ctx, x, k):
    axis = _axis(ctx.attr("axis", -1), x.dim())
    values, indices = torch.topk(
        x, int(_scalar(k)), dim=axis, largest=bool(ctx.attr("largest", 1)), sorted=True
    )
    return values, indices


@register_op("", "OneHot")
def _one_hot(ctx, idx, depth, values):
    d = int(_scalar(depth))
    idx = _wrap_index(idx, d)
    axis = ctx.attr("axis", -1)
    hot = F.one_hot(idx.clamp(0, d - 1), d).bool() & ((idx >= 0) & (idx < d)).unsqueeze(-1)
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, _axis(axis, out.dim()))


@register_op("", "Pad", 11)
def _pad(ctx, x, pads, value=None, axes=None):
    pads = _ints(pads)
    rank = x.dim()
    axes = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + n]
    torch_pads: list[int] = []
    for a in range(rank - 1, -1, -1):
        torch_pads += [full[a], full[a + rank]]
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        v = _scalar(value) if value is not None and value.numel() else 0
        return F.pad(x, torch_pads, mode="constant", value=v)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    while torch_pads and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    spatial = len(torch_pads) // 2
    lead = rank - spatial
    y = x.reshape(1, max(1, math.prod(x.shape[:lead])), *x.shape[lead:])
    y = F.pad(y, torch_pads, mode=torch_mode)
    return y.reshape(*x.shape[:lead], *y.shape[2:])


@register_op("", "Pad", 2)
def _pad_v2(ctx, x):
    value = torch.tensor(ctx.attr("value", 0.0))
    return _pad(ctx, x, ctx.attr("pads"), value)


# ---- linear algebra


@register_op("", "MatMul")
def _matmul(ctx, a, b):
    return torch.matmul(a, b)


@register_op("", "Gemm")
def _gemm(ctx, a, b, c=None):
    if ctx.attr("transA", 0):
        a = a.T
    if ctx.attr("transB", 0):
        b = b.T
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@register_op("", "Einsum")
def _einsum(ctx, *xs):
    return torch.einsum(ctx.attr("equation").replace(" ", ""), *xs)


# ---- reductions


def _reduce(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]):
    def impl(ctx, x, axes=None):
        ax = _axes_arg(ctx, axes)
        keep = bool(ctx.attr("keepdims", 1))
        if not ax:
            if ctx.attr("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        ax = sorted(_axis(a, x.dim()) for a in ax)
        if x.dim() == 0:
            return fn(x.reshape(1), [0], False).reshape(())
        return fn(x, ax, keep)

    return impl


def _prod(x, ax, keep):
    for a in reversed(ax):
        x = torch.prod(x, a, keepdim=keep)
    return x


for _op, _fn in {
    "ReduceMean": lambda x, ax, k: torch.mean(x, ax, keepdim=k),
    "ReduceSum": lambda x, ax, k: torch.sum(x, ax, keepdim=k),
    "ReduceMax": lambda x, ax, k: torch.amax(x, ax, keepdim=k),
    "ReduceMin": lambda x, ax, k: torch.amin(x, ax, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, ax, k: torch.sum(torch.abs(x), ax, keepdim=k),
    "ReduceL2": lambda x, ax, k: torch.sqrt(torch.sum(x * x, ax, keepdim=k)),
    "ReduceSumSquare": lambda x, ax, k: torch.sum(x * x, ax, keepdim=k),
    "ReduceLogSum": lambda x, ax, k: torch.log(torch.sum(x, ax, keepdim=k)),
    "ReduceLogSumExp": lambda x, ax, k: torch.logsumexp(x, ax, keepdim=k),
}.items():
    register_op("", _op)(_reduce(_fn))


def _arg_reduce(largest: bool):
    def impl(ctx, x):
        axis = _axis(ctx.attr("axis", 0), x.dim())
        keep = bool(ctx.attr("keepdims", 1))
        last = ctx.attr("select_last_index", 0)
        y = x.flip(axis) if last else x
        arg = torch.argmax if largest else torch.argmin
        idx = arg(y, axis, keepdim=keep)
        return x.shape[axis] - 1 - idx if last else idx

    return impl


register_op("", "ArgMax")(_arg_reduce(True))
register_op("", "ArgMin")(_arg_reduce(False))


# ---- normalization


def _normalize(x, axis, eps, center: bool):
    dims = tuple(range(_axis(axis, x.dim()), x.dim()))
    mean = x.mean(dims, keepdim=True) if center else None
    xc = x - mean if center else x
    var = (xc * xc).mean(dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    return xc * inv, mean, inv


def _stash(ctx, x):
    """Upcast for the statistics as ``stash_type`` asks (float32 unless the executor is wider)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


@register_op("", "LayerNormalization", 17)
def _layer_norm(ctx, x, scale, bias=None):
    xs = _stash(ctx, x)
    y, mean, inv = _normalize(xs, ctx.attr("axis", -1), ctx.attr("epsilon", 1e-5), True)
    y = y.to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv) if ctx.num_outputs > 1 else y


@register_op("", "RMSNormalization", 23)
def _rms_norm(ctx, x, scale):
    xs = _stash(ctx, x)
    y, _, _ = _normalize(xs, ctx.attr("axis", -1), ctx.attr("epsilon", 1e-5), False)
    return y.to(x.dtype) * scale


@register_op("", "SimplifiedLayerNormalization")
@register_op(_MS_DOMAIN, "SimplifiedLayerNormalization")
def _simplified_layer_norm(ctx, x, scale):
    xs = _stash(ctx, x)
    y, _, inv = _normalize(xs, ctx.attr("axis", -1), ctx.attr("epsilon", 1e-5), False)
    y = y.to(x.dtype) * scale
    return (y, inv) if ctx.num_outputs > 1 else y


@register_op("", "BatchNormalization", 9)
def _batch_norm(ctx, x, scale, bias, mean, var):
    if ctx.attr("training_mode", 0):
        raise UnsupportedError("BatchNormalization with training_mode=1 is not supported")
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var.reshape(shape) + ctx.attr("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


@register_op("", "InstanceNormalization")
def _instance_norm(ctx, x, scale, bias):
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) * torch.rsqrt(var + ctx.attr("epsilon", 1e-5))
    return y * scale.reshape(shape) + bias.reshape(shape)


@register_op("", "LpNormalization")
def _lp_norm(ctx, x):
    return F.normalize(x, p=ctx.attr("p", 2), dim=ctx.attr("axis", -1), eps=0.0)


# ---- convolution and pooling


def _conv_pads(ctx, x, kernel: Sequence[int], strides, dilations) -> list[int]:
    """ONNX pads ``[b1.., e1..]`` after resolving ``auto_pad``."""
    nd = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(ctx.attr("pads") or [0] * (2 * nd))


def _apply_pads(x, pads: Sequence[int], value: float = 0.0):
    """Symmetric part for the torch op, asymmetric rest applied with F.pad."""
    nd = len(pads) // 2
    sym = [min(pads[i], pads[i + nd]) for i in range(nd)]
    extra: list[int] = []
    for i in range(nd - 1, -1, -1):
        extra += [pads[i] - sym[i], pads[i + nd] - sym[i]]
    if any(extra):
        x = F.pad(x, extra, value=value)
    return x, sym


@register_op("", "Conv")
def _conv(ctx, x, w, b=None):
    nd = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = ctx.attr("strides") or [1] * nd
    dilations = ctx.attr("dilations") or [1] * nd
    pads = _conv_pads(ctx, x, kernel, strides, dilations)
    x, sym = _apply_pads(x, pads)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, strides, sym, dilations, ctx.attr("group", 1))


@register_op("", "ConvTranspose")
def _conv_transpose(ctx, x, w, b=None):
    nd = w.dim() - 2
    strides = ctx.attr("strides") or [1] * nd
    dilations = ctx.attr("dilations") or [1] * nd
    if ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or ctx.attr("output_shape"):
        raise UnsupportedError("ConvTranspose with auto_pad SAME or output_shape")
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    out_pad = list(ctx.attr("output_padding") or [0] * nd)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = conv(x, w, b, strides, 0, out_pad, ctx.attr("group", 1), dilations)
    idx = [slice(None), slice(None)]
    for i in range(nd):
        idx.append(slice(pads[i], y.shape[2 + i] - pads[i + nd]))
    return y[tuple(idx)]


@register_op("", "GlobalAveragePool")
def _global_avg_pool(ctx, x):
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


@register_op("", "GlobalMaxPool")
def _global_max_pool(ctx, x):
    return x.amax(tuple(range(2, x.dim())), keepdim=True)


def _pool_args(ctx, x):
    kernel = list(ctx.attr("kernel_shape"))
    nd = len(kernel)
    strides = ctx.attr("strides") or [1] * nd
    dilations = ctx.attr("dilations") or [1] * nd
    return kernel, strides, dilations, _conv_pads(ctx, x, kernel, strides, dilations)


@register_op("", "MaxPool")
def _max_pool(ctx, x):
    kernel, strides, dilations, pads = _pool_args(ctx, x)
    nd = len(kernel)
    x, sym = _apply_pads(x, pads, value=-math.inf)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return pool(x, kernel, strides, sym, dilations, ceil_mode=bool(ctx.attr("ceil_mode", 0)))


@register_op("", "AveragePool")
def _avg_pool(ctx, x):
    kernel, strides, dilations, pads = _pool_args(ctx, x)
    nd = len(kernel)
    if any(d != 1 for d in dilations):
        raise UnsupportedError("AveragePool with dilations")
    ceil = bool(ctx.attr("ceil_mode", 0))
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    torch_pads: list[int] = []
    for i in range(nd - 1, -1, -1):
        torch_pads += [pads[i], pads[i + nd]]
    # All padding is explicit, so the divisor is fixed here: the window size when padding counts,
    # otherwise the number of real elements (a pooled mask of ones).
    total = pool(F.pad(x, torch_pads), kernel, strides, 0, ceil, True)
    if ctx.attr("count_include_pad", 0):
        return total
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    count = pool(F.pad(ones, torch_pads), kernel, strides, 0, ceil, True)
    return total / count


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


# ==================================================================================================
# quantization


def _quant_dtype(ctx, zp_index: int) -> ir.DataType:
    """The ONNX integer type a Q/DQ node works in, from the IR's static types."""
    node = ctx.node
    out_dtype = ctx.attr("output_dtype", 0)
    if node.op_type == "QuantizeLinear":
        if out_dtype:
            return ir.DataType(out_dtype)
        if node.outputs[0].dtype is not None:
            return node.outputs[0].dtype
    else:
        if node.inputs[0] is not None and node.inputs[0].dtype is not None:
            return node.inputs[0].dtype
    zp = node.inputs[zp_index] if len(node.inputs) > zp_index else None
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    return ir.DataType.UINT8


def _expand_quant_param(p: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """Broadcast a per-tensor, per-axis or blocked scale / zero point to the shape of ``x``."""
    if p.numel() == 1 and p.dim() <= 1:
        return p.reshape(())
    axis = _axis(axis, x.dim())
    if p.dim() == 1 and not block:
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)
    if block:
        p = p.repeat_interleave(block, dim=axis)
        return p.narrow(axis, 0, x.shape[axis])
    return p


@register_op("", "DequantizeLinear")
def _dequantize_linear(ctx, x, scale, zp=None):
    axis, block = ctx.attr("axis", 1), ctx.attr("block_size", 0)
    s = _expand_quant_param(scale, x, axis, block)
    fdt = scale.dtype if scale.is_floating_point() else (ctx.float_dtype or torch.float32)
    xf = x.to(fdt)
    if zp is not None:
        xf = xf - _expand_quant_param(zp, x, axis, block).to(fdt)
    return xf * s


@register_op("", "QuantizeLinear")
def _quantize_linear(ctx, x, scale, zp=None):
    qtype = _quant_dtype(ctx, 2)
    if qtype not in _QUANT_RANGES:
        raise UnsupportedError(f"QuantizeLinear to {qtype.name} is not supported")
    lo, hi = _QUANT_RANGES[qtype]
    axis, block = ctx.attr("axis", 1), ctx.attr("block_size", 0)
    s = _expand_quant_param(scale, x, axis, block).to(x.dtype)
    q = torch.round(x / s)
    if zp is not None:
        q = q + _expand_quant_param(zp, x, axis, block).to(q.dtype)
    return torch.clamp(q, lo, hi).to(_torch_dtype(qtype, None))


@register_op("", "DynamicQuantizeLinear")
def _dynamic_quantize_linear(ctx, x):
    lo = torch.clamp(x.min(), max=0)
    hi = torch.clamp(x.max(), min=0)
    scale = (hi - lo) / 255
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255).to(torch.uint8)
    return q, scale.to(x.dtype), zp.to(torch.uint8)


def _unpack_low_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 bytes holding ``8 // bits`` codes each, low bits first, along the last dim."""
    if bits == 8:
        return packed.to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _matmulnbits_weight(ctx, b, scales, zp) -> torch.Tensor:
    """Dequantized ``W`` of shape [N, K] from MatMulNBits' packed inputs."""
    k, n = ctx.attr("K"), ctx.attr("N")
    bits, block = ctx.attr("bits", 4), ctx.attr("block_size")
    if bits not in (2, 4, 8):
        raise UnsupportedError(f"MatMulNBits with bits={bits}")
    n_blocks = -(-k // block)
    q = _unpack_low_bits(b.reshape(n, n_blocks, -1), bits)  # [N, n_blocks, block]
    fdt = scales.dtype
    s = scales.reshape(n, n_blocks, 1)
    if zp is None:
        z = torch.full((), float(1 << (bits - 1)), dtype=fdt, device=scales.device)
    elif zp.is_floating_point():
        z = zp.reshape(n, n_blocks, 1)
    else:
        z = _unpack_low_bits(zp.reshape(n, -1), bits)[:, :n_blocks].reshape(n, n_blocks, 1)
        z = z.to(fdt)
    w = (q.to(fdt) - z) * s
    return w.reshape(n, -1)[:, :k]


@register_op(_MS_DOMAIN, "MatMulNBits")
def _matmul_nbits(ctx, a, b, scales, zp=None, g_idx=None, bias=None):
    if g_idx is not None:
        raise UnsupportedError("MatMulNBits with g_idx")
    w = _matmulnbits_weight(ctx, b, scales, zp).to(a.dtype)
    y = torch.matmul(a, w.T)
    return y + bias if bias is not None else y


@register_op(_MS_DOMAIN, "GatherBlockQuantized")
def _gather_block_quantized(ctx, data, idx, scales, zp=None):
    bits = ctx.attr("bits", 4)
    block = ctx.attr("block_size", 128)
    qaxis = ctx.attr("quantize_axis", 1)
    gaxis = ctx.attr("gather_axis", 0)
    dtype = ctx.node.inputs[0].dtype
    packed = dtype == ir.DataType.UINT8
    if packed:
        q = _unpack_low_bits(data, bits)
        default_zp = float(1 << (bits - 1))
        if zp is not None:
            zp = _unpack_low_bits(zp, bits)[..., : scales.shape[-1]]
    else:
        q = data.to(torch.int32)
        default_zp = 0.0
    qaxis = _axis(qaxis, q.dim())
    fdt = scales.dtype
    s = _expand_quant_param(scales, q, qaxis, block)
    z = (
        _expand_quant_param(zp, q, qaxis, block).to(fdt)
        if zp is not None
        else torch.tensor(default_zp, dtype=fdt, device=scales.device)
    )
    w = (q.to(fdt) - z) * s
    gaxis = _axis(gaxis, w.dim())
    idx = _wrap_index(idx, w.shape[gaxis])
    out = w.index_select(gaxis, idx.reshape(-1))
    return out.reshape(w.shape[:gaxis] + idx.shape + w.shape[gaxis + 1 :])


# ==================================================================================================
# com.microsoft fused ops ORT's optimizers produce


@register_op(_MS_DOMAIN, "Gelu")
def _ms_gelu(ctx, x):
    return F.gelu(x)


@register_op(_MS_DOMAIN, "BiasGelu")
def _ms_bias_gelu(ctx, x, bias):
    return F.gelu(x + bias)


@register_op(_MS_DOMAIN, "FastGelu")
def _ms_fast_gelu(ctx, x, bias=None):
    return F.gelu(x + bias if bias is not None else x, approximate="tanh")


@register_op(_MS_DOMAIN, "QuickGelu")
def _ms_quick_gelu(ctx, x):
    return x * torch.sigmoid(ctx.attr("alpha", 1.702) * x)


@register_op(_MS_DOMAIN, "FusedMatMul")
def _ms_fused_matmul(ctx, a, b):
    if ctx.attr("transA", 0):
        a = a.transpose(-1, -2)
    if ctx.attr("transB", 0):
        b = b.transpose(-1, -2)
    return ctx.attr("alpha", 1.0) * torch.matmul(a, b)


def _skip_norm(center: bool):
    def impl(ctx, x, skip, gamma, beta=None, bias=None):
        if not center:  # SkipSimplifiedLayerNormalization: (input, skip, gamma, bias)
            bias, beta = beta, None
        s = x + skip
        if bias is not None:
            s = s + bias
        y, mean, inv = _normalize(_stash(ctx, s), -1, ctx.attr("epsilon", 1e-12), center)
        y = y.to(s.dtype) * gamma
        if beta is not None:
            y = y + beta
        if ctx.num_outputs == 1:
            return y
        return [y, mean, inv, s][: ctx.num_outputs]

    return impl


register_op(_MS_DOMAIN, "SkipLayerNormalization")(_skip_norm(True))
register_op(_MS_DOMAIN, "SkipSimplifiedLayerNormalization")(_skip_norm(False))
