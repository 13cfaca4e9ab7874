"""Real Flower deployment on loopback: flower-superlink and flower-supernode processes.

The process tests are marked ``deployment`` (skip locally with ``-m "not deployment"``);
the helper tests at the end start nothing and always run. Every process a test
starts is stopped in a fixture's ``finally``, also when the test fails, and the fixture
checks that none survived.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flwr_dsparse.deploy import (
    Deployment,
    ProcessRecord,
    format_node_config,
    list_nodes,
    make_certificates,
    make_node_keys,
    process_alive,
    run_app,
    start_deployment,
    start_supernode,
    stop_deployment,
    stop_processes,
    superlink_command,
    supernode_command,
    write_connection,
)
from flwr_dsparse.ports import free_port

REPO = Path(__file__).resolve().parents[1]
# A job small enough for 2 shared cores: the tiny model, a few local steps of small
# batches, a small slice of the embedded data.
SMALL_JOB = {
    "model": "tiny",
    "batch-size": 16,
    "local-steps": 3,
    "lr": 0.05,
    "train-examples": 600,
    "test-examples": 200,
    "min-nodes": 2,
    "round-timeout": 240.0,
    # test_three_budgets_end_to_end needs three nested selections: the memory-only plan gives
    # them deterministically (the balanced one depends on timed steps).
    "plan-objective": "criticality",
}


def _check_app_config() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert "[tool.flwr.app.components]" in text, (
        "pyproject.toml lacks [tool.flwr.app.components]; `flwr run .` needs the DSparse app wired there"
    )


@pytest.fixture
def deployments(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    """Start deployments (and loose processes) for a test; stop all of them afterwards."""
    started: list[Deployment] = []
    loose: list[ProcessRecord] = []

    def start(num_nodes: int, **kwargs: Any) -> Deployment:
        kwargs.setdefault("home", tmp_path / "flwr-home")
        kwargs.setdefault("state_dir", tmp_path / f"state-{len(started)}")
        kwargs.setdefault("port", None)  # a free port: tests never collide with a user's SuperLink
        kwargs.setdefault("timeout", 120.0)
        deployment = start_deployment(num_nodes, **kwargs)
        started.append(deployment)
        return deployment

    start.loose = loose  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        stop_processes(loose)
        for deployment in started:
            stop_deployment(deployment)
        survivors = [r.pid for d in started for r in d.processes if process_alive(r)] + [
            r.pid for r in loose if process_alive(r)
        ]
        assert not survivors, f"processes survived teardown: {survivors}"


def _run(deployment: Deployment, run_config: dict[str, Any], out: Path, timeout: float = 420.0) -> dict[str, Any]:
    """Run the DSparse app on ``deployment`` and return its metrics.json."""
    result = run_app(
        deployment, REPO, {**run_config, "out-dir": str(out)}, timeout=timeout, log=out.parent / f"{out.name}.log"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    metrics = out / "metrics.json"
    assert metrics.is_file(), f"no metrics.json in {out}; run output:\n{output[-3000:]}"
    return json.loads(metrics.read_text())


def _refused(record: ProcessRecord, timeout: float = 60.0) -> str:
    """Wait for a SuperNode that should be turned away to give up; return its log."""
    deadline = time.monotonic() + timeout
    while process_alive(record) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not process_alive(record), f"{record.role} is still trying after {timeout:.0f} s"
    return Path(record.log).read_text(errors="replace")


@pytest.mark.deployment
def test_tls_and_node_auth_round_wrong_ca_and_stranger_refused(
    deployments: Callable[..., Deployment], tmp_path: Path
) -> None:
    """One round over TLS with SuperNode authentication; a wrong CA and an unregistered key are refused."""
    _check_app_config()
    deployment = deployments(2, tls=True, auth=True, memory_mb=[400.0, 400.0])
    assert deployment.tls is not None
    command = deployment.superlink.command
    assert "--ssl-certfile" in command and "--enable-supernode-auth" in command and "--insecure" not in command
    assert "--disable-runtime-dependency-installation" in command
    for node in deployment.supernodes:
        assert node.command[node.command.index("--root-certificates") + 1] == deployment.tls.ca_cert
        assert "--auth-supernode-private-key" in node.command and "--insecure" not in node.command

    # Two would-be SuperNodes, started together to share the wait: one trusts another CA
    # (TLS verification fails), one has a key the SuperLink never registered.
    wrong = make_certificates(tmp_path / "wrong-ca")
    stranger_key = make_node_keys(tmp_path / "stranger-key", "stranger")
    intruders = []
    for name, root, key in (
        ("wrong-ca", wrong.ca_cert, None),
        ("stranger", deployment.tls.ca_cert, stranger_key.private_key),
    ):
        record = start_supernode(
            tmp_path / "intruders",
            home=deployment.flwr_home,
            superlink=deployment.address,
            port=free_port(),
            node_config={"partition-id": 0, "num-partitions": 2},
            root_certificates=root,
            private_key=key,
            name=name,
            max_retries=2,
            max_wait_time=15,
        )
        deployments.loose.append(record)  # type: ignore[attr-defined]
        intruders.append(record)

    # One round of the app over TLS (Flower's FedAvg path of the app: it needs no planner).
    out = tmp_path / "tls-out"
    metrics = _run(deployment, {**SMALL_JOB, "method": "fedavg", "num-server-rounds": 1}, out)
    assert [row["round"] for row in metrics["rounds"]] == [0, 1]
    assert sorted(metrics["rounds"][1]["devices"]) == ["0", "1"]
    assert (out / "final_model.pt").is_file()

    wrong_log = _refused(intruders[0])
    assert re.search(r"CERTIFICATE_VERIFY_FAILED", wrong_log), wrong_log[-2000:]
    stranger_log = _refused(intruders[1])
    assert "Failed to activate SuperNode" in stranger_log, stranger_log[-2000:]
    assert len(list_nodes(deployment.connection, deployment.env())) == 2

    # The flwr CLI with the wrong CA is refused too.
    # (It reports a failed handshake as "Connection to the SuperLink is unavailable".)
    write_connection(deployment.flwr_home, "wrong-ca", deployment.address, root_certificates=wrong.ca_cert)
    with pytest.raises(RuntimeError, match="(?i)unavailable|certificate|ssl"):
        list_nodes("wrong-ca", deployment.env(), timeout=60)


@pytest.mark.deployment
@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
def test_three_budgets_end_to_end(deployments: Callable[..., Deployment], tmp_path: Path, fast: bool) -> None:
    """The DSparse app on 3 SuperNodes, stock and in fast mode: the same plan and the same guarantees."""
    _check_app_config()
    from flwr_dsparse.models import build_model
    from flwr_dsparse.plan import Plan
    from flwr_dsparse.units import model_units, unit_tensor_names

    # TinyNet at batch 16 needs 3.51 MB (classifier only), 4.17 (+features.4), 5.01
    # (+features.3), 5.87 (+features.2) ... by the cost model (memory-only plan). These budgets
    # fall between those steps, so the plan must differ per node, and no node affords the first units.
    budgets = [3.6, 4.27, 5.5]
    deployment = deployments(3, memory_mb=budgets, fast=fast)
    assert [node.node_config["memory-mb"] for node in deployment.supernodes] == budgets
    assert deployment.fast is fast
    if fast:  # the SuperNodes run through the fast launcher, which puts its SuperExec on PATH
        assert all(Path(node.command[0]).parent.name == "fast-bin" for node in deployment.supernodes)

    out = tmp_path / "e2e-out"
    metrics = _run(deployment, {**SMALL_JOB, "method": "dsparse", "num-server-rounds": 2}, out)
    assert [row["round"] for row in metrics["rounds"]] == [0, 1, 2]
    for name in ("metrics.json", "metrics.csv", "plan.json", "final_model.pt"):
        assert (out / name).is_file(), name

    # The plan follows the budgets: three different selections, nested by budget.
    plan = Plan.from_json((out / "plan.json").read_text())
    by_budget = sorted(plan.devices, key=lambda device: device.budget_mb)
    assert [device.budget_mb for device in by_budget] == budgets
    selections = [tuple(device.units) for device in by_budget]
    assert len(set(selections)) == 3, selections
    sizes = [len(device.params) for device in by_budget]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes
    for row in metrics["rounds"][1:]:
        assert len(row["devices"]) == 3, row
    if fast:  # every patch applied: no "left stock" warning in any process's log
        logs = {record.role: Path(record.log).read_text(errors="replace") for record in deployment.processes}
        assert not [role for role, text in logs.items() if "left stock" in text], logs

    # Only trained units changed: every tensor outside the union of selections is
    # bit-identical to the initial model, and some trained tensor moved.
    model = build_model("tiny", seed=0)
    initial = model.state_dict()
    final = torch.load(out / "final_model.pt")
    trained = set(unit_tensor_names(model_units(model), sorted({u for s in selections for u in s})))
    assert trained and trained != set(initial), "the budgets should leave some units frozen for all"
    for name, tensor in initial.items():
        if name not in trained:
            assert torch.equal(final[name], tensor), f"{name} changed but no node trained it"
    for unit in {u for s in selections for u in s}:
        names = unit_tensor_names(model_units(model), [unit])
        assert any(not torch.equal(final[n], initial[n]) for n in names if initial[n].is_floating_point()), (
            f"{unit} was selected but did not change"
        )


@pytest.mark.deployment
@pytest.mark.faults
def test_supernode_killed_mid_round_collective_falls_back_and_replans(
    deployments: Callable[..., Deployment], tmp_path: Path
) -> None:
    """kill -9 of a SuperNode (and its ClientApp) during round 2 of a collective-transport run.

    What a user relies on: the surviving ranks get the collective timeout error instead of
    hanging; the round is redone with the server-side transport and completes with the
    replies that arrived; the dead device is recorded as missing; the group only it
    trained keeps its tensors; the next round re-plans without it and goes back to the
    collective; the run ends with every round and no NaN.
    """
    _check_app_config()
    from experiments.fault_matrix import KILL_BUDGETS_MB, run_supernode_kill
    from flwr_dsparse.models import build_model
    from flwr_dsparse.units import model_units, unit_tensor_names

    deployment = deployments(3, memory_mb=list(KILL_BUDGETS_MB))
    row = run_supernode_kill(tmp_path, transport="collective", victim=2, deployment=deployment)
    assert row["returncode"] == 0, row["output-tail"]
    assert not process_alive(deployment.supernodes[2])
    assert row["ok"] and row["rounds-lost"] == 0 and row["corrupt-applied"] == 0, row["outcome"]
    one, two, three = row["history"]
    assert [one["round"], two["round"], three["round"]] == [1, 2, 3]
    assert one["transport"] == "collective" and one["accepted"] == [0, 1, 2]

    # Round 2: the collective failed (the survivors' replies carry the collective error, not
    # a hang), and the server-side transport redid the round with the survivors.
    fallback = [event for event in two["events"] if event["event"] == "collective-fallback"]
    assert fallback and "failed the collective round" in fallback[0]["reason"], two["events"]
    # (a CollectiveError naming the group and the timeout, seconds after the kill)
    assert re.search(r"CollectiveError.*failed (on|for) rank [01].*timeout", fallback[0]["reason"]), fallback[0][
        "reason"
    ]
    assert two["transport"] == "server" and two["accepted"] == [0, 1] and two["missing"] == [2], two
    assert two["attempts"] == 2

    # Round 3: re-planned without device 2, back on the collective with ranks 0 and 1.
    replan = [event for event in three["events"] if event["event"] == "replan"]
    assert replan and "devices [2] left" in replan[0]["reason"], three["events"]
    assert sorted(three["devices"]) == ["0", "1"] and three["accepted"] == [0, 1]
    assert three["transport"] == "collective"

    # What only device 2 trained is exactly as after round 1 (corrupt-applied counts any
    # change there); the survivors' units moved.
    final, before = row["final"], row["before"]
    assert row["only_victim"], "the budgets should give device 2 units of its own"
    assert all(torch.equal(final[name], before[name]) for name in row["only_victim"])
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    survivor_units = sorted({u for d in (0, 1) for u in row["plan"].device(d).units})
    moved = unit_tensor_names(model_units(build_model("tiny", seed=0)), survivor_units)
    assert any(not torch.equal(final[n], before[n]) for n in moved if before[n].is_floating_point())


# ----------------------------------------------------------------------------- helpers (no processes)


def test_node_and_run_config_strings() -> None:
    assert format_node_config({"memory-mb": 80.0, "partition-id": 0, "num-partitions": 3}) == (
        "memory-mb=80.0 partition-id=0 num-partitions=3"
    )
    assert format_node_config({"name": 'a "b"', "flag": True}) == 'name="a \\"b\\"" flag=true'
    with pytest.raises(ValueError, match="must be bool, int, float or str"):
        format_node_config({"bad": [1]})


def test_commands_always_disable_runtime_installs_and_need_tls_for_auth(tmp_path: Path) -> None:
    insecure = superlink_command(port=1234)
    assert "--insecure" in insecure and "--disable-runtime-dependency-installation" in insecure
    tls = make_certificates(tmp_path)
    secure = superlink_command(port=1234, tls=tls, auth=True)
    assert secure[secure.index("--ssl-ca-certfile") + 1] == tls.ca_cert and "--enable-supernode-auth" in secure
    with pytest.raises(ValueError, match="needs TLS"):
        superlink_command(auth=True)
    node = supernode_command(superlink="127.0.0.1:1234", port=9, node_config={"memory-mb": 80.0})
    assert node[node.index("--node-config") + 1] == "memory-mb=80.0" and "--insecure" in node


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    files = make_certificates(tmp_path, hosts=["127.0.0.1", "edge-link.local"])
    ca = x509.load_pem_x509_certificate(Path(files.ca_cert).read_bytes())
    server = x509.load_pem_x509_certificate(Path(files.server_cert).read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["edge-link.local"]
    assert oct(Path(files.server_key).stat().st_mode & 0o777) == "0o600"
    other = x509.load_pem_x509_certificate(Path(make_certificates(tmp_path / "other").ca_cert).read_bytes())
    with pytest.raises((ValueError, InvalidSignature)):
        server.verify_directly_issued_by(other)


def test_write_connection_keeps_other_entries(tmp_path: Path) -> None:
    import tomli

    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_connection(tmp_path, "dsparse-local", "127.0.0.1:8000")
    write_connection(tmp_path, "edge", "10.0.0.1:8000", root_certificates=str(tmp_path / "ca.crt"))
    data = tomli.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert data["default"] == "local" and data["local"] == {"address": ":local:"}
    assert data["dsparse-local"] == {"address": "127.0.0.1:8000", "insecure": True}
    assert data["edge"] == {"address": "10.0.0.1:8000", "root-certificates": str(tmp_path / "ca.crt")}


def test_start_deployment_rejects_bad_arguments_before_starting(tmp_path: Path) -> None:
    kwargs = {"home": tmp_path, "state_dir": tmp_path / "state", "port": None}
    with pytest.raises(ValueError, match="2 memory-mb values for 3 SuperNodes"):
        start_deployment(3, memory_mb=[80.0, 90.0], **kwargs)
    with pytest.raises(ValueError, match="memory-mb for SuperNode 1 is -5.0"):
        start_deployment(2, memory_mb=[80.0, -5.0], **kwargs)
    with pytest.raises(ValueError, match="needs TLS"):
        start_deployment(1, auth=True, **kwargs)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        start_deployment(0, **kwargs)
    assert not (tmp_path / "state").exists()


def test_stop_processes_kills_the_whole_tree(tmp_path: Path) -> None:
    # A parent in its own session whose child starts a session of its own (as SuperExec
    # does): stopping the parent's record must stop the grandchild too.
    import sys

    import psutil

    from flwr_dsparse.deploy import spawn_process

    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    record = spawn_process("parent", [sys.executable, "-c", script], tmp_path / "parent.log", {}, 0)
    deadline = time.monotonic() + 20
    while not psutil.Process(record.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = psutil.Process(record.pid).children()[0]
    signalled = stop_processes([record], grace=5)
    assert record.pid in signalled and child.pid in signalled
    assert not process_alive(record)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_stop_processes_names_a_process_that_outlives_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A process still there after SIGKILL (e.g. stuck in a kernel wait) is named, with the command to retry."""
    import sys

    from flwr_dsparse.deploy import processes, spawn_process

    record = spawn_process("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "s.log", {}, 0)
    monkeypatch.setattr(processes, "_wait_gone", lambda procs, timeout: list(procs))  # every wait: still running
    stop_processes([record], grace=1)
    err = capsys.readouterr().err
    assert f"processes {record.pid} still run after SIGKILL; stop them with: kill -9 {record.pid}" in err


# ----------------------------------------------------------------------------- fast mode (no processes)


def test_fast_mode_version_guard_and_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a Flower other than 1.42.* nothing is patched: one warning, then the stock path."""
    import flwr
    from flwr.superlink.grid.http_grid import HttpGrid

    from flwr_dsparse.deploy import fast as fast_mode
    from flwr_dsparse.deploy import fast_patches, fast_setup

    assert fast_mode.flower_version_problem("1.42.3") is None
    assert "Flower 1.43.0 is installed" in fast_mode.flower_version_problem("1.43.0")
    stock = HttpGrid.send_and_receive
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with caplog.at_level("WARNING"):
        assert fast_setup(tmp_path / "state", tmp_path / "home") == ({}, {})
    assert [r.getMessage() for r in caplog.records] == [
        "dsparse deploy --fast: Flower 1.43.0 is installed; the fast-mode patches are written for 1.42.*; "
        "starting the stock deployment instead"
    ]
    assert not (tmp_path / "state" / "fast-bin").exists()
    warned: list[str] = []
    monkeypatch.setattr(fast_patches, "warn_stock", lambda part, reason: warned.append(f"{part}: {reason}"))
    assert fast_mode.poll_grid_replies() is False and fast_mode.bound_supernode_sleeps() is False
    assert fast_mode.fork_task_processes() is False and fast_mode.fast_object_pulls() is False
    assert fast_mode.reuse_installed_fabs() is False
    assert HttpGrid.send_and_receive is stock
    assert len(warned) == 5 and all("Flower 1.43.0 is installed" in line for line in warned), warned


def test_fast_fab_install_happens_once_per_fab_and_again_when_its_folder_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from flwr_dsparse.deploy.fast_patches import reuse_installed_fabs

    # The modules (their packages export functions of the same names).
    run_clientapp = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    run_serverapp = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    installs: list[bytes] = []

    def flowers_install(fab: bytes, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        installs.append(fab)
        folder = Path(install_dir) / "apps" / f"app-{len(installs)}"
        folder.mkdir(parents=True)
        return folder

    for module in (run_clientapp, run_serverapp):  # restored after the test, patched or not
        monkeypatch.setattr(module, "install_from_fab", flowers_install)
    assert reuse_installed_fabs() and reuse_installed_fabs()  # a second call does not wrap twice
    install = run_clientapp.install_from_fab
    first = install(b"fab-1", tmp_path, skip_prompt=True)
    assert install(b"fab-1", tmp_path, skip_prompt=True) == first and installs == [b"fab-1"]
    assert run_serverapp.install_from_fab(b"fab-1", tmp_path, skip_prompt=True) == first  # the same marker
    other = install(b"fab-2", tmp_path, skip_prompt=True)  # other bytes: installed
    assert other != first and installs == [b"fab-1", b"fab-2"]
    first.rmdir()  # the installed folder removed: Flower installs it again
    assert install(b"fab-1", tmp_path, skip_prompt=True) != first and len(installs) == 3
    assert install(b"fab-1", tmp_path) and len(installs) == 4  # a prompt would be asked: always Flower's


def test_fast_launcher_builds_spare_models_a_clientapp_child_inherits(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr_dsparse import node_state
    from flwr_dsparse.deploy.fast_launcher import WARM_MODELS_ENV, build_spare_models, warm_models_from_env
    from flwr_dsparse.models import MODELS

    assert warm_models_from_env({}) == list(MODELS) and warm_models_from_env({WARM_MODELS_ENV: ""}) == []
    assert warm_models_from_env({WARM_MODELS_ENV: "tiny, mobilenet_v2"}) == ["tiny", "mobilenet_v2"]
    node_state.clear()
    try:
        assert build_spare_models(["tiny", "no-such-model"]) == ["no-such-model"]
        spare = node_state.spare_model("tiny")
        assert spare is not None and node_state.spare_model("tiny") is None  # one each
        assert all(param.grad is None for param in spare.parameters())
    finally:
        node_state.clear()


def test_fast_launchers_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import sys

    from flwr_dsparse.deploy import fast_setup

    monkeypatch.delenv("DSPARSE_DATA_CACHE", raising=False)
    monkeypatch.delenv("DSPARSE_REPLICA_STORE", raising=False)

    env, launchers = fast_setup(tmp_path / "state", tmp_path / "home")
    assert sorted(launchers) == ["flower-superexec", "flower-supernode"]
    for name, path in launchers.items():
        assert os.access(path, os.X_OK)
        assert Path(path).read_text().splitlines()[-1] == (
            f'exec {sys.executable} -m flwr_dsparse.deploy.fast {name} "$@"'
        )
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "state" / "fast-bin")
    assert str(Path(sys.executable).parent) in env["PATH"].split(os.pathsep)
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.25" and env["FLWR_DSPARSE_FAST_POLL"] == "0.02,0.25"
    # The ClientApps keep their split and partitions in the deployment's folder (unless the user named one).
    assert env["DSPARSE_DATA_CACHE"] == str(tmp_path / "state" / "data-cache")
    # ... and each node's durable replica on its disk, not in context.state.
    assert env["DSPARSE_REPLICA_STORE"] == str(tmp_path / "state" / "replica-store")


def test_fast_task_command_matches_flowers_subprocess_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forked child parses the very command line Flower's SubprocessExecutor would start."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, subprocess_executor

    from flwr_dsparse.deploy.fast_launcher import task_argv

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **_: started.append(list(args)))
    for task_type, insecure in ((TaskType.CLIENT_APP, True), (TaskType.SERVER_APP, False)):
        spec = ExecutionSpec(
            task_type=task_type,
            runtime_api_address="127.0.0.1:9094",
            token="tok",
            insecure=insecure,
            root_certificates_path=None if insecure else "/ca.pem",
            runtime_dependency_install=False,
            parent_pid=42,
            suppress_output=False,
            task_id=7,
        )
        subprocess_executor.SubprocessExecutor().launch(spec)
        assert started[-1] == task_argv(spec)


def test_fast_reply_polling_returns_every_reply_and_backs_off() -> None:
    from types import SimpleNamespace

    from flwr_dsparse.deploy.fast_patches import PollBackoff, polling_send_and_receive

    backoff = PollBackoff(0.01, 0.04)
    assert [round(backoff.next(), 4) for _ in range(5)] == [0.01, 0.015, 0.0225, 0.0338, 0.04]
    backoff.reset()
    assert backoff.next() == 0.01
    with pytest.raises(ValueError, match="0 < first <= longest"):
        PollBackoff(0.5, 0.1)

    def reply(to: str) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))

    class Grid:
        def __init__(self, batches: list[list[str]]) -> None:
            self.batches, self.pulls = batches, 0

        def push_messages(self, messages: Any) -> list[str]:
            return ["a", "b", "c"]

        def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
            self.pulls += 1
            return [reply(i) for i in self.batches.pop(0)] if self.batches else []

    grid = Grid([[], ["b"], [], ["a", "c"]])
    arrived: list[tuple[str, int]] = []  # each reply, and the pull it came with
    replies = polling_send_and_receive(
        grid,
        [],
        timeout=5.0,
        first=0.001,
        longest=0.002,
        on_reply=lambda r: arrived.append((r.metadata.reply_to_message_id, grid.pulls)),
    )
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"] and grid.pulls == 4
    assert arrived == [("b", 2), ("a", 4), ("c", 4)]  # as each came in, not at the end

    # The strategy hands its per-reply check only to a grid whose send_and_receive takes it.
    from functools import partial

    from flwr_dsparse.strategy.rounds import streams_replies

    streaming = SimpleNamespace(send_and_receive=partial(polling_send_and_receive, grid, first=0.001))
    stock = SimpleNamespace(send_and_receive=lambda messages, *, timeout=None: [])
    assert streams_replies(streaming) and not streams_replies(stock)
    began = time.monotonic()
    missing = Grid([])
    assert polling_send_and_receive(missing, [], timeout=0.2, first=0.01, longest=0.05) == []
    assert 0.2 <= time.monotonic() - began < 2.0 and missing.pulls >= 4


def test_simulation_pickup_hands_pushed_messages_to_the_running_engine_loop() -> None:
    """The pushed message reaches the workers' queue through Flower's own loop's state and queue, once."""
    import queue
    import threading
    from types import SimpleNamespace

    from flwr.server.superlink.fleet.vce import vce_api

    from flwr_dsparse.deploy.fast_patches import SimulationPickup, fast_simulation_grid

    def message(node: int) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))

    class State:  # the LinkState's contract: each undelivered message is handed out once
        def __init__(self) -> None:
            self.undelivered: dict[int, list[SimpleNamespace]] = {}
            self.takers: list[str] = []

        def get_message_ins(self, node_id: int, limit: int | None) -> list[SimpleNamespace]:
            if threading.current_thread() is engine:
                return []  # the engine's own look comes "too late": only deliver() can hand it out
            taken = self.undelivered.pop(node_id, [])
            self.takers += [threading.current_thread().name] * len(taken)
            return taken

    state, workers, stop = State(), queue.Queue(), threading.Event()
    pickup = SimulationPickup(vce_api.add_messages_to_queue.__code__, state)
    assert pickup.engine() is None  # no engine loop yet: messages wait for it, as stock
    pickup.deliver([message(7)])
    other_run = SimulationPickup(vce_api.add_messages_to_queue.__code__, State())
    engine = threading.Thread(
        target=vce_api.add_messages_to_queue, args=(state, workers, {7: 0, 8: 1}, stop), name="engine"
    )
    engine.start()
    try:
        for _ in range(200):
            if pickup.engine() is not None:
                break
            time.sleep(0.005)
        assert pickup.engine() == (state, workers)
        assert other_run.engine() is None  # a loop over another LinkState is not this grid's engine
        pushed = [message(8), message(7)]
        state.undelivered = {7: [pushed[1]], 8: [pushed[0]]}
        pickup.deliver(pushed)
        assert [workers.get_nowait(), workers.get_nowait()] == pushed  # push order, at once
        assert workers.empty() and state.takers == [threading.current_thread().name] * 2
    finally:
        stop.set()
        engine.join(timeout=5)
    grid = SimpleNamespace(send_and_receive="stock")
    assert fast_simulation_grid(grid).send_and_receive == "stock"  # only Flower's InMemoryGrid is patched
