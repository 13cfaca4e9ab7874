"""The Flower app: job config, node budgets, and a short 7-node end-to-end simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
import torch

from client.app import node_budget_mb
from experiments.fault_matrix import SMALL_JOB
from flwr_dsparse.config import JobConfig, load_config
from flwr_dsparse.models import build_model
from flwr_dsparse.plan import Plan
from flwr_dsparse.units import model_units

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_config_equals_the_config_defaults():
    # The in-process simulation API passes an empty run_config, so the defaults in
    # config.py must be the job that `flwr run .` runs.
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert load_config(table) == JobConfig()
    assert set(table) == set(JobConfig().to_run_config())


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("lrr", 0.1, ["lrr", "valid keys"]),
        ("method", "fedprox", ["method", "dsparse, fedavg"]),
        ("model", "resnet", ["model", "mobilenet_v2"]),
        ("dataset", "mnist", ["dataset", "synthetic"]),
        ("partitioning", "shards", ["partitioning", "dirichlet"]),
        ("scorer", "random", ["scorer", "gradient"]),
        ("batch-size", 0, ["batch-size", "> 0"]),
        ("lr", -0.1, ["lr", "> 0"]),
        ("lr", "fast", ["lr", "number"]),
        ("num-server-rounds", 2.5, ["num-server-rounds", "whole number"]),
        ("momentum", 1.5, ["momentum", "below 1"]),
        ("dirichlet-alpha", 0.0, ["dirichlet-alpha", "> 0"]),
        ("sim-budgets-mb", "80,abc", ["sim-budgets-mb", "'abc'", "80,110,140"]),
        ("sim-budgets-mb", "80,-5", ["sim-budgets-mb", "positive number of MB"]),
        ("dataset", "cifar10", ["data-root", "cifar-10-batches-py"]),
    ],
)
def test_bad_config_names_the_key_and_the_fix(key, value, words):
    with pytest.raises(ValueError) as info:
        load_config({key: value})
    for word in words:
        assert word in str(info.value)


def test_node_budget_order():
    config = load_config({"sim-budgets-mb": "50,60,70"})
    assert node_budget_mb({"partition-id": 1, "memory-mb": 512}, config) == (512.0, "node-config memory-mb")
    assert node_budget_mb({"partition-id": 1}, config) == (60.0, "sim-budgets-mb")
    with pytest.raises(ValueError, match="sim-budgets-mb has 3 entries but this node's partition-id is 5"):
        node_budget_mb({"partition-id": 5}, config)
    budget, source = node_budget_mb({"partition-id": 5}, load_config({"sim-budgets-mb": ""}))
    assert budget > 0 and source.startswith("psutil")


def simulate(overrides: dict, *, nodes: int, cpus: int) -> None:
    """The project's ServerApp (``overrides`` on its run config) and ClientApp under Flower's
    simulation runtime: ``nodes`` virtual nodes, one CPU each, ``cpus`` for Ray in all."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    run_simulation(
        make_server_app(overrides),
        client_app,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
    )


def test_seven_node_simulation_trains_only_planned_units(tmp_path):
    out = tmp_path / "out"
    overrides = {
        "model": "tiny",
        "num-server-rounds": 16,
        "lr": 0.1,
        "train-examples": 2100,
        "test-examples": 500,
        # Tiny needs about 6.1 MB (classifier only) to 13.9 MB (everything) at batch 32 with
        # momentum: every budget is below the full model, so some units are frozen for all.
        "sim-budgets-mb": "6.14,6.24,6.33,6.44,7.09,9.24,11.76",
        # Memory only: the most each budget affords, so 16 rounds learn clearly past chance (the
        # balanced default trains less per step; tests/test_planner.py and the comparison cover it).
        "plan-objective": "criticality",
        "min-nodes": 7,
        "out-dir": str(out),
        "evaluate-every": 5,  # round 0, every 5th and the last; every round still has its record
    }
    simulate(overrides, nodes=7, cpus=2)
    plan = Plan.from_json((out / "plan.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "metrics.csv").read_text().count("\n") == 18  # header + rounds 0..16
    assert len(plan.devices) == 7 and len({d.budget_mb for d in plan.devices}) == 7
    assert plan.frozen_units, "the budgets must leave some units frozen for all"

    initial = build_model("tiny", seed=0).state_dict()
    final = torch.load(out / "final_model.pt")
    units = {unit.name: unit for unit in model_units(build_model("tiny", seed=0))}
    for name in plan.frozen_units:
        for tensor in units[name].tensor_names:
            assert torch.equal(final[tensor], initial[tensor]), f"{tensor} of a frozen unit changed"
    trained = [n for group in plan.groups for n in group.params]
    assert all(not torch.equal(final[n], initial[n]) for n in trained)
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())

    rounds = metrics["rounds"]
    assert [row["round"] for row in rounds] == list(range(17))
    assert [row["round"] for row in rounds if "accuracy" in row] == [0, 5, 10, 15, 16]
    assert all(row["accepted"] == list(range(7)) for row in rounds[1:])
    assert metrics["summary"]["final-accuracy"] > 0.2  # chance is 0.1


@pytest.mark.collective
@pytest.mark.slow
def test_collective_transport_in_simulation(tmp_path):
    """transport="collective" under the Ray simulation: one Ray actor per node (num_cpus covers
    all nodes, so the ranks run concurrently; fewer actors than nodes would deadlock the
    rendezvous until collective-timeout), group members return identical tensors."""
    out = tmp_path / "out"
    overrides = {
        **SMALL_JOB,  # the suite's three-node job (TinyNet, budgets with a group of their own)
        "momentum": 0.0,
        "num-server-rounds": 2,
        "round-timeout": 600.0,  # not the fault matrix's 30 s: Ray and gloo start in the first round
        "transport": "collective",
        "collective-timeout": 60.0,
        "out-dir": str(out),
    }
    simulate(overrides, nodes=3, cpus=3)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for row in rounds[1:]:
        assert row["transport"] == "collective" and row["accepted"] == [0, 1, 2], row.get("events")
    final = torch.load(out / "final_model.pt")
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
