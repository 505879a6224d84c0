"""Tiny ONNX graphs shared by the tests, and helpers to run them in ONNX Runtime.

Graphs are written with ``onnx.helper`` (an I/O edge) and turned into ``onnx_ir`` models through
the front door (:func:`hessc.ir.frontend.load`), so every test sees the normalised IR the passes
see. Weights are seeded standard normals; the activation input ``x`` has a symbolic batch ``B``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from hessc.ir import frontend

FLOAT = TensorProto.FLOAT
OPSET = 20
"""Default opset of the builders (what torch.onnx.export(dynamo=True) writes)."""


def weight(shape: Sequence[int], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(tuple(shape)) * scale).astype(np.float32)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = OPSET,
) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(a, name) for name, a in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def x_input(k: int, name: str = "x", batch: str | int = "B") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, [batch, k])


def y_output(n: int | None = None, name: str = "y") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, None if n is None else ["B", n])


def matmul_model(k: int = 64, n: int = 32, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """``y = x @ W`` with ``W`` (k, n) named ``W``."""
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return make_model([node], [x_input(k)], [y_output(n)], {"W": weight((k, n), seed)}, opset)


def gemm_model(
    k: int = 64, n: int = 32, trans_b: int = 1, bias: bool = True, seed: int = 0, trans_a: int = 0,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """``y = Gemm(x, W, b)``; ``W`` is (n, k) when ``trans_b`` else (k, n)."""
    shape = (n, k) if trans_b else (k, n)
    inits = {"W": weight(shape, seed)}
    inputs = ["x", "W"]
    if bias:
        inits["b"] = weight((n,), seed + 1)
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, transA=trans_a)
    x = helper.make_tensor_value_info("x", FLOAT, [k, "B"] if trans_a else ["B", k])
    return make_model([node], [x], [helper.make_tensor_value_info("y", FLOAT, ["B" if not trans_a else k, n])], inits, opset)


def gather_model(vocab: int = 100, dim: int = 64, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """``y = E[ids]`` with the embedding table ``E`` (vocab, dim)."""
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="embed", axis=0)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 5])
    out = helper.make_tensor_value_info("y", FLOAT, ["B", 5, dim])
    return make_model([node], [ids], [out], {"E": weight((vocab, dim), seed)}, opset)


def conv_model(
    c_in: int = 8, c_out: int = 16, kernel: int = 3, seed: int = 0, group: int = 1, size: int = 6
) -> onnx.ModelProto:
    """``y = Conv(x, W)`` on ``x`` [B, c_in, size, size], "same" padding; ``W`` is
    (c_out, c_in / group, kernel, kernel) (``group = c_in = c_out``: depthwise)."""
    p = kernel // 2
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[p, p, p, p], group=group)
    x = helper.make_tensor_value_info("x", FLOAT, ["B", c_in, size, size])
    return make_model(
        [node], [x], [helper.make_tensor_value_info("y", FLOAT, ["B", c_out, size, size])],
        {"W": weight((c_out, c_in // group, kernel, kernel), seed)},
    )


def mlp_model(k: int = 64, hidden: int = 64, n: int = 32, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """``y = relu(x @ W1) @ W2``: two MatMul weights and a non-weight node between them."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    inits = {"W1": weight((k, hidden), seed), "W2": weight((hidden, n), seed + 1)}
    return make_model(nodes, [x_input(k)], [y_output(n)], inits, opset)


def images(batch: int, channels: int, size: int, seed: int, latent: int = 3) -> np.ndarray:
    """Image-like conv inputs [batch, channels, size, size]: every channel mixes the same few
    spatially smooth latent maps (3×3 box-filtered noise) with fixed weights, plus a little noise,
    so input channels and neighbouring pixels are strongly correlated, as in a CNN. The mixing
    weights are the same for every seed: different seeds are samples of one distribution."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, latent, size + 2, size + 2))
    smooth = sum(noise[:, :, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 3
    mix = np.random.default_rng(1234).standard_normal((channels, latent))
    x = np.einsum("cl,blhw->bchw", mix, smooth) + 0.1 * rng.standard_normal((batch, channels, size, size))
    return x.astype(np.float32)


def load(proto: onnx.ModelProto) -> ir.Model:
    """The proto through hessc's front door (a fresh, normalised ``onnx_ir.Model``)."""
    return frontend.load(proto)


