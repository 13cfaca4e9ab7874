"""Aggregation time per step: DDP-style full-model all-reduce against the DSparse groups.

Seven gloo ranks on 127.0.0.1 hold MobileNetV2's real tensors (gradients filled with seeded
noise) and time four aggregation variants per step:

(a) DDP-style: all-reduce every full-model gradient across all ranks, one collective per tensor;
(b) the same, fused into one flat buffer;
(c) the DSparse plan's groups, one collective per tensor (all-reduce among members, then
    broadcast from the root to the non-members);
(d) the DSparse groups, fused: one buffer per group per collective.

(c) and (d) call the transport's own functions (:mod:`flwr_dsparse.collective`). A step's time is
the slowest rank's (the step is done when the last rank is); the figure is the median over steps.

Loopback alone favours the wrong design (latency dominates, bandwidth is free), so every variant
also runs over an emulated shared edge link: all ranks inside a private network namespace whose
``lo`` has MTU 1500 and a token-bucket rate limit (``tc … tbf rate R``). The namespace's
loopback carries everything, so the rate is shared by all seven ranks, like one edge LAN. Only
bandwidth is emulated, not latency (``netem`` is not in this kernel).

Usage::

    python -m experiments.aggregation_bench [--quick] [--json PATH] [--rate MBIT ...]

Needs root and iproute2 (``ip``, ``tc``) for the emulated link; without root it measures
loopback only and says so. On Debian/Ubuntu: ``apt-get install -y iproute2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from experiments.output import write_json
from flwr_dsparse.collective import (
    GroupComm,
    allreduce_mean,
    averaged_tensors,
    broadcast_from_root,
    build_group_comms,
    launch_local,
    synced_tensors,
)
from flwr_dsparse.models import build_model
from flwr_dsparse.plan import Plan, plan_from_selections
from flwr_dsparse.units import model_units

WORLD_SIZE = 7
MODEL = "mobilenet_v2"
INPUT_SHAPE = (3, 32, 32)
BATCH_SIZE = 128
PAPER_BUDGETS_MB = (80, 110, 140, 170, 200, 240, 280)
PAPER_REDUCTION_PCT = 75.4  # the paper: DSparse cuts aggregation time by 75.4%
DEFAULT_RATES_MBIT = (100, 1000)
VARIANTS = {
    "a_ddp_per_tensor": "(a) DDP-style, full model, per tensor",
    "b_ddp_fused": "(b) DDP-style, full model, one fused buffer",
    "c_dsparse_per_tensor": "(c) DSparse groups, per tensor",
    "d_dsparse_fused": "(d) DSparse groups, fused per group",
}
# Stand-in until flwr_dsparse.planner lands: the shape a memory-fitted planner gives for the
# paper's budgets — a larger budget affords an earlier first trained unit (activation memory
# is decided by it), so selections are nested suffixes of MobileNetV2's 20 units.
PAPER_LIKE_SELECTIONS: dict[int, list[str]] = {
    device: [f"features.{i}" for i in range(first, 19)] + ["classifier"]
    for device, first in enumerate((17, 15, 13, 11, 9, 6, 3))
}
CPU_BOUND_UTILISATION = 0.7  # below this share of the emulated rate, the link was not the bottleneck


# --------------------------------------------------------------------------- the plan


PLAN_CACHE = Path(__file__).resolve().parent.parent / "outputs" / "plans"
# The plan depends on these sources only; a change in any of them invalidates the cached plan.
_PLANNER_SOURCES = ("planner.py", "costs.py", "scoring.py", "plan.py", "units.py", "models.py", "trainer.py", "cli.py")


def paper_like_plan(plan_path: Path | None = None) -> tuple[Plan, str]:
    """The plan for the paper-like budgets, and where it came from.

    ``plan_path`` wins. Otherwise the planner builds it exactly as ``dsparse plan --model
    mobilenet_v2 --input 3x32x32 --batch-size 128 --budgets 80,…,280`` does; profiling takes minutes
    on a busy 2-core machine, so the result is cached under ``outputs/plans/``, keyed by the
    planner's sources. Without the planner the stand-in table is used, and the source says so.
    """
    if plan_path is not None:
        return Plan.from_json(plan_path.read_text()), f"plan file {plan_path}"
    try:
        from flwr_dsparse.cli import build_cli_plan
    except ImportError:
        model = build_model(MODEL)
        sizes = {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}
        plan = plan_from_selections(
            model_units(model),
            PAPER_LIKE_SELECTIONS,
            sizes,
            budgets_mb=dict(enumerate(map(float, PAPER_BUDGETS_MB))),
            batch_sizes=dict.fromkeys(range(WORLD_SIZE), BATCH_SIZE),
            meta={"model": MODEL, "source": "PAPER_LIKE_SELECTIONS (planner not available)"},
        )
        return plan, "hand-made paper-like selection table PAPER_LIKE_SELECTIONS (flwr_dsparse.planner not available)"
    import flwr_dsparse

    package = Path(flwr_dsparse.__file__).parent
    key = hashlib.sha256(repr((MODEL, INPUT_SHAPE, BATCH_SIZE, PAPER_BUDGETS_MB, "gradient")).encode())
    for name in _PLANNER_SOURCES:
        source = package / name
        key.update(source.read_bytes() if source.exists() else b"")
    cached = PLAN_CACHE / f"paper_budgets_{key.hexdigest()[:16]}.json"
    described = (
        f"flwr_dsparse planner (as `dsparse plan --model {MODEL} --input 3x32x32 --batch-size {BATCH_SIZE} "
        f"--budgets {','.join(map(str, PAPER_BUDGETS_MB))}`, scorer gradient)"
    )
    if cached.exists():
        return Plan.from_json(cached.read_text()), f"{described}, cached in {cached}"
    start = time.monotonic()
    print(f"building the plan with the planner (profiles {MODEL}; minutes on a busy machine) …", flush=True)
    plan = build_cli_plan(
        model_name=MODEL,
        input_shape=INPUT_SHAPE,
        batch_size=BATCH_SIZE,
        budgets=[float(b) for b in PAPER_BUDGETS_MB],
        scorer="gradient",
        progress=False,
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(plan.to_json())
    return plan, f"{described}, built in {time.monotonic() - start:.0f} s and cached in {cached}"


# --------------------------------------------------------------------------- one rank


def _ddp_per_tensor(grads: list[torch.Tensor], world: int) -> int:
    for grad in grads:
        dist.all_reduce(grad)
        grad.div_(world)
    return sum(g.numel() * g.element_size() for g in grads)


def _ddp_fused(grads: list[torch.Tensor], world: int) -> int:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return flat.numel() * flat.element_size()


def _dsparse(comms: Sequence[GroupComm], model: torch.nn.Module, fused: bool) -> int:
    # The transport's own step, minus training: members average, roots broadcast, in plan order.
    moved = 0
    for comm in comms:
        if comm.is_member:
            moved += allreduce_mean(comm, averaged_tensors(comm.group, model), fused=fused)
    for comm in comms:
        moved += broadcast_from_root(comm, synced_tensors(comm.group, model), fused=fused)
    return moved


def _lo_tx_bytes() -> int:
    # /proc/self/net/dev shows this process's network namespace (sysfs would show the host's).
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    return 0


def _set_rate(rate_mbit: int | None) -> None:
    if rate_mbit is None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)
        return
    subprocess.run(
        [
            "tc",
            "qdisc",
            "replace",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            f"{rate_mbit}mbit",
            "burst",
            "256kb",
            "latency",
            "200ms",
        ],
        check=True,
        capture_output=True,
    )


def bench_rank(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    plan_json: str,
    phases: list[dict[str, Any]],
    timeout_s: float,
) -> dict[str, Any] | None:
    """Time every variant in every phase; rank 0 switches the link rate between phases."""
    from datetime import timedelta

    plan = Plan.from_json(plan_json)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        comms = build_group_comms(plan, rank, timeout_s=timeout_s)
        model = build_model(MODEL, seed=0)
        generator = torch.Generator().manual_seed(rank)
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        grads = [param.grad for param in model.parameters()]
        variants: dict[str, Callable[[], int]] = {
            "a_ddp_per_tensor": lambda: _ddp_per_tensor(grads, world_size),
            "b_ddp_fused": lambda: _ddp_fused(grads, world_size),
            "c_dsparse_per_tensor": lambda: _dsparse(comms, model, fused=False),
            "d_dsparse_fused": lambda: _dsparse(comms, model, fused=True),
        }
        results: dict[str, Any] = {}
        for phase in phases:
            if rank == 0 and phase.get("emulated"):
                _set_rate(phase["rate_mbit"])
            dist.barrier()
            phase_result = {}
            for key, run in variants.items():
                phase_result[key] = _timed_exchange(
                    run, world_size, steps=phase["steps"], warmup=phase["warmup"], wire=bool(phase.get("emulated"))
                )
            results[phase["name"]] = phase_result
        return results if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _timed_exchange(
    exchange: Callable[[], int], world_size: int, *, steps: int, warmup: int, wire: bool
) -> dict[str, Any]:
    """Run ``exchange`` (every rank at once) ``warmup + steps`` times; time the last ``steps``.

    Each step starts at a barrier and ends with its slowest rank (the all-reduced MAX);
    ``wire`` also counts the bytes ``lo`` sent meanwhile (the emulated link's only traffic).
    """
    times, payload = [], 0
    tx_before = _lo_tx_bytes()
    for step in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        payload = exchange()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step == warmup - 1:
            tx_before = _lo_tx_bytes()
        if step >= warmup:
            times.append(float(elapsed))
    sent = _lo_tx_bytes() - tx_before if wire else None
    payloads = [None] * world_size
    dist.all_gather_object(payloads, payload)
    return {
        "step_s": times,
        "median_s": statistics.median(times),
        "payload_bytes_per_rank": payloads,
        "wire_bytes_per_step": None if sent is None else sent / steps,
    }


def run_phases(plan: Plan, phases: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    outcomes = launch_local(
        bench_rank, WORLD_SIZE, (plan.to_json(), phases, timeout_s), start_method="fork", deadline_s=1800.0
    )
    failed = [f"rank {o.rank}: {(o.error or '').splitlines()[0]}" for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("benchmark ranks failed: " + "; ".join(failed))
    return outcomes[0].result


# --------------------------------------------------------------------------- the emulated link


class NamespaceUnavailable(RuntimeError):
    """This machine refuses to create a network namespace (e.g. a container without CAP_SYS_ADMIN)."""


class Namespace:
    """A private network namespace with ``lo`` up at MTU 1500, deleted on exit (also on failure)."""

    def __init__(self) -> None:
        self.name = f"dsparse-bench-{os.getpid()}"

    def __enter__(self) -> Namespace:
        try:
            subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as error:
            raise NamespaceUnavailable(f"`ip netns add` failed ({error.stderr.strip()})") from error
        try:
            subprocess.run(
                ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up", "mtu", "1500"],
                check=True,
                capture_output=True,
                text=True,
            )
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


def link_unavailable() -> str | None:
    """Why no emulated link can run on this machine (None: it can)."""
    if os.geteuid() != 0:
        return "not root: network namespaces and tc need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not found: the emulated edge link needs iproute2 (`apt-get install -y iproute2`)"
        )
    return None


def emulation_unavailable() -> str | None:
    """Why the emulated link cannot run here (None: it can); raises when only the tools are missing."""
    if os.geteuid() != 0:
        return "not root: network namespaces and tc need root, so only plain loopback was measured"
    reason = link_unavailable()
    if reason:
        raise SystemExit(f"{reason}; or pass --loopback-only to measure plain loopback")
    return None


def run_in_namespace(module_args: Sequence[str]) -> None:
    """``python -m experiments.aggregation_bench <module_args>`` in a fresh private network namespace.

    Everything the child and its ranks send goes over the namespace's own ``lo`` (MTU 1500),
    whose rate the ranks set with ``tc``; the namespace is deleted afterwards, also on failure.
    Raises :class:`NamespaceUnavailable` where the machine refuses a namespace.
    """
    reason = link_unavailable()
    if reason:
        raise NamespaceUnavailable(reason)
    with Namespace() as namespace:
        command = [
            "ip",
            "netns",
            "exec",
            namespace.name,
            sys.executable,
            "-m",
            "experiments.aggregation_bench",
            *module_args,
        ]
        # The namespace has no resolver, and c10d warns for every rank that it cannot name its peer.
        env = {**os.environ, "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent, env=env)


# --------------------------------------------------------------------------- any plan's exchange over the link


def exchange_rank(rank: int, world_size: int, master_addr: str, master_port: int, spec: dict[str, Any]) -> dict | None:
    """Time every named plan's fused per-step exchange at every rate; rank 0 sets the rate."""
    from datetime import timedelta

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=spec["timeout_s"]),
    )
    try:
        model = build_model(spec["model"], seed=0)
        generator = torch.Generator().manual_seed(rank)
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        exchanges = {
            name: build_group_comms(Plan.from_json(plan), rank, timeout_s=spec["timeout_s"])
            for name, plan in spec["plans"].items()
        }
        results: dict[str, Any] = {}
        for rate in spec["rates_mbit"]:
            if rank == 0:
                _set_rate(rate)
            dist.barrier()
            phase: dict[str, Any] = {}
            for name, comms in exchanges.items():
                exchange = partial(_dsparse, comms, model, fused=True)
                phase[name] = _timed_exchange(exchange, world_size, steps=spec["steps"], warmup=0, wire=True)
            results[str(rate)] = phase
        return results if rank == 0 else None
    finally:
        dist.destroy_process_group()


