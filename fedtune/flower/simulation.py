"""Simulation of many clients on Flower's simulation engine (Ray backend): on this machine, or on an
existing Ray cluster (``simulation.ray_address``)."""

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
    """Flower's Ray backend settings: ``init_args`` go to ``ray.init``, ``client_resources``
    to every ClientApp actor.

    Without ``simulation.ray_address`` the run starts its own Ray on this machine with
    ``simulation.cpus`` CPUs (default: all). With it, ``ray.init`` joins that cluster
    (``address``) and takes no resource arguments: Ray refuses them when joining, and the
    cluster's nodes bring their own. Flower then fits ``client_resources`` on each node
    separately (``pool_size_from_resources``), so a client never spans two nodes.
    """
    sim = cfg.simulation
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        init_args["num_cpus"] = sim.cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client},
        "init_args": init_args,
    }


def simulate(
    cfg: FedtuneConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    resume: bool = False,
    dispatch: Callable[..., None] | None = add_messages_to_queue,
    client_app: Any = None,
) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.federation.num_clients`` virtual clients; return the summary.

    ``dispatch``: the simulation engine's message dispatch loop for this run
    (Flower's ``vce_api.add_messages_to_queue`` signature); fedtune's
    `add_messages_to_queue` by default, None keeps Flower's own.
    ``client_app``: the Flower ClientApp the clients run (default: fedtune's,
    ``make_client_app(cfg)``), e.g. fedtune's wrapped with mods.

    With ``simulation.ray_address`` the clients run on that Ray cluster's nodes and
    this process is its driver (the ServerApp runs here); the connection is closed
    when the run ends, the cluster keeps running.
    """
    import ray
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.simulation import run_simulation

    from fedtune.flower.apps import make_client_app, make_server_app

    preflight(cfg)
    result: dict[str, Any] = {}
    if resume and cfg.aggregation.secure != "none":
        raise ConfigError("--resume is not supported with aggregation.secure = 'secagg+'")
    joining = bool(cfg.simulation.ray_address)
    if joining and ray.is_initialized():
        # Flower's backend reuses a live Ray connection and would ignore the address
        raise FedtuneError(
            f"simulation.ray_address: this process is already connected to Ray; call ray.shutdown() first "
            f"(got {cfg.simulation.ray_address!r})"
        )
    server_app = make_server_app(cfg, out_dir, progress, result, resume=resume)  # SecAgg+ included
    if client_app is None:
        client_app = make_client_app(cfg)
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    if not joining:
        # Ray starts its workers at nice 15: on a machine that also runs anything else at normal
        # priority the clients starve, and a round can pass federation.round_timeout with no reply.
        # The clients are this run's work, so they run at the driver's priority (override: set it).
        os.environ.setdefault("RAY_worker_niceness", "0")
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
        if joining and ray.is_initialized():
            ray.shutdown()  # this driver's connection only; the cluster's nodes stay up
    if not result:
        raise FedtuneError("the simulation ended without finishing the run; see the log above")
    return result
