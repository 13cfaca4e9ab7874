"""REPORT.md and results.csv of a comparison run, rendered from its ``results.json`` alone.

No figure is typed in: every number in the report is looked up in the results
(the paper's figures included, under ``results["paper"]``), so
``render_report(json.load(open("results.json")))`` reproduces ``REPORT.md``
exactly (a test checks it).

    python -m experiments.report DIR     # re-render DIR/REPORT.md and DIR/results.csv
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr_dsparse.units import compress_unit_names

__all__ = ["CSV_COLUMNS", "DEVICE_COLUMNS", "render_report", "write_csv"]

#: What each device row of every method carries into the CSV.
DEVICE_COLUMNS = (
    "budget_mb",
    "num_units",
    "predicted_mb",
    "measured_mb",
    "step_s",
    "isolated_step_s",
    "bytes_up_per_step",
    "bytes_down_per_step",
)
CSV_COLUMNS = [
    "method",
    "device",
    "path",
    *DEVICE_COLUMNS,
    "cluster_step_s",
    "aggregation_s_per_step",
    "final_accuracy",
    "measured_saving_pct",
]
KIB = 1024


def write_csv(results: Mapping[str, Any], path: Path) -> None:
    """One row per method and device, then one ``cluster`` row per method with the method's figures."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for name, method in results["methods"].items():
            for device in method["devices"]:
                writer.writerow(
                    {
                        "method": name,
                        "device": device["device"],
                        "path": method["path"],
                        **{key: device[key] for key in DEVICE_COLUMNS},
                    }
                )
            summary = results["summary"][name]
            writer.writerow(
                {
                    "method": name,
                    "device": "cluster",
                    "path": method["path"],
                    "predicted_mb": summary["mean_predicted_mb"],
                    "measured_mb": summary["mean_measured_mb"],
                    "step_s": method["mean_device_step_s"],
                    "bytes_up_per_step": method["bytes_up_per_step"],
                    "isolated_step_s": max(d["isolated_step_s"] for d in method["devices"]),
                    "bytes_down_per_step": method["bytes_down_per_step"],
                    "cluster_step_s": method["cluster_step_s"],
                    "aggregation_s_per_step": method["aggregation_s_per_step"],
                    "final_accuracy": method["final_accuracy"],
                    "measured_saving_pct": summary["measured_saving_pct"],
                }
            )


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def _x(value: float) -> str:
    return f"{value:.3f}×"


