"""Bring up a real Flower deployment on loopback: one SuperLink and N SuperNodes.

This is the deployment runtime, not the simulation: ``flower-superlink`` and one
``flower-supernode`` per simulated device, each its own process with its own port and its
own ``--node-config`` (``memory-mb=… partition-id=… num-partitions=…``). It is what a user
runs on a real edge cluster, minus the network between the machines.

Facts about Flower 1.42 that shape this module (read from its sources and ``--help``):

* The SuperLink serves its Fleet, Control and Runtime APIs over HTTP on **one** address,
  ``--host``/``--port`` (default ``127.0.0.1:8000``). SuperNodes connect to it with
  ``--superlink host:port``; ``flwr run . <connection>`` talks to the same address.
* Each SuperNode also serves a local Runtime API for its ClientApp processes on ``--port``
  (default 9094), so SuperNodes sharing one machine need one port each.
* Connections for the ``flwr`` CLI live in ``$FLWR_HOME/config.toml`` (default
  ``~/.flwr``) as ``[superlink.<name>]`` tables with ``address`` and ``insecure = true`` or
  ``root-certificates = "<ca.pem>"``. :func:`write_connection` adds one.
* ``flwr supernode ls <connection> --format json`` lists the nodes with their status;
  :func:`wait_for_nodes` polls it until every node is ``online``.
* The SuperLink installs app dependencies at every run unless it gets
  ``--disable-runtime-dependency-installation``; SuperNodes do not unless allowed. An offline
  cluster or CI cannot reach a package index, so this module always disables it, and sets
  ``FLWR_TELEMETRY_ENABLED=0``.
* TLS: the SuperLink takes ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, SuperNodes and
  connections take the CA as ``--root-certificates`` / ``root-certificates``.
  :func:`make_certificates` writes a throwaway CA and server certificate.
* SuperNode authentication needs no extra service: ``--enable-supernode-auth`` on a TLS
  SuperLink, one EC key pair per SuperNode (OpenSSH format), the public key registered with
  ``flwr supernode register``, the private key given to ``--auth-supernode-private-key``.

Processes are started in their own sessions and stopped by process id (and group), with
every descendant (SuperExec, ServerApp and ClientApp processes) found through psutil first.
The ids are written to a state file, so ``down`` works from another shell.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "DEFAULT_CONNECTION",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "Deployment",
    "NodeKeys",
    "ProcessRecord",
    "TlsFiles",
    "add_cli",
    "deployment_env",
    "flwr_home",
    "format_node_config",
    "format_run_config",
    "free_port",
    "list_nodes",
    "main",
    "make_certificates",
    "make_node_keys",
    "register_node",
    "run_app",
    "start_deployment",
    "start_superlink",
    "start_supernode",
    "stop_deployment",
    "stop_processes",
    "superlink_command",
    "supernode_command",
    "wait_for_nodes",
    "write_connection",
]

DEFAULT_CONNECTION = "dsparse-local"
DEFAULT_SUPERLINK_PORT = 8000  # Flower 1.42's default SuperLink port
DEFAULT_SUPERNODE_PORT = 9094  # Flower 1.42's default SuperNode Runtime API port
STATE_FILE = "deployment.json"
# What every process of the deployment, and the `flwr` CLI, runs with: no usage reports,
# and no per-run `uv sync` against a package index that an edge cluster may not reach.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS deployment: the CA, and the SuperLink's certificate and key."""

    ca_cert: str
    server_cert: str
    server_key: str


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (OpenSSH format, EC P-384)."""

    private_key: str
    public_key: str


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
    """

    state_dir: str
    connection: str
    flwr_home: str
    address: str
    tls: TlsFiles | None = None
    auth: bool = False
    superlink: ProcessRecord | None = None
    supernodes: list[ProcessRecord] = field(default_factory=list)

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
    def load(cls, state_dir: str | Path) -> "Deployment":
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
        return cls(**data)


# --------------------------------------------------------------------------- helpers


def flwr_home(value: str | Path | None = None) -> Path:
    """``value``, else ``$FLWR_HOME``, else ``~/.flwr`` (Flower's own rule)."""
    if value:
        return Path(value).expanduser().resolve()
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"]).expanduser().resolve()
    return Path.home() / ".flwr"


