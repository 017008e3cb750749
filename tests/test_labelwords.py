"""Label-word classification (LM-BFF / MeZO objective) on a tiny random Llama.

Scores are checked against a hand computation: the log-softmax of the model's
logits over each prompt + word, one unpadded sequence at a time.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import adapters, config, labelwords, models, workspace
from fedtune.cli import main as cli_main
from fedtune.data import collate
from fedtune.errors import ConfigError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import to_arrayrecord
from fedtune.flower.server import ServerLoop
from fedtune.train import batch_loss, evaluate, train_local

from .conftest import CONFIGS

TEMPLATE = "Review: {text}\nSentiment:"
# class 0 has a single-token word and a two-token one (MiniLM's WordPiece: "awful", "##ness")
WORDS = [[" negative", " awfulness"], [" positive"]]
LW = {
    "model.name": "tiny-llama",
    "model.task": "label-words",
    "label_words.template": TEMPLATE,
    "label_words.words": WORDS,
}


def lw_cfg(**overrides):
    return config.load(CONFIGS / "tiny.toml", {**LW, **overrides})


def perturbed_(ws, seed: int = 0) -> None:
    """Load an adapter far from the identity, so the adapter's path is part of every score."""
    gen = torch.Generator().manual_seed(seed)
    state = ws.initial_state()
    for k in ws.trainable_keys():
        state[k] = state[k] + 0.2 * torch.randn(state[k].shape, generator=gen)
    adapters.set_state_(ws.model, state)


@torch.no_grad()
def hand_scores(model, prompts: list[list[int]], words) -> torch.Tensor:
    """Per class, logsumexp over its words of sum_j log p(t_j | prompt, t_<j): one unpadded pass per prompt + word."""
    model.eval()
    rows = []
    for p in prompts:
        per_class = []
        for class_words in words:
            word_scores = []
            for w in class_words:
                ids = torch.tensor([p + list(w)])
                logits = model(input_ids=ids).logits[0, -ids.shape[1] :].double()  # drop virtual tokens, if any
                logp = torch.log_softmax(logits, -1)
                word_scores.append(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(w)))
            per_class.append(torch.logsumexp(torch.stack(word_scores), 0))
        rows.append(torch.stack(per_class))
    return torch.stack(rows).float()


def some_examples(ws, n: int = 5) -> list[dict]:
    data = ws.test_data()
    by_len = sorted(data, key=lambda d: len(d["input_ids"]))
    return [by_len[0], by_len[-1], *by_len[len(by_len) // 2 : len(by_len) // 2 + n - 2]]  # mixed lengths: padding


# --- scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_scores_match_hand_computation(method):
    ws = workspace.get(lw_cfg(**{"adapter.method": method}))
    perturbed_(ws)
    words = ws.label_word_ids
    assert len(words[0][0]) == 1 and len(words[0][1]) == 2 and len(words[1][0]) == 1
    ex = some_examples(ws)
    assert len({len(e["input_ids"]) for e in ex}) > 1
    batch = collate(ex, ws.pad_id, ws.task)
    ws.model.eval()
    with torch.no_grad():
        got = labelwords.class_scores(ws.model, batch)
    want = hand_scores(ws.model, [e["input_ids"] for e in ex], words)
    assert got.shape == (len(ex), 2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_single_token_words_read_the_next_token_logits_of_one_pass():
    ws = workspace.get(lw_cfg())
    perturbed_(ws)
    ex = some_examples(ws)
    batch = collate(ex, ws.pad_id, ws.task)
    ws.model.eval()
    with torch.no_grad():
        scores = labelwords.class_scores(ws.model, batch)
        logits = ws.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = batch["attention_mask"].sum(1) - 1
        next_logp = logits[torch.arange(len(ex)), last].float().log_softmax(-1)
    positive = ws.label_word_ids[1][0][0]
    # class 1 has one single-token word: its score is exactly that next-token log-probability,
    # whatever multi-token words the other class holds
    assert torch.equal(scores[:, 1], next_logp[:, positive])
    single = labelwords.LabelWordsConfig(template=TEMPLATE, words=((" negative",), (" positive",)))
    ids = labelwords.encode_words(single, ws.tokenizer)
    one = labelwords.tokenize([{"text": "a fine film", "label": 1}], ws.tokenizer, single, 32, ids)
    with torch.no_grad():
        s2 = labelwords.class_scores(ws.model, collate(one, ws.pad_id, ws.task))
        direct = ws.model(input_ids=torch.tensor([one[0]["input_ids"]])).logits[0, -1].float().log_softmax(-1)
    assert torch.equal(s2[0], direct[[ids[0][0][0], ids[1][0][0]]])


def test_loss_is_cross_entropy_over_the_class_scores():
    ws = workspace.get(lw_cfg())
    perturbed_(ws, seed=1)
    ex = some_examples(ws)
    batch = collate(ex, ws.pad_id, ws.task)
    want = hand_scores(ws.model, [e["input_ids"] for e in ex], ws.label_word_ids)
    labels = torch.tensor([e["label"] for e in ex])
    ws.model.eval()
    with torch.no_grad():
        loss = batch_loss(ws.model, batch, None)
        adjust = torch.tensor([0.3, -0.7])
        adjusted = batch_loss(ws.model, batch, adjust)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want, labels), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(adjusted, torch.nn.functional.cross_entropy(want + adjust, labels), atol=2e-5, rtol=1e-5)


def test_evaluate_predicts_the_best_scoring_class():
    ws = workspace.get(lw_cfg())
    perturbed_(ws, seed=2)
    ex = ws.test_data()[:40]
    want = hand_scores(ws.model, [e["input_ids"] for e in ex], ws.label_word_ids)
    labels = torch.tensor([e["label"] for e in ex])
    m = evaluate(ws.model, ex, task=ws.task, pad_id=ws.pad_id, device=ws.device, batch_size=16, num_labels=2)
    assert m["accuracy"] == pytest.approx(float((want.argmax(1) == labels).float().mean()))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(want, labels)), abs=1e-5)


