"""LoRA-SB / Fed-SB (``adapter.method = "lora-sb"``): W + s B R A with A, B fixed and only R trained.

References: the adapted model against ``W + s B R A`` put into a copy of the base by
hand, the export against peft's own loader, opacus' per-example gradients against
per-example autograd, and a federated run against one client's own update.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import adapters, config, lorasb, workspace
from fedtune.config import CLASSIFICATION, AdapterConfig
from fedtune.errors import ConfigError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import array_data_bytes, from_arrayrecord, to_arrayrecord
from fedtune.flower.server import ServerLoop

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

SB = {"adapter.method": "lora-sb"}
TARGETS = ("query", "value")


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def _sb(base, r: int = 4, seed: int = 0):
    return adapters.wrap(
        base, AdapterConfig(method="lora-sb", r=r, alpha=8.0, target_modules=TARGETS, init_seed=seed), CLASSIFICATION
    )


def _sb_layers(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, lorasb.CORE)}


def _randomize_cores_(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{lorasb.CORE}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _ids(n: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (n, length), generator=g)


# ---------------------------------------------------------------- the adapter itself


def test_only_the_cores_and_head_train():
    model = _sb(_tiny_bert(), r=4)
    layers = _sb_layers(model)
    assert len(layers) == 2 * len(TARGETS)  # 2 BERT layers x (query, value)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{lorasb.CORE}." in n or "classifier" in n for n in trainable), sorted(trainable)
    cores = [p for n, p in trainable.items() if f".{lorasb.CORE}." in n]
    assert len(cores) == len(layers) and all(p.shape == (4, 4) for p in cores)
    with model.disable_adapter():  # peft re-enables the adapter on exit: A and B must stay frozen
        pass
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    keys = adapters.trainable_keys(model)
    assert sum(k.endswith(f"{lorasb.CORE}.weight") for k in keys) == len(layers)
    assert not any("lora_A" in k or "lora_B" in k for k in keys)
    # the adapter state holds the fixed factors too, and round-trips through peft's (de)serialisation
    state = adapters.get_state(model)
    assert any(k.endswith("lora_A.weight") for k in state) and set(keys) <= set(state)
    noisy = {k: v + 1.0 for k, v in state.items()}
    adapters.set_state_(model, noisy)
    assert all(torch.equal(adapters.get_state(model)[k], noisy[k]) for k in noisy)


def test_factors_are_fixed_by_the_seed_and_the_start_is_the_base_model():
    base = _tiny_bert()
    with torch.no_grad():
        want = base(input_ids=_ids()).logits
    a, b, c = _sb(copy.deepcopy(base), seed=3), _sb(_tiny_bert(), seed=3), _sb(_tiny_bert(), seed=4)

    def factors(m):
        return {k: v for k, v in adapters.get_state(m).items() if "lora_A" in k or "lora_B" in k}

    fa, fb, fc = factors(a), factors(b), factors(c)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)  # every party draws the same factors
    assert all(not torch.equal(fa[k], fc[k]) for k in fa)
    assert all(torch.count_nonzero(v) == v.numel() for v in fa.values())  # non-zero: R gets a gradient
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=_ids()).logits, want)  # R = 0: exactly the base model


def test_output_equals_base_plus_s_B_R_A_by_hand():
    base = _tiny_bert()
    reference, original = copy.deepcopy(base), copy.deepcopy(base)
    model = _sb(base, r=4)
    _randomize_cores_(model)
    with torch.no_grad():
        for name, layer in _sb_layers(model).items():
            a = layer.lora_A["default"].weight
            b = layer.lora_B["default"].weight
            r = getattr(layer, lorasb.CORE)["default"].weight
            s = 8.0 / 4  # alpha / r
            target = reference.get_submodule(name.removeprefix("base_model.model."))
            target.weight += s * b @ r @ a
        got, want = model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits
        plain = original(input_ids=_ids()).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the cores do change the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # peft's own merge goes through the same variant and gives the same model
    with torch.no_grad():
        merged = model.merge_and_unload()(input_ids=_ids()).logits
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


def test_local_training_moves_only_the_cores_and_head(tiny_cfg):
    from fedtune.train import train_local

    cfg = tiny_cfg.replace(**SB)
    ws = workspace.get(cfg)
    adapters.set_state_(ws.model, ws.initial_state())
    before = {n: p.detach().clone() for n, p in ws.model.named_parameters()}
    train_local(
        ws.model,
        ws.client_data(0),
        cfg.train,
        task=ws.task,
        pad_id=ws.pad_id,
        device=ws.device,
        generator=torch.Generator().manual_seed(0),
    )
    for n, p in ws.model.named_parameters():
        assert torch.equal(p, before[n]) == (not p.requires_grad), n
    adapters.set_state_(ws.model, ws.initial_state())


def test_opacus_per_example_gradients_of_the_cores_match_autograd():
    from torch.utils.data import DataLoader, TensorDataset

    from fedtune.privacy import PrivacyConfig, make_private

    model = _sb(_tiny_bert())
    model.train()
    _randomize_cores_(model)
    ids = _ids(n=3)
    y = torch.tensor([0, 1, 1])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = []
    for i in range(3):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=y[i : i + 1]).loss.backward()
        reference.append({n: p.grad.clone() for n, p in trainable.items()})
    model.zero_grad()
    loader = DataLoader(TensorDataset(ids, y), batch_size=3)
    pt = make_private(
        model,
        torch.optim.SGD(list(trainable.values()), lr=0.1),
        loader,
        PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    pt.model(input_ids=ids, labels=y).loss.backward()
    for n, p in trainable.items():
        assert p.grad_sample.shape == (3, *p.shape), n
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], reference[i][n], atol=1e-5, rtol=1e-4)
    assert any(f".{lorasb.CORE}." in n and reference[0][n].abs().sum() > 0 for n in trainable)
    pt.close()


# ---------------------------------------------------------------- export: a plain LoRA for peft's loader


LLM = {
    "model.name": "tiny-llama",
    "data.dataset": "chatterbot",
    "data.partition": "domain",
    "data.domains": ["science", "history", "sports", "ai"],
    "data.max_test_examples": 24,
}


@pytest.mark.parametrize("model", [{}, LLM], ids=["tiny-bert", "tiny-llama"])
def test_export_folds_R_into_B_and_loads_with_peft(tiny_cfg, tmp_path, model):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedtune import models

    cfg = tiny_cfg.replace(**SB, **model)
    ws = workspace.get(cfg)
    if model:  # a causal LM has no head: only the cores train
        assert ws.trainable_keys() and all(k.endswith(f"{lorasb.CORE}.weight") for k in ws.trainable_keys())
    state = ws.initial_state()
    g = torch.Generator().manual_seed(5)
    state = {k: (torch.randn(v.shape, generator=g) * 0.5 if lorasb.CORE in k else v) for k, v in state.items()}
    workspace.export_adapter(ws, state, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert not any(lorasb.CORE in k for k in saved)
    spec = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert spec["peft_type"] == "LORA" and spec["r"] == cfg.adapter.r
    base = models.load_base(ws.resolved, cfg.model, ws.tokenizer, torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert not lorasb.is_lora_sb(loaded)
    ws.model.eval()
    batch = {"input_ids": _ids(4, 9) % len(ws.tokenizer)}
    with torch.no_grad():
        want, got = ws.model(**batch).logits, loaded(**batch).logits
        plain = models.load_base(ws.resolved, cfg.model, ws.tokenizer, torch.device("cpu")).eval()(**batch).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the cores do change the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    adapters.set_state_(ws.model, ws.initial_state())


# ---------------------------------------------------------------- federated: bytes, exactness, composition


def _expected_update_bytes(ws) -> int:
    r = ws.cfg.adapter.r
    layers = len(_sb_layers(ws.model))
    head = sum(p.numel() for n, p in ws.model.named_parameters() if p.requires_grad and "classifier" in n)
    return 4 * (layers * r * r + head)


def test_only_the_cores_and_head_go_on_the_wire(tiny_cfg):
    cfg = tiny_cfg.replace(**SB)
    ws = workspace.get(cfg)
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    msg = Message(
        RecordDict({"arrays": to_arrayrecord(ws.initial_state()), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=grid.node_ids[0],
        message_type=MessageType.TRAIN,
    )
    reply = grid.send_and_receive([msg])[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    update = reply.content["update"]
    assert set(from_arrayrecord(update)) == set(ws.trainable_keys())
    assert array_data_bytes(update) == _expected_update_bytes(ws) == 4 * adapters.num_trainable(ws.model)


def test_fedavg_of_identical_updates_is_that_update_and_the_export_folds_it(tiny_cfg, tmp_path):
    """Every client trains partition 0 with the same seed: the global after one round is start + that
    update, the bytes per client are the cores and head, and the export's B is B (R0 + dR)."""
    from safetensors.torch import load_file

    cfg = tiny_cfg.replace(**{**SB, "federation.rounds": 1})
    ws = workspace.get(cfg)
    start = ws.initial_state()

    def client(msg, ctx):
        ctx.node_config["partition-id"] = 0
        return handle_train(msg, ctx, cfg)

    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, client))
    assert summary["final"]["accuracy"] >= 0
    single = LocalGrid(cfg.federation.num_clients, client).send_and_receive(
        [
            Message(
                RecordDict({"arrays": to_arrayrecord(start), "config": ConfigRecord({"server-round": 1})}),
                dst_node_id=1000,
                message_type=MessageType.TRAIN,
            )
        ]
    )[0]
    delta = from_arrayrecord(single.content["update"])
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    payload = _expected_update_bytes(ws)
    assert all(payload <= b <= payload + 200 * len(delta) + 512 for b in row["bytes_up_per_client"].values())
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))

    def exported_key(k):
        return next(e for e in exported if e.endswith(k.split("base_model.model.")[-1]))

    for k, d in delta.items():
        if lorasb.CORE in k:
            b_key = k.replace(f"{lorasb.CORE}.weight", "lora_B.weight")
            want = start[b_key] @ (start[k] + d)
            torch.testing.assert_close(exported[exported_key(b_key)], want, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(exported[exported_key(k)], start[k] + d, rtol=1e-5, atol=1e-6)


def test_mean_of_cores_is_the_mean_of_the_updates():
    """Fed-SB's exactness: B mean(R_i) A = mean(B R_i A), where averaging LoRA's A and B is not."""
    g = torch.Generator().manual_seed(0)
    a, b = lorasb.fixed_factors(4, 24, 20, g)
    cores = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    a, b = a.double(), b.double()
    torch.testing.assert_close(b @ torch.stack(cores).mean(0) @ a, torch.stack([b @ r @ a for r in cores]).mean(0))


@pytest.mark.parametrize(
    "overrides",
    [
        {"compression.codec": "int8"},
        {"privacy.mode": "client-central", "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 1.0},
        {
            "privacy.mode": "sample",
            "privacy.noise_multiplier": 1.0,
            "privacy.max_grad_norm": 1.0,
            "train.batch_size": 16,
            "train.physical_batch_size": 4,
        },
        {"train.mode": "zo"},
        {
            "adapter.sb_factors": "gradient",
            "adapter.sb_public_data": "imdb",
            "adapter.sb_public_examples": 8,
            "privacy.mode": "sample",
            "privacy.noise_multiplier": 1.0,
            "privacy.max_grad_norm": 1.0,
        },
    ],
    ids=["int8-codec", "client-central-dp", "dp-sgd-physical-batches", "zeroth-order", "public-gradient-factors-dp"],
)
def test_short_federated_runs_compose(tiny_cfg, tmp_path, overrides):
    cfg = tiny_cfg.replace(**{**SB, **overrides})
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["accepted"] == 4 for r in rows[1:])
    dense = _expected_update_bytes(workspace.get(cfg))
    per_client = [b for r in rows[1:] for b in r["bytes_up_per_client"].values()]
    if "compression.codec" in overrides:
        assert max(per_client) < dense  # int8: a quarter of the values' bytes plus headers
    elif "train.mode" not in overrides:  # ZO sends (seed, scalar) pairs instead
        assert min(per_client) >= dense
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if overrides.get("privacy.mode") == "sample":
        assert summary["privacy"]["epsilon"] > 0


# ---------------------------------------------------------------- config: compose or refuse


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            {"aggregation.lora_mode": "exact"},
            "aggregation.lora_mode: 'exact' cannot be combined with adapter.method = 'lora-sb'",
        ),
        (
            {"aggregation.lora_mode": "ffa", "adapter.ffa": False},
            "aggregation.lora_mode: 'ffa' cannot be combined with adapter.method = 'lora-sb'",
        ),
        (
            {"aggregation.lora_mode": "hetero", "aggregation.client_ranks": [4, 8]},
            "aggregation.lora_mode: 'hetero' re-factors A and B",
        ),
        ({"adapter.ffa": True}, "adapter.ffa: FFA-LoRA trains B"),
    ],
)
def test_refuses_what_does_not_compose(tiny_cfg, overrides, needle):
    with pytest.raises(ConfigError) as exc:
        tiny_cfg.replace(**{**SB, **overrides})
    assert needle in str(exc.value)


