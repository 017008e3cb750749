"""ROUGE-L (hand-computed and brute-force references), greedy generation, forgetting texts, [eval]."""

import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedtune import config, metrics, models, workspace
from fedtune.config import CAUSAL_LM, DataConfig
from fedtune.errors import ConfigError
from tests.conftest import CONFIGS

LLM = {
    "model.name": "tiny-llama",
    "data.dataset": "chatterbot",
    "data.partition": "domain",
    "data.domains": ["science", "history", "sports", "ai"],
    "data.max_test_examples": 24,
}


def test_rouge_l_hand_computed():
    # Lin (2004), section 3.1: reference "police killed the gunman"
    ref = "police killed the gunman".split()
    # "police kill the gunman": LCS "police the gunman" = 3; P = R = 3/4
    assert metrics.rouge_l("police kill the gunman".split(), ref) == pytest.approx(0.75)
    # "the gunman kill police": LCS "the gunman" = 2; P = R = 2/4
    assert metrics.rouge_l("the gunman kill police".split(), ref) == pytest.approx(0.5)
    # LCS("a b c d", "a c e") = "a c" = 2; P = 2/4, R = 2/3; F1 = 2PR / (P + R) = (2/3) / (7/6) = 4/7
    assert metrics.rouge_l(list("abcd"), list("ace")) == pytest.approx(4 / 7)
    # beta weighs recall: F = (1 + b^2) P R / (R + b^2 P) with b = 2 -> 5 (1/3) / (2/3 + 2) = 5/8
    assert metrics.rouge_l(list("abcd"), list("ace"), beta=2.0) == pytest.approx(5 / 8)
    assert metrics.rouge_l([], ref) == 0.0 and metrics.rouge_l(ref, []) == 0.0
    assert metrics.rouge_l(list("xyz"), ref) == 0.0
    assert metrics.rouge_l(ref, ref) == 1.0


def test_rouge_tokens_and_text():
    assert metrics.rouge_tokens("The Gunman, killed (by police)!") == ["the", "gunman", "killed", "by", "police"]
    assert metrics.rouge_l_text("Police KILL the gunman.", "police killed the gunman") == pytest.approx(0.75)


def _lcs_brute(a, b) -> int:
    for k in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(a, k))
        if any(c in subs for c in itertools.combinations(b, k)):
            return k
    return 0


@given(st.lists(st.sampled_from("abc"), max_size=7), st.lists(st.sampled_from("abc"), max_size=7))
def test_lcs_matches_brute_force_and_rouge_is_a_symmetric_f1(a, b):
    n = metrics.lcs_length(a, b)
    assert n == _lcs_brute(a, b) == metrics.lcs_length(b, a)
    score = metrics.rouge_l(a, b)
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(metrics.rouge_l(b, a))  # F1 is symmetric in P and R
    assert score == pytest.approx(2 * n / (len(a) + len(b)) if n else 0.0)


def test_batched_left_padded_generation_matches_one_prompt_at_a_time():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.load_tokenizer(models.resolve(config.ModelConfig(name="tiny-llama")))
    torch.manual_seed(0)
    # untied output layer: the random model then says something other than its last token
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
    ).eval()
    prompts = ["hi", "what is the speed of light in a vacuum", "who are you?"]
    kw = {"max_length": 32, "max_new_tokens": 6, "device": torch.device("cpu")}
    batched = metrics.generate_greedy_ids(model, tok, prompts, batch_size=3, **kw)
    single = [metrics.generate_greedy_ids(model, tok, [p], **kw)[0] for p in prompts]
    assert batched == single
    assert all(len(ids) == 6 for ids in batched) and len({tuple(x) for x in batched}) > 1
    assert all(isinstance(t, str) for t in metrics.generate_greedy(model, tok, prompts, **kw))


def test_forgetting_texts_are_held_out_from_tuning():
    tuned = DataConfig(dataset="chatterbot", partition="domain", domains=("science", "history"))
    texts = metrics.forgetting_texts(tuned, "auto", 50, seed=0)
    assert len(texts) == 50 and texts == metrics.forgetting_texts(tuned, "chatterbot", 50, seed=0)
    from fedtune.data import load_chatterbot

    tuned_text = {f"{e['prompt']}\n{e['response']}" for e in load_chatterbot() if e["domain"] in ("science", "history")}
    assert not set(texts) & tuned_text
    assert metrics.forgetting_texts(tuned, "auto", 50, seed=1) != texts  # seeded order
    everything = DataConfig(dataset="chatterbot", partition="domain")
    with pytest.raises(ConfigError, match="eval.forgetting_source"):
        metrics.forgetting_texts(everything, "chatterbot", 5)
    reviews = metrics.forgetting_texts(everything, "auto", 5)  # all of chatterbot tuned: review text instead
    assert len(reviews) == 5 and not set(reviews) & {f"{e['prompt']}\n{e['response']}" for e in load_chatterbot()}