def load_upgraded(proto: onnx.ModelProto, opset: int = 21) -> ir.Model:
    """The proto through the front door with its opset raised to ``opset`` (the pipeline's
    ``upgrade-opset`` step, which plan-quantization and insert-qdq require first); an opset
    already at or above it is kept."""
    from hessc.passes.opset import UpgradeOpsetPass

    model = load(proto)
    UpgradeOpsetPass(opset)(model)
    return model


def to_bytes(model: ir.Model | onnx.ModelProto) -> bytes:
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    return model.SerializeToString()


def copy(model: ir.Model) -> ir.Model:
    """A deep copy through the protobuf form (``meta`` annotations are not copied)."""
    return ir.from_proto(ir.to_proto(model))


def run_ort(model, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Runs a model (``onnx_ir.Model``, ``ModelProto``, bytes or path) on ORT's CPU provider.

    ORT's graph optimizations are off by default, so the graph runs as written.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    source = model if isinstance(model, (bytes, str)) else to_bytes(model)
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def x_feed(k: int, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)}


def dq_operands(node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, scales and zero points of a blocked ``DequantizeLinear`` (initializer inputs), with
    scales and zero points broadcast to the codes' shape, all as float64."""
    q = node.inputs[0].const_value.numpy().astype(np.float64)
    s = node.inputs[1].const_value.numpy().astype(np.float64)
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    z = np.zeros_like(s) if zp_value is None else zp_value.const_value.numpy().astype(np.float64)
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    if block:
        s = np.repeat(s, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        z = np.repeat(z, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    else:
        shape = [1] * q.ndim
        shape[axis] = -1
        s = np.broadcast_to(s.reshape(shape), q.shape)
        z = np.broadcast_to(z.reshape(shape), q.shape)
    return q, s, z


def dequantize_linear(node: ir.Node) -> np.ndarray:
    """Numpy reference of a blocked ``DequantizeLinear`` whose inputs are initializers.

    ``y[i] = (q[i] − z[j]) · s[j]`` with ``j`` equal to ``i`` except ``j[axis] = i[axis] // block``.
    """
    q, s, z = dq_operands(node)
    return (q - z) * s


def if_model() -> onnx.ModelProto:
    """``y = cond ? x @ W_then : x @ W_else``; ``W_then`` (seed 0) is a Constant inside the
    then-branch, ``W_else`` (seed 1) an outer-scope initializer read inside the else-branch."""
    out = lambda name: helper.make_tensor_value_info(name, FLOAT, ["B", 32])  # noqa: E731
    then_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W_then"], value=numpy_helper.from_array(weight((64, 32), 0), "W_then")),
            helper.make_node("MatMul", ["x", "W_then"], ["t"]),
        ],
        "then", [], [out("t")],
    )
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W_else"], ["e"])], "else", [], [out("e")])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    return make_model([node], [x_input(64), cond], [y_output(32)], {"W_else": weight((64, 32), 1)})


def nodes_of(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == op_type]


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


# --------------------------------------------------------------------------------------------------
# A tiny pre-norm decoder (fold-rotation)

DECODER_NORMS = ("pow-reciprocal", "mul-div", "div", "simplified", "rms23", "layernorm", "none")
"""Norm forms of :func:`decoder_model`: the decomposed RMSNorm as ``Pow(x, 2)`` … ``Reciprocal`` →
``Mul(x, ·)``, as ``Mul(x, x)`` … ``Div(1, ·)`` → ``Mul``, as ``Sqrt`` → ``Div(x, ·)``; ORT's
``SimplifiedLayerNormalization``; ONNX ``RMSNormalization`` (opset 23); ``LayerNormalization``."""


def norm_nodes(kind: str, x: str, out: str, tag: str, width: int, inits: dict, gamma: np.ndarray | None) -> list:
    """Nodes computing ``out = norm(x)`` (scale ``gamma``; None: no scale node, decomposed only)."""
    g = f"{tag}.weight"
    if gamma is not None:
        inits[g] = gamma.astype(np.float32)
    if kind == "simplified":
        return [helper.make_node("SimplifiedLayerNormalization", [x, g], [out], name=tag, axis=-1, epsilon=1e-6)]
    if kind == "rms23":
        return [helper.make_node("RMSNormalization", [x, g], [out], name=tag, axis=-1, epsilon=1e-6)]
    if kind == "layernorm":
        inits[f"{tag}.bias"] = weight((width,), 99, 0.1)
        return [helper.make_node("LayerNormalization", [x, g, f"{tag}.bias"], [out], name=tag, axis=-1, epsilon=1e-6)]
    inits.setdefault("two", np.array(2.0, np.float32))
    inits.setdefault("one", np.array(1.0, np.float32))
    inits.setdefault("eps", np.array(1e-6, np.float32))
    inits.setdefault("last_axis", np.array([-1], np.int64))
    p = f"{tag}/"
    sq = (helper.make_node("Pow", [x, "two"], [p + "sq"]) if kind != "mul-div"
          else helper.make_node("Mul", [x, x], [p + "sq"]))
    nodes = [
        sq,
        helper.make_node("ReduceMean", [p + "sq", "last_axis"], [p + "ms"], keepdims=1),
        helper.make_node("Add", [p + "ms", "eps"], [p + "ve"]),
        helper.make_node("Sqrt", [p + "ve"], [p + "std"]),
    ]
    normed = p + "n" if gamma is not None else out
    if kind == "pow-reciprocal":
        nodes += [helper.make_node("Reciprocal", [p + "std"], [p + "inv"]),
                  helper.make_node("Mul", [x, p + "inv"], [normed])]
    elif kind == "mul-div":
        nodes += [helper.make_node("Div", ["one", p + "std"], [p + "inv"]),
                  helper.make_node("Mul", [p + "inv", x], [normed])]
    else:
        nodes += [helper.make_node("Div", [x, p + "std"], [normed])]
    if gamma is not None:
        nodes.append(helper.make_node("Mul", [g, normed], [out]))
    return nodes


def decoder_model(
    width: int = 32, vocab: int = 40, hidden: int = 48, blocks: int = 2, norm: str = "pow-reciprocal",
    *, tied: str = "", sandwich: bool = False, bias: bool = False, gemm: bool = False,
    residual_scale: np.ndarray | float | None = None, unit_gamma: Sequence[int] = (), inner_norm: bool = False,
    writer_op: str = "", seed: int = 0,
) -> onnx.ModelProto:
    """A pre-norm decoder: ``Gather(E, ids)`` → ``blocks`` × [norm → ``x W_gate``, ``x W_up`` →
    ``silu(g) ⊙ u`` → ``W_down`` (+ bias) → residual ``Add``] → final norm → head → ``logits``.

    Args:
        width: the residual-stream width ``d``.
        norm: one of :data:`DECODER_NORMS`.
        tied: ``""`` (a separate head ``W_head`` (d, vocab)), ``transpose`` (``MatMul(h,
            Transpose(E))``, which the front door folds into a tied copy) or ``gemm`` (``Gemm(h, E,
            transB=1)``, the table itself; implies ``gemm``).
        sandwich: a norm on each down projection's output before the residual add.
        bias: the down projections get a bias ``Add``.
        gemm: 1-D ``ids`` [T] and a 2-D stream, with every projection a ``Gemm`` (down: ``transB=1``
            and a bias ``C``).
        residual_scale: a constant multiplying the stream after each block (a scalar or a vector).
        unit_gamma: norm indices (the final norm is ``blocks``) without a scale node (decomposed) or
            with a scale of ones (fused).
        inner_norm: a norm on each gate projection's output, inside the sublayer (as a QK-norm
            sits inside attention).
        writer_op: a unary op (``Relu``, ``Tanh``) between each down projection and its residual add.
    """
    gemm = gemm or tied == "gemm"
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {"E": (0.5 * rng.standard_normal((vocab, width))).astype(np.float32)}
    opset = 23 if norm == "rms23" else OPSET
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed", axis=0)]

    def gamma(i: int) -> np.ndarray | None:
        if i in unit_gamma:
            return None if norm not in ("simplified", "rms23", "layernorm") else np.ones(width, np.float32)
        return 1.0 + 0.3 * rng.standard_normal(width)

    def linear(x: str, w: str, out: str, shape: tuple[int, int], name: str, c: str | None = None) -> onnx.NodeProto:
        inits[w] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        if not gemm:
            return helper.make_node("MatMul", [x, w], [out], name=name)
        if c is not None:  # transB=1: stored (out, in)
            inits[w] = np.ascontiguousarray(inits[w].T)
            return helper.make_node("Gemm", [x, w, c], [out], name=name, transB=1)
        return helper.make_node("Gemm", [x, w], [out], name=name)

    h = "h0"
    for i in range(blocks):
        p = f"layers.{i}."
        nodes += norm_nodes(norm, h, p + "normed", p + "norm", width, inits, gamma(i))
        nodes += [
            linear(p + "normed", p + "gate", p + "g", (width, hidden), p + "gate_proj"),
            linear(p + "normed", p + "up", p + "u", (width, hidden), p + "up_proj"),
        ]
        g = p + "g"
        if inner_norm:
            nodes += norm_nodes(norm, g, p + "gn", p + "gate_norm", hidden, inits, 1.0 + 0.3 * rng.standard_normal(hidden))
            g = p + "gn"
        nodes += [
            helper.make_node("Sigmoid", [g], [p + "sg"]),
            helper.make_node("Mul", [g, p + "sg"], [p + "silu"]),
            helper.make_node("Mul", [p + "silu", p + "u"], [p + "act"]),
        ]
        c = None
        if gemm:
            c = p + "down.bias"
            inits[c] = weight((width,), 50 + i, 0.1)
        nodes.append(linear(p + "act", p + "down", p + "d", (hidden, width), p + "down_proj", c))
        out = p + "d"
        if bias and not gemm:
            inits[p + "down.bias"] = weight((width,), 50 + i, 0.1)
            nodes.append(helper.make_node("Add", [out, p + "down.bias"], [p + "db"]))
            out = p + "db"
        if writer_op:
            nodes.append(helper.make_node(writer_op, [out], [p + "dw"]))
            out = p + "dw"
        if sandwich:
            nodes += norm_nodes(norm, out, p + "post", p + "post_norm", width, inits, 1.0 + 0.3 * rng.standard_normal(width))
            out = p + "post"
        nodes.append(helper.make_node("Add", [h, out], [p + "res"], name=p + "residual"))
        h = p + "res"
        if residual_scale is not None:
            inits[p + "scale"] = np.asarray(residual_scale, np.float32)
            nodes.append(helper.make_node("Mul", [h, p + "scale"], [p + "scaled"]))
            h = p + "scaled"
    nodes += norm_nodes(norm, h, "final", "norm", width, inits, gamma(blocks))
    if tied == "transpose":
        nodes += [helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["final", "E_t"], ["logits"], name="lm_head")]
    elif tied == "gemm":
        nodes.append(helper.make_node("Gemm", ["final", "E"], ["logits"], name="lm_head", transB=1))
    else:
        nodes.append(linear("final", "lm_head.weight", "logits", (width, vocab), "lm_head"))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"] if gemm else ["B", "T"])
    logits = helper.make_tensor_value_info("logits", FLOAT, ["T", vocab] if gemm else ["B", "T", vocab])
    return make_model(nodes, [ids], [logits], inits, opset)


