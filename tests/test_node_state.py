"""The live node state (flwr_dsparse.node_state), the one-copy codec (records) and checkpoint-every."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array

from client.app import app
from experiments.fault_matrix import SMALL_JOB
from flwr_dsparse import node_state
from flwr_dsparse.config import load_config
from flwr_dsparse.protocol import STATE_MOMENTUM, STATE_REPLICA
from flwr_dsparse.records import array_of, from_array_record, tensor_of
from flwr_dsparse.testing import LocalGrid
from server.app import run_job

JOB = {**SMALL_JOB, "num-server-rounds": 3, "checkpoint-every": 1}


def _run(tmp_path, monkeypatch, *, live: bool, **extra):
    hits = []
    take = node_state.take

    def counting_take(*args):
        state = take(*args) if live else None
        hits.append(state is not None)
        return state

    monkeypatch.setattr(node_state, "take", counting_take)
    node_state.clear()
    grid = LocalGrid(app, range(3), 3)
    run_job(grid, load_config({**JOB, **extra, "out-dir": str(tmp_path)}))  # type: ignore[arg-type]
    model = torch.load(tmp_path / "final_model.pt")
    contexts = {node.partition: node.context for node in grid.nodes.values()}
    return model, contexts, hits


def test_live_state_and_rebuilding_from_context_state_are_bit_identical(tmp_path, monkeypatch, one_torch_thread):
    cached, cached_nodes, hits = _run(tmp_path / "live", monkeypatch, live=True)
    rebuilt, rebuilt_nodes, misses = _run(tmp_path / "rebuilt", monkeypatch, live=False)
    # Round 1 builds every node; rounds 2 and 3 use the live model of each of the 3 nodes.
    assert hits.count(True) == 6 and not any(misses)
    assert cached.keys() == rebuilt.keys()
    assert all(torch.equal(cached[name], rebuilt[name]) for name in cached)
    for partition, context in cached_nodes.items():
        other = rebuilt_nodes[partition].state
        for key in (STATE_MOMENTUM, STATE_REPLICA):
            a, b = from_array_record(context.state[key]), from_array_record(other[key])
            assert a.keys() == b.keys() and a, (partition, key)
            assert all(torch.equal(a[name], b[name]) for name in a), (partition, key)


def test_a_live_state_is_used_only_for_its_run_node_and_token():
    model = torch.nn.Linear(2, 2)
    node_state.clear()
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(2, 7, "t1") is None  # another run
    assert node_state.take(1, 8, "t1") is None  # another node
    assert node_state.take(1, 7, "t0") is None  # stale: another process trained the node since
    assert node_state.take(1, 7, "t1") is None  # ...and the stale entry was dropped
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(1, 7, None) is None  # context.state lost its token (a restarted node)
    node_state.put(1, 7, node_state.NodeState("t1", model, ["a"]))
    assert node_state.take(1, 7, "t1").model is model
    assert node_state.new_token(3) != node_state.new_token(3)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(0),
        torch.tensor(3.0),
        torch.arange(5),
        torch.randn(4, 3, 2).permute(2, 0, 1),
        torch.ones(2, dtype=torch.bool),
    ],
)
def test_array_of_writes_the_bytes_of_np_save_and_reads_them_back(tensor):
    ours, flowers = array_of(tensor), Array(tensor.contiguous().numpy())
    fields = ("data", "dtype", "shape", "stype")
    assert [getattr(ours, f) for f in fields] == [getattr(flowers, f) for f in fields]
    view = tensor_of(ours, writable=False)
    assert torch.equal(view, tensor) and torch.equal(tensor_of(flowers), tensor)
    wire = np.frombuffer(ours.data, dtype=np.uint8).ctypes.data
    if tensor.numel():  # a view of the wire bytes, never copied; the writable one is a copy
        assert wire <= view.data_ptr() < wire + len(ours.data)
        assert not wire <= tensor_of(ours).data_ptr() < wire + len(ours.data)


def test_nodes_upload_momentum_only_in_checkpoint_every_rounds_and_the_last(tmp_path, monkeypatch, one_torch_thread):
    _run(tmp_path, monkeypatch, live=True, **{"num-server-rounds": 5, "checkpoint-every": 2})
    rounds = [row for row in json.loads((tmp_path / "metrics.json").read_text())["rounds"] if row.get("devices")]
    uploaded = {row["round"]: sum(d.get("bytes-up-state", 0) for d in row["devices"].values()) for row in rounds}
    assert [r for r, nbytes in uploaded.items() if nbytes] == [2, 4, 5]
