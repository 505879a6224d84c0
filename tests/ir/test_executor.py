"""Tests of hessc.ir.executor: the torch executor against ONNX Runtime, and its gradients."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hessc.errors import InputError, UnsupportedError
from hessc.ir.executor import (
    ExecutionError,
    TorchExecutor,
    coverage_report,
    lookup_op,
    max_deviation_vs_ort,
    register_op,
    supported_ops,
)

FAST = settings(max_examples=12, deadline=None, derandomize=True, database=None)
TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# builders


def _parse(text: str, inits: dict[str, np.ndarray] | None = None) -> ir.Model:
    """A model from ONNX text, with ``inits`` added as initializers before the IR is built."""
    proto = onnx.parser.parse_model(text)
    for name, arr in (inits or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
    return ir.serde.deserialize_model(proto)


def _ort_run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    sess = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(got: torch.Tensor, ref: np.ndarray) -> float:
    g = got.detach().to(torch.float64).numpy()
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape
    if r.size == 0:
        return 0.0
    scale = np.max(np.abs(r))
    diff = np.max(np.abs(g - r))
    return float(diff / scale) if scale > 0 else float(diff)


def _assert_matches_ort(model: ir.Model, feeds: dict[str, np.ndarray], tol: float = TOL) -> None:
    refs = _ort_run(model, feeds)
    got = TorchExecutor(model).run(feeds)
    for name, ref in zip([v.name for v in model.graph.outputs], refs):
        assert got[name].dtype.is_floating_point == np.issubdtype(ref.dtype, np.floating) or (
            ref.dtype == np.bool_ and got[name].dtype == torch.bool
        ), name
        assert _rel(got[name], ref) <= tol, (name, _rel(got[name], ref))


def _single_node(
    op: str,
    inputs: list[tuple[str, int, list]],
    outputs: list[tuple[str, int]],
    attrs: dict | None = None,
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 21,
    domain: str = "",
    node_inputs: list[str] | None = None,
) -> ir.Model:
    """A one-node model; ``inputs`` are (name, TensorProto type, shape) graph inputs.

    The node reads the graph inputs then the initializers, unless ``node_inputs`` orders them.
    """
    nodes = [
        onnx.helper.make_node(
            op,
            node_inputs or [i[0] for i in inputs] + list(inits or {}),
            [o[0] for o in outputs],
            domain=domain,
            **(attrs or {}),
        )
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [onnx.helper.make_tensor_value_info(n, t, None) for n, t in outputs],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    if domain:
        opsets.append(onnx.helper.make_opsetid(domain, 1))
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return ir.serde.deserialize_model(proto)


F32 = onnx.TensorProto.FLOAT


# --------------------------------------------------------------------------------------------------
# exported models


class _LlamaWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _BertWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _SqueezeExcite(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = torch.nn.Conv2d(c, 4, 1)
        self.expand = torch.nn.Conv2d(4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(y))))


class _TinyEfficientNet(torch.nn.Module):
    """Stem conv + BN + ReLU6, depthwise conv + BN + ReLU6, squeeze-excite, 1x1 conv, pool, FC."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.se = _SqueezeExcite(8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.bn1(self.stem(x)))
        x = torch.nn.functional.relu6(self.bn2(self.dw(x)))
        x = self.pw(self.se(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes=None) -> ir.Model:
    program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes)
    return program.model


@pytest.fixture(scope="module")
def llama_model() -> ir.Model:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    module = _LlamaWrapper(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(0, 128, (2, 7))
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    return _export(module, (ids,), dims)


@pytest.fixture(scope="module")
def bert_model() -> ir.Model:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    module = _BertWrapper(transformers.BertModel(cfg))
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 5:] = 0
    return _export(module, (ids, mask))