def test_training_lowers_the_loss():
    ws = workspace.get(lw_cfg())
    adapters.set_state_(ws.model, ws.initial_state())
    data = ws.client_data(0)[:16]
    before = evaluate(ws.model, data, task=ws.task, pad_id=ws.pad_id, device=ws.device)["loss"]
    cfg = dataclasses.replace(ws.cfg.train, local_steps=15, batch_size=8, lr=2e-2)
    train_local(
        ws.model,
        data,
        cfg,
        task=ws.task,
        pad_id=ws.pad_id,
        device=ws.device,
        generator=torch.Generator().manual_seed(0),
    )
    after = evaluate(ws.model, data, task=ws.task, pad_id=ws.pad_id, device=ws.device)["loss"]
    adapters.set_state_(ws.model, ws.initial_state())
    assert after < before - 0.05


# --- tokenization ------------------------------------------------------------------------------


def test_only_the_text_is_truncated():
    cfg = lw_cfg(**{"model.max_length": 16})
    ws = workspace.get(cfg)
    tok = ws.tokenizer
    long_text = "this film is " + "really " * 40 + "good"
    ids = ws.tokenize([{"text": long_text, "label": 1}])[0]["input_ids"]
    head = tok("Review:", add_special_tokens=False)["input_ids"]
    tail = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert len(ids) == 16
    assert ids[: len(head)] == head and ids[-len(tail) :] == tail
    text_ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert ids[len(head) : -len(tail)] == text_ids[: 16 - len(head) - len(tail)]  # the text's start is kept
    short = ws.tokenize([{"text": "good", "label": 1}])[0]["input_ids"]
    assert short == tok("Review: good\nSentiment:", add_special_tokens=False)["input_ids"]  # untouched when it fits


def test_config_round_trips_through_toml():
    cfg = lw_cfg()
    assert "\n" in cfg.label_words.template
    assert config.from_dict(__import__("tomllib").loads(config.to_toml(cfg))) == cfg
    flat = lw_cfg(**{"label_words.words": [" bad", " good"]})  # one word per class, written flat
    assert flat.label_words.words == ((" bad",), (" good",))


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"label_words.template": "Review: {txt}\nSentiment:"}, "label_words.template"),
        ({"label_words.template": "{text} and {text}"}, "label_words.template"),
        ({"label_words.words": [[" negative"], []]}, "label_words.words"),
        ({"label_words.words": [[" negative"], [""]]}, "label_words.words"),
        ({"label_words.words": [[" good"], [" good"]]}, "label_words.words"),
        ({"label_words.words": "negative"}, "label_words.words"),
        ({"label_words.template": ""}, "label_words.template"),
        ({"model.task": "auto"}, "label_words"),
        ({"adapter.method": "head"}, "adapter.method"),
    ],
)
def test_bad_label_words_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        lw_cfg(**overrides)


