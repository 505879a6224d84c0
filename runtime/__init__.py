"""hessc.runtime: targets, lowering to ONNX Runtime, packing, sessions, calibration feeds, verification.

``Session``, ``compare`` and ``session`` (from :mod:`hessc.runtime.sessions`) are imported on
first use, so that reading the target records costs no onnx import.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Session", "compare", "session"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'hessc.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module("hessc.runtime.sessions"), name)
    globals()[name] = value
    return value
