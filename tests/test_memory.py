"""The memory probe: a fresh process that joins its hard cap after loading, and its switches."""

from __future__ import annotations

import json
import sys

import pytest

from flwr_dsparse.hardcap import hard_caps_available, run_capped
from flwr_dsparse.memory import measure_training_rss

AVAILABLE, REASON = hard_caps_available()


@pytest.mark.skipif(not AVAILABLE, reason=f"no writable memory cgroup: {REASON}")
def test_probe_joins_its_cap_after_loading_so_the_cap_counts_training_only() -> None:
    request = {"model": "tiny", "selection": ["features.2", "classifier"], "batch_size": 8, "steps": 2, "cold": True}
    # 40 MB is far below torch's own ~500 MB: the probe survives only because it joins after loading.
    result = run_capped([sys.executable, "-m", "flwr_dsparse.probe", json.dumps(request)], 40, join="self")
    assert result.ok, result.stderr[-2000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply["joined_cap"] is True and reply["allocator_tuned"] is True
    assert 0 < result.peak_mb < 40


def test_probe_switches_reach_the_trainer() -> None:
    stock = measure_training_rss("tiny", ["features.1"], batch_size=8, steps=1, lean_frozen=False, tune_allocator=False)
    assert stock["allocator_tuned"] is False and stock["increase_mb"] >= 0
