"""``fedtune report``: a summary table and PNG plots for one or more run directories.

Reads only what a run writes (``metrics.jsonl``, ``summary.json``), so federated
runs, centralized baselines and runs still in progress (no summary yet) are
read alike. With several runs the table puts them side by side and gives each
figure as a ratio to the first run's: list the centralized baseline first to
read federated / centralized.

Plots (matplotlib, Agg backend, no display needed):

* ``metric_vs_round.png``: the held-out metric after each round;
* ``bytes_vs_metric.png``: cumulative uplink + downlink bytes against the metric
  (a run that sent nothing, e.g. a centralized baseline, is a dashed line at
  its final value);
* ``client_loss.png``: each sampled client's local training loss per round, and
  the aggregated mean (a centralized run has one pooled series).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

# metrics where higher is better; every other metric (loss, perplexity, ...) is lower-is-better
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "rouge_l")
PLOTS = ("metric_vs_round.png", "bytes_vs_metric.png", "client_loss.png")


@dataclass(frozen=True)
class Run:
    """One run directory, read."""

    path: Path
    records: list[dict]
    summary: dict  # {} when the run has not finished

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def kind(self) -> str:
        return self.summary.get("mode", "centralized" if _sent_nothing(self) else "federated")

    def evals(self) -> list[tuple[int, dict]]:
        return [(int(r["round"]), r["eval"]) for r in self.records if isinstance(r.get("eval"), dict)]

    def final(self) -> dict:
        if isinstance(self.summary.get("final"), dict):
            return self.summary["final"]
        evals = self.evals()
        return evals[-1][1] if evals else {}


def _sent_nothing(run: Run) -> bool:
    return all(not r.get("bytes_up") and not r.get("bytes_down") for r in run.records) and not any(
        r.get("clients") for r in run.records
    )


def load_run(path: str | Path) -> Run:
    """Read a run directory; a :class:`FedtuneError` (one line) when it is missing or not a run."""
    p = Path(path)
    if not p.exists():
        raise FedtuneError(f"run directory not found: {p}")
    if not p.is_dir():
        raise FedtuneError(f"{p} is not a directory (expected a run directory holding metrics.jsonl)")
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise FedtuneError(f"{p} is not a run directory: it has no metrics.jsonl")
    records = []
    for i, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FedtuneError(f"{metrics} line {i} is not valid JSON: {exc}") from None
        if not isinstance(rec, dict) or "round" not in rec:
            raise FedtuneError(f"{metrics} line {i} is not a round record (no 'round')")
        records.append(rec)
    if not records:
        raise FedtuneError(f"{metrics} holds no rounds yet")
    summary: dict = {}
    if (p / "summary.json").is_file():
        try:
            summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FedtuneError(f"{p / 'summary.json'} is not valid JSON: {exc}") from None
    return Run(path=p, records=records, summary=summary)


def pick_metric(runs: Sequence[Run], requested: str | None = None) -> str:
    """The metric to report: ``requested``, else accuracy (classification) or perplexity (causal LM)."""
    seen = {k for run in runs for _, ev in run.evals() for k in ev}
    if requested:
        if requested not in seen:
            raise FedtuneError(
                f"--metric {requested!r}: no run records it; recorded: {', '.join(sorted(seen)) or 'none'}"
            )
        return requested
    for name in ("accuracy", "perplexity", "loss"):
        if name in seen:
            return name
    raise FedtuneError("no held-out evaluation found in " + ", ".join(str(r.path) for r in runs))


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def best(run: Run, metric: str) -> tuple[int, float] | None:
    """(round, value) of the best evaluation of ``metric``."""
    points = [(rnd, float(ev[metric])) for rnd, ev in run.evals() if ev.get(metric) is not None]
    if not points:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(points, key=lambda p: p[1])


def totals(run: Run) -> dict[str, Any]:
    """Figures of a run for the table; from summary.json, or from metrics.jsonl when it has none."""
    s = run.summary
    rounds_done = max(int(r["round"]) for r in run.records)
    out: dict[str, Any] = {
        "rounds": s.get("rounds_completed", rounds_done),
        "bytes_up": s.get("total_bytes_up", sum(int(r.get("bytes_up") or 0) for r in run.records)),
        "bytes_down": s.get("total_bytes_down", sum(int(r.get("bytes_down") or 0) for r in run.records)),
        "seconds": s.get("seconds", sum(float(r.get("seconds") or 0.0) for r in run.records)),
        "epsilon": None,
        "forgetting": s.get("forgetting") or _forgetting(run),
    }
    priv = s.get("privacy") or {}
    if (priv.get("settings") or {}).get("mode", "none") != "none":
        eps = priv.get("epsilon")
        out["epsilon"] = math.inf if eps is None else float(eps)
    else:
        worst = [r.get("dp_epsilon", r.get("dp_epsilon_worst_client")) for r in run.records]
        worst = [float(e) for e in worst if e is not None]
        if worst:
            out["epsilon"] = max(worst)
    return out


def _forgetting(run: Run) -> dict:
    from fedtune.metrics import forgetting_summary

    return forgetting_summary(run.records)


# --- the table -------------------------------------------------------------------------------


def _num(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def _ratio(v: float | None, ref: float | None) -> str:
    if v is None or ref is None or ref == 0 or not math.isfinite(v) or not math.isfinite(ref):
        return ""
    return f" ({v / ref:.3g}x)"


def table(runs: Sequence[Run], metric: str) -> str:
    """The summary table: one column per run; numbers after the first carry a ratio to the first run's."""
    rows: list[tuple[str, list[str]]] = [("run", [r.name for r in runs]), ("kind", [r.kind for r in runs])]
    figures = [totals(r) for r in runs]

    def numeric(label: str, values: list[float | None], fmt) -> None:
        cells = []
        for i, v in enumerate(values):
            text = fmt(v)
            cells.append(text + (_ratio(v, values[0]) if i > 0 else ""))
        rows.append((label, cells))

    finals = [r.final().get(metric) for r in runs]
    numeric(f"final {metric}", [None if v is None else float(v) for v in finals], lambda v: _num(v, ".4f"))
    bests = [best(r, metric) for r in runs]
    rows.append(
        (
            f"best {metric} (round)",
            [
                "-" if b is None else f"{b[1]:.4f} (r{b[0]})" + (_ratio(b[1], bests[0][1]) if i and bests[0] else "")
                for i, b in enumerate(bests)
            ],
        )
    )
    if metric != "rouge_l" and any(r.final().get("rouge_l") is not None for r in runs):
        numeric("final rouge_l", [r.final().get("rouge_l") for r in runs], lambda v: _num(v, ".4f"))
    if any(f["forgetting"] for f in figures):
        rows.append(
            (
                "forgetting ppl before -> after",
                [
                    f"{f['forgetting']['before']:.2f} -> {f['forgetting']['after']:.2f} ({f['forgetting']['ratio']:.3g}x)"
                    if f["forgetting"]
                    else "-"
                    for f in figures
                ],
            )
        )
    rows.append(("rounds", [str(f["rounds"]) for f in figures]))
    numeric("uplink", [float(f["bytes_up"]) for f in figures], _mb)
    numeric("downlink", [float(f["bytes_down"]) for f in figures], _mb)
    numeric("wall time (s)", [float(f["seconds"]) for f in figures], lambda v: _num(v, ".1f"))
    rows.append(("epsilon", [_num(f["epsilon"], ".3f") for f in figures]))
    if any(not r.summary for r in runs):
        rows.append(("summary.json", ["yes" if r.summary else "missing (unfinished run)" for r in runs]))
    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(runs))]
    lines = []
    for j, (label, cells) in enumerate(rows):
        lines.append("  ".join([label.ljust(width0), *(c.ljust(w) for c, w in zip(cells, widths))]).rstrip())
        if j == 0:
            lines.append("-" * len(lines[0]))
    if len(runs) > 1:
        lines.append(f"(x): ratio to {runs[0].name}")
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_round(runs: Sequence[Run], metric: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        pts = [(rnd, ev[metric]) for rnd, ev in run.evals() if ev.get(metric) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{run.name} ({run.kind})")
    ax.set_xlabel("round (centralized: the same number of steps)")
    _integer_ticks(ax)
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"held-out {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_bytes_vs_metric(runs: Sequence[Run], metric: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        cum, xs, ys = 0, [], []
        for r in sorted(run.records, key=lambda r: r["round"]):
            cum += int(r.get("bytes_up") or 0) + int(r.get("bytes_down") or 0)
            ev = r.get("eval")
            if isinstance(ev, dict) and ev.get(metric) is not None:
                xs.append(cum / 1e6)
                ys.append(ev[metric])
        if not ys:
            continue
        if cum == 0:
            ax.axhline(ys[-1], linestyle="--", color="gray", label=f"{run.name} ({run.kind}, no communication)")
        else:
            ax.plot(xs, ys, marker="o", label=f"{run.name} ({run.kind})")
    ax.set_xlabel("cumulative uplink + downlink (MB)")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"{metric} against communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def client_losses(run: Run) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """Per-client ``train_loss`` series and the aggregated mean.

    Clients are named by their ``partition-id`` where the client metrics carry one,
    else numbered in order of node id.
    """
    per: dict[int | str, list[tuple[int, float]]] = {}
    mean: list[tuple[int, float]] = []
    by_partition = False
    for r in sorted(run.records, key=lambda r: r["round"]):
        for c in r.get("clients") or []:
            loss = c.get("train_loss")
            if loss is not None and math.isfinite(float(loss)):
                if c.get("partition-id") is not None:
                    by_partition, who = True, int(c["partition-id"])
                else:
                    who = c.get("node", "?")
                per.setdefault(who, []).append((int(r["round"]), float(loss)))
        loss = (r.get("train") or {}).get("train_loss")
        if loss is not None and math.isfinite(float(loss)):
            mean.append((int(r["round"]), float(loss)))
    order = sorted(per, key=lambda k: (0, k, "") if isinstance(k, (int, float)) else (1, 0, str(k)))
    named = {f"client {k if by_partition else i}": per[k] for i, k in enumerate(order)}
    return named, mean


def plot_client_loss(runs: Sequence[Run], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs):
        per, mean = client_losses(run)
        many = len(per) > 12
        for name, pts in per.items():
            style = {"color": "tab:blue", "alpha": 0.25, "linewidth": 0.8} if many else {"marker": ".", "alpha": 0.8}
            ax.plot(*zip(*pts), label=None if many else name, **style)
        if mean:
            ax.plot(
                *zip(*mean),
                color="black",
                linewidth=2,
                label="pooled (centralized)" if run.kind == "centralized" else "mean of clients",
            )
        if not per and not mean:
            ax.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{run.name}: training loss" + (f" ({len(per)} clients)" if many else ""))
        ax.set_xlabel("round")
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("training loss")
    _save(fig, path)


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> None:
    from fedtune.rundir import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_plots(runs: Sequence[Run], metric: str, out: Path) -> list[Path]:
    """The three plots of ``runs`` (overlaid) into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in PLOTS]
    plot_metric_vs_round(runs, metric, paths[0])
    plot_bytes_vs_metric(runs, metric, paths[1])
    plot_client_loss(runs, paths[2])
    return paths


def report(
    paths: Sequence[str | Path], *, out: str | Path | None = None, metric: str | None = None, plots: bool = True
) -> tuple[str, list[Path]]:
    """The table for ``paths`` and the plots written: runs overlaid into ``out``, else each into its own directory."""
    runs = [load_run(p) for p in paths]
    name = pick_metric(runs, metric)
    written: list[Path] = []
    if plots:
        if out is not None:
            written += write_plots(runs, name, Path(out))
        else:
            for run in runs:
                written += write_plots([run], name, run.path)
    return table(runs, name), written
