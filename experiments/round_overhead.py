"""Round overhead: what a Flower round costs beyond its arithmetic, on every runtime, in one run.

For every round::

    overhead = round wall time - (sum of the nodes' step times) / min(nodes, cores)

the time a round spends on anything but arithmetic when as many nodes compute at once as
there are cores (a round's wall time is the ServerApp's ``round-seconds``: from
``configure_train`` to the end of ``aggregate_train``; a node's step time is its
``local-steps x step-seconds``). Rows, each DSparse and FedAvg:

* **simulation**: Flower's ``run_simulation`` with the project's apps (7 virtual nodes);
* **deployment (stock)**: ``flower-superlink`` and 3 ``flower-supernode`` processes on
  loopback (:mod:`flwr_dsparse.deploy`), driven by ``flwr run``;
* **deployment (fast)**: the same with ``start_deployment(fast=True)`` (``dsparse deploy
  up --fast``, :mod:`flwr_dsparse.deploy.fast`);
* **echo** beside each: ``experiments/echo_app``, a ClientApp that moves the same
  payload sizes per node (the median bytes each node received and sent in the real rows,
  in as many arrays as the real messages: 1 for DSparse's fused records, and for FedAvg as
  many as the model has tensors in that share of its bytes) and
  computes nothing: the floor of Flower's own transport for those bytes.

Usage::

    python -m experiments.round_overhead                      # MobileNetV2 at the defaults
    python -m experiments.round_overhead --quick              # tiny model, 2-3 rounds (a minute or two)
    python -m experiments.round_overhead --runtimes fast,stock --methods dsparse

It prints one table and writes JSON (default ``experiments/results/round_overhead.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ECHO_APP = REPO / "experiments" / "echo_app"
for folder in (REPO, ECHO_APP):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from experiments.output import write_json  # noqa: E402
from flwr_dsparse.deploy import FLOWER_ENV, Deployment, run_app, start_deployment, stop_deployment  # noqa: E402
from flwr_dsparse.protocol import STATE_SOURCES  # noqa: E402

os.environ.update(FLOWER_ENV)

RUNTIMES = ("simulation", "stock", "fast")
METHODS = ("dsparse", "fedavg")
QUICK_BUDGETS = "11,12.5,13.7,15,17.9,20,25"  # MB per partition id for the tiny model
FUSED_ARRAYS = 1  # arrays of a fused DSparse record (flwr_dsparse.records.fuse_record)
#: The two apps of every row pair: their folder and the file each writes into its ``out-dir``.
APPS = {"app": (REPO, "metrics.json"), "echo": (ECHO_APP, "echo.json")}
#: ``run(app, config)``: one run of an :data:`APPS` app on the runtime being measured, to its end.
RunApp = Callable[[str, dict[str, Any]], None]


def compute_seconds(devices: dict[str, Any], local_steps: int, cores: int) -> float:
    """The round's arithmetic: the nodes' step times summed, spread over min(nodes, cores)."""
    steps = [float(device.get("step-seconds", 0.0)) * local_steps for device in devices.values()]
    return sum(steps) / max(1, min(len(steps), cores))


def schedule_seconds(devices: dict[str, Any], local_steps: int, cores: int) -> float:
    """What the round's whole steps cost beyond :func:`compute_seconds` when split over the cores.

    Flower's simulation hands each message to the first free worker, in node order, and a
    node's steps cannot be split: 7 equal steps on 2 cores take 4 steps' time, not 3.5. This
    is the makespan of that greedy split (the steps only, nothing else) minus the even split.
    """
    workers = [0.0] * max(1, min(len(devices), cores))
    for _, device in sorted(devices.items(), key=lambda item: int(float(item[0]))):
        first_free = workers.index(min(workers))
        workers[first_free] += float(device.get("step-seconds", 0.0)) * local_steps
    return max(workers) - compute_seconds(devices, local_steps, cores)


def round_rows(
    metrics: dict[str, Any], local_steps: int, cores: int, *, whole_steps: bool = True
) -> list[dict[str, float]]:
    """Per training round of a DSparse/FedAvg run: wall time, arithmetic, overhead and bytes.

    ``whole_steps``: the nodes take turns on the cores a whole message at a time (Flower's
    simulation workers), so ``schedule-s`` applies; a deployment's node processes share the
    cores at once (0 there).
    """
    rows = []
    for row in metrics["rounds"]:
        devices = row.get("devices")
        if not devices:
            continue  # round 0: the initial evaluation, no training
        round_s = float(row["round-seconds"])
        compute_s = compute_seconds(devices, local_steps, cores)
        rows.append(
            {
                "round": row["round"],
                "round-s": round_s,
                "compute-s": compute_s,
                "overhead-s": round_s - compute_s,
                "schedule-s": schedule_seconds(devices, local_steps, cores) if whole_steps else 0.0,
                "down-bytes": {pid: float(d.get("bytes-down", d.get("bytes-recv", 0))) for pid, d in devices.items()},
                "up-bytes": {pid: float(d.get("bytes-up", d.get("bytes-sent", 0))) for pid, d in devices.items()},
                "state-sources": state_sources(devices),
            }
        )
    return rows


def state_sources(devices: dict[str, Any]) -> dict[str, int]:
    """How many of a round's nodes trained their live model, a refreshed one, or one loaded (a miss)."""
    counts = dict.fromkeys(STATE_SOURCES.values(), 0)
    for device in devices.values():
        if "state-source" in device:
            counts[STATE_SOURCES.get(int(device["state-source"]), "loaded")] += 1
    return counts


