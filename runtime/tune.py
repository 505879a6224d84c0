"""Kernel tuning: each lowered layer's fastest form, timed in ONNX Runtime at the serving shape and
cached per machine.

``MatMulNBits`` runs the same bytes two ways on the CPU. ``accuracy_level=4`` quantizes each
block of activations to int8 at run time and multiplies in int8; ``accuracy_level=1`` dequantizes
the weights to fp32 and multiplies in fp32 (and is the more exact). Which is faster depends on
the CPU, the layer and the rows ``M`` it multiplies at the serving shape: on an AVX2 EPYC without
VNNI, MiniLM's 4-bit layers took 2.06 ms per one-token run at level 4 against 3.81 ms at level 1
(fp32: 3.22 ms), and 32.2 ms against 28.7 ms at 101 tokens (fp32: 27.8 ms). So it is measured:

* the serving shape is the first calibration feed's (``--input-shape`` fixes it), else a
  generated feed; each MatMulNBits's ``M`` is read off its input at that feed;
* every distinct layer (``M``, ``K``, ``N``, bits, block, zero points, bias) is timed as a
  one-node model at each level, and beside it the fp32 ``MatMul`` it replaces (for the record:
  the float form costs 32 bits per weight, it is not a candidate), the sessions interleaved with
  spinning off (:func:`hessc.runtime.sessions.interleaved_latency_ms`);
* each node takes the fastest level; within :data:`TIE` of each other the exact fp32 path wins;
* timings are cached per machine (CPU model, logical CPUs, ONNX Runtime version) in
  ``kernel-timings.json`` in hessc's cache, so a second compile on the machine measures nothing
  and makes the same choices (outputs stay byte-identical for a seed).

Nodes inside ``If``/``Loop``/``Scan`` bodies keep the default level (their inputs cannot be read
off the main graph); the record says how many.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir

from hessc.ir import frontend, meta
from hessc.runtime import memory

logger = logging.getLogger(__name__)

TUNE_KEY = "hessc.tuning"
"""``model.meta`` key: the record of :class:`TuneKernelsPass` (also saved in the plan)."""

LEVELS = (4, 1)
"""MatMulNBits ``accuracy_level`` candidates: int8 compute, fp32 compute."""

TIE = 0.03
"""Levels within 3% of the fastest count as tied; the exact fp32 path (level 1) wins a tie."""

FP32_REFERENCE_LIMIT = 1 << 26
"""Layers of more weights than this (256 MiB in fp32: a large vocabulary's head) are not timed
as an fp32 MatMul for the record; their ``fp32_matmul_ms`` is None."""

TIMINGS_FILE = "kernel-timings.json"
MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class NBitsLayer:
    """What a MatMulNBits node's time depends on."""

    m: int
    k: int
    n: int
    bits: int
    block: int
    zero_points: bool
    bias: bool

    @property
    def key(self) -> str:
        return (f"MatMulNBits m{self.m} k{self.k} n{self.n} b{self.bits} g{self.block}"
                f"{' zp' if self.zero_points else ''}{' bias' if self.bias else ''}")


def machine_key() -> str:
    """The machine the timings hold for: CPU model, logical CPUs, ONNX Runtime version."""
    import onnxruntime as ort

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cpus | onnxruntime {ort.__version__}"


class TimingCache:
    """Per-machine kernel timings in a JSON file: ``{machine: {layer key: {form: ms}}}``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.machine = machine_key()
        self._all: dict = {}
        if path is not None and path.exists():
            try:
                self._all = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring the unreadable kernel-timing cache %s", path)
        self.entries: dict = self._all.setdefault(self.machine, {})

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".timings-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self._all, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def default_cache() -> TimingCache:
    from hessc import cache

    return TimingCache(cache.cache_dir() / TIMINGS_FILE)


def _layer_model(layer: NBitsLayer, form: str, seed: int = 0) -> bytes:
    """A one-node model of ``layer`` in ``form`` (``level-4``, ``level-1``, ``fp32``), random data."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k_blocks = -(-layer.k // layer.block)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [layer.m, layer.k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [layer.m, layer.n])
    inits, inputs = [], ["x"]
    if form == "fp32":
        inits.append(numpy_helper.from_array(rng.standard_normal((layer.k, layer.n)).astype(np.float32), "w"))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not layer.bias else "xy"])]
        if layer.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(layer.n).astype(np.float32), "bias"))
            nodes.append(helper.make_node("Add", ["xy", "bias"], ["y"]))
    else:
        blob = layer.block * layer.bits // 8
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (layer.n, k_blocks, blob), dtype=np.uint8), "b"))
        inits.append(numpy_helper.from_array((0.01 * rng.random(layer.n * k_blocks) + 1e-3).astype(np.float32), "s"))
        inputs += ["b", "s"]
        if layer.zero_points:
            zp_bytes = -(-k_blocks * layer.bits // 8)
            inits.append(numpy_helper.from_array(rng.integers(0, 256, layer.n * zp_bytes, dtype=np.uint8), "z"))
            inputs.append("z")
        if layer.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(layer.n).astype(np.float32), "bias"))
            inputs += [""] * (5 - len(inputs)) + ["bias"]
        nodes = [helper.make_node("MatMulNBits", inputs, ["y"], domain=MS_DOMAIN, K=layer.k, N=layer.n,
                                  bits=layer.bits, block_size=layer.block,
                                  accuracy_level=int(form.split("-")[1]))]
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    return model.SerializeToString()


