"""Local training details: mixed precision."""

import pytest
import torch

from fedtune import adapters, config, workspace
from fedtune.errors import ConfigError
from fedtune.train import bf16_is_fast, evaluate, forward_precision, run_precision, train_local


def _linear_output_dtypes(model):
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: seen.append(o.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return seen, hooks


@pytest.mark.parametrize(
    "mode,dtype",
    [
        ("no", torch.float32),
        ("bf16", torch.bfloat16),
        ("auto", torch.bfloat16 if bf16_is_fast(torch.device("cpu")) else torch.float32),
    ],
)
def test_mixed_precision_autocasts_the_forward_and_keeps_float32_weights(tiny_cfg, mode, dtype):
    cfg = tiny_cfg.replace(**{"train.mixed_precision": mode, "train.local_steps": 2})
    ws = workspace.get(cfg)
    adapters.set_state_(ws.model, ws.initial_state())
    seen, hooks = _linear_output_dtypes(ws.model)
    try:
        out = train_local(
            ws.model,
            ws.client_data(0),
            cfg.train,
            task=ws.task,
            pad_id=ws.pad_id,
            device=ws.device,
            generator=torch.Generator().manual_seed(0),
        )
        assert seen and set(seen) == {dtype}
        seen.clear()
        evaluate(ws.model, ws.test_data()[:8], task=ws.task, pad_id=ws.pad_id, device=ws.device, mixed_precision=mode)
        assert seen and set(seen) == {dtype}
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(torch.tensor(out["train_loss"]))
    assert all(v.dtype == torch.float32 for v in adapters.get_state(ws.model).values())
    # what a run's header and summary.json record is what the forward passes ran in
    assert forward_precision(ws.device, mode) == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def test_run_precision_names_half_precision_base_weights_whatever_the_autocast(tiny_cfg):
    def precision(dtype, mixed):
        return run_precision(tiny_cfg.replace(**{"model.dtype": dtype, "train.mixed_precision": mixed}))

    assert precision("bfloat16", "no") == "bf16" and precision("float16", "no") == "fp16"
    assert precision("float32", "no") == "fp32" and precision("float32", "bf16") == "bf16"
    cfg = tiny_cfg.replace(**{"model.dtype": "bfloat16", "train.mixed_precision": "no"})
    assert next(workspace.get(cfg).model.parameters()).dtype == torch.bfloat16


def test_mixed_precision_rejects_unknown_mode(tiny_cfg):
    with pytest.raises(ConfigError, match="mixed_precision"):
        config.from_dict({**tiny_cfg.to_dict(), "train": {**tiny_cfg.to_dict()["train"], "mixed_precision": "fp8"}})


def test_cosine_round_lr_anneals_from_lr_to_the_floor(tiny_cfg):
    import math

    from fedtune.train import round_lr

    t = tiny_cfg.replace(**{"train.lr": 1e-3, "train.lr_schedule": "cosine", "train.lr_min_ratio": 0.1}).train
    lrs = [round_lr(t, r, 5) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))  # midpoint: halfway
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert round_lr(tiny_cfg.train, 3, 5) == tiny_cfg.train.lr  # constant by default


def test_clients_train_at_the_round_lr(tiny_cfg, tmp_path):
    """Round 2 of 2 with a cosine schedule to a zero floor: the client trains at lr 0 and sends a zero delta."""
    from fedtune.flower.client import handle_train
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.server import ServerLoop

    cfg = tiny_cfg.replace(
        **{"federation.rounds": 2, "train.lr_schedule": "cosine", "train.lr_min_ratio": 0.0, "train.local_steps": 2}
    )
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    loop = ServerLoop(cfg, tmp_path, progress=lambda s: None)
    loop.main(grid)
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["eval"]["loss"] != rows[0]["eval"]["loss"]  # round 1 learned at lr
    assert rows[2]["eval"]["loss"] == pytest.approx(rows[1]["eval"]["loss"], abs=1e-7)  # round 2: lr 0


def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_states(tiny_cfg):
    from fedtune.data import collate

    ws = workspace.get(tiny_cfg.replace(**{"model.pooling": "mean"}))
    model = ws.model.get_base_model().eval()
    short, long = ws.test_data()[0], max(ws.test_data()[:50], key=lambda d: len(d["input_ids"]))
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = collate([short, long], ws.pad_id, ws.task)
    with torch.no_grad():
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        assert torch.allclose(out.pooler_output, expected, atol=1e-6)
        # padding does not change a sentence's logits: alone == next to a longer one
        alone = collate([short], ws.pad_id, ws.task)
        logits_alone = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        logits_batch = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits_alone[0], logits_batch[0], atol=1e-5)


def test_mean_pooling_is_refused_for_a_causal_lm(tiny_cfg):
    with pytest.raises(ConfigError, match="pooling"):
        workspace.get(tiny_cfg.replace(**{"model.name": "tiny-llama", "model.pooling": "mean"}))


def test_head_only_trains_only_the_classifier_and_the_frozen_lora_stays_an_identity(tiny_cfg):
    ws = workspace.get(tiny_cfg.replace(**{"adapter.method": "head", "train.lr": 1e-2}))
    adapters.set_state_(ws.model, ws.initial_state())
    keys = adapters.trainable_keys(ws.model)
    assert keys and all(".classifier." in k for k in keys), keys
    before = adapters.get_state(ws.model)
    assert any(".lora_B." in k for k in before) and all(not before[k].any() for k in before if ".lora_B." in k)
    train_local(
        ws.model,
        ws.client_data(0),
        ws.cfg.train,
        task=ws.task,
        pad_id=ws.pad_id,
        device=ws.device,
        generator=torch.Generator().manual_seed(0),
        steps=3,
    )
    after = adapters.get_state(ws.model)
    for k in before:
        assert torch.equal(before[k], after[k]) != (k in keys), k  # exactly the trainable keys moved


def test_head_only_is_refused_for_a_causal_lm_and_with_factor_aggregation(tiny_cfg):
    with pytest.raises(ConfigError, match="head"):
        workspace.get(tiny_cfg.replace(**{"model.name": "tiny-llama", "adapter.method": "head"}))
    with pytest.raises(ConfigError, match="lora_mode"):
        tiny_cfg.replace(**{"adapter.method": "head", "aggregation.lora_mode": "exact"})


def test_ffa_trains_b_and_the_head_but_no_a(tiny_cfg):
    ws = workspace.get(tiny_cfg.replace(**{"adapter.ffa": True, "aggregation.lora_mode": "ffa"}))
    keys = adapters.trainable_keys(ws.model)
    assert any(".lora_B." in k for k in keys) and any(".classifier." in k for k in keys)
    assert not any(".lora_A." in k for k in keys)