def echo_rows(result: dict[str, Any]) -> list[dict[str, float]]:
    return [
        {
            "round": r["round"],
            "round-s": r["round-seconds"],
            "compute-s": 0.0,
            "overhead-s": r["round-seconds"],
            "schedule-s": 0.0,
        }
        for r in result["rounds"]
    ]


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows) if rows else float("nan")

    return {
        "rounds": len(rows),
        "median-round-s": median("round-s"),
        "median-compute-s": median("compute-s"),
        "median-overhead-s": median("overhead-s"),
        "median-schedule-s": median("schedule-s"),
        "max-overhead-s": max((row["overhead-s"] for row in rows), default=float("nan")),
        "state-sources": {
            source: sum(row.get("state-sources", {}).get(source, 0) for row in rows)
            for source in STATE_SOURCES.values()
        },
    }


def payload_sizes(rows: list[dict[str, Any]], key: str) -> list[int]:
    """Median bytes per partition id over the rounds (the echo app's ``down-bytes``/``up-bytes``)."""
    pids = sorted({pid for row in rows for pid in row[key]}, key=lambda pid: int(float(pid)))
    return [int(statistics.median(row[key][pid] for row in rows if pid in row[key])) for pid in pids]


def model_tensors(model: str) -> tuple[int, int]:
    """(tensors, bytes) of ``model``'s state dict: how finely its payloads are cut into arrays."""
    from flwr_dsparse.models import build_model

    state = build_model(model, seed=0).state_dict()
    return len(state), sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def array_counts(nbytes: Sequence[int], tensors: int, total_bytes: int) -> list[int]:
    """Arrays for payloads of ``nbytes``: the model's tensor count in proportion to the bytes."""
    return [max(1, min(tensors, round(tensors * size / total_bytes))) for size in nbytes]


def join(values: Sequence[int]) -> str:
    return ",".join(str(value) for value in values)


