"""Real Flower deployment on loopback: flower-superlink and flower-supernode processes.

Marked ``deployment`` (skip locally with ``-m "not deployment"``). Every process a test
starts is stopped in a fixture's ``finally``, also when the test fails, and the fixture
checks that none survived.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from flwr_dsparse.deploy import (
    Deployment,
    ProcessRecord,
    _alive,
    list_nodes,
    make_certificates,
    run_app,
    start_deployment,
    start_supernode,
    stop_deployment,
    stop_processes,
    write_connection,
)

pytestmark = pytest.mark.deployment

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
        survivors = [r.pid for d in started for r in d.processes if _alive(r)] + [r.pid for r in loose if _alive(r)]
        assert not survivors, f"processes survived teardown: {survivors}"


def _run(deployment: Deployment, run_config: dict[str, Any], out: Path, timeout: float = 420.0) -> dict[str, Any]:
    """Run the DSparse app on ``deployment`` and return its metrics.json."""
    result = run_app(deployment, REPO, {**run_config, "out-dir": str(out)}, timeout=timeout, log=out.parent / f"{out.name}.log")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    metrics = out / "metrics.json"
    assert metrics.is_file(), f"no metrics.json in {out}; run output:\n{output[-3000:]}"
    return json.loads(metrics.read_text())


def test_tls_round_and_wrong_ca_refused(deployments: Callable[..., Deployment], tmp_path: Path) -> None:
    _check_app_config()
    deployment = deployments(2, tls=True, memory_mb=[400.0, 400.0])
    assert deployment.tls is not None
    assert "--ssl-certfile" in deployment.superlink.command and "--insecure" not in deployment.superlink.command
    for node in deployment.supernodes:
        assert node.command[node.command.index("--root-certificates") + 1] == deployment.tls.ca_cert
        assert "--insecure" not in node.command

    # One round of the app over TLS (Flower's FedAvg path of the app: it needs no planner).
    out = tmp_path / "tls-out"
    metrics = _run(deployment, {**SMALL_JOB, "method": "fedavg", "num-server-rounds": 1}, out)
    assert [row["round"] for row in metrics["rounds"]] == [0, 1]
    assert sorted(metrics["rounds"][1]["devices"]) == ["0", "1"]
    assert (out / "final_model.pt").is_file()

    # A SuperNode that trusts another CA cannot connect: TLS verification fails, it gives
    # up after its retries, and the SuperLink never lists it.
    wrong = make_certificates(tmp_path / "wrong-ca")
    intruder = start_supernode(
        tmp_path / "wrong-state",
        home=deployment.flwr_home,
        superlink=deployment.address,
        port=deployment.supernodes[-1].port + 1000,
        node_config={"partition-id": 0, "num-partitions": 2},
        root_certificates=wrong.ca_cert,
        name="intruder",
        max_retries=2,
        max_wait_time=15,
    )
    deployments.loose.append(intruder)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while _alive(intruder) and time.monotonic() < deadline:
        time.sleep(0.5)
    log = Path(intruder.log).read_text(errors="replace")
    assert re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", log, re.IGNORECASE), log[-2000:]
    assert len(list_nodes(deployment.connection, deployment.env())) == 2

    # The flwr CLI with the wrong CA is refused too.
    write_connection(deployment.flwr_home, "wrong-ca", deployment.address, root_certificates=wrong.ca_cert)
    # (The CLI reports a failed handshake as "Connection to the SuperLink is unavailable".)
    with pytest.raises(RuntimeError, match="(?i)unavailable|certificate|ssl"):
        list_nodes("wrong-ca", deployment.env(), timeout=60)


def test_three_budgets_end_to_end(deployments: Callable[..., Deployment], tmp_path: Path) -> None:
    _check_app_config()
    from flwr_dsparse.models import build_model
    from flwr_dsparse.plan import Plan
    from flwr_dsparse.units import model_units, unit_tensor_names

    # TinyNet at batch 16 needs 10.3 MB (classifier only), 11.9 (+features.4), 13.1
    # (+features.3) ... 17.9 MB (every unit) by the cost model. These budgets fall between
    # those steps, so the plan must differ per node, and no node affords the first units.
    budgets = [11.0, 12.5, 13.7]
    deployment = deployments(3, memory_mb=budgets)
    assert [node.node_config["memory-mb"] for node in deployment.supernodes] == budgets

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
