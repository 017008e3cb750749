"""Tests for fedtune.aggregation: LoRA-aware means, heterogeneous ranks, update checks, FedProx, config."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation import (
    AggregationConfig,
    ExactLoRA,
    FactoredHeteroLoRA,
    FFALoRA,
    Layout,
    LoraScaling,
    NaiveLoRA,
    cut_to_rank,
    dense_mean,
    factors_for_rank,
    ffa_mean,
    hetero_round,
    hetero_update,
    lora_layers,
    naive_mean,
    product_space_mean,
    proximal_term,
    refactor,
    to_dense,
    validate_update,
)
from fedtune.errors import ConfigError, PayloadError

torch.set_num_threads(1)

P = "base_model.model.bert.encoder.layer.0.attention.self"
Q, V = f"{P}.query", f"{P}.value"
HEAD = "base_model.model.classifier.modules_to_save.weight"
F64 = torch.float64


def client(gen: torch.Generator, r: int, *, dims=((6, 5), (4, 5)), b_zero=False, dtype=F64) -> dict[str, torch.Tensor]:
    """A peft-like state: LoRA on query (out 6) and value (out 4), in 5, plus a head."""
    state = {}
    for prefix, (out, inp) in zip((Q, V), dims):
        state[f"{prefix}.lora_A.weight"] = torch.randn(r, inp, generator=gen, dtype=dtype)
        b = torch.zeros(out, r, dtype=dtype) if b_zero else torch.randn(out, r, generator=gen, dtype=dtype)
        state[f"{prefix}.lora_B.weight"] = b
    state[HEAD] = torch.randn(2, 5, generator=gen, dtype=dtype)
    return state


def manual_dense(states, weights, scaling):
    """sum_i w_i s(r_i) B_i A_i per layer, computed by hand."""
    total = sum(weights)
    out = {}
    for prefix in (Q, V):
        acc = 0
        for s, w in zip(states, weights):
            a, b = s[f"{prefix}.lora_A.weight"], s[f"{prefix}.lora_B.weight"]
            acc = acc + (w / total) * scaling(prefix, a.shape[0]) * (b @ a)
        out[prefix] = acc
    return out


def products(state, scaling):
    return {p: to_dense(state, scaling)[f"{p}.lora_BA.weight"] for p in (Q, V)}


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def truncate_dense(m: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of m (Eckart-Young), by hand."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


SCALING = LoraScaling(lora_alpha=8)


# --------------------------------------------------------------------------- keys and scaling


def test_lora_layers_groups_pairs_and_leaves_other_keys():
    keys = [
        f"{Q}.lora_A.weight", f"{Q}.lora_B.weight", f"{Q}.lora_magnitude_vector", f"{Q}.lora_B.bias",
        "m.emb.lora_embedding_A", "m.emb.lora_embedding_B", HEAD, "prompt_embeddings",
    ]  # fmt: skip
    assert lora_layers(keys) == {
        Q: (f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"),
        "m.emb": ("m.emb.lora_embedding_A", "m.emb.lora_embedding_B"),
    }
    with pytest.raises(PayloadError, match="no matching"):
        lora_layers([f"{Q}.lora_A.weight"])


def test_lora_scaling_matches_peft_formulas():
    assert LoraScaling(16)(Q, 8) == 2.0
    assert LoraScaling(16, use_rslora=True)(Q, 4) == 8.0
    with pytest.raises(ConfigError, match="lora_alpha"):
        LoraScaling(0)


@pytest.mark.slow  # imports peft (~6 s CPU)
def test_dense_form_matches_peft_get_delta_weight():
    """Golden values from peft itself: keys, conv/embedding shapes and scaling (rsLoRA included)."""
    import peft  # a dependency of fedtune: a missing peft is a failure, not a skip
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.conv, self.head = (
                nn.Embedding(7, 5),
                nn.Linear(5, 4),
                nn.Conv2d(3, 4, 3),
                nn.Linear(4, 2),
            )

    torch.manual_seed(0)  # peft initialises through the global generator; not ours to control
    for rslora in (False, True):
        cfg = peft.LoraConfig(
            r=3, lora_alpha=6, use_rslora=rslora, target_modules=["emb", "lin", "conv"], modules_to_save=["head"]
        )
        model = peft.get_peft_model(Tiny(), cfg)
        for name, p in model.named_parameters():
            if "lora_" in name:  # B = 0 at init; give every factor a value
                with torch.no_grad():
                    p.copy_(torch.randn_like(p))
        state = {
            k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()
        }  # peft's share storage
        scaling = LoraScaling.from_peft_config(cfg)
        dense = to_dense(state, scaling)
        inner = model.base_model.model
        assert torch.allclose(
            dense["base_model.model.lin.lora_BA.weight"], inner.lin.get_delta_weight("default"), atol=1e-5
        )
        assert torch.allclose(
            dense["base_model.model.conv.lora_BA.weight"], inner.conv.get_delta_weight("default"), atol=1e-5
        )
        assert torch.allclose(
            dense["base_model.model.emb.lora_embedding_BA"], inner.emb.get_delta_weight("default").T, atol=1e-5
        )
        # exact aggregate of two clients loads back into peft with the right effective update
        other = {k: v + 0.1 * torch.randn_like(v) for k, v in state.items()}
        agg, report = product_space_mean([state, other], [1, 3], scaling)
        assert agg.keys() == state.keys() and all(agg[k].shape == state[k].shape for k in state)
        want = dense_mean([state, other], [1, 3], scaling)["base_model.model.lin.lora_BA.weight"]
        peft.set_peft_model_state_dict(model, agg)
        got = inner.lin.get_delta_weight("default").detach()
        assert rel(got.double(), want.double()) == pytest.approx(
            report.layers["base_model.model.lin"].residual, abs=1e-5
        )


# --------------------------------------------------------------------------- exact vs naive


def test_exact_equals_dense_mean_for_identical_clients():
    s = client(torch.Generator().manual_seed(0), r=3)
    out, report = product_space_mean([s, s, s], [1, 2, 3], SCALING)
    want = manual_dense([s], [1], SCALING)
    got = products(out, SCALING)
    for p in (Q, V):
        assert rel(got[p], want[p]) < 1e-12
        assert out[f"{p}.lora_A.weight"].shape == s[f"{p}.lora_A.weight"].shape
        assert report.layers[p].residual < 1e-12 and report.layers[p].numerical_rank == 3
    assert torch.allclose(out[HEAD], s[HEAD])
    assert report.total_residual < 1e-12


def test_exact_lossless_rank_equals_weighted_dense_mean_and_naive_does_not():
    gen = torch.Generator().manual_seed(1)
    states, weights = [client(gen, r=2) for _ in range(3)], [10, 20, 70]
    want = manual_dense(states, weights, SCALING)

    exact, report = product_space_mean(states, weights, SCALING, rank="lossless")
    assert exact[f"{Q}.lora_A.weight"].shape == (5, 5)  # min(2+2+2, out 6, in 5)
    assert exact[f"{V}.lora_B.weight"].shape == (4, 4)
    got = products(exact, SCALING)  # scaling at the grown rank: alpha / 5, alpha / 4
    for p in (Q, V):
        assert rel(got[p], want[p]) < 1e-12
    assert report.total_residual < 1e-12
    assert torch.allclose(exact[HEAD], sum(w * s[HEAD] for w, s in zip(weights, states)) / 100)

    naive, naive_report = naive_mean(states, weights)
    got_naive = products(naive, SCALING)
    for p in (Q, V):
        bias = rel(got_naive[p], want[p])
        assert bias > 0.1  # mean(B) mean(A) != mean(B A)
        assert naive_report.layers[p].residual == pytest.approx(bias, rel=1e-9)


def test_exact_truncation_is_best_rank_r_and_residual_is_reported():
    gen = torch.Generator().manual_seed(2)
    states = [client(gen, r=2) for _ in range(3)]
    out, report = product_space_mean(states, [1, 1, 2], SCALING, rank=2)
    want = manual_dense(states, [1, 1, 2], SCALING)
    got = products(out, SCALING)
    dropped = total = 0.0
    for p in (Q, V):
        u, s, vh = torch.linalg.svd(want[p])  # independent reference: Eckart-Young
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(got[p], best, atol=1e-10)
        assert report.layers[p].residual == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-9)
        assert report.layers[p].residual > 0.01
        dropped, total = dropped + float(s[2:].square().sum()), total + float(s.square().sum())
    assert report.total_residual == pytest.approx(math.sqrt(dropped / total), rel=1e-9)


def test_exact_scaling_can_be_a_float_or_per_layer_dict():
    gen = torch.Generator().manual_seed(3)
    states = [client(gen, r=2) for _ in range(2)]
    for scaling in (2.0, {Q: 2.0, V: 2.0}):
        out, _ = product_space_mean(states, [1, 1], scaling, rank="lossless")
        got, want = products(out, scaling), manual_dense(states, [1, 1], lambda p, r: 2.0)
        assert all(rel(got[p], want[p]) < 1e-12 for p in (Q, V))
    with pytest.raises(ConfigError, match="no entry"):
        product_space_mean(states, [1, 1], {Q: 2.0})


def orthogonal_rows(state: dict[str, torch.Tensor], norm: float = 0.6) -> dict[str, torch.Tensor]:
    """The same state with every A's rows made orthogonal, all of norm ``norm`` (like peft's init)."""
    out = dict(state)
    for prefix in (Q, V):
        a = state[f"{prefix}.lora_A.weight"]
        q, _ = torch.linalg.qr(a.mT)
        out[f"{prefix}.lora_A.weight"] = norm * q.mT
    return out


def test_exact_with_reference_keeps_the_incoming_basis():
    """One client, reference = its own state with orthogonal A rows: the SVD basis is undone."""
    s = orthogonal_rows(client(torch.Generator().manual_seed(4), r=3))
    out, _ = product_space_mean([s], [1], SCALING, reference=s)
    for k in s:
        assert torch.allclose(out[k], s[k], atol=1e-9), k
    # without a reference only the product is defined (balanced split, different factors)
    bal, _ = product_space_mean([s], [1], SCALING)
    assert not torch.allclose(bal[f"{Q}.lora_A.weight"], s[f"{Q}.lora_A.weight"])
    assert rel(products(bal, SCALING)[Q], products(s, SCALING)[Q]) < 1e-12


def test_exact_with_reference_gives_a_orthogonal_rows_at_the_reference_scale():
    """A = c R Q0: orthogonal rows at the reference's RMS row norm, B the magnitudes, product exact."""
    gen = torch.Generator().manual_seed(8)
    ref = client(gen, r=3)
    clients = [client(gen, r=3) for _ in range(3)]
    out, _ = product_space_mean(clients, [1, 2, 3], SCALING, reference=ref)
    want = manual_dense(clients, [1, 2, 3], SCALING)
    for prefix in (Q, V):
        a = out[f"{prefix}.lora_A.weight"]
        c = ref[f"{prefix}.lora_A.weight"].square().sum(dim=1).mean().sqrt()
        torch.testing.assert_close(a @ a.mT, c**2 * torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
        got = products(out, SCALING)[prefix]
        m_r = truncate_dense(want[prefix], 3)
        assert rel(got, m_r) < 1e-10


def test_exact_alignment_does_not_inflate_b_when_the_row_space_turns():
    """A reference almost orthogonal to the mean's row space used to give a near-singular change of
    basis, B blown up by 1e4 and a run that stopped learning; now ||B|| = ||s B A|| / (s c)."""
    out_dim, inp, r = 6, 12, 2
    ref_a = torch.zeros(r, inp, dtype=F64)
    ref_a[0, 0] = ref_a[1, 1] = 0.6
    ref = {f"{Q}.lora_A.weight": ref_a, f"{Q}.lora_B.weight": torch.zeros(out_dim, r, dtype=F64)}
    a = torch.zeros(r, inp, dtype=F64)
    a[0, 0], a[1, 2], a[1, 1] = 1.0, 1.0, 1e-4  # second direction turned almost fully away from e1
    b = torch.randn(out_dim, r, dtype=F64, generator=torch.Generator().manual_seed(9))
    state = {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b}
    out, _ = product_space_mean([state], [1], SCALING, reference=ref)
    scale = SCALING(Q, r)
    prod = scale * b @ a
    torch.testing.assert_close(scale * out[f"{Q}.lora_B.weight"] @ out[f"{Q}.lora_A.weight"], prod, rtol=0, atol=1e-12)
    assert math.isclose(float(out[f"{Q}.lora_B.weight"].norm()), float(prod.norm()) / (scale * 0.6), rel_tol=1e-9)


def test_exact_first_round_all_b_zero_keeps_a_and_stays_trainable():
    """B = 0 everywhere: the mean is 0, a naive SVD split would return A = B = 0 (dead for ever)."""
    g = client(torch.Generator().manual_seed(5), r=3, b_zero=True)
    out, report = product_space_mean([g, g], [1, 1], SCALING, reference=g)
    assert all(torch.equal(out[k], g[k]) or torch.allclose(out[k], g[k], atol=1e-12) for k in g)
    assert report.layers[Q].filled == 3 and report.total_residual == 0.0

    out, _ = product_space_mean([g, g], [1, 1], SCALING)  # no reference: A from the clients' rows
    for p in (Q, V):
        a, b = out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"]
        assert torch.count_nonzero(b) == 0 and torch.linalg.matrix_rank(a) == 3
        b = b.clone().requires_grad_(True)
        x = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
        (x @ a.T @ b.T).square().sum().backward()  # any loss will do; B must get a gradient
        assert b.grad is not None  # d/dB of sum((xA^T B^T)^2) is 0 at B = 0; check a linear loss too
        b.grad = None
        (x @ a.T @ b.T).sum().backward()
        assert float(b.grad.abs().sum()) > 0


def test_exact_rank_deficient_mean_fills_with_zero_b_columns():
    gen = torch.Generator().manual_seed(6)
    s = client(gen, r=3)
    s[f"{Q}.lora_B.weight"][:, 2] = 0  # this client's update has rank 2 in query
    out, report = product_space_mean([s], [1], SCALING)
    assert report.layers[Q].numerical_rank == 2 and report.layers[Q].filled == 1
    assert rel(products(out, SCALING)[Q], products(s, SCALING)[Q]) < 1e-12
    assert torch.linalg.matrix_rank(out[f"{Q}.lora_A.weight"]) == 3


def test_conv_and_embedding_layers_keep_their_shapes():
    gen = torch.Generator().manual_seed(7)

    def conv_state():
        return {
            "m.conv.lora_A.weight": torch.randn(2, 3, 3, 3, generator=gen, dtype=F64),
            "m.conv.lora_B.weight": torch.randn(4, 2, 1, 1, generator=gen, dtype=F64),
            "m.emb.lora_embedding_A": torch.randn(2, 9, generator=gen, dtype=F64),
            "m.emb.lora_embedding_B": torch.randn(5, 2, generator=gen, dtype=F64),
        }

    states = [conv_state(), conv_state()]
    out, _ = product_space_mean(states, [1, 1], 1.0, rank="lossless")
    assert out["m.conv.lora_A.weight"].shape == (4, 3, 3, 3) and out["m.conv.lora_B.weight"].shape == (4, 4, 1, 1)
    assert out["m.emb.lora_embedding_A"].shape == (4, 9)
    want, got = dense_mean(states, [1, 1], 1.0), to_dense(out, 1.0)
    assert want["m.conv.lora_BA.weight"].shape == (4, 3, 3, 3)
    for k in want:
        assert rel(got[k], want[k]) < 1e-12


def test_float32_states_come_back_float32():
    gen = torch.Generator().manual_seed(8)
    states = [client(gen, r=2, dtype=torch.float32) for _ in range(2)]
    out, _ = product_space_mean(states, [1, 1], SCALING, rank="lossless")
    assert all(v.dtype == torch.float32 for v in out.values())
    want = manual_dense(states, [1, 1], SCALING)
    assert rel(products(out, SCALING)[Q].double(), want[Q].double()) < 1e-5


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), r=st.integers(1, 3), rslora=st.booleans())
def test_property_lossless_is_exact_and_order_free(seed, n, r, rslora):
    gen = torch.Generator().manual_seed(seed)
    scaling = LoraScaling(4.0, use_rslora=rslora)
    states = [client(gen, r=r, dims=((8, 9), (3, 9))) for _ in range(n)]
    weights = [float(w) for w in torch.randint(1, 50, (n,), generator=gen)]
    want = manual_dense(states, weights, scaling)
    out, report = product_space_mean(states, weights, scaling, rank="lossless")
    rev, _ = product_space_mean(states[::-1], weights[::-1], scaling, rank="lossless")
    for p in (Q, V):
        assert rel(products(out, scaling)[p], want[p]) < 1e-10
        assert rel(products(rev, scaling)[p], want[p]) < 1e-10
    assert report.total_residual < 1e-10


