"""hessc.runtime: lowering to ONNX Runtime targets, packing, sessions, calibration feeds."""

from __future__ import annotations

from hessc.runtime.sessions import Session, compare, session

__all__ = ["Session", "compare", "session"]
