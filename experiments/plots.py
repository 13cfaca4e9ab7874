"""PNG plots of a comparison run, drawn from its results (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_plots"]

KIB = 1024


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or a headless server
    import matplotlib.pyplot as plt

    return plt


def _memory(results: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    methods = results["methods"]
    devices = [d["device"] for d in methods["fedavg"]["devices"]]
    budgets = [d["budget_mb"] for d in methods["fedavg"]["devices"]]
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    for ax, key, title in (
        (axes[0], "predicted_mb", "predicted (cost model, total)"),
        (axes[1], "measured_mb", "measured (peak RSS increase, fresh process)"),
    ):
        for index, (_name, method) in enumerate(methods.items()):
            values = [d[key] for d in method["devices"]]
            ax.bar(
                [x + (index - (len(methods) - 1) / 2) * width for x in range(len(devices))],
                values,
                width,
                label=method["label"],
            )
        if key == "predicted_mb":
            ax.scatter(range(len(devices)), budgets, marker="_", s=400, color="black", zorder=3, label="budget")
        ax.set_xticks(range(len(devices)))
        ax.set_xticklabels([f"{d}\n{b:g} MB" for d, b in zip(devices, budgets, strict=False)])
        ax.set_xlabel("device (budget)")
        ax.set_ylabel("MB")
        ax.set_title(f"Memory per device: {title}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _accuracy(results: Mapping[str, Any], path: Path, x_key: str, x_label: str, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _name, method in results["methods"].items():
        curve = method["curve"]
        ax.plot(
            [p[x_key] for p in curve], [p["accuracy"] for p in curve], marker="o", markersize=3, label=method["label"]
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _aggregation_bytes(results: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    methods = results["methods"]
    names = list(methods)
    short = [methods[n]["label"].split(" ", 1)[0] + " " + n for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].bar(short, [methods[n]["aggregation_s_per_step"] * 1e3 for n in names], color="tab:blue")
    axes[0].set_ylabel("ms per step")
    axes[0].set_title("Aggregation time per step")
    up = [methods[n]["bytes_up_per_step"] / KIB for n in names]
    down = [methods[n]["bytes_down_per_step"] / KIB for n in names]
    axes[1].bar(short, up, label="up (device → server / collective)")
    axes[1].bar(short, down, bottom=up, label="down")
    axes[1].set_ylabel("KiB per device per step (mean)")
    axes[1].set_title("Bytes per device per step")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(results: Mapping[str, Any], out: Path) -> dict[str, str]:
    """Write the four plots to ``out``; returns ``{title: file name}`` for the report."""
    files = {
        "Memory per device, per method": "memory_per_device.png",
        "Accuracy against steps": "accuracy_steps.png",
        "Accuracy against cluster time": "accuracy_time.png",
        "Aggregation time and bytes per method": "aggregation_bytes.png",
    }
    _memory(results, out / files["Memory per device, per method"])
    _accuracy(
        results,
        out / files["Accuracy against steps"],
        "step",
        "local steps per device",
        "Held-out accuracy against steps",
    )
    _accuracy(
        results,
        out / files["Accuracy against cluster time"],
        "cluster_s",
        "cluster time, s (slowest device's compute + aggregation)",
        "Held-out accuracy against time",
    )
    _aggregation_bytes(results, out / files["Aggregation time and bytes per method"])
    return files
