"""Scale: the DSparse app with 50 and 100 nodes (model='tiny'): planning time, round overhead and
server memory per node.

The nodes are the project's real ClientApp answered in-process by
:class:`flwr_dsparse.testing.LocalGrid` (one Context per node, one after another in this
process), so a round's overhead is ``round-seconds - sum of the nodes' step times`` (the nodes
run serially here); a Ray simulation of 100 actors does not fit this 2-core machine. Server
memory is the peak that ``tracemalloc`` sees over the run (Python allocations of the server
and of the in-process nodes; torch's own allocator is not traced), divided by the nodes;
tracemalloc also slows the run, so the overheads are upper bounds.

Usage::

    python -m experiments.sim_scale [--nodes 50 100] [--rounds 3] [--out experiments/results/sim_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch

from client.app import app
from flwr_dsparse.config import load_config
from flwr_dsparse.data import load_dataset
from flwr_dsparse.models import build_model
from flwr_dsparse.protocol import DeviceReport
from flwr_dsparse.testing import LocalGrid
from server.app import planner_plan_fn, run_job

REPO = Path(__file__).resolve().parents[1]
BUDGETS_MB = (11.0, 12.5, 13.7, 15.0, 17.9, 20.0, 25.0)  # the tiny model's range, cycled over the nodes


def job(nodes: int, rounds: int, out: Path) -> dict:
    return {
        "model": "tiny",
        "batch-size": 16,
        "lr": 0.05,
        "local-steps": 1,
        "train-examples": 20 * nodes,
        "test-examples": 64,
        "num-server-rounds": rounds,
        "min-nodes": nodes,
        "checkpoint": False,
        "sim-budgets-mb": ",".join(str(BUDGETS_MB[i % len(BUDGETS_MB)]) for i in range(nodes)),
        "plan-objective": "criticality",
        "out-dir": str(out),
    }


def planning_seconds(nodes: int, objective: str) -> float:
    config = load_config({**job(nodes, 1, Path("unused")), "plan-objective": objective})
    model = build_model("tiny", seed=0)
    train, _ = load_dataset(config.dataset, seed=config.seed, num_train=256, num_test=10)
    plan_fn = planner_plan_fn(model, config, (train.x[:64], train.y[:64]))
    reports = [DeviceReport(100 + d, d, b, config.batch_size, 20) for d, b in enumerate(config.budgets_mb)]
    started = time.perf_counter()
    plan = plan_fn(reports, model.state_dict())
    assert len(plan.devices) == nodes
    return time.perf_counter() - started


def run(nodes: int, rounds: int, work: Path) -> dict:
    out = work / f"n{nodes}"
    config = load_config(job(nodes, rounds, out))
    grid = LocalGrid(app, range(nodes), nodes)
    tracemalloc.start()
    started = time.perf_counter()
    run_job(grid, config)  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows = [r for r in json.loads((out / "metrics.json").read_text())["rounds"] if r.get("devices")]
    overheads = [
        r["round-seconds"] - sum(float(d.get("step-seconds", 0.0)) for d in r["devices"].values()) for r in rows
    ]
    return {
        "nodes": nodes,
        "rounds": len(rows),
        "run-wall-s": wall,
        "round-s": [r["round-seconds"] for r in rows],
        "overhead-s": overheads,
        "median-overhead-s": statistics.median(overheads),
        "overhead-per-node-ms": 1e3 * statistics.median(overheads) / nodes,
        "traced-peak-mib": peak / 2**20,
        "traced-peak-per-node-kib": peak / 1024 / nodes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "sim_scale.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    planning_seconds(7, "criticality")  # warm-up: the first plan of a process pays torch's start-up
    results = []
    with tempfile.TemporaryDirectory(prefix="dsparse-scale-") as tmp:
        for nodes in args.nodes:
            row = {
                "planning-s": {o: planning_seconds(nodes, o) for o in ("criticality", "balanced")},
                **run(nodes, args.rounds, Path(tmp)),
            }
            results.append(row)
            print(
                f"{nodes} nodes: planning {row['planning-s']['criticality']:.2f} s (criticality), "
                f"{row['planning-s']['balanced']:.2f} s (balanced); median overhead {row['median-overhead-s']:.2f} s "
                f"({row['overhead-per-node-ms']:.1f} ms per node); traced server+nodes peak "
                f"{row['traced-peak-mib']:.1f} MiB ({row['traced-peak-per-node-kib']:.0f} KiB per node)",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load-average": os.getloadavg(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
