"""Collective transport: real gloo process groups on 127.0.0.1, checked against in-process references."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flwr_dsparse.cli.collective import add_cli
from flwr_dsparse.collective import (
    CollectiveError,
    PlanMismatchError,
    Rendezvous,
    check_plan_ranks,
    launch_local,
    run_collective_round,
)
from flwr_dsparse.models import build_model
from flwr_dsparse.plan import Plan, plan_from_selections
from flwr_dsparse.ports import free_port
from flwr_dsparse.trainer import make_optimizer_factory
from flwr_dsparse.units import model_units

pytestmark = pytest.mark.collective

# spawn re-imports torch in every rank (~15 s for 3 ranks on 2 shared cores); fork reuses this
# process's imports. Each rank sets one intra-op thread, so forking after torch is safe here.
START_METHOD = "fork"
LR = 0.1
STEPS = 3
BATCH = 4
# Generous: a cold CI machine once took over 10 s to bring the third forked rank to the rendezvous.
# Only the happy-path tests use it (the fault tests set their own short timeout), so it costs nothing.
TIMEOUT_S = 45.0
DEADLINE_S = 90.0  # hard bound: launch_local kills any rank still running by then

# The first optimizer step imports seconds' worth of torch internals; do it once here, so forked
# ranks inherit it instead of each paying it.
torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR).step()


def make_model(name: str) -> nn.Module:
    return build_model(name, seed=0)


def rank_batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return [
        (torch.randn(BATCH, 3, 16, 16, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator))
        for _ in range(steps)
    ]


def make_plan(model_name: str, selections: dict[int, list[str]], meta: dict | None = None) -> Plan:
    model = make_model(model_name)
    sizes = {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}
    return plan_from_selections(
        model_units(model), selections, sizes, batch_sizes=dict.fromkeys(selections, BATCH), meta=meta
    )


OVERLAPPING = {  # groups: {2}: features.2 (alone), {0,2}: features.3, {0,1,2}: features.4 + classifier
    0: ["features.3", "features.4", "classifier"],
    1: ["features.4", "classifier"],
    2: ["features.2", "features.3", "features.4", "classifier"],
}
WITH_INFERENCE_ONLY = {  # rank 1 trains nothing and only receives
    0: ["features.1", "features.4", "classifier"],
    1: [],
    2: ["features.3", "features.4", "classifier"],
}


# --------------------------------------------------------------------------- rank workers


def train_rank(rank, world_size, master_addr, master_port, plan_json, model_name, fused, rounds=1, ports=()):
    """``rounds`` calls of the client hook in one process, as a Flower node would make them.

    Rounds after the first rendezvous on ``ports`` (one port per round, as in :func:`momentum_rank`).
    """
    plan = Plan.from_json(plan_json)
    model = make_model(model_name)
    batches = iter(rank_batches(rank, STEPS * rounds))
    for round_port in (master_port, *ports)[:rounds]:
        result = run_collective_round(
            plan,
            Rendezvous(rank, world_size, master_addr, round_port),
            model,
            batches,
            STEPS,
            make_optimizer_factory("sgd", lr=LR),
            TIMEOUT_S,
            fused=fused,
        )
    return {"state": model.state_dict(), "tensors": result.tensors, "payload_bytes": result.payload_bytes}


def momentum_rank(rank, world_size, master_addr, master_port, plan_json, rounds, carry, initial=None, ports=()):
    """2*STEPS momentum-SGD steps split into ``rounds`` rounds; ``carry`` hands each round's
    momentum to the next (as the ClientApp does), ``initial`` gives each rank its own start.

    Rounds after the first rendezvous on ``ports``: reusing one port back to back races (a rank
    that finished first can reach rank 0's store of the round before, just as it closes), and the
    server hands out a fresh port every round by default (``collective-port = 0``) for that reason.
    """
    plan = Plan.from_json(plan_json)
    model = make_model("tiny")
    batches = iter(rank_batches(rank, 2 * STEPS))
    state = initial[rank] if initial is not None else ({} if carry else None)
    for round_port in (master_port, *ports)[:rounds]:
        result = run_collective_round(
            plan,
            Rendezvous(rank, world_size, master_addr, round_port),
            model,
            batches,
            2 * STEPS // rounds,
            make_optimizer_factory("sgd", lr=LR, momentum=0.9),
            TIMEOUT_S,
            momentum_state=state,
        )
        state = result.momentum_state if carry else None
    return {"state": model.state_dict(), "tensors": result.tensors, "momentum": result.momentum_state}


def faulty_rank(rank, world_size, master_addr, master_port, plan_json, fault, timeout_s):
    """Rank 2 dies (or stalls) before its second step; the others report how they failed."""

    if rank == 2 and fault == "never-joins":
        os._exit(3)

    def batches():
        for step, batch in enumerate(rank_batches(rank, STEPS)):
            if rank == 2 and step == 1:
                if fault == "exit":
                    os._exit(3)
                time.sleep(timeout_s * 2.5)  # alive but silent: only the timeout can catch this
            yield batch

    plan = Plan.from_json(plan_json)
    start = time.monotonic()
    try:
        run_collective_round(
            plan,
            Rendezvous(rank, world_size, master_addr, master_port),
            make_model("tiny"),
            batches(),
            STEPS,
            make_optimizer_factory("sgd", lr=LR),
            timeout_s,
        )
    except CollectiveError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def mismatched_rank(rank, world_size, master_addr, master_port, plan_jsons):
    try:
        run_collective_round(
            Plan.from_json(plan_jsons[rank]),
            Rendezvous(rank, world_size, master_addr, master_port),
            make_model("tiny"),
            rank_batches(rank, 1),
            1,
            None,
            TIMEOUT_S,
        )
    except PlanMismatchError as error:
        return str(error)
    return None


# --------------------------------------------------------------------------- references


def grouped_sgd_reference(plan: Plan, model_name: str, steps: int) -> dict[str, torch.Tensor]:
    """The server-side semantics, in one process: per step each member computes its gradient on its
    own batch from the same global model, each group averages its members' gradients (and float
    BatchNorm statistics), and one SGD step updates the global model."""
    model = make_model(model_name)
    units = model_units(model)
    batches = {rank: rank_batches(rank, steps) for rank in plan.device_ids}
    for step in range(steps):
        grads, buffers = {}, {}
        for device in plan.devices:
            if not device.units:
                continue  # inference only: computes nothing that anyone keeps
            replica = copy.deepcopy(model)
            trained = set(device.params)
            for name, param in replica.named_parameters():
                param.requires_grad_(name in trained)
            replica.train()
            modules = dict(replica.named_modules())
            for unit in units:
                if unit.name not in device.units:
                    modules[unit.name].eval()  # frozen BatchNorm keeps its statistics
            inputs, targets = batches[device.id][step]
            F.cross_entropy(replica(inputs), targets).backward()
            grads[device.id] = {name: p.grad.clone() for name, p in replica.named_parameters() if name in trained}
            buffers[device.id] = {name: b.clone() for name, b in replica.named_buffers()}
        params = dict(model.named_parameters())
        model_buffers = dict(model.named_buffers())
        with torch.no_grad():
            for group in plan.groups:
                count = len(group.members)
                for name in group.params:
                    mean = sum(grads[m][name] for m in group.members) / count
                    params[name].add_(mean, alpha=-LR)
                for name in group.buffers:
                    values = [buffers[m][name] for m in group.members]
                    model_buffers[name].copy_(sum(values) / count if values[0].is_floating_point() else values[0])
    return model.state_dict()


def server_side_reference(plan: Plan, model_name: str, steps: int) -> dict[str, torch.Tensor]:
    """The server-side transport with one local step per round: every device runs
    :class:`SparseTrainer` from the global model, and :func:`aggregate_groups` takes the grouped
    mean of what the members return. With plain SGD, the mean of one-step parameters equals one
    step with the mean gradient, so the collective transport must agree with it."""
    from flwr_dsparse.exchange import Update
    from flwr_dsparse.strategy.aggregate import aggregate_groups
    from flwr_dsparse.trainer import SparseTrainer

    model = make_model(model_name)
    batches = {rank: rank_batches(rank, steps) for rank in plan.device_ids}
    for step in range(steps):
        updates = {}
        for device in plan.devices:
            if not device.units:
                continue
            local = copy.deepcopy(model)
            trainer = SparseTrainer(local, device.units, optimizer_factory=make_optimizer_factory("sgd", lr=LR))
            inputs, targets = batches[device.id][step]
            trainer.step(inputs, targets)
            trainer.close()
            state = local.state_dict()
            sent = {name: state[name] for group in plan.groups_of(device.id) for name in group.tensors}
            updates[device.id] = Update(device.id, int(targets.numel()), sent)
        model.load_state_dict({**model.state_dict(), **aggregate_groups(plan.groups, updates)})
    return model.state_dict()


def centralized_sgd(world_size: int, steps: int) -> dict[str, torch.Tensor]:
    model = make_model("tiny_nobn")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    batches = [rank_batches(rank, steps) for rank in range(world_size)]
    for step in range(steps):
        inputs = torch.cat([batches[rank][step][0] for rank in range(world_size)])
        targets = torch.cat([batches[rank][step][1] for rank in range(world_size)])
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.state_dict()


def assert_ok(outcomes):
    failed = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)


def assert_close_states(actual, expected, atol=1e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name].double(), expected[name].double(), rtol=0, atol=atol), (
            f"{name}: max difference {(actual[name].double() - expected[name].double()).abs().max():.3g}"
        )


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("selections", "fused", "rounds"),
    [(OVERLAPPING, True, 1), (WITH_INFERENCE_ONLY, False, 2)],
    ids=["overlapping-fused", "inference-only-per-tensor-two-rounds"],
)
def test_ranks_are_bit_identical_and_match_grouped_reference(selections, fused, rounds):
    plan = make_plan("tiny", selections)
    # A fresh port per round: reusing one back to back races (see momentum_rank); it failed CI once.
    ports = tuple(free_port("127.0.0.1") for _ in range(rounds - 1))
    outcomes = launch_local(
        train_rank, 3, (plan.to_json(), "tiny", fused, rounds, ports), start_method=START_METHOD, deadline_s=DEADLINE_S
    )
    assert_ok(outcomes)
    states = [o.result["state"] for o in outcomes]

    for state in states[1:]:  # every rank holds the same full model, to the bit
        for name in states[0]:
            assert torch.equal(state[name], states[0][name]), f"{name} differs between ranks"
    for group in plan.groups:  # what the Flower strategy will check: members return identical tensors
        returned = [outcomes[m].result["tensors"] for m in group.members]
        for name in group.tensors:
            assert all(torch.equal(r[name], returned[0][name]) for r in returned), name

    # plain SGD without momentum: a second round just continues the first
    assert_close_states(states[0], grouped_sgd_reference(plan, "tiny", STEPS * rounds))
    assert_close_states(states[0], server_side_reference(plan, "tiny", STEPS * rounds))

    initial = make_model("tiny").state_dict()
    trained = {name for group in plan.groups for name in group.tensors}
    for name, value in initial.items():  # trained tensors moved, frozen ones did not
        if name in trained and value.is_floating_point():
            assert not torch.equal(states[0][name], value), f"{name} was trained but did not change"
        elif name not in trained:
            assert torch.equal(states[0][name], value), f"{name} is frozen but changed"


def test_all_units_everywhere_equals_centralized_sgd_on_union_batch():
    world_size = 3
    every_unit = [unit.name for unit in model_units(make_model("tiny_nobn"))]
    plan = make_plan("tiny_nobn", dict.fromkeys(range(world_size), every_unit))
    assert len(plan.groups) == 1 and plan.groups[0].members == (0, 1, 2)
    outcomes = launch_local(
        train_rank, world_size, (plan.to_json(), "tiny_nobn", True), start_method=START_METHOD, deadline_s=DEADLINE_S
    )
    assert_ok(outcomes)
    reference = centralized_sgd(world_size, STEPS)
    for outcome in outcomes:
        assert_close_states(outcome.result["state"], reference)
    assert not torch.equal(
        reference["classifier.1.weight"], make_model("tiny_nobn").state_dict()["classifier.1.weight"]
    )


@pytest.mark.parametrize("fault", ["exit", "stall", "never-joins"])
def test_dead_or_stalled_rank_fails_the_others_with_a_timeout_error(fault):
    timeout_s = 2.0
    plan = make_plan("tiny", OVERLAPPING)
    start = time.monotonic()
    outcomes = launch_local(
        faulty_rank, 3, (plan.to_json(), fault, timeout_s), start_method=START_METHOD, deadline_s=30.0
    )
    elapsed = time.monotonic() - start
    survivors = outcomes[:2]
    for outcome in survivors:
        assert outcome.ok, outcome.error
        message = outcome.result["error"]
        assert message is not None, f"rank {outcome.rank} finished although rank 2 was gone"
        expected = "rendezvous at tcp://127.0.0.1" if fault == "never-joins" else "group"
        assert expected in message and "timeout 2 s" in message, message
        # a dead peer closes its sockets (fast); a silent one is caught by the timeout
        assert outcome.result["seconds"] < 5 * timeout_s + 5, outcome.result
    if fault != "stall":
        assert outcomes[2].exitcode == 3
    assert elapsed < 30.0


def test_a_rank_with_another_plan_makes_every_rank_refuse():
    plan = make_plan("tiny", OVERLAPPING)
    other = make_plan("tiny", OVERLAPPING, meta={"note": "edited by hand"})
    assert plan.digest() != other.digest()
    outcomes = launch_local(
        mismatched_rank,
        3,
        ([plan.to_json(), other.to_json(), plan.to_json()],),
        start_method=START_METHOD,
        deadline_s=DEADLINE_S,
    )
    assert_ok(outcomes)
    for outcome in outcomes:
        assert outcome.result is not None and "rank(s) [1]" in outcome.result and "same plan.json" in outcome.result


def test_plan_ranks_must_match_world_size():
    plan = make_plan("tiny", OVERLAPPING)
    check_plan_ranks(plan, 3)
    with pytest.raises(ValueError, match=r"device ids \[0, 1, 2\].*--world-size 3"):
        check_plan_ranks(plan, 2)


def test_rendezvous_reads_torchrun_environment_and_rejects_bad_values():
    env = {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29511", "LOCAL_RANK": "2"}
    rendezvous = Rendezvous.from_environ(env)
    assert (rendezvous.rank, rendezvous.world_size, rendezvous.master_addr, rendezvous.master_port) == (
        2,
        3,
        "10.0.0.5",
        29511,
    )
    assert rendezvous.init_method == "env://"
    assert Rendezvous(0, 2, "127.0.0.1", 1234).init_method == "tcp://127.0.0.1:1234"
    with pytest.raises(ValueError, match="MASTER_PORT"):
        Rendezvous.from_environ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "a"})
    with pytest.raises(ValueError, match=r"rank 3 is outside \[0, 3\)"):
        Rendezvous(3, 3)


def test_cli_registers_collective_subcommand(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="dsparse")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "collective",
            "--plan",
            str(tmp_path / "plan.json"),
            "--rank",
            "1",
            "--world-size",
            "3",
            "--master-addr",
            "10.0.0.1",
            "--master-port",
            "29600",
            "--no-fusion",
        ]
    )
    assert (args.rank, args.world_size, args.master_addr, args.master_port, args.no_fusion) == (
        1,
        3,
        "10.0.0.1",
        29600,
        True,
    )
    assert callable(args.func)


def test_cli_rank_path_trains_every_device_of_a_plan_file(tmp_path):
    from flwr_dsparse.cli.collective import CliJob, cli_rank

    plan = make_plan("tiny", OVERLAPPING)
    job = CliJob(
        plan.to_json(),
        "tiny",
        steps=2,
        batch_size=8,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        seed=0,
        timeout_s=TIMEOUT_S,
        fused=True,
        out=str(tmp_path / "rank{rank}.pt"),
    )
    outcomes = launch_local(cli_rank, 3, (job,), start_method=START_METHOD, deadline_s=DEADLINE_S)
    assert_ok(outcomes)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(3)]
    for state in states[1:]:  # momentum too: identical optimizer steps keep the members identical
        assert all(torch.equal(state[name], states[0][name]) for name in states[0])
    assert all(outcome.result["payload_mb"] > 0 for outcome in outcomes)


def test_bench_falls_back_without_root_and_names_the_fix_without_iproute2(monkeypatch):
    from experiments import aggregation_bench

    monkeypatch.setattr(aggregation_bench.os, "geteuid", lambda: 1000)
    assert "not root" in aggregation_bench.emulation_unavailable()
    monkeypatch.setattr(aggregation_bench.os, "geteuid", lambda: 0)
    monkeypatch.setattr(aggregation_bench.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    with pytest.raises(SystemExit, match="apt-get install -y iproute2"):
        aggregation_bench.emulation_unavailable()


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("ip"), reason="needs root and iproute2")
def test_bench_namespace_is_deleted_also_on_failure():
    import subprocess

    from experiments.aggregation_bench import Namespace

    with pytest.raises(RuntimeError, match="boom"), Namespace() as namespace:
        assert namespace.name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        raise RuntimeError("boom")
    assert namespace.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


TWO_RANKS = {0: ["features.3", "features.4", "classifier"], 1: ["features.4", "classifier"]}


def test_momentum_carries_over_rounds_bit_identically():
    """Two collective rounds with the momentum handed over equal one round of all the steps,
    exactly; without the hand-over they differ (momentum restarts)."""
    plan = make_plan("tiny", TWO_RANKS).to_json()

    def launch(rounds, carry):
        ports = tuple(free_port("127.0.0.1") for _ in range(rounds - 1))
        return launch_local(
            momentum_rank, 2, (plan, rounds, carry, None, ports), start_method=START_METHOD, deadline_s=DEADLINE_S
        )

    whole, split, restarted = launch(1, True), launch(2, True), launch(2, False)
    for outcomes in (whole, split, restarted):
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    for a, b in zip(whole, split, strict=False):
        assert all(torch.equal(a.result["state"][n], b.result["state"][n]) for n in a.result["state"])
        assert a.result["momentum"].keys() == b.result["momentum"].keys() and a.result["momentum"]
        assert all(torch.equal(a.result["momentum"][n], b.result["momentum"][n]) for n in a.result["momentum"])
    differs = [n for n, t in whole[0].result["state"].items() if not torch.equal(t, restarted[0].result["state"][n])]
    assert differs, "restarting momentum every round should change the result"


def test_members_with_different_momentum_are_averaged_to_stay_identical():
    """After a round the server-side transport redid, each member's momentum is its own; the
    collective averages it per group first, so the members still end bit-identical."""
    plan = make_plan("tiny", TWO_RANKS)
    model = make_model("tiny")
    shared = [n for g in plan.groups if len(g.members) == 2 for n in g.params]
    initial = {
        rank: {n: torch.full_like(dict(model.named_parameters())[n], 0.01 * (rank + 1)) for n in shared}
        for rank in (0, 1)
    }
    outcomes = launch_local(
        momentum_rank, 2, (plan.to_json(), 1, True, initial), start_method=START_METHOD, deadline_s=DEADLINE_S
    )
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    first, second = outcomes[0].result, outcomes[1].result
    shared_tensors = [n for g in plan.groups if len(g.members) == 2 for n in g.tensors]
    assert all(torch.equal(first["tensors"][n], second["tensors"][n]) for n in shared_tensors)
    assert all(torch.equal(first["momentum"][n], second["momentum"][n]) for n in shared)
