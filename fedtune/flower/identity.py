"""Stable client identities, so that client sampling is reproducible.

Flower gives every node a random 64-bit id, new in every simulation run, so
sampling over sorted node ids picks different silos in two runs with the same
seed. Before sampling, the server asks each node it has not met yet for its
partition id (``node_config["partition-id"]``, set by the simulation engine
and by ``fedtune deploy supernode``) with one QUERY message, and samples over
partition ids. A node that does not answer is ordered after the identified
ones, by node id.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.flower import protocol as P
from fedtune.flower.transport import send_and_receive

PARTITION_ID = "partition-id"


def identity_reply(msg: Message, node_config) -> Message:
    """The ClientApp's answer to an identity query: its partition id, when it has one."""
    metrics = MetricRecord({})
    if PARTITION_ID in node_config:
        metrics[PARTITION_ID] = int(node_config[PARTITION_ID])
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


class NodeIdentities:
    """node id -> partition id (or None), learned once per node with a QUERY message."""

    def __init__(self) -> None:
        self.known: dict[int, int | None] = {}

    def learn(self, grid, node_ids: Iterable[int], timeout: float | None = None) -> None:
        new = [n for n in node_ids if n not in self.known]
        if not new:
            return
        ask = [
            Message(
                RecordDict({P.CONFIG: ConfigRecord({"ask": "identity"})}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in new
        ]
        for reply in send_and_receive(grid, ask, timeout=timeout):
            if reply.has_content() and P.METRICS in reply.content and PARTITION_ID in reply.content[P.METRICS]:
                self.known[reply.metadata.src_node_id] = int(reply.content[P.METRICS][PARTITION_ID])
        for n in new:
            self.known.setdefault(n, None)

    def order(self, node_ids: Iterable[int]) -> list[int]:
        """Node ids sorted by partition id (unidentified nodes last, by node id)."""

        def key(n: int) -> tuple[int, int, int]:
            pid = self.known.get(n)
            return (0, pid, n) if pid is not None else (1, n, 0)

        return sorted(node_ids, key=key)
