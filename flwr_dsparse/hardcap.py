"""Hard memory caps: run a training process under a kernel-enforced memory limit.

A budget is a promise; the only way to test it is a limit the kernel enforces. Where the OS
allows it, a cap is a memory cgroup made as a *child of this process's own cgroup* (a process
is never moved out of the cgroup it started in):

* cgroup v1: ``/sys/fs/cgroup/memory/<own>/dsparse-…`` with ``memory.limit_in_bytes``; the
  peak is ``memory.max_usage_in_bytes`` and ``memory.oom_control`` counts kills;
* cgroup v2: ``<own>/dsparse-…`` in a delegated subtree with ``memory.max``; the peak is
  ``memory.peak`` and ``memory.events`` counts kills.

Charges a process took before it joined stay behind, so a process that joins after building
its model and batch is capped on what training adds. Where no writable cgroup exists,
:func:`hard_caps_available` says why, and :func:`run_capped` runs uncapped and reports the
peak RSS sampled with psutil instead (``CappedResult.capped`` is then False).

    ok, reason = hard_caps_available()
    result = run_capped([sys.executable, "-m", "my.probe"], limit_mb=120, join="self")
    if result.oom_killed: print(result.describe())

``join="start"`` caps the whole command from its first instruction;
``join="self"`` lets the command join when it is ready by calling :func:`join_cap_from_env`
(a probe that must not count its own imports and model). A callable runs in a forked child
that joins at once.

A deployed node (:class:`flwr_dsparse.deploy.caps.NodeCap`, ``dsparse deploy up --hard-cap``) is a node cgroup that the
SuperNode starts in (so do the SuperExec and every ClientApp it spawns) with a training cap
inside it: each ClientApp joins the training cap once its model is loaded, lowering the limit
to the device's budget less the weights it holds, so the cap binds what training adds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .sizes import MB

__all__ = [
    "BUDGET_ENV",
    "CAP_ENV",
    "CappedResult",
    "HardCap",
    "NOTE_ENV",
    "hard_caps_available",
    "join_cap_from_env",
    "own_cgroup",
    "run_capped",
]

#: Environment variable through which :func:`run_capped` tells a ``join="self"`` child its cgroup.
CAP_ENV = "DSPARSE_HARD_CAP_CGROUP"
#: The device's budget (MiB) behind the cap: a joining process sets the limit to it less ``resident_mb``.
BUDGET_ENV = "DSPARSE_HARD_CAP_BUDGET_MB"
#: A file a joining process writes what it is about to run (its label) to, for the kill report.
NOTE_ENV = "DSPARSE_HARD_CAP_NOTE"
_V1_ROOT = Path("/sys/fs/cgroup/memory")
_V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
_counter = 0


def own_cgroup() -> tuple[str, Path] | tuple[None, str]:
    """``("v1"|"v2", directory of this process's memory cgroup)``, or ``(None, reason)``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as error:
        return None, f"cannot read /proc/self/cgroup ({error}): not Linux?"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and (_V1_ROOT / "memory.limit_in_bytes").exists():
            return "v1", _V1_ROOT / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            for root in _V2_ROOTS:
                directory = root / line[3:].lstrip("/")
                if (root / "cgroup.controllers").exists() and (directory / "cgroup.controllers").exists():
                    return "v2", directory
    return None, "no memory cgroup controller is mounted (neither v1 memory nor a v2 memory subtree)"


def _enable_v2_memory(parent: Path) -> str | None:
    """Make sure ``memory`` is delegated to children of ``parent``; None or the reason it is not."""
    if "memory" not in (parent / "cgroup.controllers").read_text().split():
        return f"the memory controller is not delegated to {parent} (cgroup.controllers lacks 'memory')"
    if "memory" in (parent / "cgroup.subtree_control").read_text().split():
        return None
    try:
        (parent / "cgroup.subtree_control").write_text("+memory")
    except OSError as error:
        return (
            f"cannot enable memory in {parent}/cgroup.subtree_control ({error}); "
            "a v2 cgroup with processes in it cannot delegate (run under a delegated subtree)"
        )
    return None


@dataclass
class HardCap:
    """One child memory cgroup with a hard limit. Create with :meth:`create`; :meth:`close` removes it."""

    path: Path
    version: str
    limit_mb: float | None

    @classmethod
    def create(cls, limit_mb: float | None, *, parent: HardCap | None = None, name: str = "") -> HardCap:
        """A new child of this process's memory cgroup (or of ``parent``) limited to ``limit_mb`` MiB.

        ``limit_mb=None`` sets no limit (a cgroup that only groups and measures).

        Raises
        ------
        RuntimeError
            If the OS offers no writable memory cgroup; the message says why
            (:func:`hard_caps_available` returns the same reason without raising).
        """
        global _counter
        if limit_mb is not None and limit_mb <= 0:
            raise ValueError(f"limit_mb must be > 0, got {limit_mb}; pass the budget in MiB")
        if parent is not None:
            version, where = parent.version, parent.path
        else:
            version, where = own_cgroup()
        if version is None:
            raise RuntimeError(f"hard caps unavailable: {where}")
        assert isinstance(where, Path)
        if version == "v2":
            problem = _enable_v2_memory(where)
            if problem:
                raise RuntimeError(f"hard caps unavailable: {problem}")
        _counter += 1
        path = where / (name or f"dsparse-{os.getpid()}-{_counter}-{time.monotonic_ns() % 10**6}")
        try:
            path.mkdir()
        except OSError as error:
            raise RuntimeError(f"hard caps unavailable: cannot create a child cgroup in {where} ({error})") from error
        cap = cls(path, version, None)
        if limit_mb is not None:
            try:
                cap.set_limit(limit_mb)
            except OSError as error:
                cap.close()
                raise RuntimeError(f"hard caps unavailable: cannot set the limit in {path} ({error})") from error
        return cap

    def set_limit(self, limit_mb: float) -> None:
        """Set the hard limit to ``limit_mb`` MiB (no swap beyond it)."""
        _write_limit(self.path, self.version, limit_mb)
        self.limit_mb = float(limit_mb)

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the cap (what it allocates from now on is charged here)."""
        (self.path / "cgroup.procs").write_text(str(pid))

    @property
    def peak_mb(self) -> float:
        """High-water mark of the memory charged to the cap, in MiB."""
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        try:
            return int((self.path / name).read_text()) / MB
        except (OSError, ValueError):
            return float("nan")

    @property
    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the cap."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    @classmethod
    def at(cls, path: str | Path) -> HardCap:
        """The existing cgroup at ``path`` (e.g. from a state file), with its current limit."""
        path = Path(path)
        version = "v1" if (path / "memory.limit_in_bytes").exists() else "v2"
        return cls(path, version, _read_limit(path, version))

    def close(self) -> None:
        """Remove the cgroup (its processes must have exited; leftover charges go to the parent)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


def _write_limit(path: Path, version: str, limit_mb: float) -> None:
    limit = str(int(limit_mb * MB))
    if version == "v1":
        (path / "memory.limit_in_bytes").write_text(limit)
    else:
        (path / "memory.max").write_text(limit)
        if (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")


def _read_limit(path: Path, version: str) -> float | None:
    try:
        text = (path / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).read_text().strip()
    except OSError:
        return None
    return None if text == "max" or int(text) >= 2**60 else int(text) / MB


def hard_caps_available() -> tuple[bool, str]:
    """Whether :func:`run_capped` can enforce a limit here, and why (not)."""
    try:
        cap = HardCap.create(64)
    except RuntimeError as error:
        return False, str(error)
    cap.close()
    return True, f"cgroup {cap.version} child of {cap.path.parent}"


def join_cap_from_env(*, resident_mb: float = 0.0, label: str = "") -> bool:
    """Join the cap made for this process (:func:`run_capped` with ``join="self"``, or a
    :class:`~flwr_dsparse.deploy.caps.NodeCap`'s training cap); False (and nothing done) if there is none.

    Call it once the process has built what must not count against the cap (its imports,
    model and batch): charges taken before the move stay outside. Under a node cap
    the limit becomes the device's budget less ``resident_mb`` (the weights this process
    already holds), and ``label`` (what it trains, e.g. the selection) goes to the node's
    note, for the report if the kernel kills it.
    """
    path = os.environ.get(CAP_ENV)
    if not path:
        return False
    budget = os.environ.get(BUDGET_ENV)
    if budget:
        cap = HardCap.at(path)
        limit = max(1.0, float(budget) - resident_mb)
        cap.set_limit(limit)
        note = os.environ.get(NOTE_ENV)
        if note:
            record = {"pid": os.getpid(), "label": label, "limit_mb": limit, "resident_mb": resident_mb}
            Path(note).write_text(json.dumps(record))
    (Path(path) / "cgroup.procs").write_text(str(os.getpid()))
    return True


@dataclass(frozen=True)
class CappedResult:
    """What a capped run did.

    ``peak_mb`` is the cgroup's high-water mark (what the process allocated after joining),
    or, when ``capped`` is False, the peak RSS psutil sampled every 20 ms. ``oom_killed`` is
    True only when the kernel killed the process for exceeding the cap.
    """

    returncode: int
    limit_mb: float
    peak_mb: float
    oom_killed: bool
    capped: bool
    reason: str
    label: str = ""
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.oom_killed

    def describe(self) -> str:
        """One line for logs: killed or not, with budget and label (e.g. the selection)."""
        what = f" [{self.label}]" if self.label else ""
        if self.oom_killed:
            return (
                f"KILLED by the hard cap of {self.limit_mb:.1f} MB{what}: peak {self.peak_mb:.1f} MB; "
                "raise the budget or train a smaller selection"
            )
        mode = "capped" if self.capped else f"uncapped ({self.reason})"
        return f"exit {self.returncode}, peak {self.peak_mb:.1f} MB of {self.limit_mb:.1f} MB, {mode}{what}"


class _RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled (the fallback where no cgroup exists)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            process = psutil.Process(self.pid)
            while not self.done.is_set():
                rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
                self.peak = max(self.peak, rss / MB)
                time.sleep(0.02)
        except psutil.Error:
            pass


def run_capped(
    target: Sequence[str] | Callable[..., object],
    limit_mb: float,
    *,
    args: tuple = (),
    join: str = "start",
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    label: str = "",
    require: bool = False,
) -> CappedResult:
    """Run a command (or a callable, in a forked child) under a hard memory cap of ``limit_mb`` MiB.

    Parameters
    ----------
    target : sequence of str or callable
        A command line, or a function called as ``target(*args)`` in a forked child
        (its return value is not sent back; its exit code is 0 unless it raises).
    limit_mb : float
        The cap. For a training process that joins after loading, the budget less the
        resident weights.
    join : {"start", "self"}
        ``"start"``: the command is in the cap from its first instruction. ``"self"``: it
        joins itself by calling :func:`join_cap_from_env` (commands only).
    env : dict, optional
        Environment of the command (default: this process's).
    require : bool
        Raise instead of falling back to an uncapped run where caps are unavailable.
    """
    if join not in ("start", "self"):
        raise ValueError(f"join must be 'start' or 'self', got {join!r}")
    try:
        cap: HardCap | None = HardCap.create(limit_mb)
        reason = f"cgroup {cap.version}"
    except RuntimeError as error:
        if require:
            raise
        cap, reason = None, str(error)
    started = time.perf_counter()
    try:
        if callable(target):
            returncode, stdout, stderr, sampled = _run_callable(target, args, cap, timeout_s)
        else:
            returncode, stdout, stderr, sampled = _run_command(list(target), cap, join, env, timeout_s)
        seconds = time.perf_counter() - started
        if cap is None:
            return CappedResult(returncode, limit_mb, sampled, False, False, reason, label, stdout, stderr, seconds)
        killed = cap.oom_kills > 0 and returncode != 0
        return CappedResult(returncode, limit_mb, cap.peak_mb, killed, True, reason, label, stdout, stderr, seconds)
    finally:
        if cap is not None:
            cap.close()


def _run_command(
    command: list[str], cap: HardCap | None, join: str, env: dict[str, str] | None, timeout_s: float
) -> tuple[int, str, str, float]:
    environment = dict(os.environ if env is None else env)
    preexec = None
    if cap is not None and join == "self":
        environment[CAP_ENV] = str(cap.path)
    elif cap is not None:
        procs = str(cap.path / "cgroup.procs")

        def preexec() -> None:  # in the child, before exec: all of the command is capped
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))

    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, preexec_fn=preexec
    )
    sampler = _RssSampler(process.pid) if cap is None else None
    if sampler:
        sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n[run_capped] killed after the {timeout_s} s timeout"
    if sampler:
        sampler.done.set()
        sampler.join()
    return process.returncode, stdout, stderr, sampler.peak if sampler else float("nan")


def _run_callable(
    function: Callable[..., object], args: tuple, cap: HardCap | None, timeout_s: float
) -> tuple[int, str, str, float]:
    pid = os.fork()
    if pid == 0:  # the child: join, run, leave without running the parent's atexit handlers
        code = 0
        try:
            if cap is not None:
                cap.add(os.getpid())
            function(*args)
        except BaseException:  # noqa: B036 - report any failure as an exit code
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    sampler = _RssSampler(pid) if cap is None else None
    if sampler:
        sampler.start()
    deadline = time.monotonic() + timeout_s
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        else:
            time.sleep(0.01)
    if sampler:
        sampler.done.set()
        sampler.join()
    returncode = os.waitstatus_to_exitcode(status)
    return returncode, "", "", sampler.peak if sampler else float("nan")
