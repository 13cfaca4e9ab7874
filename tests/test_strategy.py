"""DSparse strategy without a running app: exact grouped means, per-step parity, bytes, bad replies.

Messages are built directly; Flower needs a task identity for that, which a
running app would set (flwr.supercore.task_identity.TaskIdentity).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.nn import functional as F

from client.app import train_selection
from flwr_dsparse.models import build_model
from flwr_dsparse.plan import plan_from_selections
from flwr_dsparse.protocol import (
    ARRAYS,
    METRICS,
    REPORT_EXAMPLES_KEY,
    REPORT_LOSS_KEY,
    REPORT_ROUND_KEY,
    read_train_message,
)
from flwr_dsparse.records import from_array_record, tensor_nbytes, to_array_record
from flwr_dsparse.strategy import DSparse, device_tensors
from flwr_dsparse.units import model_units

NODE_OFFSET = 1000  # Flower node ids differ from device (partition) ids


IDENTITY = ("task_id", "run_id", "node_id")


def identity_or_none(name: str) -> int | None:
    """``TaskIdentity.<name>``, or None while it is unset (Flower's getter raises then)."""
    try:
        return getattr(TaskIdentity, name)
    except RuntimeError:
        return None


@pytest.fixture(autouse=True)
def task_identity():
    saved = [identity_or_none(name) for name in IDENTITY]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    for name, value in zip(IDENTITY, saved, strict=True):
        setattr(TaskIdentity, name, value)  # None restores "unset", as Flower starts a process


def make_strategy(model: nn.Module, selections: dict[int, list[str]]) -> DSparse:
    state = model.state_dict()
    plan = plan_from_selections(
        model_units(model), selections, {name: tensor_nbytes({name: t}) for name, t in state.items()}
    )
    strategy = DSparse(plan_fn=lambda reports, global_tensors: plan, train_config={"lr": 0.1})
    strategy.set_plan(plan, {NODE_OFFSET + device: device for device in selections})
    return strategy


def by_device(messages) -> dict[int, Message]:
    return {message.metadata.dst_node_id - NODE_OFFSET: message for message in messages}


def reply(message: Message, tensors: dict, examples: int, server_round: int, **metrics) -> Message:
    figures = {REPORT_EXAMPLES_KEY: examples, REPORT_ROUND_KEY: server_round, REPORT_LOSS_KEY: 1.0}
    record = MetricRecord({**figures, **metrics})
    return Message(RecordDict({ARRAYS: to_array_record(tensors), METRICS: record}), reply_to=message)


def perturbed(strategy: DSparse, device: int, global_state: dict, seed: int) -> dict[str, torch.Tensor]:
    """What a device might send back: its selected tensors, changed."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in device_tensors(strategy.plan, device):
        tensor = global_state[name]
        if tensor.dtype.is_floating_point:
            out[name] = tensor + torch.randn(tensor.shape, generator=gen)
        else:
            out[name] = tensor + 1 + seed  # e.g. BatchNorm's num_batches_tracked
    return out


TINY_SELECTIONS = {
    0: ["features.3", "features.4", "classifier"],
    1: ["features.4", "classifier"],
    2: ["features.1", "features.2", "features.3", "features.4", "classifier"],
}
EXAMPLES = {0: 10, 1: 20, 2: 45}


def check_on_arrival(strategy: DSparse, replies: list[Message], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a streaming Grid does: give each reply (with the id the LinkState gives it) to ``check_reply``.

    Then the round's end must reuse those verdicts: checking a reply again fails the test.
    """
    from flwr_dsparse.strategy import replies as replies_module

    for index, message in enumerate(replies):
        message.metadata.__dict__["_message_id"] = f"reply-{index}"
        strategy.check_reply(message)
    assert len(strategy.round.checked) == len(replies)

    def checked_twice(*args, **kwargs):
        raise AssertionError("aggregate_train checked a reply that check_reply had checked")

    monkeypatch.setattr(replies_module, "accept_train_reply", checked_twice)


@pytest.mark.parametrize("on_arrival", [False, True], ids=["checked-at-the-end", "checked-on-arrival"])
def test_grouped_aggregation_equals_hand_computation(on_arrival, monkeypatch):
    model = build_model("tiny", seed=0)
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    strategy = make_strategy(model, TINY_SELECTIONS)
    messages = by_device(strategy.configure_train(1, to_array_record(initial), ConfigRecord(), None))
    sent = {device: perturbed(strategy, device, initial, seed=device) for device in TINY_SELECTIONS}
    replies = [reply(messages[d], sent[d], EXAMPLES[d], 1) for d in (2, 0, 1)]  # arrival order must not matter
    if on_arrival:
        check_on_arrival(strategy, replies, monkeypatch)

    arrays, metrics = strategy.aggregate_train(1, replies)
    result = from_array_record(arrays)
    assert list(result) == list(initial)  # the full global model comes back

    trained_by = {name: [d for d in sorted(sent) if name in sent[d]] for name in initial}
    for name, tensor in initial.items():
        members = trained_by[name]
        if not members:
            assert torch.equal(result[name], tensor), f"{name} is trained by nobody and must be bit-identical"
            continue
        total = sum(EXAMPLES[d] for d in members)
        acc = np.zeros(tensor.shape, dtype=np.float64)
        for d in members:
            acc = acc + sent[d][name].numpy().astype(np.float64) * (EXAMPLES[d] / total)
        expected = acc.astype(np.float32) if tensor.dtype.is_floating_point else np.round(acc).astype(np.int64)
        assert result[name].dtype == tensor.dtype
        assert np.array_equal(result[name].numpy(), expected), name
    assert any(not trained_by[n] for n in initial)  # features.0 is frozen for all: the case above ran
    assert metrics["num-accepted"] == 3 and metrics["num-rejected"] == 0 and metrics["num-examples"] == 75


def test_one_round_equals_one_sgd_step_on_the_concatenated_batch():
    model = build_model("tiny_nobn", seed=0)
    all_units = [unit.name for unit in model_units(model)]
    devices = [0, 1, 2]
    strategy = make_strategy(model, {d: all_units for d in devices})
    batches = {d: (torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for d in devices}
    lr = 0.1

    initial = copy.deepcopy(model.state_dict())
    messages = by_device(strategy.configure_train(1, to_array_record(initial), ConfigRecord(), None))
    replies = []
    for device, message in messages.items():
        local = build_model("tiny_nobn", seed=None)
        local.load_state_dict(from_array_record(message.content[ARRAYS]))
        train_selection(local, all_units, [batches[device]], lr=lr, momentum=0.0)
        replies.append(reply(message, local.state_dict(), 8, 1))
    arrays, _ = strategy.aggregate_train(1, replies)

    reference = build_model("tiny_nobn", seed=None)
    reference.load_state_dict(initial)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    inputs = torch.cat([batches[d][0] for d in devices])
    targets = torch.cat([batches[d][1] for d in devices])
    F.cross_entropy(reference(inputs), targets).backward()
    optimizer.step()

    result = from_array_record(arrays)
    for name, tensor in reference.state_dict().items():
        assert not torch.equal(tensor, initial[name])
        torch.testing.assert_close(result[name], tensor, rtol=0, atol=1e-6)


def test_bytes_follow_the_delta_sync_rule():
    model = build_model("tiny", seed=0)
    state = model.state_dict()
    selections = {0: ["features.3", "features.4", "classifier"], 1: ["classifier"], 2: ["features.4", "classifier"]}
    strategy = make_strategy(model, selections)
    full = tensor_nbytes(state)

    messages = by_device(strategy.configure_train(1, to_array_record(state), ConfigRecord(), None))
    for device, message in messages.items():
        assert tensor_nbytes(from_array_record(message.content[ARRAYS])) == full  # round 1: everything, once
        assert read_train_message(message)[1].selection == ",".join(selections[device])
    sent = {d: perturbed(strategy, d, state, seed=d) for d in selections}
    arrays, _ = strategy.aggregate_train(1, [reply(messages[d], sent[d], 16, 1) for d in selections])
    round1 = strategy.history[-1]
    for device in selections:
        assert round1["devices"][str(device)]["bytes-down"] == full
        assert round1["devices"][str(device)]["bytes-up"] == tensor_nbytes(sent[device])  # upload = its selection

    messages = by_device(strategy.configure_train(2, arrays, ConfigRecord(), None))
    groups_of = {name: group.members for group in strategy.plan.groups for name in group.tensors}
    frozen = [n for n in state if n not in groups_of]
    assert frozen and all(n.startswith(("features.0", "features.1", "features.2")) for n in frozen)
    for device, message in messages.items():
        got = from_array_record(message.content[ARRAYS])
        # Changed tensors the device lacks: everything trained, except a group whose only
        # member is this device (the mean is exactly its own copy). Frozen units: never again.
        expected = [n for n in state if n in groups_of and groups_of[n] != (device,)]
        assert list(got) == expected
        assert not set(got) & set(frozen)
        assert read_train_message(message)[1].selection is None  # unchanged selection is not resent
    assert strategy.history[-1]["round"] == 1


def _round_one(strategy, state):
    messages = by_device(strategy.configure_train(1, to_array_record(state), ConfigRecord(), None))
    sent = {d: perturbed(strategy, d, state, seed=d) for d in messages}
    return messages, sent


def _bad_reply_cases():
    def extra(messages, sent, state):
        tensors = dict(sent[1], **{"features.0.0.weight": state["features.0.0.weight"]})
        return [reply(messages[1], tensors, 20, 1)]

    def shape(messages, sent, state):
        return [reply(messages[1], dict(sent[1], **{"classifier.1.bias": torch.zeros(11)}), 20, 1)]

    def dtype(messages, sent, state):
        return [reply(messages[1], dict(sent[1], **{"classifier.1.bias": torch.zeros(10, dtype=torch.float64)}), 20, 1)]

    def nan(messages, sent, state):
        bad = dict(sent[1])
        bad["classifier.1.weight"] = bad["classifier.1.weight"].clone()
        bad["classifier.1.weight"][0, 0] = float("nan")
        return [reply(messages[1], bad, 20, 1)]

    def inf(messages, sent, state):
        bad = dict(sent[1])
        bad["features.4.1.running_var"] = torch.full_like(bad["features.4.1.running_var"], float("inf"))
        return [reply(messages[1], bad, 20, 1)]

    def missing_tensor(messages, sent, state):
        bad = dict(sent[1])
        bad.pop("classifier.1.bias")
        return [reply(messages[1], bad, 20, 1)]

    def duplicate(messages, sent, state):
        return [reply(messages[1], sent[1], 20, 1), reply(messages[1], sent[1], 20, 1)]

    def stale_metric(messages, sent, state):
        return [reply(messages[1], sent[1], 20, 0)]

    def stale_group(messages, sent, state):
        old = Message(RecordDict(), dst_node_id=NODE_OFFSET + 1, message_type=MessageType.TRAIN, group_id="0")
        return [reply(old, sent[1], 20, 1)]

    def bad_examples(messages, sent, state):
        return [reply(messages[1], sent[1], 0, 1)]

    def malformed(messages, sent, state):
        return [Message(RecordDict({ARRAYS: to_array_record(sent[1])}), reply_to=messages[1])]

    return {
        "unexpected-tensors": extra,
        "shape": shape,
        "dtype": dtype,
        "non-finite": nan,
        "non-finite-inf": inf,
        "missing-tensors": missing_tensor,
        "duplicate": duplicate,
        "stale-round": stale_metric,
        "stale-round-group": stale_group,
        "examples": bad_examples,
        "malformed": malformed,
    }


@pytest.mark.parametrize("on_arrival", [False, True], ids=["checked-at-the-end", "checked-on-arrival"])
@pytest.mark.parametrize("case", sorted(_bad_reply_cases()))
def test_bad_reply_is_rejected_counted_and_never_applied(case, on_arrival, monkeypatch):
    model = build_model("tiny", seed=0)
    state = model.state_dict()
    strategy = make_strategy(model, TINY_SELECTIONS)
    messages, sent = _round_one(strategy, state)
    bad = _bad_reply_cases()[case](messages, sent, state)
    good = [reply(messages[d], sent[d], EXAMPLES[d], 1) for d in (0, 2)]
    if on_arrival:
        check_on_arrival(strategy, good + bad, monkeypatch)

    arrays, metrics = strategy.aggregate_train(1, good + bad)
    result = from_array_record(arrays)
    kind = case.removesuffix("-inf").removesuffix("-group")
    assert metrics["num-rejected"] == len(bad) and metrics[f"rejected-{kind}"] == len(bad)
    assert metrics["num-accepted"] == 2  # the round went on with the rest
    assert strategy.history[-1]["devices"]["1"]["status"] == f"rejected:{kind}"
    # Device 1's tensors are the mean over devices 0 and 2 only: nothing of device 1 applied.
    for name in device_tensors(strategy.plan, 1):
        members = [d for d in (0, 2) if name in sent[d]]
        total = sum(EXAMPLES[d] for d in members)
        acc = sum(sent[d][name].double() * (EXAMPLES[d] / total) for d in members)
        assert torch.equal(
            result[name], acc.to(state[name].dtype) if state[name].is_floating_point() else acc.round().long()
        )
    assert all(torch.isfinite(t).all() for t in result.values() if t.is_floating_point())
    # Its replica diverged (it trained) and nothing of it was accepted: it is resent its selection.
    assert set(device_tensors(strategy.plan, 1)) <= set(strategy.versions.missing(1))


def test_error_reply_is_missing_and_its_group_is_unchanged():
    model = build_model("tiny", seed=0)
    state = model.state_dict()
    selections = {0: ["classifier"], 1: ["features.4"]}
    strategy = make_strategy(model, selections)
    messages, sent = _round_one(strategy, state)
    failed = Message(Error(code=0, reason="ClientApp raised"), reply_to=messages[1])
    arrays, metrics = strategy.aggregate_train(1, [reply(messages[0], sent[0], 5, 1), failed])
    result = from_array_record(arrays)
    assert metrics["num-missing"] == 1 and metrics["num-accepted"] == 1
    assert strategy.history[-1]["missing"] == [1]
    for name in device_tensors(strategy.plan, 1):
        assert torch.equal(result[name], state[name])  # a group with no reply stays as it was
    for name in device_tensors(strategy.plan, 0):
        assert torch.equal(result[name], sent[0][name])  # a single member's mean is its values
    assert strategy.versions.missing(1) == list(state)  # a failed node may have lost its replica
    assert strategy.versions.missing(0) == []  # sole member, accepted: it holds the global values


def test_reply_from_unknown_node_is_rejected():
    model = build_model("tiny", seed=0)
    state = model.state_dict()
    strategy = make_strategy(model, {0: ["classifier"]})
    messages, sent = _round_one(strategy, state)
    stranger = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    arrays, metrics = strategy.aggregate_train(1, [reply(stranger, sent[0], 5, 1)])
    assert metrics["rejected-unknown-node"] == 1 and metrics["num-accepted"] == 0
    assert all(torch.equal(from_array_record(arrays)[n], t) for n, t in state.items())


def test_plan_table_shows_each_budget_source():
    from flwr_dsparse.plan import format_plan

    model = build_model("tiny", seed=0)
    strategy = make_strategy(model, {0: ["classifier"], 1: ["features.4", "classifier"]})
    table = format_plan(strategy.plan, {0: "node-config memory-mb", 1: "sim-budgets-mb"})
    rows = {line.split()[0]: line for line in table.splitlines()[2:4]}
    assert "budget source" in table.splitlines()[1]
    assert "node-config memory-mb" in rows["0"] and "sim-budgets-mb" in rows["1"]


def test_superlink_error_for_an_offline_node_counts_that_node_as_missing():
    """The SuperLink answers a message to a node that went offline itself, from its own node
    id: the reply must be matched to the message it answers, not to its sender."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    model = build_model("tiny", seed=0)
    state = model.state_dict()
    strategy = make_strategy(model, {0: ["classifier"], 1: ["features.4"]})
    messages, sent = _round_one(strategy, state)
    for index, message in enumerate(messages.values()):  # what a Grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"pushed-{index}"
    offline = create_message_error_unavailable_res_message(messages[1].metadata, "node_unavail")
    assert offline.metadata.src_node_id != messages[1].metadata.dst_node_id
    arrays, metrics = strategy.aggregate_train(1, [reply(messages[0], sent[0], 5, 1), offline])
    assert metrics["num-missing"] == 1 and metrics["num-rejected"] == 0, dict(metrics)
    row = strategy.history[-1]["devices"]["1"]
    assert row["status"] == "missing" and "unavailable" in row["error"].lower(), row
    for name in device_tensors(strategy.plan, 1):
        assert torch.equal(from_array_record(arrays)[name], state[name])


def test_collective_round_messages_carry_the_configured_rendezvous():
    """transport="collective": every node learns the plan, its rank (= device id) and one
    rendezvous, the fixed port from collective_port_fn (the collective-port key)."""
    from flwr_dsparse.plan import Plan

    model = build_model("tiny", seed=0)
    state = model.state_dict()
    selections = {0: ["classifier"], 1: ["features.4", "classifier"]}
    plan = plan_from_selections(model_units(model), selections, {n: tensor_nbytes({n: t}) for n, t in state.items()})
    strategy = DSparse(
        plan_fn=lambda reports, global_tensors: plan,
        transport="collective",
        collective_addr="10.0.0.5",
        collective_port_fn=lambda: 29512,
    )
    strategy.set_plan(plan, {NODE_OFFSET + d: d for d in selections})
    messages = by_device(strategy.configure_train(1, to_array_record(state), ConfigRecord(), None))
    for device, message in messages.items():
        control = read_train_message(message)[1]
        assert control.round_transport == "collective" and control.rank == device
        assert (control.collective_addr, control.collective_port, control.world_size) == ("10.0.0.5", 29512, 2)
        assert Plan.from_json(control.plan).digest() == plan.digest()