def deployment_env(home: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus :data:`FLOWER_ENV` and ``FLWR_HOME``."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(home)
    # The Flower executables live beside this interpreter; a venv that is not activated
    # must still find them (and spawn flower-superexec, which they look up on PATH).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    raise ValueError(f"config value {value!r} must be bool, int, float or str")


def format_node_config(config: Mapping[str, Any]) -> str:
    """``{"memory-mb": 80, "partition-id": 0}`` → ``'memory-mb=80 partition-id=0'``.

    The form ``flower-supernode --node-config`` takes: space-separated ``key=value``, values
    in TOML syntax (strings quoted).
    """
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())


def format_run_config(config: Mapping[str, Any]) -> str:
    """The same form for ``flwr run --run-config``."""
    return format_node_config(config)


def _check_executable(name: str) -> str:
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


# --------------------------------------------------------------------------- TLS, keys


def make_certificates(
    directory: str | Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 30,
    common_name: str = "dsparse-superlink",
) -> TlsFiles:
    """Write a throwaway CA and a SuperLink certificate signed by it.

    Parameters
    ----------
    directory : str or Path
        Where ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` go (created).
    hosts : sequence of str
        Names and IP addresses the SuperNodes use to reach the SuperLink; each becomes a
        subject alternative name, which TLS checks against the address dialled.
    days : int
        Validity of both certificates.

    Returns
    -------
    TlsFiles
        The paths to give the SuperLink (all three) and the SuperNodes (``ca_cert``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("hosts is empty; give the addresses SuperNodes dial, e.g. 127.0.0.1,localhost")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name}-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    files = TlsFiles(str(out / "ca.crt"), str(out / "server.pem"), str(out / "server.key"))
    Path(files.ca_cert).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_key(out / "ca.key", ca_key)
    Path(files.server_cert).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(Path(files.server_key), server_key)
    return files


def make_node_keys(directory: str | Path, name: str) -> NodeKeys:
    """Write a SuperNode authentication key pair: ``<name>`` and ``<name>.pub`` (OpenSSH, P-384)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    public = out / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return NodeKeys(str(private), str(public))


# --------------------------------------------------------------------------- commands


def superlink_command(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls: TlsFiles | None = None,
    auth: bool = False,
    database: str | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line (runtime dependency installation always off)."""
    command = [_check_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        if auth:
            raise ValueError("SuperNode authentication needs TLS; start the deployment with tls (--tls)")
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile", tls.ca_cert,
            "--ssl-certfile", tls.server_cert,
            "--ssl-keyfile", tls.server_key,
        ]
    if auth:
        command.append("--enable-supernode-auth")
    if database:
        command += ["--database", database]
    command.append("--disable-runtime-dependency-installation")
    return command


def supernode_command(
    *,
    superlink: str,
    port: int,
    node_config: Mapping[str, Any],
    root_certificates: str | None = None,
    private_key: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for one device.

    ``root_certificates=None`` means an insecure (plain HTTP) connection; the SuperNode
    does not install dependencies at run time unless explicitly allowed, so nothing is added
    for that.
    """
    command = [
        _check_executable("flower-supernode"),
        "--superlink", superlink,
        "--port", str(port),
        "--node-config", format_node_config(node_config),
    ]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", root_certificates]
    if private_key is not None:
        command += ["--auth-supernode-private-key", private_key]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def _spawn(role: str, command: list[str], log: Path, env: Mapping[str, str], port: int, node_config: Mapping[str, Any] | None = None) -> ProcessRecord:
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        # Own session: a Ctrl-C in the user's shell does not half-kill the deployment,
        # and the whole group can be signalled by id at teardown.
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env), start_new_session=True,
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


def _alive(record: ProcessRecord) -> bool:
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


