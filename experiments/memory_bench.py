"""Memory benchmark: predicted training memory against the measured peak RSS increase.

Each selection is measured in a fresh subprocess that trains it for 5 steps
(:func:`flwr_dsparse.memory.measure_training_rss`), because an allocator never
returns memory and an in-process reading would carry what ran before. The
prediction compared is what training adds on top of the loaded model: total
minus weights and reserve.

    python -m experiments.memory_bench [--quick] [--json PATH] [--fit]

``--fit`` also prints the least-squares workspace coefficients for this
machine, to pass as :class:`flwr_dsparse.costs.WorkspaceCoefficients`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from flwr_dsparse.costs import CostModel
from flwr_dsparse.memory import measure_training_rss
from flwr_dsparse.models import build_model

TARGET_ERROR = 0.20


def benchmark_selections(unit_names: list[str]) -> dict[str, list[str]]:
    """The six selections the issue names, for a ``features.* + classifier`` model."""
    blocks = [name for name in unit_names if name != "classifier"]
    middle = blocks[len(blocks) // 2]
    return {
        "classifier only": ["classifier"],
        "last 1 block": blocks[-1:] + ["classifier"],
        "last 4 blocks": blocks[-4:] + ["classifier"],
        "last 8 blocks": blocks[-8:] + ["classifier"],
        "full": list(unit_names),
        f"middle block {middle} only": [middle],
    }


def run(model_name: str, batch_sizes: list[int], *, steps: int, repeats: int = 3, progress: bool = True) -> list[dict]:
    torch.set_num_threads(1)  # the probes use one thread; profile the same way
    cost = CostModel(build_model(model_name), (3, 32, 32), time_batches=None)
    rows = []
    for batch in batch_sizes:
        for label, selection in benchmark_selections(cost.unit_names).items():
            started = time.perf_counter()
            estimate = cost.predict(selection, batch)
            # The median of several fresh processes: glibc's adaptive mmap threshold makes a single
            # peak reading wander by several MB from run to run.
            readings = [
                measure_training_rss(model_name, selection, batch_size=batch, steps=steps)["increase_mb"]
                for _ in range(repeats)
            ]
            measured = float(np.median(readings))
            predicted = estimate.total - estimate.weights - estimate.reserve
            rows.append(
                {
                    "model": model_name,
                    "batch_size": batch,
                    "selection": label,
                    "units": len(selection),
                    "predicted_mb": round(predicted, 2),
                    "measured_mb": round(measured, 2),
                    "measured_runs_mb": [round(r, 2) for r in readings],
                    "error": round((predicted - measured) / measured, 4),
                    "parts_mb": estimate.to_dict(),
                }
            )
            if progress:
                print(
                    f"  [{len(rows)}] batch {batch:4d} {label:28s} predicted {predicted:7.1f} MB"
                    f"  measured {measured:7.1f} MB  error {rows[-1]['error']:+.1%}  ({time.perf_counter() - started:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def fit_workspace(rows: list[dict], cost: CostModel) -> dict[str, float]:
    """Least-squares workspace coefficients from the measured residuals."""
    features, residuals = [], []
    costs = cost.unit_costs
    widest = max(c.max_leaf_bytes_per_sample for c in costs) / 2**20
    for row in rows:
        selection = benchmark_selections(cost.unit_names)[row["selection"]]
        first = min(cost.unit_names.index(name) for name in selection)
        widest_from = max(c.max_leaf_bytes_per_sample for c in costs[first:]) / 2**20
        parts = row["parts_mb"]
        known = parts["grads"] + parts["optimizer"] + parts["activations"]
        features.append([widest * row["batch_size"], parts["grads"], widest_from * row["batch_size"]])
        residuals.append(row["measured_mb"] - known)
    solution, *_ = np.linalg.lstsq(np.array(features), np.array(residuals), rcond=None)
    return {"forward": float(solution[0]), "backward": float(solution[1]), "trained_forward": float(solution[2])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--batch-sizes", default="32,128", help="comma-separated")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per selection (median)")
    parser.add_argument("--quick", action="store_true", help="batch 32 only")
    parser.add_argument("--json", type=Path, help="write the rows and summary here")
    parser.add_argument("--fit", action="store_true", help="also fit workspace coefficients")
    args = parser.parse_args(argv)
    batches = [32] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    print(
        f"memory benchmark: {args.model}, batches {batches}, {args.steps} steps per fresh subprocess, "
        f"median of {args.repeats}",
        file=sys.stderr,
    )
    rows = run(args.model, batches, steps=args.steps, repeats=args.repeats)
    print(f"\n{'batch':>5} {'selection':28s} {'predicted MB':>12} {'measured MB':>12} {'error':>8}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['selection']:28s} {row['predicted_mb']:>12.1f} {row['measured_mb']:>12.1f} {row['error']:>+8.1%}")
    worst = max(abs(row["error"]) for row in rows)
    within = sum(abs(row["error"]) <= TARGET_ERROR for row in rows)
    print(f"\nworst error {worst:.1%}; {within}/{len(rows)} within ±{TARGET_ERROR:.0%}")
    summary = {"rows": rows, "worst_error": worst, "within_target": within, "target": TARGET_ERROR}
    if args.fit:
        cost = CostModel(build_model(args.model), (3, 32, 32), time_batches=None)
        summary["fitted_workspace"] = fit_workspace(rows, cost)
        print(f"fitted workspace coefficients: {summary['fitted_workspace']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
