"""fedtune's simulation dispatch loop against Flower's own (vce_api.add_messages_to_queue)."""

import threading
from queue import Queue
from types import SimpleNamespace

from flwr.server.superlink.fleet.vce import vce_api

from fedtune.flower.simulation import add_messages_to_queue, dispatch_sweep, pending_nodes


class FakeLinkState:
    """The part of Flower's InMemoryLinkState the loops touch: a message store, its lock, and
    get_message_ins with Flower's semantics (undelivered messages for one node, marked delivered)."""

    def __init__(self, dsts):
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=d, delivered_at=""))
            for i, d in enumerate(dsts)
        }
        self.asked = []

    def get_message_ins(self, node_id, limit):
        self.asked.append(node_id)
        out = []
        with self.lock:
            for msg in self.message_ins_store.values():  # Flower scans every stored message per ask
                if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                    out.append(msg)
                if limit and len(out) == limit:
                    break
        for msg in out:
            msg.metadata.delivered_at = "now"
        return out


class Sweeps(threading.Event):
    """An f_stop that lets a dispatch loop run exactly ``n`` sweeps."""

    def __init__(self, n):
        super().__init__()
        self.left = n

    def is_set(self):
        self.left -= 1
        return self.left < 0

    def wait(self, timeout=None):
        return False


def run_loop(loop, dsts, nodes, sweeps):
    state, queue = FakeLinkState(dsts), Queue()
    loop(state, queue, {n: i for i, n in enumerate(nodes)}, Sweeps(sweeps))
    got = []
    while not queue.empty():
        got.append(queue.get())
    return state, [m.metadata.dst_node_id for m in got]


def test_same_messages_in_the_same_order_as_flowers_loop():
    nodes = list(range(1000, 0, -1))  # registration order is not numeric order
    dsts = [7, 3, 7, 999, 3, 7, 42]  # node 7 has three messages: one per sweep, as in Flower
    for sweeps in (1, 2, 3):
        _, mine = run_loop(add_messages_to_queue, dsts, nodes, sweeps)
        _, flowers = run_loop(vce_api.add_messages_to_queue, dsts, nodes, sweeps)
        assert mine == flowers, sweeps
    assert mine == [999, 42, 7, 3, 7, 3, 7]


def test_asks_only_the_nodes_that_have_a_message():
    state, queue = FakeLinkState([5, 9, 5]), Queue()
    dispatch_sweep(state, queue, {n: i for i, n in enumerate(range(1000))})
    assert state.asked == [5, 9] and queue.qsize() == 2
    assert pending_nodes(state) == {5}


def test_other_states_fall_back_to_asking_every_node():
    state = FakeLinkState([2])
    plain = SimpleNamespace(get_message_ins=state.get_message_ins)  # no store or lock to read
    assert pending_nodes(plain) is None
    queue = Queue()
    dispatch_sweep(plain, queue, {1: 0, 2: 1, 3: 2})
    assert state.asked == [1, 2, 3] and queue.qsize() == 1
