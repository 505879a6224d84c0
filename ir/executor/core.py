"""The executor proper: :class:`TorchExecutor`, :class:`OpContext`, compiled steps and subgraphs.

Also the ONNX → torch dtype tables and tensor conversion, and the small value helpers
(``_ints``, ``_scalar``, ``_axis``) the operator modules share.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from hessc.errors import InputError, UnsupportedError
from hessc.ir import frontend
from hessc.ir.executor.registry import OpFunction, _domain_label, _norm_domain, lookup_op

logger = logging.getLogger(__name__)


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
    # np.ascontiguousarray would make a 0-d tensor 1-d (a scalar Gather index, say).
    return torch.from_numpy(np.require(arr, requirements="C")).to(target)


def _ints(x: Any) -> list[int]:
    """A shape-like value (tensor, sequence or scalar) as a list of python ints."""
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    return [int(x)]


def _scalar(x: Any) -> Any:
    return x.reshape(-1)[0].item() if isinstance(x, torch.Tensor) else x


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


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