def test_all_problems_at_once_and_what_composes(tiny_cfg):
    with pytest.raises(ConfigError) as exc:
        tiny_cfg.replace(**{**SB, "aggregation.lora_mode": "exact", "train.mode": "zo", "train.physical_batch_size": 4})
    msg = str(exc.value)
    assert "aggregation.lora_mode: 'exact' cannot be combined with adapter.method = 'lora-sb'" in msg
    assert "train.physical_batch_size: cannot be combined with train.mode = 'zo'" in msg
    for ok in (
        {"aggregation.secure": "secagg+"},
        {
            "aggregation.secure": "secagg+",
            "privacy.mode": "sample",
            "privacy.noise_multiplier": 1.0,
            "privacy.max_grad_norm": 1.0,
        },
        {"compression.codec": "sign", "compression.downlink": "int8"},
        {"aggregation.robust": "median"},
    ):
        assert tiny_cfg.replace(**{**SB, **ok}).adapter.method == "lora-sb"
    assert config.load(None, {"adapter.method": "lora-sb"}).adapter.method == "lora-sb"


# ---------------------------------------------------------------- where the fixed factors come from (adapter.sb_factors)


def test_svd_factors_are_the_top_singular_vectors_against_numpy():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 24, generator=g)
    a, b = lorasb.svd_factors(w, 4)
    assert a.shape == (4, 24) and b.shape == (20, 4) and a.dtype == b.dtype == torch.float32
    u, s, vh = np.linalg.svd(w.double().numpy())
    # the subspaces (sign-free): B B^T = U_r U_r^T, A^T A = V_r V_r^T
    np.testing.assert_allclose((b @ b.T).numpy(), u[:, :4] @ u[:, :4].T, atol=1e-5)
    np.testing.assert_allclose((a.T @ a).numpy(), vh[:4].T @ vh[:4], atol=1e-5)
    # and the pairing: B^T W A^T is diag(s_1..s_r) with positive entries
    np.testing.assert_allclose((b.T @ w @ a.T).numpy(), np.diag(s[:4]), atol=1e-4)
    # the sign rule: each column of B has its largest-magnitude entry positive
    assert all(b[b[:, j].abs().argmax(), j] > 0 for j in range(4))
    a2, b2 = lorasb.svd_factors(-w, 4)  # -W = U (-S) V^T: the rule picks the same U, so A flips
    torch.testing.assert_close(b2, b)
    torch.testing.assert_close(a2, -a)
    with pytest.raises(ConfigError, match=r"adapter.r: .*20 x 24 weight has 20.*\(got 21\)"):
        lorasb.svd_factors(w, 21)


