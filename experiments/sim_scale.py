"""Scale: the DSparse app with 50 and 100 nodes (model='tiny'): planning time, round overhead and
server memory per node.

The nodes are the project's real ClientApp answered in-process by
:class:`flwr_dsparse.testing.LocalGrid` (one Context per node, one after another in this
process), so a round's overhead is ``round-seconds - sum of the nodes' step times`` (the nodes
run serially here); a Ray simulation of 100 actors does not fit this 2-core machine.

Server memory is what the DSparse strategy holds at the run's end (:func:`held_bytes`: every
object reachable from it, tensors and arrays by their buffers, each counted once; the nodes'
own state is not the server's and is not reachable from it), and per node the growth from the
smallest node count to each larger one. The peak that ``tracemalloc`` sees over the run is
kept beside it (Python allocations of the server and of the in-process nodes; torch's own
allocator is not traced, so it is no measure of either); tracemalloc also slows the run, so
the overheads are upper bounds.

Usage::

    python -m experiments.sim_scale [--nodes 50 100] [--rounds 3] [--out experiments/results/sim_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

import server.app as server_app
from client.app import app
from flwr_dsparse.config import load_config
from flwr_dsparse.data import load_dataset
from flwr_dsparse.models import build_model
from flwr_dsparse.protocol import DeviceReport
from flwr_dsparse.strategy import DSparse
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


#: Reachable but not the strategy's own memory: code, and what every process shares.
_NOT_HELD = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, torch.dtype)


def held_bytes(root: Any) -> int:
    """Bytes of every object reachable from ``root``, a tensor's or array's buffer once however shared.

    Containers, instances (``__dict__`` and ``__slots__``) and their values are followed;
    classes, modules and functions are not (code, not data). A tensor counts its storage, a
    numpy array its base buffer, ``bytes`` its length.
    """
    seen_objects: set[int] = set()
    seen_buffers: set[int] = set()
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, _NOT_HELD):
            continue
        seen_objects.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_buffers:
                seen_buffers.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            if isinstance(base, np.ndarray) and base.ctypes.data not in seen_buffers:
                seen_buffers.add(base.ctypes.data)
                total += base.nbytes
            elif not isinstance(base, np.ndarray):
                stack.append(base)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif not isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None))):
            stack.extend(getattr(obj, "__dict__", {}).values())
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    stack.append(getattr(obj, name))
    return total


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
    strategies: list[DSparse] = []

    def keep(*args: Any, **kwargs: Any) -> DSparse:  # the run's strategy, to measure what it holds
        strategies.append(DSparse(*args, **kwargs))
        return strategies[-1]

    tracemalloc.start()
    started = time.perf_counter()
    with mock.patch.object(server_app, "DSparse", keep):
        run_job(grid, config)  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    (strategy,) = strategies
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
        "server-held-mib": held_bytes(strategy) / 2**20,
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
            if results:  # what one more node costs the server, from the smallest run to this one
                first = results[0]
                growth = (row["server-held-mib"] - first["server-held-mib"]) * 1024
                row["server-held-per-node-kib"] = growth / (nodes - first["nodes"])
            results.append(row)
            per_node = row.get("server-held-per-node-kib")
            print(
                f"{nodes} nodes: planning {row['planning-s']['criticality']:.2f} s (criticality), "
                f"{row['planning-s']['balanced']:.2f} s (balanced); median overhead {row['median-overhead-s']:.2f} s "
                f"({row['overhead-per-node-ms']:.1f} ms per node); the strategy holds {row['server-held-mib']:.2f} MiB"
                + (f" ({per_node:.1f} KiB per node more than at {results[0]['nodes']})" if per_node else "")
                + f"; traced server+nodes peak {row['traced-peak-mib']:.1f} MiB",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load-average": os.getloadavg(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
