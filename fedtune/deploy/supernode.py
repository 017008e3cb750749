"""``flower-supernode`` with its fixed sleeps shortened and its fault recovery quickened (flwr 1.41).

flwr 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) pulls
the SuperLink for a message and, when there is none, sleeps a fixed 3 s before
the next pull; it then checks every 0.5 s whether its ClientApp has replied
and whether each reply object is stored. Between two rounds of a run the
SuperNode pushes its reply and pulls at once, finds nothing (the server is
still aggregating), and sleeps 3 s: every warm round took about 3 s more than
its work (BENCHMARKS.md, "Deployment and simulation overhead"). Flower exposes
none of these intervals (no flag, no environment variable).

This script runs Flower's own ``flower-supernode`` (same arguments, same code)
with those sleeps replaced by `PollClock`: after a pull that found a message the
next empty pulls wait 20 ms, doubling up to 0.25 s for a minute (a run is going
on: its next round comes once the server has aggregated and evaluated), then up
to Flower's 3 s, so an idle SuperNode pulls as rarely as Flower's and one in a
run finds the next round within a quarter of a second; the reply checks wait
10 ms (they read the SuperNode's own local state, not the network). A message object the SuperLink does not hold yet is
asked for again after 5 ms instead of Flower's 1 s. ``fedtune deploy supernode``
starts it; ``--flower-polling`` starts the unmodified ``flower-supernode``.

Three more of Flower's fixed values decide how a deployment recovers from a
fault, and the launcher sets them too (`install_connection`):

- the heartbeat interval the SuperNode announces and keeps: 10 s (flwr 1.41's
  minimum) instead of 30 s. The SuperLink reports a silent SuperNode (a killed
  process, a dead machine) after 2 intervals: to the ServerApp as
  NODE_UNAVAILABLE, and by accepting the node's key again, in 20 s instead of 60 s;
- the longest wait between reconnection attempts: 5 s instead of 20 s, so the
  SuperNodes are back within seconds of a SuperLink restart;
- a refused activation (code 2004, "Failed to activate SuperNode") is asked again,
  every 2 s at most, for `ACTIVATION_PATIENCE_S`: the SuperLink refuses a key that is not
  registered, but also the key of a node it still counts online, which is what
  a SuperNode restarted after a crash meets until those 2 intervals have passed.
  Flower gives up at once; the launcher says which two causes it can be, asks
  again, and then rejoins with the same node ID (or gives up as Flower would).

It relies on three names of flwr 1.41's loop module (``time``,
``_pull_and_store_message``, ``pull_objects``), two of its connection module
(``HEARTBEAT_DEFAULT_INTERVAL``, ``make_simple_http_retry_invoker``), one of
``flwr.supercore.heartbeat`` and on Flower's own values; with another flwr
version, or when those are not found, it says so and runs Flower's SuperNode
unchanged.

    python .../fedtune/deploy/supernode.py --superlink HOST:PORT ... (flower-supernode's arguments)
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

__all__ = [
    "PollClock",
    "activation_refused",
    "capped_backoff",
    "install",
    "is_unauthorized",
    "is_unrecognized",
    "install_connection",
    "main",
    "patient_invoker",
    "FIRST_IDLE_S",
    "BUSY_CAP_S",
    "BUSY_WINDOW_S",
    "MAX_IDLE_S",
    "REPLY_CHECK_S",
    "HEARTBEAT_S",
    "RECONNECT_CAP_S",
    "ACTIVATION_PATIENCE_S",
    "ACTIVATION_RETRY_S",
]

# Flower's fixed sleeps in flwr 1.41's SuperNode loop: after an empty pull; while waiting for
# the ClientApp's reply (and for each reply object)
FLOWER_IDLE_S = 3
FLOWER_REPLY_S = 0.5

FIRST_IDLE_S = 0.02
BUSY_CAP_S = 0.25  # between pulls within BUSY_WINDOW_S of the last message (a run is going on)
BUSY_WINDOW_S = 60.0
MAX_IDLE_S = 3.0  # as Flower's: an idle SuperNode costs the SuperLink no more than Flower's does
REPLY_CHECK_S = 0.01
OBJECT_FIRST_BACKOFF_S = 0.005
OBJECT_BACKOFF_CAP_S = 0.1
SUPPORTED = "1.41."

FLOWER_HEARTBEAT_S = 30  # flwr 1.41's HEARTBEAT_DEFAULT_INTERVAL
HEARTBEAT_S = 10  # flwr 1.41's HEARTBEAT_MIN_INTERVAL: the least the SuperLink accepts
HEARTBEAT_PATIENCE = 2  # flwr's: a node is offline 2 intervals after its last heartbeat
RECONNECT_FIRST_S = 1.0  # Flower's first back-off, doubling ...
RECONNECT_CAP_S = 5.0  # ... up to this (Flower's: MAX_RETRY_DELAY, 20 s), each wait drawn in [0, it]
# a restarted node's key is accepted again HEARTBEAT_PATIENCE intervals after its last
# heartbeat; a few seconds more for the jittered retries
ACTIVATION_PATIENCE_S = HEARTBEAT_PATIENCE * HEARTBEAT_S + 5.0
ACTIVATION_RETRY_S = 2.0  # after a refused activation, the next attempt within this (drawn in [0, it])
ACTIVATION_FAILED = 2004  # flwr's ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED


class PollClock:
    """Stands in for the ``time`` module of Flower's SuperNode loop.

    ``sleep(3)`` (after a pull found nothing) waits `FIRST_IDLE_S`, then twice as
    long at each further empty pull: up to `BUSY_CAP_S` while the last message
    came less than `BUSY_WINDOW_S` ago (a run is active: the next round is due
    once the server has aggregated and evaluated), up to Flower's `MAX_IDLE_S`
    after that. `activity` (a pull found a message) starts over. ``sleep(0.5)``
    (waiting for the local reply) waits `REPLY_CHECK_S`. Other durations, and
    every other attribute, are ``time``'s.
    """

    def __init__(
        self,
        *,
        first: float = FIRST_IDLE_S,
        busy_cap: float = BUSY_CAP_S,
        busy_window: float = BUSY_WINDOW_S,
        cap: float = MAX_IDLE_S,
        reply_check: float = REPLY_CHECK_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 < first <= busy_cap <= cap:
            raise ValueError(
                f"first, busy_cap, cap: expected 0 < first <= busy_cap <= cap, got {first!r}, {busy_cap!r}, {cap!r}"
            )
        self.first, self.busy_cap, self.busy_window, self.cap = first, busy_cap, busy_window, cap
        self.reply_check, self._sleep, self._clock = reply_check, sleep, clock
        self.next_idle = first
        self.last_activity = -float("inf")  # idle until the first message

    def activity(self) -> None:
        self.next_idle, self.last_activity = self.first, self._clock()

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            busy = self._clock() - self.last_activity < self.busy_window
            seconds = self.next_idle
            self.next_idle = min(2 * self.next_idle, self.busy_cap if busy else self.cap)
        elif seconds == FLOWER_REPLY_S:
            seconds = self.reply_check
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(loop_module: Any, clock: PollClock) -> bool:
    """Make ``loop_module`` (flwr's ``start_client_internal``) sleep on ``clock``, tell the clock when
    a pull brought a message, and retry a message object the SuperLink does not hold yet after
    `OBJECT_FIRST_BACKOFF_S` instead of Flower's 1 s (the ServerApp pushes a message before its
    objects; a SuperNode that pulls within milliseconds can get there first). False, and nothing
    changed, if the module is not the one expected."""
    pull = getattr(loop_module, "_pull_and_store_message", None)
    pull_objects = getattr(loop_module, "pull_objects", None)
    if getattr(loop_module, "time", None) is not time or not callable(pull) or not callable(pull_objects):
        return False
    loop_module.pull_objects = partial(
        pull_objects, initial_backoff=OBJECT_FIRST_BACKOFF_S, backoff_cap=OBJECT_BACKOFF_CAP_S
    )

    def pull_and_store_message(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.activity()
        return run_id

    loop_module._pull_and_store_message = pull_and_store_message
    loop_module.time = clock
    return True


def capped_backoff(first: float = RECONNECT_FIRST_S, cap: float = RECONNECT_CAP_S) -> Iterator[float]:
    """``first``, twice that, ... up to ``cap``: the waits between reconnection attempts
    (Flower's invoker draws each actual wait in [0, w])."""
    wait = first
    while True:
        yield min(wait, cap)
        wait *= 2


def activation_refused(exc: BaseException | None) -> bool:
    """The SuperLink's answer to an ActivateNode it refuses (code 2004): the key is not
    registered, or the node is still online (httpx's ``HTTPStatusError`` with Flower's JSON)."""
    response = getattr(exc, "response", None)
    if type(exc).__name__ != "HTTPStatusError" or response is None:
        return False
    try:
        body = json.loads(response.text)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("code") == ACTIVATION_FAILED


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def patient_invoker(
    factory: Callable[[], Any],
    *,
    patience: float = ACTIVATION_PATIENCE_S,
    cap: float = RECONNECT_CAP_S,
    clock: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] = _say,
) -> Any:
    """Flower's retry invoker from ``factory`` (``make_simple_http_retry_invoker``), waiting at
    most ``cap`` between attempts and asking again for ``patience`` s after a refused activation
    (`activation_refused`), within `ACTIVATION_RETRY_S` each time, so that a restarted node is
    back within seconds of the SuperLink's verdict on its previous process; one line when the
    refusals start and one if activation then succeeds."""
    invoker = factory()
    giveup, succeeded = invoker.should_giveup, invoker.on_success
    refused_at: list[float] = []
    refusing = [False]

    def waits() -> Iterator[float]:
        backoff = capped_backoff(RECONNECT_FIRST_S, cap)
        while True:
            yield min(ACTIVATION_RETRY_S, cap) if refusing[0] else next(backoff)

    def should_giveup(exc: Exception) -> bool:
        refusing[0] = activation_refused(exc)
        if refusing[0]:
            now = clock()
            if not refused_at:
                refused_at.append(now)
                say(
                    "fedtune: the SuperLink refused to activate this SuperNode (code 2004): either its key is not "
                    "registered (`fedtune deploy register KEY.pub` on the coordinator's side), or the SuperLink "
                    "still counts this node online because its previous process stopped uncleanly (for up to "
                    f"{HEARTBEAT_PATIENCE * HEARTBEAT_S} s, {HEARTBEAT_PATIENCE * FLOWER_HEARTBEAT_S} s if it ran "
                    f"Flower's own SuperNode); asking again for {patience:.0f} s"
                )
            if now - refused_at[0] < patience:
                return False
        return bool(giveup(exc)) if giveup is not None else False

    def on_success(state: Any) -> None:
        if len(refused_at) == 1:
            refused_at.append(clock())
            say(
                f"fedtune: the SuperLink activated this SuperNode {refused_at[1] - refused_at[0]:.0f} s after "
                "refusing it (its key is registered now, or it no longer counts a previous process online)"
            )
        if succeeded is not None:
            succeeded(state)

    invoker.wait_gen_factory = waits
    invoker.should_giveup, invoker.on_success = should_giveup, on_success
    return invoker


