"""The DSparse ServerApp: parse the job, run DSparse or Flower's FedAvg, write the outputs.

Wiring only. ``run_config`` is parsed into a :class:`~flwr_dsparse.config.JobConfig`
before anything trains; the strategy does the algorithm; this module evaluates the
global model centrally after every round and writes ``metrics.json``,
``metrics.csv``, ``plan.json`` and ``final_model.pt`` to ``out-dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from flwr_dsparse.config import REPLICA_STORE_AUTO, JobConfig, load_config
from flwr_dsparse.data import load_dataset
from flwr_dsparse.deploy.fast_patches import fast_simulation_grid, is_simulation_grid
from flwr_dsparse.history import RoundRecord, merge_evaluations, write_metrics_csv
from flwr_dsparse.models import build_model
from flwr_dsparse.plan import Plan
from flwr_dsparse.planner import DeviceSpec
from flwr_dsparse.planning import plan_model
from flwr_dsparse.protocol import METRICS, REPORT_EXAMPLES_KEY, REPORT_LOSS_KEY, REPORT_PARTITION_KEY
from flwr_dsparse.records import from_array_record, record_nbytes, tensor_nbytes, to_array_record
from flwr_dsparse.replica_store import make_run_folder, replica_store_from_env
from flwr_dsparse.strategy import DeviceReport, DSparse, PlanFn
from flwr_dsparse.strategy.replies import payload_nbytes
from flwr_dsparse.trainer import evaluate_model
from flwr_dsparse.weights import load_weights

__all__ = ["app", "make_server_app", "run_job", "planner_plan_fn", "MeasuredFedAvg", "checkpoint_path"]

CALIBRATION_EXAMPLES = 64


def planner_plan_fn(
    model: torch.nn.Module, config: JobConfig, calibration: tuple[torch.Tensor, torch.Tensor]
) -> PlanFn:
    """The default plan function: cost model, criticality scores and the planner, on the nodes' reports.

    The scores are taken on the global model ``plan_fn`` is handed (loaded into a copy of
    ``model``), so a re-plan with ``rescore-every`` scores the trained model.
    """
    scored = copy.deepcopy(model)

    def plan_fn(reports: Sequence[DeviceReport], global_tensors: Mapping[str, torch.Tensor]) -> Plan:
        scored.load_state_dict(global_tensors)
        devices = [DeviceSpec(report.device, report.budget_mb, report.batch_size) for report in reports]
        meta = {
            "model": config.model,
            "scorer": config.scorer,
            "input_shape": list(calibration[0].shape[1:]),
            "max_step_fraction": config.max_step_fraction,
        }
        return plan_model(
            scored,
            devices,
            calibration,
            scorer=config.scorer,
            momentum=config.momentum,
            meta=meta,
            objective=config.plan_objective,
            allow_inference_only=config.allow_inference_only,
            max_step_fraction=config.max_step_fraction,
        ).plan

    return plan_fn


class MeasuredFedAvg(FedAvg):
    """Flower's own FedAvg, unchanged, plus the per-round figures DSparse records.

    It only observes: bytes per node each way, aggregation time and round time.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []
        self._started = 0.0
        self._bytes_down = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._started = time.perf_counter()
        self._bytes_down = record_nbytes(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        started = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, replies)
        aggregation_s = time.perf_counter() - started
        devices: dict[str, dict[str, Any]] = {}
        for reply in replies:
            if reply.has_error():
                continue
            reply_metrics = reply.content[METRICS]
            devices[str(int(reply_metrics[REPORT_PARTITION_KEY]))] = {
                "status": "ok",
                "bytes-up": payload_nbytes(reply),
                "bytes-down": self._bytes_down,
                **{key: float(value) for key, value in reply_metrics.items() if isinstance(value, (int, float))},
            }
        record = RoundRecord(
            round=server_round,
            train_loss=float(metrics[REPORT_LOSS_KEY]) if metrics and REPORT_LOSS_KEY in metrics else float("nan"),
            devices=devices,
            aggregation_seconds=aggregation_s,
            round_seconds=time.perf_counter() - self._started,
            num_examples=int(sum(d.get(REPORT_EXAMPLES_KEY, 0) for d in devices.values())),
            accepted=sorted(int(d) for d in devices),
        )
        self.history.append(record.to_row())
        return arrays, metrics


