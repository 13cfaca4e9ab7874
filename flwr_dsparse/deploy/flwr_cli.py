"""Flower's command lines and its ``flwr`` CLI, as this project drives them.

Facts about Flower 1.42 that shape this module (read from its sources and ``--help``):

* The SuperLink serves its Fleet, Control and Runtime APIs over HTTP on **one** address,
  ``--host``/``--port`` (default ``127.0.0.1:8000``). SuperNodes connect to it with
  ``--superlink host:port``; ``flwr run . <connection>`` talks to the same address.
* Each SuperNode also serves a local Runtime API for its ClientApp processes on ``--port``
  (default 9094), so SuperNodes sharing one machine need one port each.
* Connections for the ``flwr`` CLI live in ``$FLWR_HOME/config.toml`` (default
  ``~/.flwr``) as ``[superlink.<name>]`` tables with ``address`` and ``insecure = true`` or
  ``root-certificates = "<ca.pem>"``. :func:`write_connection` adds one.
* ``flwr supernode ls <connection> --format json`` lists the nodes with their status.
* The SuperLink installs app dependencies at every run unless it gets
  ``--disable-runtime-dependency-installation``; SuperNodes do not unless allowed. An offline
  cluster or CI cannot reach a package index, so this module always disables it, and sets
  ``FLWR_TELEMETRY_ENABLED=0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .processes import flower_executable
from .tls import TlsFiles

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "FLOWER_ENV",
    "deployment_env",
    "run_flwr",
    "flwr_home",
    "format_node_config",
    "format_run_config",
    "list_nodes",
    "register_node",
    "superlink_command",
    "supernode_command",
    "write_connection",
]

DEFAULT_SUPERLINK_PORT = 8000  # Flower 1.42's default SuperLink port
DEFAULT_SUPERNODE_PORT = 9094  # Flower 1.42's default SuperNode Runtime API port
# What every process of the deployment, and the `flwr` CLI, runs with: no usage reports,
# and no per-run `uv sync` against a package index that an edge cluster may not reach.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


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


def superlink_command(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls: TlsFiles | None = None,
    auth: bool = False,
    database: str | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line (runtime dependency installation always off)."""
    command = [flower_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        if auth:
            raise ValueError("SuperNode authentication needs TLS; start the deployment with tls (--tls)")
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            tls.ca_cert,
            "--ssl-certfile",
            tls.server_cert,
            "--ssl-keyfile",
            tls.server_key,
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
        flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        format_node_config(node_config),
    ]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", root_certificates]
    if private_key is not None:
        command += ["--auth-supernode-private-key", private_key]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


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


def run_flwr(args: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_executable("flwr"), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
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
    result = run_flwr([*args, "--format", "json"], env, timeout)
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
