"""Held-out perplexity per domain, before and after federated tuning, from a finished run.

Made for the SmolLM2-135M + LoRA chatterbot job
(``simulations/configs/smollm2-chatterbot.toml``, one domain per silo), it works
for any causal-LM run whose examples carry a ``domain``. From RUN_DIR it reads
``config.toml`` (the run's resolved config) and ``adapter/`` (the tuned adapter
in PEFT format, written at the end of the run), then evaluates on each domain's
held-out examples:

* **before**: the base model with the untuned adapter, i.e. the adapter as the
  run built it from ``adapter.init_seed`` (LoRA's B = 0: exactly the base model);
* **after**: the same model with the weights of ``adapter/`` loaded by peft's own
  ``set_peft_model_state_dict``.

The held-out split is the run's (same seed and stratification, never given to a
client) but *without* the ``data.max_test_examples`` cap, which keeps the first
N examples in file order and can leave a domain out entirely; ``--max-per-domain``
caps each domain instead.

    .venv/bin/python bench/smollm2_domains.py runs/demo-llm [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path


def load_run(run_dir: Path):
    """(config, workspace with the untuned adapter, tuned adapter state) of a finished run."""
    from safetensors.torch import load_file

    from fedtune import config, workspace
    from fedtune.config import CAUSAL_LM
    from fedtune.errors import FedtuneError

    for need in ("config.toml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        if not (run_dir / need).is_file():
            raise FedtuneError(f"{run_dir} has no {need}: not a finished run with output.save_adapter = true")
    cfg = config.load(run_dir / "config.toml")
    if cfg.adapter.method == "lora-sb":
        # a Fed-SB run exports a plain peft LoRA (B folded with the trained core R, `fedtune.lorasb`):
        # the same r and alpha as a plain LoRA compute what the run's model computed
        cfg = cfg.replace(**{"adapter.method": "lora"})
    ws = workspace.build(cfg)
    if ws.task != CAUSAL_LM:
        raise FedtuneError(f"{run_dir}: model {cfg.model.name!r} is not a causal LM; perplexity needs one")
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    built = ws.model.peft_config["default"]
    for key in ("peft_type", "r", "lora_alpha"):
        want = getattr(built, key, None)
        want = getattr(want, "value", want)
        if key in saved and saved[key] != want:
            raise FedtuneError(f"{run_dir}/adapter: {key} = {saved[key]!r} but config.toml builds {want!r}")
    tuned = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    missing = sorted(set(ws.trainable_keys()) - set(tuned))
    if missing:
        raise FedtuneError(f"{run_dir}/adapter lacks trained tensors, e.g. {missing[:2]}")
    return cfg, ws, tuned


def held_out_by_domain(cfg, ws, max_per_domain: int = 0) -> dict[str, list[dict]]:
    """Tokenized held-out examples of each domain (the run's split, uncapped)."""
    from fedtune import data

    splits = data.split(replace(cfg.data, max_test_examples=0), ws.task)
    by_domain: dict[str, list[dict]] = {}
    for ex in splits.test:
        by_domain.setdefault(ex.get("domain", ""), []).append(ex)
    order = list(cfg.data.domains) or sorted(by_domain)
    out = {}
    for dom in order:
        ex = by_domain.get(dom, [])
        if max_per_domain:
            ex = ex[:max_per_domain]
        if ex:
            out[dom] = data.tokenize(ex, ws.tokenizer, ws.task, cfg.model.max_length)
    return out


def evaluate_domains(cfg, ws, state, domains: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    from fedtune import adapters
    from fedtune.train import evaluate

    adapters.set_state_(ws.model, state)
    res = {}
    for dom, toks in domains.items():
        res[dom] = evaluate(
            ws.model,
            toks,
            task=ws.task,
            pad_id=ws.pad_id,
            device=ws.device,
            batch_size=cfg.train.eval_batch_size,
            mixed_precision=cfg.train.mixed_precision,
        )
    loss_sum = sum(r["loss"] * r["tokens"] for r in res.values())
    tokens = sum(r["tokens"] for r in res.values())
    loss = loss_sum / max(tokens, 1)
    res["all"] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    return res


def table(domains: dict[str, list[dict]], before: dict, after: dict) -> str:
    lines = [
        "| domain | held-out examples | target tokens | perplexity before | perplexity after | change |",
        "|---|---|---|---|---|---|",
    ]
    for dom in [*domains, "all"]:
        n = len(domains[dom]) if dom in domains else sum(map(len, domains.values()))
        b, a = before[dom]["perplexity"], after[dom]["perplexity"]
        lines.append(f"| {dom} | {n} | {int(after[dom]['tokens'])} | {b:.2f} | {a:.2f} | {100 * (a / b - 1):+.1f}% |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--max-per-domain", type=int, default=0, help="cap each domain's held-out examples (0: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    import torch

    from fedtune.env import setup_environment
    from fedtune.errors import FedtuneError

    setup_environment()
    torch.set_num_threads(args.threads)
    try:
        cfg, ws, tuned = load_run(args.run_dir)
    except FedtuneError as exc:
        print(f"smollm2_domains: error: {exc}", file=sys.stderr)
        return 2
    domains = held_out_by_domain(cfg, ws, args.max_per_domain)
    before = evaluate_domains(cfg, ws, ws.initial_state(), domains)
    after = evaluate_domains(cfg, ws, tuned, domains)
    print(
        f"run {args.run_dir}: model {cfg.model.name}, adapter {cfg.adapter.method} r={cfg.adapter.r}, "
        f"{cfg.federation.rounds} rounds of {cfg.federation.num_clients} clients; held-out split uncapped"
    )
    text = table(domains, before, after)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "run_dir": str(args.run_dir),
                    "model": cfg.model.name,
                    "before": before,
                    "after": after,
                    "examples": {d: len(t) for d, t in domains.items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