# --------------------------------------------------------------------------- heterogeneous ranks


def test_factors_for_rank_round_trip():
    gen = torch.Generator().manual_seed(9)
    s = client(gen, r=3)
    dense = to_dense(s, SCALING)
    back = factors_for_rank(dense, 3, SCALING)
    assert back[f"{Q}.lora_A.weight"].shape == (3, 5) and back[f"{Q}.lora_B.weight"].shape == (6, 3)
    assert torch.allclose(back[HEAD], s[HEAD])
    for p in (Q, V):
        assert rel(products(back, SCALING)[p], products(s, SCALING)[p]) < 1e-12
    # from factors at rank 3 to rank 3 directly, and to a smaller rank (Eckart-Young)
    same, report = refactor(s, 3, SCALING)
    assert report.total_residual < 1e-12 and rel(products(same, SCALING)[V], products(s, SCALING)[V]) < 1e-12
    small = factors_for_rank(s, {Q: 1, V: 2}, SCALING)
    assert small[f"{Q}.lora_A.weight"].shape == (1, 5) and small[f"{V}.lora_B.weight"].shape == (4, 2)
    u, sv, vh = torch.linalg.svd(products(s, SCALING)[Q])
    assert torch.allclose(products(small, SCALING)[Q], sv[0] * torch.outer(u[:, 0], vh[0]), atol=1e-10)
    # the rank change is reflected in the scaling: alpha / 1 for the rank-1 factors
    a, b = small[f"{Q}.lora_A.weight"], small[f"{Q}.lora_B.weight"]
    assert torch.allclose(8.0 * b @ a, sv[0] * torch.outer(u[:, 0], vh[0]), atol=1e-10)


