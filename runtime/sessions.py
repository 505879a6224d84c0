"""ONNX Runtime sessions for each target, and numeric comparison of two models' outputs.

``target="cuda"`` sessions run every node on the CUDA provider (a node that would fall back to
the CPU is reported as an error, not silently accepted) and, when the model's inputs have static
shapes, capture the whole model in a CUDA graph and run it through I/O binding on device buffers:
kernel launches dominate small-batch latency, and one graph replay removes them.

Custom ops: every session registers the shared libraries given to it and those recorded on an
``onnx_ir.Model`` under ``hessc.ir.meta.CUSTOM_OPS_KEY`` (by ``frontend.load``), so each session
hessc opens on the model can run them; an op ONNX Runtime does not know is an ``InputError``
naming it and its domain.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError, UnsupportedError
from hessc.ir import frontend, meta
from hessc.runtime import targets

logger = logging.getLogger(__name__)



def _import_ort():
    import onnxruntime as ort

    return ort


def cuda_available() -> bool:
    ort = _import_ort()
    return "CUDAExecutionProvider" in ort.get_available_providers()


def serialized(model: ir.Model) -> tuple[Any, str | None, Any]:
    """The model as an ``onnx.ModelProto`` ORT can open without copying its weights.

    Weights in external data stay references to their files, and ORT is pointed at their folder;
    weights from several folders, or more than :data:`IN_MEMORY_BYTES` of in-memory weights, go
    through one temporary copy with external data, written a tensor at a time (a proto and its
    serialized bytes would hold two more copies of them, and protobuf stops at 2 GB).

    Returns:
        The proto, the folder of its external data (or None), and an object that keeps a temporary
        copy alive (or None).
    """
    import onnx

    tensors = [v.const_value for g in frontend.graphs(model) for v in g.initializers.values() if v.const_value is not None]
    base_dirs = {str(t.base_dir) for t in tensors if isinstance(t, ir.ExternalTensor)}
    in_memory = sum(t.nbytes for t in tensors if not isinstance(t, ir.ExternalTensor))
    if len(base_dirs) <= 1 and in_memory < IN_MEMORY_BYTES:
        return ir.to_proto(model), (base_dirs.pop() if base_dirs else None), None
    tmp = tempfile.TemporaryDirectory(prefix="hessc-")
    path = Path(tmp.name) / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return onnx.load(str(path), load_external_data=False), tmp.name, tmp


IN_MEMORY_BYTES = 256 << 20
"""In-memory weight bytes above which a session opens a temporary external-data copy of the model."""


def _source(model: Any, opts) -> tuple[str | bytes, Any]:
    """A path or serialized bytes for ORT (``opts`` learns the external-data folder); the second
    item keeps a temporary copy alive."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise InputError(f"{path}: no such model file")
        return str(path), None
    if isinstance(model, bytes):  # a serialized ModelProto
        return model, None
    if isinstance(model, ir.Model):
        proto, folder, keepalive = serialized(model)
        if folder is not None:
            opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, folder)
        return proto.SerializeToString(), keepalive
    raise InputError(f"cannot open a session on a {type(model).__name__}; pass a path or an onnx_ir.Model")


EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def session_options(
    threads: int | None = None, optimize: bool = True, custom_op_libraries: Sequence[str | os.PathLike] = (),
    spinning: bool = True, prepacking: bool = True, arena: bool = True,
):
    """ORT session options: intra-op threads, graph optimizations on or off, custom-op libraries,
    whether idle intra-op threads spin (``spinning``: ORT's default; off for sessions timed
    side by side, see :func:`interleaved_latency_ms`), and whether kernels prepack their constant
    weights (``prepacking``: ORT's default; each consumer of one shared initializer packs its own
    copy), and whether freed tensors go back to ORT's CPU memory arena (``arena``: ORT's default;
    off for a session that dequantizes whole weights on every run, whose arena would keep them).

    Raises:
        InputError: a library that is missing or that ONNX Runtime cannot load, named.
    """
    ort = _import_ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = arena
    for path in frontend.check_libraries(custom_op_libraries):
        try:
            opts.register_custom_ops_library(path)
        except Exception as e:  # ORT's Fail: dlopen failed, or no RegisterCustomOps symbol
            raise InputError(
                f"{path} is not a custom-op library ONNX Runtime can load ({_ort_message(e)}); pass a "
                "shared library built for this onnxruntime that exports RegisterCustomOps"
            ) from None
    return opts