def time_exchanges_on_link(
    model: str, plans: dict[str, Plan], rates_mbit: Sequence[int], *, steps: int = 1, timeout_s: float = 600.0
) -> dict[str, dict[str, Any]]:
    """Each plan's per-step exchange (its groups, fused: all-reduce among members, broadcast to the
    rest), timed over the emulated shared edge link at each rate.

    One rank per device of the plans (they must have the same devices) runs in a private
    network namespace whose ``lo`` is shaped with ``tc tbf``; a plan where every device trains
    everything is full-model averaging (one all-reduce of the whole model). Returns
    ``{str(rate): {name: {"median_s", "step_s", "payload_bytes_per_rank", "wire_bytes_per_step"}}}``.
    Raises :class:`NamespaceUnavailable` where the machine allows no namespace.
    """
    sizes = {len(plan.devices) for plan in plans.values()}
    if len(sizes) != 1:
        raise ValueError(f"the plans have {sorted(sizes)} devices; time plans of one cluster together")
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(
            json.dumps(
                {
                    "model": model,
                    "plans": {name: plan.to_json() for name, plan in plans.items()},
                    "rates_mbit": list(rates_mbit),
                    "steps": steps,
                    "timeout_s": timeout_s,
                    "world_size": sizes.pop(),
                }
            )
        )
        run_in_namespace(["--inner-exchange", str(spec), "--json", str(out)])
        return json.loads(out.read_text())