def test_eval_section_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(None, {"eval.rouge_examples": -1, "eval.forgetting_source": "wiki", "eval.max_new_tokens": 0})
    msg = str(exc.value)
    assert "eval.rouge_examples" in msg and "eval.forgetting_source" in msg and "eval.max_new_tokens" in msg
    with pytest.raises(ConfigError, match=r"eval\.rouge: unknown key"):
        config.load(None, {"eval.rouge": 3})
    cfg = config.load(CONFIGS / "tiny.toml", {"eval.rouge_examples": 3, "eval.forgetting_examples": 7})
    (tmp_path / "c.toml").write_text(config.to_toml(cfg))
    assert config.load(tmp_path / "c.toml") == cfg


def test_extra_eval_on_a_tiny_causal_lm(tiny_cfg):
    cfg = tiny_cfg.replace(**LLM, **{"eval.rouge_examples": 3, "eval.forgetting_examples": 5, "eval.max_new_tokens": 4})
    ws = workspace.get(cfg)
    assert ws.task == CAUSAL_LM
    out = metrics.extra_eval(ws, cfg)
    assert out["rouge_examples"] == 3 and 0.0 <= out["rouge_l"] <= 1.0
    assert out["forgetting_perplexity"] > 1 and out["forgetting_loss"] > 0
    assert metrics.extra_eval(ws, cfg) == out  # greedy, no dropout at eval: deterministic
    assert metrics.extra_eval(ws, cfg.replace(**{"eval.rouge_examples": 0, "eval.forgetting_examples": 0})) == {}


def test_extra_eval_is_empty_for_classification(tiny_cfg):
    cfg = tiny_cfg.replace(**{"eval.rouge_examples": 3, "eval.forgetting_examples": 5})
    assert metrics.extra_eval(workspace.get(cfg), cfg) == {}


def test_forgetting_summary_reads_first_and_last_evaluation():
    records = [
        {"round": 0, "eval": {"forgetting_perplexity": 20.0}},
        {"round": 1},
        {"round": 2, "eval": {"forgetting_perplexity": 25.0}},
    ]
    assert metrics.forgetting_summary(records) == {"before": 20.0, "after": 25.0, "ratio": 1.25}
    assert metrics.forgetting_summary([{"round": 0, "eval": {"loss": 1.0}}]) == {}


def test_causal_lm_held_out_metrics_per_domain(tiny_cfg, tmp_path):
    """Each domain's loss is that domain's held-out examples evaluated alone; the overall loss is the
    token-weighted mean, i.e. the whole split evaluated at once; the summary compares first and last."""
    from fedtune import adapters, workspace
    from fedtune.centralized import run_centralized
    from fedtune.metrics import held_out_metrics
    from fedtune.train import evaluate

    cfg = tiny_cfg.replace(
        **LLM, **{"federation.rounds": 1, "train.local_steps": 2, "train.lr": 3e-2, "output.save_adapter": False}
    )
    ws = workspace.get(cfg)
    adapters.set_state_(ws.model, ws.initial_state())
    got = held_out_metrics(ws, cfg, final=True)
    test, domains = ws.test_data(), [e["domain"] for e in ws.test_examples()]
    assert len(set(domains)) > 1
    kw = {"task": ws.task, "pad_id": ws.pad_id, "device": ws.device, "batch_size": cfg.train.eval_batch_size}
    for d in set(domains):
        alone = evaluate(ws.model, [x for x, dom in zip(test, domains) if dom == d], **kw)
        assert got[f"loss/{d}"] == pytest.approx(alone["loss"], rel=1e-6)
        assert got[f"perplexity/{d}"] == pytest.approx(alone["perplexity"], rel=1e-6)
    whole = evaluate(ws.model, test, **kw)
    assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5) and got["tokens"] == whole["tokens"]
    summary = run_centralized(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for d, s in summary["domains"].items():
        assert s["before"] == rows[0]["eval"][f"perplexity/{d}"] and s["after"] == rows[-1]["eval"][f"perplexity/{d}"]
    assert set(summary["domains"]) == set(domains)
