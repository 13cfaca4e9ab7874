"""A whole loopback deployment: one SuperLink and N SuperNodes, started and stopped together.

This is the deployment runtime, not the simulation: ``flower-superlink`` and one
``flower-supernode`` per simulated device, each its own process with its own port and its
own ``--node-config`` (``memory-mb=… partition-id=… num-partitions=…``). It is what a user
runs on a real edge cluster, minus the network between the machines. The process ids are
written to a state file, so ``dsparse deploy down`` works from another shell.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..hardcap import hard_caps_available
from ..ports import free_port, port_in_use
from ..protocol import NODE_MEMORY_MB, NODE_NUM_PARTITIONS, NODE_PARTITION_ID
from .caps import NodeCap
from .flwr_cli import (
    DEFAULT_SUPERLINK_PORT,
    deployment_env,
    flwr_home,
    format_run_config,
    list_nodes,
    register_node,
    run_flwr,
    superlink_command,
    supernode_command,
    write_connection,
)
from .processes import ProcessRecord, log_tail, process_alive, spawn_process, stop_processes, wait_for_port
from .tls import TlsFiles, make_certificates, make_node_keys

__all__ = [
    "DEFAULT_CONNECTION",
    "Deployment",
    "cap_reports",
    "fast_setup",
    "run_app",
    "start_deployment",
    "start_superlink",
    "start_supernode",
    "stop_deployment",
    "state_dir_for",
    "wait_for_nodes",
]

DEFAULT_CONNECTION = "dsparse-local"
STATE_FILE = "deployment.json"
_LOG = logging.getLogger("flwr_dsparse.deploy")


@dataclass
class Deployment:
    """A running (or stopped) loopback deployment, as written to its state file.

    Attributes
    ----------
    state_dir : str
        Folder with the state file, the logs and (in TLS mode) the certificates.
    connection : str
        Name of the ``flwr`` CLI connection, for ``flwr run . <connection>``.
    flwr_home : str
        The ``FLWR_HOME`` of the processes and of the connection.
    address : str
        The SuperLink's ``host:port``.
    fast : bool
        Whether the processes run in fast mode (:mod:`flwr_dsparse.deploy.fast`).
    hard_caps : list of NodeCap
        The SuperNodes' hard memory caps (``hard_cap=True``), one per node.
    """

    state_dir: str
    connection: str
    flwr_home: str
    address: str
    tls: TlsFiles | None = None
    auth: bool = False
    superlink: ProcessRecord | None = None
    supernodes: list[ProcessRecord] = field(default_factory=list)
    fast: bool = False
    hard_caps: list[NodeCap] = field(default_factory=list)

    @property
    def processes(self) -> list[ProcessRecord]:
        return ([self.superlink] if self.superlink else []) + list(self.supernodes)

    def env(self) -> dict[str, str]:
        """The environment for ``flwr`` commands against this deployment."""
        return deployment_env(self.flwr_home)

    def save(self) -> Path:
        path = Path(self.state_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, state_dir: str | Path) -> Deployment:
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no deployment state at {path}; start one with `dsparse deploy up` (or pass the "
                f"--state-dir / --connection it was started with)"
            )
        data = json.loads(path.read_text())
        data["tls"] = TlsFiles(**data["tls"]) if data.get("tls") else None
        data["superlink"] = ProcessRecord(**data["superlink"]) if data.get("superlink") else None
        data["supernodes"] = [ProcessRecord(**node) for node in data.get("supernodes", [])]
        data["hard_caps"] = [NodeCap(**cap) for cap in data.get("hard_caps", [])]
        return cls(**data)


def start_superlink(
    state_dir: str | Path,
    *,
    home: str | Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls: TlsFiles | None = None,
    auth: bool = False,
    timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
) -> ProcessRecord:
    """Start ``flower-superlink`` and wait until its port accepts connections.

    ``extra_env`` is added to its environment (the fast mode's, :func:`fast_setup`).
    """
    if port_in_use(host, port):
        raise OSError(
            f"port {port} on {host} is already in use; stop what holds it (`dsparse deploy down`) "
            f"or pick another with --port"
        )
    command = superlink_command(host=host, port=port, tls=tls, auth=auth)
    env = {**deployment_env(home), **(extra_env or {})}
    record = spawn_process("superlink", command, Path(state_dir) / "superlink.log", env, port)
    try:
        wait_for_port(record, host, port, timeout)
    except BaseException:
        stop_processes([record])
        raise
    return record


def start_supernode(
    state_dir: str | Path,
    *,
    home: str | Path,
    superlink: str,
    port: int,
    node_config: Mapping[str, Any],
    root_certificates: str | None = None,
    private_key: str | None = None,
    name: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    threads: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    executable: str | None = None,
    hard_cap: NodeCap | None = None,
) -> ProcessRecord:
    """Start one ``flower-supernode`` (it connects in the background; see :func:`wait_for_nodes`).

    ``executable`` replaces ``flower-supernode`` (the fast mode's launcher) and
    ``extra_env`` is added to its environment. ``threads`` caps the intra-op threads of
    its ClientApp processes (``OMP_NUM_THREADS``): SuperNodes that share one machine would
    otherwise each spawn a thread per core and slow each other down, which a real device, alone on its cores, does not.
    ``hard_cap`` starts the SuperNode in its node cgroup, with the training cap's variables
    in its environment (:class:`~flwr_dsparse.deploy.caps.NodeCap`).
    """
    if port_in_use("127.0.0.1", port):
        raise OSError(f"SuperNode port {port} on 127.0.0.1 is already in use; pick another with --node-port")
    name = name or f"supernode-{node_config.get('partition-id', port)}"
    command = supernode_command(
        superlink=superlink,
        port=port,
        node_config=node_config,
        root_certificates=root_certificates,
        private_key=private_key,
        max_retries=max_retries,
        max_wait_time=max_wait_time,
    )
    if executable is not None:
        command[0] = executable
    env = {**deployment_env(home), **(extra_env or {})}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if hard_cap is not None:
        command = hard_cap.command(command)
        env.update(hard_cap.env())
    return spawn_process(name, command, Path(state_dir) / f"{name}.log", env, port, node_config)


def wait_for_nodes(
    deployment: Deployment, count: int | None = None, *, timeout: float = 120.0, poll: float = 1.0
) -> list[dict[str, Any]]:
    """Block until ``count`` nodes (default: all started) are ``online`` on the SuperLink.

    Raises
    ------
    RuntimeError
        When a process of the deployment exits meanwhile (with the tail of its log).
    TimeoutError
        When the nodes are not all online within ``timeout`` seconds.
    """
    count = len(deployment.supernodes) if count is None else count
    deadline = time.monotonic() + timeout
    online: list[dict[str, Any]] = []
    last_error = ""
    while True:
        for record in deployment.processes:
            if not process_alive(record):
                raise RuntimeError(
                    f"{record.role} (pid {record.pid}) exited before all nodes connected; last lines "
                    f"of {record.log}:\n{log_tail(record.log)}"
                )
        try:
            nodes = list_nodes(deployment.connection, deployment.env(), timeout=max(5.0, deadline - time.monotonic()))
            online = [node for node in nodes if node.get("status") == "online"]
            if len(online) >= count:
                return online
        except RuntimeError as error:
            last_error = str(error)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{len(online)} of {count} SuperNodes online after {timeout:.0f} s"
                + (f"; last error: {last_error}" if last_error else "")
                + f"; see the logs in {deployment.state_dir}"
            )
        time.sleep(poll)


def run_app(
    deployment: Deployment,
    app_dir: str | Path,
    run_config: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    log: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """``flwr run <app_dir> <connection> --run-config ... --stream``, waiting for the end.

    With ``--stream`` the command returns when the run finishes, printing its logs
    (also written to ``log`` when given).
    """
    args = ["run", str(app_dir), deployment.connection, "--stream"]
    if run_config:
        args += ["--run-config", format_run_config(run_config)]
    result = run_flwr(args, deployment.env(), timeout)
    if log is not None:
        Path(log).write_text(result.stdout + result.stderr)
    return result


def state_dir_for(home: Path, connection: str, state_dir: str | Path | None) -> Path:
    return Path(state_dir).resolve() if state_dir else home / "dsparse" / connection


def start_deployment(
    num_nodes: int,
    *,
    memory_mb: Sequence[float | None] | None = None,
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_SUPERLINK_PORT,
    node_ports: Sequence[int] | None = None,
    tls: bool = False,
    tls_hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    auth: bool = False,
    connection: str = DEFAULT_CONNECTION,
    home: str | Path | None = None,
    state_dir: str | Path | None = None,
    extra_node_config: Mapping[str, Any] | None = None,
    threads_per_node: int | None = None,
    timeout: float = 180.0,
    fast: bool = False,
    hard_cap: bool = False,
) -> Deployment:
    """Start a SuperLink and ``num_nodes`` SuperNodes on this machine; wait until all are online.

    Node ``i`` gets ``--node-config "partition-id=i num-partitions=num_nodes"`` plus
    ``memory-mb=memory_mb[i]`` when given (a ``None`` entry leaves the budget to psutil).
    On any failure everything started so far is stopped before the error propagates.

    Parameters
    ----------
    port : int, optional
        The SuperLink's port; ``None`` picks a free one (tests).
    node_ports : sequence of int, optional
        Each SuperNode's Runtime API port; default ``port + 1 + i`` style free ports.
    tls : bool
        Generate a CA and server certificate in ``state_dir/certs`` and run over TLS.
    auth : bool
        SuperNode authentication (needs ``tls``): one key pair per node, registered first.
    connection : str
        The ``flwr`` connection written to ``<home>/config.toml``.
    threads_per_node : int, optional
        Intra-op threads per SuperNode's ClientApp; default: this machine's cores shared
        evenly (at least 1), as if each node were a device of its own.
    fast : bool
        Fast mode (:mod:`flwr_dsparse.deploy.fast`): 50 ms polls instead of 1-3 s, and
        ClientApp processes forked from a warm SuperExec instead of started cold. On a
        Flower other than 1.42.* it logs one warning and starts the stock deployment.
    hard_cap : bool
        Run each SuperNode, and the ClientApps it spawns, under a hard memory cap of its
        budget (:mod:`flwr_dsparse.deploy.caps`; needs ``memory_mb`` for every node and a
        writable memory cgroup, else ValueError / RuntimeError saying which).
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
        raise ValueError(f"number of SuperNodes must be a positive integer, got {num_nodes!r}")
    budgets = list(memory_mb) if memory_mb is not None else [None] * num_nodes
    if len(budgets) != num_nodes:
        raise ValueError(
            f"{len(budgets)} memory-mb values for {num_nodes} SuperNodes; give one per node "
            f"(e.g. --memory-mb 80,110,150 with --nodes 3) or none"
        )
    for index, budget in enumerate(budgets):
        if budget is not None and not budget > 0:
            raise ValueError(f"memory-mb for SuperNode {index} is {budget!r}; every budget must be > 0 MB")
    if auth and not tls:
        raise ValueError("SuperNode authentication needs TLS; add --tls")
    if hard_cap:
        if any(budget is None for budget in budgets):
            raise ValueError("--hard-cap caps each node at its budget: give one with --memory-mb for every node")
        available, reason = hard_caps_available()
        if not available:
            raise RuntimeError(
                f"--hard-cap: {reason}; run without --hard-cap (each node then reports its peak RSS only)"
            )
    home_path = flwr_home(home)
    state = state_dir_for(home_path, connection, state_dir)
    if (state / STATE_FILE).is_file():
        previous = Deployment.load(state)
        if any(process_alive(record) for record in previous.processes):
            raise RuntimeError(
                f"a deployment is already running from {state} (SuperLink {previous.address}); "
                f"stop it with `dsparse deploy down --connection {connection}` first"
            )
    state.mkdir(parents=True, exist_ok=True)
    port = free_port(host if host != "0.0.0.0" else "127.0.0.1") if port is None else port
    dial_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"{dial_host}:{port}"
    tls_files = make_certificates(state / "certs", hosts=tls_hosts) if tls else None
    if node_ports is None:
        node_ports = [free_port() for _ in range(num_nodes)]
    if len(node_ports) != num_nodes or len(set(node_ports)) != num_nodes or port in node_ports:
        raise ValueError(f"need {num_nodes} distinct SuperNode ports other than {port}, got {list(node_ports)}")

    if threads_per_node is None:
        threads_per_node = max(1, (os.cpu_count() or 1) // num_nodes)
    fast_vars, launchers = fast_setup(state, home_path) if fast else ({}, {})
    deployment = Deployment(str(state), connection, str(home_path), address, tls_files, auth, fast=bool(launchers))
    write_connection(home_path, connection, address, root_certificates=tls_files.ca_cert if tls_files else None)
    try:
        deployment.superlink = start_superlink(
            state,
            home=home_path,
            host=host,
            port=port,
            tls=tls_files,
            auth=auth,
            timeout=timeout,
            extra_env=fast_vars,
        )
        deployment.save()
        for index in range(num_nodes):
            node_config: dict[str, Any] = {NODE_PARTITION_ID: index, NODE_NUM_PARTITIONS: num_nodes}
            if budgets[index] is not None:
                node_config[NODE_MEMORY_MB] = float(budgets[index])
            node_config.update(extra_node_config or {})
            private_key = None
            cap = None
            if hard_cap:
                name = f"supernode-{index}"
                cap = NodeCap.create(name, float(budgets[index]), state / f"{name}.cap.json")
                deployment.hard_caps.append(cap)
            if auth:
                keys = make_node_keys(state / "keys", f"supernode-{index}")
                register_node(connection, keys.public_key, deployment.env())
                private_key = keys.private_key
            deployment.supernodes.append(
                start_supernode(
                    state,
                    home=home_path,
                    superlink=address,
                    port=node_ports[index],
                    node_config=node_config,
                    root_certificates=tls_files.ca_cert if tls_files else None,
                    private_key=private_key,
                    threads=threads_per_node,
                    extra_env=fast_vars,
                    executable=launchers.get("flower-supernode"),
                    hard_cap=cap,
                )
            )
            deployment.save()
        wait_for_nodes(deployment, num_nodes, timeout=timeout)
    except BaseException:
        stop_deployment(deployment)
        raise
    return deployment


def fast_setup(state_dir: str | Path, home: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """The fast mode's environment and launchers for a deployment in ``state_dir``.

    Returns ``(env, launchers)``; both empty, after one warning, when this Flower is not
    the release the patches were written for (the deployment then starts stock).
    """
    from .fast import fast_env, flower_version_problem, write_launchers

    problem = flower_version_problem()
    if problem is not None:
        _LOG.warning("dsparse deploy --fast: %s; starting the stock deployment instead", problem)
        return {}, {}
    folder = Path(state_dir) / "fast-bin"
    launchers = write_launchers(folder)
    return fast_env(folder, path=deployment_env(home)["PATH"]), launchers


def cap_reports(deployment: Deployment) -> list[str]:
    """One line per node whose hard cap killed a process (budget, limit and selection)."""
    return [line for cap in deployment.hard_caps if (line := cap.report()) is not None]


def stop_deployment(deployment: Deployment, *, grace: float = 5.0) -> list[int]:
    """Stop every process of ``deployment`` (SuperNodes first, then the SuperLink); remove its hard caps."""
    signalled = stop_processes(list(deployment.supernodes), grace=grace)
    if deployment.superlink is not None:
        signalled += stop_processes([deployment.superlink], grace=grace)
    for cap in deployment.hard_caps:
        cap.close()
    return signalled
