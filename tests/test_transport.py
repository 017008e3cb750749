"""fedtune.flower.transport.send_and_receive: Flower's Grid contract, without its 3-s / 0.1-s sleeps."""

import time
from types import SimpleNamespace

from fedtune.flower.transport import MAX_POLL_S, send_and_receive


class FakeGrid:
    """push_messages / pull_messages of a Grid; node ``n``'s reply is ready ``delay[n]`` s after the push."""

    def __init__(self, delay):
        self.delay, self.pulls, self.t0 = delay, 0, None

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        self.sent = {f"id{m.dst}": m.dst for m in messages}
        return list(self.sent)

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), node=self.sent[i])
            for i in ids
            if self.delay[self.sent[i]] is not None and self.delay[self.sent[i]] <= now
        ]

    def send_and_receive(self, messages, *, timeout=None):  # never used when push/pull exist
        raise AssertionError("fell back to Grid.send_and_receive")


def msgs(*nodes):
    return [SimpleNamespace(dst=n) for n in nodes]


def test_returns_as_soon_as_every_reply_is_in():
    grid = FakeGrid({1: 0.0, 2: 0.0})
    t0 = time.monotonic()
    replies = send_and_receive(grid, msgs(1, 2), timeout=30)
    assert sorted(r.node for r in replies) == [1, 2] and grid.pulls == 1
    assert time.monotonic() - t0 < 0.05


def test_a_late_reply_is_picked_up_within_one_poll_interval():
    grid = FakeGrid({1: 0.0, 2: 0.3})
    t0 = time.monotonic()
    replies = send_and_receive(grid, msgs(1, 2), timeout=30)
    took = time.monotonic() - t0
    assert sorted(r.node for r in replies) == [1, 2]
    assert 0.3 <= took < 0.3 + MAX_POLL_S + 0.15  # Flower's http grid: up to 3 s later


def test_timeout_returns_the_replies_that_arrived():
    grid = FakeGrid({1: 0.0, 2: None})  # node 2 never answers
    t0 = time.monotonic()
    replies = send_and_receive(grid, msgs(1, 2), timeout=0.4)
    assert [r.node for r in replies] == [1]
    assert 0.4 <= time.monotonic() - t0 < 0.6


def test_grids_without_push_and_pull_use_their_own():
    seen = {}
    grid = SimpleNamespace(send_and_receive=lambda m, timeout: seen.setdefault("t", timeout) and ["r"])
    assert send_and_receive(grid, msgs(1), timeout=7) == ["r"] and seen == {"t": 7}


class StallingGrid(FakeGrid):
    """The first pull blocks past the timeout (a reply whose objects never come, as when its
    sender dies mid-upload) while node 2's reply arrives during it."""

    def pull_messages(self, ids):
        if self.pulls == 0:
            self.pulls += 1
            time.sleep(0.5)
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="id1"), node=1)]
        return super().pull_messages(ids)


def test_a_reply_that_arrived_while_a_pull_blocked_past_the_timeout_still_counts():
    grid = StallingGrid({1: 0.0, 2: 0.1, 3: None})  # node 3 never answers
    replies = send_and_receive(grid, msgs(1, 2, 3), timeout=0.3)
    assert sorted(r.node for r in replies) == [1, 2] and grid.pulls == 2
