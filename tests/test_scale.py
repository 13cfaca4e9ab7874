"""Scale: a 100-device plan of the tiny model is built and valid (its time is a benchmark figure:
python -m experiments.sim_scale)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from experiments.sim_scale import held_bytes, job
from flwr_dsparse.config import load_config
from flwr_dsparse.data import load_dataset
from flwr_dsparse.models import build_model
from flwr_dsparse.protocol import DeviceReport
from server.app import planner_plan_fn


def test_a_100_device_plan_is_built_and_every_device_trains_within_its_budget(one_torch_thread):
    config = load_config(job(100, 1, Path("unused")))
    model = build_model("tiny", seed=0)
    train, _ = load_dataset(config.dataset, seed=config.seed, num_train=128, num_test=10)
    plan = planner_plan_fn(model, config, (train.x[:64], train.y[:64]))(
        [DeviceReport(100 + d, d, budget, config.batch_size, 20) for d, budget in enumerate(config.budgets_mb)],
        model.state_dict(),
    )
    assert list(plan.device_ids) == list(range(100))
    for device in plan.device_ids:
        entry = plan.device(device)
        assert entry.units, f"device {device} trains nothing"
        assert entry.predicted_mb is not None and entry.predicted_mb.total <= entry.budget_mb, device
        assert any(device in group.members for group in plan.groups)


class _Holder:
    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def test_held_bytes_counts_every_buffer_once_however_it_is_shared():
    tensor, array = torch.zeros(1000), np.zeros(500)
    alone = held_bytes(_Holder(t=tensor, a=array))
    # A view of the tensor, a slice of the array, a second reference: no new buffer bytes.
    shared = held_bytes(_Holder(t=tensor, a=array, more=[tensor[10:], array[5:], tensor]))
    assert alone >= 4000 + 4000 and shared - alone < 1000  # only the list and the view objects
    bigger = held_bytes(_Holder(t=tensor, a=array, more=[torch.zeros(250)]))
    assert bigger - alone >= 1000
    assert held_bytes(_Holder(code=held_bytes, module=sys)) < 1000  # code is not data
