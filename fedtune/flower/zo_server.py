"""Zeroth-order rounds (FedKSeed) for the one server loop: the history is the model.

FedKSeed: Qin et al. 2024, arXiv:2312.06353. `SeedRounds` is the
`fedtune.flower.server.RoundProtocol` of ``train.mode = "zo"``: each sampled node
is sent the rounds of the seed history it lacks (never a tensor), replies with
(seed index, scalar) pairs; malformed replies are dropped (`decode_reply`), the
accepted ones are aggregated into one round entry weighted by num-examples (1 each
under ``aggregation.weighting = "uniform"``; the round's train loss takes the same
weights) (`fedtune.zo.aggregate_pairs`: FedAvg of the local updates), appended to the
history and replayed onto the server's copy of the tuned parameters, which
`ServerLoop` evaluates on the held-out split. Sampling, replies, rejections,
checkpoints, records and the summary are the loop's, as for dense rounds.

The checkpoint holds ``zo_history.bin`` (`fedtune.zo.encode_history`); the run
directory gets it too at the end: with the initial model it *is* the tuned model,
including base weights when ``zo.scope = "full"``, which the PEFT adapter export
does not hold.

Which round each node holds is tracked here: a node that answered round r (even with
an update that was then dropped) holds rounds 1..r-1; a node that answered with an
error, or was never seen (after a resume: every node), gets the whole history from
round 1 (its client replays from the initial model).

With ``adapter.head_init = "prototypes"`` the initial model has the prototype head
(`install_head`): a node that does not hold it yet (never answered, or answered with an
error) gets it in the ``zo`` record's ``head`` (`fedtune.prototypes.encode_head`), once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import adapters, workspace
from fedtune.config import FedtuneConfig
from fedtune.errors import FedtuneError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.zo_client import DOWNLINK_KEY, HEAD_KEY, UPLINK_KEY, initial_params, load_params_, read_params
from fedtune.rundir import atomic_write_bytes
from fedtune.workspace import export_adapter
from fedtune.zo import RoundEntry, SeedHistory, aggregate_pairs, decode_uplink, encode_downlink, replay_

HISTORY_FILE = "zo_history.bin"


def decode_reply(content: RecordDict, cfg) -> tuple[list[tuple[int, float]], float]:
    """(pairs, weight) from a client's reply; `PayloadError` says why it is dropped.

    The weight is ``aggregation.weighting``'s (`AggregationConfig.client_weight`); a reply
    still needs a positive finite ``num-examples`` under ``"uniform"``."""
    try:
        payload = content[P.ZO][UPLINK_KEY]
        metrics = content[P.METRICS]
        weight = float(metrics["num-examples"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"reply lacks the zo uplink or num-examples: {exc!r}") from None
    if not isinstance(payload, bytes):
        raise PayloadError(f"zo uplink must be bytes, got {type(payload).__name__}")
    if not (math.isfinite(weight) and weight > 0):
        raise PayloadError(f"metrics have no positive finite 'num-examples' (got {weight})")
    pairs = decode_uplink(payload, cfg.zo.pool(), max_pairs=cfg.zo.local_steps)
    clip = cfg.zo.grad_clip
    if clip > 0 and any(abs(s) > clip for _, s in pairs):
        raise PayloadError(f"a scalar exceeds zo.grad_clip = {clip} (clients skip such steps)")
    return pairs, cfg.aggregation.client_weight(weight)


class SeedRounds:
    """FedKSeed rounds: seed history down, (seed index, scalar) pairs up."""

    mode = "zeroth-order"

    def __init__(self, cfg: FedtuneConfig):
        self.cfg = cfg
        self.pool = cfg.zo.pool()
        self.history = SeedHistory(self.pool)
        self.node_round: dict[int, int] = {}
        self.head: bytes | None = None  # the prototype head as sent (adapter.head_init)
        self.has_head: set[int] = set()  # nodes that answered since it was installed: they hold it

    def setup(self, ws: workspace.Workspace) -> str:
        zo = self.cfg.zo
        self.ws = ws
        self.initial = initial_params(ws, zo.scope)
        self.current = {k: v.clone() for k, v in self.initial.items()}
        return (
            f"zeroth-order FedKSeed, scope {zo.scope}: {self.trainable_params():,} tuned params, "
            f"K={zo.num_seeds}, {zo.local_steps} local steps{' (Pro)' if zo.pro else ''}"
        )

    def install_head(self, head: dict[str, torch.Tensor]) -> None:
        from fedtune.prototypes import encode_head, head_keys

        wkey, bkey = head_keys(self.ws.model)
        self.head = encode_head(head[wkey], head[bkey])
        scope = self.cfg.zo.scope
        load_params_(self.ws, scope, self.initial)
        adapters.set_state_(self.ws.model, head)  # the same two calls as a client's (zo_client.start_params_)
        self.initial = read_params(self.ws, scope)
        self.current = {k: v.clone() for k, v in self.initial.items()}
        self.has_head.clear()

    def trainable_params(self) -> int:
        return sum(v.numel() for v in self.current.values())

    def global_state(self) -> dict[str, torch.Tensor]:
        load_params_(self.ws, self.cfg.zo.scope, self.current)  # the shared model may hold a client's local model
        return adapters.get_state(self.ws.model)

    def messages(self, rnd: int, nodes: list[int]) -> list[Message]:
        self.accepted: list[list[tuple[int, float]]] = []
        self.weights: list[float] = []
        self.losses: list[tuple[float, float]] = []
        return [
            Message(
                RecordDict({P.CONFIG: ConfigRecord({"server-round": rnd}), P.ZO: self.downlink(node)}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in nodes
        ]

    def downlink(self, node: int) -> ConfigRecord:
        record = ConfigRecord({DOWNLINK_KEY: encode_downlink(self.history, self.node_round.get(node, 0))})
        if self.head is not None and node not in self.has_head:
            record[HEAD_KEY] = self.head
        return record

    def failed(self, node: int) -> None:
        self.node_round.pop(node, None)  # its state is unknown: send everything next time
        self.has_head.discard(node)

    def receive(self, rnd: int, node: int, reply: Message) -> dict[str, float]:
        self.node_round[node] = rnd - 1
        if self.head is not None:
            self.has_head.add(node)  # it synced (stored the head) before it trained
        pairs, weight = decode_reply(reply.content, self.cfg)
        metrics = {k: float(v) for k, v in reply.content[P.METRICS].items()}
        self.accepted.append(pairs)
        self.weights.append(weight)
        if math.isfinite(metrics.get("train_loss", math.nan)):
            self.losses.append((weight, metrics["train_loss"]))
        return metrics

    def aggregate(self, rnd: int) -> tuple[dict[str, float], dict[str, Any]]:
        extra: dict[str, Any] = {}
        entry = RoundEntry.empty()
        if self.accepted:
            try:
                entry = aggregate_pairs(self.accepted, self.weights, self.pool.num_seeds)
            except PayloadError as exc:  # a float32 overflow of the mean: skip the round, keep the run
                extra["aggregation_error"] = str(exc)
        self.history.append_(entry)
        zo = self.cfg.zo
        replay_(load_params_(self.ws, zo.scope, self.current), self.history, rnd - 1, rnd, lr=zo.lr)
        self.current = read_params(self.ws, zo.scope)
        total = math.fsum(w for w, _ in self.losses)
        train = {"train_loss": math.fsum(w * v for w, v in self.losses) / total} if total > 0 else {}
        extra["zo"] = {"pairs": entry.nnz, "history_rounds": len(self.history)}
        return train, extra

    def save(self, directory: Path) -> None:
        (directory / HISTORY_FILE).write_bytes(self.history.to_bytes())

    def load(self, directory: Path) -> None:
        history = SeedHistory.from_bytes((directory / HISTORY_FILE).read_bytes(), self.pool)
        if len(history) > self.cfg.federation.rounds:
            raise FedtuneError(f"--resume: {directory} holds {len(history)} rounds, more than federation.rounds")
        self.history = history
        zo = self.cfg.zo
        replay_(load_params_(self.ws, zo.scope, self.current), history, lr=zo.lr)
        self.current = read_params(self.ws, zo.scope)
        self.node_round.clear()  # after a resume every node gets the whole history once
        self.has_head.clear()

    def export(self, adapter_dir: Path) -> None:
        export_adapter(self.ws, self.global_state(), adapter_dir)

    def finish(self, run_dir: Path) -> dict[str, Any]:
        # the tuned model is the initial one + this file, whether or not the adapter is exported
        data = self.history.to_bytes()
        atomic_write_bytes(run_dir / HISTORY_FILE, data)
        state = self.global_state()
        return {
            "aggregation": {"strategy": "FedKSeed (weighted mean of scalars)", **self.cfg.to_dict()["aggregation"]},
            "adapter_bytes_fp32": 4 * sum(state[k].numel() for k in self.ws.trainable_keys()),
            "zo": self.cfg.zo.to_dict(),
            "zo_history": {
                "rounds": len(self.history),
                "pairs": sum(e.nnz for e in self.history.entries),
                "bytes": len(data),
                "file": HISTORY_FILE,
            },
        }


__all__ = ["SeedRounds", "decode_reply", "HISTORY_FILE"]
