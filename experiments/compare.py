"""The DSparse paper's comparison, measured on this machine: five methods, one table.

    python -m experiments.compare --out DIR [--quick] [--weights PATH]
    dsparse compare --out DIR [--quick] [--weights PATH]

Seven devices with seven memory budgets (the largest about 3x the smallest) fine-tune
one starting checkpoint with every method, on the same data, seeds and number of
steps:

1. ``fedavg``: Flower's own FedAvg, every device trains the whole model (so every
   device needs the memory of the largest one);
2. ``uniform``: every device trains only what the *smallest* device can afford;
3. ``dsparse``: memory-fitted selections from the planner, server-side grouped
   aggregation (the DSparse strategy), one local step per round;
4. ``dsparse_k``: the same with K local steps per round;
5. ``collective``: the same plan trained with the collective transport
   (:mod:`flwr_dsparse.collective`, per-step all-reduce and broadcast over gloo,
   fused), through its local launcher.

Methods 1-4 run in-process with Flower's simulation runtime
(``flwr.simulation.run_simulation``, the project's ClientApp, a ServerApp built
here from the public strategies). Method 5 cannot share that path (it has no
server), so it runs as seven local processes with the same plan, checkpoint,
partitions, batch streams and seeds, and its rows say so.

The starting checkpoint is pre-trained centrally on the first classes of the
training split (class-incremental fine-tuning, the setting DSparse targets) and
cached in the output folder; ``--weights`` uses the user's own state dict.

Measures: memory per device (predicted by the cost model; measured as the peak RSS
increase of a fresh subprocess training that selection,
:func:`flwr_dsparse.memory.measure_training_rss`), step time per device and the
cluster's (slowest device), aggregation time, bytes up and down per device per
step, accuracy over steps and over time, and the final held-out accuracy.
Outputs: ``results.json``, ``results.csv``, PNG plots and ``REPORT.md``, which
:mod:`experiments.report` renders from ``results.json`` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flwr_dsparse.costs import CostModel
from flwr_dsparse.data import DATASETS, Split, batch_iterator, default_dataset, load_dataset, partition_indices
from flwr_dsparse.memory import MB, measure_training_rss
from flwr_dsparse.models import MODELS, build_model
from flwr_dsparse.plan import Plan, plan_from_selections
from flwr_dsparse.planner import OBJECTIVES, DeviceSpec, make_plan, parse_budgets
from flwr_dsparse.scoring import SCORERS, get_scorer
from flwr_dsparse.trainer import SparseTrainer, evaluate_model, make_optimizer_factory
from flwr_dsparse.units import model_units
from flwr_dsparse.weights import load_weights, loss_reporter, pretrain

__all__ = ["Setup", "DEFAULT", "QUICK", "METHODS", "PAPER", "run_compare", "main"]

#: The rows of the table, in order.
METHODS = ("fedavg", "uniform", "dsparse", "dsparse_k", "collective")
METHOD_LABELS = {
    "fedavg": "1 full-update FedAvg (Flower FedAvg)",
    "uniform": "2 uniform sparse (smallest device's selection)",
    "dsparse": "3 DSparse per-step (server grouped mean)",
    "dsparse_k": "4 DSparse, K local steps",
    "collective": "5 DSparse collective transport, fused",
}
#: The DSparse paper's figures (MobileNetV2, 7 edge devices): what REPORT.md puts ours beside.
PAPER = {
    "memory_full_mb": 1284.0,
    "memory_dsparse_mb": 519.0,
    "memory_saving_pct": 59.6,
    "batch_full_s": 28.98,
    "batch_dsparse_s": 7.14,
    "batch_fused_s": 5.60,
    "aggregation_reduction_pct": 75.4,
    "accuracy": "kept (no loss against full update)",
}


@dataclass(frozen=True)
class Setup:
    """The size of one comparison run. Every method uses the same values."""

    model: str = "mobilenet_v2"
    # Each device's budget as a share of the full update's predicted need (an edge cluster's
    # spread: 0.28 to 0.60, mean 0.41, near the paper's 519 of 1284 MB = 0.40); every one below
    # it. 0.28 is the floor: the cheapest selection (weights, the classifier's step, the cold
    # start) needs 26% of the full update at batch 32.
    budget_fractions: tuple[float, ...] = (0.28, 0.31, 0.34, 0.38, 0.44, 0.53, 0.60)
    budgets_mb: tuple[float, ...] = ()  # MB per device; empty: from budget_fractions and the cost model
    plan_objective: str = "balanced"  # the DSparse planner's objective (flwr_dsparse.planner.OBJECTIVES)
    batch_size: int = 32
    steps: int = 300  # local steps per device, the same for every method (long enough to judge accuracy)
    local_steps: int = 4  # K of method 4
    eval_every: int = 20  # steps between held-out evaluations (a multiple of K)
    lr: float = 0.02
    momentum: float = 0.9
    seed: int = 0
    scorer: str = "gradient"
    dataset: str = "synthetic"
    data_root: str = ""
    train_examples: int = 4200
    test_examples: int = 500
    pretrain_steps: int = 160
    pretrain_batch_size: int = 64
    pretrain_lr: float = 0.01  # 0.05 diverges for MobileNetV2 from scratch at batch 64
    pretrain_classes: int = 6  # pre-train on classes 0..pretrain_classes-1, fine-tune on all
    probe_steps: int = 5
    probe_workers: int = 2
    # Each distinct selection timed alone: this many interleaved passes of timing_steps steps.
    timing_rounds: int = 5
    timing_steps: int = 3
    max_step_fraction: float = 1.0  # a step-time cap by hand (1: none; the balanced objective picks its own)
    rescore_every: int = 0  # DSparse re-plans every N rounds on criticality scored on the trained model (0: never)
    baseline_steps: int = 6  # steps of the full-model collective run (timing baseline of method 5)
    num_cpus: int = 2  # Ray's CPUs for the simulation
    collective_timeout_s: float = 300.0
    # Each method's per-step exchange timed over the emulated shared edge link (tc tbf in a network
    # namespace) at these rates; empty skips it. The first rate is the headline's.
    link_rates_mbit: tuple[int, ...] = (100, 20)
    link_steps: int = 1  # timed exchanges per method and rate (MobileNetV2 at 20 Mbit/s: about 40 s each)
    hard_caps: bool = True  # every device of every method also trained under a hard cap of its budget (cgroup)

    @property
    def num_devices(self) -> int:
        return len(self.budgets_mb or self.budget_fractions)

    def check(self) -> None:
        """Refuse sizes that cannot run, naming the value and the fix."""
        if self.model not in MODELS:
            raise ValueError(f"--model {self.model!r} is unknown; choose one of: {', '.join(sorted(MODELS))}")
        if self.scorer not in SCORERS:
            raise ValueError(f"--scorer {self.scorer!r} is unknown; choose one of: {', '.join(SCORERS)}")
        if self.num_devices < 2:
            raise ValueError(f"--budgets gives {self.num_devices} device(s); the comparison needs at least 2")
        bad = [f for f in self.budget_fractions if not 0 < f <= 1]
        if bad and not self.budgets_mb:
            raise ValueError(f"--budget-fractions {bad} must be in (0, 1]: shares of the full update's predicted need")
        if self.rescore_every < 0:
            raise ValueError(f"--rescore-every must be >= 0 (0: never re-score), got {self.rescore_every}")
        if self.plan_objective not in OBJECTIVES:
            raise ValueError(
                f"--plan-objective {self.plan_objective!r} is unknown; choose one of: {', '.join(OBJECTIVES)}"
            )
        for name in (
            "batch_size",
            "steps",
            "local_steps",
            "eval_every",
            "train_examples",
            "test_examples",
            "probe_steps",
            "probe_workers",
            "timing_rounds",
            "timing_steps",
            "num_cpus",
            "baseline_steps",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.steps % self.local_steps:
            raise ValueError(
                f"--steps {self.steps} is not a multiple of --local-steps {self.local_steps}; method 4 runs "
                f"steps/K rounds, so pick e.g. --steps {self.steps - self.steps % self.local_steps or self.local_steps}"
            )
        if self.eval_every % self.local_steps:
            raise ValueError(
                f"--eval-every {self.eval_every} is not a multiple of --local-steps {self.local_steps}; method 4 "
                f"can only be evaluated between rounds, so pick e.g. --eval-every {self.local_steps}"
            )
        if not 0 < self.pretrain_classes <= 10:
            raise ValueError(f"pretrain_classes must be in 1..10, got {self.pretrain_classes}")
        if self.train_examples < self.num_devices * self.batch_size:
            raise ValueError(
                f"--train-examples {self.train_examples} gives each of {self.num_devices} devices fewer than one "
                f"batch of {self.batch_size}; raise --train-examples to at least {self.num_devices * self.batch_size}"
            )
        if self.dataset == "cifar10" and not self.data_root:
            raise ValueError("--dataset cifar10 needs --data-root, the folder that holds cifar-10-batches-py")

    def run_config(self, method: str) -> dict[str, Any]:
        """The Flower ``run_config`` of ``method`` (keys of :class:`flwr_dsparse.config.JobConfig`)."""
        local_steps = self.local_steps if method == "dsparse_k" else 1
        return {
            "method": "fedavg" if method == "fedavg" else "dsparse",
            "num-server-rounds": self.steps // local_steps,
            "local-steps": local_steps,
            "batch-size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "seed": self.seed,
            "model": self.model,
            "dataset": self.dataset,
            "data-root": self.data_root,
            "train-examples": self.train_examples,
            "test-examples": self.test_examples,
            "scorer": self.scorer,
            "partitioning": "iid",
            "sim-budgets-mb": ",".join(f"{b:g}" for b in self.budgets_mb),
            "plan-objective": self.plan_objective,
            "rescore-every": self.rescore_every,
            "min-nodes": self.num_devices,
            "round-timeout": 600.0,
        }


#: The default size: MobileNetV2, 7 devices, 300 steps (the committed run; about 40 minutes on 2 cores).
DEFAULT = Setup()
#: ``--quick``: the CI smoke size. TinyNet (MobileNetV2's unit layout at a fraction of the cost).
#: Its weights and workspace are half of its full update's need (its cheapest selection needs
#: about 0.50 of it), so its shares start above that; every one is still below the full update.
QUICK = Setup(
    model="tiny",
    budget_fractions=(0.53, 0.57, 0.61, 0.66, 0.71, 0.78, 0.88),
    steps=6,
    local_steps=2,
    eval_every=2,
    lr=0.05,
    train_examples=1400,
    test_examples=300,
    pretrain_steps=30,
    pretrain_lr=0.1,
    probe_steps=3,
    timing_rounds=2,
    baseline_steps=2,
    link_steps=2,  # the tiny model's exchanges take 0.1-1.4 s; a median of two steadies them
)


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per stage on stderr, with the elapsed time."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()
        self.stage_seconds: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            print(f"[compare {int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} …")
        started = time.perf_counter()
        yield
        self.stage_seconds[name] = time.perf_counter() - started
        self.say(f"{name} done in {self.stage_seconds[name]:.1f} s")


# --------------------------------------------------------------------------- data and checkpoint


def load_splits(setup: Setup) -> tuple[Split, Split]:
    """The train split exactly as the ClientApp loads it, and the held-out split as the server does."""
    return load_dataset(
        setup.dataset,
        root=setup.data_root or None,
        seed=setup.seed,
        num_train=setup.train_examples,
        num_test=setup.test_examples,
    )


def evaluate_state(model: torch.nn.Module, test: Split) -> tuple[float, float]:
    """Held-out loss and accuracy of ``model`` as it is."""
    return evaluate_model(model, test.x, test.y)


def _checkpoint_key(setup: Setup) -> str:
    fields = (
        "model",
        "dataset",
        "data_root",
        "seed",
        "train_examples",
        "pretrain_steps",
        "pretrain_batch_size",
        "pretrain_lr",
        "pretrain_classes",
        "momentum",
    )
    text = json.dumps({name: getattr(setup, name) for name in fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrain_checkpoint(setup: Setup, train: Split, progress: Progress) -> tuple[dict[str, torch.Tensor], dict]:
    """Every unit trained centrally on the first ``pretrain_classes`` classes.

    (:func:`flwr_dsparse.weights.pretrain`)
    """
    state, info = pretrain(
        setup.model,
        train,
        steps=setup.pretrain_steps,
        batch_size=setup.pretrain_batch_size,
        lr=setup.pretrain_lr,
        momentum=setup.momentum,
        classes=setup.pretrain_classes,
        seed=setup.seed,
        on_step=loss_reporter(setup.pretrain_steps, lambda line: progress.say(f"  {line}")),
    )
    return state, {
        "steps": info.steps,
        "classes": info.classes,
        "examples": info.examples,
        "final_loss": info.final_loss,
    }


def starting_checkpoint(
    setup: Setup, out: Path, weights: Path | None, train: Split, test: Split, progress: Progress
) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The checkpoint every method fine-tunes from: the user's, the cached one, or a new pre-training."""
    if weights is not None:
        state = load_weights(weights, setup.model, key="--weights")
        return weights, state, {"source": f"--weights {weights}"}
    path = out / f"pretrained_{setup.model}_{_checkpoint_key(setup)}.pt"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        progress.say(f"using the cached starting checkpoint {path}")
        info = json.loads(info_path.read_text())
        return (
            path,
            load_weights(path, setup.model, key="cached checkpoint"),
            {**info, "source": f"cached pre-training ({path.name})"},
        )
    with progress.stage(f"pre-training {setup.model} on classes 0..{setup.pretrain_classes - 1}"):
        state, info = pretrain_checkpoint(setup, train, progress)
    torch.save(state, path)
    info_path.write_text(json.dumps(info, indent=2))
    return path, state, {**info, "source": f"pre-trained in this run ({path.name})"}


