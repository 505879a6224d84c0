"""Front door: every accepted input becomes one ``onnx_ir.Model``.

* an ONNX path is loaded lazily (external data stays memory-mapped);
* an ``onnx.ModelProto`` is deserialized, an ``onnx_ir.Model`` is used as given;
* a ``torch.nn.Module`` or ``torch.fx.GraphModule`` is exported once with
  ``torch.onnx.export(..., dynamo=True)``.

Then the model is checked (its opset, and ops from domains ONNX Runtime does not implement, which
need a custom-op library) and normalised for the passes: weights held in ``Constant`` nodes are
lifted to initializers, in every graph; initializers of ``If``/``Loop``/``Scan`` bodies move to the
main graph (renamed where a name is taken there), which their nodes then read from the outer
scope, so every weight is a main-graph initializer wherever it is read; and ``Transpose`` of a
weight initializer is folded into a transposed initializer that keeps the original parameter name,
so graph queries see ``MatMul(x, Wᵀ)`` as a weight.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from hessc.errors import InputError, UnsupportedError
from hessc.ir import meta

logger = logging.getLogger(__name__)

FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"


def load(
    source: Any,
    example_inputs: tuple | dict | None = None,
    *,
    custom_op_libraries: Sequence[str | os.PathLike] = (),
    kv_cache: bool = False,
) -> ir.Model:
    """Loads a model from any accepted source into a normalised ``onnx_ir.Model``.

    Args:
        source: an ONNX file path, ``onnx.ModelProto``, ``onnx_ir.Model``, ``torch.nn.Module``
            or ``torch.fx.GraphModule``.
        example_inputs: for torch sources, the positional inputs (tuple) or keyword inputs
            (dict) used for export.
        kv_cache: for a transformers causal LM (torch), export the decoder as it is served, with
            its KV cache as inputs and outputs (:func:`_export_with_cache`).
        custom_op_libraries: shared libraries that register the model's custom ops with ONNX
            Runtime. They are recorded in ``model.meta[CUSTOM_OPS_KEY]`` (added to any already
            there), so every session hessc opens on the model loads them.

    Returns:
        The model. A given ``onnx_ir.Model`` is normalised in place and returned.

    Raises:
        InputError: the source is missing, unreadable, or not a model; a library is missing; the
            model has ops of a domain ONNX Runtime does not implement and no library is given.
    """
    libraries = check_libraries(custom_op_libraries)
    if isinstance(source, (str, os.PathLike)):
        model = _load_path(Path(source))
    elif isinstance(source, onnx.ModelProto):
        model = ir.serde.deserialize_model(source)
    elif isinstance(source, ir.Model):
        model = source
    elif _is_torch_module(source):
        model = _export_with_cache(source, example_inputs) if kv_cache else _export_torch(source, example_inputs)
    else:
        raise InputError(
            f"cannot load a {type(source).__name__}: pass an ONNX file path, an onnx.ModelProto, "
            "an onnx_ir.Model, or a torch.nn.Module with example_inputs"
        )
    if kv_cache and not _is_torch_module(source):
        raise InputError("kv_cache=True exports a torch decoder with its cache; an ONNX model has its inputs already")
    check_opset(model)
    libraries = tuple(dict.fromkeys((*model.meta.get(meta.CUSTOM_OPS_KEY, ()), *libraries)))
    check_domains(model, libraries)
    if libraries:
        model.meta[meta.CUSTOM_OPS_KEY] = libraries
    normalize(model)
    return model


def check_libraries(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """The custom-op library paths as absolute str paths, each checked to be an existing file.

    Raises:
        InputError: a path that is not a file, named.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one path, not a sequence of its characters
    checked = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(
                f"{path}: no such custom-op library; pass the path of the shared library (.so, .dll, "
                ".dylib) that registers the model's custom ops with ONNX Runtime"
            )
        checked.append(str(path.resolve()))
    return tuple(dict.fromkeys(checked))


STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})
"""Operator domains of the ONNX standard."""

ORT_DOMAINS = frozenset({
    "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc", "com.microsoft.experimental",
    "com.microsoft.dml", "org.pytorch.aten", "com.intel.ai", "com.xilinx",
})
"""Operator domains ONNX Runtime implements itself (contrib ops and its execution providers';
``onnxruntime/core/graph/constants.h``). An op missing from one of them is caught when a session
is opened (:func:`unknown_op_error`)."""