def _log_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _wait_for_port(record: ProcessRecord, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(record):
            raise RuntimeError(
                f"{record.role} (pid {record.pid}) exited during start-up; last lines of {record.log}:\n"
                f"{_log_tail(record.log)}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"{record.role} did not listen on {host}:{port} within {timeout:.0f} s; last lines of "
        f"{record.log}:\n{_log_tail(record.log)}"
    )


def start_superlink(
    state_dir: str | Path,
    *,
    home: str | Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls: TlsFiles | None = None,
    auth: bool = False,
    timeout: float = 60.0,
) -> ProcessRecord:
    """Start ``flower-superlink`` and wait until its port accepts connections."""
    if _port_in_use(host, port):
        raise OSError(
            f"port {port} on {host} is already in use; stop what holds it (`dsparse deploy down`) "
            f"or pick another with --port"
        )
    command = superlink_command(host=host, port=port, tls=tls, auth=auth)
    record = _spawn("superlink", command, Path(state_dir) / "superlink.log", deployment_env(home), port)
    try:
        _wait_for_port(record, host, port, timeout)
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
) -> ProcessRecord:
    """Start one ``flower-supernode`` (it connects in the background; see :func:`wait_for_nodes`).

    ``threads`` caps the intra-op threads of its ClientApp processes (``OMP_NUM_THREADS``):
    SuperNodes that share one machine would otherwise each spawn a thread per core and
    slow each other down, which a real device, alone on its cores, does not.
    """
    if _port_in_use("127.0.0.1", port):
        raise OSError(
            f"SuperNode port {port} on 127.0.0.1 is already in use; pick another with --node-port"
        )
    name = name or f"supernode-{node_config.get('partition-id', port)}"
    command = supernode_command(
        superlink=superlink, port=port, node_config=node_config, root_certificates=root_certificates,
        private_key=private_key, max_retries=max_retries, max_wait_time=max_wait_time,
    )
    env = deployment_env(home)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return _spawn(name, command, Path(state_dir) / f"{name}.log", env, port, node_config)


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
        if not _alive(record):
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
            try:
                os.killpg(group, first)
            except (ProcessLookupError, PermissionError):
                pass
    for process in targets.values():
        try:
            process.send_signal(first)
        except psutil.NoSuchProcess:
            pass
    alive = _wait_gone(list(targets.values()), grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_gone(alive, grace)
    for record in records:
        popen = _CHILDREN.pop(record.pid, None)
        if popen is not None:
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    return sorted(targets)


# --------------------------------------------------------------------------- flwr CLI


def write_connection(
    home: str | Path,
    name: str,
    address: str,
    *,
    root_certificates: str | None = None,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``<home>/config.toml``; other entries stay.

    ``root_certificates=None`` writes ``insecure = true``.
    """
    import tomli
    import tomli_w

    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = tomli.loads(path.read_text()) if path.is_file() else {}
    superlinks = data.setdefault("superlink", {})
    superlinks.setdefault("default", name)
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlinks[name] = entry
    path.write_text(tomli_w.dumps(data))
    return path


def _flwr(args: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_check_executable("flwr"), *args], env=dict(env), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _json_from(output: str) -> dict[str, Any]:
    # `--format json` prints one JSON object, possibly after log lines.
    start = output.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {output[-500:]!r}")
    return json.loads(output[start:])


def _flwr_json(args: list[str], env: Mapping[str, str], timeout: float, *, what: str) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and return its reply; a failure raises naming ``what``."""
    result = _flwr([*args, "--format", "json"], env, timeout)
    try:
        data = _json_from(result.stdout)
    except ValueError:  # no JSON at all: report what flwr printed instead
        data = {"success": False}
    if result.returncode != 0 or not data.get("success", False):
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}): "
            f"{(data.get('error-message') or result.stderr or result.stdout)[-800:]}"
        )
    return data


def list_nodes(connection: str, env: Mapping[str, str], *, timeout: float = 60.0) -> list[dict[str, Any]]:
    """``flwr supernode ls <connection> --format json``: the SuperLink's nodes and their status."""
    data = _flwr_json(["supernode", "ls", connection], env, timeout, what=f"`flwr supernode ls {connection}`")
    return list(data.get("nodes", []))