@pytest.fixture(scope="module")
def cnn_model() -> ir.Model:
    torch.manual_seed(0)
    module = _TinyEfficientNet()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (module.bn1, module.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return _export(module, (torch.randn(2, 3, 16, 16),))


@pytest.mark.torch
def test_llama_matches_ort_dynamic_shapes(llama_model):
    rng = np.random.default_rng(0)
    assert coverage_report(llama_model)["all_supported"]
    for shape in [(2, 7), (1, 11)]:
        feeds = {"input_ids": rng.integers(0, 128, shape)}
        assert max_deviation_vs_ort(llama_model, feeds) <= TOL


@pytest.mark.torch
def test_bert_matches_ort(bert_model):
    rng = np.random.default_rng(1)
    mask = np.ones((2, 7), dtype=np.int64)
    mask[0, 4:] = 0
    feeds = {"input_ids": rng.integers(0, 100, (2, 7)), "attention_mask": mask}
    assert coverage_report(bert_model)["all_supported"]
    assert max_deviation_vs_ort(bert_model, feeds) <= TOL
    assert max_deviation_vs_ort(bert_model, feeds, dtype=torch.float64) <= TOL


@pytest.mark.torch
def test_cnn_matches_ort(cnn_model):
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ops = coverage_report(cnn_model)["ops"]
    assert "ai.onnx::Conv" in ops and "ai.onnx::Gemm" in ops
    assert max_deviation_vs_ort(cnn_model, {"x": x}) <= TOL


def test_cnn_unfolded_ops_match_ort():
    """BatchNormalization, Clip, GlobalAveragePool, Flatten, asymmetric pads, pooling."""
    rng = np.random.default_rng(3)
    inits = {
        "w": rng.standard_normal((4, 1, 3, 3)),
        "s": rng.random(4) + 0.5,
        "bb": rng.standard_normal(4),
        "m": rng.standard_normal(4),
        "v": rng.random(4) + 0.5,
        "lo": np.array(0.0),
        "hi": np.array(6.0),
        "fw": rng.standard_normal((3, 4)),
        "fb": rng.standard_normal(3),
    }
    model = _parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 4, 9, 9] x) => (float[2, 3] y, float[2, 4, 4, 4] p, float[2, 4, 5, 5] q) {
            c = Conv <group = 4, pads = [0, 1, 1, 0], strides = [2, 2]> (x, w)
            b = BatchNormalization <epsilon = 0.001> (c, s, bb, m, v)
            r = Clip (b, lo, hi)
            gap = GlobalAveragePool (r)
            f = Flatten (gap)
            y = Gemm <transB = 1, alpha = 0.5> (f, fw, fb)
            p = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (x)
            q = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
        }
        """,
        {k: v.astype(np.float32) for k, v in inits.items()},
    )
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32) * 3
    _assert_matches_ort(model, {"x": x})


def test_scalar_constants_stay_scalars():
    """A 0-d Constant index gathers a scalar from a shape (an exported LSTM's batch size): an
    Unsqueeze and a Concat with a 1-d constant must see rank 0 and rank 1, as in ORT."""
    model = _parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[20, 1, 64] x) => (int64[2] y, float[1, 20, 64] z) {
            s = Shape (x)
            i = Constant <value = int64 i = {1}> ()
            n = Gather <axis = 0> (s, i)
            a = Constant <value = int64[1] a = {0}> ()
            u = Unsqueeze (n, a)
            h = Constant <value = int64[1] h = {-1}> ()
            y = Concat <axis = 0> (u, h)
            r = Concat <axis = 0> (u, y)
            z = Reshape (x, r)
        }
        """,
        {},
    )
    x = np.random.default_rng(0).standard_normal((20, 1, 64)).astype(np.float32)
    _assert_matches_ort(model, {"x": x})


# --------------------------------------------------------------------------------------------------
# property tests of single ops vs ORT


def _broadcast_pair(draw) -> tuple[list[int], list[int]]:
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    other = [draw(st.sampled_from([d, 1])) for d in shape]
    cut = draw(st.integers(0, len(other) - 1))
    return shape, other[cut:]


@FAST
@given(data=st.data(), op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"]))
def test_binary_broadcast_ops(data, op):
    sa, sb = _broadcast_pair(data.draw)
    if data.draw(st.booleans()):
        sa, sb = sb, sa
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    if op == "Pow":
        a = np.abs(a) + 0.5
    if op == "Div":
        b = np.sign(b) * (np.abs(b) + 0.5)
    model = _single_node(op, [("a", F32, sa), ("b", F32, sb)], [("y", F32)])
    _assert_matches_ort(model, {"a": a, "b": b})


@FAST
@given(data=st.data(), op=st.sampled_from(["Equal", "Less", "Greater", "LessOrEqual", "Where"]))
def test_compare_and_where_broadcast(data, op):
    sa, sb = _broadcast_pair(data.draw)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    a = rng.integers(-2, 3, sa).astype(np.float32)
    b = rng.integers(-2, 3, sb).astype(np.float32)
    if op == "Where":
        c = rng.random(sb) > 0.5
        model = _single_node(
            op,
            [("c", onnx.TensorProto.BOOL, sb), ("a", F32, sa), ("b", F32, sb)],
            [("y", F32)],
        )
        _assert_matches_ort(model, {"c": c, "a": a, "b": b})
    else:
        model = _single_node(op, [("a", F32, sa), ("b", F32, sb)], [("y", onnx.TensorProto.BOOL)])
        _assert_matches_ort(model, {"a": a, "b": b}, tol=0)


UNARY = [
    "Neg", "Exp", "Tanh", "Erf", "Sigmoid", "Relu", "Abs", "Sin", "Cos", "Floor", "Ceil",
    "Softplus", "Gelu", "Sqrt", "Log", "Reciprocal", "HardSwish", "LeakyRelu",
]  # fmt: skip


@FAST
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    op=st.sampled_from(UNARY),
    seed=st.integers(0, 2**16),
)
def test_unary_ops(shape, op, seed):
    x = np.asarray(np.random.default_rng(seed).standard_normal(shape) * 2, dtype=np.float32)
    if op in ("Sqrt", "Log", "Reciprocal"):
        x = np.abs(x) + 0.1
    attrs = {"approximate": "tanh"} if op == "Gelu" and seed % 2 else None
    model = _single_node(op, [("x", F32, shape)], [("y", F32)], attrs=attrs)
    _assert_matches_ort(model, {"x": x})


