"""A run's bookkeeping, the same in every mode: what is written, when, and what is printed.

`RunLog` owns ``config.toml``, the ``metrics.jsonl`` rows (`round_record`: the
same fields whether a round trained dense deltas, seeds and scalars, a
SecAgg+ sum, or the centralized baseline), the evaluation cadence
(``federation.eval_every``, the last round always on the full held-out split),
the progress lines, the exported adapter and ``summary.json``
(`fedtune.metrics.run_summary`). The loops that drive rounds (Flower's
`fedtune.flower.server.ServerLoop`, SecAgg+ on Flower's workflow,
`fedtune.centralized`) only say what happened in a round.

No Flower here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedtune import config
from fedtune.config import FedtuneConfig
from fedtune.metrics import run_summary
from fedtune.rundir import RunDir
from fedtune.train import run_precision

log = logging.getLogger("fedtune")

Evaluate = Callable[[bool], dict[str, float]]  # final -> held-out metrics of the current global adapter


def round_record(
    rnd: int,
    sampled: int,
    accepted: int,
    rejected: list[dict],
    train: Mapping[str, float],
    up: Mapping[int, int],
    down: Mapping[int, int],
    clients: list[dict],
    **extra: Any,
) -> dict[str, Any]:
    """One metrics.jsonl row (the same fields in every training mode)."""
    return {
        "round": rnd,
        "sampled": sampled,
        "accepted": accepted,
        "rejected": rejected,
        "train": dict(train),
        "bytes_up": sum(up.values()),
        "bytes_down": sum(down.values()),
        "bytes_up_per_client": {str(k): v for k, v in up.items()},
        "bytes_down_per_client": {str(k): v for k, v in down.items()},
        "clients": clients,
        **extra,
    }


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Held-out metrics as one progress-line fragment."""
    if "accuracy" in metrics:
        return f"held-out accuracy {metrics['accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f})"
    if "perplexity" in metrics:
        extra = f", ROUGE-L {metrics['rouge_l']:.4f}" if "rouge_l" in metrics else ""
        domains = ", ".join(
            f"{k.split('/', 1)[1]} {v:.2f}" for k, v in sorted(metrics.items()) if k.startswith("perplexity/")
        )
        extra += f"; per domain {domains}" if domains else ""
        return f"held-out loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f}{extra})"
    return "no eval"


