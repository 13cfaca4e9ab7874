"""Hard memory caps (real cgroups) and the allocator settings."""

from __future__ import annotations

import sys
import time
from pathlib import Path

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

    monkeypatch.setattr(hardcap, "own_cgroup", lambda: (None, "no memory cgroup controller is mounted"))
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


TRAIN_OVER_CAP = (
    "import os, sys\n"
    "from flwr_dsparse.hardcap import join_cap_from_env\n"
    "print(open('/proc/self/cgroup').read(), flush=True)\n"
    "assert join_cap_from_env(resident_mb=10.0, label='features.15,classifier')\n"
    "block = bytearray(200 * 2**20)\n"
)


@needs_cap
def test_a_node_starts_in_its_cgroup_and_a_clientapp_killed_by_its_cap_is_reported(tmp_path) -> None:
    import subprocess

    from flwr_dsparse.deploy.caps import NodeCap

    cap = NodeCap.create("supernode-3", 60.0, tmp_path / "supernode-3.cap.json")
    try:
        # The node's command (a SuperNode; here a stand-in ClientApp) starts inside the node cgroup.
        command = cap.command([sys.executable, "-c", TRAIN_OVER_CAP])
        done = subprocess.run(command, env={**__import__("os").environ, **cap.env()}, capture_output=True, text=True)
        assert done.returncode != 0
        assert cap.node.split("/memory", 1)[-1] in done.stdout  # started in the node cgroup, not moved out
        assert cap.oom_kills == 1
        report = cap.report()
        assert report.startswith("supernode-3: KILLED by the hard cap of 50.0 MB (budget 60 MB less 10.0 MB")
        assert "[features.15,classifier]" in report
    finally:
        cap.close()
    assert not Path(cap.node).exists()


@needs_cap
def test_start_supernode_runs_the_node_under_its_cap(tmp_path) -> None:
    from flwr_dsparse.deploy.caps import NodeCap
    from flwr_dsparse.deploy.cluster import start_supernode
    from flwr_dsparse.deploy.processes import stop_processes
    from flwr_dsparse.ports import free_port

    script = tmp_path / "fake-supernode"
    script.write_text("#!/bin/sh\ncat /proc/self/cgroup\necho CAP=$DSPARSE_HARD_CAP_CGROUP\nexec sleep 30\n")
    script.chmod(0o755)
    cap = NodeCap.create("supernode-0", 80.0, tmp_path / "supernode-0.cap.json")
    record = start_supernode(
        tmp_path,
        home=tmp_path,
        superlink="127.0.0.1:1",
        port=free_port(),
        node_config={"partition-id": 0},
        executable=str(script),
        hard_cap=cap,
    )
    try:
        for _ in range(100):
            if "CAP=" in Path(record.log).read_text():
                break
            time.sleep(0.05)
        assert str(record.pid) in (Path(cap.node) / "cgroup.procs").read_text().split()
        assert f"CAP={cap.train}" in Path(record.log).read_text()
        assert cap.report() is None
    finally:
        stop_processes([record], grace=1.0)
        cap.close()


def test_hard_cap_needs_a_budget_for_every_node(tmp_path) -> None:
    from flwr_dsparse.deploy.cluster import start_deployment

    with pytest.raises(ValueError, match="--hard-cap caps each node at its budget"):
        start_deployment(2, memory_mb=[80.0, None], hard_cap=True, home=tmp_path, port=None)


def test_hard_cap_says_why_not_where_the_os_allows_none(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr_dsparse.deploy.cluster as cluster

    monkeypatch.setattr(cluster, "hard_caps_available", lambda: (False, "hard caps unavailable: no memory cgroup"))
    with pytest.raises(RuntimeError, match="--hard-cap: hard caps unavailable: no memory cgroup; run without"):
        cluster.start_deployment(1, memory_mb=[80.0], hard_cap=True, home=tmp_path, port=None)