def test_mixed_ranks_average_in_product_space():
    gen = torch.Generator().manual_seed(10)
    states, weights = [client(gen, r=r) for r in (1, 2, 4)], [5, 3, 2]
    want = manual_dense(states, weights, SCALING)  # each client at its own scaling alpha / r_i
    dense = dense_mean(states, weights, SCALING)
    for p in (Q, V):
        assert rel(dense[f"{p}.lora_BA.weight"], want[p]) < 1e-12
    out, report = product_space_mean(states, weights, SCALING)  # default: the largest rank, 4
    assert out[f"{Q}.lora_A.weight"].shape == (4, 5)
    for p in (Q, V):
        assert rel(products(out, SCALING)[p], want[p]) == pytest.approx(report.layers[p].residual, abs=1e-12)
    for r in (1, 2, 4):
        assert factors_for_rank(dense, r, SCALING)[f"{V}.lora_B.weight"].shape == (4, r)


def test_hetero_update_keeps_what_low_rank_clients_cannot_hold():
    gen = torch.Generator().manual_seed(11)
    g = to_dense(client(gen, r=5), SCALING)  # global of rank 5
    sent = [factors_for_rank(g, r, SCALING) for r in (1, 5)]
    # clients that change nothing leave the global as it was ...
    same = hetero_update(g, sent, [1, 1], SCALING)
    for k in g:
        assert torch.allclose(same[k], g[k], atol=1e-10), k
    # ... while plain FlexLoRA drags it toward the rank-1 client's truncation
    flex = hetero_update(None, sent, [1, 1], SCALING)
    assert rel(flex[f"{Q}.lora_BA.weight"], g[f"{Q}.lora_BA.weight"]) > 0.05
    # a client's change is added once, weighted
    moved = dict(sent[0])
    moved[f"{Q}.lora_B.weight"] = moved[f"{Q}.lora_B.weight"] + 0.1
    new = hetero_update(g, [moved, sent[1]], [1, 3], SCALING)
    change = to_dense(moved, SCALING)[f"{Q}.lora_BA.weight"] - to_dense(sent[0], SCALING)[f"{Q}.lora_BA.weight"]
    assert torch.allclose(new[f"{Q}.lora_BA.weight"], g[f"{Q}.lora_BA.weight"] + 0.25 * change, atol=1e-10)


