"""Sending a round's messages and collecting the replies, without Flower's coarse polling.

Flower 1.41's ``Grid.send_and_receive`` pushes the messages, then sleeps
between pulls for replies: 3 s in a deployment (``http_grid``) and 0.1 s in
simulation (``InMemoryGrid.pull_interval``), so a round whose replies are all in
still waits up to that long. `send_and_receive` pulls after 5 ms and doubles the
interval up to 0.1 s: fast rounds end as soon as their replies arrive, long
ones cost at most ten cheap pulls a second.

In a deployment a reply is visible at the SuperLink as soon as its SuperNode has
sent the message header, before the SuperNode has pushed the reply's objects
(one per tensor); Flower's grid then retries a missing object after 1 s, then
2 s, ... A pull within milliseconds of the reply meets that case nearly every
round, so `shorten_object_retries` makes the grid retry after 5 ms, doubling up
to 0.1 s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from functools import partial

from flwr.app import Message

FIRST_POLL_S = 0.005
MAX_POLL_S = 0.1
OBJECT_FIRST_BACKOFF_S = 0.005
OBJECT_BACKOFF_CAP_S = 0.1


def shorten_object_retries(grid) -> bool:
    """Make the module of ``grid``'s class (flwr 1.41's ``http_grid``, the deployment's) retry a reply
    object the SuperLink does not hold yet after `OBJECT_FIRST_BACKOFF_S` s, doubling up to
    `OBJECT_BACKOFF_CAP_S`, instead of Flower's 1 s doubling up to 10 s. True if that module pulls
    objects that way (now or already); grids that do not (simulation, fedtune's `LocalGrid`) are
    left alone."""
    module = sys.modules.get(type(grid).__module__)
    pull = getattr(module, "pull_objects", None)
    if isinstance(pull, partial):
        return True
    if not callable(pull):
        return False
    module.pull_objects = partial(pull, initial_backoff=OBJECT_FIRST_BACKOFF_S, backoff_cap=OBJECT_BACKOFF_CAP_S)
    return True


def send_and_receive(grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """``grid.send_and_receive`` with a short, growing poll interval; same contract.

    Returns the replies that arrived within ``timeout`` seconds (None: wait for
    all). A grid without ``push_messages``/``pull_messages`` (fedtune's
    in-process `LocalGrid`) uses its own ``send_and_receive``.
    """
    push, pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
    if push is None or pull is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    shorten_object_retries(grid)
    pending = set(push(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL_S
    last = False
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or last:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            # one more pull: a pull can block for long on one reply whose objects never come (its
            # sender died mid-upload) while others arrive in time; those still count
            last = True
            continue
        time.sleep(wait if left is None else min(wait, left))
        wait = min(2 * wait, MAX_POLL_S)
    return replies


__all__ = ["send_and_receive", "shorten_object_retries", "FIRST_POLL_S", "MAX_POLL_S"]