# --------------------------------------------------------------------------- plans


@dataclass
class Plans:
    """What each method trains: the DSparse plan, the uniform plan, and the full-model predictions."""

    dsparse: Plan
    uniform: Plan
    full: Plan
    cost: CostModel
    scores: list[float]
    budgets_mb: tuple[float, ...]
    full_mb: float  # the full update's predicted need at the batch size


def resolve_budgets(setup: Setup, full_mb: float) -> tuple[float, ...]:
    """``--budgets`` as given, or each fraction of the full update's predicted need (MB, 0.01 MB steps)."""
    if setup.budgets_mb:
        return tuple(setup.budgets_mb)
    return tuple(math.floor(f * full_mb * 100) / 100 for f in setup.budget_fractions)


def plan_meta(setup: Setup) -> dict[str, Any]:
    return {"model": setup.model, "scorer": setup.scorer, "input_shape": [3, 32, 32], "source": "experiments.compare"}


def dsparse_plan(setup: Setup, cost: CostModel, scores: Sequence[float], budgets: Sequence[float]) -> Plan:
    """The DSparse plan for ``budgets`` under ``scores`` (the start's, or a re-scoring's)."""
    devices = [DeviceSpec(device, budget, setup.batch_size) for device, budget in enumerate(budgets)]
    return make_plan(
        devices,
        cost,
        scores,
        objective=setup.plan_objective,
        max_step_fraction=setup.max_step_fraction,
        meta={**plan_meta(setup), "method": "dsparse", "max_step_fraction": setup.max_step_fraction},
    )


def criticality_scores(setup: Setup, model: torch.nn.Module, cost: CostModel, train: Split) -> list[float]:
    """Each unit's criticality for ``model``'s weights, on the first (up to 64) training examples."""
    calibration = min(64, len(train))
    return get_scorer(setup.scorer)(model, cost.units, train.x[:calibration], train.y[:calibration])


def rescoring_planner(setup: Setup, plans: Plans, train: Split) -> Callable[[Mapping[str, torch.Tensor]], Plan]:
    """The DSparse plan for the global model as it is: its criticality scored again (``rescore-every``).

    The cost model and the budgets stay the start's (neither depends on the weights).
    """
    model = build_model(setup.model, seed=setup.seed)

    def replan(global_tensors: Mapping[str, torch.Tensor]) -> Plan:
        model.load_state_dict(global_tensors)
        return dsparse_plan(setup, plans.cost, criticality_scores(setup, model, plans.cost, train), plans.budgets_mb)

    return replan