def test_hetero_round_matches_hand_computed_update_over_rounds():
    """G <- G + sum_i w_i (s_i B_i A_i - T_{r_i}(G)), with T_r the rank-r SVD truncation, done densely by hand;
    the global held as factors at rank R (5: exact here; 2: the best rank-2 approximation of that update)."""
    gen = torch.Generator().manual_seed(18)
    for rank, ranks in ((5, (1, 3, 5)), (2, (1, 2, 2))):
        glob = client(gen, r=rank)
        aggregator = FactoredHeteroLoRA(SCALING, rank)
        g = products(glob, SCALING)
        for _ in range(2):
            weights = [2.0, 1.0, 1.0]
            states = [
                {
                    k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=F64)
                    for k, v in cut_to_rank(glob, r, SCALING).items()
                }
                for r in ranks
            ]
            new, report = aggregator.aggregate(states, weights, reference=glob)
            dense = hetero_update(to_dense(glob, SCALING), states, weights, SCALING)  # the same update, pure and dense
            for p in (Q, V):
                sent = sum(w * truncate_dense(g[p], r) for r, w in zip(ranks, weights)) / 4
                exact = g[p] + manual_dense(states, weights, SCALING)[p] - sent
                assert rel(dense[f"{p}.lora_BA.weight"], exact) < 1e-10
                want = truncate_dense(exact, rank)
                assert new[f"{p}.lora_A.weight"].shape == (rank, 5)
                assert rel(products(new, SCALING)[p], want) < 1e-10
                sv = torch.linalg.svdvals(exact)
                assert report.layers[p].rank == min(rank, *exact.shape)  # value (4 x 5) holds at most rank 4
                assert report.layers[p].residual == pytest.approx(float(sv[rank:].norm() / sv.norm()), abs=1e-10)
                g[p] = want
            assert torch.allclose(new[HEAD], sum(w * st[HEAD] for w, st in zip(weights, states)) / 4)
            glob = new
    with pytest.raises(ValueError, match="reference"):
        aggregator.aggregate(states, weights)