@FAST
@given(
    m=st.integers(1, 5),
    k=st.integers(1, 5),
    n=st.integers(1, 5),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_matmul_batched(m, k, n, batch, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal([*batch, m, k]).astype(np.float32)
    b = rng.standard_normal([k, n] if seed % 2 else [*batch, k, n]).astype(np.float32)
    model = _single_node("MatMul", [("a", F32, a.shape), ("b", F32, b.shape)], [("y", F32)])
    _assert_matches_ort(model, {"a": a, "b": b})


@FAST
@given(
    m=st.integers(1, 5),
    k=st.integers(1, 5),
    n=st.integers(1, 5),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    with_c=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm(m, k, n, trans_a, trans_b, with_c, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = [("a", F32, a.shape), ("b", F32, b.shape)]
    feeds = {"a": a, "b": b}
    if with_c:
        feeds["c"] = rng.standard_normal((n,)).astype(np.float32)
        inputs.append(("c", F32, [n]))
    attrs = {"transA": int(trans_a), "transB": int(trans_b), "alpha": 0.7, "beta": 1.3}
    _assert_matches_ort(_single_node("Gemm", inputs, [("y", F32)], attrs=attrs), feeds)


@FAST
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    data=st.data(),
    op=st.sampled_from(["Softmax", "LogSoftmax"]),
    opset=st.sampled_from([11, 21]),
)
def test_softmax_axes(shape, data, op, opset):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    model = _single_node(op, [("x", F32, shape)], [("y", F32)], {"axis": axis}, opset=opset)
    _assert_matches_ort(model, {"x": x})


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_reshape_transpose(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    total = math.prod(shape)
    target = [d for d in (2, 3, 5, 7) if total % d == 0][:1] + [-1]
    text = f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[{",".join(map(str, shape))}] x) => (float y, float z) {{
            t = Transpose <perm = [{",".join(map(str, perm))}]> (x)
            y = Reshape (t, s)
            sh = Shape (t)
            z = Reshape (y, sh)
        }}
    """
    model = _parse(text, {"s": np.array(target, dtype=np.int64)})
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _assert_matches_ort(model, {"x": x}, tol=0)


@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), data=st.data())
def test_slice(shape, data):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    starts, ends, steps = [], [], []
    big = 2**63 - 1
    for a in axes:
        step = data.draw(st.sampled_from([1, 2, -1, -2]))
        # the exporter's "to the end" sentinels: INT64_MAX forwards, INT64_MIN backwards
        edge = [-7, -2, -1, 0, 1, 2, 7]
        starts.append(data.draw(st.sampled_from(edge)))
        ends.append(data.draw(st.sampled_from([*edge, big if step > 0 else -big - 1])))
        steps.append(step)
    model = _single_node(
        "Slice",
        [("x", F32, shape)],
        [("y", F32)],
        inits={
            "starts": np.array(starts, dtype=np.int64),
            "ends": np.array(ends, dtype=np.int64),
            "axes": np.array(axes, dtype=np.int64),
            "steps": np.array(steps, dtype=np.int64),
        },
    )
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _assert_matches_ort(model, {"x": x}, tol=0)


def test_shape_ops_vs_ort():
    """Gather, Concat, Split, Unsqueeze, Squeeze, Expand, Tile, Range, CumSum, Trilu, Einsum."""
    model = _parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 3, 4] x, int64[2] idx) => (float a, float b, float c, float d, float e,
                                               int64 f, float h, float k, float m, float n) {
            a = Gather <axis = 2> (x, idx)
            b = Concat <axis = -1> (x, x)
            s1, s2 = Split <axis = 2, num_outputs = 2> (x)
            c = Sub (s1, s2)
            u = Unsqueeze (x, ax0)
            d = Squeeze (u, ax0)
            sh = Shape (u)
            e = Expand (u, sh)
            n0 = Size (x)
            f = Range (zero, n0, two)
            h = CumSum <reverse = 1, exclusive = 1> (x, ax1)
            k = Trilu <upper = 0> (x)
            m = Einsum <equation = "bij,bkj->bik"> (x, x)
            n = Tile (x, reps)
        }
        """,
        {
            "ax0": np.array([0], dtype=np.int64),
            "ax1": np.array(1, dtype=np.int64),
            "zero": np.array(0, dtype=np.int64),
            "two": np.array(2, dtype=np.int64),
            "reps": np.array([1, 2, 1], dtype=np.int64),
        },
    )
    x = np.random.default_rng(4).standard_normal((2, 3, 4)).astype(np.float32)
    _assert_matches_ort(model, {"x": x, "idx": np.array([3, -1], dtype=np.int64)})


def test_gather_scatter_nd_vs_ort():
    model = _parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3, 4] x, int64[2, 1, 2] i, float[2, 1, 4] u, int64[2, 3, 4] j)
            => (float a, float b, float c, float d) {
            a = GatherND (x, i)
            b = GatherND <batch_dims = 1> (x, i2)
            c = ScatterND (x, i, u)
            d = GatherElements <axis = 1> (x, j)
        }
        """,
        {"i2": np.array([[1, 0], [2, 3]], dtype=np.int64)},
    )
    rng = np.random.default_rng(5)
    feeds = {
        "x": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "i": np.array([[[1, 2]], [[0, -1]]], dtype=np.int64),
        "u": rng.standard_normal((2, 1, 4)).astype(np.float32),
        "j": rng.integers(0, 3, (2, 3, 4)),
    }
    _assert_matches_ort(model, feeds, tol=0)


def test_norms_and_reductions_vs_ort():
    rng = np.random.default_rng(6)
    model = _parse(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 3, 8] x) => (float a, float b, float c, float d, float e, float f) {
            a = LayerNormalization <axis = -1, epsilon = 0.00001> (x, w, bb)
            b = RMSNormalization <axis = -1, epsilon = 0.00001> (x, w)
            c = ReduceMean <keepdims = 0> (x, ax)
            d = ReduceSum (x, ax)
            e = ReduceMax <keepdims = 0> (x)
            f = ReduceMin (x, ax)
        }
        """,
        {
            "w": rng.standard_normal(8).astype(np.float32),
            "bb": rng.standard_normal(8).astype(np.float32),
            "ax": np.array([0, -1], dtype=np.int64),
        },
    )
    _assert_matches_ort(model, {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)})