def check_domains(model: ir.Model, custom_op_libraries: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Finds the ops that only a custom-op library can run.

    Those are the nodes (in every graph, subgraph and model-local function) whose domain is
    neither an ONNX standard domain nor one ONNX Runtime implements, and that do not call a
    model-local function.

    Args:
        model: the model.
        custom_op_libraries: the libraries that will be registered with ONNX Runtime; with none,
            any such op is an error.

    Returns:
        ``(domain, op_type)`` of each such op, once each, in graph order.

    Raises:
        InputError: such ops exist and no custom-op library is given.
    """
    found: dict[tuple[str, str], None] = {}
    for node in _all_nodes(model):
        domain = node.domain or ""
        if domain in STANDARD_DOMAINS or domain in ORT_DOMAINS:
            continue
        if (domain, node.op_type, node.overload or "") in model.functions:
            continue
        found[(domain, node.op_type)] = None
    ops = list(found)
    if ops and not custom_op_libraries:
        raise unknown_op_error(ops)
    if ops:
        logger.debug("custom ops %s are left to the libraries %s", ops, list(custom_op_libraries))
    return ops


def _all_nodes(model: ir.Model):
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def unknown_op_error(ops: Sequence[tuple[str, str | None]]) -> InputError:
    """The InputError for ops ONNX Runtime does not know: ``(domain, op_type or None)`` each."""
    named = [f"op {op!r} of domain {domain!r}" if op else f"ops of domain {domain!r}" for domain, op in ops]
    listed = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    them = "it" if len(named) == 1 and ops[0][1] else "them"
    upgrade = "upgrade onnxruntime, or " if any(domain in ORT_DOMAINS | STANDARD_DOMAINS for domain, _ in ops) else ""
    return InputError(
        f"the model uses {listed}, which ONNX Runtime does not implement; {upgrade}pass the shared "
        f"library that registers {them} with ONNX Runtime: --custom-op-library PATH (custom_op_libraries=[...])"
    )


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass the .onnx file inside it")
    fix = "pass a .onnx file saved by onnx.save or torch.onnx.export"
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf raises several unrelated types on garbage
        raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    if not model.opset_imports or (len(model.graph) == 0 and not model.graph.outputs):
        # Protobuf parses many byte strings (an empty file included) as an empty ModelProto.
        raise InputError(f"{path} is not an ONNX model (no graph and no opset); {fix}")
    return model


def _is_torch_module(source: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(source, torch.nn.Module)


def _export_torch(module, example_inputs) -> ir.Model:
    import torch

    if example_inputs is None:
        raise InputError(
            f"a torch module ({type(module).__name__}) needs example_inputs to be exported; "
            "pass example_inputs=(tensor, ...) or a dict of keyword inputs"
        )
    args, kwargs = (tuple(example_inputs), None)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    logger.info("exporting %s with torch.onnx.export(dynamo=True)", type(module).__name__)
    was_training = module.training
    module.eval()
    try:
        try:
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, verbose=False)
        except Exception as first:
            # Models that return objects beside their tensors (a transformers model's KV cache in
            # its ModelOutput) do not export as they are; their tensors do.
            wrapped = _tensor_outputs_module(module, args, kwargs or {})
            if wrapped is None:
                raise first
            module_, inputs, names = wrapped
            program = torch.onnx.export(module_, args, kwargs=kwargs, dynamo=True, verbose=False,
                                        input_names=inputs, output_names=names)
    except Exception as e:
        raise InputError(
            f"torch.onnx.export failed for {type(module).__name__}: {_root_cause(e)[:300]}; "
            "check that the module runs on example_inputs and is exportable with torch.export"
        ) from e
    finally:
        module.train(was_training)
    return program.model


CACHE_EXAMPLE_TOKENS = 3
"""Cached tokens of the example the cache is exported with (not 0 or 1: torch.export
specializes those sizes); the exported graph takes any length, an empty cache included."""


def _export_with_cache(module, example_inputs) -> ir.Model:
    """A transformers causal LM exported as a decoder with a KV cache: inputs ``input_ids``,
    ``attention_mask`` (over cached and new tokens) and ``past_key_values.N.key``/``.value``
    (``[batch, kv_heads, past, head_dim]``), outputs ``logits`` and ``present.N.key``/``.value``,
    every batch, sequence and cache length dynamic (the names onnxruntime-genai reads)."""
    import torch

    config = getattr(module, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if config is None or not layers or not heads:
        raise InputError(
            f"kv_cache=True exports a transformers causal LM (a module with a .config giving num_hidden_layers and "
            f"num_attention_heads); {type(module).__name__} is not one: export it with its cache yourself"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if example_inputs is None:  # token ids set only the ranks and types: every dim is dynamic
        ids = torch.ones((1, 2 * CACHE_EXAMPLE_TOKENS), dtype=torch.int64)
    elif isinstance(example_inputs, dict):
        ids = example_inputs.get("input_ids")
    else:
        ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs else example_inputs
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise InputError("kv_cache=True needs example_inputs=(input_ids,) with input_ids of shape [batch, tokens]")
    from transformers import DynamicCache

    class WithCache(torch.nn.Module):
        def __init__(self, lm) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, past):
            # Full layers everywhere: a sliding-window layer would crop its cache to the window,
            # and a server (onnxruntime-genai) grows one cache; the model's mask keeps the window.
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    dtype = next(module.parameters()).dtype
    batch, past_len = ids.shape[0], CACHE_EXAMPLE_TOKENS
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers))
    mask = torch.ones(batch, past_len + ids.shape[1], dtype=torch.int64)
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    cache_names = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    present_names = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    logger.info("exporting %s with its KV cache (%d layers) with torch.onnx.export(dynamo=True)", type(module).__name__, layers)
    was_training = module.training
    module.eval()
    wrapper = WithCache(module)
    wrapper.training = False  # like the module it wraps (put back in its own mode below)
    try:
        program = torch.onnx.export(
            wrapper, (ids, mask, past), dynamo=True, verbose=False,
            input_names=["input_ids", "attention_mask", *cache_names], output_names=["logits", *present_names],
            dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in past)),
        )
    except Exception as e:
        raise InputError(
            f"torch.onnx.export failed for {type(module).__name__} with its KV cache: {_root_cause(e)[:300]}; "
            "check that it runs with past_key_values, or export it without kv_cache"
        ) from e
    finally:
        module.train(was_training)
    model = program.model
    model.meta[meta.DECODER_CONFIG_KEY] = {
        "type": getattr(config, "model_type", "llama"), "layers": layers, "heads": heads, "kv_heads": kv_heads,
        "head_size": head_dim, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "context_length": getattr(config, "max_position_embeddings", 4096),
        "bos_token_id": getattr(config, "bos_token_id", None), "eos_token_id": getattr(config, "eos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None), "source": getattr(config, "_name_or_path", "") or "",
    }
    return model


def _root_cause(error: BaseException) -> str:
    """The innermost error's first line (the exporter wraps the reason in several layers)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _tensor_leaves(out: Any, prefix: str, found: list, dropped: list) -> None:
    import torch

    if isinstance(out, torch.Tensor):
        found.append((prefix or "output", out))
    elif isinstance(out, dict) or (hasattr(out, "items") and hasattr(out, "keys")):
        for key, value in out.items():
            _tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key), found, dropped)
    elif isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            _tensor_leaves(value, f"{prefix}.{i}" if prefix else f"output_{i}", found, dropped)
    elif out is not None:
        dropped.append(f"{prefix or 'output'} ({type(out).__name__})")