def evaluated_rounds(num_rounds: int, every: int) -> list[int]:
    """The rounds that ``evaluate-every`` evaluates: round 0, every ``every``-th, and the last."""
    return sorted({0, num_rounds, *range(every, num_rounds + 1, every)})


def _evaluate_fn(
    model: torch.nn.Module,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    batch_size: int,
    log_to: list,
    rounds: Collection[int],
) -> Callable:
    # Only ``rounds`` are evaluated: an evaluation of MobileNetV2 on the 256 held-out examples
    # takes 0.2-0.3 s on this machine (1.1 s on a slow day), a third or more of a per-step
    # round, outside round time but inside the user's wall time. Flower's loops and DSparse's
    # skip a round whose evaluate_fn returns None.
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round not in rounds:
            return None
        model.load_state_dict(from_array_record(arrays))
        loss, accuracy = evaluate_model(model, test_x, test_y, batch_size=batch_size)
        log_to.append({"round": server_round, "loss": loss, "accuracy": accuracy})
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    return evaluate


def _write_outputs(
    out: Path, config: JobConfig, rows: list[dict[str, Any]], plan: Plan | None, model: torch.nn.Module, summary: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(
        json.dumps({"config": config.to_run_config(), "summary": summary, "rounds": rows}, indent=2, default=str)
    )
    write_metrics_csv(out / "metrics.csv", rows)
    if plan is not None:
        (out / "plan.json").write_text(plan.to_json())
    else:
        (out / "plan.json").unlink(missing_ok=True)  # FedAvg has no plan; never leave a stale one
    torch.save(model.state_dict(), out / "final_model.pt")


def _summary_table(config: JobConfig, rows: list[dict[str, Any]], summary: dict) -> str:
    lines = [
        f"dsparse summary ({config.method}, {config.model}, {config.dataset}, {config.num_server_rounds} rounds)",
        f"{'round':>5} {'loss':>8} {'acc':>7} {'MiB up':>8} {'MiB down':>9} {'agg s':>7} {'round s':>8}",
    ]
    for row in rows:
        # A round that evaluate-every skipped has no loss or accuracy.
        loss, accuracy = (f"{row[key]:.4f}" if key in row else "-" for key in ("loss", "accuracy"))
        lines.append(
            f"{row['round']:>5} {loss:>8} {accuracy:>7} "
            f"{row.get('bytes-up', 0) / 2**20:>8.2f} {row.get('bytes-down', 0) / 2**20:>9.2f} "
            f"{row.get('aggregation-seconds', 0.0):>7.3f} {row.get('round-seconds', 0.0):>8.2f}"
        )
    lines.append(
        f"final accuracy {summary['final-accuracy']:.4f} (initial {summary['initial-accuracy']:.4f}); "
        f"total {summary['total-bytes-up'] / 2**20:.1f} MiB up, {summary['total-bytes-down'] / 2**20:.1f} MiB down; "
        f"{summary['wall-seconds']:.1f} s"
    )
    return "\n".join(lines)


def run_job(grid: Grid, config: JobConfig, *, plan_fn: PlanFn | None = None) -> dict[str, Any]:
    """Run one job on ``grid`` and write its outputs; returns the summary.

    Parameters
    ----------
    grid : Grid
        Flower's grid of connected nodes.
    config : JobConfig
        The parsed job.
    plan_fn : PlanFn, optional
        Overrides the planner (tests and custom planners); DSparse only.
    """
    # One thread: on a small shared machine a multi-threaded evaluation stalls on the
    # slowest core (measured 5x slower under load); the nodes do the parallel work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = None
    if config.replica_store == REPLICA_STORE_AUTO and replica_store_from_env() is None and is_simulation_grid(grid):
        # A simulation's nodes share this machine: their durable replicas go to a folder of the
        # run (flwr_dsparse.replica_store) rather than through the engine with every message.
        store = make_run_folder()
        config = dataclasses.replace(config, replica_store=str(store))
    try:
        return _run_job(grid, config, plan_fn)
    finally:
        torch.set_num_threads(threads)
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)