@pytest.mark.parametrize("opset,complex_in,inverse,onesided,axis,length", [
    (20, False, 0, 0, -2, None), (20, True, 0, 0, 1, None), (20, True, 1, 0, -2, 10),
    (20, False, 0, 1, 2, None), (17, True, 0, 0, 1, 6), (17, False, 0, 1, 2, None),
])
def test_dft_vs_ort(opset, complex_in, inverse, onesided, axis, length):
    """DFT (an FNet-style token mixer): forward, inverse, one-sided, a length, either axis form."""
    rng = np.random.default_rng(7)
    shape = [2, 8, 6, 2 if complex_in else 1]
    inits = {"n": np.array(length or 0, np.int64)} if length else {}
    names = ["x", "n" if length else ""]
    attrs = {"inverse": inverse, "onesided": onesided}
    if opset >= 20:
        inits["axis"] = np.array(axis, np.int64)
        names.append("axis")
    else:
        attrs["axis"] = axis
    model = _single_node("DFT", [("x", F32, shape)], [("y", F32)], attrs, inits,
                         opset=opset, node_inputs=names)
    _assert_matches_ort(model, {"x": rng.standard_normal(shape).astype(np.float32)}, tol=1e-5)


# --------------------------------------------------------------------------------------------------
# quantization


QTYPES = {
    "int8": (ir.DataType.INT8, np.int8, -128, 127, 21),
    "uint8": (ir.DataType.UINT8, np.uint8, 0, 255, 21),
    "int4": (ir.DataType.INT4, ml_dtypes.int4, -8, 7, 21),
    "uint4": (ir.DataType.UINT4, ml_dtypes.uint4, 0, 15, 21),
    "int2": (ir.DataType.INT2, ml_dtypes.int2, -2, 1, 25),
    "uint2": (ir.DataType.UINT2, ml_dtypes.uint2, 0, 3, 25),
}