def install_connection(conn_module: Any, heartbeat_module: Any, **patient: Any) -> bool:
    """Make ``conn_module`` (flwr's ``flwr.supernode.fleet_http_connection``) announce and keep
    `HEARTBEAT_S` heartbeats (``heartbeat_module``: ``flwr.supercore.heartbeat``, whose sender
    reads the interval) and retry through `patient_invoker` (``patient``: its keywords). False,
    and nothing changed, if the modules are not the ones expected."""
    factory = getattr(conn_module, "make_simple_http_retry_invoker", None)
    if (
        getattr(conn_module, "HEARTBEAT_DEFAULT_INTERVAL", None) != FLOWER_HEARTBEAT_S
        or getattr(heartbeat_module, "HEARTBEAT_DEFAULT_INTERVAL", None) != FLOWER_HEARTBEAT_S
        or not callable(factory)
    ):
        return False
    conn_module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S
    heartbeat_module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S
    conn_module.make_simple_http_retry_invoker = partial(patient_invoker, factory, **patient)
    return True


UNAUTHORIZED_MESSAGE = (
    "fedtune: the SuperLink refused this SuperNode's key (401 Unauthorized): it is not registered any more "
    "(`flwr supernode unregister`, or a SuperLink restarted without --database); have the coordinator run "
    "`fedtune deploy register KEY.pub` again, then restart this SuperNode"
)