#: The goals this comparison is held to (the paper's figures, rounded): ratio against the full update.
GOALS = {"memory_saving_pct": 60.0, "batch_ratio": 0.25, "aggregation_ratio": 0.25, "accuracy_points": 1.0}


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def _goals(results: Mapping[str, Any]) -> list[str]:
    """The headline: the paper's ratios, the goals, and ours, one row per claim."""
    paper, ratios, summary = results["paper"], results["summary"]["paper_ratios"], results["summary"]
    s_ds, link = summary["dsparse"], results.get("link") or {}
    rates = link.get("rates_mbit") or []
    lines = [
        "| claim | paper | goal | this run | met |",
        "|---|---|---|---|---|",
        f"| memory per device (mean), DSparse vs full update | {_pct(-paper['memory_saving_pct'])} "
        f"| ≤ {_pct(-GOALS['memory_saving_pct'])} | {_pct(-s_ds['measured_saving_pct'])} measured "
        f"({_pct(-s_ds['predicted_saving_pct'])} predicted) | {_met(s_ds['measured_saving_pct'] >= GOALS['memory_saving_pct'])} |",
        f"| batch time: the cluster's step (slowest device, each selection timed alone) | {_x(ratios['batch'])} "
        f"| ≤ {_x(GOALS['batch_ratio'])} | {_x(s_ds['isolated_cluster_step_ratio'])} "
        f"| {_met(s_ds['isolated_cluster_step_ratio'] <= GOALS['batch_ratio'])} |",
    ]
    if s_ds.get("link_aggregation_ratio") is not None:
        others = "; ".join(
            f"{_x(s_ds[f'link_aggregation_ratio_{r}mbit'])} at {r} Mbit/s"
            for r in rates[1:]
            if s_ds.get(f"link_aggregation_ratio_{r}mbit") is not None
        )
        lines.append(
            f"| aggregation per step over the edge link ({rates[0]} Mbit/s), DSparse's fused groups vs the full model "
            f"| {_x(ratios['aggregation'])} | ≤ {_x(GOALS['aggregation_ratio'])} | {_x(s_ds['link_aggregation_ratio'])}"
            f"{'; ' + others if others else ''} | {_met(s_ds['link_aggregation_ratio'] <= GOALS['aggregation_ratio'])} |"
        )
    else:
        lines.append(
            f"| aggregation per step over the edge link | {_x(ratios['aggregation'])} "
            f"| ≤ {_x(GOALS['aggregation_ratio'])} | not timed: {link.get('reason', 'no link timing')} | – |"
        )
    acc = 100 * s_ds["accuracy_delta"]
    lines.append(
        f"| final held-out accuracy, DSparse vs full update ({results['setup']['steps']} steps) | {paper['accuracy']} "
        f"| within {GOALS['accuracy_points']:g} point | {acc:+.1f} points | {_met(acc >= -GOALS['accuracy_points'])} |"
    )
    caps = results.get("caps") or {}
    if caps.get("enabled"):
        capped = summary.get("fedavg_capped") or {}
        lines.append(
            f"| under hard memory caps (each device's budget): devices killed | the full update does not fit "
            f"| DSparse 0; full update killed | DSparse {s_ds.get('oom_killed', 0)} of {len(results['methods']['dsparse']['devices'])}; "
            f"full-update FedAvg {capped.get('oom_killed', '–')} of {capped.get('devices', '–')} "
            f"| {_met(s_ds.get('oom_killed', 0) == 0 and capped.get('oom_killed', 0) > 0)} |"
        )
    else:
        lines.append(f"| under hard memory caps | – | – | not enforced: {caps.get('reason', 'no caps')} | – |")
    return lines


