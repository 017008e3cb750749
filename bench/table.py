"""Run one config under several override sets ("rows") and tabulate bytes and accuracy.

Every row uses the same config, seeds and rounds; only its overrides differ.
Each row runs in a fresh `fedtune simulate` process (Flower simulation, Ray).

    python bench/table.py --config simulations/configs/default.toml \
        --row "none:" --row "fp16:compression.codec=fp16" --out bench/results/compression

A value may be a TOML list: ``--row "het:adapter.r=16,aggregation.lora_mode=hetero,aggregation.client_ranks=[2,4,8,16]"``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def parse_row(spec: str) -> tuple[str, list[str]]:
    """``"NAME:key=value,key=value"`` -> (NAME, overrides); commas inside ``[...]`` or ``{...}`` stay in their value."""
    name, _, rest = spec.partition(":")
    overrides, depth, cur = [], 0, ""
    for ch in rest:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            overrides.append(cur)
            cur = ""
        else:
            cur += ch
    overrides.append(cur)
    return name, [o.strip() for o in overrides if o.strip()]


def run_row(config: str, name: str, overrides: list[str], out: Path, extra: list[str]) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a re-run row starts clean (the server refuses unfinished dirs)
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--config", config, "--out", str(run_dir)]
    for o in [*extra, *overrides]:
        cmd += ["--set", o]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    (out / f"{name}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        return {"row": name, "error": res.stderr.strip().splitlines()[-1:] or ["failed"], "wall_s": wall}
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = sum(r.get("accepted", 0) for r in rows[1:])
    downs = sum(len(r.get("bytes_down_per_client", {})) for r in rows[1:])
    final = summary["final"]
    return {
        "row": name,
        "overrides": overrides,
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
        "perplexity": final.get("perplexity"),
        "uplink_bytes_per_client_round": summary["total_bytes_up"] / max(updates, 1),
        "downlink_bytes_per_client_round": summary["total_bytes_down"] / max(downs, 1),
        "total_bytes_up": summary["total_bytes_up"],
        "total_bytes_down": summary["total_bytes_down"],
        "privacy": summary.get("privacy"),
        "precision": summary.get("precision", "?"),  # what train.mixed_precision resolved to on this machine
        "wall_s": wall,
        "curve": [r.get("eval", {}).get("accuracy", r.get("eval", {}).get("loss")) for r in rows],
    }


def _epsilon(r: dict) -> str:
    eps = (r.get("privacy") or {}).get("epsilon")
    if eps is None or (r.get("privacy") or {}).get("settings", {}).get("mode", "none") == "none":
        return "-"
    return "inf" if eps == float("inf") else f"{eps:.2f}"


def markdown(results: list[dict]) -> str:
    base = next((r for r in results if "error" not in r), None)
    lines = [
        "| row | final accuracy | uplink B / client-round | vs first row | downlink B / client-round "
        "| total up (MB) | total down (MB) | epsilon | precision | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} | | | | | | | | |")
            continue
        ratio = base["uplink_bytes_per_client_round"] / r["uplink_bytes_per_client_round"] if base else float("nan")
        acc = r["accuracy"] if r["accuracy"] is not None else float("nan")
        lines.append(
            f"| {r['row']} | {acc:.4f} | {r['uplink_bytes_per_client_round']:,.0f} | {ratio:.1f}x | "
            f"{r['downlink_bytes_per_client_round']:,.0f} | "
            f"{r['total_bytes_up'] / 1e6:.2f} | {r['total_bytes_down'] / 1e6:.2f} | {_epsilon(r)} | {r['precision']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--row", action="append", required=True, help="NAME:key=value,key=value")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="override applied to every row")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # rows from earlier invocations into the same --out are kept (re-run rows replace theirs)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    for spec in args.row:
        name, overrides = parse_row(spec)
        print(f"== {name}: {overrides}", flush=True)
        row = run_row(args.config, name, overrides, out, args.extra)
        results = [r for r in results if r["row"] != name] + [row]
        print(json.dumps(row), flush=True)
        saved.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
