"""Shared fixtures: a pass runner that verifies the IR before and after every pass under test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import onnx_ir as ir
import pytest

# tests/builders.py is the one shared helper module; make it importable as ``builders``.
sys.path.insert(0, str(Path(__file__).parent))

from hessc.ir import verify  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "torch: needs PyTorch (exports a torch module with dynamo=True)")


@pytest.fixture
def run_pass() -> Callable[[ir.passes.PassBase, ir.Model], ir.passes.PassResult]:
    """Runs a pass on a model, verifying the IR before and after it."""

    def run(p: ir.passes.PassBase, model: ir.Model) -> ir.passes.PassResult:
        verify.verify_model(model, after="(before the pass under test)")
        result = p(model)
        verify.verify_model(result.model, after=type(p).__name__)
        return result

    return run


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """A tiny random-weight Llama through onnxruntime-genai's builder: its genai folder (built once)."""
    import builders

    return builders.tiny_genai_decoder(tmp_path_factory.mktemp("tiny-decoder"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama's ``save_pretrained`` folder (with its tokenizer)."""
    import builders

    return builders.tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
