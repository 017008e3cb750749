"""A long-lived ClientApp process for a SuperNode in ``--isolation process`` mode.

With its default ``--isolation subprocess``, flwr 1.41's SuperNode starts a
``flower-superexec`` that launches a fresh ``flwr-clientapp`` process for every
message; each one imports torch, installs the FAB and rebuilds the model, which
made a round of the tiny model take about 30 s on two cores. ``flwr-clientapp``
itself serves exactly one task (``--token`` is required, it exits after
pushing the reply), so it cannot be kept alive.

In ``--isolation process`` mode the SuperNode launches nothing and waits for an
executor to claim its tasks over its local Runtime API (``--port``). This module
is that executor, and runs every claimed ClientApp task *in its own process*: the
same steps as ``flwr.supernode.runtime.run_clientapp`` (pull the message, context
and FAB with the task token, send task heartbeats, call the ClientApp, push the
reply and the updated context), without the final ``exit``. The ClientApp module,
torch and fedtune's per-process :mod:`fedtune.workspace` cache stay loaded, so
only the first message of a run pays for them.

A task from a different FAB (new app code) is handed to a fresh ``flwr-clientapp``
process, exactly as Flower's SuperExec would, and then this process re-executes
itself so the next tasks are served warm with the new code.

Run as ``python .../fedtune/deploy/worker.py --runtime-api-address 127.0.0.1:PORT``
(a script, not ``-m``, so that ``fedtune`` is not imported before the ClientApp:
like ``flwr-clientapp``, the worker then imports the fedtune shipped in the FAB);
``fedtune deploy supernode`` starts it next to ``flower-supernode``. This module
uses flwr internals of 1.41 (``flwr.supernode.runtime.run_clientapp``,
``flwr.supercore.runtime``); the SuperNode's Runtime API is plain HTTP on the
loopback interface, as with Flower's own SuperExec.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ClientAppWorker", "main"]

log = logging.getLogger("fedtune.deploy.worker")

_PRELOAD = ("torch", "transformers", "peft")

FIRST_POLL_S = 0.005  # AcquireTask right after a task; a local HTTP call to the SuperNode
POLL_CAP_S = 0.2  # between polls once idle
OBJECT_FIRST_BACKOFF_S = 0.005  # retry for a message object the SuperNode has not stored yet ...
OBJECT_BACKOFF_CAP_S = 0.1  # ... doubling up to this


class ClientAppWorker:
    """Claims CLIENT_APP tasks from one SuperNode and runs them in this process.

    Each claimed task gets a thread that pulls its input; the ClientApp calls
    themselves run one at a time (one model per process). The threads matter for
    a task whose message never completes: after a SuperLink restart, a message of
    the run that died with it can still be delivered; flwr 1.41's SuperNode then
    ignores it ("Run ID ... is not in `RUNNING` status") but leaves its task
    pending, and pulling its objects waits until ``input_patience``. Flower's
    process-per-task model is not blocked by it, and neither is this worker.
    """

    def __init__(self, runtime_api_address: str, *, poll_interval: float = POLL_CAP_S, input_patience: float = 600.0):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.input_patience = input_patience
        self.fab_hash: str | None = None  # the FAB whose ClientApp this process has imported
        self._app = None
        self._run_lock = threading.Lock()
        self._acquirer = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def acquire(self):
        """One pending ClientApp task and its token, or ``None``."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None

    def serve_forever(self) -> None:
        # right after a task the next one (the next round, SecAgg+'s next stage) is near: poll
        # after FIRST_POLL_S, doubling while none comes, up to poll_interval between polls
        wait = FIRST_POLL_S
        while True:
            got = self.acquire()
            if got is None:
                time.sleep(min(wait, self.poll_interval))
                wait = min(2 * wait, self.poll_interval)
                continue
            wait = FIRST_POLL_S
            task, token = got
            fab_hash = getattr(task, "fab_hash", "") or None
            if self.fab_hash is not None and fab_hash is not None and fab_hash != self.fab_hash:
                # New app code: modules of the old FAB are imported here; run this task the
                # way Flower would, then start over as a fresh process for the new FAB.
                log.info(
                    "task %d uses another FAB (%s); running it in a fresh flwr-clientapp, then restarting",
                    task.task_id,
                    fab_hash[:12],
                )
                with self._run_lock:
                    self.run_in_subprocess(token)
                    self._restart()  # does not return
            threading.Thread(target=self.run_task, args=(token,), name=f"task-{task.task_id}", daemon=True).start()

    def run_in_subprocess(self, token: str) -> int:
        exe = Path(sys.executable).with_name("flwr-clientapp")
        argv = [
            str(exe) if exe.is_file() else "flwr-clientapp",
            "--runtime-api-address",
            self.address,
            "--token",
            token,
            "--insecure",
            "--parent-pid",
            str(os.getpid()),
        ]
        return subprocess.run(argv, check=False).returncode

    def _restart(self) -> None:
        self._acquirer.close()
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])

    def _pull_input(self, client):
        """``flwr.supernode.runtime.run_clientapp.pull_task_input``, with a bounded wait
        for the message's objects, returning the task id instead of setting it globally."""
        from flwr.app import Message
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        res = client.PullTaskInput(PullTaskInputRequest())
        context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
            max_time=self.input_patience,
            # the task exists before the SuperNode has stored the message's objects (it creates the
            # task, then pulls them from the SuperLink): Flower's first retry comes after 1 s
            initial_backoff=OBJECT_FIRST_BACKOFF_S,
            backoff_cap=OBJECT_BACKOFF_CAP_S,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks it
        return message, context, run, fab, res.task_id

    def run_task(self, token: str) -> bool:
        """Run one claimed task; ``True`` if the ClientApp returned a reply without raising."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        t0 = t_input = t_app = time.monotonic()
        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=retry,
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab, task_id = self._pull_input(client)
            t_input = time.monotonic()
        except Exception as ex:  # noqa: BLE001 - no input, nothing to run; report the task failed
            log.warning("task input could not be pulled: %s", ex)
            details = f"Pulling the task input failed: {ex}"
        with self._run_lock:
            t_run = time.monotonic()
            try:
                if message is not None:
                    # messages built from here on (the reply) are stamped with this task
                    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
                        task_id,
                        context.run_id,
                        context.node_id,
                    )
                    if self._app is None or fab.hash_str != self.fab_hash:
                        install_from_fab(fab.content, skip_prompt=True)
                        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
                        self._app = load(run.fab_id, run.fab_version, fab.hash_str)
                        self.fab_hash = fab.hash_str
                    reply = self._app(message=message, context=context)
                    t_app = time.monotonic()
                    sub_status, details = SubStatus.COMPLETED, ""
            except Exception as ex:  # the same error reply run_clientapp sends; the worker lives on
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                if isinstance(ex, LoadClientAppError):
                    code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                    reason = "An exception was raised when attempting to load `ClientApp`"
                    self._app = None
                log.error("ClientApp raised an exception", exc_info=ex)
                details = reason
                reply = Message(Error(code=code, reason=reason), reply_to=message)
            finally:
                try:
                    if reply is not None and context is not None:
                        push_message(client, reply, context)
                except Exception as ex:  # noqa: BLE001 - keep serving; the server counts a missing reply
                    log.error("failed to push the reply", exc_info=ex)
                    sub_status = SubStatus.FAILED
                retry.max_tries = 1
                push_task_output(client=client, context=context, sub_status=sub_status, details=details)
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
        what = message.metadata.message_type if message is not None else "?"
        done = time.monotonic()
        log.info(
            "%s task done in %.2f s: input %.2f s, queued %.2f s, ClientApp %.2f s, reply %.2f s (%s)",
            what,
            done - t0,
            t_input - t0,
            max(0.0, t_run - t_input),
            max(0.0, t_app - t_run),
            max(0.0, done - t_app),
            sub_status,
        )
        return sub_status == SubStatus.COMPLETED


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="worker.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runtime-api-address",
        required=True,
        metavar="HOST:PORT",
        help="the SuperNode's local Runtime API (its --host/--port)",
    )
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=POLL_CAP_S,
        help=f"most seconds between task polls when idle (default {POLL_CAP_S}); "
        f"{FIRST_POLL_S} s right after a task, doubling",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    for name in _PRELOAD:  # third-party libraries, never the app's own code: imported while idle
        try:
            __import__(name)
        except ImportError:
            pass
    log.info("serving ClientApp tasks of the SuperNode at %s in process %d", args.runtime_api_address, os.getpid())
    try:
        ClientAppWorker(args.runtime_api_address, poll_interval=args.poll_interval).serve_forever()
    except KeyboardInterrupt:  # SIGINT, also from the parent-process monitor
        return 0
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # a script's own directory; the app's modules must not meet cli.py or certs.py
    sys.exit(main())
