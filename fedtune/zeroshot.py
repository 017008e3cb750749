"""The zero-shot baseline: the model as shipped, no training, scored like every other run.

``fedtune zero-shot --config X --out RUN_DIR`` evaluates the base model with the
adapter switched off (peft's ``disable_adapter``: no LoRA delta, no virtual tokens)
on the run's held-out split, through :func:`fedtune.metrics.held_out_metrics`,
the evaluation every federated and centralized run reports. For label-word
classification (`fedtune.labelwords`) this is the LM-BFF / MeZO zero-shot
figure (Gao et al. 2021, arXiv:2012.15723; Malladi et al. 2023,
arXiv:2305.17333) that fine-tuning starts from; for a causal LM it is the base
model's held-out perplexity.

The run directory has the layout of ``fedtune centralized``'s (config.toml, a
round-0 line in metrics.jsonl, summary.json with ``"mode": "zero-shot"``), so
``fedtune report ZERO RUN CENTRAL`` puts it beside the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune import config, workspace
from fedtune.config import FedtuneConfig
from fedtune.metrics import held_out_metrics, run_summary
from fedtune.rundir import RunDir


def run_zero_shot(
    cfg: FedtuneConfig, out_dir: str | Path, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Evaluate the untuned model of ``cfg`` on its full held-out split; write a run directory, return its summary."""
    say = progress or (lambda s: None)
    t_start = time.monotonic()
    run = RunDir(out_dir)
    ws = workspace.get(cfg)
    run.write_config(config.to_toml(cfg))
    run.reset_metrics()
    n_test = len(ws.test_data())
    say(f"zero-shot: model {cfg.model.name} ({ws.task}) as shipped, {n_test} held-out examples")
    with ws.model.disable_adapter():
        metrics = held_out_metrics(ws, cfg, final=True)
    seconds = time.monotonic() - t_start
    record = {"round": 0, "eval": metrics, "bytes_up": 0, "bytes_down": 0, "steps_total": 0, "seconds": seconds}
    run.append_metrics(record)
    summary = run_summary(
        cfg,
        ws.task,
        final=metrics,
        rounds_completed=0,
        total_bytes_up=0,
        total_bytes_down=0,
        trainable_params=0,
        seconds=seconds,
        aggregation={"strategy": "zero-shot"},
        privacy={"settings": {"mode": "none"}, "epsilon": float("inf")},
        records=[record],
        mode="zero-shot",
        total_steps=0,
        eval_examples=n_test,
    )
    run.write_summary(summary)
    say(f"done in {seconds:.0f}s: {_fmt(metrics)}; outputs in {run.path}")
    return summary


def _fmt(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"held-out accuracy {metrics['accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f})"
    return f"held-out loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f})"
