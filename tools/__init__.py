"""hessc: a curvature-guided compiler for neural-network compression to ONNX."""

from __future__ import annotations

__version__ = "0.1.0"
