"""hessc: a curvature-guided compiler for neural-network compression to ONNX.

    import hessc
    model = hessc.optimize("model.onnx", target="cpu", bits=4, calibration="data.npz")
    hessc.save(model, "model.q4.onnx")
    sess = hessc.runtime.session("model.q4.onnx", target="cpu")

``import hessc`` loads nothing heavy: the names below are imported on first use (onnx_ir and
ONNX Runtime on ``optimize``/``load``; torch only where curvature, GPTQ or a torch model needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from hessc.errors import HesscError, InputError, UnsupportedError, VerificationError  # noqa: E402

_LAZY = {
    "optimize": ("hessc.api", "optimize"),
    "save": ("hessc.api", "save"),
    "load": ("hessc.ir.frontend", "load"),
    "runtime": ("hessc.runtime", None),
}

__all__ = [
    "HesscError", "InputError", "UnsupportedError", "VerificationError",
    "load", "optimize", "runtime", "save", "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hessc' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
