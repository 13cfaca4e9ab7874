"""Memory benchmark: does every device's planned selection fit under a hard cap of its budget?

For the 7-device plans (``dsparse plan --model mobilenet_v2 --input 3x32x32 --batch-size B
--budgets 80,110,140,170,200,240,280``, memory-only objective) each device's selection is
trained for 5 steps in a *cold* fresh process (:mod:`flwr_dsparse.probe`: model and batch
built, no warm-up forward) that then joins a hard memory cap of its budget less the resident
weights (:func:`flwr_dsparse.hardcap.run_capped`). The cgroup's peak is the measured training
memory; the prediction beside it is the cost model's total less weights and reserve.

Configurations: threads (1, 2) x lean frozen layers (on, off) x allocator (tuned, stock); each
configuration is planned with the cost model of its allocator and thread count.

    python -m experiments.memory_bench [--quick] [--batch-sizes 128,32] [--threads 1,2]
        [--lean on,off] [--allocator tuned,stock] [--json PATH]

``--quick`` (for tests): TinyNet, batch 16, two budgets, one configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments.output import write_json
from flwr_dsparse.allocator import allocator_env
from flwr_dsparse.hardcap import CappedResult, hard_caps_available, run_capped
from flwr_dsparse.models import build_model
from flwr_dsparse.planner import DeviceSpec
from flwr_dsparse.planning import plan_model

BUDGETS = [80.0, 110.0, 140.0, 170.0, 200.0, 240.0, 280.0]
TARGET_ERROR = 0.10


def plan_devices(
    model_name: str, budgets: list[float], batch: int, *, lean: bool, tuned: bool = True, threads: int = 1
) -> list[dict]:
    """The memory-only plan of ``budgets`` at ``batch`` for one configuration: per device its selection
    and prediction (the cost model of that allocator and thread count)."""
    model = build_model(model_name, seed=0)
    generator = torch.Generator().manual_seed(0)
    calibration = (torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator))
    planned = plan_model(
        model,
        [DeviceSpec(i, b, batch) for i, b in enumerate(budgets)],
        calibration,
        cost_options={
            "time_batches": None,
            "lean_frozen": lean,
            "allocator": "tuned" if tuned else "stock",
            "threads": threads,
        },
        objective="criticality",
    )
    devices = []
    for device in planned.plan.devices:
        estimate = planned.cost.predict(list(device.units), batch)
        devices.append(
            {
                "budget_mb": device.budget_mb,
                "units": list(device.units),
                "score": device.score,
                "weights_mb": estimate.weights,
                "predicted_mb": estimate.total - estimate.weights - estimate.reserve,
            }
        )
    return devices


def run_capped_probe(
    model_name: str,
    selection: Sequence[str],
    cap_mb: float,
    *,
    batch_size: int,
    steps: int,
    momentum: float = 0.0,
    threads: int = 1,
    lean: bool = True,
    tuned: bool = True,
    timeout_s: float = 600.0,
    label: str = "",
    require: bool = False,
) -> CappedResult:
    """Train ``selection`` for ``steps`` steps in a cold fresh process under a hard cap of ``cap_mb`` MiB.

    The process is the library's memory probe (:mod:`flwr_dsparse.probe`): it builds the model
    and its batch, then joins its cap (:func:`flwr_dsparse.hardcap.run_capped` with
    ``join="self"``), so the cap and the cgroup's peak count only what training adds; no
    warm-up forward (*cold*), because the cost model counts the runtime's first-forward
    start-up. ``lean`` switches lean frozen layers, ``tuned`` the tuned allocator
    (:func:`flwr_dsparse.allocator.allocator_env`); ``require`` raises where caps are
    unavailable instead of running uncapped.
    """
    request = {
        "model": model_name,
        "selection": list(selection),
        "batch_size": batch_size,
        "steps": steps,
        "momentum": momentum,
        "threads": threads,
        "cold": True,
        "lean_frozen": lean,
        "tune_allocator": tuned,
    }
    return run_capped(
        [sys.executable, "-m", "flwr_dsparse.probe", json.dumps(request)],
        cap_mb,
        join="self",
        env=allocator_env() if tuned else None,
        timeout_s=timeout_s,
        label=label,
        require=require,
    )


def measure(model_name: str, device: dict, batch: int, *, threads: int, lean: bool, tuned: bool, steps: int) -> dict:
    """One cold capped probe of ``device``'s selection; the row of the JSON."""
    cap = device["budget_mb"] - device["weights_mb"]
    result = run_capped_probe(
        model_name,
        device["units"],
        cap,
        batch_size=batch,
        steps=steps,
        threads=threads,
        lean=lean,
        tuned=tuned,
        label=", ".join(device["units"]),
    )
    if result.returncode != 0 and not result.oom_killed:
        raise RuntimeError(f"probe failed: {result.describe()}\n{result.stderr[-2000:]}")
    measured = result.peak_mb
    return {
        "batch_size": batch,
        "threads": threads,
        "lean": lean,
        "allocator": "tuned" if tuned else "stock",
        "budget_mb": device["budget_mb"],
        "cap_mb": round(cap, 2),
        "units": device["units"],
        "predicted_mb": round(device["predicted_mb"], 2),
        "measured_mb": round(measured, 2),
        "killed": result.oom_killed,
        "capped": result.capped,
        "seconds": round(result.seconds, 1),
        "error": round((device["predicted_mb"] - measured) / measured, 4),
        "result": result.describe(),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| batch | threads | lean | allocator | budget MB | cap MB | predicted MB | measured MB | error | killed |",
        "|---:|---:|:---|:---|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['threads']} | {'on' if r['lean'] else 'off'} | {r['allocator']} "
            f"| {r['budget_mb']:.0f} | {r['cap_mb']:.1f} | {r['predicted_mb']:.1f} | {r['measured_mb']:.1f} "
            f"| {r['error']:+.1%} | {'KILLED' if r['killed'] else 'no'} |"
        )
    return "\n".join(lines)


