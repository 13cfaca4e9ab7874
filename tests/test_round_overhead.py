"""The round-overhead benchmark's arithmetic (experiments/round_overhead.py), on hand-made rounds."""

from __future__ import annotations

import pytest

from experiments.round_overhead import compute_seconds, round_rows, schedule_seconds, summarize


def _devices(*steps: float) -> dict[str, dict[str, float]]:
    return {str(pid): {"step-seconds": step, "bytes-down": 10.0, "bytes-up": 4.0} for pid, step in enumerate(steps)}


def test_compute_is_the_steps_spread_over_the_cores_and_schedule_is_their_uneven_split():
    seven = _devices(*[1.0] * 7)
    assert compute_seconds(seven, local_steps=2, cores=2) == 7.0  # 14 step-seconds over 2 cores
    assert schedule_seconds(seven, local_steps=2, cores=2) == 1.0  # 4 nodes' steps on one core: 8, not 7
    assert schedule_seconds(_devices(1.0, 1.0), local_steps=1, cores=2) == 0.0  # one node per core
    # The first free core takes the next node, in node order: 1+2 on one core, 1 on the other.
    assert schedule_seconds(_devices(1.0, 1.0, 2.0), local_steps=1, cores=2) == pytest.approx(3.0 - 2.0)
    assert schedule_seconds(_devices(3.0, 2.0, 1.0), local_steps=1, cores=2) == 0.0  # 3 | 2+1: even
    assert compute_seconds(_devices(0.5, 0.5, 0.5), local_steps=1, cores=8) == 0.5  # fewer nodes than cores


def test_round_rows_take_the_training_rounds_and_their_overhead():
    metrics = {
        "rounds": [
            {"round": 0, "round-seconds": 9.0},  # the initial evaluation: no devices, no row
            {"round": 1, "round-seconds": 5.0, "devices": _devices(*[1.0] * 7)},
        ]
    }
    (row,) = round_rows(metrics, local_steps=1, cores=2)
    assert (row["round"], row["compute-s"], row["overhead-s"], row["schedule-s"]) == (1, 3.5, 1.5, 0.5)
    assert row["down-bytes"] == {str(pid): 10.0 for pid in range(7)}
    assert round_rows(metrics, local_steps=1, cores=2, whole_steps=False)[0]["schedule-s"] == 0.0  # a deployment
    summary = summarize([row])
    assert summary["median-overhead-s"] == 1.5 and summary["median-schedule-s"] == 0.5
