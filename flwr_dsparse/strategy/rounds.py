"""One round's state, the retry loop around it, and checkpoint and resume.

A round that produced no model (too few accepted replies, or a collective round that
cannot be applied) comes back from ``aggregate_train`` as ``None`` plus metrics, as Flower's
contract asks; :attr:`RoundState.failure` says why, and :func:`train_with_retries` decides:
retry the round (``round_retries`` times), redo a failed collective round once with the
server-side transport, or stop the run with :class:`~.membership.RoundFailed`.
"""

from __future__ import annotations

import inspect
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.result import Result
from flwr.supercore import log

from ..checkpoint import CheckpointError, load_checkpoint
from ..exchange import TensorVersions
from ..history import RoundRecord
from ..plan import Plan
from ..ports import free_port
from ..protocol import REPORT_LOSS_KEY, DeviceReport
from .membership import RoundFailed
from .replies import AcceptedReply, ReplyRejected, ReplyTally, collective_mismatch, tally_metrics

if TYPE_CHECKING:
    from .dsparse import DSparse

__all__ = [
    "RESUMABLE_KEYS",
    "EvaluateFn",
    "RoundState",
    "checkpoint_state",
    "collective_control",
    "evaluate_round",
    "restore",
    "round_failure",
    "round_metrics",
    "round_record",
    "run_rounds",
    "train_with_retries",
]

# Run-config keys that may differ between a run and its resume (they do not change the model).
RESUMABLE_KEYS = frozenset(
    {
        "resume",
        "num-server-rounds",
        "round-timeout",
        "out-dir",
        "min-nodes",
        "min-replies",
        "round-retries",
        "checkpoint",
        "checkpoint-every",
        "test-examples",
        "evaluate-every",
        "collective-timeout",
        "collective-addr",
        "collective-port",
        "replica-store",
    }
)

#: ``evaluate_fn(server_round, arrays)``: the central evaluation of Flower's ``Strategy.start``.
EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]

TOO_FEW_REPLIES = "too-few-replies"
COLLECTIVE_FAILED = "collective-failed"


@dataclass
class RoundState:
    """What ``configure_train`` hands to ``aggregate_train`` within one attempt of a round.

    Attributes
    ----------
    server_round : int
        The round.
    started : float
        ``time.perf_counter()`` when the messages were built.
    transport : str
        ``"server"`` or ``"collective"`` for this attempt.
    messages : list of Message
        The messages sent; the Grid sets their ids when it pushes them, which is how a reply
        is matched to its node (kept until ``aggregate_train`` reads the ids).
    bytes_down, state_down : dict
        Tensor and optimizer-state bytes sent per device.
    failure_kind, failure : str
        Why ``aggregate_train`` produced no model (empty when it did).
    checked : dict
        :meth:`DSparse.check_reply`'s verdicts by reply message id, reached as the replies
        came in.
    """

    server_round: int
    started: float
    transport: str = "server"
    messages: list[Message] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)
    state_down: dict[int, int] = field(default_factory=dict)
    failure_kind: str = ""
    failure: str = ""
    checked: dict[str, AcceptedReply | ReplyRejected] = field(default_factory=dict)

    @property
    def sent(self) -> set[int]:
        """Devices that were sent a message this attempt."""
        return set(self.bytes_down)


