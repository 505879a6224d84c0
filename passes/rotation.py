r"""Rotation folding: an orthogonal ``R`` of the residual stream folded exactly into the weights.

Computational invariance (ALGORITHMS §2.1): for an orthogonal ``R``, ``‖xR‖ = ‖x‖``, so an RMSNorm
without a per-channel scale commutes with it, ``RMSN(xR) = RMSN(x)·R``. With every stream norm's
``γ`` folded into the layers that read it (``B ← diag(γ)·B`` for a stored (in, out) MatMul weight)
and set to ones, every value of the residual stream can be carried rotated, ``x ↦ xR``::

    embedding table        E ← E·R            (rows: Gather(E, ids)·R)
    writer (o, down)       B ← B·R,  b ← b·R   (its output space)
    reader (q/k/v, gate/up, head)   B ← Rᵀ·diag(γ)·B   (x R · Rᵀ diag(γ) B = (x ⊙ γ) B)

so the model computes the same function; only the weights change. ``R`` is the residual-stream
rotation "R1" of QuaRot/SpinQuant: a Hadamard matrix with seeded random signs when one of the
stream width can be built (Sylvester doubling and Paley I/II constructions), else a seeded random
orthogonal matrix.

The stream is found from the graph's structure alone, as the closure of "values carried rotated":
it starts at the output of the token embedding ``Gather``; a value on the stream passes the
rotation on through ``Add``/``Sub`` (whose other operand must then be rotated too: the output of
a MatMul/Gemm "writer", a constant bias, another embedding table, or a stream value), an RMSNorm
(fused ``RMSNormalization``, ``SimplifiedLayerNormalization``, or the exporters' decomposed
``x · 1/sqrt(mean(x²) + eps) · γ``), and ops that commute with any rotation (``Identity``, float
``Cast``, ``Neg``, a scalar ``Mul``/``Div``). It stops at the readers: MatMul/Gemm with a constant
weight. Anything else that touches a stream value (a ``LayerNormalization``, a per-channel scale,
a nonlinearity, a norm on a sublayer output before the residual add, a graph output) makes the
rotation inexact, and then nothing is rotated: R must be applied everywhere or nowhere.

After folding, the rotated model is run against the original in ONNX Runtime (the exactness gate);
a relative output error above the tolerance restores the weights and raises ``VerificationError``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from hessc.errors import VerificationError
from hessc.ir import frontend, meta

logger = logging.getLogger(__name__)

ROTATION_KEY = "hessc.rotation"
"""``model.meta`` key: the :class:`RotationPlan` of the last ``fold-rotation``; when R1 was folded
its JSON record is also written to ``model.metadata_props`` under the same key, so a saved model
is not rotated twice."""

MODES = ("hadamard", "random")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_STANDARD = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class RotationConfig:
    """Configuration of :class:`FoldRotationPass`.

    Attributes:
        mode: ``hadamard`` (a random-sign Hadamard matrix where one of the stream width can be
            built, else a random orthogonal one) or ``random`` (always a random orthogonal matrix).
        seed: seeds the Hadamard signs or the Gaussian behind the random orthogonal matrix.
        tolerance: the largest relative output error of the rotated model against the original
            (float32/float64 weights) the exactness gate accepts.
        half_tolerance: the same for float16/bfloat16 weights, whose rounding the rotation changes.
        verify_feeds: calibration feeds the gate runs (random feeds without calibration).
    """

    mode: str = "hadamard"
    seed: int = 0
    tolerance: float = 1e-4
    half_tolerance: float = 1e-2
    verify_feeds: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RotationConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not (self.tolerance > 0 and self.half_tolerance > 0):
            raise ValueError("RotationConfig tolerances must be > 0")
        if self.verify_feeds < 1:
            raise ValueError(f"RotationConfig.verify_feeds must be >= 1, got {self.verify_feeds}")


@dataclasses.dataclass(frozen=True, eq=False)
class RotationPlan:
    """What ``fold-rotation`` did, stored at ``model.meta[ROTATION_KEY]``.

    Attributes:
        folded: ``R1`` (the residual-stream rotation was folded) or ``none``.
        width: the residual-stream width ``d`` (0 when no stream was found).
        kind: ``hadamard`` or ``random-orthogonal`` (empty when nothing was folded).
        construction: how the matrix was built (``sylvester(64)``, ``paley1(71) x sylvester(8)``,
            ``qr-gaussian``).
        seed: the seed of the matrix.
        readers: MatMul/Gemm nodes whose input space was rotated (the norms' readers).
        writers: MatMul/Gemm nodes whose output space was rotated (o_proj, down_proj).
        norms: the RMSNorms on the stream (the final norm included).
        gammas_folded: norms whose per-channel scale was folded into their readers and set to ones
            (a uniform scale commutes with the rotation and stays).
        tables: embedding tables rotated (rows).
        biases: constant biases rotated (writers' biases, constants added to the stream).
        untied: weights that no longer share their values with another after the fold (a tied
            output head whose final-norm scale was folded in, a shared initializer split in two).
        untied_bytes: the bytes the float model stores in addition because of them.
        reason: why nothing was folded (empty when R1 was folded).
        rel_error: the gate's relative output error of the rotated model against the original.
        max_abs_error: the gate's largest absolute output difference.
        gate_samples: the feeds the gate ran.
        matrix: the (d × d) float64 ``R`` (not saved).
    """

    folded: str
    width: int = 0
    kind: str = ""
    construction: str = ""
    seed: int = 0
    readers: int = 0
    writers: int = 0
    norms: int = 0
    gammas_folded: int = 0
    tables: int = 0
    biases: int = 0
    untied: tuple[str, ...] = ()
    untied_bytes: int = 0
    reason: str = ""
    rel_error: float | None = None
    max_abs_error: float | None = None
    gate_samples: int = 0
    matrix: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.folded not in ("R1", "none"):
            raise ValueError(f"RotationPlan.folded must be 'R1' or 'none', got {self.folded!r}")
        if self.folded == "none" and not self.reason:
            raise ValueError("RotationPlan: a plan that folds nothing must say why")
        if self.matrix is not None and self.matrix.shape != (self.width, self.width):
            raise ValueError(f"RotationPlan.matrix {self.matrix.shape} does not match the width {self.width}")

    def to_json(self) -> dict[str, Any]:
        """The JSON-able record (without the matrix) for the saved plan."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "matrix"}
        out["untied"] = list(self.untied)
        return out


# --------------------------------------------------------------------------------------------------
# The rotation matrix


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(j − i)`` with ``χ`` the quadratic character of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Paley's first construction, order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Paley's second construction, order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``."""
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(n, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def hadamard(n: int) -> tuple[np.ndarray, str] | None:
    """A Hadamard matrix of order ``n`` (±1 entries, ``H Hᵀ = n I``) and how it was built, or
    None when none of Sylvester doubling, Paley I and Paley II (with prime ``q``) reaches ``n``."""
    if n >= 1 and n & (n - 1) == 0:
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        return h, f"sylvester({n})"
    if n % 4:
        return None
    core: tuple[np.ndarray, str] | None = None
    twos = 1
    m = n
    while m % 4 == 0:
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            core = _paley1(m - 1), f"paley1({m - 1})"
        elif _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
            core = _paley2(m // 2 - 1), f"paley2({m // 2 - 1})"
        if core is not None:
            break
        m //= 2
        twos *= 2
    if core is None:
        return None
    h, what = core
    probe = np.random.default_rng(0).integers(-3, 4, size=(m, 2))  # Hᵀ H v = m v, exact in int64
    if not np.array_equal(h.T @ (h @ probe), m * probe):
        raise AssertionError(f"{what} is not a Hadamard matrix")
    if twos > 1:
        h = np.kron(hadamard(twos)[0], h)
        what = f"{what} x sylvester({twos})"
    return h, what


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotation_matrix(width: int, mode: str = "hadamard", seed: int = 0) -> tuple[np.ndarray, str, str]:
    """The float64 orthogonal ``R`` (width × width), its kind and its construction.

    ``hadamard``: ``R = diag(s) H / √d`` with seeded random signs ``s`` where a Hadamard matrix
    of order ``d`` can be built (e.g. 576 = 72·8 through Paley I with q = 71), else a random
    orthogonal matrix; ``random``: always the random orthogonal matrix.
    """
    if mode not in MODES:
        raise ValueError(f"rotation mode must be one of {MODES}, got {mode!r}")
    built = hadamard(width) if mode == "hadamard" else None
    if built is None:
        return random_orthogonal(width, seed), "random-orthogonal", "qr-gaussian"
    h, what = built
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=width)
    return signs[:, None] * h.astype(np.float64) / math.sqrt(width), "hadamard", what


# --------------------------------------------------------------------------------------------------
# Finding the stream


class _Refused(Exception):
    """The model's stream cannot be rotated exactly; the message says why."""


@dataclasses.dataclass(eq=False)
class _Norm:
    """One RMSNorm: the nodes that read its input, its output, and its scale."""

    kind: str
    root: ir.Value
    output: ir.Value
    readers_of_root: tuple[ir.Node, ...]
    gamma: ir.Value | None  # a constant initializer, or None
    problem: str = ""

    @property
    def gamma_array(self) -> np.ndarray | None:
        return None if self.gamma is None else np.asarray(self.gamma.const_value.numpy(), dtype=np.float64).ravel()

    @property
    def uniform(self) -> bool:
        """No per-channel scale: none, or one value (it commutes with the rotation and stays)."""
        g = self.gamma_array
        return g is None or bool(np.all(g == g[0]))


def _name(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def _scalar(value: ir.Value | None) -> float | None:
    array = _const(value)
    if array is None or array.size != 1:
        return None
    return float(array.ravel()[0])


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _standard(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in _STANDARD and node.op_type in ops


def _last_axis_only(x: ir.Value, axes: list[int] | None) -> bool:
    rank = len(x.shape) if x.shape is not None else None
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = _const(node.inputs[1])
        return None if array is None else [int(a) for a in array.ravel()]
    axes = node.attributes.get_ints("axes", None)
    return None if axes is None else [int(a) for a in axes]


def _match_decomposed(sq: ir.Node) -> _Norm | None:
    """``x · 1/sqrt(mean(x², -1) + eps) [· γ]`` from its ``Pow(x, 2)`` or ``Mul(x, x)``.

    Accepted forms: ``Pow(x, 2)``/``Mul(x, x)`` → ``ReduceMean`` (last axis, keepdims) →
    optional ``Add(eps)`` → ``Sqrt`` → ``Reciprocal``/``Div(1, ·)`` → ``Mul(x, ·)``, or ``Sqrt`` →
    ``Div(x, ·)``, or ``Pow(·, -0.5)`` → ``Mul(x, ·)``; then an optional ``Mul`` by a constant γ.
    """
    if _standard(sq, "Pow"):
        x = sq.inputs[0]
        if _scalar(sq.inputs[1]) != 2.0:
            return None
    elif _standard(sq, "Mul") and sq.inputs[0] is sq.inputs[1]:
        x = sq.inputs[0]
    else:
        return None
    if x is None:
        return None
    mean = _only_use(sq.outputs[0])
    if not _standard(mean, "ReduceMean") or mean.inputs[0] is not sq.outputs[0]:
        return None
    if mean.attributes.get_int("keepdims", 1) != 1 or not _last_axis_only(x, _reduce_axes(mean)):
        return None
    cur = mean.outputs[0]
    nxt = _only_use(cur)
    if _standard(nxt, "Add"):
        other = nxt.inputs[1] if nxt.inputs[0] is cur else nxt.inputs[0]
        if _scalar(other) is None:
            return None
        cur = nxt.outputs[0]
        nxt = _only_use(cur)
    normed: ir.Node | None = None
    inv: ir.Value | None = None
    if _standard(nxt, "Sqrt"):
        root = nxt.outputs[0]
        after = _only_use(root)
        one_over = _standard(after, "Div") and after.inputs[1] is root and _scalar(after.inputs[0]) == 1.0
        if _standard(after, "Reciprocal") or one_over:
            inv = after.outputs[0]
        elif _standard(after, "Div") and after.inputs[1] is root and after.inputs[0] is x:
            normed = after
        else:
            return None
    elif _standard(nxt, "Pow") and nxt.inputs[0] is cur and _scalar(nxt.inputs[1]) == -0.5:
        inv = nxt.outputs[0]
    else:
        return None
    if normed is None:
        normed = _only_use(inv)
        if not _standard(normed, "Mul") or {id(v) for v in normed.inputs} != {id(x), id(inv)}:
            return None
    output = normed.outputs[0]
    gamma = None
    scale = _only_use(output)
    if _standard(scale, "Mul"):
        other = scale.inputs[1] if scale.inputs[0] is output else scale.inputs[0]
        if other is not None and other.const_value is not None and other.dtype in _FLOAT_TYPES:
            gamma, output = other, scale.outputs[0]
    norm = _Norm("decomposed", x, output, (sq, normed), gamma)
    if gamma is not None and not gamma.is_initializer():
        norm.problem = f"the scale of the RMSNorm at {_name(scale)} is not an initializer"
    return norm


def _fused_norm(node: ir.Node) -> _Norm | None:
    """``RMSNormalization`` (opset 23), ``SimplifiedLayerNormalization`` (ORT) or a
    ``LayerNormalization`` (not invariant: a norm with a problem)."""
    op = node.op_type
    if op == "LayerNormalization" and node.domain in _STANDARD:
        return _Norm(op, node.inputs[0], node.outputs[0], (node,), None, problem=(
            f"{_name(node)} subtracts the mean, which does not commute with a rotation (ALGORITHMS §2.3); "
            "fold-rotation does not centre LayerNorm models into RMSNorm models"))
    rms = op == "RMSNormalization" and node.domain in _STANDARD
    simplified = op == "SimplifiedLayerNormalization" and node.domain in (*_STANDARD, "com.microsoft")
    if op == "SkipSimplifiedLayerNormalization":
        return _Norm(op, node.inputs[0], node.outputs[0], (node,), None, problem=(
            f"{_name(node)} (a fused residual add and norm) is not handled; fold the rotation into the "
            "export before ONNX Runtime's fusions"))
    if not (rms or simplified):
        return None
    x, gamma = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    norm = _Norm(op, x, node.outputs[0], (node,), gamma)
    axis = node.attributes.get_int("axis", -1)
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        norm.problem = f"{_name(node)} normalizes from axis {axis}, not over the last axis only"
    elif gamma is None or gamma.const_value is None or not gamma.is_initializer():
        norm.problem = f"the scale of {_name(node)} is not a constant initializer"
    elif any(out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs[1:]):
        norm.problem = f"{_name(node)} has its inverse standard deviation read"
    return norm


def _find_norms(graph: ir.Graph) -> dict[ir.Node, _Norm]:
    """Every norm of the graph, keyed by each node of it that reads the norm's input."""
    found: dict[ir.Node, _Norm] = {}
    for node in graph:
        norm = _fused_norm(node) or _match_decomposed(node)
        if norm is not None:
            for reader in norm.readers_of_root:
                found.setdefault(reader, norm)
    return found


def _embedding(node: ir.Node) -> bool:
    """``Gather(E, ids)`` of a constant 2-D float table on axis 0 by computed indices."""
    if not _standard(node, "Gather") or node.attributes.get_int("axis", 0) != 0 or len(node.inputs) < 2:
        return False
    table, ids = node.inputs
    if table is None or table.const_value is None or not table.is_initializer() or table.dtype not in _FLOAT_TYPES:
        return False
    return len(table.const_value.shape) == 2 and ids is not None and ids.const_value is None


def _weight(node: ir.Node) -> ir.Value | None:
    """The constant 2-D float weight of a MatMul/Gemm, or None."""
    if not _standard(node, "MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer() or w.dtype not in _FLOAT_TYPES:
        return None
    if len(w.const_value.shape) != 2:
        return None
    return w


def _in_out(node: ir.Node, w: ir.Value) -> tuple[int, int]:
    rows, cols = w.const_value.shape
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return cols, rows
    return rows, cols


@dataclasses.dataclass(frozen=True)
class _Side:
    """One factor of a transform of a stored tensor: ``Rᵀ diag(γ)`` on the left, ``diag(γ) R``
    on the right (``gamma`` None for no scale)."""

    gamma: ir.Value | None = None

    def key(self) -> tuple:
        return ("R", id(self.gamma) if self.gamma is not None else None)


@dataclasses.dataclass(frozen=True, eq=False)
class _Use:
    """How one use of a constant changes: ``T ← L · T · Rt`` (None: the identity)."""

    node: ir.Node
    idx: int
    left: _Side | None
    right: _Side | None
    role: str  # reader, writer, reader+writer, table, bias, other

    def key(self) -> tuple:
        return (self.left.key() if self.left else None, self.right.key() if self.right else None)


class _Stream:
    """The closure of rotated values from the embedding, built by :meth:`find`."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.norm_at = _find_norms(graph)
        self.norm_outputs = {id(n.output): n for n in self.norm_at.values()}
        self.width = 0
        self.values: dict[int, tuple[ir.Value, _Norm | None]] = {}  # id -> (value, pending γ)
        self.work: list[ir.Value] = []
        self.norms: list[_Norm] = []
        self.readers: dict[ir.Node, _Norm | None] = {}
        self.writers: list[ir.Node] = []
        self.tables: list[ir.Node] = []
        self.biases: list[tuple[ir.Node, int]] = []

    def find(self) -> None:
        """Walks the stream from the token embedding; raises ``_Refused`` with the reason."""
        tables = [n for n in self.graph if _embedding(n)]
        if not tables:
            raise _Refused("no token embedding Gather (a constant 2-D table looked up by token ids) starts a stream")
        seed = max(tables, key=lambda n: n.inputs[0].const_value.shape[0])
        self.width = int(seed.inputs[0].const_value.shape[1])
        self.tables.append(seed)
        self._add(seed.outputs[0], None)
        while self.work:
            value = self.work.pop()
            tag = self.values[id(value)][1]
            if value.is_graph_output():
                raise _Refused(f"the residual-stream value {value.name!r} is a graph output (it would come out rotated)")
            for use in list(value.uses()):
                self._forward(value, tag, use.node, use.idx)
        if not self.writers:
            raise _Refused("no residual Add with a MatMul/Gemm sublayer output on the stream: not a residual model")
        if not self.norms:
            raise _Refused("no RMSNorm on the residual stream")
        self._check_gammas()

    # -- the walk ---------------------------------------------------------------------------------

    def _add(self, value: ir.Value, tag: _Norm | None) -> None:
        known = self.values.get(id(value))
        if known is not None:
            if known[1] is not tag:
                raise _Refused(f"{value.name!r} is reached both as a stream value and as a norm output")
            return
        dims = list(value.shape) if value.shape is not None else []
        if dims and isinstance(dims[-1], int) and dims[-1] != self.width:
            raise _Refused(f"{value.name!r} on the stream has width {dims[-1]}, not the table's {self.width}")
        self.values[id(value)] = (value, tag)
        self.work.append(value)

    def _forward(self, value: ir.Value, tag: _Norm | None, node: ir.Node, idx: int) -> None:
        """A use of a rotated value: what it implies."""
        if node.graph is not self.graph:
            raise _Refused(f"the stream value {value.name!r} is read inside a subgraph ({_name(node)})")
        norm = self.norm_at.get(node)
        if norm is not None and norm.root is value:
            self._norm(norm, tag)
            return
        if _standard(node, "Shape", "Size"):
            return
        if _standard(node, "Add", "Sub"):
            if tag is not None:
                raise _Refused(f"the output of the norm {tag.kind} is added to the stream at {_name(node)} "
                               "before its scale is folded (a post-norm block)")
            self._require(node, 1 - idx)
            self._add(node.outputs[0], None)
            return
        if _standard(node, "MatMul", "Gemm") and idx == 0 and _weight(node) is not None:
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                raise _Refused(f"{_name(node)} reads the stream with transA=1")
            n_in, _ = _in_out(node, _weight(node))
            if n_in != self.width:
                raise _Refused(f"{_name(node)} reads the stream with an input width {n_in}, not {self.width}")
            self.readers[node] = tag
            return
        if self._transparent(node, idx):
            self._add(node.outputs[0], tag)
            return
        raise _Refused(self._why_not(node, value, tag))

    def _norm(self, norm: _Norm, tag: _Norm | None) -> None:
        if norm.problem:
            raise _Refused(norm.problem)
        if tag is not None:
            raise _Refused(f"a norm ({norm.kind}) reads the output of another norm ({tag.kind}) before its scale")
        if norm in self.norms:
            return
        gamma = norm.gamma_array
        if gamma is not None and gamma.size not in (1, self.width):
            raise _Refused(f"an RMSNorm scale of {gamma.size} channels on a stream of width {self.width}")
        self.norms.append(norm)
        self._add(norm.output, None if norm.uniform else norm)

    def _require(self, node: ir.Node, idx: int) -> None:
        """``node.inputs[idx]`` joins a rotated value, so it must be produced rotated."""
        value = node.inputs[idx]
        if value is None:
            raise _Refused(f"{_name(node)} has no input {idx}")
        known = self.values.get(id(value))
        if known is not None:
            if known[1] is not None:
                raise _Refused(f"the output of the norm {known[1].kind} is added to the stream at {_name(node)} "
                               "(a post-norm block)")
            return
        if value.const_value is not None:
            array = _const(value)
            if not value.is_initializer() or value.dtype not in _FLOAT_TYPES:
                raise _Refused(f"{_name(node)} adds a constant that is not a float initializer to the stream")
            if array.ndim == 0 or array.shape[-1] != self.width or array.size != self.width:
                raise _Refused(f"{_name(node)} adds a constant of shape {list(array.shape)} to the stream "
                               f"(a rotated bias must be one vector of width {self.width})")
            if not any(n is node and i == idx for n, i in self.biases):
                self.biases.append((node, idx))
            return
        producer = value.producer()
        if producer is None:
            raise _Refused(f"the graph input {value.name!r} is added to the residual stream at {_name(node)}")
        if producer.graph is not self.graph:
            raise _Refused(f"{value.name!r}, added to the stream, comes from a subgraph")
        if id(value) in self.norm_outputs:
            norm = self.norm_outputs[id(value)]
            raise _Refused(f"a norm ({norm.kind}) on a sublayer output feeds the residual Add at {_name(node)} "
                           "(a sandwich norm): its scale sits between the writer and the stream")
        if _standard(producer, "MatMul", "Gemm") and _weight(producer) is not None:
            if producer.op_type == "Gemm" and producer.attributes.get_int("transA", 0):
                raise _Refused(f"{_name(producer)} writes to the stream with transA=1")
            _, n_out = _in_out(producer, _weight(producer))
            if n_out != self.width:
                raise _Refused(f"{_name(producer)} writes {n_out} channels to a stream of width {self.width}")
            if producer not in self.writers:
                self.writers.append(producer)
                if producer.op_type == "Gemm" and len(producer.inputs) > 2 and producer.inputs[2] is not None:
                    self._require(producer, 2)
            self._add(value, None)
            return
        if _standard(producer, "Add", "Sub"):
            self._require(producer, 0)
            self._require(producer, 1)
            self._add(value, None)
            return
        if _embedding(producer) and producer.inputs[0].const_value.shape[1] == self.width:
            if producer not in self.tables:
                self.tables.append(producer)
            self._add(value, None)
            return
        signal = self._signal(producer)
        if signal is not None:
            self._require(producer, signal)
            self._add(value, None)
            return
        raise _Refused(f"the residual Add at {_name(node)} reads the output of {_name(producer)}, "
                       "not of a MatMul/Gemm with a constant weight (a writer)")

    @staticmethod
    def _signal(node: ir.Node) -> int | None:
        """The input through which ``node`` commutes with any rotation, or None."""
        if _standard(node, "Identity", "Neg"):
            return 0
        if _standard(node, "Cast"):
            to = node.attributes.get_int("to", 0)
            return 0 if ir.DataType(to) in _FLOAT_TYPES else None
        if _standard(node, "Mul"):
            for i in (0, 1):
                if _scalar(node.inputs[1 - i]) is not None and node.inputs[i] is not None and node.inputs[i].const_value is None:
                    return i
        if _standard(node, "Div") and _scalar(node.inputs[1]) is not None:
            return 0
        return None

    def _transparent(self, node: ir.Node, idx: int) -> bool:
        return self._signal(node) == idx

    def _why_not(self, node: ir.Node, value: ir.Value, tag: _Norm | None) -> str:
        where = f"the stream value {value.name!r}"
        if tag is not None:
            return (f"the output of the norm {tag.kind} is read by {_name(node)}, not only by MatMul/Gemm "
                    "layers, so its scale cannot be folded")
        if _standard(node, "Mul", "Div"):
            return (f"{where} is scaled per channel by {_name(node)} (residual scaling that is not one scalar "
                    "does not commute with a rotation)")
        if _standard(node, "ReduceMean", "Sub"):
            return (f"{where} is read by {_name(node)} outside an RMSNorm (a mean subtraction, as in "
                    "LayerNorm, does not commute with a rotation)")
        if _standard(node, "MatMul", "Gemm"):
            return f"{where} is read by {_name(node)}, which has no constant 2-D weight"
        return f"{where} is read by {_name(node)}, which does not commute with a rotation"

    def _check_gammas(self) -> None:
        """A folded scale is set to ones, so nothing else may read it."""
        scale_nodes = {id(node) for n in self.norms for node in self._scale_nodes(n)}
        for n in self.norms:
            if n.gamma is None or n.uniform:
                continue
            for use in n.gamma.uses():
                if id(use.node) not in scale_nodes:
                    raise _Refused(f"the RMSNorm scale {n.gamma.name!r} is also read by {_name(use.node)}")
            if n.gamma.is_graph_output():
                raise _Refused(f"the RMSNorm scale {n.gamma.name!r} is a graph output")

    @staticmethod
    def _scale_nodes(norm: _Norm) -> list[ir.Node]:
        if norm.kind == "decomposed":
            return [norm.output.producer()] if norm.gamma is not None else []
        return list(norm.readers_of_root)

    # -- what each constant becomes ---------------------------------------------------------------

    def uses(self) -> dict[int, tuple[ir.Value, list[_Use]]]:
        """Every use of every constant the fold changes, with its transform (identity for the
        uses outside the stream, which keep the original tensor)."""
        changed: dict[int, tuple[ir.Value, list[_Use]]] = {}

        def note(value: ir.Value, use: _Use) -> None:
            changed.setdefault(id(value), (value, []))[1].append(use)

        for table in self.tables:
            note(table.inputs[0], _Use(table, 0, None, _Side(), "table"))
        nodes = list(dict.fromkeys([*self.readers, *self.writers]))
        for node in nodes:
            w = node.inputs[1]
            reads = node in self.readers
            writes = node in self.writers
            norm = self.readers.get(node)
            gamma = norm.gamma if norm is not None else None
            role = "reader+writer" if reads and writes else "reader" if reads else "writer"
            if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):  # stored (out, in)
                use = _Use(node, 1, _Side() if writes else None, _Side(gamma) if reads else None, role)
            else:  # stored (in, out)
                use = _Use(node, 1, _Side(gamma) if reads else None, _Side() if writes else None, role)
            note(w, use)
        for node, idx in self.biases:  # constants added to the stream, Gemm writers' C included
            note(node.inputs[idx], _Use(node, idx, None, _Side(), "bias"))
        for value, uses in changed.values():
            seen = {(id(u.node), u.idx) for u in uses}
            for use in value.uses():
                if (id(use.node), use.idx) not in seen and not _standard(use.node, "Shape", "Size"):
                    uses.append(_Use(use.node, use.idx, None, None, "other"))
            if value.is_graph_output():
                raise _Refused(f"the weight {value.name!r} is also a graph output")
        return changed


# --------------------------------------------------------------------------------------------------
# Folding


def _apply(array: np.ndarray, use: _Use, r: np.ndarray) -> np.ndarray:
    """``L · T · Rt`` in float64 for a stored tensor ``T`` (a bias is one row)."""
    t = np.asarray(array, dtype=np.float64)
    shape = t.shape
    if t.ndim != 2:
        t = t.reshape(-1, shape[-1])
    if use.left is not None:
        if use.left.gamma is not None:
            t = _gamma(use.left.gamma)[:, None] * t
        t = r.T @ t
    if use.right is not None:
        if use.right.gamma is not None:
            t = t * _gamma(use.right.gamma)[None, :]
        t = t @ r
    return t.reshape(shape)


def _gamma(value: ir.Value) -> np.ndarray:
    return np.asarray(value.const_value.numpy(), dtype=np.float64).ravel()


def _fresh_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name


class _Undo:
    """What the fold changed, so a failed gate can put the model back as it was."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def tensor(self, value: ir.Value, new: ir.TensorProtocol) -> None:
        old = value.const_value
        self.steps.append(lambda: setattr(value, "const_value", old))
        value.const_value = new

    def meta(self, value: ir.Value) -> None:
        saved = dict(value.meta)
        self.steps.append(lambda: (value.meta.clear(), value.meta.update(saved)))

    def rewire(self, node: ir.Node, idx: int, new: ir.Value) -> None:
        old = node.inputs[idx]
        self.steps.append(lambda: node.replace_input_with(idx, old))
        node.replace_input_with(idx, new)

    def register(self, graph: ir.Graph, value: ir.Value) -> None:
        graph.register_initializer(value)
        self.steps.append(lambda: graph.initializers.pop(value.name, None))

    def run(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


def _tensor(array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Tensor:
    return ir.tensor(np.asarray(array).astype(dtype.numpy()), name=name)


@dataclasses.dataclass
class _Folded:
    untied: list[str] = dataclasses.field(default_factory=list)
    untied_bytes: int = 0
    gammas: int = 0
    half: bool = False


def _fold(model: ir.Model, stream: _Stream, r: np.ndarray, undo: _Undo) -> _Folded:
    graph = model.graph
    out = _Folded()
    changed = stream.uses()
    keys_by_value: dict[int, tuple] = {}
    for value, uses in changed.values():
        groups: dict[tuple, list[_Use]] = {}
        for use in uses:
            groups.setdefault(use.key(), []).append(use)
        # The original value stays with the embedding table's group (it keeps its name), else the
        # group with the most uses; every other group gets its own copy (an untie).
        ordered = sorted(groups.values(), key=lambda g: (not any(u.role == "table" for u in g), -len(g)))
        base = value.const_value.numpy()
        out.half |= value.dtype in _HALF_TYPES
        stats = value.meta.get(meta.HESSIAN_KEY)
        for i, group in enumerate(ordered):
            use = group[0]
            identity = use.left is None and use.right is None
            if i == 0:
                target = value
                undo.meta(value)
                if not identity:
                    undo.tensor(value, _tensor(_apply(base, use, r), value.dtype, value.name))
                keys_by_value[id(value)] = use.key()
                _restate(value, group, r, stats)
                continue
            name = _fresh_name(graph, f"{value.name}_untied")
            array = base if identity else _apply(base, use, r)
            target = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(value.dtype))
            target.const_value = _tensor(array, value.dtype, name)
            target.meta[meta.WEIGHT_NAME_KEY] = name
            undo.register(graph, target)
            for u in group:
                undo.rewire(u.node, u.idx, target)
            if stats is not None:
                meta.invalidate(target, meta.HESSIAN_KEY, f"was split off {frontend.original_name(value)} by fold-rotation")
            out.untied.append(name)
            out.untied_bytes += int(target.const_value.nbytes)
            logger.debug("fold-rotation: %s untied into %s", value.name, name)
    # A tied output head survives only as the transpose of the rotated table, Rᵀ·Eᵀ = (E·R)ᵀ.
    tables = {table.inputs[0].name: table.inputs[0] for table in stream.tables}
    for value in list(graph.initializers.values()):
        table_name = value.meta.get(meta.TIED_KEY)
        if table_name is None:
            continue
        table = graph.initializers.get(table_name)
        table_moved = table is not None and id(table) in keys_by_value
        head_key = keys_by_value.get(id(value))
        if not table_moved and head_key is None:
            continue
        survives = (table_name in tables and keys_by_value.get(id(table)) == (None, ("R", None))
                    and head_key == (("R", None), None))
        if not survives:
            if id(value) not in keys_by_value:
                undo.meta(value)
            value.meta[meta.UNTIED_FROM_KEY] = value.meta.pop(meta.TIED_KEY)
            out.untied.append(value.name)
            out.untied_bytes += int(value.const_value.nbytes)
    # The scales now live in the readers: the norms get unit scales.
    done: set[int] = set()
    for norm in stream.norms:
        if norm.gamma is None or norm.uniform or id(norm.gamma) in done:
            continue
        done.add(id(norm.gamma))
        g = norm.gamma
        undo.meta(g)
        undo.tensor(g, _tensor(np.ones(g.const_value.shape), g.dtype, g.name))
        if g.meta.get(meta.HESSIAN_KEY) is not None:
            meta.invalidate(g, meta.HESSIAN_KEY, "was changed by fold-rotation (folded into its readers)")
        out.gammas += 1
    return out


def _restate(value: ir.Value, group: list[_Use], r: np.ndarray, stats: Any) -> None:
    """The curvature statistics of a changed weight: transformed exactly where the change is a
    rotation of its input space only (``W ← W R`` fed ``Rᵀ x``), invalidated otherwise."""
    if stats is None or all(u.left is None and u.right is None for u in group):
        return
    pure_reader = all(u.role == "reader" and (u.left or u.right).gamma is None for u in group)
    if pure_reader and isinstance(stats, meta.HessianStats):
        try:
            meta.set_annotation(value, meta.HESSIAN_KEY, stats.rotated(r))
            return
        except ValueError:
            pass
    why = ("its output space was rotated" if any("writer" in u.role for u in group)
           else "its input was rescaled by a folded norm scale" if any(u.role == "reader" for u in group)
           else "its rows were rotated")
    meta.invalidate(value, meta.HESSIAN_KEY, f"was changed by fold-rotation ({why})")


# --------------------------------------------------------------------------------------------------
# The exactness gate


def gate_feeds(model: ir.Model, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The gate's feeds: the first calibration feeds, else seeded random ones."""
    calibration = model.meta.get(meta.CALIBRATION_KEY)
    if calibration is not None and calibration.feeds:
        return list(calibration.feeds[:count])
    from hessc.runtime import calibration as calib

    return calib.generated_feeds(model, count=min(count, 2), seed=seed)


def check_exact(original: ir.Model, candidate: ir.Model, feeds: list[dict[str, np.ndarray]], tolerance: float,
                what: str = "fold-rotation"):
    """Runs both models in ONNX Runtime (graph optimizations off) and returns the comparison.

    Raises:
        VerificationError: the candidate's relative output error is above ``tolerance``.
    """
    from hessc.runtime import sessions

    reference = sessions.session(original, "cpu", optimize=False)
    rotated = sessions.session(candidate, "cpu", optimize=False)
    comparison = sessions.compare(reference, rotated, feeds)
    if not comparison.rel_error <= tolerance:
        raise VerificationError(
            f"{what}: the rotated model's outputs differ from the original's by {comparison.rel_error:.2e} "
            f"relative (max abs {comparison.max_abs_error:.2e}) on {comparison.samples} feeds, above the "
            f"tolerance {tolerance:.0e}; an op on the residual stream does not commute with the rotation. "
            "Compile without it (--disable-pass fold-rotation)"
        )
    return comparison


# --------------------------------------------------------------------------------------------------
# The pass


class FoldRotationPass(ir.passes.InPlacePass):
    """Folds a residual-stream rotation R1 into a pre-norm transformer's weights (``fold-rotation``).

    Finds the stream from the graph's structure (see the module docstring), folds every stream
    RMSNorm's scale into its readers, rotates the embedding table, writers, readers and biases in
    float64, and checks the result against the original in ONNX Runtime. A model whose stream
    cannot be rotated exactly is left unchanged, with the reason in the plan. Curvature statistics:
    a reader whose input was only rotated gets ``HessianStats.rotated(R)``; every other changed
    weight (writers, γ-folded readers, tables) has its statistics invalidated, so run
    ``annotate-hessian`` again after this pass.
    """

    def __init__(self, config: RotationConfig = RotationConfig()) -> None:
        super().__init__()
        self.config = config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if ROTATION_KEY in model.meta or ROTATION_KEY in model.metadata_props:
            logger.info("fold-rotation: the model was already through fold-rotation; nothing to do")
            return ir.passes.PassResult(model, False)
        stream = _Stream(model.graph)
        try:
            stream.find()
        except _Refused as refused:
            return _refuse(model, stream.width, str(refused))
        cfg = self.config
        r, kind, construction = rotation_matrix(stream.width, cfg.mode, cfg.seed)
        original = frontend.clone(model)
        undo = _Undo()
        try:
            folded = _fold(model, stream, r, undo)
        except _Refused as refused:
            undo.run()
            return _refuse(model, stream.width, str(refused))
        tolerance = cfg.half_tolerance if folded.half else cfg.tolerance
        try:
            comparison = check_exact(original, model, gate_feeds(model, cfg.verify_feeds, cfg.seed), tolerance)
        except BaseException:
            undo.run()
            raise
        plan = RotationPlan(
            "R1", width=stream.width, kind=kind, construction=construction, seed=cfg.seed,
            readers=len(stream.readers), writers=len(stream.writers), norms=len(stream.norms),
            gammas_folded=folded.gammas, tables=len(stream.tables), biases=len(stream.biases),
            untied=tuple(folded.untied), untied_bytes=folded.untied_bytes,
            rel_error=comparison.rel_error, max_abs_error=comparison.max_abs_error,
            gate_samples=comparison.samples, matrix=r,
        )
        model.meta[ROTATION_KEY] = plan
        model.metadata_props[ROTATION_KEY] = json.dumps(plan.to_json(), sort_keys=True)
        logger.info(
            "fold-rotation: R1 (%s %s, d=%d) folded into %d readers, %d writers, %d norms (%d scales folded); "
            "%d bytes untied; gate rel error %.1e", kind, construction, stream.width, plan.readers, plan.writers,
            plan.norms, plan.gammas_folded, plan.untied_bytes, comparison.rel_error,
        )
        return ir.passes.PassResult(model, True)


def _refuse(model: ir.Model, width: int, reason: str) -> ir.passes.PassResult:
    """Records why the stream is not rotated; the model is unchanged."""
    model.meta[ROTATION_KEY] = RotationPlan("none", width=width, reason=reason)
    logger.info("fold-rotation: nothing rotated: %s", reason)
    return ir.passes.PassResult(model, False)
