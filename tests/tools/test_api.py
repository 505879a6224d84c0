"""Tests for hessc.api: optimize (plan record, verification, determinism), save, check_output_path."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import builders as b
import hessc
from hessc import api
from hessc.errors import InputError
from hessc.ir import frontend, meta
from hessc.runtime import targets

torch = pytest.importorskip("torch")

WEIGHTS = {"0.weight": (64, 64), "2.weight": (32, 64)}  # torch's (out, in) Linear weights
ENTRY_KEYS = {"name", "op", "shape", "bits", "group_size", "symmetric", "bytes"}
SUMMARY_KEYS = {"bytes_before", "bytes_after", "effective_bits_per_weight", "target", "hessc_version"}


@pytest.fixture(scope="module")
def torch_mlp():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    return module, (torch.randn(2, 64),)


@pytest.fixture(scope="module")
def exported(torch_mlp) -> ir.Model:
    """The torch MLP exported once; optimize copies an ``onnx_ir.Model`` before changing it."""
    module, example = torch_mlp
    return frontend.load(module, example)


def _expected_bytes(shape, bits: int, group: int, symmetric: bool, scale_bytes: int = 4) -> int:
    out, n_in = shape
    groups = out * math.ceil(n_in / group)
    zp = 0 if symmetric else math.ceil(groups * bits / 8)
    return math.ceil(out * n_in * bits / 8) + groups * scale_bytes + zp


@pytest.mark.torch
def test_optimize_a_torch_module(torch_mlp, tmp_path) -> None:
    module, example = torch_mlp
    model = hessc.optimize(module, target="cpu", bits=4, example_inputs=example)
    record = meta.read_plan(model)
    assert [e["name"] for e in record["weights"]] == sorted(WEIGHTS)
    assert record["verification"]["status"] == "passed"
    path = hessc.save(model, tmp_path / "q.onnx")
    sess = hessc.runtime.session(path, target="cpu")
    x = example[0].numpy()
    (y,) = sess.run({sess.input_names[0]: x})
    with torch.no_grad():
        ref = module(example[0]).numpy()
    # 4-bit RTN of two small layers: a few per cent, as the record says.
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel < 0.2
    assert record["verification"]["vs_float"]["rel_error"] < 0.2


@pytest.mark.torch
@pytest.mark.parametrize(
    "target, bits",
    [("onnx", 2), ("onnx", 4), ("onnx", 8), ("cpu", 2), ("cpu", 4), ("cpu", 8)],
)
def test_plan_record(exported, target: str, bits: int) -> None:
    model = hessc.optimize(exported, target=target, bits=bits, group_size=32)
    record = meta.read_plan(model)
    entries = {e["name"]: e for e in record["weights"]}
    assert set(entries) == set(WEIGHTS)
    for name, shape in WEIGHTS.items():
        entry = entries[name]
        assert ENTRY_KEYS <= set(entry)
        assert (entry["op"], entry["shape"], entry["bits"], entry["group_size"], entry["symmetric"]) == (
            "Gemm", list(shape), bits, 32, False
        )
        assert entry["bytes"] == _expected_bytes(shape, bits, 32, False)
    summary = record["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["target"] == target and summary["hessc_version"] == hessc.__version__
    assert summary["bytes_before"] == 4 * (64 * 64 + 64 + 32 * 64 + 32)
    # bits + 32-bit scale per 32 weights + a bits-wide zero point per 32 weights; MatMulNBits packs
    # each row's zero points into whole bytes (K = 64: two 2-bit zero points take one byte).
    zp_bits = 8 / 64 if (target, bits) == ("cpu", 2) else bits / 32
    assert summary["effective_bits_per_weight"] == pytest.approx(bits + 32 / 32 + zp_bits)

    ops = [n.op_type for n in model.graph]
    assert [(p["name"], p["modified"]) for p in record["passes"] if p["name"] != "tune-kernels"] == [
        ("upgrade-opset", True), ("plan-quantization", True), ("insert-qdq", True),
        *([("fuse-attention", False), ("fuse-norms", False)] if target in ("cpu", "cuda") else []),
        (f"lower-{target}", target == "cpu"), *([("fuse-siblings", False)] if target == "cpu" else []),
        ("verify-in-ort", False),
    ]
    assert ("tune-kernels" in [p["name"] for p in record["passes"]]) == (target == "cpu")
    verification = record["verification"]
    assert verification["status"] == "passed" and verification["vs_float"]["samples"] == 2
    (per_output,) = verification["vs_float_outputs"]  # the MLP has one output
    assert per_output["rel_error"] == pytest.approx(verification["vs_float"]["rel_error"])
    if target == "cpu":
        assert record["lowering"] == {f"MatMulNBits {bits}-bit": 2}
        assert ops == ["MatMulNBits", "Relu", "MatMulNBits"]
        tolerance = targets.TARGETS["cpu"].tolerance
        assert verification["vs_portable"]["rel_error"] <= tolerance
        (lowered,) = verification["vs_portable_outputs"]
        assert lowered["name"] == per_output["name"] and lowered["rel_error"] <= tolerance
        assert verification["lowered_ops"] == "checked end to end" or not verification["lowered_ops"]["failed"]
    else:
        assert record["lowering"] == {}
        assert ops == ["DequantizeLinear", "Gemm", "Relu", "DequantizeLinear", "Gemm"]
        assert verification["vs_portable"].startswith("skipped: the model was not lowered")
        assert "vs_portable_outputs" not in verification and "lowered_ops" not in verification
    # Entry bytes are the portable form's; the summary is what the saved model stores: quantized
    # weights plus float biases, plus MatMulNBits' per-row byte padding of 2-bit zero points
    # (two zero points per row take 4 bits, stored as a whole byte: +0.5 B per output row).
    biases = 4 * (64 + 32)
    padding = (64 + 32) // 2 if (target, bits) == ("cpu", 2) else 0
    assert summary["bytes_after"] == sum(e["bytes"] for e in entries.values()) + biases + padding


@pytest.mark.torch
def test_effective_bits_by_hand(exported) -> None:
    """4-bit, group 32, asymmetric, fp32 scales: 4 + 32/32 + 4/32 = 5.125 bits per weight."""
    record = meta.read_plan(hessc.optimize(exported, target="onnx", bits=4, group_size=32))
    # 0.weight: 4096 codes · 4 bits = 2048 B, 128 groups · 4 B = 512 B, 128 zero points · 4 bits = 64 B
    assert {e["name"]: e["bytes"] for e in record["weights"]} == {"0.weight": 2624, "2.weight": 1312}
    assert record["summary"]["effective_bits_per_weight"] == 5.125
    sym = meta.read_plan(hessc.optimize(exported, target="onnx", bits=4, group_size=64, symmetric=True))
    assert sym["summary"]["effective_bits_per_weight"] == 4.5  # 4 + 32/64, no zero points


@pytest.mark.torch
def test_optimize_does_not_change_the_callers_model(exported) -> None:
    before = b.to_bytes(exported)
    hessc.optimize(exported, target="cpu", bits=4)
    assert b.to_bytes(exported) == before


@pytest.mark.torch
@pytest.mark.parametrize("target", ["onnx", "cpu"])
def test_optimize_is_deterministic(exported, target: str) -> None:
    first = hessc.optimize(exported, target=target, bits=4)
    second = hessc.optimize(exported, target=target, bits=4)
    assert ir.to_proto(first).SerializeToString() == ir.to_proto(second).SerializeToString()
    assert set(first.meta[meta.TIMINGS_KEY]) >= {"plan-quantization", "insert-qdq", "total"}


@pytest.mark.torch
def test_two_runs_save_identical_bytes(exported, tmp_path, monkeypatch) -> None:
    saved = []
    for i, tick in enumerate((0.25, 0.5)):  # the second run is slower, as real runs can be
        clock = itertools.count(0.0, tick)
        monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
        model = hessc.optimize(exported, target="cpu", bits=4)
        saved.append(hessc.save(model, tmp_path / f"run{i}.onnx").read_bytes())
    assert saved[0] == saved[1]


@pytest.mark.torch
def test_calibration_with_wrong_input_names_is_an_input_error(exported) -> None:
    bad = [{"not_the_input": np.zeros((2, 64), np.float32)}]
    with pytest.raises(InputError, match=r"has inputs \['not_the_input'\] but the model expects \['input'\]"):
        hessc.optimize(exported, target="cpu", calibration=bad)


@pytest.mark.torch
def test_calibration_is_used_for_verification(exported) -> None:
    feeds = [{"input": np.random.default_rng(i).standard_normal((2, 64)).astype(np.float32)} for i in range(3)]
    record = meta.read_plan(hessc.optimize(exported, target="cpu", calibration=feeds))
    assert record["verification"]["vs_float"]["samples"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [({"target": "tpu"}, "unknown target 'tpu'"), ({"bits": 5}, "--bits 5"), ({"group_size": 24}, "--group-size 24"),
     ({"method": "awq"}, "unknown method")],
)
def test_bad_options_are_input_errors(kwargs, message) -> None:
    with pytest.raises(InputError, match=message):
        hessc.optimize(b.mlp_model(), **kwargs)


def test_plan_record_of_an_opset_17_model(tmp_path) -> None:
    path = tmp_path / "m17.onnx"
    onnx.save(b.mlp_model(opset=17), path)
    record = meta.read_plan(hessc.optimize(path, target="cpu", bits=4))
    assert [e["name"] for e in record["weights"]] == ["W1", "W2"]
    assert record["summary"]["effective_bits_per_weight"] == 5.125


# ---------------------------------------------------------------------------------- save


def _quantized(target: str = "onnx") -> ir.Model:
    return hessc.optimize(b.mlp_model(), target=target, bits=4)


def test_save_and_reload_passes_the_full_checker(tmp_path) -> None:
    model = _quantized()
    path = api.save(model, tmp_path / "sub" / "q.onnx")
    assert path == tmp_path / "sub" / "q.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert meta.read_plan(ir.load(path)) == meta.read_plan(model)
    feed = b.x_feed(64)
    np.testing.assert_array_equal(b.run_ort(str(path), feed)[0], b.run_ort(model, feed)[0])
    assert sorted(p.name for p in path.parent.iterdir()) == ["q.onnx"]


def test_save_with_external_data_writes_the_data_file_and_reloads(tmp_path) -> None:
    model = _quantized("cpu")
    feed = b.x_feed(64)
    (expected,) = b.run_ort(model, feed)
    path = api.save(model, tmp_path / "q.onnx", external_data=True)
    data = tmp_path / "q.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert data.stat().st_size > 0
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    np.testing.assert_array_equal(b.run_ort(str(path), feed)[0], expected)
    # The in-memory model does not point into the (deleted) temporary directory.
    np.testing.assert_array_equal(b.run_ort(model, feed)[0], expected)


def test_saving_a_model_loaded_with_external_data_elsewhere_gives_a_file_that_opens(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ir.save(b.load(b.mlp_model()), src / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    loaded = frontend.load(src / "m.onnx")
    feed = b.x_feed(64)
    (expected,) = b.run_ort(str(src / "m.onnx"), feed)
    out = tmp_path / "out"
    # Default: the weights go beside the new file, not a reference to src/m.onnx.data.
    default = api.save(loaded, out / "a.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "a.onnx.data"]
    np.testing.assert_array_equal(b.run_ort(str(default), feed)[0], expected)
    # external_data=False: one self-contained file.
    single = api.save(loaded, out / "b.onnx", external_data=False)
    assert not (out / "b.onnx.data").exists()
    proto = onnx.load(str(single), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    np.testing.assert_array_equal(b.run_ort(str(single), feed)[0], expected)


def test_failed_save_leaves_no_partial_file_and_no_temp_dir(tmp_path, monkeypatch) -> None:
    model = _quantized()
    target = tmp_path / "q.onnx"
    target.write_bytes(b"previous result")

    def broken_save(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a mod")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    for external_data in (False, True):
        with pytest.raises(OSError, match="disk full"):
            api.save(model, target, external_data=external_data)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
        assert target.read_bytes() == b"previous result"


def test_save_to_a_directory_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        api.save(_quantized(), tmp_path)


# ---------------------------------------------------------------------------------- output path


def test_check_output_path_refuses_to_overwrite_the_input(tmp_path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(b.mlp_model(), src)
    for output in (src, str(src), tmp_path / "x" / ".." / "in.onnx", tmp_path / "in.onnx.data"):
        with pytest.raises(InputError, match="would overwrite the input model"):
            api.check_output_path(src, output)
    api.check_output_path(src, tmp_path / "out.onnx")
    api.check_output_path(None, src)


# ------------------------------------------------------------------------ tied tables and heads


def _tied_decoder(tied: str = "transpose") -> onnx.ModelProto:
    return b.decoder_model(width=64, vocab=96, hidden=64, tied=tied)


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    """The bytes of the float model's initializers that some node reads (each once)."""
    read = {name for node in proto.graph.node for name in node.input}
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer if t.name in read)