def run_rounds(
    strategy: DSparse,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_fn: EvaluateFn | None,
) -> Result:
    """``DSparse.start``'s loop: resume or query, then every round with its evaluation and checkpoint."""
    result = Result()
    first_round = 1
    if strategy.resume:
        assert strategy.checkpoint_path is not None
        first_round = restore(strategy, load_checkpoint(strategy.checkpoint_path), grid, timeout) + 1
        arrays = result.arrays = strategy.global_record()
    else:
        evaluate_round(strategy, evaluate_fn, 0, arrays, result)
        strategy.model.take(arrays, None)  # the plan is scored on it (the first round reuses the decode)
        if strategy.plan is None:
            strategy.membership.query(grid, timeout)
    for server_round in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        reasons = strategy.membership.changes(grid, server_round, timeout)
        if strategy.rescore_every and server_round > 1 and (server_round - 1) % strategy.rescore_every == 0:
            reasons.append(f"criticality re-scored on the global model (every {strategy.rescore_every} rounds)")
        if reasons:
            strategy.replan("; ".join(reasons), server_round)
        arrays, metrics = train_with_retries(strategy, grid, server_round, arrays, train_config, timeout)
        result.arrays = arrays
        result.train_metrics_clientapp[server_round] = metrics
        evaluate_round(strategy, evaluate_fn, server_round, arrays, result)
        if strategy.checkpoint_path is not None:
            strategy.save(strategy.checkpoint_path, server_round)
    return result


def evaluate_round(
    strategy: DSparse, evaluate_fn: EvaluateFn | None, server_round: int, arrays: ArrayRecord, result: Result
) -> None:
    """Central evaluation of the round's model, kept in ``result`` and ``strategy.evaluations``."""
    metrics = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
    if metrics is not None:
        result.evaluate_metrics_serverapp[server_round] = metrics
        strategy.evaluations[server_round] = {key: float(value) for key, value in metrics.items()}
        log(INFO, "round %d global evaluation: %s", server_round, strategy.evaluations[server_round])


def round_failure(state: RoundState, tally: ReplyTally, plan: Plan, min_replies: int) -> tuple[str, str] | None:
    """Why an attempt cannot be applied, as ``(kind, reason)``; ``None`` when it can.

    A collective round whose members returned differing group values (or lost a member) is
    ``COLLECTIVE_FAILED``; fewer than ``min_replies`` accepted replies is ``TOO_FEW_REPLIES``.
    """
    no_reply = sorted(state.sent - tally.replied - tally.failed)
    if state.transport == "collective":
        trouble = collective_mismatch(plan, tally.updates, sorted(tally.failed) + no_reply, tally.devices)
        if trouble:
            return COLLECTIVE_FAILED, trouble
    if len(tally.updates) < min_replies:
        return TOO_FEW_REPLIES, (
            f"{len(tally.updates)} accepted (devices {sorted(tally.updates)}), missing "
            f"{sorted(tally.failed) + no_reply}, rejected {dict(tally.rejected) or 0}"
        )
    return None


def streams_replies(grid: Grid) -> bool:
    """Whether ``grid.send_and_receive`` takes ``on_reply``: a callback for each reply as it comes in.

    This project's polling grids do (:func:`flwr_dsparse.deploy.fast_patches.polling_send_and_receive`);
    Flower's own return the replies only at the end.
    """
    try:
        return "on_reply" in inspect.signature(grid.send_and_receive).parameters
    except (TypeError, ValueError):  # a callable without a signature: call it plainly
        return False


