"""Lowering: the portable Q/DQ form → the operators each ONNX Runtime target runs fastest.

The portable form reads each quantized weight through a blocked ``DequantizeLinear``. Lowering
matches that ``DequantizeLinear`` together with its consumers and rewrites them:

* ``DQ(q[K,N]; axis=0, block=g) → MatMul(x, ·)`` or ``→ Gemm(x, ·, c)``, and ``DQ(q[N,K]; axis=1) →
  Gemm(x, ·, c; transB=1)``
  become ``com.microsoft.MatMulNBits(x, pack(qᵀ), s, z[, bias])`` (``Y = x · dequant(B)ᵀ``), with
  ``accuracy_level=4`` on the CPU (int8 compute; 20–30× faster than the float path for 2/8 bits);
* ``DQ(E_q[V,D]; axis=1) → Gather(·, ids)`` becomes ``com.microsoft.GatherBlockQuantized`` (4/8 bits);
* a tied table, ``DQ(E_q[V,D]; axis=1)`` read by ``Gather(·, ids)`` and by a head (``MatMul(x,
  Transpose(·))`` or ``Gemm(x, ·, transB=1)``, both ``y = x Eᵀ``), is stored once in MatMulNBits'
  layout: the head is ``MatMulNBits(x, B, s, z)`` with ``N = V``, ``K = D``, and the lookup is
  ``GatherBlockQuantized`` on ``uint8`` data, which follows MatMulNBits' conventions (codes low bits
  first, zero points packed per row, default ``2^(bits−1)``): ``B [V, k_blocks, blob]`` viewed as
  ``[V, k_blocks·blob]``, ``s [V·k_blocks]`` as ``[V, k_blocks]``, ``z`` as ``[V, ⌈k_blocks·bits/8⌉]``,
  through ``Reshape`` nodes that ONNX Runtime folds when the session opens, so the file holds the
  bytes once. Rows are padded to whole blocks, so a table whose width is not a whole number of
  blocks is looked up padded and sliced back to ``D``. Where the target's lookup kernel reads zero
  points packed over the whole table instead of per row (``Target.embedding_whole_blocks``: CUDA),
  and they differ (an odd number of 4-bit blocks per row), the lookup reads a float table that a
  graph of standard operators dequantizes from the same bytes (folded when the session opens);
* ``target="cuda"`` additionally converts float tensors to fp16 (inputs and outputs keep their types,
  but a KV cache becomes fp16)
  when asked, since the CUDA kernels of MatMulNBits are fastest in fp16.

3-bit codes (no 3-bit kernel exists) run as 4-bit ``MatMulNBits`` but are stored at 3 bits:
``B`` is the output of a small graph of standard operators (``BitShift``, ``BitwiseAnd/Or``,
``Cast``, ``Gather``, ``Concat``, ``Expand``, ``Reshape``) reading the codes' low bits and high bits
(:func:`hessc.runtime.packing.pack_three_bit`, padded to whole groups of 8 codes, not to whole
blocks) and the zero points. Every input of that graph is constant, so ONNX Runtime's constant
folding (level 1, on by default, before the providers are assigned) replaces it by the 4-bit ``B``
initializer when the session opens, and the kernel prepacks it as usual: the file holds 3 bits per
weight, the session runs the 4-bit kernel on the same bytes. ORT keeps every folded intermediate
until the folding pass ends, so the graph is kept short: while a session opens, about six tensors
of ``B``'s size per 3-bit weight exist besides ``B``. With ORT's optimizations off the graph runs on
every call and MatMulNBits, whose ``B`` is then not a constant, takes its slower float path.

Weights read inside ``If``/``Loop``/``Scan`` bodies are lowered alike, whichever graph holds their
``DequantizeLinear`` (the innermost one enclosing every reader): each reader becomes the kernel in
its own graph, and the packed operands are main-graph initializers that bodies read from the outer
scope (measured on a 2048 × 2048 4-bit MatMulNBits in an ``If`` branch: as fast as with them in the
branch).

A pattern a target cannot run as a kernel (a block size the kernel refuses) is left in the
portable form, which every target runs; each such case is reported in the lowering summary.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from hessc.errors import InputError, VerificationError
from hessc.ir import frontend, meta
from hessc.passes.activations import ACT_QUANT_KEY
from hessc.runtime import memory, packing, targets

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_BITS = {
    ir.DataType.INT2: 2, ir.DataType.UINT2: 2,
    ir.DataType.INT4: 4, ir.DataType.UINT4: 4,
    ir.DataType.INT8: 8, ir.DataType.UINT8: 8,
}
_SIGNED = (ir.DataType.INT2, ir.DataType.INT4, ir.DataType.INT8)


@dataclasses.dataclass(frozen=True)
class LowerConfig:
    """Lowering options.

    Attributes:
        target: ``cpu``, ``cuda`` or ``onnx``.
        accuracy_level: MatMulNBits ``accuracy_level`` (4: int8 compute on CPU).
        gather_quantized: lower quantized embeddings to GatherBlockQuantized.
        fp16: convert float activations and scales to fp16 (cuda only).
        three_bit: store 3-bit MatMul/Gemm codes at 3 bits, rebuilt into the 4-bit kernel layout
            when ORT opens the session (False: in the 4-bit container, 4 bits per weight).
        keep_portable: keep ``Model.clone()`` of the portable form under
            ``model.meta[PORTABLE_KEY]`` for verification to compare against, where the
            whole-model checks fit ``max_memory`` (:func:`memory.whole_model_check`).
        max_memory: the user's memory bound in bytes (None: the machine's available memory).
    """

    target: str = "cpu"
    accuracy_level: int = 4
    gather_quantized: bool = True
    fp16: bool = False
    three_bit: bool = True
    keep_portable: bool = False
    max_memory: int | None = None

    def __post_init__(self) -> None:
        targets.get(self.target)
        if self.fp16 and self.target != "cuda":
            raise InputError("fp16 lowering is for target='cuda' only")


def _dq_parts(dq: ir.Node):
    q, scale = dq.inputs[0], dq.inputs[1]
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if q is None or q.const_value is None or scale is None or scale.const_value is None:
        return None
    if zp is not None and zp.const_value is None:
        return None
    if q.dtype not in _BITS:
        return None
    return q, scale, zp


def _plan_bits(dq: ir.Node, default: int) -> int:
    plan = dq.meta.get(meta.QUANT_KEY)
    return plan.bits if plan is not None else default


LOWERING_KEY = "hessc.lowering"
"""``model.meta`` key: ``{what was rewritten or kept: count}`` of the last lowering."""

PORTABLE_KEY = "hessc.portable"
"""``model.meta`` key: the portable Q/DQ form the model was lowered from (``LowerConfig.keep_portable``)."""


class LowerWeightsPass(ir.passes.InPlacePass):
    """Rewrites weight ``DequantizeLinear`` patterns into the target's low-bit operators, then
    (``fp16``) float tensors to fp16. What it did goes to ``model.meta[LOWERING_KEY]``."""

    def __init__(self, config: LowerConfig) -> None:
        super().__init__()
        self.config = config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        if (config.keep_portable and targets.get(config.target).lowers_weights
                and memory.whole_model_check(model, config.max_memory) is None):
            model.meta[PORTABLE_KEY] = frontend.clone(model)
        rewriter = _Rewriter(config)
        modified = rewriter.run(model)
        summary = dict(rewriter.summary)
        if config.fp16:
            converted = to_fp16(model)
            model.graph, model.ir_version = converted.graph, converted.ir_version
            summary["fp16 activations"] = 1
            modified = True
        model.meta[LOWERING_KEY] = summary
        return ir.passes.PassResult(model, modified)


def _drop_dead_dequantize(dq: ir.Node) -> None:
    """Removes a ``DequantizeLinear`` its rewrite left unread, with the codes only it read, as soon
    as that weight is done: the codes of one form and the packed weights of the other are never
    both held for the whole model."""
    graph = dq.graph
    if graph is None or dq.outputs[0].uses() or dq.outputs[0].is_graph_output():
        return
    inputs = [v for v in dq.inputs if v is not None]
    graph.remove(dq, safe=True)
    for value in inputs:
        _pop_if_unread(value)


def _pop_if_unread(value: ir.Value) -> None:
    """Takes an initializer no node, input or output reads out of its graph."""
    owner = value.graph
    if (owner is not None and owner.initializers.get(value.name) is value and not value.uses()
            and not value.is_graph_input() and not value.is_graph_output()):
        owner.initializers.pop(value.name)


class _Rewriter:
    """One lowering run: the pattern rewrites and what they did."""

    def __init__(self, config: LowerConfig) -> None:
        self.config = config
        self.summary: dict[str, int] = {}
        self._tables: dict[bool, ir.Value] = {}
        self._main: ir.Graph | None = None

    def _count(self, key: str) -> None:
        self.summary[key] = self.summary.get(key, 0) + 1

    def run(self, model: ir.Model) -> bool:
        if not targets.get(self.config.target).lowers_weights:
            return False
        modified = False
        self._main = model.graph
        # Every graph's: a weight read inside If/Loop/Scan bodies is dequantized in the graph
        # enclosing its readers (hessc.ir.weights.definition_point), possibly the main graph.
        found = [node for graph in list(frontend.graphs(model)) for node in graph]
        if "LSTM" not in dict(targets.get(self.config.target).float_ops):
            for node in found:
                if node.op_type == "LSTM" and node.domain in ("", "ai.onnx"):
                    modified |= self._to_dynamic_quantize_lstm(node)
        for node in found:
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or node.graph is None:
                continue
            if self._lower(model, node):
                modified = True
                _drop_dead_dequantize(node)
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
            for graph in list(frontend.graphs(model))[1:]:  # the pass above prunes only the main graph's
                for value in list(graph.initializers.values()):
                    _pop_if_unread(value)
        return modified

    def _lower(self, model: ir.Model, dq: ir.Node) -> bool:
        parts = _dq_parts(dq)
        if parts is None:
            return False
        q, scale, zp = parts
        uses = list(dq.outputs[0].uses())
        if not uses or dq.outputs[0].is_graph_output():
            return False
        block = dq.attributes.get_int("block_size", 0)
        axis = dq.attributes.get_int("axis", 1)
        bits = _BITS[q.dtype]
        ops = {(u.node.op_type, u.idx) for u in uses}
        tie = _tie_uses(uses, dq.graph)
        if tie is not None and axis == 1 and block:
            return self._to_tied_table(dq, tie, q, scale, zp, bits, block)
        if ops == {("MatMul", 1)} and axis == 0 and block:
            return self._to_matmul_nbits(model, dq, uses, q, scale, zp, bits, block, transposed=True)
        if all(u.node.op_type == "Gemm" and u.idx == 1 for u in uses) and block:
            # transB=1 stores (N, K), quantized along axis 1; transB=0 stores (K, N), along axis 0.
            if all(self._plain_gemm(u.node, trans_b=axis == 1) for u in uses):
                return self._to_matmul_nbits(model, dq, uses, q, scale, zp, bits, block, transposed=axis == 0)
        if ops == {("Gather", 0)} and axis == 1 and block and self.config.gather_quantized:
            return self._to_gather_block_quantized(model, dq, uses, q, scale, zp, bits, block)
        return False

    def _to_dynamic_quantize_lstm(self, node: ir.Node) -> bool:
        """``LSTM(X, DQ(W), DQ(R), ...)`` with 8-bit symmetric weights, one scale per gate unit, as
        ``com.microsoft.DynamicQuantizeLSTM``: the codes transposed to (directions, in, gates ·
        hidden), the scales and zero points (0) per direction and gate unit; the kernel quantizes
        its input and hidden state to uint8 on every step."""
        if node.attributes.get_int("layout", 0) != 0:
            self._count("kept Q/DQ: LSTM with layout=1 (DynamicQuantizeLSTM takes sequence-first inputs)")
            return False
        operands = []
        for index in (1, 2):
            value = node.inputs[index] if len(node.inputs) > index else None
            weight = _recurrent_weight(value)
            if weight is None:
                if value is not None and value.const_value is None:
                    self._count("kept Q/DQ: LSTM whose weights are not both 8-bit symmetric per gate unit")
                return False
            operands.append(weight)
        graph = node.graph
        store = self._main or graph
        inputs = list(node.inputs[:8]) + [None] * (8 - min(len(node.inputs), 8))
        quantized = []
        for base, codes, scales in operands:
            directions = codes.shape[0]
            quantized.append((
                _initializer(store, f"{base}_lstm_int8", np.ascontiguousarray(codes.transpose(0, 2, 1))),
                _initializer(store, f"{base}_lstm_scale", scales.reshape(directions, -1)),
                _initializer(store, f"{base}_lstm_zp", np.zeros((directions, codes.shape[1]), np.int8)),
            ))
        (w, w_scale, w_zp), (r, r_scale, r_zp) = quantized
        attrs = {k: a for k, a in node.attributes.items() if k != "layout"}
        new = ir.node("DynamicQuantizeLSTM", [inputs[0], w, r, *inputs[3:8], w_scale, w_zp, r_scale, r_zp],
                      attributes=attrs, domain=MS_DOMAIN, name=f"{node.name or 'lstm'}_int8",
                      num_outputs=len(node.outputs))
        _replace(graph, node, new)
        self._count("LSTM -> DynamicQuantizeLSTM (8-bit weights, dynamic uint8 activations)")
        return True

    def _high_bits_table(self, graph: ir.Graph, symmetric: bool) -> ir.Value:
        """One ``Constant`` node per model holding :func:`packing.high_bits_table` (1 KiB), shared
        by every 3-bit weight's unpack graph."""
        if symmetric not in self._tables:
            name = "hessc_three_bit_high_table" + ("_symmetric" if symmetric else "")
            node = ir.node("Constant", [], attributes={"value": ir.tensor(packing.high_bits_table(symmetric))}, name=name)
            node.outputs[0].name = name
            graph = self._main or graph  # seen from every subgraph
            graph.insert_before(next(iter(graph)), node)
            self._tables[symmetric] = node.outputs[0]
        return self._tables[symmetric]

    def _activation_input(self, x: ir.Value) -> ir.Value:
        """On the CPU, static per-tensor activation Q/DQ gives way to the kernel's own int8 path."""
        dq = x.producer()
        if self.config.target != "cpu" or dq is None or ACT_QUANT_KEY not in dq.meta:
            return x
        q = dq.inputs[0].producer()
        if q is None or q.op_type != "QuantizeLinear":
            return x
        self._count("8-bit activations: MatMulNBits dynamic int8 (accuracy_level 4)")
        return q.inputs[0]

    @staticmethod
    def _plain_gemm(node: ir.Node, trans_b: bool = True) -> bool:
        """``Gemm(x, W, c)`` as ``MatMulNBits`` computes it: no transA, no alpha, a 1-D bias,
        and ``transB`` as given."""
        a = node.attributes
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return (
            a.get_int("transA", 0) == 0
            and a.get_int("transB", 0) == int(trans_b)
            and a.get_float("alpha", 1.0) == 1.0
            and (c is None or (a.get_float("beta", 1.0) == 1.0 and c.shape is not None and len(c.shape) == 1))
        )

    def _to_matmul_nbits(self, model, dq, uses, q, scale, zp, bits, block, transposed) -> bool:
        codes = q.const_value.numpy()  # a byte per code; widened a block of rows at a time when packed
        scales = scale.const_value.numpy()
        zps = None if zp is None else zp.const_value.numpy().astype(np.int16)
        if transposed:  # stored (K, N) → (N, K)
            codes, scales = codes.T, scales.T
            zps = None if zps is None else zps.T
        graph = dq.graph
        first = min((_holder(graph, u.node) for u in uses), key=list(graph).index)
        weight = self._nbits_weight(dq, q, codes, scales, zps, bits, block, first)
        if weight is None:
            return False
        for use in uses:
            self._nbits_node(use.node.graph, use.node, weight)
        self._count(weight.summary())
        return True

    def _nbits_weight(self, dq, q, codes, scales, zps, bits, block, first) -> _NBitsWeight | None:
        """MatMulNBits' operands of (N, K) codes, as initializers (3-bit codes: their unpack graph,
        inserted before ``first``); None, with the reason counted, where the kernel cannot run them."""
        if block < 16 or block & (block - 1):
            self._count(f"kept Q/DQ: block size {block} (MatMulNBits needs a power of two >= 16)")
            return None
        n_out, k = codes.shape
        symmetric = q.dtype in _SIGNED
        if symmetric and zps is not None and np.any(zps):
            self._count("kept Q/DQ: signed codes with non-zero zero points")
            return None
        packed_b, packed_zp = packing.matmul_nbits_weights(
            codes, None if symmetric else zps, bits, block, symmetric
        )
        plan_bits = _plan_bits(dq, bits)
        split = None
        if self.config.three_bit and plan_bits == 3 and bits == 4 and (symmetric or zps is not None):
            try:
                split = packing.three_bit_weights(codes.astype(np.int16), None if symmetric else zps, symmetric)
            except ValueError as e:
                raise VerificationError(f"{q.name}: planned at 3 bits, but {e} (a hessc bug)") from e
        _check_packed(
            q.name, codes, scales, None if symmetric else zps, packed_b, packed_zp, bits, block, symmetric, split
        )
        graph = dq.graph
        store = self._main or graph  # the main graph, which every subgraph reads from
        base = q.name.removesuffix("_q")
        s_val = _initializer(store, f"{base}_nbits_scales", np.ascontiguousarray(scales).reshape(-1))
        zp_val = None if packed_zp is None else _initializer(store, f"{base}_nbits_zp", packed_zp)
        if split is None:
            b_val = _initializer(store, f"{base}_nbits_B", packed_b)
        else:
            lows = _initializer(store, f"{base}_nbits_lows", split[0])
            highs = _initializer(store, f"{base}_nbits_highs", split[1])
            nodes, b_val = unpack_three_bit_graph(
                lows, highs, zp_val, self._high_bits_table(graph, symmetric), n_out, k, block, symmetric,
                f"{base}_nbits_B",
            )
            graph.insert_before(first, nodes)
        return _NBitsWeight(base, b_val, s_val, zp_val, n_out, k, bits, block, plan_bits, split is not None,
                            dq.meta.get(meta.QUANT_KEY))

    def _nbits_node(self, graph: ir.Graph, node: ir.Node, weight: _NBitsWeight) -> None:
        """Replaces ``MatMul(x, W)`` or a plain ``Gemm(x, W, c)`` by ``MatMulNBits``."""
        x = self._activation_input(node.inputs[0])
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        inputs = [x, weight.b, weight.scales, weight.zero_points]
        if bias is not None:
            inputs += [None, bias]
        attrs = {"K": weight.k, "N": weight.n, "bits": weight.bits, "block_size": weight.block}
        if self.config.target == "cpu":
            attrs["accuracy_level"] = self.config.accuracy_level
        while inputs and inputs[-1] is None:
            inputs.pop()
        new = ir.node("MatMulNBits", inputs, attributes=attrs, domain=MS_DOMAIN,
                      name=f"{node.name or weight.base}_nbits")
        new.meta[meta.QUANT_KEY] = weight.plan
        _replace(graph, node, new)

    def _to_tied_table(self, dq: ir.Node, tie: _TieUses, q, scale, zp, bits, block) -> bool:
        """One table, stored once in MatMulNBits' layout, read by the head(s) and the lookup(s)."""
        if tie.lookups and not self.config.gather_quantized:
            self._count("kept Q/DQ: tied table (quantized lookups are off)")
            return False
        graph = dq.graph
        codes = q.const_value.numpy().astype(np.int16)  # stored (V, D): MatMulNBits' (N, K)
        scales = scale.const_value.numpy()
        zps = None if zp is None else zp.const_value.numpy().astype(np.int16)
        order = list(graph)
        first = min(tie.nodes, key=order.index)
        weight = self._nbits_weight(dq, q, codes, scales, zps, bits, block, first)
        if weight is None:
            return False
        for node in tie.heads:
            self._nbits_node(graph, node, weight)
        how = ""
        if tie.lookups:
            how = self._shared_lookups(graph, tie.lookups, weight, min(tie.lookups, key=order.index))
        self._count(f"tied table stored once: {weight.summary()}" + (f" + {how}" if how else ""))
        return True

    def _shared_lookups(self, graph: ir.Graph, lookups: list[ir.Node], weight: _NBitsWeight, first: ir.Node) -> str:
        """Rewrites the lookups of a tied table to read the head's packed bytes; returns how."""
        n_blocks = -(-weight.k // weight.block)
        padded = n_blocks * weight.block != weight.k
        zp_row = -(-n_blocks * weight.bits // 8)
        flat_zero_points = weight.zero_points is None or (n_blocks * weight.bits) % 8 == 0
        if not flat_zero_points and targets.get(self.config.target).embedding_whole_blocks:
            # The kernel indexes zero points over the flattened table, MatMulNBits packs them per row.
            table = self._dequantized_table(graph, weight, first)
            for node in lookups:
                new = ir.node("Gather", [table, node.inputs[1]], attributes={"axis": 0},
                              name=f"{node.name or weight.base}_table")
                _replace(graph, node, new)
            return (f"Gather of a float table dequantized from the same bytes when the session opens "
                    f"({self.config.target}'s GatherBlockQuantized reads zero points packed over the whole table)")
        g = _GraphBuilder(f"{weight.base}_gbq_view")
        i64 = lambda *values: np.array(values, dtype=np.int64)  # noqa: E731
        data = g.op("Reshape", weight.b, g.const(i64(weight.n, n_blocks * weight.block * weight.bits // 8)))
        scales = g.op("Reshape", weight.scales, g.const(i64(weight.n, n_blocks)))
        zero_points = None if weight.zero_points is None else g.op(
            "Reshape", weight.zero_points, g.const(i64(weight.n, zp_row)))
        ends = g.const(i64(weight.k)) if padded else None
        starts, axes = (g.const(i64(0)), g.const(i64(-1))) if padded else (None, None)
        graph.insert_before(first, g.nodes)
        for node in lookups:
            inputs = [data, node.inputs[1], scales] + ([zero_points] if zero_points is not None else [])
            attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": weight.block, "bits": weight.bits}
            new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN,
                          name=f"{node.name or weight.base}_gbq")
            if not padded:
                _replace(graph, node, new)
                continue
            # Rows hold whole blocks: the lookup returns them padded, sliced back to the table's width.
            new.outputs[0].name = f"{node.outputs[0].name}_padded"
            new.outputs[0].type = node.outputs[0].type
            cut = ir.node("Slice", [new.outputs[0], starts, ends, axes], name=f"{node.name or weight.base}_gbq_slice")
            graph.insert_before(node, new)
            _replace(graph, node, cut)
        return f"GatherBlockQuantized {weight.bits}-bit on the same bytes" + (
            f" (rows padded to whole blocks of {weight.block}, sliced to {weight.k})" if padded else "")

    def _dequantized_table(self, graph: ir.Graph, weight: _NBitsWeight, first: ir.Node) -> ir.Value:
        """The (V, D) float table ``(u − z) · s`` computed from MatMulNBits' operands by standard
        operators; every input is constant, so ONNX Runtime folds it into one table at session start."""
        i64 = lambda *values: np.array(values, dtype=np.int64)  # noqa: E731
        u8 = lambda *values: np.array(values, dtype=np.uint8)  # noqa: E731
        g = _GraphBuilder(f"{weight.base}_table")
        n, bits, block = weight.n, weight.bits, weight.block
        n_blocks = -(-weight.k // block)

        def unpack(packed: ir.Value, count: int) -> ir.Value:  # [n, bytes] uint8 → [n, bytes·8/bits]
            if bits == 8:
                return packed
            mask = g.const(u8((1 << bits) - 1))
            shifted = [g.op("BitShift", packed, g.const(u8(j * bits)), direction="RIGHT") for j in range(8 // bits)]
            parts = [g.op("Unsqueeze", g.op("BitwiseAnd", s, mask), g.const(i64(-1))) for s in shifted]
            return g.op("Reshape", g.op("Concat", *parts, axis=-1), g.const(i64(n, count)))

        rows = n_blocks * block * bits // 8
        codes = unpack(g.op("Reshape", weight.b, g.const(i64(n, rows))), n_blocks * block)
        codes = g.op("Reshape", g.op("Cast", codes, to=ir.DataType.INT32), g.const(i64(n, n_blocks, block)))
        if weight.zero_points is None:
            zero = g.const(np.array(1 << (bits - 1), dtype=np.int32))
        else:
            zp_row = -(-n_blocks * bits // 8)
            zero = unpack(g.op("Reshape", weight.zero_points, g.const(i64(n, zp_row))), zp_row * 8 // bits)
            zero = g.op("Slice", zero, g.const(i64(0)), g.const(i64(n_blocks)), g.const(i64(1)))
            zero = g.op("Unsqueeze", g.op("Cast", zero, to=ir.DataType.INT32), g.const(i64(-1)))
        scales = g.op("Reshape", weight.scales, g.const(i64(n, n_blocks, 1)))
        table = g.op("Mul", g.op("CastLike", g.op("Sub", codes, zero), scales), scales)
        table = g.op("Reshape", table, g.const(i64(n, n_blocks * block)))
        if n_blocks * block != weight.k:
            table = g.op("Slice", table, g.const(i64(0)), g.const(i64(weight.k)), g.const(i64(1)))
        graph.insert_before(first, g.nodes)
        return table

    def _to_gather_block_quantized(self, model, dq, uses, q, scale, zp, bits, block) -> bool:
        if bits not in (4, 8) or block < 16 or block & (block - 1):
            self._count(f"kept Q/DQ: {bits}-bit embedding (GatherBlockQuantized runs 4 and 8 bits)")
            return False
        width = q.const_value.shape[1]
        if width % block and targets.get(self.config.target).embedding_whole_blocks:
            # ORT 1.31's CUDA kernel indexes blocks over the flattened table: wrong unless every
            # row is a whole number of blocks (measured: 0.475 relative error at width 576, block 128).
            self._count(f"kept Q/DQ: embedding width {width} is not a multiple of the block {block} "
                        f"({self.config.target}'s GatherBlockQuantized needs whole blocks per row)")
            return False
        graph = self._main or dq.graph  # the main graph, which every subgraph reads from
        base = q.name.removesuffix("_q")
        codes = q.const_value.numpy()
        symmetric = q.dtype in _SIGNED
        if bits == 4:
            data = q  # int4/uint4 tables are read as they are
            inputs_zp = zp
        else:
            unsigned = packing.to_unsigned(codes, 8, symmetric)
            data = _initializer(graph, f"{base}_gbq_data", unsigned)
            if symmetric:
                inputs_zp = _initializer(
                    graph, f"{base}_gbq_zp", np.full(scale.const_value.shape, 128, dtype=np.uint8)
                )
            else:
                inputs_zp = zp
        for use in uses:
            node = use.node
            inputs = [data, node.inputs[1], scale] + ([inputs_zp] if inputs_zp is not None else [])
            attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block}
            if bits == 8:
                attrs["bits"] = 8
            new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=f"{node.name or base}_gbq")
            _replace(node.graph, node, new)
        self._count(f"GatherBlockQuantized {bits}-bit")
        return True


@dataclasses.dataclass(frozen=True)
class _NBitsWeight:
    """MatMulNBits' operands of one weight (``b``: ``[N, k_blocks, blob]``, or the output of its
    3-bit unpack graph)."""

    base: str
    b: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    n: int
    k: int
    bits: int
    block: int
    plan_bits: int
    three_bit: bool
    plan: meta.QuantPlan | None

    def summary(self) -> str:
        if self.three_bit:
            return f"MatMulNBits {self.bits}-bit (3-bit codes stored at 3 bits)"
        codes = f" ({self.plan_bits}-bit codes)" if self.plan_bits != self.bits else ""
        return f"MatMulNBits {self.bits}-bit{codes}"


@dataclasses.dataclass(frozen=True)
class _TieUses:
    """The readers of a tied table's ``DequantizeLinear``: lookups and heads (``Gemm(x, ·,
    transB=1)``, or the ``MatMul`` nodes behind a ``Transpose``)."""

    lookups: list[ir.Node]
    heads: list[ir.Node]
    nodes: list[ir.Node]  # every direct reader (transposes included)


def _tie_uses(uses, graph: ir.Graph) -> _TieUses | None:
    """The uses of a DQ output as a tied table's, or None unless every use is a lookup or a head
    of ``graph`` and some head reads through a ``Transpose`` or beside a lookup."""
    lookups, heads, nodes, transposed = [], [], [], False
    for use in uses:
        node = use.node
        if node.graph is not graph:
            return None
        nodes.append(node)
        if node.op_type == "Gather" and use.idx == 0 and node.attributes.get_int("axis", 0) == 0:
            lookups.append(node)
        elif node.op_type == "Gemm" and use.idx == 1 and _Rewriter._plain_gemm(node):
            heads.append(node)
        elif node.op_type == "Transpose" and use.idx == 0 and tuple(node.attributes.get_ints("perm", [1, 0])) == (1, 0):
            out = node.outputs[0]
            readers = list(out.uses())
            if out.is_graph_output() or not readers or any(
                    u.node.op_type != "MatMul" or u.idx != 1 or u.node.graph is not graph for u in readers):
                return None
            heads.extend(u.node for u in readers)
            transposed = True
        else:
            return None
    if not heads or not (lookups or transposed):
        return None
    return _TieUses(lookups, list(dict.fromkeys(heads)), nodes)


def _check_packed(name, codes, scales, zps, packed_b, packed_zp, bits, block, symmetric, split=None) -> None:
    """Asserts that the packed MatMulNBits weight dequantizes to the portable form's weight.

    Checked layer by layer, in numpy: an end-to-end comparison cannot tell a layout error from
    the arithmetic noise a badly conditioned (e.g. 2-bit) model amplifies. For 3-bit codes stored
    at 3 bits (``split``: lows and highs), the weight checked is the one they rebuild
    (:func:`packing.nibbles_from_three_bit`, the numpy twin of :func:`unpack_three_bit_graph`).
    """
    n_out, k = codes.shape
    if split is not None:
        packed_b = packing.nibbles_from_three_bit(*split, packed_zp, k, block, symmetric)
    k_blocks = packed_b.shape[1]
    rows_b = packed_b.reshape(n_out, -1)
    if packed_zp is None:
        zero = np.full((n_out, k_blocks), 1 << (bits - 1), dtype=np.int32)
        reference_zero = np.zeros((n_out, k_blocks), dtype=np.int32) if symmetric else zero
    else:
        zero = packing.unpack_rows(packed_zp.reshape(n_out, -1), bits, k_blocks).astype(np.int32)
        reference_zero = zps.astype(np.int32)
    expand = np.repeat(np.arange(k_blocks), block)[:k]
    step = max(1, CHECK_CHUNK // max(1, k))  # a block of rows at a time: the temporaries stay small
    for i in range(0, n_out, step):
        rows = slice(i, i + step)
        unpacked = packing.unpack_rows(rows_b[rows], bits, k_blocks * block)[:, :k].astype(np.int32)
        lowered = (unpacked - zero[rows][:, expand]) * scales[rows][:, expand]
        portable = (codes[rows].astype(np.int32) - reference_zero[rows][:, expand]) * scales[rows][:, expand]
        if not np.array_equal(lowered, portable):
            raise VerificationError(f"{name}: the packed MatMulNBits weight differs from the portable form (a hessc bug)")


CHECK_CHUNK = 1 << 22
"""Elements of a packed weight checked at a time."""


class _GraphBuilder:
    """Collects single-output nodes with unique names ``{prefix}_{i}``; small constants are
    ``Constant`` nodes (attributes of the graph, like MatMulNBits' ``K`` and ``N``), not
    initializers."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        name = f"{self.prefix}_{len(self.nodes)}"
        node = ir.node(op_type, list(inputs), attributes=attributes, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        return self.op("Constant", value=ir.tensor(np.require(array, requirements="C")))


def unpack_three_bit_graph(
    lows: ir.Value,
    highs: ir.Value,
    packed_zp: ir.Value | None,
    table: ir.Value,
    n_out: int,
    k: int,
    block: int,
    symmetric: bool,
    name: str,
) -> tuple[list[ir.Node], ir.Value]:
    """Nodes that rebuild MatMulNBits' 4-bit ``B`` ``[N, k_blocks, block/2]`` from 3-bit codes.

    In each group of 8 codes (4 bytes of ``B``), ``(lows >> [0, 2]) & 0x33`` puts the low two
    bits of every code in its nibble, and ``table[highs]`` the high bit (and, for symmetric codes,
    the ``+4`` that makes ``u = v + 4``); the two have no bit in common, so ``|`` assembles the bytes
    (:mod:`hessc.runtime.packing` gives the layout). The groups are first extended to whole blocks
    with :func:`packing.matmul_nbits_weights`' padding code (8, or the row's last zero point).
    ORT keeps each folded intermediate until its folding pass ends, so every node of size
    ``B`` counts: there are six (``BitShift``, ``BitwiseAnd``, ``Cast`` to int32 of ``highs``,
    ``Gather``, ``BitwiseOr``, ``Reshape``).

    Args:
        lows: uint8 ``[N, G, 2, 1]`` initializer (:func:`packing.three_bit_weights`).
        highs: uint8 ``[N, G]`` initializer.
        packed_zp: MatMulNBits' packed 4-bit zero points ``[N·⌈k_blocks/2⌉]`` (None when symmetric).
        table: uint8 ``[256, 2, 2]`` (:func:`packing.high_bits_table` for ``symmetric``).
        n_out, k, block: MatMulNBits' ``N``, ``K`` and ``block_size``.
        symmetric: codes are ``q + 8`` with the implicit zero point.
        name: the name of the output value (``B``).

    Returns:
        The nodes, in order, and the value holding ``B``.
    """
    u8 = lambda *values: np.array(values, dtype=np.uint8)  # noqa: E731
    i64 = lambda *values: np.array(values, dtype=np.int64)  # noqa: E731
    g = _GraphBuilder(f"{name}_unpack")
    groups = -(-k // packing.THREE_BIT_GROUP)
    k_blocks = -(-k // block)
    pad = k_blocks * block // packing.THREE_BIT_GROUP - groups  # whole groups up to whole blocks
    if pad:
        if symmetric:  # the padding code u = 8 is v = 4: low bits 0, high bit 1
            low_fill, high_fill = g.const(u8(0).reshape(1, 1, 1, 1)), g.const(u8(0xFF).reshape(1, 1))
        else:
            if packed_zp is None:
                raise ValueError("unsigned 3-bit codes need their zero points")
            zp_row = -(-k_blocks // 2)
            last = g.op(
                "Slice", g.op("Reshape", packed_zp, g.const(i64(n_out, zp_row))),
                g.const(i64(zp_row - 1)), g.const(i64(zp_row)), g.const(i64(1)),
            )  # [N, 1]: the byte holding the last block's zero point z
            if k_blocks % 2:
                zero = g.op("BitwiseAnd", last, g.const(u8(0x0F)))
            else:
                zero = g.op("BitShift", last, g.const(u8(4)), direction="RIGHT")
            low_fill = g.op(  # z & 3 in all four 2-bit fields
                "Reshape", g.op("Mul", g.op("BitwiseAnd", zero, g.const(u8(3))), g.const(u8(0x55))),
                g.const(i64(n_out, 1, 1, 1)),
            )
            high_fill = g.op("Mul", g.op("BitShift", zero, g.const(u8(2)), direction="RIGHT"), g.const(u8(0xFF)))
        lows = g.op("Concat", lows, g.op("Expand", low_fill, g.const(i64(n_out, pad, 2, 1))), axis=1)
        highs = g.op("Concat", highs, g.op("Expand", high_fill, g.const(i64(n_out, pad))), axis=1)
    low_bits = g.op("BitwiseAnd", g.op("BitShift", lows, g.const(u8(0, 2)), direction="RIGHT"), g.const(u8(0x33)))
    high_bits = g.op("Gather", table, g.op("Cast", highs, to=ir.DataType.INT32), axis=0)
    out = g.op("Reshape", g.op("BitwiseOr", low_bits, high_bits), g.const(i64(n_out, k_blocks, block // 2)))
    out.name = name
    out.shape = ir.Shape([n_out, k_blocks, block // 2])
    out.type = ir.TensorType(ir.DataType.UINT8)
    return g.nodes, out


def _holder(graph: ir.Graph, node: ir.Node) -> ir.Node:
    """The node of ``graph`` that is ``node`` or holds it in one of its subgraphs."""
    if node.graph is graph:
        return node
    for candidate in graph:
        for attr in candidate.attributes.values():
            inner = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            if any(n is node for g in inner for n in ir.traversal.RecursiveGraphIterator(g)):
                return candidate
    raise ValueError(f"{node.name or node.op_type} is not inside graph {graph.name!r}")


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    graph.insert_before(old, new)
    for out_old, out_new in zip(old.outputs, new.outputs):
        name = out_old.name
        out_new.shape, out_new.type = out_old.shape, out_old.type
        ir.convenience.replace_all_uses_with(out_old, out_new, replace_graph_outputs=True)
        out_old.name = None
        out_new.name = name
    graph.remove(old, safe=True)


def _recurrent_weight(value: ir.Value | None) -> tuple[str, np.ndarray, np.ndarray] | None:
    """The name, (directions, gates · hidden, in) int8 codes and per-row scales of a recurrent weight
    read through its ``DequantizeLinear`` (and the ``Reshape`` of a two-direction weight's 2-D
    view), or None where it is not 8-bit symmetric with one scale per row."""
    if value is None:
        return None
    producer = value.producer()
    shape = None
    if producer is not None and producer.op_type == "Reshape" and producer.inputs[1] is not None \
            and producer.inputs[1].const_value is not None:
        shape = tuple(int(d) for d in producer.inputs[1].const_value.numpy())
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.attributes.get_int("block_size", 0):
        return None
    parts = _dq_parts(producer)
    if parts is None or parts[0].dtype != ir.DataType.INT8:
        return None
    q, scale, zp = parts
    if zp is not None and np.any(zp.const_value.numpy()):
        return None
    codes = q.const_value.numpy()
    axis = producer.attributes.get_int("axis", 1)
    if (codes.ndim, axis) == (2, 0) and shape is not None and len(shape) == 3:
        codes = codes.reshape(shape)
    elif (codes.ndim, axis) != (3, 1) or codes.shape[0] != 1 or shape is not None:
        return None
    return q.name.removesuffix("_q"), codes, scale.const_value.numpy().astype(np.float32)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return frontend.new_initializer(graph, name, np.require(array, requirements="C"))


def lower(model: ir.Model, config: LowerConfig) -> tuple[ir.Model, dict[str, int]]:
    """Lowers the model for ``config.target`` in place; returns it and what was rewritten, by kind."""
    LowerWeightsPass(config)(model)
    return model, model.meta[LOWERING_KEY]


def _const_scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _single_use_producer(value: ir.Value, op_type: str) -> ir.Node | None:
    node = value.producer()
    if node is None or node.op_type != op_type or len(list(value.uses())) != 1 or value.is_graph_output():
        return None
    return node


def fuse_rms_norms(model: ir.Model) -> int:
    """Rewrites decomposed RMSNorms into ONNX Runtime's ``SimplifiedLayerNormalization``.

    ``γ · x · 1/sqrt(mean(x², axis=-1) + ε)`` — ``Pow → ReduceMean → Add → Sqrt → Reciprocal →
    Mul(x, ·) → Mul(γ, ·)`` as exported — is exactly ``SimplifiedLayerNormalization(x, γ; ε)``,
    whose kernels accumulate the statistics in fp32 even for fp16 inputs. In fp16 the decomposed
    form overflows once ``|x| > 256`` (``mean(x²) = inf``, so the normalized output is 0).

    Returns:
        How many norms were fused.
    """
    fused = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Mul" or node.graph is None:
            continue
        gamma_index = next((i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None), None)
        if gamma_index is None:
            continue
        gamma, y = node.inputs[gamma_index], node.inputs[1 - gamma_index]
        if len(gamma.const_value.shape) != 1:
            continue
        mul = _single_use_producer(y, "Mul")
        if mul is None:
            continue
        for r_index in (0, 1):
            recip = _single_use_producer(mul.inputs[r_index], "Reciprocal")
            if recip is not None:
                x = mul.inputs[1 - r_index]
                break
        else:
            continue
        sqrt = _single_use_producer(recip.inputs[0], "Sqrt")
        add = sqrt and _single_use_producer(sqrt.inputs[0], "Add")
        if add is None:
            continue
        eps_index = next((i for i, v in enumerate(add.inputs) if _const_scalar(v) is not None), None)
        if eps_index is None:
            continue
        mean = _single_use_producer(add.inputs[1 - eps_index], "ReduceMean")
        if mean is None or not mean.attributes.get_int("keepdims", 1):
            continue
        axes = mean.inputs[1].const_value.numpy().tolist() if len(mean.inputs) > 1 and mean.inputs[1] is not None \
            else mean.attributes.get_ints("axes", [])
        rank = len(x.shape) if x.shape is not None else None
        if list(axes) not in ([-1], [rank - 1] if rank else [-1]):
            continue
        power = _single_use_producer(mean.inputs[0], "Pow")
        if power is None or power.inputs[0] is not x or _const_scalar(power.inputs[1]) != 2.0:
            continue
        new = ir.node(
            "SimplifiedLayerNormalization", [x, gamma],
            attributes={"axis": -1, "epsilon": _const_scalar(add.inputs[eps_index]), "stash_type": 1},
            name=f"{node.name}_fused" if node.name else f"rms_{fused}_fused",  # ORT registers it in the default domain
        )
        _replace(graph, node, new)
        for dead in (mul, recip, sqrt, add, mean, power):
            graph.remove(dead, safe=True)
        fused += 1
    return fused


def to_fp16(model: ir.Model) -> ir.Model:
    """Float tensors to fp16, keeping the graph's input and output types (for the CUDA provider),
    except a decoder's KV cache, which becomes fp16 like the attention that reads it (no cast of
    the whole cache at every step; onnxruntime-genai allocates the cache in the model's types).

    Decomposed RMSNorms are fused first (:func:`fuse_rms_norms`), so their statistics are
    accumulated in fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from hessc.runtime import decoder

    cache = decoder.find(model)
    cached = {name for pair in cache.pairs for name in pair} if cache is not None else set()
    keep = [v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.name not in cached]
    metadata = dict(model.metadata_props)
    fused = fuse_rms_norms(model)
    logger.info("fused %d RMSNorms before fp16 conversion", fused)
    ir.external_data.load_to_model(model)  # the converter reads tensors inline
    proto = convert_float_to_float16(
        ir.to_proto(model), keep_io_types=keep, disable_shape_infer=True, op_block_list=["RandomNormalLike"]
    )
    converted = ir.from_proto(proto)
    converted.metadata_props.update(metadata)
    return converted


def _stored_sources(value: ir.Value | None) -> list[ir.Value]:
    """The initializers a value is computed from: itself when it is one, otherwise those read by
    the nodes producing it (a 3-bit ``B``'s unpack graph reads its lows, highs and zero points).
    ``Constant`` nodes (shifts, masks, shapes, and the 1 KiB high-bit table that all 3-bit weights
    share) are part of the graph's code, like MatMulNBits' ``K`` and ``N``, and are not counted."""
    if value is None:
        return []
    found: list[ir.Value] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is None:
            if v.const_value is not None:
                found.append(v)
        elif producer.op_type != "Constant":
            stack.extend(i for i in producer.inputs if i is not None)
    return found


def quantized_storage(model: ir.Model) -> tuple[int, int]:
    """Bytes stored for quantized weights (codes, scales, zero points) and their element count.

    Reads ``MatMulNBits``, ``GatherBlockQuantized`` and weight ``DequantizeLinear`` nodes, whoever
    wrote them, so every method is counted the same way. Each stored tensor counts once, by
    identity (a tied table's lookup and head read the same initializers, through ``Reshape`` or
    not), and each weight's elements once: operators whose codes come from the same initializers
    are one weight.
    """
    counted: set[int] = set()
    exact: dict[frozenset[int], int] = {}  # elements by code sources: MatMulNBits' K·N, a DQ's codes
    looked_up: dict[frozenset[int], int] = {}  # a lookup's rows (padded to whole blocks when tied)

    def add(values) -> int:
        total = 0
        for v in (s for value in values for s in _stored_sources(value)):
            if id(v) not in counted:
                counted.add(id(v))
                total += int(v.const_value.nbytes)
        return total

    total_bytes = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ins = list(node.inputs) + [None] * 4
        if node.op_type == "MatMulNBits":
            codes, params = ins[1], (ins[2], ins[3])
            exact[frozenset(map(id, _stored_sources(codes)))] = node.attributes.get_int("K") * node.attributes.get_int("N")
        elif node.op_type == "GatherBlockQuantized":
            codes, params = ins[0], (ins[2], ins[3])
            shape = codes.const_value.shape if codes.const_value is not None else codes.shape
            count = int(np.prod(shape)) if shape is not None and all(isinstance(d, int) for d in shape) else 0
            if codes.dtype == ir.DataType.UINT8:
                count *= 8 // node.attributes.get_int("bits", 4)  # codes packed per byte
            looked_up[frozenset(map(id, _stored_sources(codes)))] = count
        elif node.op_type == "DynamicQuantizeLSTM":  # two weights: W and R, each with scale and zero point
            ins += [None] * 8
            for codes, params in ((ins[1], (ins[8], ins[9])), (ins[2], (ins[10], ins[11]))):
                exact[frozenset([id(codes)])] = int(np.prod(codes.const_value.shape))
                total_bytes += add([codes, *params])
            continue
        elif node.op_type == "DequantizeLinear" and ins[0] is not None and ins[0].const_value is not None:
            codes, params = ins[0], (ins[1], ins[2])
            exact[frozenset([id(codes)])] = int(np.prod(codes.const_value.shape))
        else:
            continue
        total_bytes += add([codes, *params])
    numel = sum(exact.values()) + sum(n for key, n in looked_up.items() if key not in exact)
    return total_bytes, numel