def _run_job(grid: Grid, config: JobConfig, plan_fn: PlanFn | None) -> dict[str, Any]:
    started = time.perf_counter()
    model = build_model(config.model, seed=config.seed)
    if config.initial_weights:
        # Checked (names, shapes, finite) before any node is contacted; the path is the
        # server's: the nodes get the weights from the server in round 1.
        model.load_state_dict(load_weights(config.initial_weights, config.model))
    initial = to_array_record(model.state_dict())
    train, test = load_dataset(
        config.dataset,
        root=config.data_root or None,
        seed=config.seed,
        num_train=config.train_examples or None,
        num_test=config.test_examples or None,
    )
    evaluations: list[dict[str, Any]] = []
    evaluate_fn = _evaluate_fn(
        build_model(config.model, seed=config.seed),
        test.x,
        test.y,
        256,
        evaluations,
        set(evaluated_rounds(config.num_server_rounds, config.evaluate_every)),
    )
    job = ConfigRecord(config.to_run_config())

    if config.method == "dsparse":
        calibration = (train.x[:CALIBRATION_EXAMPLES], train.y[:CALIBRATION_EXAMPLES])
        strategy: DSparse | MeasuredFedAvg = DSparse(
            plan_fn=plan_fn or planner_plan_fn(model, config, calibration),
            train_config=config.to_run_config(),
            query_config=config.to_run_config(),
            min_nodes=config.min_nodes,
            min_replies=config.min_replies,
            round_retries=config.round_retries,
            # The server keeps the nodes' momentum only when it checkpoints: it costs upload bytes.
            keep_client_state=config.checkpoint and config.momentum > 0,
            checkpoint_every=config.checkpoint_every,
            rescore_every=config.rescore_every,
            checkpoint_path=checkpoint_path(config) if config.checkpoint or config.resume else None,
            resume=config.resume,
            fingerprint=config.to_run_config(),
            transport=config.transport,
            collective_addr=config.collective_addr,
            # A fixed port for a real LAN (open on rank 0's machine); 0: a free port here, per round.
            collective_port_fn=(lambda: config.collective_port) if config.collective_port else None,
        )
        del train
        result = strategy.start(
            grid, initial, num_rounds=config.num_server_rounds, timeout=config.round_timeout, evaluate_fn=evaluate_fn
        )
        plan = strategy.plan
        # A resumed run's evaluations of earlier rounds come from its checkpoint.
        evaluations[:] = [{"round": r, **m} for r, m in sorted(strategy.evaluations.items())]
    else:
        del train
        strategy = MeasuredFedAvg(
            fraction_evaluate=0.0, min_train_nodes=config.min_nodes, min_available_nodes=config.min_nodes
        )
        result = strategy.start(
            grid,
            initial,
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=job,
            evaluate_fn=evaluate_fn,
        )
        plan = None

    final = build_model(config.model, seed=config.seed)
    final.load_state_dict(from_array_record(result.arrays))
    rows = merge_evaluations(strategy.history, evaluations)
    summary = {
        "method": config.method,
        "rounds": config.num_server_rounds,
        "initial-accuracy": evaluations[0]["accuracy"],
        "final-accuracy": evaluations[-1]["accuracy"],
        "final-loss": evaluations[-1]["loss"],
        "total-bytes-up": sum(row.get("bytes-up", 0) for row in rows),
        "total-bytes-down": sum(row.get("bytes-down", 0) for row in rows),
        "mean-round-seconds": sum(row.get("round-seconds", 0.0) for row in rows[1:]) / max(len(rows) - 1, 1),
        "wall-seconds": time.perf_counter() - started,
        "plan-digest": plan.digest() if plan is not None else None,
        "model-bytes": tensor_nbytes(model.state_dict()),
    }
    _write_outputs(Path(config.out_dir), config, rows, plan, final, summary)
    for line in _summary_table(config, rows, summary).splitlines():
        log(INFO, "%s", line)
    log(INFO, "outputs written to %s", Path(config.out_dir).resolve())
    return summary


def checkpoint_path(config: JobConfig) -> Path:
    """Where a DSparse job checkpoints (and resumes from): ``out-dir/checkpoint.pt``."""
    return Path(config.out_dir) / "checkpoint.pt"


def make_server_app(overrides: Mapping[str, Any] | None = None, *, plan_fn: PlanFn | None = None) -> ServerApp:
    """A ServerApp whose ``run_config`` is ``overrides`` on top of the context's.

    The in-process simulation API passes an empty ``run_config``; tests use this
    to run a small job without ``flwr run``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # Parse first: a bad key stops the run before any node trains.
        config = load_config({**dict(context.run_config), **dict(overrides or {})})
        # In simulation, look for replies every 20-250 ms instead of Flower's 0.1 s (a no-op elsewhere).
        run_job(fast_simulation_grid(grid), config, plan_fn=plan_fn)

    return server_app


app = make_server_app()
