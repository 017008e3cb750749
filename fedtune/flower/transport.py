"""Sending a round's messages and collecting the replies, without Flower's coarse polling.

Flower 1.41's ``Grid.send_and_receive`` pushes the messages, then sleeps
between pulls for replies: 3 s in a deployment (``http_grid``) and 0.1 s in
simulation (``InMemoryGrid.pull_interval``), so a round whose replies are all in
still waits up to that long. `send_and_receive` pulls after 5 ms and doubles the
interval up to 0.1 s: fast rounds end as soon as their replies arrive, long
ones cost at most ten cheap pulls a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message

FIRST_POLL_S = 0.005
MAX_POLL_S = 0.1


def send_and_receive(grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """``grid.send_and_receive`` with a short, growing poll interval; same contract.

    Returns the replies that arrived within ``timeout`` seconds (None: wait for
    all). A grid without ``push_messages``/``pull_messages`` (fedtune's
    in-process `LocalGrid`) uses its own ``send_and_receive``.
    """
    push, pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
    if push is None or pull is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(push(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL_S
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        time.sleep(wait if left is None else min(wait, left))
        wait = min(2 * wait, MAX_POLL_S)
    return replies


__all__ = ["send_and_receive", "FIRST_POLL_S", "MAX_POLL_S"]