def make_plans(setup: Setup, state: Mapping[str, torch.Tensor], train: Split) -> Plans:
    """Plan on the starting checkpoint: criticality depends on the weights being fine-tuned."""
    model = build_model(setup.model, seed=setup.seed)
    model.load_state_dict(state)
    torch.set_num_threads(1)  # the memory probes use one thread; profile the same way
    # The balanced objective and a hand cap need the step-time calibration; memory only does not.
    timed = setup.plan_objective == "balanced" or setup.max_step_fraction < 1
    cost = CostModel(
        model, (3, 32, 32), optimizer="sgd", momentum=setup.momentum, **({} if timed else {"time_batches": None})
    )
    scores = criticality_scores(setup, model, cost, train)
    full_mb = cost.predict(cost.unit_names, setup.batch_size).total
    budgets = resolve_budgets(setup, full_mb)
    meta = plan_meta(setup)
    dsparse = dsparse_plan(setup, cost, scores, budgets)
    smallest = min(dsparse.devices, key=lambda d: d.budget_mb)
    all_units = cost.unit_names

    def same_for_all(selection: Sequence[str], method: str) -> Plan:
        estimate = cost.predict(selection, setup.batch_size)
        ids = range(setup.num_devices)
        return plan_from_selections(
            cost.units,
            {d: list(selection) for d in ids},
            cost.tensor_bytes(),
            budgets_mb=dict(enumerate(budgets)),
            batch_sizes=dict.fromkeys(ids, setup.batch_size),
            estimates=dict.fromkeys(ids, estimate),
            meta={**meta, "method": method},
        )

    return Plans(
        dsparse,
        same_for_all(smallest.units, "uniform"),
        same_for_all(all_units, "fedavg"),
        cost,
        scores,
        budgets,
        full_mb,
    )


def measure_memory(setup: Setup, plans: Mapping[str, Plan], progress: Progress) -> dict[tuple[str, ...], dict]:
    """Peak RSS increase of a fresh subprocess per distinct selection (all methods' devices)."""
    selections = sorted({tuple(d.units) for plan in plans.values() for d in plan.devices}, key=len)
    results: dict[tuple[str, ...], dict] = {}

    def probe(selection: tuple[str, ...]) -> tuple[tuple[str, ...], dict]:
        return selection, measure_training_rss(
            setup.model,
            list(selection),
            batch_size=setup.batch_size,
            steps=setup.probe_steps,
            optimizer="sgd",
            momentum=setup.momentum,
        )

    with ThreadPoolExecutor(max_workers=setup.probe_workers) as pool:
        for done, (selection, measured) in enumerate(pool.map(probe, selections), start=1):
            results[selection] = measured
            progress.say(
                f"  memory probe {done}/{len(selections)}: {len(selection)} units, "
                f"+{measured['increase_mb']:.1f} MB peak RSS"
            )
    return results


def time_selections(
    setup: Setup, plans: Mapping[str, Plan], state: Mapping[str, torch.Tensor], train: Split, progress: Progress
) -> dict[tuple[str, ...], float]:
    """Median step time of every distinct selection, alone on one thread in this process.

    The simulation times two devices at once on two cores, so a device's step there depends on
    which device runs beside it. Here nothing else trains, and the selections take turns:
    ``timing_rounds`` passes over all of them, ``timing_steps`` timed steps each, after two
    warm-up steps, so that a slow spell of the machine (a shared VM) falls on every selection
    alike instead of on whichever was being timed.
    """
    selections = sorted({tuple(d.units) for plan in plans.values() for d in plan.devices}, key=len)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batch = next(batch_iterator(train, None, setup.batch_size, seed=setup.seed + 7))
    trainers = {}
    try:
        for selection in selections:
            model = build_model(setup.model, seed=setup.seed)
            model.load_state_dict(state)
            trainer = SparseTrainer(
                model,
                list(selection),
                optimizer_factory=make_optimizer_factory("sgd", lr=setup.lr, momentum=setup.momentum),
            )
            for _ in range(2):
                trainer.step(*batch)  # one-time allocations and kernel set-up
            trainers[selection] = trainer
        seconds: dict[tuple[str, ...], list[float]] = {selection: [] for selection in selections}
        for _ in range(setup.timing_rounds):
            for selection, trainer in trainers.items():
                seconds[selection] += [trainer.step(*batch).seconds for _ in range(setup.timing_steps)]
    finally:
        for trainer in trainers.values():
            trainer.close()
        torch.set_num_threads(threads)
    medians = {selection: statistics.median(values) for selection, values in seconds.items()}
    for selection in selections:
        progress.say(f"  {len(selection)} units: {medians[selection]:.3f} s per step alone")
    return medians


# --------------------------------------------------------------------------- hard memory caps


def caps_unavailable() -> str | None:
    """Why no hard memory cap can bind here (None: one can; :mod:`flwr_dsparse.hardcap`)."""
    from flwr_dsparse.hardcap import hard_caps_available

    available, reason = hard_caps_available()
    return None if available else reason


