"""The one round loop: every mode writes the same rows and summary, and handles silent or failed nodes alike."""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import Error, Message, MessageType, Metadata

from fedtune.centralized import run_centralized
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.server import ServerLoop

# the fields every metrics.jsonl row after round 0 and every summary.json carry, whatever trained
ROW_FIELDS = {
    "round",
    "sampled",
    "accepted",
    "rejected",
    "train",
    "bytes_up",
    "bytes_down",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "clients",
    "seconds",
}
SUMMARY_FIELDS = {
    "final",
    "rounds",
    "rounds_completed",
    "total_bytes_up",
    "total_bytes_down",
    "trainable_params",
    "adapter_bytes_fp32",
    "seconds",
    "model",
    "task",
    "adapter",
    "precision",
    "aggregation",
    "num_clients",
    "compression",
    "privacy",
    "stopped_early",
    "mode",
}


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def zo_cfg(tiny_cfg):
    return tiny_cfg.replace(**{"train.mode": "zo", "zo.num_seeds": 64, "zo.local_steps": 2, "zo.lr": 1e-3})


def _check_run(out, mode):
    rows = _rows(out)
    assert rows[0]["round"] == 0 and "eval" in rows[0]
    for r in rows[1:]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary), SUMMARY_FIELDS - set(summary)
    assert summary["mode"] == mode and summary["final"] == rows[-1]["eval"]
    assert {"settings", "epsilon"} <= set(summary["privacy"]) and "strategy" in summary["aggregation"]
    return rows, summary


def test_every_mode_writes_the_same_round_and_summary_fields(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 2})
    ServerLoop(cfg, tmp_path / "fed", progress=lambda s: None).main(
        LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    )
    _check_run(tmp_path / "fed", "federated")
    zcfg = zo_cfg(cfg)
    ServerLoop(zcfg, tmp_path / "zo", progress=lambda s: None).main(
        LocalGrid(zcfg.federation.num_clients, lambda m, c: handle_train(m, c, zcfg))
    )
    rows, summary = _check_run(tmp_path / "zo", "zeroth-order")
    assert rows[1]["zo"]["history_rounds"] == 1 and summary["zo_history"]["rounds"] == 2
    run_centralized(cfg, tmp_path / "central")
    _check_run(tmp_path / "central", "centralized")


class SilentGrid(LocalGrid):
    """Node ``silent`` never replies; node ``unavailable`` is answered for by the SuperLink (src node 0)."""

    def __init__(self, *args, silent=None, unavailable=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.silent, self.unavailable = silent, unavailable

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for i, m in enumerate(messages):  # as a real grid does at push time
            m.metadata.__dict__["_message_id"] = f"msg-{time.monotonic_ns()}-{i}"
        keep = [m for m in messages if m.metadata.dst_node_id not in (self.silent, self.unavailable)]
        replies = super().send_and_receive(keep, timeout=timeout)
        for m in messages:
            if m.metadata.dst_node_id == self.unavailable:
                meta = Metadata(
                    run_id=1,
                    message_id="",
                    src_node_id=0,
                    dst_node_id=0,
                    reply_to_message_id=m.metadata.message_id,
                    group_id="",
                    created_at=time.time(),
                    ttl=60.0,
                    message_type=MessageType.TRAIN,
                )
                replies.append(Message(Error(code=3, reason="node unavailable"), metadata=meta))
        return replies


@pytest.mark.parametrize("mode", ["backprop", "zo"])
def test_silent_and_unavailable_nodes_are_named_and_the_round_completes(tiny_cfg, tmp_path, mode):
    cfg = tiny_cfg.replace(**{"federation.rounds": 2, "federation.fraction_train": 1.0})
    if mode == "zo":
        cfg = zo_cfg(cfg)
    grid = SilentGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg), silent=1001, unavailable=1002)
    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    rows = _rows(tmp_path)
    assert summary["rounds_completed"] == 2
    for r in rows[1:]:
        reasons = {x["node"]: x["reason"] for x in r["rejected"]}
        assert set(reasons) == {1001, 1002}, reasons  # the SuperLink's reply is the node it was sent to
        assert "no reply within federation.round_timeout" in reasons[1001]
        assert "node unavailable" in reasons[1002]
        assert r["sampled"] == cfg.federation.num_clients and r["accepted"] == cfg.federation.num_clients - 2


