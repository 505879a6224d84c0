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

Layout (one topic per module):
    * :mod:`~hessc.ir.executor.registry`: the operator registry (``register_op``, ``lookup_op``,
      ``supported_ops``) and operator domains.
    * :mod:`~hessc.ir.executor.core`: :class:`TorchExecutor`, :class:`OpContext`, the compiled
      steps, subgraphs, and ONNX → torch dtype / tensor conversion.
    * :mod:`~hessc.ir.executor.coverage`: which operators a model uses and supports, and the
      deviation of the executor from ONNX Runtime.
    * the operator library, by family: ``ops_math`` (elementwise, linear algebra, reductions),
      ``ops_tensor`` (types, shapes, indexing, constants), ``ops_nn`` (activations, softmax,
      normalization, convolution, pooling), ``ops_recurrent`` (LSTM, GRU, RNN), ``ops_control`` (If, Loop), ``ops_quant`` (Q/DQ,
      MatMulNBits, GatherBlockQuantized), ``ops_attention`` (GroupQueryAttention, RotaryEmbedding)
      and ``ops_contrib`` (the other com.microsoft fused ops). Importing
      this package imports them all, which registers every operator.
"""

from __future__ import annotations

# The operator modules register their ops when imported (the order does not matter).
from hessc.ir.executor import ops_attention  # noqa: F401
from hessc.ir.executor import ops_contrib  # noqa: F401
from hessc.ir.executor import ops_control  # noqa: F401
from hessc.ir.executor import ops_math  # noqa: F401
from hessc.ir.executor import ops_nn  # noqa: F401
from hessc.ir.executor import ops_quant  # noqa: F401
from hessc.ir.executor import ops_recurrent  # noqa: F401
from hessc.ir.executor import ops_tensor  # noqa: F401
from hessc.ir.executor.core import ExecutionError, OpContext, TorchExecutor
from hessc.ir.executor.coverage import coverage_report, max_deviation_vs_ort
from hessc.ir.executor.registry import OpFunction  # noqa: F401  (public type alias)
from hessc.ir.executor.registry import lookup_op, register_op, supported_ops

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