def _dq_model(
    qtype: str, rows: int, cols: int, block: int, axis: int, with_zp: bool, seed: int
) -> ir.Model:
    dt, np_dt, lo, hi, opset = QTYPES[qtype]
    rng = np.random.default_rng(seed)
    x = rng.integers(lo, hi + 1, (rows, cols)).astype(np_dt)
    pshape = [rows, cols]
    pshape[axis] = -(-pshape[axis] // block)
    scale = (rng.random(pshape) + 0.1).astype(np.float32)
    inputs = [
        ir.Value(name="x", const_value=ir.tensor(x, dtype=dt, name="x")),
        ir.Value(name="s", const_value=ir.tensor(scale, name="s")),
    ]
    if with_zp:
        zp = rng.integers(lo, hi + 1, pshape).astype(np_dt)
        inputs.append(ir.Value(name="z", const_value=ir.tensor(zp, dtype=dt, name="z")))
    node = ir.node(
        "DequantizeLinear",
        inputs,
        attributes={"axis": axis, "block_size": block},
        outputs=[ir.Value(name="y")],
    )
    graph = ir.Graph([], node.outputs, nodes=[node], opset_imports={"": opset})
    for v in inputs:
        graph.register_initializer(v)
    return ir.Model(graph, ir_version=11)


@FAST
@given(
    qtype=st.sampled_from(sorted(QTYPES)),
    rows=st.integers(1, 6),
    cols=st.integers(1, 9),
    block=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from([0, 1]),
    with_zp=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocked_dequantize_linear(qtype, rows, cols, block, axis, with_zp, seed):
    model = _dq_model(qtype, rows, cols, block, axis, with_zp, seed)
    (ref,) = _ort_run(model, {})
    got = TorchExecutor(model).run({})["y"]
    assert _rel(got, ref) == 0.0


def test_quantize_linear_forward_vs_ort():
    """Blocked QuantizeLinear (ties round to even, saturation) then DequantizeLinear."""
    for qtype, (dt, np_dt, lo, hi, _) in QTYPES.items():
        if qtype in ("int2", "uint2"):  # ORT has no int2 QuantizeLinear kernel
            continue
        rng = np.random.default_rng(7)
        scale = (rng.random((3, 2)) + 0.1).astype(np.float32)
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, 8]))
        s = ir.Value(name="s", const_value=ir.tensor(scale))
        zp = rng.integers(lo, hi + 1, (3, 2)).astype(np_dt)
        z = ir.Value(name="z", const_value=ir.tensor(zp, dtype=dt))
        attrs = {"axis": 1, "block_size": 4}
        q_out = ir.Value(name="q", type=ir.TensorType(dt))
        q = ir.node("QuantizeLinear", [x, s, z], attrs, outputs=[q_out])
        y = ir.node("DequantizeLinear", [q.outputs[0], s, z], attrs, outputs=[ir.Value(name="y")])
        graph = ir.Graph([x], y.outputs, nodes=[q, y], opset_imports={"": 21})
        graph.register_initializer(s)
        graph.register_initializer(z)
        model = ir.Model(graph, ir_version=10)
        xs = (rng.standard_normal((3, 8)) * 10 * (hi - lo) / 255).astype(np.float32)
        xs[0, :4] = np.array([0.5, 1.5, 2.5, -0.5], dtype=np.float32) * scale[0, 0]
        (ref,) = _ort_run(model, {"x": xs})
        got = TorchExecutor(model).run({"x": xs}, outputs=["y", "q"])
        np.testing.assert_array_equal(got["y"].numpy(), ref)
        assert lo <= int(got["q"].min()) and int(got["q"].max()) <= hi