def format_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def short_reason(reason: str) -> str:
    """A client error's own last line: Ray wraps a client's exception in many lines."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"


def round_line(record: Mapping[str, Any], rounds: int) -> str:
    """The progress line of one metrics.jsonl row."""
    parts = [f"round {record['round']}/{rounds}:"]
    if record.get("sampled"):
        dropped = len(record.get("rejected") or [])
        parts.append(
            f"{record['accepted']}/{record['sampled']} clients" + (f" ({dropped} dropped)," if dropped else ",")
        )
    loss = (record.get("train") or {}).get("train_loss", float("nan"))
    parts.append(f"train loss {loss:.4f}, {format_metrics(record.get('eval', {}))},")
    parts.append(
        f"up {format_bytes(record.get('bytes_up', 0))}, down {format_bytes(record.get('bytes_down', 0))}, "
        f"{record.get('seconds', 0.0):.1f}s"
    )
    return " ".join(parts)


class RunLog:
    """One run's outputs and progress; see the module docstring."""

    def __init__(self, cfg: FedtuneConfig, out_dir: str | Path, progress: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run = RunDir(out_dir)
        self.progress = progress or log.info
        self.rows: list[dict] = []  # rounds >= 1, resumed ones included
        self.setup: dict[str, Any] = {}  # the round-0 row: its bytes (a set-up exchange's) count in the totals
        self.last_eval: dict[str, float] = {}
        self.t_start = time.monotonic()

    @property
    def path(self) -> Path:
        return self.run.path

    def start(
        self,
        header: str,
        evaluate: Evaluate,
        *,
        resumed_round: int | None = None,
        setup: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the config; evaluate round 0, or take the rows of a resumed run up to its checkpoint.

        ``setup``: fields of the round-0 row from what ran before round 1 (the bytes of
        ``adapter.head_init = "prototypes"``'s exchange), counted in the summary's totals."""
        self.run.write_config(config.to_toml(self.cfg))
        self.progress(
            f"{header}; forward passes in {run_precision(self.cfg)} "
            f"(train.mixed_precision = {self.cfg.train.mixed_precision!r}, model.dtype = {self.cfg.model.dtype!r})"
        )
        if resumed_round is None:
            self.run.reset_metrics()
            self.last_eval = evaluate(False)
            self.setup = {"round": 0, "eval": self.last_eval, "bytes_up": 0, "bytes_down": 0, **(setup or {})}
            self.run.append_metrics(self.setup)
            spent = self.setup["bytes_up"] or self.setup["bytes_down"]
            spent_line = (
                f", set-up up {format_bytes(self.setup['bytes_up'])}, down {format_bytes(self.setup['bytes_down'])}"
                if spent
                else ""
            )
            self.progress(f"round 0: {format_metrics(self.last_eval)}{spent_line}")
            return
        self.run.reset_metrics(keep_rounds_upto=resumed_round)
        self.setup = next((r for r in self.run.read_metrics() if r.get("round") == 0), {})
        self.rows = [r for r in self.run.read_metrics() if r.get("round", 0) >= 1]
        self.last_eval = next((r["eval"] for r in reversed(self.rows) if "eval" in r), {})
        self.progress(f"resumed after round {resumed_round}")

    def end_round(self, record: dict[str, Any], started: float, evaluate: Evaluate) -> dict[str, Any]:
        """Evaluate on the cadence, time, append and print one round's row."""
        rounds = self.cfg.federation.rounds
        rnd = record["round"]
        last = rnd == rounds
        if rnd % self.cfg.federation.eval_every == 0 or last:
            record["eval"] = self.last_eval = evaluate(last)
        record["seconds"] = time.monotonic() - started
        self.run.append_metrics(record)
        self.rows.append(record)
        self.progress(round_line(record, rounds))
        return record

    @property
    def total_up(self) -> int:
        return sum(r.get("bytes_up", 0) for r in (self.setup, *self.rows))

    @property
    def total_down(self) -> int:
        return sum(r.get("bytes_down", 0) for r in (self.setup, *self.rows))

    def finish(
        self,
        task: str,
        evaluate: Evaluate,
        export: Callable[[Path], None] | None,
        *,
        trainable_params: int,
        aggregation: Mapping[str, Any],
        privacy: Mapping[str, Any],
        mode: str,
        stopped_early: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Final evaluation (the full held-out split), adapter export, summary.json; returns the summary."""
        rows = self.rows
        final = self.last_eval
        if not rows or "eval" not in rows[-1] or rows[-1]["round"] != self.cfg.federation.rounds:
            final = self.last_eval = evaluate(True)  # stopped early, or resumed after the last round
        if self.cfg.output.save_adapter and export is not None:
            export(self.path / "adapter")
        summary = run_summary(
            self.cfg,
            task,
            final=final,
            rounds_completed=len(rows),
            total_bytes_up=self.total_up,
            total_bytes_down=self.total_down,
            trainable_params=trainable_params,
            seconds=time.monotonic() - self.t_start,
            aggregation=aggregation,
            privacy=privacy,
            stopped_early=stopped_early,
            records=[*self.run.read_metrics(), {"round": -1, "eval": final}],
            mode=mode,
            **extra,
        )
        self.run.write_summary(summary)
        if privacy.get("guarantee"):
            self.progress(
                f"privacy: {privacy['guarantee']}: (epsilon {privacy['epsilon']:.3f}, delta {privacy['delta']:g})"
            )
        self.progress(
            f"done in {summary['seconds']:.0f}s: {format_metrics(final)}; total up {format_bytes(self.total_up)}, "
            f"down {format_bytes(self.total_down)}; outputs in {self.path}"
        )
        return summary


__all__ = ["RunLog", "round_record", "format_metrics", "format_bytes", "short_reason", "round_line"]
