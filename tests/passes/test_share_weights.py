"""Tests for hessc.passes.share_weights: roles from the graph, the greedy colouring (non-adjacent
merges allowed), one shared basis initializer per colour, run in ONNX Runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import builders as b
from hessc.errors import InputError
from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.passes import share_weights
from hessc.passes.share_weights import ShareConfig, ShareWeightsPass


@dataclasses.dataclass(frozen=True, eq=False)
class Stats:
    """Synthetic curvature statistics with the ``HessianStats`` field names."""

    a: np.ndarray | None = None
    g: np.ndarray | None = None
    grad: np.ndarray | None = None

    def projected(self, basis):
        b_ = np.asarray(basis)
        return dataclasses.replace(self, a=b_ @ self.a @ b_.T, grad=None if self.grad is None else self.grad @ b_.T)


def _chain(weights: list[np.ndarray]):
    """``x → W0 → relu → W1 → relu → …``: every weight after the first reads a Relu of a MatMul,
    so those share one role."""
    nodes, inits, prev = [], {}, "x"
    for i, w in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        out = "y" if i == len(weights) - 1 else f"r{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [out], name=f"relu{i}"))
        else:
            nodes[-1].output[0] = "y"
        inits[f"W{i}"] = np.ascontiguousarray(w.T)
        prev = out
    return b.make_model(nodes, [b.x_input(weights[0].shape[1])], [b.y_output(weights[-1].shape[0])], inits)


def _low_rank(n: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(rank * n)).astype(np.float32)


def _annotated(proto, n: int = 64):
    model = b.load(proto)
    rng = np.random.default_rng(0)
    for ref in qweights.iter_weights(model):
        x = rng.standard_normal((4096, n))
        ref.value.meta[meta.HESSIAN_KEY] = Stats(a=x.T @ x / len(x), g=np.eye(n))
    return model


def _weights():
    """W1 and W3 nearly equal (not adjacent), of rank 28: above the rank 22 a layer keeps alone at
    a 30% reduction, within the 29 two layers sharing a basis keep; W2 and W4 of rank 16."""
    w1 = _low_rank(64, 28, 1)
    noise = np.random.default_rng(9).standard_normal((64, 64)).astype(np.float32) * 1e-4
    return [_low_rank(64, 24, 0), w1, _low_rank(64, 16, 2), w1 + noise, _low_rank(64, 16, 3)]


def test_roles_come_from_the_graph() -> None:
    model = _annotated(_chain(_weights()))
    (role,) = share_weights.roles(model)
    assert [r.name for r in role] == ["W1", "W2", "W3", "W4"]  # W0 reads the graph input: another place


def test_two_non_adjacent_near_equal_layers_share_one_basis_stored_once(run_pass) -> None:
    proto = _chain(_weights())
    model = _annotated(proto)
    result = run_pass(ShareWeightsPass(ShareConfig(reduction=0.3)), model)
    assert result.modified
    record = model.meta[share_weights.SHARE_KEY]
    colours = record["roles"][0]["colours"]
    shared = [c for c in colours if len(c["layers"]) > 1]
    assert [c["layers"] for c in shared] == [["W1", "W3"]]
    assert record["params_after"] <= 0.7 * record["params_before"] + 64 * 3  # the asked share, up to rounding
    basis = model.graph.initializers[shared[0]["basis"]]
    readers = sorted(u.node.name for u in basis.uses())
    assert readers == ["W1_sh_in", "W3_sh_in"]  # one initializer read by both layers
    for name in ("W1", "W2", "W3", "W4"):
        assert name not in model.graph.initializers
    x = np.random.default_rng(4).standard_normal((256, 64)).astype(np.float32)
    got, want = b.run_ort(model, {"x": x})[0], b.run_ort(b.load(proto), {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
    # Stored once in the file as well: one tensor of that name, and the bytes of a single copy.
    saved = ir.from_proto(ir.to_proto(model))
    assert sum(1 for n in saved.graph.initializers if n == shared[0]["basis"]) == 1


def test_adjacent_only_cannot_pair_them_and_predicts_worse(run_pass) -> None:
    free = _annotated(_chain(_weights()))
    run_pass(ShareWeightsPass(ShareConfig(reduction=0.3)), free)
    adjacent = _annotated(_chain(_weights()))
    run_pass(ShareWeightsPass(ShareConfig(reduction=0.3, adjacent_only=True)), adjacent)
    colours = adjacent.meta[share_weights.SHARE_KEY]["roles"][0]["colours"]
    assert all(len(c["layers"]) == 1 or _consecutive(c["layers"]) for c in colours)
    assert (free.meta[share_weights.SHARE_KEY]["predicted_delta_loss"]
            < adjacent.meta[share_weights.SHARE_KEY]["predicted_delta_loss"])


def _consecutive(names: list[str]) -> bool:
    idx = sorted(int(n[1:]) for n in names)
    return idx == list(range(idx[0], idx[0] + len(idx)))


def test_the_coefficients_carry_projected_statistics(run_pass) -> None:
    model = _annotated(_chain(_weights()))
    run_pass(ShareWeightsPass(ShareConfig(reduction=0.3)), model)
    coeff = model.graph.initializers["W1_sh_coeff"]
    stats = coeff.meta[meta.HESSIAN_KEY]
    rank = coeff.const_value.shape[0]
    assert stats.a.shape == (rank, rank)


def test_bad_options_and_missing_statistics_are_refused() -> None:
    with pytest.raises(InputError, match="between 0 and 1"):
        ShareConfig(reduction=1.2)
    with pytest.raises(ir.passes.PreconditionError, match="annotate-hessian"):
        ShareWeightsPass(ShareConfig())(b.load(_chain(_weights())))


@pytest.mark.parametrize("target", ["onnx", "cpu"])
def test_optimize_shares_then_quantizes_the_basis_once(target: str) -> None:
    """``share=0.3`` then 4-bit codes: the shared basis is quantized and stored once (one set of
    codes read by both layers), the plan records the colours, effective bits count the layers
    the colours replaced, and the result passes verification."""
    import hessc
    from hessc.runtime import lower

    proto = _chain(_weights())
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((64, 64)).astype(np.float32)} for _ in range(8)]
    out = hessc.optimize(proto, target=target, bits=4, calibration=feeds, share=0.3)
    record = meta.read_plan(out)
    assert record["verification"]["status"].startswith("passed")
    shared = [c for r in record["sharing"]["roles"] for c in r["colours"] if len(c["layers"]) > 1]
    assert [c["layers"] for c in shared] == [["W1", "W3"]]
    names = {w["name"] for w in record["weights"]}
    assert shared[0]["basis"] in names and "W1.coefficients" in names
    stored, numel = lower.quantized_storage(out)
    sharing = record["sharing"]
    assert numel == 64 * 64 + sharing["params_after"]  # W0 and the colours' bases and coefficients
    assert record["summary"]["effective_bits_per_weight"] == pytest.approx(
        8 * stored / (numel + sharing["params_before"] - sharing["params_after"]), abs=1e-4)
