"""Local simulation of many clients on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune import data, models
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError, FedtuneError


def preflight(cfg: FedtuneConfig) -> None:
    """Check model, data and partition before any process starts; raise one clear error."""
    resolved = models.resolve(cfg.model)
    if cfg.model.quantization == "4bit" and models.pick_device(cfg.model).type != "cuda":
        raise ConfigError("model.quantization: '4bit' (QLoRA through bitsandbytes) needs a CUDA device; this machine has none")
    if resolved.name == "smollm2":
        models.smollm2_checkpoint()  # convert once here, not concurrently in every worker
    splits = data.split(cfg.data, resolved.task)
    parts = data.client_indices(cfg.data, splits, cfg.federation.num_clients, resolved.task)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ConfigError(
            f"data.partition: clients {empty[:5]} get no examples with {cfg.data.partition!r}; "
            "use fewer clients, a larger data.dirichlet_alpha or data.partition = 'iid'"
        )


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
) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.federation.num_clients`` virtual clients; return the summary."""
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
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(old_level)
    if not result:
        raise FedtuneError("the simulation ended without finishing the run; see the log above")
    return result
