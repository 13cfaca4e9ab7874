"""``rescore-every``: the plan is made again, on schedule, from the trained global model."""

from __future__ import annotations

import json

import pytest
import torch

from client.app import app
from experiments.fault_matrix import SMALL_JOB
from flwr_dsparse.config import load_config
from flwr_dsparse.data import load_dataset
from flwr_dsparse.models import build_model
from flwr_dsparse.protocol import DeviceReport
from flwr_dsparse.strategy import DSparse
from flwr_dsparse.testing import LocalGrid
from server.app import CALIBRATION_EXAMPLES, planner_plan_fn, run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rescoring_replans_from_the_global_model_of_that_round(tmp_path):
    # The reference: the same job stopped after 2 rounds. Its final model is what the 4-round
    # run's re-plan before round 3 must be handed (the run is deterministic in-process).
    run_job(
        LocalGrid(app, range(3), 3), load_config({**SMALL_JOB, "num-server-rounds": 2, "out-dir": str(tmp_path / "2")})
    )
    after_two = torch.load(tmp_path / "2" / "final_model.pt")

    config = load_config({**SMALL_JOB, "rescore-every": 2, "out-dir": str(tmp_path / "4")})
    train, _ = load_dataset(config.dataset, seed=config.seed, num_train=config.train_examples, num_test=10)
    planner = planner_plan_fn(
        build_model(config.model, seed=config.seed),
        config,
        (train.x[:CALIBRATION_EXAMPLES], train.y[:CALIBRATION_EXAMPLES]),
    )
    handed: list[dict[str, torch.Tensor]] = []

    def recording_plan_fn(reports, global_tensors):
        handed.append({name: tensor.clone() for name, tensor in global_tensors.items()})
        return planner(reports, global_tensors)

    run_job(LocalGrid(app, range(3), 3), config, plan_fn=recording_plan_fn)  # type: ignore[arg-type]

    start = build_model(config.model, seed=config.seed).state_dict()
    assert len(handed) == 2  # the round-0 query and before round 3 (rounds 1..4, every 2)
    assert all(torch.equal(handed[0][name], start[name]) for name in start)
    assert all(torch.equal(handed[1][name], after_two[name]) for name in after_two)
    rounds = [r for r in json.loads((tmp_path / "4" / "metrics.json").read_text())["rounds"] if "devices" in r]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["accepted"] == [0, 1, 2] for r in rounds)
    (event,) = rounds[2]["events"]
    assert event["event"] == "replan" and "criticality re-scored" in event["reason"], event


def test_the_scores_follow_the_tensors_the_plan_fn_is_handed():
    config = load_config({**SMALL_JOB, "plan-objective": "criticality", "sim-budgets-mb": "3.79,4.27,7.72"})
    model = build_model(config.model, seed=config.seed)
    train, _ = load_dataset(config.dataset, seed=config.seed, num_train=128, num_test=10)
    planner = planner_plan_fn(model, config, (train.x[:64], train.y[:64]))
    reports = [DeviceReport(10 + d, d, b, config.batch_size, 100) for d, b in enumerate(config.budgets_mb)]
    start = model.state_dict()
    # The classifier zeroed: its gradient (and so the criticality of everything before it) vanishes.
    silenced = {name: torch.zeros_like(t) if name.startswith("classifier") else t for name, t in start.items()}

    def chosen(tensors):  # the selections and their criticality (the plan's timings are measured, so they vary)
        return [(tuple(device.units), device.score) for device in planner(reports, tensors).devices]

    before = chosen(start)
    assert chosen(silenced) != before
    assert chosen(start) == before  # scoring other tensors left the model it closes over alone


def test_rescore_every_must_not_be_negative():
    with pytest.raises(ValueError, match="rescore-every must be >= 0"):
        load_config({"rescore-every": -1})
    with pytest.raises(ValueError, match="rescore_every must be >= 0"):
        DSparse(plan_fn=lambda reports, global_tensors: None, rescore_every=-1)  # type: ignore[arg-type,return-value]