def _flags(text: str, on: str, off: str) -> list[bool]:
    values = [v.strip() for v in text.split(",")]
    bad = [v for v in values if v not in (on, off)]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; use {on} and/or {off}")
    return [v == on for v in values]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--batch-sizes", default="128,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--lean", default="on", help="on,off")
    parser.add_argument("--allocator", default="tuned", help="tuned,stock")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="TinyNet, batch 16, budgets 12,14, one thread")
    parser.add_argument("--json", type=Path, help="write rows and summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.budgets, args.batch_sizes, args.threads, args.steps = "tiny", "12,14", "16", "1", 2
    available, reason = hard_caps_available()
    print(f"hard caps: {'yes' if available else 'NO'} ({reason})", file=sys.stderr)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows: list[dict] = []
    plans: dict[str, list[dict]] = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for lean in _flags(args.lean, "on", "off"):
            for threads in (int(t) for t in args.threads.split(",")):
                for tuned in _flags(args.allocator, "tuned", "stock"):
                    devices = plan_devices(args.model, budgets, batch, lean=lean, tuned=tuned, threads=threads)
                    key = f"batch {batch} lean {'on' if lean else 'off'} {'tuned' if tuned else 'stock'} {threads} thr"
                    plans[key] = devices
                    for device in devices:
                        started = time.perf_counter()
                        rows.append(
                            measure(
                                args.model, device, batch, threads=threads, lean=lean, tuned=tuned, steps=args.steps
                            )
                        )
                        print(
                            f"  [{len(rows)}] {rows[-1]['result']}  predicted {rows[-1]['predicted_mb']:.1f} "
                            f"error {rows[-1]['error']:+.1%} ({time.perf_counter() - started:.0f}s)",
                            file=sys.stderr,
                            flush=True,
                        )
    table = markdown(rows)
    print(table)
    killed = sum(r["killed"] for r in rows)
    within = sum(abs(r["error"]) <= TARGET_ERROR and r["error"] >= 0 for r in rows)
    print(f"\n{killed}/{len(rows)} killed; {within}/{len(rows)} predictions within +{TARGET_ERROR:.0%} above measured")
    summary = {
        "hard_caps": {"available": available, "reason": reason},
        "model": args.model,
        "budgets": budgets,
        "plans": plans,
        "rows": rows,
        "killed": killed,
        "within_target": within,
        "target": TARGET_ERROR,
    }
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
