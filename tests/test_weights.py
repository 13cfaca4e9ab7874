"""Starting weights: ``load_weights`` checks, ``pretrain``, ``dsparse pretrain`` and the
app's ``initial-weights`` key (the nodes fine-tune from the server's file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flwr_dsparse.config import load_config
from flwr_dsparse.data import make_synthetic
from flwr_dsparse.models import build_model
from flwr_dsparse.weights import load_weights, pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_load_weights_round_trips_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    state = build_model("tiny", seed=3).state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    loaded = load_weights(path, "tiny")
    assert list(loaded) == list(state) and all(torch.equal(loaded[n], state[n]) for n in state)
    torch.save({"state_dict": state, "epoch": 4}, tmp_path / "wrapped.pt")  # a training script's checkpoint
    assert all(torch.equal(load_weights(tmp_path / "wrapped.pt", "tiny")[n], state[n]) for n in state)

    with pytest.raises(FileNotFoundError, match="initial-weights .*nowhere.pt.*dsparse pretrain --model tiny"):
        load_weights(tmp_path / "nowhere.pt", "tiny")
    with pytest.raises(ValueError, match="does not fit model 'mobilenet_v2'.*tensors missing"):
        load_weights(path, "mobilenet_v2")
    bad = dict(state)
    bad["classifier.1.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"classifier.1.weight has shape \(3, 3\)"):
        load_weights(tmp_path / "shape.pt", "tiny")
    bad = {n: t.clone() for n, t in state.items()}
    bad["classifier.1.bias"][0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="classifier.1.bias holds NaN or Inf"):
        load_weights(tmp_path / "nan.pt", "tiny")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a torch state dict"):
        load_weights(tmp_path / "junk.pt", "tiny", key="--weights")


def test_pretrain_learns_the_first_classes_and_is_reproducible() -> None:
    train, test = make_synthetic(1200, 400, seed=0)
    state, info = pretrain("tiny", train, steps=40, batch_size=32, lr=0.05, classes=4, seed=0)
    again, _ = pretrain("tiny", train, steps=40, batch_size=32, lr=0.05, classes=4, seed=0)
    assert all(torch.equal(state[n], again[n]) for n in state)  # same seed, same weights
    assert info.classes == [0, 1, 2, 3] and info.examples == int((train.y < 4).sum()) and len(info.losses) == 40
    model = build_model("tiny", seed=0)
    model.load_state_dict(state)
    model.eval()
    seen = test.y < 4
    with torch.no_grad():
        predictions = model(test.x[seen]).argmax(1)
    accuracy = float((predictions == test.y[seen]).float().mean())
    assert accuracy > 0.5, accuracy  # chance on 4 classes is 0.25
    with pytest.raises(ValueError, match="classes must be in 1..10"):
        pretrain("tiny", train, classes=11)


def test_dsparse_pretrain_writes_weights_that_load(tmp_path: Path) -> None:
    from flwr_dsparse.cli import main

    out = tmp_path / "w" / "tiny.pt"
    assert (
        main(
            [
                "pretrain",
                "--model",
                "tiny",
                "--out",
                str(out),
                "--steps",
                "3",
                "--batch-size",
                "16",
                "--train-examples",
                "200",
            ]
        )
        == 0
    )
    loaded = load_weights(out, "tiny")
    assert not all(torch.equal(loaded[n], t) for n, t in build_model("tiny", seed=0).state_dict().items())
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["steps"] == 3 and info["model"] == "tiny" and info["dataset"] == "synthetic"
    assert not list(out.parent.glob(".*.tmp"))


def test_the_job_fine_tunes_from_initial_weights(tmp_path: Path) -> None:
    """Nodes start from the server's file: tensors no device trains end exactly as in it."""
    from client.app import app
    from experiments.fault_matrix import SMALL_JOB
    from flwr_dsparse.plan import Plan
    from flwr_dsparse.testing import LocalGrid
    from flwr_dsparse.units import model_units, unit_tensor_names
    from server.app import run_job

    start = build_model("tiny", seed=7).state_dict()  # not what the job's seed 0 would build
    weights = tmp_path / "start.pt"
    torch.save(start, weights)
    # Budgets that leave the first units frozen for everyone.
    job = {
        **SMALL_JOB,
        "sim-budgets-mb": "3.79,3.79,4.27",
        "num-server-rounds": 2,
        "initial-weights": str(weights),
        "out-dir": str(tmp_path / "out"),
    }
    run_job(LocalGrid(app, range(3), 3), load_config(job))  # type: ignore[arg-type]
    final = torch.load(tmp_path / "out" / "final_model.pt")
    plan = Plan.from_json((tmp_path / "out" / "plan.json").read_text())
    trained = set(
        unit_tensor_names(model_units(build_model("tiny")), sorted({u for d in plan.devices for u in d.units}))
    )
    frozen = [name for name in start if name not in trained]
    assert frozen, plan.devices
    assert all(torch.equal(final[name], start[name]) for name in frozen)
    assert any(not torch.equal(final[name], start[name]) for name in trained if start[name].is_floating_point())


def test_a_bad_initial_weights_path_stops_before_any_node_is_contacted(tmp_path: Path) -> None:
    from experiments.fault_matrix import SMALL_JOB
    from server.app import run_job

    class NoNodes:
        def get_node_ids(self):
            raise AssertionError("a bad initial-weights reached the nodes")

        send_and_receive = get_node_ids

    config = load_config({**SMALL_JOB, "initial-weights": str(tmp_path / "missing.pt"), "out-dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="initial-weights .*missing.pt.*dsparse pretrain"):
        run_job(NoNodes(), config)  # type: ignore[arg-type]