def _pack_low_bits_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (last dim) into uint8 bytes, ``8 // bits`` per byte, low bits first."""
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], axis=-1)
    codes = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(codes.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= codes[..., i] << (i * bits)
    return out


def _matmulnbits_model(n: int, k: int, bits: int, block: int, with_zp: bool, seed: int):
    """A MatMulNBits model and its reference weight ``W`` [N, K] dequantized in numpy."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-k // block)
    codes = rng.integers(0, 2**bits, (n, n_blocks * block))
    scales = (rng.random((n, n_blocks)) * 0.1 + 0.01).astype(np.float32)
    zps = rng.integers(0, 2**bits, (n, n_blocks)) if with_zp else None
    b = _pack_low_bits_first(codes.reshape(n, n_blocks, block), bits)
    inits = {"B": b, "scales": scales.reshape(-1)}
    if with_zp:
        inits["zp"] = _pack_low_bits_first(zps, bits).reshape(-1)
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    model = _single_node(
        "MatMulNBits",
        [("A", F32, ["batch", k])],
        [("Y", F32)],
        attrs=attrs,
        inits=inits,
        domain="com.microsoft",
    )
    z = zps if with_zp else np.full((n, n_blocks), 2 ** (bits - 1))
    w = (codes.reshape(n, n_blocks, block) - z[..., None]) * scales[..., None]
    return model, w.reshape(n, -1)[:, :k]


@FAST
@given(
    bits=st.sampled_from([2, 4, 8]),
    n=st.integers(1, 6),
    k=st.sampled_from([16, 32, 40, 64]),
    block=st.sampled_from([16, 32]),
    with_zp=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matmul_nbits_vs_ort(bits, n, k, block, with_zp, seed):
    model, w = _matmulnbits_model(n, k, bits, block, with_zp, seed)
    a = np.random.default_rng(seed + 1).standard_normal((3, k)).astype(np.float32)
    (ref,) = _ort_run(model, {"A": a})
    got = TorchExecutor(model).run({"A": a})["Y"]
    assert _rel(got, ref) <= TOL
    exact = TorchExecutor(model, dtype=torch.float64).run({"A": a.astype(np.float64)})["Y"]
    np.testing.assert_allclose(exact.numpy(), a.astype(np.float64) @ w.T, rtol=1e-10, atol=1e-12)


def test_gather_block_quantized_vs_ort():
    rng = np.random.default_rng(8)
    vocab, dim, block = 5, 32, 16
    codes = rng.integers(0, 16, (vocab, dim))
    zps = rng.integers(0, 16, (vocab, dim // block))
    inits = {
        "data": _pack_low_bits_first(codes, 4),
        "scales": (rng.random((vocab, dim // block)) + 0.1).astype(np.float32),
        "zp": _pack_low_bits_first(zps, 4),
    }
    for with_zp in (True, False):
        used = dict(inits) if with_zp else {k: v for k, v in inits.items() if k != "zp"}
        model = _single_node(
            "GatherBlockQuantized",
            [("idx", onnx.TensorProto.INT64, [2, 3])],
            [("y", F32)],
            attrs={"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
            inits=used,
            domain="com.microsoft",
            node_inputs=["data", "idx", "scales"] + (["zp"] if with_zp else []),
        )
        idx = np.array([[0, 4, -1], [1, 1, 3]], dtype=np.int64)
        (ref,) = _ort_run(model, {"idx": idx})
        assert _rel(TorchExecutor(model).run({"idx": idx})["y"], ref) <= TOL


# --------------------------------------------------------------------------------------------------
# control flow


def test_if_and_loop_with_outer_scope_match_ort():
    model = _parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[3] x, bool c, int64 n) => (float y, float acc, float scan) {
            w = Mul (x, x)
            y = If (c) <
                then_branch = t () => (float ty) { ty = Add (w, x) },
                else_branch = e () => (float ey) { ey = Sub (w, x) }
            >
            zero = ReduceSum <keepdims = 0> (w)
            acc, scan = Loop (n, c, zero) <
                body = b (int64 i, bool cond, float a_in) => (bool cond_out, float a_out, float s) {
                    cond_out = Identity (cond)
                    fi = Cast <to = 1> (i)
                    a_out = Add (a_in, fi)
                    s = Mul (x, fi)
                }
            >
        }
        """
    )
    x = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c), "n": np.array(4, dtype=np.int64)}
        _assert_matches_ort(model, feeds)


