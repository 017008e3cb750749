"""Stable client identities, so that client sampling is reproducible.

Flower gives every node a random 64-bit id, new in every simulation run, so
sampling over sorted node ids picks different silos in two runs with the same
seed. Before sampling, the server asks each node it has not met yet for its
partition id (``node_config["partition-id"]``, set by the simulation engine
and by ``fedtune deploy supernode``) with one QUERY message, and samples over
partition ids. A node that does not answer is ordered after the identified
ones, by node id.

Under ``federation.sampling = "label-balanced"`` the same query also asks for the
node's count of training examples per class (``class-counts``), which the sampler
balances rounds with (`fedtune.flower.server.balanced_sample_nodes`); a node whose
counts do not come back is sampled as if its classes were the federation's mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.flower import protocol as P
from fedtune.flower.transport import send_and_receive

PARTITION_ID = "partition-id"
CLASS_COUNTS = "class-counts"


def identity_reply(msg: Message, node_config, class_counts: Callable[[], list[int]] | None = None) -> Message:
    """The ClientApp's answer to an identity query: its partition id, when it has one, and its
    training examples per class (``class_counts()``) when the query asks for them."""
    metrics = MetricRecord({})
    if PARTITION_ID in node_config:
        metrics[PARTITION_ID] = int(node_config[PARTITION_ID])
    if msg.content[P.CONFIG].get(CLASS_COUNTS, False):
        if class_counts is None:
            raise ValueError("the server asked for class counts, and this client has no labelled data to count")
        metrics[CLASS_COUNTS] = [int(c) for c in class_counts()]
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


class NodeIdentities:
    """node id -> partition id (or None), learned once per node with a QUERY message; with
    ``ask_counts``, node id -> training examples per class too (absent for a node that did not say)."""

    def __init__(self, ask_counts: bool = False) -> None:
        self.ask_counts = ask_counts
        self.known: dict[int, int | None] = {}
        self.class_counts: dict[int, list[int]] = {}

    def learn(self, grid, node_ids: Iterable[int], timeout: float | None = None) -> None:
        new = [n for n in node_ids if n not in self.known]
        if not new:
            return
        query = ConfigRecord({"ask": "identity", CLASS_COUNTS: self.ask_counts})
        ask = [Message(RecordDict({P.CONFIG: query}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in send_and_receive(grid, ask, timeout=timeout):
            if not (reply.has_content() and P.METRICS in reply.content):
                continue
            metrics, node = reply.content[P.METRICS], reply.metadata.src_node_id
            if PARTITION_ID in metrics:
                self.known[node] = int(metrics[PARTITION_ID])
            if CLASS_COUNTS in metrics:
                self.class_counts[node] = [int(c) for c in metrics[CLASS_COUNTS]]
        for n in new:
            self.known.setdefault(n, None)

    def order(self, node_ids: Iterable[int]) -> list[int]:
        """Node ids sorted by partition id (unidentified nodes last, by node id)."""

        def key(n: int) -> tuple[int, int, int]:
            pid = self.known.get(n)
            return (0, pid, n) if pid is not None else (1, n, 0)

        return sorted(node_ids, key=key)
