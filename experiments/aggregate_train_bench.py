"""aggregate_train (and configure_train) of the DSparse strategy on 7 realistic MobileNetV2 replies.

The default job's plan (MobileNetV2, the 7 default ``sim-budgets-mb``, batch 32; the memory-only
planner, so the selections do not depend on timed steps), the server's round-1 messages, and each
device's reply as the ClientApp builds it (its selected tensors, changed, encoded as on the wire).
Times ``configure_train`` and ``aggregate_train`` over several repeats; prints the medians and
writes JSON.

Usage::

    python -m experiments.aggregate_train_bench [--repeats 7] [--out experiments/results/aggregate_train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from flwr_dsparse.config import load_config
from flwr_dsparse.data import load_dataset
from flwr_dsparse.models import build_model
from flwr_dsparse.protocol import ARRAYS, DeviceReport, TrainReport, train_reply_content
from flwr_dsparse.records import fuse_record, record_nbytes, tensor_nbytes, to_array_record
from flwr_dsparse.strategy import DSparse
from flwr_dsparse.strategy.replies import selection_of
from server.app import planner_plan_fn

REPO = Path(__file__).resolve().parents[1]
NODE_OFFSET = 100


def build(config_overrides: dict | None = None) -> tuple[DSparse, ArrayRecord]:
    config = load_config({"plan-objective": "criticality", **(config_overrides or {})})
    model = build_model(config.model, seed=config.seed)
    train, _ = load_dataset(config.dataset, seed=config.seed, num_train=256, num_test=10)
    plan_fn = planner_plan_fn(model, config, (train.x[:64], train.y[:64]))
    reports = [
        DeviceReport(NODE_OFFSET + d, d, budget, config.batch_size, 100) for d, budget in enumerate(config.budgets_mb)
    ]
    plan = plan_fn(reports, model.state_dict())
    strategy = DSparse(plan_fn=plan_fn, train_config=config.to_run_config())
    strategy.set_plan(plan, {report.node_id: report.device for report in reports})
    return strategy, to_array_record(model.state_dict())


def replies_for(strategy: DSparse, messages: Sequence[Message], server_round: int) -> list[Message]:
    """Each device's reply: its selected tensors, changed, as the ClientApp encodes them."""
    out = []
    for message in messages:
        device = strategy.membership.node_to_device[message.metadata.dst_node_id]
        selected, _ = selection_of(strategy.plan, strategy.global_tensors, device)
        gen = torch.Generator().manual_seed(device)
        tensors = {
            name: (t + 0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype) if t.dtype.is_floating_point else t + 1
            for name, t in selected.items()
        }
        budget = strategy.plan.device(device).budget_mb
        report = TrainReport(server_round, device, 32, 1.0, 0.1, 100.0, 0, tensor_nbytes(tensors), budget)
        # Fused, as the ClientApp sends a sparse reply (one Array for all its tensors; client/app.py).
        out.append(Message(train_reply_content(fuse_record(tensors), report), reply_to=message))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "aggregate_train.json"))
    args = parser.parse_args(argv)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    torch.set_num_threads(1)
    strategy, arrays = build()
    configure_s, aggregate_s, up_bytes = [], [], []
    for server_round in range(1, args.repeats + 1):
        started = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid=None))  # type: ignore[arg-type]
        configure_s.append(time.perf_counter() - started)
        replies = replies_for(strategy, messages, server_round)
        up_bytes.append(sum(record_nbytes(r.content[ARRAYS]) for r in replies))
        started = time.perf_counter()
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        aggregate_s.append(time.perf_counter() - started)
        assert arrays is not None and metrics["num-accepted"] == len(messages), metrics
    result = {
        "what": "DSparse.aggregate_train on 7 MobileNetV2 replies (default budgets, batch 32, memory-only plan)",
        "replies": len(messages),
        "repeats": args.repeats,
        "median-aggregate-train-s": statistics.median(aggregate_s),
        "median-configure-train-s": statistics.median(configure_s[1:] or configure_s),
        "first-configure-train-s": configure_s[0],
        "aggregate-train-s": aggregate_s,
        "configure-train-s": configure_s,
        "reply-mib": up_bytes[0] / 2**20,
        "grouped-mean-s": [row["aggregation-seconds"] for row in strategy.history],
        "load-average": os.getloadavg(),
        "torch-threads": torch.get_num_threads(),
    }
    print(
        f"aggregate_train: median {result['median-aggregate-train-s'] * 1e3:.1f} ms for {len(messages)} replies "
        f"({result['reply-mib']:.1f} MiB); configure_train: median {result['median-configure-train-s'] * 1e3:.1f} ms "
        f"(first round {configure_s[0] * 1e3:.1f} ms); load {result['load-average'][0]:.1f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
