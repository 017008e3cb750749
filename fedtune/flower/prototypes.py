"""``adapter.head_init = "prototypes"`` through Flower: class means up, a nearest-centroid head into the global.

Before round 1 (`HeadInit.run`, called by `fedtune.flower.server.ServerLoop`) the
server sends every available node one TRAIN message with ``config`` (``server-round``
0) and ``prototypes`` (``request``). The client (`handle_prototype_stats`, dispatched
from `fedtune.flower.client.handle_train`) runs its training examples through the
model with the untuned adapter in ``eval()`` and replies with ``prototypes``
(``stats``: per-class float16 means and counts, `fedtune.prototypes.encode_stats`,
C x (2H + 4) bytes) and ``metrics`` (num-examples, partition-id). The server adds the
stats up in partition-id order, builds the head (`fedtune.prototypes.head_from_stats`)
and installs it in the round protocol's initial global (`RoundProtocol.install_head`):

- gradient rounds: the head is part of the adapter every client is sent each round
  (a compressed broadcast sends the full adapter the first time, as nobody holds
  that version 0);
- zeroth-order rounds: each node gets the head (`fedtune.prototypes.encode_head`,
  float16 weight, float32 bias) once, with the first downlink it replays from the
  initial model, and keeps it in ``context.state``: it is part of its initial model.

Bytes: the request and the stats are the round-0 row of ``metrics.jsonl``
(``bytes_up``, ``bytes_down`` and per client, plus ``head_init``); the head's own
downlink is inside round 1's (ZO: each node's first) ``bytes_down``. Both count in
``summary.json``'s totals. The head (`HEAD_FILE`, the downlink bytes) is kept in
the checkpoint, so a resumed run keeps it, and written to the run directory: with
ZO it is part of the initial model the seed history is replayed from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedtune import adapters, prototypes, workspace
from fedtune.config import FedtuneConfig
from fedtune.delta import Delta
from fedtune.env import setup_environment
from fedtune.errors import FedtuneError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.records import wire_bytes
from fedtune.flower.transport import send_and_receive
from fedtune.rundir import atomic_write_bytes
from fedtune.runlog import short_reason

HEAD_FILE = "prototype_head.bin"
STATS_KEY = "stats"


def handle_prototype_stats(msg: Message, context: Context, cfg: FedtuneConfig) -> Message:
    """A client's per-class means and counts of its training examples' pooled features (untuned adapter)."""
    from fedtune.flower.client import local_data

    if cfg.adapter.head_init != "prototypes":  # class means of raw data leave only when the run says so
        raise ValueError(f"server asked for class prototypes but adapter.head_init is {cfg.adapter.head_init!r}")
    setup_environment()
    torch.set_num_threads(cfg.simulation.threads_per_client)
    ws = workspace.get(cfg)
    pid, data = local_data(ws, context, cfg)
    if cfg.train.mode == "zo":  # the initial model as ZO rounds know it (scope "full" may have moved base weights)
        from fedtune.flower.zo_client import initial_params, load_params_

        load_params_(ws, cfg.zo.scope, initial_params(ws, cfg.zo.scope))
    else:
        adapters.set_state_(ws.model, ws.initial_state())
    stats = prototypes.data_stats(
        ws.model,
        data,
        pad_id=ws.pad_id,
        task=ws.task,
        num_classes=ws.num_labels,
        batch_size=cfg.train.eval_batch_size,
    )
    reply = RecordDict(
        {
            P.PROTOTYPES: ConfigRecord({STATS_KEY: prototypes.encode_stats(stats)}),
            P.METRICS: MetricRecord({"num-examples": len(data), "partition-id": pid}),
        }
    )
    return Message(reply, reply_to=msg)


def head_from_payload(model, payload: bytes) -> Delta:
    """The head (adapter-state keys) from its wire bytes."""
    return prototypes.head_state(model, *prototypes.decode_head(payload))


class HeadInit:
    """The server's side: the exchange before round 1, and the head in checkpoints and the run directory."""

    def __init__(self, cfg: FedtuneConfig):
        self.cfg = cfg
        self.payload: bytes | None = None  # the head as sent (encode_head)

    def run(self, grid, ws: workspace.Workspace, identities, protocol) -> dict[str, Any]:
        """Ask every available node, install the head into ``protocol``; returns the round-0 row's fields."""
        shape = prototypes.head_shape(ws.model)  # a model without a fitting head is refused before any node is asked
        nodes = list(grid.get_node_ids())
        identities.learn(grid, nodes, timeout=self.cfg.federation.round_timeout)
        nodes = identities.order(nodes)
        msgs = [
            Message(
                RecordDict(
                    {
                        P.CONFIG: ConfigRecord({"server-round": 0}),
                        P.PROTOTYPES: ConfigRecord({"request": "class-means"}),
                    }
                ),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in nodes
        ]
        down = {m.metadata.dst_node_id: wire_bytes(m.content) for m in msgs}
        replies = send_and_receive(grid, msgs, timeout=self.cfg.federation.round_timeout) if msgs else []
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        up: dict[int, int] = {}
        rejected: list[dict] = []
        got: dict[int, prototypes.ClassStats] = {}
        for r in replies:
            node = sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            if node in got or node in up or node not in down:
                continue  # a second reply, or one for a node never asked
            if r.has_error():
                rejected.append({"node": node, "reason": short_reason(r.error.reason)})
                continue
            up[node] = wire_bytes(r.content)
            try:
                got[node] = prototypes.decode_stats(bytes(r.content[P.PROTOTYPES][STATS_KEY]), *shape)
            except (PayloadError, KeyError, TypeError, ValueError) as exc:
                rejected.append({"node": node, "reason": str(exc)})
        answered = set(up) | {r["node"] for r in rejected}
        rejected += [
            {"node": n, "reason": "no reply within federation.round_timeout"} for n in nodes if n not in answered
        ]
        if not got:
            raise FedtuneError(
                f"adapter.head_init: no node sent class prototypes ({len(nodes)} asked; "
                f"{[r['reason'] for r in rejected][:3]}); no head to start from (got 'prototypes')"
            )
        stats = prototypes.total(got[n] for n in nodes if n in got)  # partition-id order: reproducible sums
        try:
            weight, bias = prototypes.head_from_stats(stats)
        except ValueError as exc:
            raise FedtuneError(f"adapter.head_init: {exc} among the {len(got)} nodes that answered") from None
        self.payload = prototypes.encode_head(weight, bias)
        protocol.install_head(head_from_payload(ws.model, self.payload))  # exactly what the clients decode
        return {
            "bytes_up": sum(up.values()),
            "bytes_down": sum(down.values()),
            "bytes_up_per_client": {str(k): v for k, v in up.items()},
            "bytes_down_per_client": {str(k): v for k, v in down.items()},
            "head_init": {
                "method": "prototypes (nearest class mean, float16 means up, float16 weight + float32 bias down)",
                "asked": len(nodes),
                "answered": len(got),
                "rejected": rejected,
                "examples_per_class": stats.counts.tolist(),
                "head_bytes": len(self.payload),
            },
        }

    def save(self, directory: Path) -> None:
        if self.payload is not None:
            (directory / HEAD_FILE).write_bytes(self.payload)

    def load(self, directory: Path, ws: workspace.Workspace, protocol) -> None:
        """A resumed run's head: the one its checkpoint holds (no second exchange)."""
        path = directory / HEAD_FILE
        if not path.is_file():
            raise FedtuneError(f"--resume: {directory} holds no {HEAD_FILE} (adapter.head_init = 'prototypes')")
        self.payload = path.read_bytes()
        protocol.install_head(head_from_payload(ws.model, self.payload))

    def finish(self, run_dir: Path) -> None:
        if self.payload is not None:
            atomic_write_bytes(Path(run_dir) / HEAD_FILE, self.payload)


__all__ = ["HEAD_FILE", "HeadInit", "handle_prototype_stats", "head_from_payload"]
