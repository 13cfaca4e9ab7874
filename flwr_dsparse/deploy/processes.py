"""Start, watch and stop the processes of a deployment, by process id.

Processes are started in their own sessions and stopped by process id (and group), with
every descendant (SuperExec, ServerApp and ClientApp processes) found through psutil first.
A :class:`ProcessRecord` holds what is needed to find a process again from another shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessRecord",
    "flower_executable",
    "log_tail",
    "process_alive",
    "spawn_process",
    "stop_processes",
    "wait_for_port",
]


@dataclass(frozen=True)
class ProcessRecord:
    """A process this module started: enough to find and stop it from another shell."""

    role: str
    pid: int
    create_time: float
    command: list[str]
    log: str
    port: int
    node_config: dict[str, Any] = field(default_factory=dict)


def flower_executable(name: str) -> str:
    """The path of Flower's executable ``name``: beside this interpreter, else on PATH."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    from shutil import which

    found = which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable} nor on PATH; install Flower in this "
            f"environment: pip install 'flwr[simulation]>=1.42,<1.43' (or bash scripts/setup.sh)"
        )
    return found


def spawn_process(
    role: str,
    command: list[str],
    log: Path,
    env: Mapping[str, str],
    port: int,
    node_config: Mapping[str, Any] | None = None,
) -> ProcessRecord:
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        # Own session: a Ctrl-C in the user's shell does not half-kill the deployment,
        # and the whole group can be signalled by id at teardown.
        process = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = 0.0
    _CHILDREN[process.pid] = process
    return ProcessRecord(role, process.pid, create_time, list(command), str(log), port, dict(node_config or {}))


# Popen objects of processes started by this interpreter, so they are reaped (no zombies)
# when stopped from the same process; `down` from another shell works on ids alone.
_CHILDREN: dict[int, subprocess.Popen] = {}


def process_alive(record: ProcessRecord) -> bool:
    import psutil

    popen = _CHILDREN.get(record.pid)
    if popen is not None and popen.poll() is not None:
        return False
    try:
        process = psutil.Process(record.pid)
        if record.create_time and abs(process.create_time() - record.create_time) > 1.0:
            return False  # the id was reused by an unrelated process
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def log_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_for_port(record: ProcessRecord, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(record):
            raise RuntimeError(
                f"{record.role} (pid {record.pid}) exited during start-up; last lines of {record.log}:\n"
                f"{log_tail(record.log)}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"{record.role} did not listen on {host}:{port} within {timeout:.0f} s; last lines of "
        f"{record.log}:\n{log_tail(record.log)}"
    )


def _wait_gone(processes: list, timeout: float) -> list:
    """Wait until ``processes`` have exited; return those still running after ``timeout``.

    A zombie counts as gone: a process stopped from another shell is reparented, and who
    reaps it (and when) is not ours to wait for. psutil.wait_procs would wait for it.
    """
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        running = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.1)


def stop_processes(records: Sequence[ProcessRecord], *, grace: float = 5.0, hard: bool = False) -> list[int]:
    """Stop ``records`` and every process they started, by id; return the ids signalled.

    Descendants are collected first (SuperExec runs in a session of its own, and ServerApp
    and ClientApp processes hang below it), then everything gets SIGTERM, and what is still
    alive after ``grace`` seconds gets SIGKILL. ``hard=True`` skips the SIGTERM: a kill -9
    of the whole tree at once, as when a device loses power (nothing gets to say goodbye
    to the SuperLink).
    """
    import psutil

    targets: dict[int, psutil.Process] = {}
    groups: set[int] = set()
    for record in records:
        if not process_alive(record):
            continue
        try:
            process = psutil.Process(record.pid)
            targets[process.pid] = process
            for child in process.children(recursive=True):
                targets[child.pid] = child
            groups.add(os.getpgid(record.pid))
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    first = signal.SIGKILL if hard else signal.SIGTERM
    for group in groups:
        if group != os.getpgrp():  # never signal our own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, first)
    for process in targets.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(first)
    alive = _wait_gone(list(targets.values()), grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    left = _wait_gone(alive, grace)
    if left:
        # Once a benchmark deployment outlived its run, idle-polling; say so rather than leave it unseen.
        pids = " ".join(str(process.pid) for process in left)
        message = f"WARNING: processes {pids} still run after SIGKILL; stop them with: kill -9 {pids}"
        print(message, file=sys.stderr, flush=True)
    for record in records:
        popen = _CHILDREN.pop(record.pid, None)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=grace)
    return sorted(targets)
