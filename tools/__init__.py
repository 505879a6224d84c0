"""hessc: a curvature-guided compiler for neural-network compression to ONNX.

    import hessc
    model = hessc.optimize("model.onnx", target="cpu", bits=4, calibration="data.npz")
    hessc.save(model, "model.q4.onnx")
    sess = hessc.runtime.session("model.q4.onnx", target="cpu")
"""

from __future__ import annotations

__version__ = "0.1.0"

from hessc import runtime  # noqa: E402
from hessc.api import optimize, save  # noqa: E402
from hessc.errors import HesscError, InputError, UnsupportedError, VerificationError  # noqa: E402
from hessc.ir.frontend import load  # noqa: E402

__all__ = [
    "HesscError", "InputError", "UnsupportedError", "VerificationError",
    "load", "optimize", "runtime", "save", "__version__",
]
