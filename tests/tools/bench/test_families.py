"""Architectures exported as a user would (``hessc bench --model families``): the families whose
graphs once broke a budget's accounting compile with the file holding the bits it planned."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hessc.bench import families  # noqa: E402


@pytest.mark.torch
@pytest.mark.parametrize("name", [
    "gpt2",  # Conv1D layers: Gemm(x, W[in, out]) without transB, a tied head
    "albert-shared",  # one layer's weights read by every layer
])
def test_a_family_compiles_to_the_bits_it_planned(name, tmp_path) -> None:
    src = tmp_path / f"{name}.onnx"
    kind = families.export_family(name, src)
    row = families.compile_family(src, kind, "cpu", 3.5, samples=8)
    assert row["outcome"] == "written" and row["verification"].startswith("passed")
    assert row["bits_as_planned"] and row["effective_bits"] <= 3.5
    assert row["effective_bits"] == pytest.approx(row["planned_bits"], abs=0.02)
    # No float copy left beside a compressed weight (ALBERT's shared weights once kept one).
    assert row["bytes_ratio"] < 0.35