def libraries_for(model: Any, extra: Sequence[str | os.PathLike] = ()) -> tuple[str, ...]:
    """The libraries a session on ``model`` registers: those recorded on an ``onnx_ir.Model``
    (``meta.CUSTOM_OPS_KEY``) and ``extra``, each once."""
    recorded = model.meta.get(meta.CUSTOM_OPS_KEY, ()) if isinstance(model, ir.Model) else ()
    if isinstance(extra, (str, os.PathLike)):
        extra = [extra]
    return tuple(dict.fromkeys(os.fspath(p) for p in (*recorded, *extra)))


_UNREGISTERED_OP = re.compile(r"(?P<domain>[\w.\-]*):(?P<op>[\w.\-]+)\(-?\d+\) is not a registered function/op")
_NO_OPSET_IMPORT = re.compile(
    r"In Node, \(\"[^\"]*\", (?P<op>[\w.\-]+), \"(?P<domain>[^\"]*)\".*No opset import for domain '(?P<d>[^']*)'"
    r"|No opset import for domain '(?P<only>[^']*)'",
    re.S,
)


def _ort_message(error: Exception) -> str:
    """ORT's message without its ``[ONNXRuntimeError] : 1 : FAIL :`` prefix, shortened."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(error)).strip()[:200]


def _unknown_op(error: Exception) -> InputError | None:
    """The InputError for a session that failed on an op ORT does not know, or None."""
    text = str(error)
    ops = [(m["domain"], m["op"]) for m in _UNREGISTERED_OP.finditer(text)]
    if ops:
        return frontend.unknown_op_error(list(dict.fromkeys(ops)))
    match = _NO_OPSET_IMPORT.search(text)
    if match is None:
        return None
    domain = match["domain"] if match["op"] else match["only"]
    op = f"op {match['op']!r} of domain {domain!r}" if match["op"] else f"ops of domain {domain!r}"
    return InputError(
        f"the model uses {op} but does not import that domain (no opset_import entry for {domain!r}); "
        f"add one (model.opset_imports[{domain!r}] = 1 in onnx_ir, or onnx.helper.make_opsetid) and "
        "re-save the model"
    )


def _inference_session(source: str | bytes, opts, providers: list):
    """``onnxruntime.InferenceSession``, with an op ORT does not know reported as an InputError."""
    ort = _import_ort()
    try:
        return ort.InferenceSession(source, opts, providers=providers)
    except Exception as e:
        error = _unknown_op(e)
        if error is None:
            raise
        raise error from e


_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass
class Session:
    """A ready ONNX Runtime session for one target.

    ``run(feeds)`` returns the outputs as numpy arrays. On CUDA, inputs and outputs live in fixed
    device buffers bound once (I/O binding); with a captured graph each run replays it.
    """

    inner: Any
    target: str
    cuda_graph: bool = False
    _keepalive: Any = None
    _binding: Any = None
    _inputs: dict | None = None
    _outputs: list | None = None
    _dynamic_outputs: bool = False
    _float_inputs: dict[str, np.dtype] | None = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inner.get_inputs()]

    @property
    def provider(self) -> str:
        """The session's first execution provider (where its nodes run unless placed elsewhere)."""
        return self.inner.get_providers()[0]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.inner.get_outputs()]

    def _typed(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float feeds in the float type each input declares: an fp16 lowering keeps the graph's
        inputs in their types except a KV cache, which the same feeds reach in fp32."""
        if self._float_inputs is None:
            self._float_inputs = {i.name: np.dtype(_FLOAT_TYPES[i.type]) for i in self.inner.get_inputs()
                                  if i.type in _FLOAT_TYPES}
        return {k: a.astype(self._float_inputs[k]) if k in self._float_inputs and a.dtype != self._float_inputs[k]
                and np.issubdtype(a.dtype, np.floating) else a for k, a in feeds.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = self._typed(feeds)
        if self.target != "cuda":
            return self.inner.run(None, feeds)
        self._bind_and_run(feeds)
        return [o.numpy() for o in self._outputs]

    def run_bound(self, feeds: dict[str, np.ndarray]) -> None:
        """Runs with outputs left in device buffers on CUDA (the serving path: no copy back)."""
        feeds = self._typed(feeds)
        if self.target != "cuda":
            self.inner.run(None, feeds)
            return
        self._bind_and_run(feeds)

    def _bind_and_run(self, feeds: dict[str, np.ndarray]) -> None:
        ort = _import_ort()
        if self._binding is None:
            self._binding = self.inner.io_binding()
            self._inputs = {}
            for name, array in feeds.items():
                buf = ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C"), "cuda", 0)
                self._inputs[name] = buf
                self._binding.bind_ortvalue_input(name, buf)
            # A captured graph writes into fixed buffers, so output shapes must be static.
            self._outputs = []
            for out in self.inner.get_outputs():
                shape = out.shape
                if not all(isinstance(d, int) for d in shape):
                    if not self.cuda_graph:
                        self._binding.bind_output(out.name, "cuda", 0)
                        self._dynamic_outputs = True
                        continue
                    raise InputError(
                        f"output {out.name!r} has the dynamic shape {shape}; fix the input shapes "
                        "(--input-shape) to run it in a CUDA graph"
                    )
                typ = out.type
                dtype = np.float16 if "float16" in typ else np.float32 if "float" in typ else np.int64
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
                self._outputs.append(buf)
                self._binding.bind_ortvalue_output(out.name, buf)
        else:
            for name, array in feeds.items():
                array = np.require(array, requirements="C")
                if list(self._inputs[name].shape()) == list(array.shape):
                    self._inputs[name].update_inplace(array)
                elif self.cuda_graph:
                    raise InputError(
                        f"input {name!r} has shape {list(array.shape)}, but the captured CUDA graph was "
                        f"recorded for {self._inputs[name].shape()}; feed the shapes the model was fixed to"
                    )
                else:  # dynamic shapes: a new device buffer for the new shape
                    self._inputs[name] = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                    self._binding.bind_ortvalue_input(name, self._inputs[name])
        if self._dynamic_outputs:  # unallocated again: ORT sizes them for this run's shapes
            for out in self.inner.get_outputs():
                self._binding.bind_output(out.name, "cuda", 0)
        self.inner.run_with_iobinding(self._binding)
        if self._dynamic_outputs:  # ORT allocates outputs of dynamic shape on each run
            self._outputs = list(self._binding.get_outputs())


def session(
    model: Any,
    target: str = "cpu",
    *,
    threads: int | None = None,
    cuda_graph: bool | None = None,
    optimize: bool = True,
    custom_op_libraries: Sequence[str | os.PathLike] = (),
    spinning: bool = True,
    prepacking: bool = True,
    arena: bool = True,
) -> Session:
    """Opens an ONNX Runtime session for ``target`` (``cpu``, ``cuda`` or ``onnx``).

    Args:
        model: a path, an ``onnx_ir.Model`` or a serialized ``ModelProto``.
        target: the execution target.
        threads: intra-op threads (default: ORT's choice).
        cuda_graph: capture a CUDA graph (cuda only). Default: on when every input shape is static.
        optimize: ORT graph optimizations (off only to inspect the unfused graph).
        custom_op_libraries: shared libraries that register custom ops, in addition to those
            recorded on an ``onnx_ir.Model`` (``meta.CUSTOM_OPS_KEY``).
        spinning: idle intra-op threads spin (ORT's default). Off for sessions that are timed
            side by side: a spinning pool takes the cores from the session timed next.
        prepacking: kernels prepack constant weights (ORT's default); off keeps one copy of an
            initializer read by several nodes (a shared basis) instead of one packed copy each.
        arena: freed tensors stay in ORT's CPU memory arena for reuse (ORT's default).

    Raises:
        InputError: an unknown target; a missing or unloadable library; an op ONNX Runtime does
            not know (named with its domain).
    """
    ort = _import_ort()
    targets.get(target)  # an InputError naming the targets
    opts = session_options(threads, optimize, libraries_for(model, custom_op_libraries), spinning, prepacking, arena)
    source, keepalive = _source(model, opts)
    if target != "cuda":
        inner = _inference_session(source, opts, ["CPUExecutionProvider"])
        return Session(inner, target, _keepalive=keepalive)
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # the CPU build has nothing to preload
            pass
    if not cuda_available():
        raise UnsupportedError(
            "target='cuda' needs onnxruntime-gpu with the CUDAExecutionProvider; install onnxruntime-gpu "
            "on a machine with an NVIDIA GPU"
        )
    static = _static_inputs(source)
    use_graph = static if cuda_graph is None else cuda_graph
    if use_graph and not static:
        raise InputError("cuda_graph=True needs static input shapes; export the model with fixed shapes")
    provider_opts = {"enable_cuda_graph": "1" if use_graph else "0"}
    providers: list = [("CUDAExecutionProvider", provider_opts)]
    if static:
        # Static shapes fold every shape computation: only the CUDA provider, with CPU fallback
        # disabled, so a node CUDA cannot run is an error.
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    else:
        # With dynamic shapes ORT places the int64 shape arithmetic (Shape, Concat, Slice of
        # sizes) on the CPU provider by design; compute nodes are checked on a static copy
        # (check_cuda_placement).
        providers.append("CPUExecutionProvider")
    try:
        inner = _inference_session(source, opts, providers)
    except InputError:
        raise
    except Exception as e:
        if use_graph and cuda_graph is None:
            logger.info("CUDA graph capture refused (%s); running without it", str(e)[:120])
            provider_opts["enable_cuda_graph"] = "0"
            inner = _inference_session(source, opts, providers)
            use_graph = False
        else:
            raise UnsupportedError(
                f"the CUDA provider cannot run every node of this model ({str(e)[:200]}); "
                "lower it with target='cuda'"
            ) from e
    return Session(inner, "cuda", cuda_graph=use_graph, _keepalive=keepalive)


def check_cuda_placement(model: ir.Model, feed: dict[str, np.ndarray]) -> None:
    """Raises UnsupportedError unless the CUDA provider runs every node of ``model`` at ``feed``'s shapes.

    A copy with the graph inputs fixed to the feed's shapes is opened with CPU fallback disabled:
    shape arithmetic folds away, so any node left for the CPU provider is a compute node that
    CUDA cannot run.
    """
    static = frontend.clone(model)
    for value in static.graph.inputs:  # static inputs are enough for ORT to fold the shape arithmetic
        if value.name in feed:
            value.shape = ir.Shape(list(feed[value.name].shape))
    session(static, "cuda", cuda_graph=False)


def _static_inputs(source: str | bytes) -> bool:
    import onnx

    proto = onnx.load_model_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in init:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far a candidate's outputs are from the reference's over a set of feeds."""

    samples: int
    max_abs_error: float
    rel_error: float  # ‖y − y_ref‖ / ‖y_ref‖ over all outputs and samples
    cosine: float
    reference_provider: str
    candidate_provider: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compare(reference: Session, candidate: Session, feeds: Sequence[dict[str, np.ndarray]]) -> Comparison:
    """Runs both sessions on the feeds and measures the candidate's output error."""
    err2 = ref2 = dot = cand2 = 0.0
    max_abs = 0.0
    for feed in feeds:
        ref_out = reference.run(feed)
        cand_out = candidate.run(feed)
        for r, c in zip(ref_out, cand_out):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            r64 = np.asarray(r, dtype=np.float64).ravel()
            c64 = np.asarray(c, dtype=np.float64).ravel()
            d = c64 - r64
            max_abs = max(max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
            err2 += float(d @ d)
            ref2 += float(r64 @ r64)
            cand2 += float(c64 @ c64)
            dot += float(r64 @ c64)
    rel = (err2 / ref2) ** 0.5 if ref2 > 0 else float(err2 > 0)
    cos = dot / ((ref2 * cand2) ** 0.5) if ref2 > 0 and cand2 > 0 else 1.0
    return Comparison(
        len(feeds), max_abs, rel, cos,
        reference.inner.get_providers()[0], candidate.inner.get_providers()[0],
    )


class ValueTaps:
    """CPU sessions whose outputs are chosen intermediate values, for statistics.

    The model is serialized once (its external weights stay on disk); each group of values gets
    its own session whose only outputs are those values, so ORT computes just what they need.
    The model itself is not changed.
    """

    def __init__(self, model: ir.Model, threads: int | None = None) -> None:
        self.proto, self.folder, self._keepalive = serialized(model)
        self.threads = threads
        self.libraries = libraries_for(model)
        self.types = {v.name: v.dtype for g in frontend.graphs(model) for n in g for v in n.outputs}
        self.types.update({v.name: v.dtype for v in model.graph.inputs})

    def session(self, names: Sequence[str]):
        """An ``onnxruntime.InferenceSession`` whose outputs are ``names``, in that order."""
        import onnx

        _import_ort()  # a clear error when onnxruntime is missing
        unknown = [n for n in names if n not in self.types]
        if unknown:
            raise InputError(f"no values named {unknown[:5]} in the model")
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        del proto.graph.output[:]
        for name in names:
            dtype = self.types[name]
            elem = int(dtype) if dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        opts = session_options(self.threads, custom_op_libraries=self.libraries)
        if self.folder is not None:
            opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, self.folder)
        return _inference_session(proto.SerializeToString(), opts, ["CPUExecutionProvider"])

    def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cleanup()
            self._keepalive = None


def interleaved_latency_ms(runs_fns: Sequence, feed: dict[str, np.ndarray], rounds: int | None = 20, *,
                           target_ms: float = 300.0, max_rounds: int = 500) -> list[float]:
    """Median wall time in milliseconds of each ``run(feed)``, the runs interleaved: every round
    calls each once, in turn (after one warm-up call each), so drift on a shared machine falls on
    all of them alike. Open their sessions with ``spinning=False``: after a run, ORT's intra-op
    threads spin for work and take the cores from the next session (MiniLM at 101 tokens on
    2 cores: 75 ms per run interleaved with spinning pools, 28 ms without, 27 ms alone).

    ``rounds=None`` picks enough rounds for about ``target_ms`` per run, between 5 and
    ``max_rounds`` (from two probe rounds): a sub-millisecond model needs hundreds of rounds for
    a median that holds to a few percent on a shared machine, a large one a few."""
    import statistics
    import time

    for run in runs_fns:
        run(feed)
    if rounds is None:
        probe = interleaved_latency_ms(runs_fns, feed, 2)
        rounds = int(np.clip(target_ms / max(max(probe), 1e-3), 5, max_rounds))
    times: list[list[float]] = [[] for _ in runs_fns]
    for _ in range(rounds):
        for i, run in enumerate(runs_fns):
            start = time.perf_counter()
            run(feed)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def median_latency_ms(run, feed: dict[str, np.ndarray], runs: int = 20) -> float:
    """Median wall time of ``run(feed)`` in milliseconds, after one warm-up run."""
    import statistics
    import time

    run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)