def train_with_retries(
    strategy: DSparse, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
) -> tuple[ArrayRecord, MetricRecord]:
    """One round with retries: never applies a round below ``min_replies``."""
    attempts = strategy.round_retries + 1
    attempt = 0
    fell_back = False
    transport = strategy.transport
    while True:
        attempt += 1
        strategy.round_transport = transport
        messages = strategy.configure_train(server_round, arrays, config, grid)
        if streams_replies(grid):
            # Each reply is checked as it comes in, while the slowest nodes still train, so the
            # round's end has only the mean left to do (a free core on an uneven split).
            replies = grid.send_and_receive(messages, timeout=timeout, on_reply=strategy.check_reply)
        else:
            replies = grid.send_and_receive(messages, timeout=timeout)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        state = strategy.round
        if new_arrays is not None:
            strategy.history[-1]["attempts"] = attempt + int(fell_back)
            strategy.history[-1]["transport"] = state.transport
            return new_arrays, metrics
        if state.failure_kind == COLLECTIVE_FAILED:
            # A dead or mismatched collective peer: redo the round with the server-side
            # transport (once, not counted as a retry), then try the collective again next round.
            if fell_back:
                raise RoundFailed(f"round {server_round}: {state.failure}")
            fell_back, attempt, transport = True, attempt - 1, "server"
            strategy.events.append({"round": server_round, "event": "collective-fallback", "reason": state.failure})
            log(
                WARNING,
                "round %d: collective transport failed (%s); retrying with the server-side transport",
                server_round,
                state.failure,
            )
            continue
        if attempt >= attempts:
            raise RoundFailed(
                f"round {server_round} got fewer than min-replies={strategy.min_replies} accepted replies in all "
                f"{attempts} attempts (last attempt: {state.failure}); the run stops, nothing of round {server_round} "
                f"was applied and rounds 1..{server_round - 1} are complete"
                + (f" (checkpoint {strategy.checkpoint_path})" if strategy.checkpoint_path else "")
                + ". Start more nodes, lower min-replies or raise round-timeout, then resume=true"
            )
        strategy.events.append({"round": server_round, "event": "retry", "attempt": attempt, "reason": state.failure})
        log(
            WARNING, "round %d attempt %d of %d: %s; retrying the round", server_round, attempt, attempts, state.failure
        )


def collective_control(plan: Plan, state: RoundState, addr: str, port_fn: Callable[[], int] | None) -> dict[str, Any]:
    """The rendezvous fields of a collective round's ``TrainControl`` (empty for the server transport).

    A plan whose device ids are not the ranks ``0..n-1`` (a node left) falls back to the
    server transport for the round, and ``state.transport`` says so.
    """
    if state.transport != "collective":
        return {}
    if list(plan.device_ids) != list(range(len(plan.devices))):
        log(
            WARNING,
            "round %d: devices %s are not ranks 0..%d; this round uses the server-side transport",
            state.server_round,
            list(plan.device_ids),
            len(plan.devices) - 1,
        )
        state.transport = "server"
        return {}
    port = port_fn() if port_fn is not None else free_port(addr)
    return {
        "round_transport": "collective",
        "plan": plan.to_json(),
        "world_size": len(plan.devices),
        "collective_addr": addr,
        "collective_port": port,
    }


def round_record(
    state: RoundState,
    tally: ReplyTally,
    plan: Plan,
    *,
    updated: int,
    aggregation_s: float,
    events: list[dict[str, Any]],
) -> RoundRecord:
    """The :class:`~flwr_dsparse.history.RoundRecord` of an applied round.

    Every device that was sent a message gets a row: devices that never answered are
    ``missing``; every row carries the bytes sent down.
    """
    devices = tally.devices
    for device in state.sent - set(devices):
        devices[device] = {"status": "missing", "error": "no reply before the timeout"}
    for device, row in devices.items():
        row["bytes-down"] = state.bytes_down.get(device, 0)
        row.setdefault("bytes-up", 0)
    examples = sum(u.examples for u in tally.updates.values())
    loss = sum(devices[d].get(REPORT_LOSS_KEY, 0.0) * u.examples for d, u in tally.updates.items())
    return RoundRecord(
        round=state.server_round,
        train_loss=loss / examples if examples else float("nan"),
        devices={str(d): row for d, row in devices.items()},
        aggregation_seconds=aggregation_s,
        round_seconds=time.perf_counter() - state.started,
        num_examples=examples,
        accepted=sorted(tally.updates),
        missing=sorted(d for d, r in devices.items() if r["status"] == "missing"),
        rejected=dict(tally.rejected),
        updated_tensors=updated,
        bytes_down_state=sum(state.state_down.values()),
        plan=plan.digest()[:12],
        events=events,
        transport=state.transport,
    )


def round_metrics(tally: ReplyTally, record: RoundRecord) -> MetricRecord:
    """What ``aggregate_train`` returns to Flower for an applied round: counts, loss, bytes, time."""
    metrics = tally_metrics(tally, len(record.missing))
    metrics.update(
        {
            "train-loss": record.train_loss if record.num_examples else 0.0,
            "bytes-up": record.bytes_up,
            "bytes-down": record.bytes_down,
            "aggregation-seconds": record.aggregation_seconds,
        }
    )
    return metrics