def capped_probe(setup: Setup, selection: Sequence[str], cap_mb: float, *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Train ``selection`` for ``probe_steps`` steps in a fresh process under a hard memory cap.

    The process is the library's memory probe (:mod:`flwr_dsparse.probe`) exactly as
    ``experiments/memory_bench.py`` runs it and as a device trains: one thread, lean frozen
    layers, the tuned allocator (:func:`flwr_dsparse.allocator.allocator_env`), and *cold*
    (no warm-up forward), because the cost model the plan was made with counts the runtime's
    first-forward start-up. It builds the model and its batch, then joins its cap
    (:func:`flwr_dsparse.hardcap.run_capped` with ``join="self"``): charges taken before it
    joins stay outside, so the cap binds exactly what training adds, and the kernel kills it
    if training needs more. One process per device: a Flower simulation actor serves several.
    """
    from experiments.memory_bench import run_capped_probe

    result = run_capped_probe(
        setup.model,
        selection,
        cap_mb,
        batch_size=setup.batch_size,
        steps=setup.probe_steps,
        momentum=setup.momentum,
        timeout_s=timeout_s,
        label=f"{len(selection)} units",
        require=True,
    )
    if not result.ok and not result.oom_killed:
        raise RuntimeError(f"capped probe of {len(selection)} units failed: {result.stderr[-1500:]}")
    return {
        "killed": result.oom_killed,
        "cap_mb": cap_mb,
        "peak_mb": result.peak_mb,
        "oom_kills": int(result.oom_killed),
        "exit_code": result.returncode,
    }


def run_capped(setup: Setup, plans: Mapping[str, Plan], progress: Progress) -> dict[str, Any]:
    """Every device of every method (``plans``: name -> plan) trained once under a hard cap of its budget.

    The cap is the budget less the weights the device already holds (they are resident before
    the cap binds). Returns ``enabled: False`` with the reason where no cgroup can bind.
    """
    reason = caps_unavailable()
    if reason:
        progress.say(f"  no hard caps: {reason}")
        return {"enabled": False, "reason": reason}

    def job(device: Any) -> tuple[tuple[str, ...], float]:
        return tuple(device.units), device.budget_mb - (device.predicted_mb.weights if device.predicted_mb else 0.0)

    jobs = sorted({job(d) for plan in plans.values() for d in plan.devices}, key=lambda j: (len(j[0]), j[1]))
    outcomes: dict[tuple[tuple[str, ...], float], dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=setup.probe_workers) as pool:
        for (selection, cap), outcome in zip(jobs, pool.map(lambda j: capped_probe(setup, *j), jobs), strict=True):
            outcomes[(selection, cap)] = outcome
            progress.say(
                f"  {len(selection)} units under a {cap:.1f} MB cap: "
                f"{'KILLED' if outcome['killed'] else 'fits'} (peak {outcome['peak_mb']:.1f} MB)"
            )
    devices = {}
    for name, plan in plans.items():
        devices[name] = [
            {"device": d.id, "budget_mb": d.budget_mb, "num_units": len(d.units), **outcomes[job(d)]}
            for d in plan.devices
        ]
    return {
        "enabled": True,
        "reason": None,
        "description": "every device of every method trained once in its own process under a hard memory cap "
        "(flwr_dsparse.hardcap, a cgroup) of its budget less its resident weights, bound after the "
        f"model and the batch exist, cold (no warm-up forward), {setup.probe_steps} steps, one thread, "
        "lean frozen layers, the tuned allocator (flwr_dsparse.probe, as memory_bench); "
        "the kernel kills a process that needs more",
        "devices": devices,
    }


def add_caps(out: Path) -> dict[str, Any]:
    """Run the hard-cap stage for a finished run in ``out`` (its plans, budgets and setup) and re-render it.

    The capped probes are separate processes that depend only on the plans, so running them
    afterwards gives what the stage gives inside the run; results.json says it was added so.
    """
    from experiments import report

    results = json.loads((out / "results.json").read_text())
    fields_ = {f for f in Setup.__dataclass_fields__}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in results["setup"].items() if k in fields_}
    setup = Setup(**values)
    dsparse = Plan.from_json(json.dumps(results["plan"]["dsparse"]))
    units = model_units(build_model(setup.model, seed=setup.seed))
    sizes = {name: t.numel() * t.element_size() for name, t in build_model(setup.model).state_dict().items()}
    ids = [d.id for d in dsparse.devices]
    estimates = {d.id: d.predicted_mb for d in dsparse.devices}  # only their weights are read

    def same_for_all(selection: Sequence[str]) -> Plan:
        return plan_from_selections(
            units,
            {i: list(selection) for i in ids},
            sizes,
            budgets_mb={d.id: d.budget_mb for d in dsparse.devices},
            batch_sizes=dict.fromkeys(ids, setup.batch_size),
            estimates=estimates,
        )

    smallest = min(dsparse.devices, key=lambda d: d.budget_mb)
    capped = {
        "fedavg_capped": same_for_all([u.name for u in units]),
        "dsparse": dsparse,
        **({"uniform": same_for_all(smallest.units)} if "uniform" in results["methods"] else {}),
    }
    progress = Progress()
    with progress.stage("every device under a hard memory cap of its budget (one process each)"):
        caps = run_capped(setup, capped, progress)
    caps["added"] = "after the run, by `python -m experiments.compare --add-caps DIR` (the same plans and budgets)"
    results["caps"] = caps
    results["setup"]["hard_caps"], results["setup"]["hard_caps_reason"] = caps["enabled"], caps["reason"]
    results["summary"] = summarise(results["methods"], results.get("link"), caps)
    results = json.loads(json.dumps(results, default=float))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.write_csv(results, out / "results.csv")
    (out / "REPORT.md").write_text(report.render_report(results))
    return results


# --------------------------------------------------------------------------- Flower simulation (methods 1-4)


def _timed(base: type) -> type:
    """``base`` whose whole ``aggregate_train`` call is timed.

    The strategies time only their averaging; the whole call (decoding the replies,
    checking them, averaging, encoding the new model) is what the server spends per
    round, the same way for both, so it is the figure the methods are compared on.
    """

    class Timed(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.aggregate_train_seconds: list[float] = []

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            started = time.perf_counter()
            output = super().aggregate_train(server_round, replies)
            self.aggregate_train_seconds.append(time.perf_counter() - started)
            return output

    Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
    return Timed


class _Evaluator:
    """Flower's ``evaluate_fn``: held-out accuracy every ``eval_every`` steps, timed apart from training."""

    def __init__(
        self,
        model: torch.nn.Module,
        test: Split,
        local_steps: int,
        eval_every: int,
        rounds: int,
        progress: Progress,
        label: str,
    ) -> None:
        self.model, self.test, self.local_steps = model, test, local_steps
        self.every_rounds = eval_every // local_steps
        self.rounds, self.progress, self.label = rounds, progress, label
        self.rows: list[dict[str, Any]] = []
        self.started: float | None = None
        self.eval_seconds = 0.0

    def __call__(self, server_round: int, arrays: Any) -> Any:
        from flwr.app import MetricRecord

        from flwr_dsparse.records import from_array_record

        now = time.perf_counter()
        if self.started is None:
            self.started = now
        if server_round % self.every_rounds and server_round != self.rounds:
            return None
        self.model.load_state_dict(from_array_record(arrays))
        loss, accuracy = evaluate_state(self.model, self.test)
        self.rows.append(
            {
                "round": server_round,
                "step": server_round * self.local_steps,
                "sim_wall_s": now - self.started - self.eval_seconds,
                "accuracy": accuracy,
                "loss": loss,
            }
        )
        self.eval_seconds += time.perf_counter() - now
        self.progress.say(
            f"  {self.label}: step {server_round * self.local_steps:3d}, held-out accuracy {accuracy:.3f}"
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower logs every round at INFO; the comparison prints its own progress instead."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_flower_method(
    method: str,
    setup: Setup,
    state: Mapping[str, torch.Tensor],
    plan: Plan | None,
    test: Split,
    progress: Progress,
    replan: Callable[[Mapping[str, torch.Tensor]], Plan] | None = None,
) -> dict[str, Any]:
    """Run one of methods 1-4 in Flower's in-process simulation; returns its history and evaluations.

    ``replan`` (with ``rescore-every``) makes every plan after the first from the global model.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from flwr_dsparse.config import load_config
    from flwr_dsparse.records import to_array_record
    from flwr_dsparse.strategy import DeviceReport, DSparse
    from server.app import MeasuredFedAvg

    config = load_config(setup.run_config(method))
    record: dict[str, Any] = {}
    server_app = ServerApp()

    plans_made = 0

    def fixed_plan(reports: Sequence[DeviceReport], global_tensors: Mapping[str, torch.Tensor]) -> Plan:
        nonlocal plans_made
        assert plan is not None
        reported = sorted(report.device for report in reports)
        if reported != list(plan.device_ids):
            raise ValueError(f"devices {reported} answered the query, the plan has {list(plan.device_ids)}")
        plans_made += 1
        # The first plan is the one every method's figures are measured for; re-scorings follow training.
        return plan if plans_made == 1 or replan is None else replan(global_tensors)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            evaluator = _Evaluator(
                build_model(config.model, seed=config.seed),
                test,
                config.local_steps,
                setup.eval_every,
                config.num_server_rounds,
                progress,
                method,
            )
            initial = to_array_record(dict(state))
            if method == "fedavg":
                strategy = _timed(MeasuredFedAvg)(
                    fraction_evaluate=0.0, min_train_nodes=setup.num_devices, min_available_nodes=setup.num_devices
                )
                strategy.start(
                    grid,
                    initial,
                    num_rounds=config.num_server_rounds,
                    timeout=config.round_timeout,
                    train_config=ConfigRecord(config.to_run_config()),
                    evaluate_fn=evaluator,
                )
            else:
                strategy = _timed(DSparse)(
                    plan_fn=fixed_plan,
                    rescore_every=config.rescore_every,
                    train_config=config.to_run_config(),
                    query_config=config.to_run_config(),
                    min_nodes=setup.num_devices,
                    settle_s=0.5,
                )
                strategy.start(
                    grid,
                    initial,
                    num_rounds=config.num_server_rounds,
                    timeout=config.round_timeout,
                    evaluate_fn=evaluator,
                )
            record.update(
                history=strategy.history,
                aggregate_train_s=strategy.aggregate_train_seconds,
                evaluations=evaluator.rows,
                events=list(getattr(strategy, "events", [])),  # DSparse's re-plans
            )
        except BaseException as error:  # the simulation runtime only logs a ServerApp's exception
            record["error"] = error
            raise

    started = time.perf_counter()
    with _quiet_flower():
        run_simulation(
            server_app,
            client_app,
            num_supernodes=setup.num_devices,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {
                    "num_cpus": setup.num_cpus,
                    "include_dashboard": False,
                    "logging_level": "ERROR",
                    "log_to_driver": False,
                },
            },
        )
    if "error" in record:
        raise RuntimeError(f"method {method} failed in the simulation: {record['error']!r}") from record["error"]
    if "history" not in record:
        raise RuntimeError(f"method {method}: the simulation ended without running the ServerApp to the end")
    record["run_seconds"] = time.perf_counter() - started
    record["run_config"] = setup.run_config(method)
    return record


# --------------------------------------------------------------------------- collective transport (method 5)


def _evaluate_point(
    judge: torch.nn.Module, model: torch.nn.Module, test: Split, step: int, *, wall_s: float
) -> dict[str, float]:
    """One point of method 5's accuracy curve: ``model``'s weights evaluated in ``judge``."""
    judge.load_state_dict(model.state_dict())
    loss, accuracy = evaluate_state(judge, test)
    print(f"[compare]   collective: step {step:3d}, held-out accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
    return {"step": step, "wall_s": wall_s, "accuracy": accuracy, "loss": loss}


def _collective_rank(rank: int, world_size: int, master_addr: str, master_port: int, job: dict) -> list[dict]:
    """One device of method 5, for every phase of ``job`` (one process, one rendezvous).

    Each phase starts from the checkpoint with the client's partition and batch stream
    for this partition id and trains this rank's selection of the phase's plan with the
    ClientApp's own collective round (:func:`~flwr_dsparse.collective.run_collective_round`),
    in chunks between which rank 0 evaluates (if asked); the momentum carries over the chunks.
    """
    import torch.distributed as dist

    from flwr_dsparse.collective import Rendezvous, join_default_group, run_collective_round

    setup = Setup(
        **{
            **job["setup"],
            "budgets_mb": tuple(job["setup"]["budgets_mb"]),
            "budget_fractions": tuple(job["setup"]["budget_fractions"]),
        }
    )
    train, test = load_splits(setup)
    checkpoint = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    indices = job["partitions"][rank]
    rendezvous = Rendezvous(rank, world_size, master_addr, master_port)
    optimizer_factory = make_optimizer_factory("sgd", lr=setup.lr, momentum=setup.momentum)
    outputs = []
    # Joined once here, so every round below builds only its plan's groups (and leaves this group up).
    join_default_group(rendezvous, timeout_s=setup.collective_timeout_s)
    try:
        for phase in job["phases"]:
            plan = Plan.from_json(phase["plan"])
            model = build_model(setup.model, seed=setup.seed)
            model.load_state_dict(checkpoint)
            batches = iter(batch_iterator(train, indices, setup.batch_size, seed=setup.seed * 10_007 + rank))
            # Rank 0 evaluates a copy: eval mode on the training model would switch its BatchNorm mid-run.
            judge = build_model(setup.model, seed=setup.seed) if rank == 0 and phase["evaluate"] else None
            out: dict[str, Any] = {
                "rank": rank,
                "compute_s": [],
                "aggregation_s": [],
                "losses": [],
                "payload_bytes": 0,
                "curve": [],
                "steps": phase["steps"],
            }
            started, eval_seconds, done = time.perf_counter(), 0.0, 0
            momentum: dict[str, torch.Tensor] = {}
            chunk = setup.eval_every if phase["evaluate"] else phase["steps"]
            while True:
                if judge is not None:  # at the start and after every chunk; not counted as training time
                    eval_started = time.perf_counter()
                    point = _evaluate_point(judge, model, test, done, wall_s=eval_started - started - eval_seconds)
                    out["curve"].append(point)
                    eval_seconds += time.perf_counter() - eval_started
                if done >= phase["steps"]:
                    break
                steps = min(chunk, phase["steps"] - done)
                # Every rank holds the whole current model after a round's broadcasts; the others
                # wait in the next round's plan check while rank 0 evaluates.
                result = run_collective_round(
                    plan,
                    rendezvous,
                    model,
                    batches,
                    steps,
                    optimizer_factory,
                    setup.collective_timeout_s,
                    fused=phase["fused"],
                    sync_start=False,
                    momentum_state=momentum,
                )
                momentum = result.momentum_state
                done += steps
                out["compute_s"] += result.compute_seconds
                out["aggregation_s"] += result.aggregation_seconds
                out["losses"] += result.losses
                out["payload_bytes"] += result.payload_bytes
            outputs.append(out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return outputs


def run_collective(phases: Sequence[Mapping[str, Any]], setup: Setup, checkpoint: Path) -> list[dict[str, Any]]:
    """Run ``phases`` (plan, steps, evaluate, fused) with the collective transport's local launcher.

    All phases share one launch (one process per device), because starting seven
    processes that import torch is the slowest part on a small machine.
    """
    from flwr_dsparse.collective import launch_local

    train, _ = load_splits(setup)
    # The ClientApp's partitions (partition id = rank), computed once here: flwr-datasets is a
    # heavy import for seven processes.
    partitions = [p.tolist() for p in partition_indices(train.y, setup.num_devices, method="iid", seed=setup.seed)]
    job = {
        "setup": asdict(setup),
        "checkpoint": str(checkpoint),
        "partitions": partitions,
        "phases": [{**phase, "plan": phase["plan"].to_json()} for phase in phases],
    }
    started = time.perf_counter()
    outcomes = launch_local(
        _collective_rank, setup.num_devices, (job,), deadline_s=setup.collective_timeout_s * 4, threads_per_rank=1
    )
    # A rank that reported its result but was slow to exit is killed by the launcher after 30 s
    # (exit code -9); its result is complete, so only a missing result or an error is a failure.
    failed = [
        f"rank {o.rank}: {(o.error or '').strip().splitlines()[0] if o.error else f'exit code {o.exitcode}'}"
        for o in outcomes
        if o.error is not None or o.result is None
    ]
    if failed:
        raise RuntimeError("the collective run failed: " + "; ".join(failed))
    seconds = time.perf_counter() - started
    return [
        {
            "ranks": [o.result[index] for o in outcomes],
            "steps": phase["steps"],
            "fused": phase["fused"],
            "run_seconds": seconds,
        }
        for index, phase in enumerate(phases)
    ]


# --------------------------------------------------------------------------- measures


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def _device_rows(plan: Plan, memory: Mapping[tuple[str, ...], dict]) -> list[dict[str, Any]]:
    rows = []
    for device in plan.devices:
        predicted = device.predicted_mb
        rows.append(
            {
                "device": device.id,
                "budget_mb": device.budget_mb,
                "units": list(device.units),
                "num_units": len(device.units),
                "predicted_mb": predicted.total if predicted else float("nan"),
                "predicted_parts_mb": predicted.to_dict() if predicted else {},
                # What training adds on top of the loaded model, the part a selection changes.
                "predicted_training_mb": (predicted.total - predicted.weights - predicted.reserve)
                if predicted
                else float("nan"),
                "measured_mb": memory[tuple(device.units)]["increase_mb"],
                # The selection's step timed alone (time_selections): free of the simulation's co-scheduling.
                "isolated_step_s": memory[tuple(device.units)]["step_s_alone"],
            }
        )
    return rows


def flower_measures(method: str, run: Mapping[str, Any], plan: Plan, memory: Mapping, setup: Setup) -> dict[str, Any]:
    """The method's row from a Flower run: per-device and cluster figures, per step."""
    local_steps = int(run["run_config"]["local-steps"])
    history = run["history"]
    devices = _device_rows(plan, memory)
    for row in devices:
        key = str(row["device"])
        rounds = [entry["devices"][key] for entry in history if entry["devices"].get(key, {}).get("status") == "ok"]
        row["step_s"] = _median([r["step-seconds"] for r in rounds])
        # Round 1 hands every device the starting model (all methods pay it once); steady state is from round 2.
        steady = rounds[1:] or rounds
        row["bytes_up_per_step"] = _mean([r["bytes-up"] for r in steady]) / local_steps
        row["bytes_down_per_step"] = _mean([r["bytes-down"] for r in steady]) / local_steps
        row["bytes_total"] = float(sum(r["bytes-up"] + r["bytes-down"] for r in rounds))
    per_round_compute = [
        max(entry["devices"][d]["step-seconds"] for d in entry["devices"] if entry["devices"][d].get("status") == "ok")
        * local_steps
        for entry in history
    ]
    aggregate_train = list(run["aggregate_train_s"])
    averaging = [entry["aggregation-seconds"] for entry in history]
    cluster_time = []
    total = 0.0
    for compute, aggregate in zip(per_round_compute, aggregate_train, strict=False):
        total += compute + aggregate
        cluster_time.append(total)
    curve = []
    for row in run["evaluations"]:
        rounds = row["round"]
        curve.append(
            {
                "step": row["step"],
                "cluster_s": cluster_time[rounds - 1] if rounds else 0.0,
                "sim_wall_s": row["sim_wall_s"],
                "accuracy": row["accuracy"],
                "loss": row["loss"],
            }
        )
    return {
        "label": METHOD_LABELS[method],
        "path": "flower-simulation",
        "local_steps": local_steps,
        "rounds": len(history),
        "cluster_step_s": _median([c / local_steps for c in per_round_compute]),
        "aggregation_s_per_step": _median(aggregate_train) / local_steps,
        "aggregation_s_per_round": _median(aggregate_train),
        "averaging_s_per_round": _median(averaging),
        **_method_figures(devices, curve, run["run_seconds"], cluster_time[-1]),
        "accepted_every_round": all(entry["accepted"] == list(range(setup.num_devices)) for entry in history)
        if method != "fedavg"
        else True,
        # rescore-every: how often the plan was made again, and how many device selections it changed
        "replans": [
            {"round": event["round"], "changed": sorted(event["changed"], key=int)}
            for event in run.get("events", [])
            if event.get("event") == "replan"
        ],
    }


def _method_figures(
    devices: list[dict[str, Any]], curve: list[dict[str, Any]], run_seconds: float, total_cluster_s: float
) -> dict[str, Any]:
    """The figures every method's row has, whatever its transport: per device, then the curve's ends."""
    return {
        "devices": devices,
        "isolated_cluster_step_s": max(d["isolated_step_s"] for d in devices),
        "mean_device_step_s": _mean([d["step_s"] for d in devices]),
        "bytes_up_per_step": _mean([d["bytes_up_per_step"] for d in devices]),
        "bytes_down_per_step": _mean([d["bytes_down_per_step"] for d in devices]),
        "curve": curve,
        "final_accuracy": curve[-1]["accuracy"],
        "initial_accuracy": curve[0]["accuracy"],
        "run_seconds": run_seconds,
        "total_cluster_s": total_cluster_s,
    }


def _per_step(ranks: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Per step: the cluster's step time (slowest rank, compute plus collectives), and the collective time.

    A rank's collective time includes waiting for slower ranks; the rank that waits
    least (the minimum) is the closest to the collectives' own cost.
    """
    steps = len(ranks[0]["compute_s"])
    cluster = [max(r["compute_s"][s] + r["aggregation_s"][s] for r in ranks) for s in range(steps)]
    aggregation = [min(r["aggregation_s"][s] for r in ranks) for s in range(steps)]
    return cluster, aggregation


def collective_measures(
    run: Mapping[str, Any],
    baseline: Mapping[str, Any],
    plan: Plan,
    memory: Mapping,
    test_accuracy0: float | None = None,
) -> dict[str, Any]:
    """Method 5's row, plus the full-model run over the same transport as its timing baseline."""
    ranks = sorted(run["ranks"], key=lambda r: r["rank"])
    devices = _device_rows(plan, memory)
    for row, rank in zip(devices, ranks, strict=False):
        row["step_s"] = _median(rank["compute_s"])
        # A collective's payload is what the rank hands to all-reduce and broadcast: sent and
        # received are the same buffer, so it counts for both directions.
        row["bytes_up_per_step"] = rank["payload_bytes"] / run["steps"]
        row["bytes_down_per_step"] = rank["payload_bytes"] / run["steps"]
        row["bytes_total"] = float(rank["payload_bytes"])
    cluster, aggregation = _per_step(ranks)
    base_ranks = sorted(baseline["ranks"], key=lambda r: r["rank"])
    base_cluster, base_aggregation = _per_step(base_ranks)
    cumulative, total = [], 0.0
    for value in cluster:
        total += value
        cumulative.append(total)
    curve = [
        {
            "step": point["step"],
            "cluster_s": cumulative[point["step"] - 1] if point["step"] else 0.0,
            "sim_wall_s": point["wall_s"],
            "accuracy": point["accuracy"],
            "loss": point["loss"],
        }
        for point in ranks[0]["curve"]
    ]
    return {
        "label": METHOD_LABELS["collective"],
        "path": "collective-launcher (7 local gloo processes; no Flower server)",
        "local_steps": 1,
        "rounds": run["steps"],
        "cluster_step_s": _median(cluster),
        "aggregation_s_per_step": _median(aggregation),
        "aggregation_s_per_round": _median(aggregation),
        "averaging_s_per_round": _median(aggregation),
        **_method_figures(devices, curve, run["run_seconds"], cumulative[-1]),
        "accepted_every_round": True,
        "full_update_same_transport": {
            "steps": baseline["steps"],
            "cluster_step_s": _median(base_cluster),
            "mean_device_step_s": _mean([_median(r["compute_s"]) for r in base_ranks]),
            "aggregation_s_per_step": _median(base_aggregation),
            "bytes_per_step": _mean([r["payload_bytes"] / baseline["steps"] for r in base_ranks]),
            "run_seconds": baseline["run_seconds"],
        },
    }


#: Which exchange each method makes per step, and how many local steps share one.
LINK_EXCHANGES = {
    "fedavg": ("full", 1),
    "uniform": ("uniform", 1),
    "dsparse": ("dsparse", 1),
    "dsparse_k": ("dsparse", None),
    "collective": ("dsparse", 1),
}


def time_link(setup: Setup, plans: Mapping[str, Plan], progress: Progress) -> dict[str, Any]:
    """Every distinct exchange of the methods (``plans``: exchange name -> plan) over the emulated link.

    The fused group exchange of a plan is what the collective transport does per step (all-reduce
    among a group's members, broadcast to the others); for the full plan it is one all-reduce of
    the whole model, FedAvg's exchange. Returns ``available: False`` with the reason where the
    machine allows no network namespace.
    """
    from experiments.aggregation_bench import NamespaceUnavailable, time_exchanges_on_link

    if not setup.link_rates_mbit:
        return {"available": False, "reason": "skipped (no link rates)", "rates_mbit": []}
    try:
        raw = time_exchanges_on_link(
            setup.model,
            dict(plans),
            setup.link_rates_mbit,
            steps=setup.link_steps,
            timeout_s=setup.collective_timeout_s * 2,
        )
    except NamespaceUnavailable as error:
        progress.say(f"  no emulated link: {error}")
        return {"available": False, "reason": str(error), "rates_mbit": list(setup.link_rates_mbit)}
    seconds = {name: {rate: raw[rate][name]["median_s"] for rate in raw} for name in plans}
    for name in plans:
        progress.say(f"  {name}: " + ", ".join(f"{seconds[name][rate]:.2f} s at {rate} Mbit/s" for rate in raw))
    return {
        "available": True,
        "reason": None,
        "rates_mbit": list(setup.link_rates_mbit),
        "emulation": "private network namespace, lo MTU 1500, tc tbf burst 256kb latency 200ms (bandwidth only, "
        f"shared by all {setup.num_devices} ranks); fused group exchange, {setup.link_steps} step(s)",
        "seconds_per_exchange": seconds,
        "payload_mb_per_rank_mean": {
            name: statistics.fmean(raw[str(setup.link_rates_mbit[0])][name]["payload_bytes_per_rank"]) / MB
            for name in plans
        },
        "wire_mb_per_exchange": {
            name: raw[str(setup.link_rates_mbit[0])][name]["wire_bytes_per_step"] / MB for name in plans
        },
        "raw": raw,
    }


def link_per_step(link: Mapping[str, Any], method: str, local_steps: int) -> dict[str, float] | None:
    """Seconds per training step that ``method`` spends on the emulated link, per rate (None: not timed)."""
    if not link.get("available"):
        return None
    name, every = LINK_EXCHANGES[method]
    per = every or local_steps
    return {str(rate): value / per for rate, value in link["seconds_per_exchange"][name].items()}


#: Which capped run stands for each method's devices (methods 3-5 share one plan).
CAPPED_AS = {
    "fedavg": None,
    "uniform": "uniform",
    "dsparse": "dsparse",
    "dsparse_k": "dsparse",
    "collective": "dsparse",
}


def summarise(
    methods: Mapping[str, Mapping[str, Any]],
    link: Mapping[str, Any] | None = None,
    caps: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The headline ratios against method 1, the way the paper states its figures."""
    full = methods["fedavg"]

    def mean_of(method: str, key: str) -> float:
        return _mean([d[key] for d in methods[method]["devices"]])

    summary: dict[str, Any] = {}
    for name, method in methods.items():
        summary[name] = {
            "mean_predicted_mb": mean_of(name, "predicted_mb"),
            "mean_measured_mb": mean_of(name, "measured_mb"),
            "max_predicted_mb": max(d["predicted_mb"] for d in method["devices"]),
            "predicted_saving_pct": 100 * (1 - mean_of(name, "predicted_mb") / mean_of("fedavg", "predicted_mb")),
            "measured_saving_pct": 100 * (1 - mean_of(name, "measured_mb") / mean_of("fedavg", "measured_mb")),
            "cluster_step_ratio": method["cluster_step_s"] / full["cluster_step_s"],
            "isolated_cluster_step_ratio": max(d["isolated_step_s"] for d in method["devices"])
            / max(d["isolated_step_s"] for d in full["devices"]),
            "mean_step_ratio": method["mean_device_step_s"] / full["mean_device_step_s"],
            "aggregation_ratio": method["aggregation_s_per_step"] / full["aggregation_s_per_step"],
            "bytes_ratio": (method["bytes_up_per_step"] + method["bytes_down_per_step"])
            / (full["bytes_up_per_step"] + full["bytes_down_per_step"]),
            "accuracy_delta": method["final_accuracy"] - full["final_accuracy"],
        }
        timed = link_per_step(link or {}, name, method["local_steps"])
        reference = link_per_step(link or {}, "fedavg", 1)
        rates = [str(rate) for rate in (link or {}).get("rates_mbit", [])]
        summary[name]["link_aggregation_s_per_step"] = timed
        summary[name]["link_aggregation_ratio"] = timed[rates[0]] / reference[rates[0]] if timed else None
        for rate in rates[1:]:
            summary[name][f"link_aggregation_ratio_{rate}mbit"] = timed[rate] / reference[rate] if timed else None
        if not timed:
            summary[name]["link_aggregation_reason"] = (link or {}).get("reason", "not timed")
        capped_as = CAPPED_AS[name]
        if caps and caps.get("enabled") and capped_as in caps["devices"]:
            summary[name]["oom_killed"] = sum(d["killed"] for d in caps["devices"][capped_as])
        else:
            # fedavg is the uncapped reference (its capped twin is summary.fedavg_capped).
            summary[name]["oom_killed"] = None
    if caps and caps.get("enabled"):
        capped = caps["devices"]["fedavg_capped"]
        summary["fedavg_capped"] = {
            "oom_killed": sum(d["killed"] for d in capped),
            "devices": len(capped),
            "killed_devices": [d["device"] for d in capped if d["killed"]],
            "budgets_mb": [d["budget_mb"] for d in capped],
        }
    else:
        summary["fedavg_capped"] = {"oom_killed": None, "reason": (caps or {}).get("reason", "no caps")}
    summary["paper_ratios"] = {
        "memory": PAPER["memory_dsparse_mb"] / PAPER["memory_full_mb"],
        "batch": PAPER["batch_dsparse_s"] / PAPER["batch_full_s"],
        "batch_fused": PAPER["batch_fused_s"] / PAPER["batch_full_s"],
        "batch_fused_vs_dsparse": PAPER["batch_fused_s"] / PAPER["batch_dsparse_s"],
        "aggregation": 1 - PAPER["aggregation_reduction_pct"] / 100,
    }
    dsparse = methods.get("dsparse")
    if dsparse is not None:
        slowest = max(dsparse["devices"], key=lambda d: d["isolated_step_s"])
        budgets = [d["budget_mb"] for d in full["devices"]]
        unit_count = len(full["devices"][0]["units"])
        summary["facts"] = {
            "mean_budget_mb": _mean(budgets),
            "min_budget_mb": min(budgets),
            "max_budget_mb": max(budgets),
            "budget_spread": max(budgets) / min(budgets),
            "full_predicted_mb": full["devices"][0]["predicted_mb"],
            "full_measured_mb": full["devices"][0]["measured_mb"],
            "mean_budget_over_full_pct": 100 * _mean(budgets) / full["devices"][0]["predicted_mb"],
            "weights_mb": full["devices"][0]["predicted_parts_mb"].get("weights", float("nan")),
            "devices_fitting_full": sum(b >= full["devices"][0]["predicted_mb"] for b in budgets),
            "slowest_device": slowest["device"],
            "slowest_device_units": slowest["num_units"],
            "slowest_device_first_unit": slowest["units"][0] if slowest["units"] else "-",
            "unit_count": unit_count,
            "slowest_device_step_over_full_pct": 100 * slowest["isolated_step_s"] / full["isolated_cluster_step_s"],
        }
    collective = methods.get("collective")
    if collective is not None:
        base = collective["full_update_same_transport"]
        summary["collective"]["same_transport_cluster_step_ratio"] = (
            collective["cluster_step_s"] / base["cluster_step_s"]
        )
        summary["collective"]["same_transport_aggregation_ratio"] = (
            collective["aggregation_s_per_step"] / base["aggregation_s_per_step"]
        )
        summary["collective"]["same_transport_bytes_ratio"] = collective["bytes_up_per_step"] / base["bytes_per_step"]
        if "dsparse" in methods:
            # Methods 3 and 5 compute the same update by different transports (see the report).
            pairs = zip(methods["dsparse"]["curve"], collective["curve"], strict=False)
            summary["collective"]["max_loss_gap_vs_dsparse"] = max(abs(a["loss"] - b["loss"]) for a, b in pairs)
    return summary


# --------------------------------------------------------------------------- the run


def _versions() -> dict[str, str]:
    import flwr
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "flwr": getattr(flwr, "__version__", "?"),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }


def run_compare(
    out: Path,
    setup: Setup,
    *,
    weights: Path | None = None,
    command: str = "",
    methods: Sequence[str] = METHODS,
    progress: Progress | None = None,
    plots: bool = True,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write ``results.json``, ``results.csv``, the plots and ``REPORT.md`` to ``out``."""
    from experiments import report

    setup.check()
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "fedavg" not in methods:
        raise ValueError(
            f"methods {list(methods)}: every run needs 'fedavg' (the reference); known: {', '.join(METHODS)}"
        )
    progress = progress or Progress()
    out.mkdir(parents=True, exist_ok=True)
    budgets_given = bool(setup.budgets_mb)
    budgets = (
        f"budgets {', '.join(f'{b:g}' for b in setup.budgets_mb)} MB"
        if setup.budgets_mb
        else f"budgets {', '.join(f'{f:g}' for f in setup.budget_fractions)} of the full update's need"
    )
    progress.say(
        f"{setup.num_devices} devices, {budgets}, {setup.model}, {setup.dataset}, {setup.steps} steps at "
        f"batch {setup.batch_size}, {setup.plan_objective} plan; output {out}"
    )
    train, test = load_splits(setup)
    checkpoint, state, checkpoint_info = starting_checkpoint(setup, out, weights, train, test, progress)
    start_model = build_model(setup.model, seed=setup.seed)
    start_model.load_state_dict(state)
    start_loss, start_accuracy = evaluate_state(start_model, test)
    old = test.y < setup.pretrain_classes
    checkpoint_info.update(held_out_accuracy=start_accuracy, held_out_loss=start_loss)
    progress.say(
        f"starting checkpoint: held-out accuracy {start_accuracy:.3f} over all 10 classes "
        f"({int(old.sum())} of {len(test)} test examples are of the pre-training classes)"
    )

    threads = torch.get_num_threads()
    with progress.stage("profiling memory and planning"):
        plans = make_plans(setup, state, train)
    torch.set_num_threads(threads)
    # From here on every method runs with the budgets in MB (the simulation's sim-budgets-mb).
    setup = replace(setup, budgets_mb=plans.budgets_mb)
    progress.say(
        f"  full update predicted {plans.full_mb:.1f} MB; budgets "
        f"{', '.join(f'{b:g}' for b in plans.budgets_mb)} MB "
        f"(mean {100 * statistics.fmean(plans.budgets_mb) / plans.full_mb:.0f}% of it)"
    )
    method_plans = {
        "fedavg": plans.full,
        "uniform": plans.uniform,
        "dsparse": plans.dsparse,
        "dsparse_k": plans.dsparse,
        "collective": plans.dsparse,
    }
    for device in plans.dsparse.devices:
        progress.say(
            f"  device {device.id}: budget {device.budget_mb:g} MB -> {len(device.units)} units, "
            f"predicted {device.predicted_mb.total:.1f} MB"
        )
    with progress.stage("measuring memory (fresh subprocess per selection)"):
        memory = measure_memory(setup, {m: method_plans[m] for m in methods}, progress)
    with progress.stage("timing each selection alone (one thread, interleaved)"):
        for selection, seconds in time_selections(
            setup, {m: method_plans[m] for m in methods}, state, train, progress
        ).items():
            memory[selection]["step_s_alone"] = seconds

    caps: dict[str, Any] = {"enabled": False, "reason": "skipped (hard_caps off)"}
    if setup.hard_caps:
        with progress.stage("every device under a hard memory cap of its budget (one process each)"):
            capped = {
                "fedavg_capped": plans.full,
                "dsparse": plans.dsparse,
                **({"uniform": plans.uniform} if "uniform" in methods else {}),
            }
            caps = run_capped(setup, capped, progress)
    with progress.stage(
        f"each method's exchange over the emulated edge link "
        f"({', '.join(f'{r} Mbit/s' for r in setup.link_rates_mbit)})"
    ):
        exchanges = {"full": plans.full, "uniform": plans.uniform, "dsparse": plans.dsparse}
        link = time_link(setup, {name: exchanges[name] for name in {LINK_EXCHANGES[m][0] for m in methods}}, progress)

    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == "collective":
            continue
        with progress.stage(f"method {METHOD_LABELS[method]}"):
            run = run_flower_method(
                method,
                setup,
                state,
                None if method == "fedavg" else method_plans[method],
                test,
                progress,
                # A model for re-scoring only where the method re-plans at all.
                replan=rescoring_planner(setup, plans, train)
                if setup.rescore_every and method.startswith("dsparse")
                else None,
            )
        runs[method] = flower_measures(method, run, method_plans[method], memory, setup)
    if "collective" in methods:
        label = f"method {METHOD_LABELS['collective']}, then the full model over the same transport (timing baseline)"
        with progress.stage(label):
            collective, baseline = run_collective(
                [
                    {"plan": plans.dsparse, "steps": setup.steps, "evaluate": True, "fused": True},
                    {"plan": plans.full, "steps": setup.baseline_steps, "evaluate": False, "fused": True},
                ],
                setup,
                checkpoint,
            )
        runs["collective"] = collective_measures(collective, baseline, plans.dsparse, memory)

    results = {
        "command": command,
        "quick": quick,
        "setup": asdict(setup),
        "budgets": {
            "source": "--budgets" if budgets_given else "budget_fractions x the full update's predicted need",
            "mb": list(plans.budgets_mb),
            "full_predicted_mb": plans.full_mb,
            "fractions_of_full": [b / plans.full_mb for b in plans.budgets_mb],
            "mean_fraction_of_full": statistics.fmean(plans.budgets_mb) / plans.full_mb,
            "all_below_full": all(b < plans.full_mb for b in plans.budgets_mb),
        },
        "machine": _versions(),
        "checkpoint": checkpoint_info,
        "plan": {
            "dsparse": plans.dsparse.to_dict(),
            "digest": plans.dsparse.digest(),
            "unit_names": list(plans.cost.unit_names),
            "scores": plans.scores,
            "groups": len(plans.dsparse.groups),
            "frozen_units": list(plans.dsparse.frozen_units),
        },
        "paper": PAPER,
        "methods": runs,
        "link": link,
        "caps": caps,
        "summary": summarise(runs, link, caps),
        "stage_seconds": dict(progress.stage_seconds),
        "total_seconds": time.perf_counter() - progress.started,
    }
    # Everything below reads the JSON round trip, so the report is exactly what results.json renders to.
    results["setup"]["hard_caps"] = caps["enabled"]
    results["setup"]["hard_caps_reason"] = caps["reason"]
    results = json.loads(json.dumps(results, default=float))
    if plots:
        from experiments import plots as plotting

        results["plots"] = plotting.write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.write_csv(results, out / "results.csv")
    (out / "REPORT.md").write_text(report.render_report(results))
    progress.say(f"wrote {out / 'results.json'}, results.csv, plots and REPORT.md in {results['total_seconds']:.0f} s")
    return results


# --------------------------------------------------------------------------- CLI


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, required=True, help="output folder (the checkpoint is cached here too)")
    parser.add_argument("--quick", action="store_true", help="the CI size: TinyNet, 6 steps (under 3 minutes)")
    parser.add_argument("--weights", type=Path, default=None, help="start from this state dict instead of pre-training")
    parser.add_argument(
        "--model", default=None, choices=sorted(MODELS), help="default mobilenet_v2 (tiny with --quick)"
    )
    parser.add_argument(
        "--budgets",
        default=None,
        help="MB per device, comma-separated (default: --budget-fractions of the full update's need)",
    )
    parser.add_argument(
        "--budget-fractions",
        default=None,
        help="each device's budget as a share of the full update's predicted need, comma-separated "
        "(default 0.28,0.31,0.34,0.38,0.44,0.53,0.60: mean 0.41, near the paper's 0.40)",
    )
    parser.add_argument(
        "--plan-objective",
        default=None,
        choices=OBJECTIVES,
        help="DSparse planner: balanced (default: also picks the cluster's step cap) or criticality "
        "(memory only, the paper's planner)",
    )
    parser.add_argument("--steps", type=int, default=None, help="local steps per device, every method (default 300)")
    parser.add_argument("--local-steps", type=int, default=None, help="K of method 4 (default 4)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--dataset",
        default=None,
        choices=DATASETS,
        help="default fashion-mnist where Debian's dataset-fashion-mnist is installed, else synthetic "
        "(embedded); cifar10 reads --data-root",
    )
    parser.add_argument(
        "--data-root", default=None, help="folder that holds cifar-10-batches-py, or Fashion-MNIST's four IDX files"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs for the simulation (default 2)")
    parser.add_argument(
        "--max-step-fraction",
        type=float,
        default=None,
        help="DSparse planner's step-time cap by hand, a fraction of a full update's step (default 1: none)",
    )
    parser.add_argument(
        "--rescore-every",
        type=int,
        default=None,
        help="DSparse re-plans every N rounds on criticality scored on the trained model (default 0: never)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (fedavg is required)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(func=_cli_main)
    return parser


def setup_from_args(args: argparse.Namespace) -> Setup:
    setup = QUICK if args.quick else DEFAULT
    changes: dict[str, Any] = {}
    if args.dataset is None and args.data_root is None:
        # Real images where Debian's package is installed, else the embedded set; the first line says which.
        changes["dataset"], changes["data_root"], note = default_dataset()
        print(f"[compare] {note}", file=sys.stderr, flush=True)
    for name in (
        "model",
        "steps",
        "local_steps",
        "batch_size",
        "dataset",
        "data_root",
        "num_cpus",
        "max_step_fraction",
        "plan_objective",
        "rescore_every",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.budgets is not None:
        changes["budgets_mb"] = tuple(parse_budgets(args.budgets, field="--budgets"))
    if args.budget_fractions is not None:
        changes["budget_fractions"] = tuple(parse_budgets(args.budget_fractions, field="--budget-fractions"))
    if args.local_steps is not None and args.steps is None:
        changes["eval_every"] = args.local_steps
    if "local_steps" in changes and setup.eval_every % changes["local_steps"]:
        changes["eval_every"] = changes["local_steps"]
    setup = replace(setup, **changes)
    setup.check()
    return setup


def _cli_main(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    # The command as typed, for the report: `dsparse compare …` or `python -m experiments.compare …`.
    words = args.argv if args.argv is not None else sys.argv[1:]
    command = f"{args.prog_prefix} " + " ".join(shlex.quote(a) for a in words)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = {"weights": args.weights, "command": command, "methods": methods, "quick": args.quick}
    run_compare(args.out, setup, plots=not args.no_plots, **options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--add-caps"] and len(argv) == 2:  # the caps stage alone, for a finished run's folder
        add_caps(Path(argv[1]))
        return 0
    parser = _configure(
        argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[1])
    )
    args = parser.parse_args(argv)
    args.argv, args.prog_prefix = argv, "python -m experiments.compare"
    try:
        return args.func(args)
    except ValueError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