def _factors(model):
    return {k: v for k, v in adapters.get_state(model).items() if "lora_A" in k or "lora_B" in k}


def test_svd_factors_on_the_model_and_the_start_is_the_base_model():
    base = _tiny_bert()
    with torch.no_grad():
        want = base(input_ids=_ids()).logits
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(TARGETS)}
    model = adapters.wrap(
        base,
        AdapterConfig(method="lora-sb", r=4, alpha=8.0, target_modules=TARGETS, sb_factors="svd"),
        CLASSIFICATION,
    )
    for name, layer in _sb_layers(model).items():
        a, b = lorasb.svd_factors(weights[name.removeprefix("base_model.model.")], 4)
        assert torch.equal(layer.lora_A["default"].weight, a) and torch.equal(layer.lora_B["default"].weight, b)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, want)


GRADIENT = {**SB, "adapter.sb_factors": "gradient", "adapter.sb_public_data": "imdb", "adapter.sb_public_examples": 12}


def test_gradient_factors_are_the_svd_of_the_public_gradient_by_hand(tiny_cfg):
    """LoRA-SB's initialisation on public data: the factors against numpy's SVD of the full-weight
    gradient of Hugging Face's own loss on the same public examples, and the core's first gradient on
    them is then s * diag(top singular values)."""
    import numpy as np

    from fedtune import data

    cfg = tiny_cfg.replace(**GRADIENT)
    ws = workspace.build(cfg)
    public = data.public_sample(cfg.data, "imdb", 12, cfg.adapter.init_seed, ws.task)
    assert len(public) == 12 and {e["text"] for e in public}.isdisjoint(e["text"] for e in ws.test_examples())
    batch = data.collate(ws.tokenize(public), ws.pad_id, ws.task)
    # the reference: the same run with random factors and R = 0 is the base model (and the same head)
    ref = workspace.build(tiny_cfg.replace(**SB)).model.eval()
    layers = {n: m for n, m in ref.named_modules() if hasattr(m, lorasb.CORE)}
    for m in layers.values():
        m.get_base_layer().weight.requires_grad_(True)
    ref(**batch).loss.backward()
    s = cfg.adapter.alpha / cfg.adapter.r
    got_layers = _sb_layers(ws.model)
    assert set(got_layers) == set(layers)
    ws.model.eval()
    ws.model(**batch).loss.backward()
    for name, m in layers.items():
        grad = m.get_base_layer().weight.grad.double().numpy()
        u, sv, vh = np.linalg.svd(grad)
        r = cfg.adapter.r
        a = got_layers[name].lora_A["default"].weight.detach()
        b = got_layers[name].lora_B["default"].weight.detach()
        np.testing.assert_allclose((b @ b.T).double().numpy(), u[:, :r] @ u[:, :r].T, atol=1e-4)
        np.testing.assert_allclose((a.T @ a).double().numpy(), vh[:r].T @ vh[:r], atol=1e-4)
        core_grad = getattr(got_layers[name], lorasb.CORE)["default"].weight.grad
        np.testing.assert_allclose(core_grad.double().numpy(), s * np.diag(sv[:r]), rtol=1e-3, atol=1e-6)
    ws.model.zero_grad(set_to_none=True)
    # every party computes the same factors; they are not the random ones; nothing else of the model moved
    again = workspace.build(cfg)
    assert all(torch.equal(v, _factors(again.model)[k]) for k, v in _factors(ws.model).items())
    rand = _factors(workspace.build(tiny_cfg.replace(**SB)).model)
    assert all(not torch.equal(v, rand[k]) for k, v in _factors(ws.model).items())
    assert not any(p.requires_grad for n, p in ws.model.named_parameters() if "base_layer" in n)
    with torch.no_grad():
        torch.testing.assert_close(ws.model(**batch).logits, ref(**batch).logits)


