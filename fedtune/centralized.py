"""The centralized baseline: the federated run's training, in one place.

Same model, adapter and held-out split; the training data is every client's
partition pooled; the number of optimizer steps is what the federated run
spends on its clients, ``rounds x clients sampled per round x local_steps``,
at the same batch size and learning rate. One optimizer and one shuffled
stream run through all of them, as centralized fine-tuning would. Held-out
evaluation happens at the step counts that end each federated round, so
``metrics.jsonl`` lines up with a federated run round by round and
``fedtune report`` can state federated / centralized.

No Flower here; one process, :func:`fedtune.train.train_local`, and the run
bookkeeping every mode shares (:class:`fedtune.runlog.RunLog`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedtune import adapters, workspace
from fedtune.config import FedtuneConfig
from fedtune.metrics import held_out_metrics
from fedtune.runlog import RunLog, round_record
from fedtune.train import batch_stream, make_optimizer, round_lr, train_local


def steps_per_round(cfg: FedtuneConfig) -> int:
    return cfg.federation.clients_per_round * cfg.train.local_steps


def pooled_train_data(ws: workspace.Workspace) -> list[dict]:
    """Every client's tokenized training examples, in partition order."""
    return [ex for pid in range(ws.cfg.federation.num_clients) for ex in ws.client_data(pid)]


def run_centralized(
    cfg: FedtuneConfig, out_dir: str | Path, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train the centralized baseline of ``cfg`` and write a run directory; return its summary."""
    runlog = RunLog(cfg, out_dir, progress or (lambda s: None))
    ws = workspace.get(cfg)
    state = ws.initial_state()
    adapters.set_state_(ws.model, state)
    n_params = sum(state[k].numel() for k in ws.trainable_keys())
    pooled = pooled_train_data(ws)
    if cfg.adapter.head_init == "prototypes":  # the federated run's head, from every client's data pooled
        from fedtune import prototypes

        stats = prototypes.data_stats(
            ws.model,
            pooled,
            pad_id=ws.pad_id,
            task=ws.task,
            num_classes=ws.num_labels,
            batch_size=cfg.train.eval_batch_size,
        )
        adapters.set_state_(ws.model, prototypes.head_state(ws.model, *prototypes.head_from_stats(stats)))
    per_round = steps_per_round(cfg)
    rounds = cfg.federation.rounds

    def evaluate(final: bool) -> dict[str, float]:
        return held_out_metrics(ws, cfg, final=final)

    runlog.start(
        f"centralized baseline: model {cfg.model.name} ({ws.task}), adapter {cfg.adapter.method}, "
        f"{len(pooled)} pooled training examples, {rounds} x {cfg.federation.clients_per_round} clients x "
        f"{cfg.train.local_steps} local steps = {rounds * per_round} steps, {len(ws.test_data())} held-out examples",
        evaluate,
    )
    if cfg.train.mode != "backprop":
        runlog.progress(f"note: train.mode is {cfg.train.mode!r}; the centralized baseline trains with backprop")
    if cfg.privacy.enabled:
        runlog.progress(f"note: privacy.mode is {cfg.privacy.mode!r}; the centralized baseline trains without DP")
    gen = torch.Generator().manual_seed(cfg.train.seed)
    optimizer = make_optimizer(ws.model, cfg.train)
    stream = batch_stream(pooled, cfg.train.batch_size, gen)
    for rnd in range(1, rounds + 1):
        t0 = time.monotonic()
        for group in optimizer.param_groups:  # the clients' per-round schedule, on the same step boundaries
            group["lr"] = round_lr(cfg.train, rnd, rounds)
        train = train_local(
            ws.model,
            pooled,
            cfg.train,
            task=ws.task,
            pad_id=ws.pad_id,
            device=ws.device,
            generator=gen,
            steps=per_round,
            optimizer=optimizer,
            batches=stream,
        )
        record = round_record(rnd, 0, 0, [], train, {}, {}, [], steps_total=rnd * per_round)
        runlog.end_round(record, t0, evaluate)
    summary = runlog.finish(
        ws.task,
        evaluate,
        lambda adapter_dir: workspace.export_adapter(ws, adapters.get_state(ws.model), adapter_dir),
        trainable_params=n_params,
        aggregation={"strategy": "centralized"},
        privacy={"settings": {"mode": "none"}, "epsilon": float("inf")},
        mode="centralized",
        steps_per_round=per_round,
        total_steps=rounds * per_round,
        train_examples=len(pooled),
    )
    adapters.set_state_(ws.model, ws.initial_state())  # the cached workspace is shared within a process
    return summary
