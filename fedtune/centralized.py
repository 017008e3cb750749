"""The centralized baseline: the federated run's training, in one place.

Same model, adapter and held-out split; the training data is every client's
partition pooled; the number of optimizer steps is what the federated run
spends on its clients, ``rounds x clients sampled per round x local_steps``,
at the same batch size and learning rate. One optimizer and one shuffled
stream run through all of them, as centralized fine-tuning would. Held-out
evaluation happens at the step counts that end each federated round, so
``metrics.jsonl`` lines up with a federated run round by round and
``fedtune report`` can state federated / centralized.

No Flower here; one process, :func:`fedtune.train.train_local` and
:func:`fedtune.train.evaluate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedtune import adapters, config, workspace
from fedtune.config import FedtuneConfig
from fedtune.metrics import held_out_metrics, run_summary
from fedtune.rundir import RunDir
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
    say = progress or (lambda s: None)
    t_start = time.monotonic()
    run = RunDir(out_dir)
    ws = workspace.get(cfg)
    state = ws.initial_state()
    adapters.set_state_(ws.model, state)
    n_params = sum(state[k].numel() for k in ws.trainable_keys())
    pooled = pooled_train_data(ws)
    per_round = steps_per_round(cfg)
    rounds = cfg.federation.rounds
    run.write_config(config.to_toml(cfg))
    run.reset_metrics()
    say(
        f"centralized baseline: model {cfg.model.name} ({ws.task}), adapter {cfg.adapter.method}, "
        f"{len(pooled)} pooled training examples, {rounds} x {cfg.federation.clients_per_round} clients x "
        f"{cfg.train.local_steps} local steps = {rounds * per_round} steps, {len(ws.test_data())} held-out examples"
    )
    if cfg.train.mode != "backprop":
        say(f"note: train.mode is {cfg.train.mode!r}; the centralized baseline trains with backprop")

    metrics = held_out_metrics(ws, cfg, final=False)
    records = [{"round": 0, "eval": metrics, "bytes_up": 0, "bytes_down": 0, "steps_total": 0}]
    run.append_metrics(records[0])
    say(f"round 0: {_fmt(metrics)}")
    gen = torch.Generator().manual_seed(cfg.train.seed)
    optimizer = make_optimizer(ws.model, cfg.train)
    stream = batch_stream(pooled, cfg.train.batch_size, gen)
    for rnd in range(1, rounds + 1):
        t0 = time.monotonic()
        for group in optimizer.param_groups:  # the clients' per-round schedule, on the same step boundaries
            group["lr"] = round_lr(cfg.train, rnd, rounds)
        train = train_local(
            ws.model, pooled, cfg.train, task=ws.task, pad_id=ws.pad_id, device=ws.device, generator=gen,
            steps=per_round, optimizer=optimizer, batches=stream,
        )
        record: dict[str, Any] = {
            "round": rnd, "train": train, "bytes_up": 0, "bytes_down": 0, "steps_total": rnd * per_round,
        }
        last = rnd == rounds
        if rnd % cfg.federation.eval_every == 0 or last:
            record["eval"] = metrics = held_out_metrics(ws, cfg, final=last)
        record["seconds"] = time.monotonic() - t0
        run.append_metrics(record)
        records.append(record)
        say(f"round {rnd}/{rounds} ({rnd * per_round} steps): train loss {train['train_loss']:.4f}, "
            f"{_fmt(record.get('eval', {}))}, {record['seconds']:.1f}s")
    if cfg.output.save_adapter:
        workspace.export_adapter(ws, adapters.get_state(ws.model), run.path / "adapter")
    adapters.set_state_(ws.model, ws.initial_state())  # the cached workspace is shared within a process
    summary = run_summary(
        cfg, ws.task, final=metrics, rounds_completed=rounds, total_bytes_up=0, total_bytes_down=0,
        trainable_params=n_params, seconds=time.monotonic() - t_start, aggregation={"strategy": "centralized"},
        privacy={"settings": {"mode": "none"}, "epsilon": float("inf")}, records=records,
        mode="centralized", steps_per_round=per_round, total_steps=rounds * per_round, train_examples=len(pooled),
    )
    run.write_summary(summary)
    say(f"done in {summary['seconds']:.0f}s: {_fmt(metrics)}; outputs in {run.path}")
    return summary


def _fmt(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"held-out accuracy {metrics['accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f})"
    if "perplexity" in metrics:
        extra = f", ROUGE-L {metrics['rouge_l']:.4f}" if "rouge_l" in metrics else ""
        return f"held-out loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f}{extra})"
    return "no eval"