def _trained_head(model):
    """The classifier linear layer the forward runs: peft's trained copy when it wraps the head."""
    head = model.get_base_model().classifier
    return head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head


def test_gradient_factors_through_the_public_prototype_head_by_hand(tiny_cfg):
    """``adapter.sb_gradient_head = "prototypes"``: the factors are the SVD of the gradient taken through
    the public examples' nearest-class-mean head, built here by hand from the vectors the base model's
    head receives (class means rounded to float16, bias -|mu_c|^2 / 2); the model keeps its seeded head."""
    import numpy as np

    from fedtune import data

    cfg = tiny_cfg.replace(**{**GRADIENT, "adapter.sb_gradient_head": "prototypes"})
    ws = workspace.build(cfg)
    public = data.public_sample(cfg.data, "imdb", 12, cfg.adapter.init_seed, ws.task)
    batch = data.collate(ws.tokenize(public), ws.pad_id, ws.task)
    labels = batch["labels"]
    assert set(labels.tolist()) == {0, 1}
    ref = workspace.build(tiny_cfg.replace(**SB)).model.eval()
    head = _trained_head(ref)
    seen = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        ref(**{k: v for k, v in batch.items() if k != "labels"})
    hook.remove()
    means = torch.stack([seen[0][labels == c].mean(0) for c in (0, 1)]).to(torch.float16).to(torch.float32)
    seeded = (head.weight.detach().clone(), head.bias.detach().clone())
    with torch.no_grad():
        head.weight.copy_(means)
        head.bias.copy_((-0.5 * (means.double() ** 2).sum(1)).float())
    layers = {n: m for n, m in ref.named_modules() if hasattr(m, lorasb.CORE)}
    for m in layers.values():
        m.get_base_layer().weight.requires_grad_(True)
    ref(**batch).loss.backward()
    got = _sb_layers(ws.model)
    r = cfg.adapter.r
    for name, m in layers.items():
        u, _, vh = np.linalg.svd(m.get_base_layer().weight.grad.double().numpy())
        a = got[name].lora_A["default"].weight.detach()
        b = got[name].lora_B["default"].weight.detach()
        np.testing.assert_allclose((b @ b.T).double().numpy(), u[:, :r] @ u[:, :r].T, atol=1e-4)
        np.testing.assert_allclose((a.T @ a).double().numpy(), vh[:r].T @ vh[:r], atol=1e-4)
    # not the factors of the seeded head's gradient; the model's own head is the seeded one, bit for bit
    plain = _factors(workspace.build(tiny_cfg.replace(**GRADIENT)).model)
    assert all(not torch.allclose(v, plain[k], atol=1e-3) for k, v in _factors(ws.model).items())
    own = _trained_head(ws.model)
    assert torch.equal(own.weight, seeded[0]) and torch.equal(own.bias, seeded[1])


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"adapter.method": "lora", "adapter.sb_factors": "svd"}, "adapter.sb_factors: sets the fixed factors of"),
        ({**SB, "adapter.sb_factors": "gradient"}, "adapter.sb_public_data: sb_factors = 'gradient' takes"),
        ({**SB, "adapter.sb_public_data": "imdb"}, "adapter.sb_public_data: only sb_factors = 'gradient' reads it"),
        ({**SB, "adapter.sb_factors": "qr"}, "adapter.sb_factors: must be one of random, svd, gradient (got 'qr')"),
        (
            {**SB, "adapter.sb_gradient_head": "prototypes"},
            "adapter.sb_gradient_head: picks the head of sb_factors = 'gradient', and sb_factors is 'random'",
        ),
        (
            {**GRADIENT, "adapter.sb_gradient_head": "mean"},
            "adapter.sb_gradient_head: must be one of seeded, prototypes",
        ),
        (
            {**GRADIENT, "adapter.sb_gradient_head": "prototypes", "model.task": "label-words"},
            "adapter.sb_gradient_head: 'prototypes' builds a classification head from the public examples",
        ),
        (
            {
                **GRADIENT,
                "adapter.sb_public_data": "rotten_tomatoes",
                "privacy.mode": "sample",
                "privacy.noise_multiplier": 1.0,
                "privacy.max_grad_norm": 1.0,
            },
            "adapter.sb_public_data: the factors would be a gradient of data.dataset itself",
        ),
        (
            {**SB, "adapter.sb_factors": "svd", "model.quantization": "4bit", "model.device": "cuda"},
            "adapter.sb_factors: 'svd' factors the base weights or their gradient",
        ),
    ],
)
def test_factor_settings_refused_naming_the_key(tiny_cfg, overrides, needle):
    with pytest.raises(ConfigError) as exc:
        tiny_cfg.replace(**overrides)
    assert needle in str(exc.value)