def time_layer(layer: NBitsLayer, forms: Sequence[str], rounds: int = 0) -> dict[str, float]:
    """Median ms of ``layer`` in each form, the forms interleaved (``rounds``: 0 picks enough
    rounds for about 0.3 s per form, between 5 and 50)."""
    from hessc.runtime import sessions

    runs = [sessions.session(_layer_model(layer, form), "cpu", spinning=False).run for form in forms]
    feed = {"x": np.random.default_rng(1).standard_normal((layer.m, layer.k)).astype(np.float32)}
    timed = sessions.interleaved_latency_ms(runs, feed, rounds or None, max_rounds=50)
    return {form: round(ms, 4) for form, ms in zip(forms, timed)}


def _nbits_layer(node: ir.Node, rows: int) -> NBitsLayer:
    attr = node.attributes
    inputs = list(node.inputs) + [None] * 6
    return NBitsLayer(
        m=rows, k=attr["K"].as_int(), n=attr["N"].as_int(), bits=attr["bits"].as_int(),
        block=attr["block_size"].as_int(), zero_points=inputs[3] is not None, bias=inputs[5] is not None,
    )


def _rows_at(model: ir.Model, nodes: Sequence[ir.Node], feed: dict[str, np.ndarray]) -> dict[str, int]:
    """``M`` (rows: every dimension but the last) of each node's activation input at ``feed``."""
    from hessc.runtime import sessions

    names = sorted({n.inputs[0].name for n in nodes})
    graph_inputs = {v.name for v in model.graph.inputs}
    tapped = [n for n in names if n not in graph_inputs]
    shapes = {n: feed[n].shape for n in names if n in graph_inputs}
    if tapped:
        taps = sessions.ValueTaps(model)
        try:
            values = taps.session(tapped).run(None, feed)
        finally:
            taps.close()
        shapes.update({n: v.shape for n, v in zip(tapped, values)})
    return {n: int(np.prod(shape[:-1], dtype=np.int64)) for n, shape in shapes.items()}


def serving_feed(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """The feed the serving shape is read from: the first calibration feed, else a generated one;
    for a decoder with a KV cache, a one-token decode step (generation's shape)."""
    from hessc.runtime import calibration as calib
    from hessc.runtime import decoder

    if decoder.find(model) is not None:
        return calib.generated_feeds(model, count=2, seed=seed)[1]
    calibration = model.meta.get(meta.CALIBRATION_KEY)
    if calibration is not None and calibration.feeds:
        return calibration.feeds[0]
    return calib.generated_feeds(model, count=1, seed=seed)[0]


class TuneKernelsPass(ir.passes.InPlacePass):
    """Sets each MatMulNBits's ``accuracy_level`` to the fastest at the serving shape, measured."""

    def __init__(self, levels: Sequence[int] = LEVELS, cache: TimingCache | None = None,
                 max_memory: int | None = None) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.cache = cache
        self.max_memory = max_memory

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = [n for n in model.graph if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
        inner = sum(1 for g in frontend.graphs(model) if g is not model.graph
                    for n in g if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN)
        if not main:
            return ir.passes.PassResult(model, False)
        too_large = memory.session_fits(model, self.max_memory)  # the serving shapes are read from one
        if too_large:
            model.meta[TUNE_KEY] = {"skipped": too_large}
            logger.info("tune-kernels skipped (each MatMulNBits keeps its accuracy_level): %s", too_large)
            return ir.passes.PassResult(model, False)
        cache = self.cache if self.cache is not None else default_cache()
        feed = serving_feed(model)
        rows = _rows_at(model, main, feed)
        forms = [f"level-{lvl}" for lvl in self.levels]
        layers: dict[str, dict] = {}
        modified = False
        measured = 0
        for node in main:
            layer = _nbits_layer(node, rows[node.inputs[0].name])
            entry = layers.get(layer.key)
            if entry is None:
                wanted = (*forms, "fp32") if layer.k * layer.n <= FP32_REFERENCE_LIMIT else forms
                timings = cache.entries.get(layer.key)
                if timings is None or not all(f in timings for f in wanted):
                    timings = time_layer(layer, wanted)
                    cache.entries[layer.key] = timings
                    measured += 1
                best = min(timings[f] for f in forms)
                tied = [f for f in forms if timings[f] <= best * (1 + TIE)]
                chosen = "level-1" if "level-1" in tied else min(tied, key=lambda f: timings[f])
                fp32 = timings.get("fp32")
                entry = layers[layer.key] = {
                    "layer": layer.key, "ms": {f: timings[f] for f in forms}, "fp32_matmul_ms": fp32,
                    "chosen": chosen, "vs_fp32": round(timings[chosen] / fp32, 3) if fp32 else None, "nodes": 0,
                }
            entry["nodes"] += 1
            level = int(entry["chosen"].split("-")[1])
            if node.attributes["accuracy_level"].as_int() != level:
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
                modified = True
        if measured:
            cache.save()
        record = {
            "serving_input": {k: list(v.shape) for k, v in feed.items()},
            "machine": cache.machine, "layers": list(layers.values()),
        }
        if inner:
            record["not_tuned"] = f"{inner} MatMulNBits in subgraph bodies keep accuracy_level 4"
        slower = [e["layer"] for e in layers.values() if e["vs_fp32"] is not None and e["vs_fp32"] > 1.0 + TIE]
        if slower:
            record["slower_than_fp32"] = (
                f"{len(slower)} of {len(layers)} layer shapes run slower than the fp32 MatMul they replace in "
                "every form measured at this shape (the float form would cost 32 bits per weight)"
            )
        model.meta[TUNE_KEY] = record
        logger.info("tune-kernels: %s", ", ".join(f"{e['layer']}: {e['chosen']} ({e['vs_fp32'] or '?'}x fp32)"
                                                  for e in layers.values()))
        return ir.passes.PassResult(model, modified)