def _collective_rows(results: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Method 5's batch-time row and aggregation row, against the full model over the same transport."""
    paper, ratios = results["paper"], results["summary"]["paper_ratios"]
    collective, s_col = results["methods"]["collective"], results["summary"]["collective"]
    base = collective["full_update_same_transport"]
    batch = (
        f"| batch time with fusion (collective transport) | {paper['batch_fused_s']:g} s "
        f"| {_x(ratios['batch_fused'])} of full | {collective['cluster_step_s']:.3f} s; full model over the same "
        f"transport {base['cluster_step_s']:.3f} s | {_x(s_col['same_transport_cluster_step_ratio'])} of full "
        f"(same transport); {_x(s_col['cluster_step_ratio'])} of method 1 |"
    )
    aggregation = (
        f"| aggregation time per step, full → DSparse (collective, fused) | – | {_pct(-paper['aggregation_reduction_pct'])} "
        f"| {base['aggregation_s_per_step'] * 1e3:.1f} → {collective['aggregation_s_per_step'] * 1e3:.1f} ms "
        f"| {_pct(100 * (s_col['same_transport_aggregation_ratio'] - 1))} |"
    )
    return [batch], [aggregation]


def _headline(results: Mapping[str, Any]) -> list[str]:
    paper, ratios = results["paper"], results["summary"]["paper_ratios"]
    summary, methods = results["summary"], results["methods"]
    full, dsparse = methods["fedavg"], methods["dsparse"]
    s_full, s_ds = summary["fedavg"], summary["dsparse"]
    lines = [
        "| figure | paper | paper ratio | this run | our ratio |",
        "|---|---|---|---|---|",
        f"| memory per device (mean), full update → DSparse | {paper['memory_full_mb']:g} → {paper['memory_dsparse_mb']:g} MB "
        f"| {_pct(-paper['memory_saving_pct'])} | predicted {s_full['mean_predicted_mb']:.1f} → {s_ds['mean_predicted_mb']:.1f} MB; "
        f"measured {s_full['mean_measured_mb']:.1f} → {s_ds['mean_measured_mb']:.1f} MB "
        f"| {_pct(-s_ds['predicted_saving_pct'])} predicted, {_pct(-s_ds['measured_saving_pct'])} measured |",
        f"| batch time (cluster step: slowest device), full → DSparse | {paper['batch_full_s']:g} → {paper['batch_dsparse_s']:g} s "
        f"| {_x(ratios['batch'])} | each selection timed alone: {full['isolated_cluster_step_s']:.3f} → "
        f"{dsparse['isolated_cluster_step_s']:.3f} s; in the simulation: {full['cluster_step_s']:.3f} → "
        f"{dsparse['cluster_step_s']:.3f} s | {_x(s_ds['isolated_cluster_step_ratio'])} alone; "
        f"{_x(s_ds['cluster_step_ratio'])} in the simulation |",
    ]
    fused_batch, fused_aggregation = _collective_rows(results) if "collective" in methods else ([], [])
    lines += [
        *fused_batch,
        f"| aggregation time per step, full → DSparse (server) | – | {_pct(-paper['aggregation_reduction_pct'])} "
        f"| {full['aggregation_s_per_step'] * 1e3:.1f} → {dsparse['aggregation_s_per_step'] * 1e3:.1f} ms "
        f"| {_pct(100 * (s_ds['aggregation_ratio'] - 1))} |",
        *fused_aggregation,
    ]
    link = results.get("link") or {}
    if link.get("available"):
        for rate in link["rates_mbit"]:
            s_key = "link_aggregation_ratio" if rate == link["rates_mbit"][0] else f"link_aggregation_ratio_{rate}mbit"
            lines.append(
                f"| aggregation time per step over the emulated edge link ({rate} Mbit/s), full → DSparse (fused groups) "
                f"| – | {_pct(-paper['aggregation_reduction_pct'])} "
                f"| {summary['fedavg']['link_aggregation_s_per_step'][str(rate)]:.2f} → "
                f"{s_ds['link_aggregation_s_per_step'][str(rate)]:.2f} s | {_pct(100 * (s_ds[s_key] - 1))} |"
            )
    lines.append(
        f"| final held-out accuracy, full → DSparse | {paper['accuracy']} | – "
        f"| {full['final_accuracy']:.3f} → {dsparse['final_accuracy']:.3f} | {100 * s_ds['accuracy_delta']:+.1f} points |"
    )
    return lines


def _budget_lines(results: Mapping[str, Any]) -> list[str]:
    setup, facts = results["setup"], results["summary"]["facts"]
    budgets = results.get("budgets")
    mb = ", ".join(f"{b:g}" for b in setup["budgets_mb"])
    if not budgets:
        return [
            f"- {len(setup['budgets_mb'])} devices with budgets {mb} MB (the largest {facts['budget_spread']:.1f}× "
            "the smallest)."
        ]
    shares = ", ".join(f"{f:.2f}" for f in budgets["fractions_of_full"])
    return [
        f"- {len(budgets['mb'])} devices. Budgets ({budgets['source']}): {mb} MB, that is {shares} of the full update's "
        f"predicted need of {budgets['full_predicted_mb']:.1f} MB (mean {100 * budgets['mean_fraction_of_full']:.0f}%; "
        f"the paper's {100 * results['summary']['paper_ratios']['memory']:.0f}%); "
        f"{'every one below it' if budgets['all_below_full'] else 'not all below it'}; the largest "
        f"{facts['budget_spread']:.1f}× the smallest."
    ]


#: Evaluations at the end of a run whose mean gap the report states beside the final one's.
_TAIL = 5


def _tail_gap(method: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """Points between two methods' mean accuracies over their last :data:`_TAIL` evaluations (equal steps)."""
    ours, theirs = method["curve"][-_TAIL:], reference["curve"][-_TAIL:]
    return 100 * (sum(p["accuracy"] for p in ours) - sum(p["accuracy"] for p in theirs)) / max(len(ours), 1)


def _objective_note(results: Mapping[str, Any]) -> str:
    if results["setup"].get("plan_objective") != "balanced":
        note = " (memory only: every device trains its most critical selection that fits)"
    else:
        note = (
            " (the planner also chooses the cluster's step cap: the knee of criticality against the slowest predicted "
            "step (of caps within KNEE_TOLERANCE of it, the fastest), then every device trains its most critical "
            "selection within its memory and that step)"
        )
    every = results["setup"].get("rescore_every", 0)
    if every:
        replans = (results["methods"].get("dsparse") or {}).get("replans", [])
        changed = sum(len(replan["changed"]) for replan in replans)
        note += (
            f"; re-scored every {every} rounds on the trained global model and re-planned ({len(replans)} re-plans, "
            f"{changed} device selections changed; the per-device figures below are the first plan's)"
        )
    return note


def _link_and_caps_lines(results: Mapping[str, Any]) -> list[str]:
    link, caps = results.get("link") or {}, results.get("caps") or {}
    lines = []
    if link.get("available"):
        lines.append(
            f"- Edge link: each method's per-step exchange timed over an emulated shared link at "
            f"{', '.join(f'{r} Mbit/s' for r in link['rates_mbit'])} ({link['emulation']})."
        )
    elif link:
        lines.append(f"- Edge link: not timed ({link.get('reason')}).")
    if caps.get("enabled"):
        lines.append(f"- Hard memory caps: {caps.get('description', '')}")
    elif caps:
        lines.append(f"- Hard memory caps: none ({caps.get('reason')}).")
    return lines


def _caps_table(results: Mapping[str, Any]) -> list[str]:
    caps = results.get("caps") or {}
    if not caps.get("enabled"):
        return []
    labels = {"fedavg_capped": "full-update FedAvg under the caps", "uniform": "uniform sparse", "dsparse": "DSparse"}
    lines = [
        "## Under hard memory caps",
        "",
        f"{caps['description']}. The uncapped FedAvg run above stays the reference for memory and accuracy; this is "
        "what a user of these devices would face.",
        "",
        "| method | " + " | ".join(f"device {d['device']}" for d in caps["devices"]["fedavg_capped"]) + " | killed |",
        "|---|" + "---|" * (len(caps["devices"]["fedavg_capped"]) + 1),
    ]
    for name, rows in caps["devices"].items():
        cells = [
            f"{r['num_units']} unit{'s' if r['num_units'] != 1 else ''}, cap {r['cap_mb']:.1f} MB: "
            f"{'**killed**' if r['killed'] else 'fits'}"
            for r in rows
        ]
        lines.append(
            f"| {labels.get(name, name)} | "
            + " | ".join(cells)
            + f" | {sum(r['killed'] for r in rows)} of {len(rows)} |"
        )
    return [*lines, ""]


def _methods_table(results: Mapping[str, Any]) -> list[str]:
    lines = [
        "| method | path | mean predicted MB | mean measured MB | measured saving | cluster step s | mean device step s "
        "| aggregation ms/step | KiB up/step/device | KiB down/step/device | bytes vs FedAvg | final accuracy | Δ accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method in results["methods"].items():
        s = results["summary"][name]
        lines.append(
            f"| {method['label']} | {method['path']} | {s['mean_predicted_mb']:.1f} | {s['mean_measured_mb']:.1f} "
            f"| {_pct(-s['measured_saving_pct'])} | {method['cluster_step_s']:.3f} | {method['mean_device_step_s']:.3f} "
            f"| {method['aggregation_s_per_step'] * 1e3:.2f} | {method['bytes_up_per_step'] / KIB:.0f} "
            f"| {method['bytes_down_per_step'] / KIB:.0f} | {_x(s['bytes_ratio'])} | {method['final_accuracy']:.3f} "
            f"| {100 * s['accuracy_delta']:+.1f} |"
        )
    return lines


def _device_tables(results: Mapping[str, Any]) -> list[str]:
    all_units = results["plan"]["unit_names"]
    lines: list[str] = []
    for _name, method in results["methods"].items():
        lines += [
            f"**{method['label']}**",
            "",
            "| device | budget MB | trains | predicted MB | measured MB | step s | step s alone | KiB up/step | KiB down/step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in method["devices"]:
            lines.append(
                f"| {d['device']} | {d['budget_mb']:g} | {compress_unit_names(d['units'], all_units, short=True)} ({d['num_units']}) "
                f"| {d['predicted_mb']:.1f} | {d['measured_mb']:.1f} | {d['step_s']:.3f} | {d['isolated_step_s']:.3f} "
                f"| {d['bytes_up_per_step'] / KIB:.0f} | {d['bytes_down_per_step'] / KIB:.0f} |"
            )
        lines.append("")
    return lines


def _shortfalls(results: Mapping[str, Any]) -> list[str]:
    """Plain statements of where this run misses the paper's ratios, and why, from the run's own numbers."""
    paper, ratios, summary = results["paper"], results["summary"]["paper_ratios"], results["summary"]
    facts, methods = summary["facts"], results["methods"]
    s_ds = summary["dsparse"]
    lines = []
    if s_ds["measured_saving_pct"] < paper["memory_saving_pct"]:
        lines.append(
            f"- **Memory: {_pct(-s_ds['measured_saving_pct'])} measured ({_pct(-s_ds['predicted_saving_pct'])} predicted) "
            f"against the paper's {_pct(-paper['memory_saving_pct'])}.** DSparse's memory is what the budgets allow: "
            f"the mean budget here is {facts['mean_budget_mb']:.1f} MB, {facts['mean_budget_over_full_pct']:.0f}% of the "
            f"full update's predicted {facts['full_predicted_mb']:.1f} MB, so no plan can save more than about "
            f"{100 - facts['mean_budget_over_full_pct']:.0f}% on average. The paper's devices had {100 * ratios['memory']:.0f}% "
            f"of the full update's memory on average ({paper['memory_dsparse_mb']:g} of {paper['memory_full_mb']:g} MB). "
            f"{facts['devices_fitting_full']} of the {len(methods['fedavg']['devices'])} budgets here fit the full "
            f"update (budgets {facts['min_budget_mb']:g}–{facts['max_budget_mb']:g} MB, "
            f"{facts['budget_spread']:.1f}× spread); the weights ({facts['weights_mb']:.1f} MB) and the runtime's "
            "workspace are paid by every device whatever it trains."
        )
    else:
        lines.append(
            f"- Memory: the measured saving {_pct(-s_ds['measured_saving_pct'])} matches or beats the paper's "
            f"{_pct(-paper['memory_saving_pct'])}."
        )
    if s_ds["isolated_cluster_step_ratio"] > ratios["batch"]:
        lines.append(
            f"- **Batch time: {_x(s_ds['isolated_cluster_step_ratio'])} of the full update's cluster step with every "
            f"selection timed alone ({_x(s_ds['cluster_step_ratio'])} as timed inside the simulation), against the paper's "
            f"{_x(ratios['batch'])}.** A synchronous step waits for the slowest device. Here that is device "
            f"{facts['slowest_device']}, which trains {facts['slowest_device_units']} of {facts['unit_count']} units from "
            f"{facts['slowest_device_first_unit']} on, so its backward pass still runs through most of the network "
            f"({facts['slowest_device_step_over_full_pct']:.0f}% of a full step). {_pressure_note(results)} "
            "Inside the simulation two devices share "
            f"{results['machine']['cpu_count']} CPU cores, so those step times carry scheduling noise (which device "
            "runs beside which); the timing alone does not."
        )
    if "collective" in methods:
        s_col = summary["collective"]
        if s_col["same_transport_cluster_step_ratio"] > ratios["batch_fused"]:
            lines.append(
                f"- **Fusion: the fused collective step is {_x(s_col['same_transport_cluster_step_ratio'])} of the full "
                f"model over the same transport, against the paper's {_x(ratios['batch_fused'])}.** All "
                f"{len(methods['collective']['devices'])} ranks run as processes on {results['machine']['cpu_count']} "
                "cores, so each rank's compute is slowed by the others and the collectives run over loopback, where "
                "bandwidth is nearly free; the reasons of the batch-time row apply too. Its times are not comparable "
                "with methods 1-4, which ran two devices at a time in the simulation."
            )
    if s_ds["aggregation_ratio"] > ratios["aggregation"]:
        lines.append(
            f"- **Aggregation: {_pct(100 * (s_ds['aggregation_ratio'] - 1))} server time per step against the paper's "
            f"{_pct(-paper['aggregation_reduction_pct'])}.** The figure is the whole `aggregate_train` call: decoding "
            "every reply, checking it, the grouped mean and encoding the new global model. DSparse's replies are "
            "smaller, but the server still builds and returns the whole global model every round (Flower's strategy "
            "contract), a fixed cost of every method; the paper's figure is for the exchange among devices."
        )
    acc = 100 * s_ds["accuracy_delta"]
    steps, test_examples = results["setup"]["steps"], results["setup"]["test_examples"]
    if abs(acc) <= 2.0:
        lines.append(
            f"- **Accuracy:** DSparse ends {acc:+.1f} points from the full update after {steps} steps (the paper: "
            f"{paper['accuracy']}); the mean gap over the last {_TAIL} evaluations is "
            f"{_tail_gap(methods['dsparse'], methods['fedavg']):+.1f} points. The held-out split has {test_examples} "
            "examples, so a point or two between single evaluations is within noise."
        )
    elif acc > 2.0:
        lines.append(
            f"- **Accuracy:** kept: DSparse ends {acc:+.1f} points above the full update after {steps} steps (the "
            f"paper: {paper['accuracy']}); a run this short ({test_examples} held-out examples) says little more."
        )
    else:
        units = [d["num_units"] for d in methods["dsparse"]["devices"]]
        share = 100 * sum(units) / (len(units) * facts["unit_count"])
        # Only the methods this run has (``--methods`` may leave some out).
        others = [
            f"{label} {100 * summary[name]['accuracy_delta']:+.1f}"
            for name, label in (("uniform", "uniform sparse ends"), ("dsparse_k", "DSparse with K local steps"))
            if name in summary
        ]
        lines.append(
            f"- **Accuracy: DSparse ends {acc:+.1f} points below the full update after {steps} steps** (the paper: "
            f"{paper['accuracy']}){'; ' + ', '.join(others) + ' points' if others else ''}. A DSparse device trains "
            f"{share:.0f}% of the units on average, so each step moves fewer parameters and fine-tuning converges more "
            f"slowly; this run stops after {steps} steps, early in fine-tuning, where that shows most. Whether the gap "
            "closes with more steps is not measured here (run with a larger --steps)."
        )
    return lines


def _pressure_note(results: Mapping[str, Any]) -> str:
    caps = results.get("caps") or {}
    if caps.get("enabled"):
        killed = results["summary"]["fedavg_capped"]["oom_killed"]
        return (
            f"The budgets bind as hard caps in one process per device (the full update is killed on {killed} of "
            f"{results['summary']['fedavg_capped']['devices']}), but the timed steps run uncapped (a simulation "
            "actor serves several devices, so no per-device cap can bind there), so a full update never pages or "
            "thrashes here and costs only its arithmetic: whatever part of the paper's gap came from memory "
            "pressure on its edge devices cannot appear in these times."
        )
    return (
        "No device here is physically short of memory: the budgets are the planner's, not the hardware's, so a "
        "full update never pages or thrashes on this machine and costs only its arithmetic. Whatever part of the "
        "paper's gap came from memory pressure on the edge devices cannot appear here."
    )


def _cross_checks(results: Mapping[str, Any]) -> list[str]:
    summary, methods = results["summary"], results["methods"]
    lines = []
    if "collective" in methods and "max_loss_gap_vs_dsparse" in summary["collective"]:
        lines.append(
            "- **Methods 3 and 5 are one algorithm over two transports.** With one local step from a common model, "
            "averaging the parameters after the step (the server's grouped mean) equals averaging the gradients before "
            "it (the collective all-reduce), momentum included, when the devices' batches weigh the same. Their "
            f"held-out loss curves differ by at most {summary['collective']['max_loss_gap_vs_dsparse']:.2g}; only the "
            "time per step differs."
        )
    return lines


def _numbers(methods: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    """The method numbers (``METHOD_LABELS`` start with them) of those of ``names`` that ran."""
    return [methods[name]["label"].split()[0] for name in names if name in methods]


def _spoken(numbers: list[str]) -> str:
    return numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"


def _plan_users(methods: Mapping[str, Any]) -> str:
    """Which of the methods that ran use the DSparse plan, and what the others train (omitted ones unsaid)."""
    users = _numbers(methods, ("dsparse", "dsparse_k", "collective"))
    parts = [f"Method{'s' if len(users) > 1 else ''} {_spoken(users)} use{'' if len(users) > 1 else 's'} this plan"]
    if "uniform" in methods:
        parts.append("method 2 gives every device the smallest device's selection")
    parts.append("method 1 trains everything everywhere.")
    return "; ".join(parts)


def _paths(methods: Mapping[str, Any], num_cpus: int) -> str:
    """Where the methods that ran ran: Flower's simulation, and (method 5) the collective launcher."""
    simulated = _numbers(methods, ("fedavg", "uniform", "dsparse", "dsparse_k"))
    text = (
        f"Method{'s' if len(simulated) > 1 else ''} {_spoken(simulated)} ran in Flower's in-process simulation "
        f"(`run_simulation`, the project's ClientApp, Ray with {num_cpus} CPUs)."
    )
    if "collective" in methods:
        text += (
            " Method 5 has no server, so it ran through the collective transport's local launcher as one gloo "
            "process per device, with the same plan, checkpoint, partitions, batch streams and seeds."
        )
    return text


def render_report(results: Mapping[str, Any]) -> str:
    """The whole REPORT.md, from ``results`` (the parsed ``results.json``)."""
    setup, checkpoint, plan, machine = results["setup"], results["checkpoint"], results["plan"], results["machine"]
    methods = results["methods"]
    lines = [
        "# DSparse against full-update FedAvg, measured",
        "",
        "Generated by `experiments/report.py` from `results.json` of one run of:",
        "",
        f"    {results['command']}",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, Python {machine['python']}, torch "
        f"{machine['torch']}, flwr {machine['flwr']}. The whole run took {results['total_seconds']:.0f} s.",
        "",
        "## Setup",
        "",
        *_budget_lines(results),
        f"- {setup['model']}, "
        f"{setup['dataset']} data, batch {setup['batch_size']}, {setup['steps']} local steps per device for every method "
        f"(method 4: {setup['local_steps']} local steps per round), SGD lr {setup['lr']:g} momentum {setup['momentum']:g}, "
        f"seed {setup['seed']}, {setup['train_examples']} training examples (IID partitions), "
        f"{setup['test_examples']} held-out examples.",
        f"- Starting checkpoint: {checkpoint['source']}; pre-trained on classes "
        f"{', '.join(map(str, checkpoint.get('classes', [])))} ({checkpoint.get('steps', '–')} steps), held-out accuracy "
        f"{checkpoint['held_out_accuracy']:.3f} over all 10 classes. Every method fine-tunes from it on all classes.",
        f"- DSparse plan {plan['digest'][:12]} (scorer {setup['scorer']}, on the starting checkpoint): "
        f"{plan['groups']} groups, {len(plan['frozen_units'])} units frozen for everyone; planner objective "
        f"{setup.get('plan_objective', 'criticality')}{_objective_note(results)}. {_plan_users(methods)}",
        *_link_and_caps_lines(results),
        f"- {_paths(methods, setup['num_cpus'])}",
        "",
        "## Headline: the paper's ratios, the goals, ours",
        "",
        "Absolute times on this machine differ from the paper's edge devices, so each figure is compared as a ratio "
        "against the full update.",
        "",
        *_goals(results),
        "",
        "### In detail",
        "",
        *_headline(results),
        "",
        "## Where we fall short of the paper, and why",
        "",
        *_shortfalls(results),
        "",
        *(["## Cross-check", "", *_cross_checks(results), ""] if _cross_checks(results) else []),
        *_caps_table(results),
        "## All methods",
        "",
        *_methods_table(results),
        "",
    ]
    if "collective" in methods:
        base = methods["collective"]["full_update_same_transport"]
        lines += [
            f"Timing baseline of method 5: the full model trained by every rank over the same collective transport "
            f"({base['steps']} steps): cluster step {base['cluster_step_s']:.3f} s, collective time "
            f"{base['aggregation_s_per_step'] * 1e3:.1f} ms per step, {base['bytes_per_step'] / KIB:.0f} KiB per rank "
            "per step.",
            "",
        ]
    lines += ["## Per device", "", *_device_tables(results)]
    plots = results.get("plots", {})
    if plots:
        lines += ["## Plots", ""]
        for title, file in plots.items():
            lines += [f"![{title}]({file})", ""]
    lines += [
        "## How each figure is measured",
        "",
        "- **Predicted memory:** the cost model (`flwr_dsparse.costs.CostModel`) of the selection at the batch size: "
        "weights, gradients, optimizer state, saved activations, workspace.",
        "- **Measured memory:** the peak RSS increase of a fresh subprocess training that selection for "
        f"{setup['probe_steps']} steps (`flwr_dsparse.memory.measure_training_rss`, one thread); one probe per distinct "
        "selection. It excludes the loaded weights, which every method holds.",
        "- **Step time:** the median over rounds of each device's forward, backward and optimizer step, as the "
        "ClientApp reports it (method 5: each rank's compute time). The cluster step is the slowest device's. "
        f"*Alone:* each distinct selection timed on one thread with nothing else training, the selections taking "
        f"turns ({setup['timing_rounds']} passes of {setup['timing_steps']} steps after two warm-up steps; the median), "
        "so no other device shares the CPU; the headline batch-time ratio uses it.",
        "- **Aggregation time:** methods 1-4: the server's whole `aggregate_train` call per round, divided by the "
        "local steps of a round; method 5: per step, the all-reduce and broadcast time of the rank that waited least.",
        "- **Bytes:** methods 1-4: payload bytes of the arrays each device received and sent per round (from round 2 "
        "on; round 1 hands every method the starting model), divided by the local steps; method 5: the bytes each "
        "rank handed to collectives per step.",
        "- **Accuracy over time:** cumulative cluster time: per round, the slowest device's compute plus the "
        "aggregation time (method 5: the slowest rank's step). Evaluation is not counted; transfer time over the "
        "in-process simulation is not modelled.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m experiments.report DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    results = json.loads((folder / "results.json").read_text())
    write_csv(results, folder / "results.csv")
    (folder / "REPORT.md").write_text(render_report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