def register_node(connection: str, public_key: str, env: Mapping[str, str], *, timeout: float = 60.0) -> int:
    """``flwr supernode register <key> <connection>``; returns the new node id."""
    data = _flwr_json(["supernode", "register", public_key, connection], env, timeout, what=f"registering {public_key}")
    return int(data["node-id"])


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
            if not _alive(record):
                raise RuntimeError(
                    f"{record.role} (pid {record.pid}) exited before all nodes connected; last lines "
                    f"of {record.log}:\n{_log_tail(record.log)}"
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
    result = _flwr(args, deployment.env(), timeout)
    if log is not None:
        Path(log).write_text(result.stdout + result.stderr)
    return result


# --------------------------------------------------------------------------- whole deployment


def _state_dir(home: Path, connection: str, state_dir: str | Path | None) -> Path:
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
    home_path = flwr_home(home)
    state = _state_dir(home_path, connection, state_dir)
    if (state / STATE_FILE).is_file():
        previous = Deployment.load(state)
        if any(_alive(record) for record in previous.processes):
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
    deployment = Deployment(str(state), connection, str(home_path), address, tls_files, auth)
    write_connection(home_path, connection, address, root_certificates=tls_files.ca_cert if tls_files else None)
    try:
        deployment.superlink = start_superlink(
            state, home=home_path, host=host, port=port, tls=tls_files, auth=auth, timeout=timeout
        )
        deployment.save()
        for index in range(num_nodes):
            node_config: dict[str, Any] = {"partition-id": index, "num-partitions": num_nodes}
            if budgets[index] is not None:
                node_config["memory-mb"] = float(budgets[index])
            node_config.update(extra_node_config or {})
            private_key = None
            if auth:
                keys = make_node_keys(state / "keys", f"supernode-{index}")
                register_node(connection, keys.public_key, deployment.env())
                private_key = keys.private_key
            deployment.supernodes.append(
                start_supernode(
                    state, home=home_path, superlink=address, port=node_ports[index], node_config=node_config,
                    root_certificates=tls_files.ca_cert if tls_files else None, private_key=private_key,
                    threads=threads_per_node,
                )
            )
            deployment.save()
        wait_for_nodes(deployment, num_nodes, timeout=timeout)
    except BaseException:
        stop_deployment(deployment)
        raise
    return deployment


def stop_deployment(deployment: Deployment, *, grace: float = 5.0) -> list[int]:
    """Stop every process of ``deployment`` (SuperNodes first, then the SuperLink)."""
    signalled = stop_processes(list(deployment.supernodes), grace=grace)
    if deployment.superlink is not None:
        signalled += stop_processes([deployment.superlink], grace=grace)
    return signalled


# --------------------------------------------------------------------------- CLI


def _parse_budgets(text: str | None) -> list[float] | None:
    if not text:
        return None
    values = []
    for position, item in enumerate(text.split(",")):
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--memory-mb entry {position} is {item.strip()!r}, not a number; write e.g. 80,110,150"
            ) from None
    return values


def _cmd_up(args: argparse.Namespace) -> int:
    budgets = _parse_budgets(args.memory_mb)
    deployment = start_deployment(
        args.nodes,
        memory_mb=budgets,
        host=args.host,
        port=args.port,
        node_ports=[args.node_port + i for i in range(args.nodes)] if args.node_port else None,
        tls=args.tls,
        tls_hosts=args.tls_hosts.split(","),
        auth=args.auth,
        connection=args.connection,
        home=args.flwr_home,
        state_dir=args.state_dir,
        threads_per_node=args.threads_per_node,
        timeout=args.timeout,
    )
    print(f"SuperLink {deployment.address} (pid {deployment.superlink.pid}), "
          f"{'TLS' if deployment.tls else 'insecure'}{', SuperNode auth' if deployment.auth else ''}")
    for node in deployment.supernodes:
        print(f"  {node.role}: pid {node.pid}, port {node.port}, node-config {format_node_config(node.node_config)!r}")
    print(f"all {len(deployment.supernodes)} SuperNodes online; state and logs in {deployment.state_dir}")
    home_hint = "" if args.flwr_home is None else f"FLWR_HOME={shlex.quote(deployment.flwr_home)} "
    print(f"run the app:  {home_hint}flwr run . {deployment.connection} --stream")
    print(f"stop it all:  dsparse deploy down --connection {deployment.connection}"
          + ("" if args.flwr_home is None else f" --flwr-home {shlex.quote(deployment.flwr_home)}"))
    return 0


def _load(args: argparse.Namespace) -> Deployment:
    return Deployment.load(_state_dir(flwr_home(args.flwr_home), args.connection, args.state_dir))