def test_swa_evaluates_and_exports_the_mean_of_the_globals_since_swa_start(tiny_cfg, tmp_path):
    """FedSWA: clients train from the latest global; the adapter evaluated and exported is the mean of the
    globals after rounds swa_start..R (here 2..4), computed by hand from what the clients were sent."""
    import torch
    from safetensors.torch import load_file

    from fedtune import adapters, workspace
    from fedtune.flower import protocol as P
    from fedtune.flower.records import from_arrayrecord
    from fedtune.metrics import held_out_metrics

    cfg = tiny_cfg.replace(**{"federation.rounds": 4, "federation.fraction_train": 1.0, "aggregation.swa_start": 2})
    sent = {}

    def client(msg, ctx):
        sent[int(msg.content[P.CONFIG]["server-round"])] = from_arrayrecord(msg.content[P.ARRAYS])
        return handle_train(msg, ctx, cfg)

    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, client))
    last = load_file(str(tmp_path / "checkpoint" / "adapter_state.safetensors"))  # the global after round 4
    globals_ = [sent[3], sent[4], last]  # after rounds 2, 3, 4
    hand = {k: sum(g[k] for g in globals_) / 3 for k in last}
    swa = load_file(str(tmp_path / "checkpoint" / "swa_state.safetensors"))
    for k in hand:
        torch.testing.assert_close(swa[k], hand[k], rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(swa[k], last[k]) for k in last)  # the average is not the last global
    assert summary["aggregation"]["swa_rounds_averaged"] == 3
    ws = workspace.get(cfg)
    adapters.set_state_(ws.model, swa)
    assert summary["final"] == held_out_metrics(ws, cfg, final=True)  # what was evaluated is the average
    exported = load_file(str(tmp_path / "adapter" / workspace.INIT_STATE))  # and what was exported
    assert set(exported) == set(swa) and all(torch.equal(exported[k], swa[k]) for k in swa)


def test_swa_is_refused_where_it_would_not_run(tiny_cfg):
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="aggregation.swa_start: round 9 is after the last round"):
        tiny_cfg.replace(**{"aggregation.swa_start": 9})
    with pytest.raises(ConfigError, match="aggregation.swa_start: cannot be combined with train.mode = 'zo'"):
        zo_cfg(tiny_cfg).replace(**{"aggregation.swa_start": 1})


@pytest.mark.parametrize("over", [{"adapter.method": "head"}, {"adapter.ffa": True}, {"adapter.method": "lora-sb"}])
def test_only_trainable_keys_travel_and_frozen_ones_stay_seeded(tiny_cfg, tmp_path, over):
    """FFA's A, head-only's identity LoRA and lora-sb's fixed factors never go down the wire; the
    server's copy of them stays bit-exactly at the seeded initial values."""
    import torch
    from safetensors.torch import load_file

    from fedtune import workspace
    from fedtune.flower import protocol as P
    from fedtune.flower.records import from_arrayrecord

    cfg = tiny_cfg.replace(**{"federation.rounds": 2, **over})
    ws = workspace.get(cfg)
    initial, trainable = ws.initial_state(), set(ws.trainable_keys())
    assert trainable < set(initial)
    received = []

    def client(msg, ctx):
        received.append(set(from_arrayrecord(msg.content[P.ARRAYS])))
        return handle_train(msg, ctx, cfg)

    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, client))
    assert received and all(keys == trainable for keys in received)
    final = load_file(str(tmp_path / "checkpoint" / "adapter_state.safetensors"))
    assert all(torch.equal(final[k], initial[k]) for k in set(initial) - trainable)
    assert any(not torch.equal(final[k], initial[k]) for k in trainable)  # and the trainable ones moved
    rows = _rows(tmp_path)
    per_client = max(v for r in rows[1:] for v in r["bytes_down_per_client"].values())
    assert per_client < 4 * sum(initial[k].numel() for k in initial)
