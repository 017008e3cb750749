"""Local simulation of many clients on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedtune import models, workspace
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError, FedtuneError


def preflight(cfg: FedtuneConfig) -> None:
    """Check model, data and partition before any process starts (`fedtune.workspace.check_data`)."""
    resolved = workspace.check_data(cfg)
    if resolved.name == "smollm2":
        models.smollm2_checkpoint()  # convert once here, not concurrently in every worker


# Flower sweeps every 0.1 s, when a sweep cost O(nodes x messages); one costs O(messages) here
DISPATCH_INTERVAL_S = 0.01


def pending_nodes(state: Any) -> set[int] | None:
    """Destination nodes with an undelivered message in an in-memory LinkState, in one pass.

    None when ``state`` is not the in-memory LinkState this reads (another
    Flower version or backend): the caller then asks every node, as Flower does.
    """
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        return {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Mapping[int, int], f_stop: threading.Event) -> None:
    """Flower 1.41's simulation dispatch loop (``vce_api.add_messages_to_queue``), O(messages) per sweep.

    Flower's loop asks the LinkState for one message per registered node every
    0.1 s, and each ask scans every stored message under the state's lock: with
    1000 virtual nodes a sweep took ~0.1 s of GIL-holding work (BENCHMARKS.md,
    scaling), so round time grew with the number of clients although only 10
    were sampled. This loop finds the nodes that have a message in one scan and
    asks only those, in the same node order and with the same ``limit=1``.
    """
    rank = {node: i for i, node in enumerate(nodes_mapping.keys())}
    while not f_stop.is_set():
        dispatch_sweep(state, queue, rank)
        f_stop.wait(DISPATCH_INTERVAL_S)


def dispatch_sweep(state: Any, queue: Any, rank: Mapping[int, int]) -> None:
    """One sweep: at most one undelivered message per node, into ``queue``.

    ``rank`` maps every registered node to its position; nodes are served in
    that order (Flower's: the nodes mapping's).
    """
    pending = pending_nodes(state)
    nodes = rank.keys() if pending is None else sorted((n for n in pending if n in rank), key=rank.__getitem__)
    for node_id in nodes:
        for msg in state.get_message_ins(node_id=node_id, limit=1):
            queue.put(msg)


def backend_config(cfg: FedtuneConfig) -> dict[str, Any]:
    cpus = cfg.simulation.cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": cfg.simulation.gpus_per_client},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
        },
    }


def simulate(
    cfg: FedtuneConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    resume: bool = False,
    dispatch: Callable[..., None] | None = add_messages_to_queue,
) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.federation.num_clients`` virtual clients; return the summary.

    ``dispatch``: the simulation engine's message dispatch loop for this run
    (Flower's ``vce_api.add_messages_to_queue`` signature); fedtune's
    `add_messages_to_queue` by default, None keeps Flower's own.
    """
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.simulation import run_simulation

    from fedtune.flower.apps import make_client_app, make_server_app

    preflight(cfg)
    result: dict[str, Any] = {}
    if resume and cfg.aggregation.secure != "none":
        raise ConfigError("--resume is not supported with aggregation.secure = 'secagg+'")
    server_app = make_server_app(cfg, out_dir, progress, result, resume=resume)  # SecAgg+ included
    client_app = make_client_app(cfg)
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    flower_dispatch = vce_api.add_messages_to_queue
    if dispatch is not None:
        vce_api.add_messages_to_queue = dispatch
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    finally:
        vce_api.add_messages_to_queue = flower_dispatch
        flwr_logger.setLevel(old_level)
    if not result:
        raise FedtuneError("the simulation ended without finishing the run; see the log above")
    return result