def ids_feed(vocab: int = 40, shape: Sequence[int] = (2, 7), seed: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, vocab, size=tuple(shape)).astype(np.int64)}


def tiny_llama(folder, layers: int = 2, tie: bool = True, seed: int = 0):
    """A tiny Llama (hidden 64, 4 heads over 2 KV heads of 16, vocabulary 259 of a byte-level BPE
    tokenizer trained on one sentence) with random weights, saved with its tokenizer in
    ``folder/hf``; returns that folder."""
    from pathlib import Path

    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(fast), max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    lm = transformers.LlamaForCausalLM(config).eval()
    lm.save_pretrained(folder / "hf")
    fast.save_pretrained(folder / "hf")
    return folder / "hf"


def tiny_genai_decoder(folder, layers: int = 2, tie: bool = True, seed: int = 0):
    """:func:`tiny_llama` through onnxruntime-genai's model builder for the CPU in fp32:
    ``folder/genai/model.onnx`` with ``GroupQueryAttention``, a KV cache and ``genai_config.json``.
    Returns the genai folder."""
    from pathlib import Path

    from hessc.bench import zoo

    hf = tiny_llama(folder, layers, tie, seed)
    return zoo.build_genai(hf, Path(folder) / "genai", "fp32")


def genai_greedy(folder, prompt, new: int) -> list[int]:
    """onnxruntime-genai's greedy continuation (``new`` tokens) of ``prompt`` by the folder's model."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]