def _tensor_outputs_module(module, args: tuple, kwargs: dict):
    """``(a module returning only the tensors of module's output, its input names, the output
    names)``, or None when its output holds nothing but tensors (then wrapping would not change
    the export). The inputs keep the names of the module's own parameters."""
    import inspect

    import torch

    with torch.no_grad():
        out = module(*args, **kwargs)
    found: list = []
    dropped: list = []
    _tensor_leaves(out, "", found, dropped)
    if not dropped or not found:
        return None
    names = [name for name, _ in found]
    logger.warning("exporting only the tensor outputs of %s (%s); left out: %s", type(module).__name__,
                   ", ".join(names), ", ".join(dropped))

    class TensorOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *a, **k):
            leaves: list = []
            _tensor_leaves(self.inner(*a, **k), "", leaves, [])
            return tuple(t for _, t in leaves)

    try:
        inputs = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        inputs = None
    return TensorOutputs().eval(), inputs, names


@functools.cache
def max_ort_opset() -> int:
    """The highest default-domain opset the installed ONNX Runtime accepts."""
    import onnxruntime as ort

    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        node = onnx.helper.make_node("Identity", ["x"], ["y"])
        vi = onnx.helper.make_tensor_value_info
        graph = onnx.helper.make_graph(
            [node], "probe", [vi("x", onnx.TensorProto.FLOAT, [1])], [vi("y", onnx.TensorProto.FLOAT, [1])]
        )
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        proto.ir_version = 10
        try:
            ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return 7