def rate_phases(rates: Sequence[int], *, quick: bool) -> list[dict[str, Any]]:
    """One phase per emulated rate, with as many steps as the time budget affords.

    Below 1 Gbit/s the link dominates every step (seconds each), so no warm-up step is spent
    there; at 20 Mbit/s one step of the four variants already takes about two and a half minutes.
    """

    def warmup(rate: int) -> int:
        return 0 if quick or rate < 1000 else 1

    def steps(rate: int) -> int:
        return 2 if quick else (3 if rate >= 100 else 1)

    return [
        {"name": f"{rate}mbit", "rate_mbit": rate, "emulated": True, "warmup": warmup(rate), "steps": steps(rate)}
        for rate in rates
    ]


def run_emulated(plan: Plan, phases: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    """Run the rate phases in a fresh namespace, through a child process started inside it."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "out.json"
        spec.write_text(json.dumps({"plan": plan.to_json(), "phases": phases, "timeout_s": timeout_s}))
        run_in_namespace(["--inner", str(spec), "--json", str(out)])
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- report


def summarise(raw: dict[str, Any], rates: dict[str, int | None]) -> dict[str, Any]:
    summary = {}
    for phase, variants in raw.items():
        median = {key: variants[key]["median_s"] for key in VARIANTS}
        payload = {key: max(variants[key]["payload_bytes_per_rank"]) for key in VARIANTS}
        mean_payload = {key: sum(variants[key]["payload_bytes_per_rank"]) / WORLD_SIZE for key in VARIANTS}
        wire = {key: variants[key]["wire_bytes_per_step"] for key in VARIANTS}
        rate = rates.get(phase)
        utilisation = {}
        if rate is not None:
            for key in VARIANTS:
                if wire[key]:
                    utilisation[key] = wire[key] * 8 / median[key] / (rate * 1e6)
        cpu_bound = {key: (rate is None) or utilisation.get(key, 0.0) < CPU_BOUND_UTILISATION for key in VARIANTS}
        ratios = {
            "c_over_a": median["c_dsparse_per_tensor"] / median["a_ddp_per_tensor"],
            "d_over_a": median["d_dsparse_fused"] / median["a_ddp_per_tensor"],
            "d_over_b": median["d_dsparse_fused"] / median["b_ddp_fused"],
        }
        summary[phase] = {
            "rate_mbit": rate,
            "median_ms": {key: value * 1e3 for key, value in median.items()},
            "ratios": ratios,
            "reduction_pct_d_vs_a": 100 * (1 - ratios["d_over_a"]),
            "reduction_pct_d_vs_b": 100 * (1 - ratios["d_over_b"]),
            "payload_mb_per_rank_max": {key: value / 2**20 for key, value in payload.items()},
            "payload_mb_per_rank_mean": {key: value / 2**20 for key, value in mean_payload.items()},
            "wire_mb_per_rank_per_step": {
                key: (None if value is None else value / WORLD_SIZE / 2**20) for key, value in wire.items()
            },
            "link_utilisation": utilisation,
            "cpu_bound": cpu_bound,
            "steps": len(variants["a_ddp_per_tensor"]["step_s"]),
        }
    return summary


def print_report(summary: dict[str, Any], plan_source: str, notes: list[str]) -> None:
    print(f"\nplan: {plan_source}")
    for note in notes:
        print(f"note: {note}")
    for phase, result in summary.items():
        link = (
            "plain loopback (MTU 65536, no rate limit)"
            if result["rate_mbit"] is None
            else (f"emulated shared edge link: tbf {result['rate_mbit']} Mbit/s, MTU 1500, no latency emulation")
        )
        print(f"\n== {phase}: {link}; median of {result['steps']} steps, {WORLD_SIZE} ranks")
        print(f"{'variant':48s} {'ms/step':>10s} {'buffer MB/rank':>16s} {'wire MB/rank':>13s} {'link use':>9s}  bound")
        for key, label in VARIANTS.items():
            wire = result["wire_mb_per_rank_per_step"][key]
            use = result["link_utilisation"].get(key)
            print(
                f"{label:48s} {result['median_ms'][key]:10.1f} {result['payload_mb_per_rank_mean'][key]:16.2f} "
                f"{'-' if wire is None else f'{wire:.2f}':>13s} {'-' if use is None else f'{use:.0%}':>9s}  "
                f"{'CPU' if result['cpu_bound'][key] else 'link'}"
            )
        ratios = result["ratios"]
        print(
            f"ratios: (c)/(a) {ratios['c_over_a']:.3f}   (d)/(a) {ratios['d_over_a']:.3f}   "
            f"(d)/(b) {ratios['d_over_b']:.3f}"
            f"   -> (d) vs (a): {_less(result['reduction_pct_d_vs_a'])}, (d) vs (b): "
            f"{_less(result['reduction_pct_d_vs_b'])}   (paper: {PAPER_REDUCTION_PCT}% less)"
        )


def _less(reduction_pct: float) -> str:
    return f"{abs(reduction_pct):.1f}% {'less' if reduction_pct >= 0 else 'more'} time"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.aggregation_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and only the 1000 Mbit link (about 1 minute)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--rate",
        type=int,
        nargs="+",
        metavar="MBIT",
        help=f"emulated link rates in Mbit/s (default {' '.join(map(str, DEFAULT_RATES_MBIT))}; "
        "20 adds about 3 minutes)",
    )
    parser.add_argument(
        "--plan",
        type=Path,
        help="plan JSON to use (default: the planner's plan for the paper-like budgets, cached)",
    )
    parser.add_argument("--loopback-only", action="store_true", help="skip the emulated link")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-collective timeout in seconds")
    parser.add_argument("--inner", type=Path, help=argparse.SUPPRESS)  # runs inside the namespace
    parser.add_argument("--inner-exchange", type=Path, help=argparse.SUPPRESS)  # time_exchanges_on_link
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.inner_exchange is not None:
        spec = json.loads(args.inner_exchange.read_text())
        outcomes = launch_local(exchange_rank, spec["world_size"], (spec,), start_method="fork", deadline_s=3600.0)
        failed = [f"rank {o.rank}: {(o.error or '').splitlines()[0]}" for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError("exchange ranks failed: " + "; ".join(failed))
        args.json.write_text(json.dumps(outcomes[0].result))
        return 0
    if args.inner is not None:
        spec = json.loads(args.inner.read_text())
        raw = run_phases(Plan.from_json(spec["plan"]), spec["phases"], spec["timeout_s"])
        args.json.write_text(json.dumps(raw))
        return 0

    bad = [rate for rate in args.rate or () if rate <= 0]
    if bad:
        parser.error(f"--rate must be positive Mbit/s values, got {bad}")
    rates = list(args.rate or ((1000,) if args.quick else DEFAULT_RATES_MBIT))
    # SIGTERM (a CI timeout) must still run the finally blocks that delete the namespace.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    plan, plan_source = paper_like_plan(args.plan)
    if len(plan.devices) != WORLD_SIZE:
        parser.error(f"the plan has {len(plan.devices)} devices; this benchmark runs {WORLD_SIZE} ranks")
    started = time.monotonic()  # the benchmark's own time, without building the plan
    notes = [
        f"{WORLD_SIZE} ranks share {os.cpu_count()} CPU cores: figures marked CPU are bound by "
        "scheduling and copying, not by the link (loopback always; a rate phase when the link is <"
        f"{CPU_BOUND_UTILISATION:.0%} used)",
        "buffer MB/rank: bytes each rank hands to collectives per step (mean over ranks); wire MB/rank: "
        "bytes counted on the namespace's lo per step, divided by the ranks (TCP payload and headers)",
        "(a)/(b) move gradients only (DDP's per-forward buffer broadcast is not counted, which favours them); "
        "(c)/(d) also average and broadcast BatchNorm statistics, as the transport does",
    ]
    loop_steps = 2 if args.quick else 3
    raw = run_phases(plan, [{"name": "loopback", "rate_mbit": None, "warmup": 1, "steps": loop_steps}], args.timeout)
    phase_rates: dict[str, int | None] = {"loopback": None}
    emulated = "skipped (--loopback-only)"
    if not args.loopback_only:
        reason = emulation_unavailable()
        if reason:
            notes.append(reason)
            emulated = reason
        else:
            try:
                raw.update(run_emulated(plan, rate_phases(rates, quick=args.quick), args.timeout))
                phase_rates.update({f"{rate}mbit": rate for rate in rates})
                emulated = "private network namespace, lo MTU 1500, tc tbf burst 256kb latency 200ms (bandwidth only)"
            except NamespaceUnavailable as error:
                emulated = f"{error}: only plain loopback was measured"
                notes.append(emulated)
    summary = summarise(raw, phase_rates)
    print_report(summary, plan_source, notes)
    elapsed = time.monotonic() - started
    print(f"\ntotal {elapsed:.0f} s")
    if args.json:
        document = {
            "world_size": WORLD_SIZE,
            "model": MODEL,
            "plan_source": plan_source,
            "plan_digest": plan.digest(),
            "groups": [
                {"members": list(g.members), "units": list(g.units), "bytes": g.allreduce.bytes} for g in plan.groups
            ],
            "plan": plan.to_dict(),
            "emulated_link": emulated,
            "latency_emulated": False,
            "cpu_cores": os.cpu_count(),
            "paper_reduction_pct": PAPER_REDUCTION_PCT,
            "notes": notes,
            "phases": summary,
            "raw": raw,
            "seconds": elapsed,
            "quick": args.quick,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