def is_unauthorized(exc: BaseException | None) -> bool:
    """An HTTP 401 from the SuperLink (httpx's ``HTTPStatusError``, as Flower's Fleet client raises it)."""
    response = getattr(exc, "response", None)
    return type(exc).__name__ == "HTTPStatusError" and getattr(response, "status_code", None) == 401


def is_unrecognized(exc: BaseException | None) -> bool:
    """The heartbeat's other answer to a key the SuperLink dropped: a reply with ``success = False``,
    which flwr 1.41's sender raises as ``RuntimeError("... does not recognize this SuperNode.")``."""
    return isinstance(exc, RuntimeError) and "does not recognize this SuperNode" in str(exc)


def quiet_unauthorized(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``threading.excepthook`` that says `UNAUTHORIZED_MESSAGE` in one line instead of the traceback
    of Flower's heartbeat thread, and leaves every other exception to ``hook``. The thread dies of a
    401 (after it has told the SuperNode to stop) or, when the SuperLink dropped the key between two
    heartbeats, of `is_unrecognized`'s error (the SuperNode's next pull then meets the 401 and stops)."""

    def excepthook(args) -> None:
        if is_unauthorized(args.exc_value) or is_unrecognized(args.exc_value):
            print(UNAUTHORIZED_MESSAGE, file=sys.stderr, flush=True)
            return
        hook(args)

    return excepthook


def main(argv: Sequence[str] | None = None) -> int:
    from importlib.metadata import version

    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    flwr_version = version("flwr")
    supported = flwr_version.startswith(SUPPORTED)
    if not supported or not install(loop, PollClock()):
        print(
            f"fedtune: flwr {flwr_version}: running flower-supernode's own polling (3 s between pulls when idle); "
            f"fedtune's shorter polling is written for flwr {SUPPORTED}x",
            file=sys.stderr,
            flush=True,
        )
    if not supported or not install_connection(connection, heartbeat):
        print(
            f"fedtune: flwr {flwr_version}: running Flower's own heartbeat ({FLOWER_HEARTBEAT_S} s) and "
            f"reconnection; fedtune's are written for flwr {SUPPORTED}x",
            file=sys.stderr,
            flush=True,
        )
    threading.excepthook = quiet_unauthorized(threading.excepthook)
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    return flower_supernode() or 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # a script's own directory: its cli.py and certs.py are not modules of Flower's
    sys.exit(main())
