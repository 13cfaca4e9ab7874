"""The ``dsparse`` command line: the entry point, ``plan``, ``profile`` and ``compare``.

Other command families register their own subcommands through an
``add_cli(subparsers)`` function (see ``_EXTENSIONS``), so this file only wires them.
``compare`` runs the repository's ``experiments.compare`` in a child process: the
experiments are users of the library, not part of it, so the library never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..costs import CostModel
from ..models import MODELS, build_model
from ..plan import Plan, format_plan
from ..planner import OBJECTIVES, DeviceSpec, parse_budgets
from ..planning import plan_model
from ..scoring import SCORERS

__all__ = ["main", "build_cli_plan", "parse_input_shape"]

#: Modules that add a subcommand through ``add_cli(subparsers)``.
_EXTENSIONS = ("flwr_dsparse.cli.collective", "flwr_dsparse.cli.deploy", "flwr_dsparse.weights")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` to ``(3, 32, 32)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input {text!r} is not a shape; write it like 3x32x32") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"--input {text!r} must have positive dimensions, like 3x32x32")
    return shape


def _progress(line: str) -> None:
    print(f"  … {line}", file=sys.stderr, flush=True)


def build_cli_plan(
    *,
    model_name: str,
    input_shape: tuple[int, ...],
    batch_size: int,
    budgets: Sequence[float],
    scorer: str = "gradient",
    optimizer: str = "sgd",
    momentum: float = 0.0,
    reserve_mb: float = 0.0,
    allow_inference_only: bool = False,
    max_step_fraction: float = 1.0,
    objective: str = "balanced",
    seed: int = 0,
    progress: bool = True,
) -> Plan:
    """Profile ``model_name``, score its units on a seeded batch, and plan the budgets
    (``objective``: :data:`~flwr_dsparse.planner.OBJECTIVES`)."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {batch_size}")
    model = build_model(model_name, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    calibration = min(batch_size, 64)
    inputs = torch.randn(calibration, *input_shape, generator=generator)
    targets = torch.randint(0, 10, (calibration,), generator=generator)
    devices = [DeviceSpec(index, budget, batch_size) for index, budget in enumerate(budgets)]
    meta = {
        "model": model_name,
        "input_shape": list(input_shape),
        "scorer": scorer,
        "optimizer": optimizer,
        "momentum": momentum,
        "reserve_mb": reserve_mb,
        "seed": seed,
        "max_step_fraction": max_step_fraction,
    }
    return plan_model(
        model,
        devices,
        (inputs, targets),
        scorer=scorer,
        optimizer=optimizer,
        momentum=momentum,
        reserve_mb=reserve_mb,
        meta=meta,
        progress=_progress if progress else None,
        allow_inference_only=allow_inference_only,
        max_step_fraction=max_step_fraction,
        objective=objective,
    ).plan


#: ``dsparse plan`` options passed to :func:`build_cli_plan` as they are (same names).
_PLAN_OPTIONS = (
    "scorer", "optimizer", "momentum", "reserve_mb", "allow_inference_only", "max_step_fraction", "objective", "seed"
)  # fmt: skip


def _cmd_plan(args: argparse.Namespace) -> int:
    plan = build_cli_plan(
        model_name=args.model,
        input_shape=parse_input_shape(args.input),
        batch_size=args.batch_size,
        budgets=parse_budgets(args.budgets, field="--budgets"),
        progress=not args.json,
        **{name: getattr(args, name) for name in _PLAN_OPTIONS},
    )
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(plan.to_json())
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    model = build_model(args.model, seed=args.seed)
    cost = CostModel(model, parse_input_shape(args.input), progress=_progress)
    batch = args.batch_size
    if batch <= 0:
        raise ValueError(f"--batch-size must be > 0, got {batch}")
    rows = []
    for c in cost.unit_costs:
        rows.append(
            {
                "unit": c.unit.name,
                "params": c.unit.num_params,
                "weight_mb": (c.param_bytes + c.buffer_bytes) / 2**20,
                "act_trained_mb": c.at(c.act_trained, batch) / 2**20,
                "act_passthrough_mb": c.at(c.act_frozen, batch) / 2**20,
                "forward_s": c.at(c.forward_s, batch),
                "backward_trained_s": c.at(c.backward_trained_s, batch),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model} at batch {batch}, input {args.input}")
    print(
        f"{'unit':14s} {'params':>9} {'weight MB':>9} {'act MB trained':>14} {'act MB pass':>11} "
        f"{'fwd ms':>7} {'bwd ms':>7}"
    )
    for r in rows:
        print(
            f"{r['unit']:14s} {r['params']:9d} {r['weight_mb']:9.2f} {r['act_trained_mb']:14.2f} "
            f"{r['act_passthrough_mb']:11.2f} {r['forward_s'] * 1e3:7.1f} {r['backward_trained_s'] * 1e3:7.1f}"
        )
    return 0


def find_experiments_root(start: Path | None = None) -> Path:
    """The repository folder that holds ``experiments/compare.py``.

    Looked for from ``start`` (default: the working directory) upwards, then beside this
    package (an editable install from a clone).
    """
    here = (start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[2]]
    for folder in candidates:
        if (folder / "experiments" / "compare.py").is_file():
            return folder
    raise ValueError(
        f"no experiments/compare.py in {here} or its parents; `dsparse compare` runs the repository's "
        "experiments: run it from a clone of flwr-dsparse (or `python -m experiments.compare` there)"
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    root = find_experiments_root()
    return subprocess.call([sys.executable, "-m", "experiments.compare", *args.compare_args], cwd=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsparse", description="DSparse: memory-fitted sparse update for Flower")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_args(sub: argparse.ArgumentParser, batch_default: int) -> None:
        sub.add_argument("--model", default="mobilenet_v2", choices=sorted(MODELS))
        sub.add_argument("--input", default="3x32x32", help="one sample's shape (default %(default)s)")
        sub.add_argument("--batch-size", type=int, default=batch_default)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    plan = commands.add_parser("plan", help="plan which units each device trains under its memory budget")
    model_args(plan, 128)
    plan.add_argument("--budgets", default="80,110,140,170,200,240,280", help="MB per device, comma-separated")
    plan.add_argument("--scorer", default="gradient", choices=sorted(SCORERS))
    plan.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    plan.add_argument("--momentum", type=float, default=0.0)
    plan.add_argument("--reserve-mb", type=float, default=0.0, help="fixed runtime reserve added to every device")
    plan.add_argument(
        "--objective",
        default="balanced",
        choices=OBJECTIVES,
        help="balanced: the cluster's slowest step chosen with criticality; criticality: the paper's, memory only "
        "(default %(default)s)",
    )
    plan.add_argument(
        "--max-step-fraction",
        type=float,
        default=1.0,
        help="cap every device's predicted step at this fraction of a full update's (default 1: memory only)",
    )
    plan.add_argument(
        "--allow-inference-only",
        action="store_true",
        help="devices below the cheapest selection train nothing instead of failing",
    )
    plan.add_argument("--out", help="also write the plan JSON to this file")
    plan.set_defaults(func=_cmd_plan)

    profile = commands.add_parser("profile", help="cost of each unit: parameters, weights, activations, time")
    model_args(profile, 64)
    profile.set_defaults(func=_cmd_profile)

    compare = commands.add_parser(
        "compare",
        add_help=False,
        help="the paper's comparison (python -m experiments.compare in the repository; --help there)",
    )
    compare.add_argument("compare_args", nargs=argparse.REMAINDER)
    compare.set_defaults(func=_cmd_compare)

    for module_name in _EXTENSIONS:
        importlib.import_module(module_name).add_cli(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `compare` hands every argument, options included, to experiments.compare: argparse's
    # REMAINDER would stop at a leading option such as --out or --help.
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        args.compare_args = [*args.compare_args, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except ValueError as error:
        print(f"dsparse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
