"""What a round records: one :class:`RoundRecord` per round, for DSparse and FedAvg alike.

A record becomes one row of ``metrics.json`` (with the centralized evaluation merged in) and
of ``metrics.csv``; both are built here and nowhere else.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "RoundRecord", "merge_evaluations", "write_metrics_csv"]


@dataclass
class RoundRecord:
    """One round, as measured at the server.

    ``devices`` maps a device id (as a string, JSON's key type) to that device's row:
    ``status`` (``ok``, ``missing``, ``rejected:<kind>``), ``bytes-up``, ``bytes-down`` and
    the numeric metrics of its reply. Totals are derived from the rows.
    """

    round: int
    train_loss: float
    devices: dict[str, dict[str, Any]]
    aggregation_seconds: float
    round_seconds: float
    num_examples: int = 0
    accepted: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    updated_tensors: int = 0
    bytes_down_state: int = 0
    plan: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1
    transport: str = "server"

    @property
    def bytes_up(self) -> int:
        return sum(int(row.get("bytes-up", 0)) for row in self.devices.values())

    @property
    def bytes_down(self) -> int:
        return sum(int(row.get("bytes-down", 0)) for row in self.devices.values())

    @property
    def bytes_up_state(self) -> int:
        return sum(int(row.get("bytes-up-state", 0)) for row in self.devices.values())

    def to_row(self) -> dict[str, Any]:
        """The JSON row: every field with run_config-style keys, plus the byte totals."""
        row = {item.name.replace("_", "-"): getattr(self, item.name) for item in dataclasses.fields(self)}
        row.update({"bytes-up": self.bytes_up, "bytes-down": self.bytes_down, "bytes-up-state": self.bytes_up_state})
        row["devices"] = {device: dict(self.devices[device]) for device in sorted(self.devices, key=int)}
        return row


def merge_evaluations(history: Sequence[Mapping[str, Any]], evaluations: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per round, in order: its evaluation (``loss``, ``accuracy``) where it had one, and its record.

    Round 0 has only its evaluation; a round that ``evaluate-every`` skipped has only its record.
    """
    records = {int(row["round"]): row for row in history}  # a retried round: its last record
    evaluated = {int(row["round"]): row for row in evaluations}
    return [{**evaluated.get(r, {}), **records.get(r, {})} for r in sorted(records.keys() | evaluated.keys())]


CSV_COLUMNS = (
    "round",
    "loss",
    "accuracy",
    "train-loss",
    "bytes-up",
    "bytes-down",
    "aggregation-seconds",
    "round-seconds",
    "num-missing",
    "num-rejected",
    "bytes-up-state",
    "bytes-down-state",
)


def write_metrics_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.csv``: :data:`CSV_COLUMNS`, then bytes up and down per device."""
    devices = sorted({d for row in rows for d in row.get("devices", {})}, key=int)
    columns = [*CSV_COLUMNS, *(f"bytes-up-{d}" for d in devices), *(f"bytes-down-{d}" for d in devices)]
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            flat = {key: row.get(key, "") for key in CSV_COLUMNS[:8]}
            # Round 0 (the initial evaluation) has no record: its counts stay empty.
            flat["num-missing"] = len(row.get("missing", [])) if "devices" in row else ""
            flat["num-rejected"] = sum(row.get("rejected", {}).values()) if "devices" in row else ""
            flat["bytes-up-state"] = row.get("bytes-up-state", "")
            flat["bytes-down-state"] = row.get("bytes-down-state", "")
            for d in devices:
                device_row = row.get("devices", {}).get(d, {})
                flat[f"bytes-up-{d}"] = device_row.get("bytes-up", "")
                flat[f"bytes-down-{d}"] = device_row.get("bytes-down", "")
            writer.writerow(flat)