def check_opset(model: ir.Model) -> None:
    """Raises when the model's opset is one ONNX Runtime cannot run."""
    opset = model.opset_imports.get("", None)
    if opset is None:
        return
    if opset > max_ort_opset():
        raise UnsupportedError(
            f"the model uses ONNX opset {opset}, but the installed onnxruntime runs opsets up to "
            f"{max_ort_opset()}; re-export with a lower opset or upgrade onnxruntime"
        )
    if opset < 7:
        raise UnsupportedError(
            f"the model uses ONNX opset {opset}; convert it to opset 13 or later first "
            "(onnx.version_converter.convert_version)"
        )


def original_name(value: ir.Value) -> str:
    """The name a user recognises for a weight: the parameter it was folded from, if known."""
    name = value.meta.get(meta.WEIGHT_NAME_KEY)
    if name:
        return name
    folded = value.metadata_props.get(FOLDED_FROM_KEY)
    if folded:
        names = sorted(n.strip(" '\"") for n in folded.strip("[]{}").split(",") if n.strip(" '\""))
        if len(names) == 1:
            return names[0]
    return value.name or "<unnamed>"


def normalize(model: ir.Model) -> None:
    """Lifts constant weights to main-graph initializers and folds weight transposes, in every graph.

    Initializers that are also listed as graph inputs (older exporters, IR < 4: overridable
    defaults) are weights, not inputs: they are taken off the input list, as ONNX Runtime's own
    tools advise, so that compressing one does not leave an input nothing can feed."""
    listed = sum(1 for v in model.graph.inputs if v.name in model.graph.initializers)
    if listed:
        common_passes.RemoveInitializersFromInputsPass()(model)
        logger.info("%d initializers listed as graph inputs are treated as weights", listed)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    common_passes.LiftSubgraphInitializersToMainGraphPass()(model)
    for graph in graphs(model):
        _fold_weight_identities(graph)
        _fold_weight_casts(graph)
        _fold_table_transposes(graph)
        _fold_weight_transposes(graph)
    common_passes.RemoveUnusedNodesPass()(model)


def graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and every subgraph (``If``/``Loop``/``Scan`` bodies), each once."""
    for graph, _ in scoped_graphs(model):
        yield graph


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds as attributes (an ``If``'s branches, a ``Loop``'s body)."""
    out: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.value)
    return out


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Registers ``array`` as an initializer of ``graph`` called ``name`` (``name_1``, ``name_2``, ...
    when that is taken: one source initializer may feed several rewritten nodes); returns its value."""
    name = fresh_name(graph, name)
    tensor = _packed(array, name) or ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _packed(array: np.ndarray, name: str) -> ir.PackedTensor | None:
    """A 4- or 2-bit array as the packed tensor ONNX stores (two or four codes a byte, the first in
    the low bits), or None for other types: numpy holds one code per byte, twice or four times
    the bytes, for as long as the model lives."""
    dtype = _SUB_BYTE.get(np.dtype(array.dtype))
    if dtype is None:
        return None
    bits = dtype.bitwidth
    per_byte = 8 // bits
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    packed = np.zeros(-(-flat.size // per_byte), dtype=np.uint8)
    for i in range(per_byte):
        lane = flat[i::per_byte] & np.uint8((1 << bits) - 1)
        packed[: lane.size] |= lane << np.uint8(i * bits)
    return ir.PackedTensor(packed, dtype, shape=array.shape, name=name)


_SUB_BYTE = {np.dtype(t.numpy()): t for t in (ir.DataType.UINT4, ir.DataType.INT4, ir.DataType.UINT2, ir.DataType.INT2)}


def fresh_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_k`` with the smallest ``k`` that no initializer or input of ``graph`` holds."""
    taken = graph.initializers.keys() | {v.name for v in graph.inputs}
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def scoped_graphs(model: ir.Model) -> Iterator[tuple[ir.Graph, tuple[ir.Node, ...]]]:
    """Each graph once, in the order of :func:`graphs`, with its scope: the nodes whose graph
    attributes hold it, outermost first (``()`` for the main graph; ``(If,)`` for a branch of a
    main-graph ``If``)."""
    seen = {id(model.graph)}

    def walk(graph: ir.Graph, scope: tuple[ir.Node, ...]):
        for node in graph:
            inner = [g for g in subgraphs(node) if id(g) not in seen]
            seen.update(id(g) for g in inner)
            for g in inner:  # a node's graphs as it is reached, then what they hold
                yield g, (*scope, node)
            for g in inner:
                yield from walk(g, (*scope, node))

    yield model.graph, ()
    yield from walk(model.graph, ())


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _fold_weight_identities(graph: ir.Graph) -> None:
    """``Identity(W)`` of an initializer is ``W``: its readers read the initializer, so that a
    ``MatMul(x, Identity(W))`` weight is found (an Identity that is a graph output stays)."""
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or node.outputs[0].is_graph_output():
            continue
        src = node.inputs[0]
        if src is not None and src.const_value is not None and src.is_initializer():
            ir.convenience.replace_all_uses_with(node.outputs[0], src)
            graph.remove(node, safe=True)


