"""Exchange and aggregation: versioned delta sync, the fused grouped mean, and update checks."""

import math

import numpy as np
import pytest
import torch

from flwr_dsparse.exchange import TensorVersions, Update, tensor_specs
from flwr_dsparse.plan import plan_from_selections
from flwr_dsparse.records import from_array_record, fuse_record
from flwr_dsparse.strategy.aggregate import aggregate_groups, fused_weighted_mean
from flwr_dsparse.strategy.replies import ReplyRejected, all_finite, check_update
from flwr_dsparse.units import Unit


def test_versions_send_everything_once_then_only_changes():
    versions = TensorVersions(["a", "b", "c"])
    assert versions.missing(0) == ["a", "b", "c"]
    versions.mark_held(0, versions.missing(0))
    assert versions.missing(0) == []
    versions.bump(["b"], 1)
    assert versions.missing(0) == ["b"]
    versions.mark_diverged(0, ["c"])  # trained locally: its copy matches no global version
    assert versions.missing(0) == ["b", "c"]
    versions.forget(0)
    assert versions.missing(0) == ["a", "b", "c"]
    again = TensorVersions.from_dict(versions.to_dict())
    assert again.current == versions.current and again.held == versions.held


def test_fused_mean_equals_hand_computation_bitwise():
    gen = torch.Generator().manual_seed(0)
    names = ["w", "b", "n"]
    updates = []
    for device, examples in ((0, 3), (2, 5), (5, 11)):
        tensors = {
            "w": torch.randn(4, 3, generator=gen),
            "b": torch.randn(4, generator=gen),
            "n": torch.tensor(10 + device, dtype=torch.int64),
        }
        updates.append(Update(device, examples, tensors))
    out = fused_weighted_mean(names, updates)
    total = 3 + 5 + 11
    for name in names:
        acc = np.zeros(updates[0].tensors[name].shape, dtype=np.float64)
        for update in updates:
            acc = acc + update.tensors[name].numpy().astype(np.float64) * (update.examples / total)
        like = updates[0].tensors[name]
        expected = acc.astype(np.float32) if like.dtype.is_floating_point else np.round(acc).astype(np.int64)
        assert out[name].dtype == like.dtype
        assert np.array_equal(out[name].numpy(), expected), name


def test_fused_mean_of_decoded_fused_replies_equals_hand_computation():
    # Replies arrive as fused records, decoded to views of the fused array's buffer of each dtype; fuse copies each
    # run of back-to-back views at once. Names in an order that breaks the runs, plus one tensor
    # that is not a view (non-contiguous), must give exactly the per-tensor result.
    gen = torch.Generator().manual_seed(1)
    names = ["c", "a", "b", "n", "t"]
    updates, expected = [], {name: 0.0 for name in names}
    total = 4 + 9
    for device, examples in ((1, 4), (3, 9)):
        sent = {
            "a": torch.randn(3, 4, generator=gen),
            "b": torch.randn(5, generator=gen),
            "c": torch.randn(2, 3, generator=gen),
            "n": torch.tensor(7 + device, dtype=torch.int64),
        }
        tensors = from_array_record(fuse_record(sent), writable=False)
        tensors["t"] = torch.randn(3, 2, generator=gen).t()  # not contiguous
        updates.append(Update(device, examples, tensors))
        for name in names:
            expected[name] = expected[name] + tensors[name].numpy().astype(np.float64) * (examples / total)
    out = fused_weighted_mean(names, updates)
    for name in names:
        like = updates[0].tensors[name]
        want = expected[name].astype(np.float32) if like.dtype.is_floating_point else np.round(expected[name])
        assert out[name].dtype == like.dtype and tuple(out[name].shape) == tuple(like.shape)
        assert np.array_equal(out[name].numpy(), want.astype(out[name].numpy().dtype)), name


def test_single_member_mean_is_bit_identical():
    tensors = {"w": torch.randn(7, 5)}
    out = fused_weighted_mean(["w"], [Update(3, 17, tensors)])
    assert torch.equal(out["w"], tensors["w"])


def test_aggregate_groups_leaves_groups_without_replies_out():
    units = [Unit(i, f"u{i}", (f"u{i}.w",), (), 1) for i in range(3)]
    plan = plan_from_selections(units, {0: ["u0", "u1"], 1: ["u1"], 2: ["u2"]}, {f"u{i}.w": 4 for i in range(3)})
    updates = {
        0: Update(0, 1, {"u0.w": torch.tensor([1.0]), "u1.w": torch.tensor([2.0])}),
        1: Update(1, 3, {"u1.w": torch.tensor([6.0])}),
    }
    new = aggregate_groups(plan.groups, updates)
    assert set(new) == {"u0.w", "u1.w"}  # device 2 did not reply: u2 untouched
    assert new["u0.w"].item() == 1.0
    assert new["u1.w"].item() == 2.0 * 0.25 + 6.0 * 0.75


@pytest.fixture
def expected():
    return tensor_specs({"a.w": torch.zeros(2, 3), "a.n": torch.zeros((), dtype=torch.int64)})


def _good():
    return {"a.w": torch.ones(2, 3), "a.n": torch.tensor(1)}


def test_check_update_accepts_a_good_reply(expected):
    update = check_update(1, _good(), 32, expected)
    assert update.examples == 32 and set(update.tensors) == {"a.w", "a.n"}


@pytest.mark.parametrize(
    "mutate, examples, kind",
    [
        (lambda t: t.update({"b.w": torch.ones(1)}), 32, "unexpected-tensors"),
        (lambda t: t.pop("a.n"), 32, "missing-tensors"),
        (lambda t: t.update({"a.w": torch.ones(3, 2)}), 32, "shape"),
        (lambda t: t.update({"a.w": torch.ones(2, 3, dtype=torch.float64)}), 32, "dtype"),
        (lambda t: t["a.w"].__setitem__((0, 0), float("nan")), 32, "non-finite"),
        (lambda t: t["a.w"].__setitem__((1, 2), float("inf")), 32, "non-finite"),
        (lambda t: None, 0, "examples"),
        (lambda t: None, 2.5, "examples"),
        (lambda t: None, True, "examples"),
    ],
)
def test_check_update_rejects(expected, mutate, examples, kind):
    tensors = _good()
    mutate(tensors)
    with pytest.raises(ReplyRejected) as info:
        check_update(4, tensors, examples, expected)
    assert info.value.kind == kind
    assert "device 4" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_check_is_exact_where_the_fast_sum_overflows(dtype):
    """Finite values whose sum overflows are still finite; one NaN or Inf is caught in any dtype."""
    huge = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(huge) and math.isinf(huge.sum().item())
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = torch.zeros(1000, dtype=dtype)
        tensor[417] = bad
        assert not all_finite(tensor), (dtype, bad)
    assert all_finite(torch.tensor([], dtype=dtype)) and all_finite(torch.arange(5))