@pytest.mark.parametrize(
    "word, why", [(" 😀", "unknown token"), (" é", "decodes back"), (" Negative", "the tokens of ' negative'")]
)  # MiniLM's vocabulary is uncased
def test_a_word_the_tokenizer_cannot_encode_is_refused_before_training(word, why):
    cfg = lw_cfg(**{"label_words.words": [[" negative"], [" positive", word]]})
    with pytest.raises(ConfigError, match=rf"label_words\.words: .*{why}"):
        workspace.build(cfg)
    with pytest.raises(ConfigError, match=r"label_words\.words"):
        workspace.check_data(cfg)


def test_a_class_count_other_than_the_datas_is_refused():
    cfg = lw_cfg(**{"label_words.words": [[" negative"], [" neutral"], [" positive"]]})
    with pytest.raises(ConfigError, match=r"label_words\.words: names 3 classes but the data has 2 labels"):
        workspace.check_data(cfg)
    ws = workspace.build(cfg)
    with pytest.raises(ConfigError, match=r"label_words\.words"):
        ws.client_data(0)


def test_check_config_runs_the_set_up_checks(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(
        (CONFIGS / "tiny.toml").read_text() + "\n[label_words]\n"
        'template = "Review: {text}\\nSentiment:"\nwords = [[" negative"], [" 😀"]]\n'
    )
    args = ["check-config", "--config", str(path), "--set", "model.name=tiny-llama", "--set", "model.task=label-words"]
    assert cli_main(args) == 2
    assert "label_words.words" in capsys.readouterr().err
    assert (
        cli_main(
            [
                *args[:-4],
                "--set",
                "model.name=tiny-llama",
                "--set",
                "model.task=label-words",
                "--set",
                'label_words.words=[[" negative"], [" positive"]]',
            ]
        )
        == 0
    )


def test_template_that_leaves_no_room_for_text_is_refused():
    with pytest.raises(ConfigError, match=r"model\.max_length"):
        workspace.check_data(lw_cfg(**{"model.max_length": 4}))


def test_a_sequence_classifier_is_refused():
    with pytest.raises(ConfigError, match=r"model\.task"):
        models.resolve(lw_cfg(**{"model.name": "tiny-bert"}).model)


# --- export ------------------------------------------------------------------------------------


def test_exported_adapter_reloads_with_peft_and_predicts_the_same(tmp_path):
    from peft import PeftModel

    ws = workspace.get(lw_cfg(**{"model.max_length": 128}))  # no review is cut: the user scores whole texts
    perturbed_(ws, seed=3)
    state = adapters.get_state(ws.model)
    ex = ws.test_data()[:24]
    batch = collate(ex, ws.pad_id, ws.task)
    ws.model.eval()
    with torch.no_grad():
        ours = labelwords.class_scores(ws.model, batch)
    workspace.export_adapter(ws, state, tmp_path / "adapter")
    spec = json.loads((tmp_path / "adapter" / labelwords.EXPORT_FILE).read_text())
    assert spec["template"] == TEMPLATE and spec["words"] == WORDS

    # as the README tells a user: a fresh base, peft's own loader, the spec's template and words
    base = models.load_base(ws.resolved, ws.cfg.model, ws.tokenizer, torch.device("cpu"))
    untuned = hand_scores(base, [e["input_ids"] for e in ex], ws.label_word_ids)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tok = ws.tokenizer
    word_ids = spec["word_token_ids"]
    assert word_ids == [[tok(w, add_special_tokens=False)["input_ids"] for w in ws_] for ws_ in spec["words"]]
    texts = [e["text"] for e in ws.test_examples()[:24]]
    prompts = [
        spec["prompt_prefix_token_ids"]
        + tok(spec["template"].replace("{text}", t), add_special_tokens=False)["input_ids"]
        for t in texts
    ]
    assert [e["input_ids"] for e in ex] == prompts
    theirs = hand_scores(reloaded, prompts, word_ids)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert (untuned - theirs).abs().max() > 1e-2  # the adapter was loaded: scores moved from the base's
    adapters.set_state_(ws.model, ws.initial_state())


# --- opacus -----------------------------------------------------------------------------------


def test_per_sample_gradients_through_the_label_word_loss(tmp_path):
    """DP-SGD's per-example gradients (opacus hooks, one forward pass per word prefix) equal
    each example's own gradient."""
    from torch.utils.data import DataLoader

    from fedtune.privacy import PrivacyConfig, make_private
    from fedtune.train import make_optimizer

    ws = workspace.build(lw_cfg())
    perturbed_(ws, seed=4)
    model = ws.model
    model.train()  # opacus wants training mode; adapter.dropout = 0 and the tiny Llama has none: one function
    ex = some_examples(ws, 4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = []
    for e in ex:
        loss = batch_loss(model, collate([e], ws.pad_id, ws.task), None)
        want.append(torch.autograd.grad(loss, [p for _, p in named]))
    loader = DataLoader(ex, batch_size=len(ex), collate_fn=lambda b: collate(b, ws.pad_id, ws.task))
    pt = make_private(
        model,
        make_optimizer(model, ws.cfg.train),
        loader,
        PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    try:
        batch = collate(ex, ws.pad_id, ws.task)
        batch_loss(pt.model, batch, None).backward()
        for i, grads in enumerate(want):
            for (name, p), g in zip(named, grads):
                torch.testing.assert_close(
                    p.grad_sample[i], g, atol=1e-6, rtol=1e-4, msg=lambda m, name=name, i=i: f"{name}, example {i}: {m}"
                )
        assert all(g.abs().max() > 0 for grads in want for g in grads[1::2])  # LoRA B: every gradient is live
    finally:
        pt.close()


# --- the federated loop, centralized, zero-shot ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"adapter.method": "dora"},
        {"adapter.method": "prompt"},
        {"compression.codec": "int8"},
        {
            "privacy.mode": "sample",
            "privacy.noise_multiplier": 0.5,
            "privacy.max_grad_norm": 1.0,
            "train.logit_adjustment": 1.0,
        },
        {"train.mode": "zo", "zo.local_steps": 4, "zo.lr": 1e-3},
    ],
    ids=["lora", "dora", "prompt", "int8", "dp-sgd", "zo"],
)
def test_federated_run_completes(tmp_path, overrides):
    cfg = lw_cfg(**{"federation.rounds": 2, "train.local_steps": 2, "data.max_test_examples": 64, **overrides})
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(not r.get("rejected") for r in rows), rows
    assert 0 <= summary["final"]["accuracy"] <= 1 and "macro_f1" in summary["final"]
    assert summary["final"]["examples"] == 64
    assert summary["task"] == "label-words"
    if cfg.train.mode == "backprop":
        assert (tmp_path / "adapter" / labelwords.EXPORT_FILE).is_file()


def test_a_client_round_trains_on_label_words(tmp_path):
    """One client round moves the adapter (the update is not zero) and reports a finite loss."""
    cfg = lw_cfg()
    ws = workspace.get(cfg)
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    msg = Message(
        RecordDict({"arrays": to_arrayrecord(ws.initial_state()), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=grid.node_ids[0],
        message_type=MessageType.TRAIN,
    )
    reply = grid.send_and_receive([msg])[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0 < reply.content["metrics"]["train_loss"] < 10


def test_zero_shot_and_centralized_run_dirs_report_side_by_side(tmp_path):
    from fedtune.centralized import run_centralized
    from fedtune.report import report
    from fedtune.zeroshot import run_zero_shot

    cfg = lw_cfg(**{"federation.rounds": 1, "train.local_steps": 2})
    zero = run_zero_shot(cfg, tmp_path / "zero")
    ws = workspace.get(cfg)
    with ws.model.disable_adapter():
        want = evaluate(ws.model, ws.test_data(), task=ws.task, pad_id=ws.pad_id, device=ws.device, num_labels=2)
    assert zero["mode"] == "zero-shot" and zero["final"]["accuracy"] == want["accuracy"]
    rows = [json.loads(x) for x in (tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0] and rows[0]["eval"]["accuracy"] == want["accuracy"]
    assert config.load(tmp_path / "zero" / "config.toml") == cfg
    run_centralized(cfg, tmp_path / "central")
    text, _ = report([tmp_path / "zero", tmp_path / "central"], plots=False)
    assert "zero-shot" in text and "centralized" in text
    assert f"{want['accuracy']:.4f}" in text


def test_zero_shot_is_the_base_model_whatever_the_adapter(tmp_path):
    from fedtune.zeroshot import run_zero_shot

    finals = [run_zero_shot(lw_cfg(**{"adapter.method": m}), tmp_path / m)["final"] for m in ("lora", "prompt")]
    assert finals[0] == finals[1]  # prompt tuning's virtual tokens are off too