def _cmd_down(args: argparse.Namespace) -> int:
    deployment = _load(args)
    signalled = stop_deployment(deployment, grace=args.grace)
    left = [record.pid for record in deployment.processes if _alive(record)]
    print(f"stopped {len(signalled)} processes ({', '.join(map(str, signalled)) or 'none were running'})")
    if left:
        print(f"still alive: {left}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    deployment = _load(args)
    for record in deployment.processes:
        state = "running" if _alive(record) else "stopped"
        print(f"{record.role:>14}: pid {record.pid:>7} port {record.port:>5} {state}  log {record.log}")
    if deployment.superlink is not None and _alive(deployment.superlink):
        nodes = list_nodes(deployment.connection, deployment.env())
        print(f"SuperLink {deployment.address}: " + ", ".join(f"{n['node-id']} {n['status']}" for n in nodes))
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    files = make_certificates(args.out, hosts=args.hosts.split(","), days=args.days)
    print(json.dumps(asdict(files), indent=2))
    print(
        "SuperLink: --ssl-ca-certfile {0} --ssl-certfile {1} --ssl-keyfile {2}\n"
        "SuperNodes and the flwr connection: --root-certificates / root-certificates = {0}".format(
            files.ca_cert, files.server_cert, files.server_key
        )
    )
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    keys = make_node_keys(args.out, args.name)
    print(f"private key (flower-supernode --auth-supernode-private-key): {keys.private_key}")
    print(f"public key (flwr supernode register {keys.public_key} <connection>): {keys.public_key}")
    return 0


def _guarded(command: Any) -> Any:
    """Report a failed start or stop as one ``error:`` line and exit status 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except (ValueError, OSError, RuntimeError, TimeoutError) as error:
            print(f"dsparse deploy {args.deploy_command}: error: {error}", file=sys.stderr)
            return 2

    return run


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``deploy`` with ``up``, ``down``, ``status``, ``certs`` and ``keys``."""
    parser = subparsers.add_parser(
        "deploy",
        help="run a real Flower SuperLink and SuperNodes on this machine",
        description="Bring up (and tear down) a Flower SuperLink and N SuperNodes on loopback.",
    )
    commands = parser.add_subparsers(dest="deploy_command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr connection name (default %(default)s)")
        sub.add_argument("--flwr-home", default=None, help="FLWR_HOME (default: $FLWR_HOME or ~/.flwr)")
        sub.add_argument("--state-dir", default=None, help="state and logs (default: <flwr-home>/dsparse/<connection>)")

    up = commands.add_parser("up", help="start a SuperLink and N SuperNodes, wait until all are online")
    up.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default %(default)s)")
    up.add_argument("--memory-mb", default=None, help="comma-separated budgets, one per node, e.g. 80,110,150")
    up.add_argument("--host", default="127.0.0.1", help="SuperLink bind address (default %(default)s)")
    up.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT, help="SuperLink port (default %(default)s)")
    up.add_argument("--node-port", type=int, default=DEFAULT_SUPERNODE_PORT,
                    help="first SuperNode Runtime API port; node i gets node-port+i (default %(default)s)")
    up.add_argument("--tls", action="store_true", help="generate a CA and server certificate and use TLS")
    up.add_argument("--tls-hosts", default="127.0.0.1,localhost", help="names in the server certificate")
    up.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
    up.add_argument("--threads-per-node", type=int, default=None,
                    help="OMP threads per SuperNode (default: CPU cores / nodes, at least 1)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all nodes (default %(default)s)")
    common(up)
    up.set_defaults(func=_guarded(_cmd_up))

    down = commands.add_parser("down", help="stop every process of the deployment by id")
    down.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    common(down)
    down.set_defaults(func=_guarded(_cmd_down))

    status = commands.add_parser("status", help="processes and the SuperLink's node list")
    common(status)
    status.set_defaults(func=_guarded(_cmd_status))

    certs = commands.add_parser("certs", help="write a throwaway CA and SuperLink certificate")
    certs.add_argument("--out", required=True, help="output folder")
    certs.add_argument("--hosts", default="127.0.0.1,localhost",
                       help="comma-separated names/IPs the SuperNodes dial (default %(default)s)")
    certs.add_argument("--days", type=int, default=30)
    certs.set_defaults(func=_guarded(_cmd_certs))

    keys = commands.add_parser("keys", help="write a SuperNode authentication key pair")
    keys.add_argument("--out", required=True, help="output folder")
    keys.add_argument("--name", default="supernode", help="file name of the private key")
    keys.set_defaults(func=_guarded(_cmd_keys))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flwr_dsparse.deploy up|down|status|certs|keys ...``."""
    parser = argparse.ArgumentParser(prog="python -m flwr_dsparse.deploy")
    subparsers = parser.add_subparsers(dest="command")
    add_cli(subparsers)
    args = parser.parse_args(["deploy", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