def _table_names(plan: meta.QuantPlan, target: str) -> set[str]:
    zp = set() if plan.symmetric else {"zp"}
    if target == "onnx":
        return {f"E_{s}" for s in {"q", "scale"} | zp}
    codes = {"lows", "highs"} if plan.bits == 3 else {"B"}
    return {f"E_nbits_{s}" for s in codes | {"scales"} | zp}


@pytest.mark.parametrize("bits", [4, 3.5], ids=["4-bit", "budget-3.5"])
@pytest.mark.parametrize("target", ["onnx", "cpu"])
def test_a_tied_decoder_stores_its_table_once(tmp_path, target: str, bits) -> None:
    """``Gather(E) … MatMul(h, Transpose(E))``: the saved file holds the table's codes, scales and
    zero points once, the summary counts the float table once, and the lowered model computes
    what its portable form computes."""
    from hessc.passes import quantize
    from hessc.runtime import lower, sessions

    proto = _tied_decoder()
    feeds = [b.ids_feed(96, (2, 16), seed=s) for s in range(8)]
    # Bit widths only: at 3.5 bits every item of this random 64-wide decoder is beyond the trust
    # radius, and a low-rank item the budget forces in leaves its loss 1.5 nats up on cpu.
    model = hessc.optimize(proto, target=target, bits=bits, group_size=32, calibration=feeds, low_rank=False)
    record = meta.read_plan(model)
    summary = record["summary"]
    assert summary["bytes_before"] == _initializer_bytes(proto), "the float table counted once"
    (entry,) = [e for e in record["weights"] if e["name"] == "E"]
    assert entry["tied"] == {"table": "E", "uses": ["Gather", "MatMul"], "copies": ["E_T"], "measured": "MatMul"}
    plan = meta.QuantPlan("E", "MatMul", (64, 96), entry["bits"], 32, False, entry["method"], (96, 64))

    path = hessc.save(model, tmp_path / "tied.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    saved = ir.load(path)
    sizes = {name: v.const_value.nbytes for name, v in saved.graph.initializers.items()}
    assert sum(sizes.values()) == summary["bytes_after"]
    table = {name for name in sizes if name.startswith("E")}
    assert table == _table_names(plan, target), "the table's quantized bytes once, no float copy"
    assert sum(sizes[n] for n in table) == quantize.stored_bytes(plan, 4, kernel_layout=target == "cpu")
    stored, numel = lower.quantized_storage(saved)
    assert numel == 6 * 64 * 64 + 96 * 64, "every weight's elements once"
    assert summary["effective_bits_per_weight"] == pytest.approx(8 * stored / numel, abs=1e-4)
    if isinstance(bits, float):
        allocation = record["allocation"]
        (allocated,) = [w for w in allocation["weights"] if w["name"] == "E"]
        assert "the Gather use is not measured" in allocated["tied"]["note"]
        assert "outside_budget" not in allocation, "the tied table is in the budget"
        assert summary["allocated_effective_bits"] <= 3.5
        assert summary["planned_effective_bits"] == summary["allocated_effective_bits"]

    graph = saved.graph
    if target == "onnx":  # one DequantizeLinear, read by the lookup and (transposed) by the head
        (dq,) = [n for n in graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "E_q"]
        assert sorted(u.node.op_type for u in dq.outputs[0].uses()) == ["Gather", "Transpose"]
        return
    assert record["verification"]["vs_portable"]["rel_error"] <= targets.get("cpu").tolerance
    (head,) = [n for n in graph if n.op_type == "MatMulNBits" and n.outputs[0].name == "logits"]
    (embed,) = [n for n in graph if n.op_type == "GatherBlockQuantized"]
    codes = {v.name for v in lower._stored_sources(head.inputs[1])}
    assert {v.name for v in lower._stored_sources(embed.inputs[0])} == codes, "the lookup reads the head's codes"
    portable = model.meta[lower.PORTABLE_KEY]
    lowered = sessions.session(str(path), "cpu")
    reference = sessions.session(portable, "cpu", optimize=False)
    for feed in feeds[:2]:
        (got,), (want,) = lowered.run(feed), reference.run(feed)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= targets.get("cpu").tolerance


def test_an_untied_decoder_keeps_its_table_and_head_apart() -> None:
    proto = b.decoder_model(width=64, vocab=96, hidden=64)
    model = hessc.optimize(proto, target="cpu", bits=4, group_size=32)
    record = meta.read_plan(model)
    assert record["summary"]["bytes_before"] == _initializer_bytes(proto)
    assert record["lowering"] == {"GatherBlockQuantized 4-bit": 1, "MatMulNBits 4-bit": 7}
    assert not any("tied" in e for e in record["weights"])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("group", [32, 64, 128], ids=["18-blocks", "9-blocks", "4.5-blocks"])
def test_a_tied_table_on_cuda_is_stored_once_and_verified(bits: int, group: int) -> None:
    """SmolLM2's table width (576) at three group sizes: whole, odd (zero points packed per row
    differ from the CUDA kernel's whole-table packing: the lookup reads a float table dequantized
    from the same bytes) and partial blocks (rows padded to whole blocks, sliced back)."""
    from hessc.runtime import sessions

    if not sessions.cuda_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    proto = b.decoder_model(width=576, vocab=2000, hidden=64, blocks=1, tied="transpose")
    feeds = [b.ids_feed(2000, (1, 128), seed=s) for s in range(2)]
    out = hessc.optimize(proto, target="cuda", bits=bits, group_size=group, calibration=feeds,
                         input_shapes={"ids": [1, 128]})
    record = meta.read_plan(out)
    assert record["verification"]["status"] == "passed"
    assert record["verification"]["vs_portable"]["rel_error"] < targets.get("cuda").tolerance
    (key,) = [k for k in record["lowering"] if k.startswith("tied table stored once")]
    blocks = -(-576 // group)
    assert ("float table" in key) == ((blocks * bits) % 8 != 0)