def test_check_config_refuses_public_data_that_does_not_load_or_fit(tiny_cfg, tmp_path):
    from fedtune.workspace import check_data

    missing = tiny_cfg.replace(**{**GRADIENT, "adapter.sb_public_data": str(tmp_path / "none.csv")})
    with pytest.raises(ConfigError, match=r"adapter.sb_public_data: file not found: .*none.csv"):
        check_data(missing)
    with pytest.raises(ConfigError, match=r"adapter.sb_public_data: 'nope' is neither a bundled dataset"):
        check_data(tiny_cfg.replace(**{**GRADIENT, "adapter.sb_public_data": "nope"}))
    three = tmp_path / "three.csv"
    three.write_text("text,label\nfine,0\ngood,1\nbad,2\n")
    with pytest.raises(ConfigError, match=r"adapter.sb_public_data: .*labels up to class 2, and the model scores 2"):
        check_data(tiny_cfg.replace(**{**GRADIENT, "adapter.sb_public_data": str(three)}))


def test_prototype_gradient_head_refuses_a_public_sample_missing_a_class(tiny_cfg, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"fine film {i},0\n" for i in range(12)))
    cfg = tiny_cfg.replace(**{**GRADIENT, "adapter.sb_public_data": str(one), "adapter.sb_gradient_head": "prototypes"})
    with pytest.raises(ConfigError, match=r"adapter.sb_gradient_head: 'prototypes' needs every class .*\[1\] have no"):
        workspace.build(cfg)
