"""An in-process Grid: the server loop and client handlers in one process, no Ray.

Used by tests, debugging and the framework-overhead benchmark. It runs exactly
the code paths of a real run (messages, records, serialization sizes), only the
transport is a function call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict

from fedtune.flower.identity import identity_reply

ClientFn = Callable[[Message, Context], Message]


class LocalGrid:
    """Hands each message to ``client_fn`` with that node's persistent Context."""

    def __init__(
        self,
        num_nodes: int,
        client_fn: ClientFn,
        *,
        run_config: dict | None = None,
        fail: Callable[[int, int], bool] | None = None,
        node_ids: list[int] | None = None,
        class_counts: Callable[[Context], list[int]] | None = None,
    ):
        from flwr.supercore.task_identity import TaskIdentity

        # Messages take their run and task ids from the process identity a real runtime sets.
        for attr, value in (("run_id", 1), ("task_id", 1), ("node_id", 0)):
            if getattr(TaskIdentity, f"_{attr}") is None:
                setattr(TaskIdentity, attr, value)
        # node i holds partition i; Flower's node ids are random, pass some to test that
        self.node_ids = list(node_ids) if node_ids is not None else [1000 + i for i in range(num_nodes)]
        if len(self.node_ids) != num_nodes or len(set(self.node_ids)) != num_nodes:
            raise ValueError(f"node_ids: need {num_nodes} distinct ids, got {node_ids!r}")
        self.client_fn = client_fn
        self.fail = fail  # (node_id, round) -> True to simulate a crashed client
        self.class_counts = class_counts  # a node's answer to a query for its class counts
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, nid in enumerate(self.node_ids)
        }

    def _counter(self, context: Context) -> Callable[[], list[int]] | None:
        if self.class_counts is None:
            return None
        count = self.class_counts
        return lambda: count(context)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            context = self.contexts[nid]
            try:
                if msg.metadata.message_type == MessageType.QUERY:  # as a ClientApp's @app.query()
                    reply = identity_reply(msg, context.node_config, self._counter(context))
                else:
                    rnd = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
                    if self.fail and self.fail(nid, rnd):
                        raise RuntimeError("simulated client failure")
                    reply = self.client_fn(msg, context)
            except Exception as exc:  # as Flower does: an error reply, never a server crash
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(reply)
        return replies
