"""Per-round fixed cost of a real Flower deployment, beside the simulation's, in one run.

The same job (same app, model, data, budgets, seeds, rounds) runs twice:

* **deployment**: a real ``flower-superlink`` and N ``flower-supernode`` processes on
  loopback (:mod:`flwr_dsparse.deploy`), driven by ``flwr run``;
* **simulation**: Flower's in-process simulation runtime (``run_simulation``) with N
  virtual SuperNodes.

For every round the ServerApp records the round's wall time (``round-seconds``: from
``configure_train`` to the end of ``aggregate_train``) and each node reports its mean
time per training step. The training time of a round is the slowest node's
``local-steps x step-seconds`` (in deployment this includes the first step's warm-up in a
fresh process); the rest of the round is **overhead**: message transport,
polling, and, in deployment, one ClientApp process started per message (Python, torch and
the data loaded again every round). That fixed cost is why the deployment settings are
``local-steps`` K > 1 (one round per epoch), not per-step rounds.

Usage::

    python experiments/deploy_overhead.py                      # 3 nodes, 3 rounds, K=4
    python experiments/deploy_overhead.py --local-steps 1,8 --rounds 2 --out overhead.json

It prints one table (deployment beside simulation for every K) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flwr_dsparse.deploy import FLOWER_ENV, run_app, start_deployment, stop_deployment  # noqa: E402

os.environ.update(FLOWER_ENV)


def round_figures(metrics: dict[str, Any], local_steps: int) -> list[dict[str, float]]:
    """Per training round: wall time, the slowest node's training time, and the overhead."""
    rows = []
    for row in metrics["rounds"]:
        devices = row.get("devices")
        if not devices:
            continue  # round 0: the initial evaluation, no training
        train_s = max(float(d.get("step-seconds", 0.0)) * local_steps for d in devices.values())
        round_s = float(row["round-seconds"])
        rows.append({"round": row["round"], "round-s": round_s, "train-s": train_s, "overhead-s": round_s - train_s})
    return rows


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in rows) if rows else float("nan")

    return {
        "rounds": len(rows),
        "mean-round-s": mean("round-s"),
        "mean-train-s": mean("train-s"),
        "mean-overhead-s": mean("overhead-s"),
        "overhead-share": mean("overhead-s") / mean("round-s") if rows and mean("round-s") > 0 else float("nan"),
    }


def clientapp_start_seconds(repeats: int = 2) -> float:
    """Wall time of a fresh interpreter importing the ClientApp (torch, Flower, this package).

    Deployment pays this for every message: the SuperNode starts a new ClientApp process
    each time. The median of ``repeats`` cold starts.
    """
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], cwd=REPO, check=True, env=dict(os.environ))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def job(args: argparse.Namespace, local_steps: int, out: Path) -> dict[str, Any]:
    return {
        "method": args.method,
        "model": args.model,
        "num-server-rounds": args.rounds,
        "local-steps": local_steps,
        "batch-size": args.batch_size,
        "train-examples": args.train_examples,
        "test-examples": args.test_examples,
        "sim-budgets-mb": ",".join(f"{b:g}" for b in args.budgets),
        "min-nodes": args.nodes,
        "out-dir": str(out),
    }


def run_deployment(args: argparse.Namespace, steps_list: Sequence[int], work: Path) -> dict[int, dict[str, Any]]:
    """One deployment for every K: start-up is paid once and reported on its own."""
    started = time.perf_counter()
    deployment = start_deployment(
        args.nodes, memory_mb=args.budgets, port=None, home=work / "flwr-home", state_dir=work / "deploy-state"
    )
    startup_s = time.perf_counter() - started
    results: dict[int, dict[str, Any]] = {}
    try:
        for local_steps in steps_list:
            out = work / f"deploy-k{local_steps}"
            began = time.perf_counter()
            result = run_app(deployment, REPO, job(args, local_steps, out), timeout=args.timeout, log=work / f"deploy-k{local_steps}.log")
            wall_s = time.perf_counter() - began
            if result.returncode != 0 or not (out / "metrics.json").is_file():
                raise RuntimeError(
                    f"deployment run (K={local_steps}) failed; log: {work / f'deploy-k{local_steps}.log'}\n"
                    f"{(result.stdout + result.stderr)[-2000:]}"
                )
            rows = round_figures(json.loads((out / "metrics.json").read_text()), local_steps)
            results[local_steps] = {"rounds": rows, "summary": summarize(rows), "run-wall-s": wall_s, "startup-s": startup_s}
    finally:
        stop_deployment(deployment)
    return results


def run_simulation_job(args: argparse.Namespace, local_steps: int, work: Path) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    out = work / f"sim-k{local_steps}"
    began = time.perf_counter()
    run_simulation(
        make_server_app(job(args, local_steps, out)),
        client_app,
        num_supernodes=args.nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False},
        },
    )
    wall_s = time.perf_counter() - began
    rows = round_figures(json.loads((out / "metrics.json").read_text()), local_steps)
    return {"rounds": rows, "summary": summarize(rows), "run-wall-s": wall_s}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", default="4", help="comma-separated K values, e.g. 1,8 (default %(default)s)")
    parser.add_argument("--method", default="dsparse", choices=["dsparse", "fedavg"])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-examples", type=int, default=600)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--budgets", default="11,12.5,13.7", help="MB per node (node-config memory-mb / sim-budgets-mb)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per deployment run")
    parser.add_argument("--out", default="outputs/deploy_overhead.json")
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if len(args.budgets) != args.nodes:
        parser.error(f"--budgets has {len(args.budgets)} values for --nodes {args.nodes}; give one per node")
    steps_list = [int(k) for k in args.local_steps.split(",")]

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dsparse-overhead-") as tmp:
        work = Path(tmp)
        deployment = run_deployment(args, steps_list, work)
        simulation = {} if args.skip_simulation else {k: run_simulation_job(args, k, work) for k in steps_list}
    start_s = clientapp_start_seconds()
    load_after = os.getloadavg()

    print(f"\nround overhead: {args.nodes} nodes, {args.model}, {args.method}, batch {args.batch_size}, "
          f"{args.rounds} rounds, same run ({platform.node()}, {os.cpu_count()} CPUs)")
    print(f"deployment start-up (SuperLink + {args.nodes} SuperNodes online): "
          f"{next(iter(deployment.values()))['startup-s']:.1f} s")
    print(f"a fresh ClientApp process (import torch, flwr, client.app): {start_s:.1f} s; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'runtime':<11} {'K':>3} {'round s':>8} {'train s':>8} {'overhead s':>11} {'overhead %':>11}")
    for k in steps_list:
        for name, table in (("deployment", deployment), ("simulation", simulation)):
            if k in table:
                s = table[k]["summary"]
                print(f"{name:<11} {k:>3} {s['mean-round-s']:>8.2f} {s['mean-train-s']:>8.2f} "
                      f"{s['mean-overhead-s']:>11.2f} {100 * s['overhead-share']:>10.0f}%")
        if k in simulation:
            ratio = deployment[k]["summary"]["mean-overhead-s"] / max(simulation[k]["summary"]["mean-overhead-s"], 1e-9)
            print(f"{'':<11} {k:>3} deployment overhead = {ratio:.1f}x simulation's")

    result = {
        "config": {key: value for key, value in vars(args).items()},
        "machine": {
            "node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg-before": load_before, "loadavg-after": load_after,
        },
        "clientapp-start-s": start_s,
        "deployment": {str(k): v for k, v in deployment.items()},
        "simulation": {str(k): v for k, v in simulation.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