def test_weights_in_subgraph_and_constant_nodes_can_be_overridden():
    h = onnx.helper
    w_then = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    then_g = h.make_graph(
        [h.make_node("Mul", ["x", "w_then"], ["ty"])],
        "then",
        [],
        [h.make_tensor_value_info("ty", F32, [3])],
        initializer=[onnx.numpy_helper.from_array(w_then, "w_then")],
    )
    else_g = h.make_graph(
        [h.make_node("Neg", ["wc"], ["ey"])], "else", [], [h.make_tensor_value_info("ey", F32, [3])]
    )
    nodes = [
        h.make_node("Constant", [], ["wc"], value=onnx.numpy_helper.from_array(-w_then)),
        h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", F32, [3]), h.make_tensor_value_info("c", 9, [])],
        [h.make_tensor_value_info("y", F32, [3])],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    x = np.array([1.0, 1.0, 2.0], dtype=np.float32)
    _assert_matches_ort(model, {"x": x, "c": np.array(True)})
    _assert_matches_ort(model, {"x": x, "c": np.array(False)})
    ex = TorchExecutor(model, dtype=torch.float64)
    assert "w_then" in ex.weights
    (w,) = ex.make_trainable(["w_then"]).values()
    (g,) = torch.autograd.grad(ex.run({"x": x, "c": True})["y"].sum(), [w])
    torch.testing.assert_close(g, torch.as_tensor(x, dtype=torch.float64))
    wc = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y = ex.run({"x": x, "c": False}, overrides={"wc": wc})["y"]
    (gc,) = torch.autograd.grad(y.sum(), [wc])
    torch.testing.assert_close(gc, -torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# gradients, overrides, intermediates


def _mlp_model() -> ir.Model:
    rng = np.random.default_rng(9)
    shapes = {"w1": (4, 6), "g1": (6,), "b1": (6,), "w2": (3, 6), "b2": (3,)}
    return _parse(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 4] x) => (float y) {
            h = MatMul (x, w1)
            a = Gelu (h)
            n = LayerNormalization (a, g1, b1)
            y = Gemm <transB = 1> (n, w2, b2)
        }
        """,
        {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()},
    )


def test_autograd_gradient_matches_finite_differences():
    model = _mlp_model()
    ex = TorchExecutor(model, dtype=torch.float64)
    x = np.random.default_rng(10).standard_normal((5, 4))
    params = ex.make_trainable(["w1"])
    w1 = params["w1"]
    assert w1.requires_grad and any(p is w1 for p in ex.parameters())
    loss = (ex.run({"x": x})["y"] ** 2).sum()
    (grad,) = torch.autograd.grad(loss, [w1])

    def f(w: torch.Tensor) -> float:
        return float((ex.run({"x": x}, overrides={"w1": w})["y"] ** 2).sum())

    eps = 1e-6
    fd = torch.zeros_like(grad)
    base = w1.detach()
    for i in range(base.shape[0]):
        for j in range(base.shape[1]):
            e = torch.zeros_like(base)
            e[i, j] = eps
            fd[i, j] = (f(base + e) - f(base - e)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_hvp_through_overrides_with_torch_func():
    model = _mlp_model()
    ex = TorchExecutor(model, dtype=torch.float64)
    x = torch.as_tensor(np.random.default_rng(11).standard_normal((5, 4)))
    w0 = ex.weights["w2"].clone()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return (ex.run({"x": x}, overrides={"w2": w})["y"] ** 2).sum()

    v = torch.randn_like(w0, generator=torch.Generator().manual_seed(0))
    _, hvp = torch.func.jvp(torch.func.grad(loss), (w0,), (v,))
    # loss is quadratic in w2: H v = 2 * (v n^T) n summed, i.e. 2 v (N^T N)
    n = ex.run({"x": x}, outputs=["n"])["n"]
    torch.testing.assert_close(hvp, 2 * v @ (n.T @ n), rtol=1e-10, atol=1e-10)


def test_intermediate_outputs_and_output_gradients():
    model = _mlp_model()
    ex = TorchExecutor(model, dtype=torch.float64)
    x = np.random.default_rng(12).standard_normal((5, 4))
    out = ex.run({"x": x}, outputs=["h", "w1", "x"])
    assert set(out) == {"h", "w1", "x"}
    torch.testing.assert_close(out["h"], out["x"] @ out["w1"])
    # ∂L/∂h through an override of the intermediate value
    h = out["h"].detach().requires_grad_(True)
    y = ex.run({"x": x}, overrides={"h": h})["y"]
    (gh,) = torch.autograd.grad(y.sum(), [h])
    assert gh.shape == h.shape and torch.all(torch.isfinite(gh))
    # only the nodes needed run: asking for h does not need w2
    assert set(ex.run({"x": x}, outputs=["h"], overrides={"w2": torch.full((3, 6), math.nan)})) == {
        "h"
    }


def test_forward_module_interface_and_float64_mode():
    model = _mlp_model()
    x = np.random.default_rng(13).standard_normal((2, 4)).astype(np.float32)
    ex32 = TorchExecutor(model)
    ex64 = TorchExecutor(model, dtype=torch.float64)
    y32 = ex32(torch.as_tensor(x))
    y64 = ex64(x)
    assert y32.dtype == torch.float32 and y64.dtype == torch.float64
    assert all(w.dtype == torch.float64 for w in ex64.weights.values())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_gradient_through_exported_llama(llama_model):
    ex = TorchExecutor(llama_model, dtype=torch.float64)
    name = next(n for n, w in ex.weights.items() if w.dim() == 2 and w.shape[0] == 128)
    (w,) = ex.make_trainable([name]).values()
    ids = np.random.default_rng(14).integers(0, 128, (1, 5))
    logits = ex(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.as_tensor(ids[0, 1:]))
    (g,) = torch.autograd.grad(loss, [w])
    v = torch.randn_like(w, generator=torch.Generator().manual_seed(1))
    eps = 1e-6

    def f(wt: torch.Tensor) -> float:
        lg = ex.run({"input_ids": ids}, overrides={name: wt})[ex.output_names[0]]
        return float(torch.nn.functional.cross_entropy(lg[0, :-1], torch.as_tensor(ids[0, 1:])))

    fd = (f(w.detach() + eps * v) - f(w.detach() - eps * v)) / (2 * eps)
    assert abs(float((g * v).sum()) - fd) <= 1e-6 * max(1.0, abs(fd))


# --------------------------------------------------------------------------------------------------
# errors, registry, reports


def _unsupported_model() -> ir.Model:
    return _parse(
        """
        <ir_version: 10, opset_import: ["" : 21, "my.domain" : 1]>
        g (float[2] x) => (float y) {
            a = Relu (x)
            b = my.domain.FancyOp (a)
            y = StringNormalizer (b)
        }
        """
    )


def test_unsupported_op_raises_clear_error():
    model = _unsupported_model()
    with pytest.raises(UnsupportedError, match=r"my\.domain::FancyOp \(opset 1\)") as info:
        TorchExecutor(model)
    assert "StringNormalizer" in str(info.value)
    ex = TorchExecutor(model, strict=False)
    unsupported = ex.unsupported_ops()
    assert len(unsupported) == 2 and "ai.onnx::StringNormalizer (opset 21)" in unsupported[1]
    with pytest.raises(ExecutionError, match="FancyOp"):
        ex.run({"x": np.ones(2, np.float32)})
    # values before the gap can still be computed
    assert torch.equal(ex.run({"x": np.ones(2, np.float32)}, outputs=["a"])["a"], torch.ones(2))
    report = coverage_report(model)
    assert report["unsupported"] == ["ai.onnx::StringNormalizer", "my.domain::FancyOp"]
    assert report["ops"]["ai.onnx::Relu"] == {"opset": 21, "count": 1, "supported": True}
    assert not report["all_supported"]


def test_bad_names_raise_input_error():
    ex = TorchExecutor(_mlp_model())
    x = np.ones((1, 4), np.float32)
    with pytest.raises(InputError, match="nope"):
        ex.run({"x": x}, outputs=["nope"])
    with pytest.raises(InputError, match="nope"):
        ex.run({"x": x}, overrides={"nope": torch.zeros(1)})
    with pytest.raises(InputError, match="missing graph inputs"):
        ex.run({})
    with pytest.raises(InputError, match="not an initializer"):
        ex.make_trainable(["h"])


def test_registry_picks_highest_version_not_above_opset():
    @register_op("test.hessc", "Twice", since_version=1)
    def _v1(ctx, x):
        return 2 * x

    @register_op("test.hessc", "Twice", since_version=5)
    def _v5(ctx, x):
        return x + x

    assert lookup_op("test.hessc", "Twice", 4) is _v1
    assert lookup_op("test.hessc", "Twice", 9) is _v5
    assert lookup_op("test.hessc", "Twice", 0) is None
    assert lookup_op("ai.onnx", "Softmax", 11) is not lookup_op("", "Softmax", 13)
    assert "com.microsoft::MatMulNBits" in supported_ops()


@pytest.mark.parametrize("attrs, scales, sizes", [
    ({"mode": "nearest"}, [1, 1, 2, 2], None),                                   # YOLO-style upsampling
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     [1, 1, 1.5, 2.5], None),
    ({"mode": "linear"}, [1, 1, 2, 3], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 9, 5]),
])
def test_resize_matches_ort(attrs, scales, sizes) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array(scales or [], np.float32)}
    if sizes is not None:
        inits["sizes"] = np.array(sizes, np.int64)
    model = _single_node("Resize", [("x", onnx.TensorProto.FLOAT, [2, 3, 4, 5])], [("y", onnx.TensorProto.FLOAT)], attrs, inits)
    _assert_matches_ort(model, {"x": x})


def test_resize_modes_it_cannot_compute_exactly_are_refused() -> None:
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}
    model = _single_node("Resize", [("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])], [("y", onnx.TensorProto.FLOAT)],
                         {"mode": "cubic"}, inits)
    with pytest.raises(UnsupportedError, match="Resize mode 'cubic'"):
        TorchExecutor(model).run({"x": np.zeros((1, 1, 4, 4), np.float32)})