def _fold_weight_casts(graph: ir.Graph) -> None:
    """Replaces ``Cast(W)`` of a float initializer of two or more dimensions to another float type
    (a float16 weight cast to float32 in front of its MatMul) by the cast initializer, so that the
    weight is found and quantized where it is read."""
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None or not src.is_initializer() or src.dtype not in _FLOATS:
            continue
        to = ir.DataType(node.attributes.get_int("to", 0))
        if to not in _FLOATS or len(src.const_value.shape) < 2 or node.outputs[0].is_graph_output():
            continue
        array = src.const_value.numpy().astype(to.numpy())
        new_value = ir.Value(name=f"{src.name}_{to.name.lower()}", shape=ir.Shape(array.shape), type=ir.TensorType(to))
        new_value.const_value = ir.tensor(array, name=new_value.name)
        new_value.meta[meta.WEIGHT_NAME_KEY] = original_name(src)
        new_value.meta[meta.SOURCE_BYTES_KEY] = int(src.const_value.nbytes)
        (src.graph or graph).register_initializer(new_value)
        ir.convenience.replace_all_uses_with(node.outputs[0], new_value)
        graph.remove(node, safe=True)
        logger.debug("folded Cast of %s into %s", src.name, new_value.name)


def _weight_transposes(graph: ir.Graph):
    """``(Transpose node, its 2-D initializer)`` of each plain transpose of a weight in ``graph``."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None or not src.is_initializer():
            continue
        perm = node.attributes.get_ints("perm", None)
        if len(src.const_value.shape) == 2 and (perm is None or tuple(perm) == (1, 0)):
            yield node, src


def _fold_table_transposes(graph: ir.Graph) -> None:
    """Replaces ``Gather(Transpose(W), ids)`` of a 2-D initializer (an output head ``W [D, V]``
    whose transpose is the embedding table, as onnxruntime-genai's builder ties them) by a lookup
    in the transposed initializer ``E = Wᵀ``; ``W``, where a MatMul still reads it, is marked as
    the head tied to ``E`` (``meta.TIED_KEY``), the form a tied table takes after
    :func:`_fold_weight_transposes`."""
    for node, src in _weight_transposes(graph):
        out = node.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or not uses or not all(
                u.node.op_type == "Gather" and u.idx == 0 and u.node.attributes.get_int("axis", 0) == 0 for u in uses):
            continue
        array = src.const_value.numpy().T.copy()
        table = ir.Value(name=fresh_name(graph, f"{src.name}_table"), shape=ir.Shape(array.shape),
                         type=ir.TensorType(src.dtype))
        table.const_value = ir.tensor(array, name=table.name)
        table.meta[meta.WEIGHT_NAME_KEY] = original_name(src)
        (src.graph or graph).register_initializer(table)
        ir.convenience.replace_all_uses_with(out, table)
        graph.remove(node, safe=True)
        if any(u.node.op_type == "MatMul" and u.idx == 1 for u in src.uses()):
            src.meta[meta.TIED_KEY] = table.name
        logger.debug("folded the lookup through Transpose(%s) into %s", src.name, table.name)


def _fold_weight_transposes(graph: ir.Graph) -> None:
    """Replaces ``Transpose(W)`` of a 2-D initializer feeding a MatMul by a transposed initializer."""
    for node, src in _weight_transposes(graph):
        out = node.outputs[0]
        if not all(use.node.op_type == "MatMul" and use.idx == 1 for use in out.uses()):
            continue
        array = src.const_value.numpy().T.copy()
        new_value = ir.Value(
            name=f"{src.name}_T", shape=ir.Shape(array.shape), type=ir.TensorType(src.dtype)
        )
        new_value.const_value = ir.tensor(array, name=new_value.name)
        new_value.meta[meta.WEIGHT_NAME_KEY] = original_name(src)
        if any(use.node.op_type == "Gather" for use in src.uses()):
            new_value.meta[meta.TIED_KEY] = src.name  # an output projection tied to an embedding
        (src.graph or graph).register_initializer(new_value)  # beside the weight: the main graph
        ir.convenience.replace_all_uses_with(out, new_value)
        graph.remove(node, safe=True)
        logger.debug("folded Transpose of %s into %s", src.name, new_value.name)


def release(value: ir.Value) -> None:
    """Unmaps the file pages behind a weight kept as external data once a pass is done reading it
    (the tensor maps its file again if read later), so that working through the weights one by
    one holds one weight's pages at a time, not every weight's."""
    if isinstance(value.const_value, ir.ExternalTensor):
        value.const_value.release()


def is_external(value: ir.Value) -> bool:
    """Whether the weight's bytes sit in an external-data file (memory-mapped when read)."""
    return isinstance(value.const_value, ir.ExternalTensor)


def drop_pages(value: ir.Value, start: int, stop: int) -> None:
    """Gives the file pages behind bytes ``[start, stop)`` of an external weight (counted from
    its first byte) back to the system: a weight read a block at a time holds one block's pages,
    not all of them. They are read from the file again if touched later."""
    tensor = value.const_value
    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.ExternalTensor) else None
    if raw is None:
        return
    page = mmap.PAGESIZE
    lo = ((tensor.offset or 0) + start) // page * page
    hi = ((tensor.offset or 0) + stop) // page * page
    if hi > lo:
        raw.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def ensure_float_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight tensor as a float32 numpy array (memory-mapped tensors are read here)."""
    return np.asarray(tensor.numpy(), dtype=np.float32)


def fix_input_shapes(model: ir.Model, shapes: dict[str, Sequence[int]]) -> None:
    """Makes the named graph inputs static (CUDA graphs and some kernels need fixed shapes).

    Raises:
        InputError: an unknown input name, a rank mismatch, or a size that contradicts a static dim.
    """
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputError(f"--input-shape names {name!r}, but the model's inputs are {sorted(inputs)}")
        value = inputs[name]
        current = list(value.shape) if value.shape is not None else [None] * len(dims)
        if len(current) != len(dims):
            raise InputError(f"input {name!r} has rank {len(current)}, but the shape given has {len(dims)} dims")
        for old, new in zip(current, dims):
            if isinstance(old, int) and old != new:
                raise InputError(f"input {name!r} has the static shape {current}; it cannot become {list(dims)}")
        value.shape = ir.Shape([int(d) for d in dims])
    # Propagate the static sizes, so graph outputs get static shapes too.
    common_passes.ShapeInferencePass()(model)


_IDENTITY_KEYS = (meta.WEIGHT_NAME_KEY, meta.TIED_KEY, meta.UNTIED_FROM_KEY)
"""Value annotations that say what a weight is (its user-facing name, the table it is tied to):
a copy must keep them, or a replayed plan would address the weight by another name."""


def clone(model: ir.Model, *, annotations: bool = True) -> ir.Model:
    """``Model.clone()``: a new graph whose weights share the original's tensors (external data
    stays on disk), plus what sessions on the copy need (the custom-op libraries,
    :data:`~hessc.ir.meta.CUSTOM_OPS_KEY`).

    Args:
        model: the model.
        annotations: keep the values' in-memory annotations (plans, curvature statistics; shared,
            not copied: they are frozen). False keeps only the weights' identity
            (:data:`_IDENTITY_KEYS`), for a fresh start from a model a caller handed in.
    """
    copy = model.clone()
    for key in (meta.CUSTOM_OPS_KEY, meta.DECODER_CONFIG_KEY):  # the same libraries; the same decoder
        if key in model.meta:
            copy.meta[key] = model.meta[key]
    if not annotations:
        for graph in graphs(copy):
            values = [*graph.inputs, *graph.initializers.values(), *(v for n in graph for v in n.outputs)]
            for value in values:
                kept = {k: value.meta[k] for k in _IDENTITY_KEYS if k in value.meta}
                value.meta.clear()
                value.meta.update(kept)
            for node in graph:
                node.meta.clear()
    return copy