class Bench:
    """One benchmark run: the job settings and the figures gathered so far."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.cores = os.cpu_count() or 1
        self.results: list[dict[str, Any]] = []

    def job(self, method: str, rounds: int, nodes: int, out: Path) -> dict[str, Any]:
        job: dict[str, Any] = {
            "method": method,
            "num-server-rounds": rounds,
            "min-nodes": nodes,
            "out-dir": str(out),
            "local-steps": self.args.local_steps,
        }
        if self.args.quick:
            job.update(
                {
                    "model": "tiny",
                    "batch-size": 16,
                    "lr": 0.05,
                    "train-examples": 600,
                    "test-examples": 200,
                    "sim-budgets-mb": QUICK_BUDGETS,
                }
            )
        return job

    def add(self, runtime: str, method: str, app: str, nodes: int, rows: list[dict[str, Any]], wall_s: float) -> None:
        entry = {
            "runtime": runtime,
            "method": method,
            "app": app,
            "nodes": nodes,
            "run-wall-s": wall_s,
            "summary": summarize(rows),
            "rounds": rows,
        }
        self.results.append(entry)
        s = entry["summary"]
        print(
            f"[{time.strftime('%H:%M:%S')}] {runtime:<10} {method:<7} {app:<6} "
            f"median round {s['median-round-s']:.2f} s, overhead {s['median-overhead-s']:.2f} s",
            flush=True,
        )

    def app_rows(self, runtime: str, method: str) -> list[dict[str, Any]]:
        for entry in self.results:
            if entry["runtime"] == runtime and entry["method"] == method and entry["app"] == "app":
                return entry["rounds"]
        return []

    def echo_config(self, runtime: str, method: str, rounds: int, nodes: int, out: Path) -> dict[str, Any]:
        """The echo app's run config: the bytes each node moved in the ``runtime``/``method`` row."""
        rows = self.app_rows(runtime, method)
        down, up = payload_sizes(rows, "down-bytes"), payload_sizes(rows, "up-bytes")
        if method == "dsparse":  # fused records: one Array of every dtype's buffer and the layout
            down_arrays, up_arrays = [FUSED_ARRAYS] * len(down), [FUSED_ARRAYS] * len(up)
        else:  # Flower's FedAvg: one array per tensor
            tensors, total = model_tensors("tiny" if self.args.quick else "mobilenet_v2")
            down_arrays, up_arrays = array_counts(down, tensors, total), array_counts(up, tensors, total)
        return {
            "num-server-rounds": rounds,
            "down-bytes": join(down),
            "up-bytes": join(up),
            "down-arrays": join(down_arrays),
            "up-arrays": join(up_arrays),
            "min-nodes": nodes,
            "out-dir": str(out),
        }

    def measure(self, runtime: str, method: str, rounds: int, nodes: int, run: RunApp) -> None:
        """The ``runtime``/``method`` rows: the app for ``rounds`` rounds on ``nodes`` nodes, then its echo.

        ``run(app, config)`` runs ``app`` (a key of :data:`APPS`) with the run config
        ``config`` to its end, on the runtime being measured; the app writes into
        ``config["out-dir"]``. The echo moves the bytes the app's row moved.
        """
        out = self.work / f"{runtime}-{method}"
        wall = time.perf_counter()
        run("app", self.job(method, rounds, nodes, out))
        metrics = json.loads((out / APPS["app"][1]).read_text())
        rows = round_rows(metrics, self.args.local_steps, self.cores, whole_steps=runtime == "simulation")
        self.add(runtime, method, "app", nodes, rows, time.perf_counter() - wall)
        echo_out = self.work / f"{runtime}-{method}-echo"
        config = self.echo_config(runtime, method, rounds, nodes, echo_out)
        wall = time.perf_counter()
        run("echo", config)
        echo = json.loads((echo_out / APPS["echo"][1]).read_text())
        self.add(runtime, method, "echo", nodes, echo_rows(echo), time.perf_counter() - wall)

    # ------------------------------------------------------------------ deployment

    def deployment(self, mode: str) -> None:
        args, nodes = self.args, self.args.nodes
        rounds = args.stock_rounds if mode == "stock" else args.rounds
        began = time.perf_counter()
        deployment = start_deployment(
            nodes,
            port=None,
            home=self.work / f"home-{mode}",
            state_dir=self.work / f"state-{mode}",
            fast=mode == "fast",
            timeout=300.0,
        )
        print(
            f"[{time.strftime('%H:%M:%S')}] {mode} deployment up in {time.perf_counter() - began:.1f} s"
            f" (fast mode {'on' if deployment.fast else 'off'})",
            flush=True,
        )
        try:
            for method in args.methods:
                self.measure(mode, method, rounds, nodes, partial(self._run, deployment))
        finally:
            stop_deployment(deployment)

    def _run(self, deployment: Deployment, app: str, config: dict[str, Any]) -> None:
        """``flwr run`` of ``app`` on ``deployment``; fails unless it wrote its output file in ``out-dir``."""
        folder, output = APPS[app]
        log = Path(config["out-dir"]).with_suffix(".log")
        result = run_app(deployment, folder, config, timeout=self.args.timeout, log=log)
        if result.returncode != 0 or not (Path(config["out-dir"]) / output).is_file():
            raise RuntimeError(
                f"flwr run {folder.name} failed (exit {result.returncode}, no {output}); log {log}:\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )

    # ------------------------------------------------------------------ simulation

    def simulation(self) -> None:
        from echo_app import client_app as echo_client
        from echo_app import make_server_app as make_echo_server
        from flwr.simulation import run_simulation

        from client.app import app as client_app
        from server.app import make_server_app

        args, nodes = self.args, self.args.sim_nodes
        backend = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": self.cores, "include_dashboard": False},
        }
        apps = {"app": (make_server_app, client_app), "echo": (make_echo_server, echo_client)}

        def run(app: str, config: dict[str, Any]) -> None:
            server_app, app_client = apps[app]
            run_simulation(server_app(config), app_client, num_supernodes=nodes, backend_config=backend)

        for method in args.methods:
            self.measure("simulation", method, args.rounds, nodes, run)

    # ------------------------------------------------------------------ the JSON

    def document(self, load_before: Sequence[float], load_after: Sequence[float]) -> dict[str, Any]:
        """What the run writes: its settings, the machine and its load average around the run, every row."""
        return {
            "config": vars(self.args),
            "machine": {
                "node": platform.node(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg-before": load_before,
                "loadavg-after": load_after,
            },
            "results": self.results,
        }


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'runtime':<11} {'method':<8} {'nodes':>5} {'rounds':>6} {'round s':>8} {'compute s':>9} "
        f"{'overhead s':>10} {'schedule s':>10} {'echo floor s':>12} {'overhead/floor':>14}"
    )
    for entry in results:
        if entry["app"] != "app":
            continue
        s = entry["summary"]
        floor = next(
            (
                e["summary"]["median-round-s"]
                for e in results
                if e["app"] == "echo" and e["runtime"] == entry["runtime"] and e["method"] == entry["method"]
            ),
            float("nan"),
        )
        ratio = s["median-overhead-s"] / floor if floor == floor and floor > 0 else float("nan")
        print(
            f"{entry['runtime']:<11} {entry['method']:<8} {entry['nodes']:>5} {s['rounds']:>6} "
            f"{s['median-round-s']:>8.2f} {s['median-compute-s']:>9.2f} {s['median-overhead-s']:>10.2f} "
            f"{s['median-schedule-s']:>10.2f} {floor:>12.2f} {ratio:>14.2f}"
        )
    print(
        "(medians over the training rounds; overhead = round - compute; compute = sum of the nodes' step "
        "times / min(nodes, cores); schedule = the part of overhead that is whole steps split unevenly "
        "over the cores)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, small data, 2 stock / 3 fast and simulated rounds, 3 simulated nodes",
    )
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="subset of %(default)s")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of %(default)s")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes of the deployments (default %(default)s)")
    parser.add_argument("--sim-nodes", type=int, default=None, help="simulated nodes (default 7; 3 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the fast and simulation runs (default 6)")
    parser.add_argument("--stock-rounds", type=int, default=None, help="rounds of the stock runs (default 3)")
    parser.add_argument("--local-steps", type=int, default=1, help="the job's local-steps (default 1: per-step rounds)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per deployment run")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "round_overhead.json"))
    args = parser.parse_args(argv)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    args.methods = [m for m in args.methods.split(",") if m]
    for name, chosen, allowed in (("--runtimes", args.runtimes, RUNTIMES), ("--methods", args.methods, METHODS)):
        if not chosen or set(chosen) - set(allowed):
            parser.error(f"{name} {','.join(chosen)!r}: choose from {','.join(allowed)}")
    args.sim_nodes = args.sim_nodes or (3 if args.quick else 7)
    args.rounds = args.rounds or (3 if args.quick else 6)
    args.stock_rounds = args.stock_rounds or (2 if args.quick else 3)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dsparse-overhead-") as tmp:
        bench = Bench(args, Path(tmp))
        for runtime in ("stock", "fast", "simulation"):  # the deployments first: they are the slow part
            if runtime in args.runtimes:
                bench.simulation() if runtime == "simulation" else bench.deployment(runtime)
    load_after = os.getloadavg()
    print_table(bench.results)

    write_json(args.out, bench.document(load_before, load_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
