"""The zoo of graph forms (``hessc bench --model forms``) at small sizes: every form is compressed
on the CPU and on the portable target and verified in ONNX Runtime (its speed is the benchmark's)."""

from __future__ import annotations

import pytest

from hessc.bench import forms

SMALL = {
    "constant-weight": lambda: forms.constant_weight(128), "if-branches": lambda: forms.if_branches(128),
    "loop-body": lambda: forms.loop_body(128), "scalar-input": lambda: forms.scalar_input(128),
    "depthwise-conv": lambda: forms.depthwise_conv(64, 8), "grouped-conv": lambda: forms.grouped_conv(64, 8),
    "conv-transpose": lambda: forms.transposed_conv(64, 6),
    "lstm": lambda: forms._recurrent("LSTM", 4, 32, 16, 6), "gru": lambda: forms._recurrent("GRU", 3, 32, 16, 6),
}
FLOAT_ON_CPU = {"gru": "no int8 kernel", "conv-transpose": "no int8 ConvTranspose kernel"}


def test_every_form_has_a_small_build() -> None:
    assert set(SMALL) == set(forms.FORMS)


@pytest.mark.parametrize("target", ["cpu", "onnx"])
@pytest.mark.parametrize("name", list(forms.FORMS))
def test_each_form_is_compressed_and_verified(name, target, tmp_path) -> None:
    row = forms.compile_form(name, tmp_path, target, built=SMALL[name]())
    assert row["verification"] == "passed"
    assert row["quantized_weights"] >= 1
    if target == "cpu" and name in FLOAT_ON_CPU:  # its main weight kept float on the CPU, with the reason
        assert any(FLOAT_ON_CPU[name] in why for why in row["kept_float"].values())
    else:
        assert row["file_bytes"] < 0.5 * row["float_bytes"]
