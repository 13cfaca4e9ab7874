"""Hard memory caps (real cgroups) and the allocator settings."""

from __future__ import annotations

import sys

import pytest

from flwr_dsparse.allocator import MALLOC_SETTINGS, allocator_env, tune_allocator
from flwr_dsparse.hardcap import hard_caps_available, run_capped

AVAILABLE, REASON = hard_caps_available()
needs_cap = pytest.mark.skipif(not AVAILABLE, reason=f"no writable memory cgroup: {REASON}")

ALLOCATE = "import sys; block = bytearray(int(sys.argv[1]) * 2**20); print(len(block))"


@needs_cap
def test_a_process_over_its_cap_is_killed_and_reported_with_its_budget() -> None:
    result = run_capped([sys.executable, "-c", ALLOCATE, "200"], 80, label="features.0..features.12")
    assert result.capped and result.oom_killed and not result.ok
    assert result.describe().startswith("KILLED by the hard cap of 80.0 MB [features.0..features.12]")


@needs_cap
def test_a_process_under_its_cap_runs_and_reports_its_peak() -> None:
    result = run_capped([sys.executable, "-c", ALLOCATE, "30"], 200)
    assert result.ok and result.capped and result.stdout.strip() == str(30 * 2**20)
    assert 30 <= result.peak_mb < 200


@needs_cap
def test_a_callable_runs_in_a_capped_child() -> None:
    def allocate(mb: int) -> None:
        bytearray(mb * 2**20)

    assert run_capped(allocate, 200, args=(20,)).ok
    assert run_capped(allocate, 40, args=(150,)).oom_killed


def test_caps_say_why_not_when_unavailable_and_fall_back_to_sampled_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr_dsparse.hardcap as hardcap

    monkeypatch.setattr(hardcap, "_own_cgroup", lambda: (None, "no memory cgroup controller is mounted"))
    assert hard_caps_available() == (False, "hard caps unavailable: no memory cgroup controller is mounted")
    result = run_capped([sys.executable, "-c", ALLOCATE + "; import time; time.sleep(0.3)", "50"], 10)
    assert not result.capped and not result.oom_killed and result.ok
    assert result.peak_mb > 50  # sampled RSS of the whole interpreter
    with pytest.raises(RuntimeError, match="no memory cgroup"):
        run_capped([sys.executable, "-c", "pass"], 10, require=True)


def test_allocator_settings_come_from_one_table() -> None:
    env = allocator_env({})
    assert env == {variable: str(value) for _, value, variable in MALLOC_SETTINGS.values()}
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    assert tune_allocator() is (sys.platform.startswith("linux"))
