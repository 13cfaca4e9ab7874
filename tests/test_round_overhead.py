"""The round-overhead benchmark's arithmetic (experiments/round_overhead.py), on hand-made rounds."""

from __future__ import annotations

import pytest

from experiments.round_overhead import compute_seconds, round_rows, schedule_seconds, state_sources, summarize


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
    assert summary["state-sources"] == {"loaded": 0, "live": 0, "refreshed": 0}  # the reports said nothing


def test_state_sources_count_where_each_node_s_model_came_from():
    devices = {str(pid): {"state-source": float(source)} for pid, source in enumerate([0, 1, 1, 2, 1])}
    devices["5"] = {"status": "missing"}  # no reply, no source
    assert state_sources(devices) == {"loaded": 1, "live": 3, "refreshed": 1}


def test_echo_payloads_are_distinct_objects_of_the_asked_sizes():
    """Flower moves equal objects once: the echo's arrays must differ, or its floor moves fewer bytes."""
    import importlib

    import experiments.round_overhead  # noqa: F401 - puts the echo app's folder on sys.path

    echo_app = importlib.import_module("echo_app")  # a top-level module of that folder
    STAMP_EVERY, payload = echo_app.STAMP_EVERY, echo_app.payload

    record = payload(9_000_000, 158, "up/1/0")
    assert len(record) == 158 and sum(array.numpy().nbytes for array in record.values()) == 9_000_000
    assert len({array.object_id for array in record.values()}) == 158
    other_node = payload(9_000_000, 158, "up/1/1")
    assert not {a.object_id for a in record.values()} & {a.object_id for a in other_node.values()}
    # Where the real app's messages carry the same tensors, the echo's carry the same bytes.
    assert [a.object_id for a in payload(1000, 3, "down/1/1000").values()] == [
        a.object_id for a in payload(1000, 3, "down/1/1000").values()
    ]
    # An array beyond one of Flower's chunks has a stamp in every stretch of STAMP_EVERY bytes.
    big = payload(3 * STAMP_EVERY, 1, "down/2/x")["a0"].numpy()
    stretches = [bytes(big[i : i + STAMP_EVERY]) for i in range(0, len(big), STAMP_EVERY)]
    assert len(set(stretches)) == 3
