"""The dsparse command line: `dsparse plan` output and its errors."""

from __future__ import annotations

import json

import pytest

from flwr_dsparse.cli import main as cli_main


def test_plan_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main(
            ["plan", "--model", "tiny", "--batch-size", "16", "--budgets", "12,20,40", "--scorer", "depth", "--json"]
            + ["--objective", "criticality"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["objective"] == "criticality"  # the flag reaches the planner (default: balanced)
    device = data["devices"][0]
    assert set(device) >= {"id", "budget_mb", "batch_size", "units", "params", "predicted_mb"}
    assert set(device["predicted_mb"]) >= {"weights", "grads", "optimizer", "activations", "reserve", "total"}
    group = data["groups"][0]
    assert set(group) >= {"members", "units", "params", "allreduce", "broadcast"}
    assert set(group["broadcast"]) == {"root", "receivers", "bytes"}
    assert "frozen_units" in data


def test_cli_reports_bad_budgets_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--model", "tiny", "--budgets", "80,x"]) == 2
    assert "--budgets: item 1 ('x') is not a number" in capsys.readouterr().err