def test_hetero_round_from_a_fresh_adapter():
    gen = torch.Generator().manual_seed(12)
    init = client(gen, r=4, b_zero=True)
    sent = {r: cut_to_rank(init, r, SCALING) for r in (2, 4)}
    for r, s in sent.items():
        assert s[f"{Q}.lora_A.weight"].shape == (r, 5)
        assert torch.count_nonzero(s[f"{Q}.lora_B.weight"]) == 0
        assert torch.linalg.matrix_rank(s[f"{Q}.lora_A.weight"]) == r  # trainable from round one
    trained = {
        r: {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in s.items()} for r, s in sent.items()
    }
    out, report = hetero_round(init, list(trained.values()), [1, 1], SCALING, 4)
    assert set(out) == set(init) and out[f"{Q}.lora_A.weight"].shape == (4, 5)
    assert report.layers[Q].numerical_rank == 5 and report.layers[Q].rank == 4  # 2 + 4 clipped at min(6, 5), cut to 4
    want = truncate_dense(manual_dense(list(trained.values()), [1, 1], SCALING)[Q], 4)  # B = 0: nothing to keep
    assert rel(products(out, SCALING)[Q], want) < 1e-10


# --------------------------------------------------------------------------- FFA-LoRA


def test_ffa_equals_exact_when_a_is_shared():
    gen = torch.Generator().manual_seed(13)
    base = client(gen, r=2)
    states = []
    for _ in range(3):
        s = dict(base)
        for p in (Q, V):
            s[f"{p}.lora_B.weight"] = torch.randn(s[f"{p}.lora_B.weight"].shape, generator=gen, dtype=F64)
        states.append(s)
    ffa, report = ffa_mean(states, [1, 2, 3], reference=base)
    exact, _ = product_space_mean(states, [1, 2, 3], SCALING)
    want = manual_dense(states, [1, 2, 3], SCALING)
    for p in (Q, V):
        assert torch.equal(ffa[f"{p}.lora_A.weight"], base[f"{p}.lora_A.weight"])
        assert rel(products(ffa, SCALING)[p], want[p]) < 1e-12
        assert rel(products(ffa, SCALING)[p], products(exact, SCALING)[p]) < 1e-12
    assert report.total_residual == 0.0

    states[1] = dict(states[1], **{f"{V}.lora_A.weight": base[f"{V}.lora_A.weight"] + 1e-3})
    with pytest.raises(PayloadError, match=r"client 1: .*value\.lora_A\.weight.*differs"):
        ffa_mean(states, [1, 2, 3])
    ffa_mean(states, [1, 2, 3], atol=1e-2)  # within tolerance


