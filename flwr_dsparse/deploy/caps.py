"""Hard memory caps for deployed nodes (``dsparse deploy up --hard-cap``).

Each SuperNode starts in a memory cgroup of its own, a child of the deploying process's
cgroup (no process is ever moved out of the cgroup it started in), so the SuperExec and every
ClientApp it spawns start there too. Inside it is the node's training cap: a ClientApp joins
it once its model is loaded (:func:`flwr_dsparse.hardcap.join_cap_from_env`), setting the limit
to the device's budget less the weights it already holds, so the kernel enforces the budget on
what training adds, as ``experiments/memory_bench.py`` measures it. The interpreter, torch and
Flower themselves (hundreds of MB) are outside every budget, as in the cost model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..hardcap import BUDGET_ENV, CAP_ENV, NOTE_ENV, HardCap

__all__ = ["NodeCap"]


@dataclass
class NodeCap:
    """A deployed node's cgroups: the node's own (no limit) and the training cap inside it.

    :meth:`command` makes a command start in the node cgroup (its children, the SuperExec
    and the ClientApps, start there too); :meth:`env` tells those processes where the
    training cap is, the budget and the note file (:func:`join_cap_from_env`).
    """

    name: str
    budget_mb: float
    node: str
    train: str
    note: str

    @classmethod
    def create(cls, name: str, budget_mb: float, note: str | Path) -> NodeCap:
        """Cgroups for node ``name`` with a training cap of ``budget_mb``; RuntimeError says why not."""
        node = HardCap.create(None, name=f"dsparse-{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}")
        try:
            train = HardCap.create(budget_mb, parent=node, name="train")
        except BaseException:
            node.close()
            raise
        Path(note).unlink(missing_ok=True)
        return cls(name, float(budget_mb), str(node.path), str(train.path), str(note))

    def command(self, command: Sequence[str]) -> list[str]:
        """``command`` started inside the node cgroup (a shell joins it, then execs the command)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.node, *command]

    def env(self) -> dict[str, str]:
        return {CAP_ENV: self.train, BUDGET_ENV: repr(self.budget_mb), NOTE_ENV: self.note}

    @property
    def oom_kills(self) -> int:
        return HardCap.at(self.train).oom_kills

    @property
    def peak_mb(self) -> float:
        """The training cap's high-water mark (MiB)."""
        return HardCap.at(self.train).peak_mb

    def report(self) -> str | None:
        """A line naming the budget and what was trained if the cap killed a process, else None."""
        kills = self.oom_kills
        if not kills:
            return None
        try:
            note = json.loads(Path(self.note).read_text())
        except (OSError, ValueError):
            note = {}
        limit = note.get("limit_mb", HardCap.at(self.train).limit_mb or self.budget_mb)
        what = f" [{note['label']}]" if note.get("label") else ""
        return (
            f"{self.name}: KILLED by the hard cap of {limit:.1f} MB (budget {self.budget_mb:g} MB less "
            f"{note.get('resident_mb', 0.0):.1f} MB of resident weights){what}, {kills} kill(s), "
            f"peak {self.peak_mb:.1f} MB; raise memory-mb or train a smaller selection"
        )

    def close(self) -> None:
        """Remove both cgroups (the node's processes must have exited)."""
        HardCap.at(self.train).close()
        HardCap.at(self.node).close()
