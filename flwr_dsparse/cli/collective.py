"""``dsparse collective``: run one rank of a plan (or, with ``--local``, every rank) from the shell.

The rank trains the model on the embedded synthetic data; the library behind it is
:mod:`flwr_dsparse.collective`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import collective as transport
from ..allocator import tune_allocator
from ..data import batch_iterator, make_synthetic
from ..models import build_model
from ..plan import Plan
from ..trainer import make_optimizer_factory

__all__ = ["CliJob", "add_cli", "cli_rank", "main"]


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dsparse collective``: run one device (or, with ``--local``, every device) of a plan."""
    parser = subparsers.add_parser(
        "collective",
        help="train a plan with per-step AllReduce/Broadcast over torch.distributed (gloo)",
        description=(
            "Run one rank of the collective transport. The rank and rendezvous come from the flags or, "
            "when --rank is absent, from torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. "
            "--local starts every device of the plan on 127.0.0.1 instead."
        ),
    )
    parser.add_argument("--plan", required=True, type=Path, help="plan JSON (from `dsparse plan --json`)")
    parser.add_argument("--rank", type=int, default=None, help="this device's id in the plan")
    parser.add_argument("--world-size", type=int, default=None, help="number of devices (default: the plan's)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="address of rank 0 (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=29500, help="rendezvous port on rank 0 (default 29500)")
    parser.add_argument("--local", action="store_true", help="start all ranks of the plan on this machine")
    parser.add_argument("--model", default=None, help="model name (default: the plan's meta 'model', else tiny)")
    parser.add_argument("--steps", type=int, default=10, help="synchronous steps (default 10)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the plan's per-device batch size, else 32"
    )
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="model and data seed")
    parser.add_argument(
        "--timeout", type=float, default=transport.DEFAULT_TIMEOUT_S, help="seconds before a silent peer is an error"
    )
    parser.add_argument("--no-fusion", action="store_true", help="one collective per tensor instead of one per group")
    parser.add_argument("--out", type=Path, default=None, help="torch.save the final state here ({rank} is replaced)")
    parser.set_defaults(func=_cli_main)
    return parser


@dataclass(frozen=True)
class CliJob:
    plan_json: str
    model: str
    steps: int
    batch_size: int | None
    optimizer: str
    lr: float
    momentum: float
    seed: int
    timeout_s: float
    fused: bool
    out: str | None


def cli_rank(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    job: CliJob,
    rendezvous: transport.Rendezvous | None = None,
) -> dict[str, Any]:
    plan = Plan.from_json(job.plan_json)
    batch_size = job.batch_size or plan.device(rank).batch_size or 32
    train, _ = make_synthetic(max(batch_size * world_size * 4, 1000), 10, seed=job.seed)
    batches = batch_iterator(train, range(rank, len(train), world_size), batch_size, seed=job.seed + rank)
    model = build_model(job.model, seed=job.seed)
    optimizer_factory = make_optimizer_factory(job.optimizer, lr=job.lr, momentum=job.momentum)
    rendezvous = rendezvous or transport.Rendezvous(rank, world_size, master_addr, master_port)
    result = transport.run_collective_round(
        plan, rendezvous, model, batches, job.steps, optimizer_factory, job.timeout_s, fused=job.fused
    )
    if job.out:
        torch.save(model.state_dict(), job.out.replace("{rank}", str(rank)))
    return {
        "rank": rank,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "median_compute_s": sorted(result.compute_seconds)[len(result.compute_seconds) // 2],
        "median_aggregation_s": sorted(result.aggregation_seconds)[len(result.aggregation_seconds) // 2],
        "payload_mb": result.payload_bytes / 2**20,
    }


def _print_rank(summary: Mapping[str, Any], steps: int) -> None:
    print(
        f"rank {summary['rank']}: {steps} steps, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
        f"median compute {summary['median_compute_s'] * 1e3:.1f} ms, median aggregation "
        f"{summary['median_aggregation_s'] * 1e3:.1f} ms, {summary['payload_mb']:.2f} MB handed to collectives"
    )


def _cli_main(args: argparse.Namespace) -> int:
    try:
        plan_json = args.plan.read_text()
    except OSError as error:
        raise SystemExit(
            f"cannot read plan {args.plan}: {error}; create one with `dsparse plan --json > plan.json`"
        ) from error
    plan = Plan.from_json(plan_json)
    model = args.model or str(plan.meta.get("model", "tiny"))
    job = CliJob(
        plan_json,
        model,
        args.steps,
        args.batch_size,
        args.optimizer,
        args.lr,
        args.momentum,
        args.seed,
        args.timeout,
        not args.no_fusion,
        str(args.out) if args.out else None,
    )
    if args.local:
        world_size = args.world_size or len(plan.devices)
        transport.check_plan_ranks(plan, world_size)
        outcomes = transport.launch_local(
            cli_rank, world_size, (job,), master_addr=args.master_addr, deadline_s=args.timeout * 3 + 60
        )
        failed = [outcome for outcome in outcomes if not outcome.ok]
        for outcome in outcomes:
            if outcome.ok:
                _print_rank(outcome.result, args.steps)
        for outcome in failed:
            print(f"rank {outcome.rank} failed: {(outcome.error or '').splitlines()[0]}")
        return 1 if failed else 0
    tune_allocator()  # a rank started by hand or by torchrun trains with the same allocator settings
    if args.rank is None:
        rendezvous = transport.Rendezvous.from_environ()
    else:
        rendezvous = transport.Rendezvous(
            args.rank, args.world_size or len(plan.devices), args.master_addr, args.master_port
        )
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun put several ranks on this machine: share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    try:
        summary = cli_rank(
            rendezvous.rank, rendezvous.world_size, rendezvous.master_addr, rendezvous.master_port, job, rendezvous
        )
    except (transport.CollectiveError, transport.PlanMismatchError) as error:
        print(f"dsparse collective: rank {rendezvous.rank}: {error}", file=sys.stderr)
        return 1
    _print_rank(summary, args.steps)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``dsparse collective …`` on its own (``python -m flwr_dsparse.collective``)."""
    parser = argparse.ArgumentParser(prog="dsparse")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["collective", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