# --------------------------------------------------------------------------- aggregator, weights, keys


def test_aggregators_and_bad_inputs():
    gen = torch.Generator().manual_seed(14)
    states = [client(gen, r=2) for _ in range(2)]
    naive, _ = NaiveLoRA().aggregate(states, [1, 3])
    for k in (HEAD, f"{Q}.lora_A.weight", f"{V}.lora_B.weight"):  # each key averaged on its own
        assert torch.allclose(naive[k], (states[0][k] + 3 * states[1][k]) / 4)
    shared_a = [states[0], dict(states[1], **{k: v for k, v in states[0].items() if "lora_A" in k})]
    ffa, _ = FFALoRA().aggregate(shared_a, [1, 3])
    assert torch.equal(ffa[f"{Q}.lora_A.weight"], states[0][f"{Q}.lora_A.weight"])
    assert torch.allclose(
        ffa[f"{Q}.lora_B.weight"], (states[0][f"{Q}.lora_B.weight"] + 3 * states[1][f"{Q}.lora_B.weight"]) / 4
    )
    exact = ExactLoRA(SCALING, "lossless")
    out, _ = exact.aggregate(states, [1, 1], reference=states[0])
    assert out[f"{Q}.lora_A.weight"].shape == (4, 5)
    for weights, msg in (([1, -1], "weight of client 1"), ([0, 0], "positive"), ([1], "2 states but 1")):
        with pytest.raises(PayloadError, match=msg):
            product_space_mean(states, weights, SCALING)
    bad = dict(states[1])
    del bad[HEAD]
    with pytest.raises(PayloadError, match="client 1 has different keys"):
        naive_mean([states[0], bad], [1, 1])