def checkpoint_state(strategy: DSparse, server_round: int) -> dict[str, Any]:
    """Everything a resume needs after ``server_round`` completed."""
    replicas = strategy.replicas
    assert strategy.plan is not None and replicas.versions is not None
    np_state = np.random.get_state()
    return {
        "round": server_round,
        "fingerprint": dict(strategy.fingerprint),
        "global": {name: tensor.clone() for name, tensor in strategy.global_tensors.items()},
        "plan": strategy.plan.to_json(),
        "reports": [asdict(report) for report in strategy.membership.reports],
        "versions": replicas.versions.to_dict(),
        "client-state": {str(d): dict(state) for d, state in replicas.client_state.items()},
        "history": list(strategy.history),
        "evaluations": {str(r): dict(m) for r, m in strategy.evaluations.items()},
        "rejections": dict(strategy.rejections),
        "events": list(strategy.events),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        },
    }


def restore(strategy: DSparse, state: Mapping[str, Any], grid: Grid, timeout: float) -> int:
    """Load a checkpoint's state into ``strategy``; map the connected nodes to its devices. Returns its round."""
    try:
        server_round = int(state["round"])
        saved_fingerprint = dict(state["fingerprint"])
        plan = Plan.from_json(state["plan"])
        global_tensors = dict(state["global"])
        reports = [DeviceReport(**report) for report in state["reports"]]
        versions = TensorVersions.from_dict(state["versions"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {strategy.checkpoint_path} lacks part of the run state ({error!r})"
        ) from error
    differing = sorted(
        key
        for key in set(saved_fingerprint) | set(strategy.fingerprint)
        if key not in RESUMABLE_KEYS and saved_fingerprint.get(key) != strategy.fingerprint.get(key)
    )
    if differing:
        found = ", ".join(
            f"{k}={saved_fingerprint.get(k)!r} there, {strategy.fingerprint.get(k)!r} here" for k in differing
        )
        raise CheckpointError(
            f"checkpoint {strategy.checkpoint_path} is of another job: {found}; "
            "resume with the same settings, or use another out-dir for a new run"
        )
    strategy.set_global(global_tensors)
    replicas = strategy.replicas
    replicas.versions = versions
    # The nodes of a resumed run are new processes (Flower's context.state is per run):
    # they hold nothing, so they get the whole model and the server's optimizer state.
    replicas.reset_nodes()
    replicas.client_state = {int(d): dict(s) for d, s in state["client-state"].items()}
    strategy.history[:] = list(state["history"])
    strategy.evaluations.clear()
    strategy.evaluations.update({int(r): dict(m) for r, m in state["evaluations"].items()})
    strategy.rejections.clear()
    strategy.rejections.update(Counter(state["rejections"]))
    strategy.events[:] = list(state["events"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(_tuples(rng["python"]))
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            numpy_state[0],
            numpy_state[1].numpy().astype(np.uint32),
            int(numpy_state[2]),
            int(numpy_state[3]),
            float(numpy_state[4]),
        )
    )

    # Node ids are new in every run: ask the nodes again who they are.
    membership = strategy.membership
    membership.reports = membership.ask(grid, membership.wait_for_nodes(grid, timeout), timeout)
    now = [(r.device, r.budget_mb, r.batch_size) for r in membership.reports]
    before = [(r.device, r.budget_mb, r.batch_size) for r in reports]
    membership.plan = plan
    if now == before:
        membership.set_plan(plan, {report.node_id: report.device for report in membership.reports})
        membership.log_plan(plan)
    else:
        strategy.replan(
            f"the nodes after the resume differ from the checkpoint's ({before} -> {now})", server_round + 1
        )
    log(INFO, "resumed from %s: rounds 1..%d complete", strategy.checkpoint_path, server_round)
    return server_round


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint may hand back lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
