"""Echo app: Flower's own transport cost for given payload sizes, with no arithmetic.

Round ``r`` sends every node ``down-bytes[partition-id]`` bytes (split into
``down-arrays[partition-id]`` arrays) and the node replies at once with
``up-bytes[partition-id]`` bytes (in ``up-arrays[partition-id]`` arrays). Flower moves every
array as objects of its own, one request each, so the array count matters as much as the
bytes; and it moves equal objects once, so no two arrays are alike (:func:`payload`). The ServerApp
times each round (push to last reply) and writes ``<out-dir>/echo.json``. It is the floor
that ``experiments/round_overhead.py`` sets beside a real round moving the same bytes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_dsparse.deploy.fast_patches import fast_simulation_grid

client_app = ClientApp()


def sizes(text: str | int) -> list[int]:
    """``"100,200"`` -> ``[100, 200]``: one size per partition id (the last one repeats)."""
    return [int(float(part)) for part in str(text).split(",") if part.strip()]


def size_for(values: list[int], partition: int) -> int:
    return values[min(partition, len(values) - 1)]


#: Bytes between two stamps of an array: below Flower's 5 MiB array chunks, so every chunk has its own.
STAMP_EVERY = 1 << 20


def payload(nbytes: int, arrays: int = 1, salt: str = "") -> ArrayRecord:
    """``nbytes`` in ``arrays`` uint8 arrays (at least one byte each), every array and chunk distinct.

    Flower addresses every object by a hash of its bytes and moves each id once, so equal
    arrays travel as one: 158 arrays of zeros were one object, and the echo moved a 158th of
    FedAvg's bytes. Each array is zeros stamped with ``salt``, its index and the offset every
    :data:`STAMP_EVERY` bytes (nothing to compute, yet no two alike); payloads with the same
    ``salt`` are equal, as the real app's are where its messages carry the same tensors.
    """
    arrays = max(1, min(arrays, nbytes or 1))
    parts = np.array_split(np.zeros(max(nbytes, arrays), dtype=np.uint8), arrays)
    for index, part in enumerate(parts):
        for offset in range(0, len(part), STAMP_EVERY):
            stamp = f"{salt}/{index}/{offset}".encode()[: len(part) - offset]
            part[offset : offset + len(stamp)] = np.frombuffer(stamp, dtype=np.uint8)
    return ArrayRecord({f"a{index}": Array(part) for index, part in enumerate(parts)})


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": _partition(context)})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    reply = RecordDict(
        {
            # Every node's reply is its own (as trained values are).
            "arrays": payload(
                int(config["up-bytes"]), int(config["up-arrays"]), f"up/{msg.metadata.group_id}/{_partition(context)}"
            ),
            "metrics": MetricRecord({"partition-id": _partition(context), "step-seconds": 0.0}),
        }
    )
    return Message(reply, reply_to=msg)


def run_echo(grid: Grid, cfg: dict) -> None:
    """The echo rounds on ``grid`` with run config ``cfg`` (the keys of this app's pyproject)."""
    down, up = sizes(cfg["down-bytes"]), sizes(cfg["up-bytes"])
    down_arrays, up_arrays = sizes(cfg.get("down-arrays", 1)), sizes(cfg.get("up-arrays", 1))
    timeout = float(cfg.get("round-timeout", 600.0))
    while len(nodes := sorted(grid.get_node_ids())) < int(cfg.get("min-nodes", 2)):
        time.sleep(0.2)
    asked = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, group_id="0") for node in nodes]
    partition = {
        reply.metadata.src_node_id: int(reply.content["metrics"]["partition-id"])
        for reply in grid.send_and_receive(asked, timeout=timeout)
        if reply.has_content()
    }
    rows = []
    for server_round in range(1, int(cfg["num-server-rounds"]) + 1):
        messages = []
        for node, part in sorted(partition.items()):
            # Nodes sent as many bytes share one payload, as the app's nodes that lack the same
            # global tensors do (FedAvg's all do); a new round, new bytes.
            nbytes = size_for(down, part)
            content = RecordDict(
                {
                    "arrays": payload(nbytes, size_for(down_arrays, part), f"down/{server_round}/{nbytes}"),
                    "config": ConfigRecord({"up-bytes": size_for(up, part), "up-arrays": size_for(up_arrays, part)}),
                }
            )
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            )
        began = time.perf_counter()
        replies = [reply for reply in grid.send_and_receive(messages, timeout=timeout) if reply.has_content()]
        rows.append({"round": server_round, "round-seconds": time.perf_counter() - began, "replies": len(replies)})
    out = Path(str(cfg.get("out-dir", "outputs/echo")))
    out.mkdir(parents=True, exist_ok=True)
    (out / "echo.json").write_text(json.dumps({"nodes": len(partition), "rounds": rows}, indent=2))


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """The echo ServerApp with ``overrides`` on top of the run config (``run_simulation`` has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # The same reply polls as the project's ServerApp in simulation, so the floor is the same loop.
        run_echo(fast_simulation_grid(grid), {**dict(context.run_config), **(overrides or {})})

    return app


server_app = make_server_app()