# --------------------------------------------------------------------------- update validation


def test_validate_update_accepts_a_good_update_and_rejects_each_defect():
    gen = torch.Generator().manual_seed(15)
    glob = client(gen, r=2, dtype=torch.float32)
    layout = Layout.from_state(glob)
    good = {k: v + 0.01 for k, v in glob.items()}
    validate_update(good, layout, max_norm=1.0, reference=glob)

    a_key = f"{Q}.lora_A.weight"
    cases = {
        "non-finite": dict(
            good, **{a_key: good[a_key].clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan")))}
        ),
        "has shape": dict(good, **{a_key: torch.zeros(3, 5)}),
        "unexpected key": dict(good, extra=torch.zeros(1)),
        "missing key": {k: v for k, v in good.items() if k != HEAD},
        "has dtype": dict(good, **{a_key: good[a_key].double()}),
        "not a tensor": dict(good, **{a_key: [1.0]}),
    }
    for reason, update in cases.items():
        with pytest.raises(PayloadError, match=reason):
            validate_update(update, layout)
    inf = dict(good, **{HEAD: torch.full((2, 5), float("inf"))})
    with pytest.raises(PayloadError, match="10 non-finite"):
        validate_update(inf, layout)
    big = {k: v + 1.0 for k, v in glob.items()}
    with pytest.raises(PayloadError, match="exceeds max_update_norm=1"):
        validate_update(big, layout, max_norm=1.0, reference=glob)
    with pytest.raises(ConfigError, match="max_norm"):
        validate_update(good, layout, max_norm=-1.0)
    # all problems reported at once
    with pytest.raises(PayloadError, match="missing key.*unexpected key"):
        validate_update({**cases["missing key"], "extra": torch.zeros(1)}, layout)


def test_layout_for_rank_validates_heterogeneous_clients():
    glob = client(torch.Generator().manual_seed(16), r=4)
    layout = Layout.from_state(glob)
    assert layout.ranks() == {Q: 4, V: 4}
    small = layout.for_rank({Q: 2, V: 1})
    assert small[f"{Q}.lora_A.weight"] == ((2, 5), F64) and small[f"{V}.lora_B.weight"] == ((4, 1), F64)
    validate_update(factors_for_rank(glob, {Q: 2, V: 1}, SCALING), small)
    with pytest.raises(PayloadError, match="has shape"):
        validate_update(factors_for_rank(glob, 2, SCALING), small)
    validate_update(glob, dict(layout))  # a plain dict of (shape, dtype) works too


# --------------------------------------------------------------------------- FedProx


def test_proximal_term_value_and_gradient():
    gen = torch.Generator().manual_seed(17)
    w1 = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    w2 = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    frozen = torch.randn(2, generator=gen, dtype=F64)  # no requires_grad: ignored
    g = {"w1": torch.randn(3, 4, generator=gen, dtype=F64), "w2": torch.randn(5, generator=gen, dtype=F64)}
    mu = 0.3
    term = proximal_term([("w1", w1), ("w2", w2), ("frozen", frozen)], g, mu)
    want = mu / 2 * ((w1 - g["w1"]).square().sum() + (w2 - g["w2"]).square().sum())
    assert torch.allclose(term, want)
    term.backward()
    assert torch.allclose(w1.grad, mu * (w1.detach() - g["w1"]))
    assert torch.allclose(w2.grad, mu * (w2.detach() - g["w2"]))
    # on a module, added to a loss
    lin = torch.nn.Linear(3, 2)
    snap = {n: p.detach().clone() + 1.0 for n, p in lin.named_parameters()}
    loss = proximal_term(lin.named_parameters(), snap, 2.0)
    loss.backward()
    assert torch.allclose(lin.weight.grad, -2.0 * torch.ones(2, 3))
    assert float(proximal_term({"w1": w1}, g, 0.0).detach()) == 0.0
    with pytest.raises(ConfigError, match="proximal_mu"):
        proximal_term({"w1": w1}, g, -1.0)
    with pytest.raises(KeyError, match="w2"):
        proximal_term({"w2": w2}, {}, 0.1)


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_flower():
    c = AggregationConfig()
    assert (c.lora_mode, c.robust, c.server_optimizer, c.trim_beta, c.num_malicious) == (
        "naive",
        "none",
        "fedavg",
        0.2,
        0,
    )
    assert c.server_lr is None and c.proximal_mu is None
    adam = AggregationConfig(server_optimizer="fedadam")
    assert (adam.server_lr, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)
    assert AggregationConfig(server_optimizer="fedyogi").server_lr == 1e-2
    m = AggregationConfig(server_optimizer="fedavgm", server_momentum=0.9)
    assert (m.server_lr, m.server_momentum, m.beta_1) == (1.0, 0.9, None)
    assert AggregationConfig(server_optimizer="fedprox").proximal_mu == 0.0
    c = AggregationConfig.from_dict(
        {
            "lora-mode": "exact",
            "rank": "lossless",
            "max_update_norm": 5.0,
            "server-optimizer": "fedadam",
            "server-lr": 0.01,
        }
    )
    assert (c.lora_mode, c.rank, c.max_update_norm, c.server_lr) == ("exact", "lossless", 5.0, 0.01)
    k = AggregationConfig.from_dict({"robust": "krum", "num_malicious": 1})
    assert k.num_malicious == 1
    with pytest.raises(dataclass_error()):
        c.lora_mode = "naive"


def dataclass_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"lora_mode": "mean"}, "lora_mode"),
        ({"robust": "bulyan"}, "robust"),
        ({"server_optimizer": "sgd"}, "server_optimizer"),
        ({"max_update_norm": 0.0}, "max_update_norm"),
        ({"max_update_norm": float("nan")}, "max_update_norm"),
        ({"robust": "trimmed-mean", "trim_beta": 0.5}, "trim_beta"),
        ({"num_malicious": -1}, "num_malicious"),
        ({"num_malicious": 1.5}, "num_malicious"),
        ({"server_optimizer": "fedadam", "server_lr": -0.1}, "server_lr"),
        ({"server_optimizer": "fedadam", "beta_1": 1.0}, "beta_1"),
        ({"server_optimizer": "fedyogi", "tau": 0}, "tau"),
        ({"server_optimizer": "fedavgm", "server_momentum": 1.5}, "server_momentum"),
        ({"server_optimizer": "fedprox", "proximal_mu": -1}, "proximal_mu"),
        ({"server_optimizer": "fedavg", "server_lr": 0.5}, "server_lr"),  # not read by fedavg
        ({"proximal_mu": 0.1}, "proximal_mu"),  # only fedprox reads it
        ({"lora_mode": "exact", "rank": 0}, "rank"),
        ({"lora_mode": "naive", "rank": 4}, "rank"),
        ({"robust": "median", "lora_mode": "exact"}, "robust"),
        ({"robust": "krum", "server_optimizer": "fedadam"}, "robust"),
        ({"lora_mode": "hetero", "server_optimizer": "fedyogi"}, "hetero"),
        ({"lora_mode": "hetero", "client_ranks": [4, -2]}, "client_ranks"),
        ({"lora_mode": "exact", "client_ranks": [4, 8]}, "client_ranks"),
        ({"lora_modes": "naive"}, "lora_modes"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        AggregationConfig.from_dict(values)
