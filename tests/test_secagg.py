"""Secure aggregation (``aggregation.secure = "secagg+"``): config checks and a real SecAgg+ simulation."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from fedtune import config, workspace
from fedtune.compression import VALID_CODECS
from fedtune.errors import ConfigError, PayloadError

from .conftest import CONFIGS

SECURE = {"aggregation.secure": "secagg+"}


def _load(**overrides):
    return config.load(CONFIGS / "tiny.toml", {**SECURE, **overrides})


def test_defaults_are_flowers_and_unset_without_secure():
    agg = _load().aggregation
    assert (
        agg.num_shares,
        agg.reconstruction_threshold,
        agg.clipping_range,
        agg.quantization_range,
        agg.max_weight,
        agg.modulus_range,
    ) == (3, 2, 8.0, 2**22, 1000.0, 2**32)
    plain = config.load(CONFIGS / "tiny.toml").aggregation
    assert plain.secure == "none" and plain.num_shares is None
    # round-trips through the run directory's config.toml
    assert config.from_dict(__import__("tomllib").loads(config.to_toml(_load()))).aggregation == agg


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"aggregation.secure": "secagg"}, "aggregation.secure: must be one of none, secagg+"),
        (
            {"aggregation.secure": "none", "aggregation.num_shares": 3},
            "aggregation.num_shares: only used with aggregation.secure = 'secagg+'",
        ),
        ({"aggregation.num_shares": 2}, "aggregation.num_shares: must be an integer (> 2"),
        (
            {"aggregation.num_shares": 3, "aggregation.reconstruction_threshold": 3},
            "aggregation.reconstruction_threshold: must be less than aggregation.num_shares = 3",
        ),
        ({"aggregation.clipping_range": 0.0}, "aggregation.clipping_range: must be > 0"),
        ({"aggregation.quantization_range": 2**32}, "aggregation.quantization_range: must be in [2, "),
        ({"aggregation.robust": "median"}, "aggregation.robust: 'median' cannot be combined with aggregation.secure"),
        (
            {"aggregation.lora_mode": "exact"},
            "aggregation.lora_mode: 'exact' cannot be combined with aggregation.secure",
        ),
        (
            {"aggregation.server_optimizer": "fedadam"},
            "aggregation.server_optimizer: 'fedadam' cannot be combined with aggregation.secure",
        ),
        ({"aggregation.max_update_norm": 1.0}, "max_update_norm: the server cannot measure"),
        (
            {"compression.codec": "randk", "compression.small_codec": "int8"},
            "compression.small_codec: 'int8' cannot be combined with aggregation.secure",
        ),
        (
            {"compression.codec": "randk", "compression.error_feedback": True},
            "compression.error_feedback: not implemented with aggregation.secure",
        ),
        ({"aggregation.modulus_range": 3 * 2**22}, "aggregation.modulus_range: must be a power of two above"),
        ({"aggregation.modulus_range": 2**22}, "aggregation.modulus_range: must be a power of two above"),
        ({"aggregation.modulus_range": 2**33}, "aggregation.modulus_range: must be a power of two above"),
        (
            {"aggregation.secure": "none", "aggregation.modulus_range": 2**20},
            "aggregation.modulus_range: only used with aggregation.secure = 'secagg+'",
        ),
        # 4 clients a round (tiny.toml samples all 4): 4 * 2**22 = 2**24 would wrap a 2**24 modulus
        ({"aggregation.modulus_range": 2**24}, "aggregation.modulus_range: the sum of 4 clients' quantized"),
        (
            {"privacy.mode": "client-central", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0},
            "privacy.mode: 'client-central' clips each update on the server",
        ),
        (
            {"federation.num_clients": 1, "federation.min_train_clients": 1, "federation.min_available_clients": 1},
            "federation.min_train_clients: SecAgg+ needs at least 2",
        ),
    ],
)
def test_refuses_what_does_not_compose(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        _load(**overrides)
    assert needle in str(exc.value)


@pytest.mark.parametrize("codec", [c for c in VALID_CODECS if c not in ("none", "randk")])
def test_refuses_every_codec_but_randk(codec):
    with pytest.raises(ConfigError) as exc:
        _load(**{"compression.codec": codec})
    assert f"compression.codec: {codec!r} cannot be combined with aggregation.secure = 'secagg+'" in str(exc.value)


def test_randk_and_a_smaller_modulus_compose():
    cfg = _load(
        **{
            "compression.codec": "randk",
            "compression.ratio": 0.1,
            "compression.randk_unbiased": True,
            "aggregation.modulus_range": 2**25,  # 4 clients x 2**22 < 2**25
        }
    )
    assert (cfg.compression.codec, cfg.aggregation.modulus_range) == ("randk", 2**25)


def test_client_local_dp_composes():
    cfg = _load(**{"privacy.mode": "client-local", "privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0})
    assert cfg.privacy.mode == "client-local"


def test_simulate_refuses_resume_with_secagg(tmp_path):
    from fedtune.flower import simulation

    with pytest.raises(ConfigError, match="--resume is not supported"):
        simulation.simulate(_load(), tmp_path, resume=True)


def clients_deltas(cfg, start, rnd, num_clients):
    """Each client's delta from ``start`` and its num-examples: every client's training run again here,
    in this process (deterministic from (seed, round, partition))."""
    from flwr.app import Context, RecordDict

    from fedtune.flower.secagg import fit_config, train_delta

    deltas, weights = [], []
    for pid in range(num_clients):
        ctx = Context(
            run_id=0,
            node_id=pid + 1,
            node_config={"partition-id": pid, "num-partitions": num_clients},
            state=RecordDict(),
            run_config={},
        )
        delta, metrics = train_delta(start, fit_config(cfg, rnd), ctx, cfg)
        deltas.append(delta)
        weights.append(float(metrics["num-examples"]))
    return deltas, weights


def _reference_mean(cfg, start, rnd, num_clients):
    """Plain FedAvg of the same clients' deltas."""
    deltas, weights = clients_deltas(cfg, start, rnd, num_clients)
    total = sum(weights)
    return {k: sum(w * d[k] for w, d in zip(weights, deltas)) / total for k in deltas[0]}, weights


@pytest.mark.slow
def test_secagg_simulation_equals_fedavg_up_to_quantization(tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedtune.flower.apps import make_client_app
    from fedtune.flower.secagg import run_secagg
    from fedtune.flower.simulation import backend_config, preflight

    n = 3
    cfg = _load(**{"federation.num_clients": n, "federation.rounds": 2, "federation.fraction_train": 1.0})
    preflight(cfg)
    steps, result = [], {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        result.update(
            run_secagg(
                grid,
                context,
                cfg,
                tmp_path,
                lambda s: None,
                on_aggregate=lambda r, before, mean: steps.append((r, before, mean)),
            )
        )

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server_app, client_app=make_client_app(cfg), num_supernodes=n, backend_config=backend_config(cfg)
    )

    assert result["rounds_completed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == n and "eval" in r for r in rows[1:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["aggregation"]["secure"] == "secagg+" and summary["mode"] == "secagg+"
    # the same round and summary fields as every other mode (the loop's bookkeeping)
    from tests.test_round_loop import ROW_FIELDS, SUMMARY_FIELDS

    assert all(ROW_FIELDS <= set(r) for r in rows[1:]) and SUMMARY_FIELDS <= set(summary)
    assert [r for r, _, _ in steps] == [1, 2]

    agg = cfg.aggregation
    for rnd, before, secure_mean in steps:
        ref, weights = _reference_mean(cfg, before, rnd, n)
        # each client's weighted delta is stochastically rounded to a grid of step 2C/Q;
        # SecAgg+ divides the sum by the total weight sum(n_i / max_weight)
        step = 2 * agg.clipping_range / agg.quantization_range
        bound = n * step / (sum(weights) / agg.max_weight) + 1e-6
        assert set(secure_mean) == set(ref)
        worst = max(float((secure_mean[k] - ref[k]).abs().max()) for k in ref)
        size = max(float(ref[k].abs().max()) for k in ref)
        assert worst <= bound, (rnd, worst, bound)
        assert size > 100 * bound  # the deltas are far above the quantization error: the check means something
    assert workspace.get(cfg).trainable_keys()


def test_secagg_samples_with_the_seeded_sampler():
    """MeanDeltaFedAvg picks each round's clients with fedtune's (seed, round) sampler, not Flower's."""
    import torch

    from fedtune.flower.secagg import MeanDeltaFedAvg
    from fedtune.flower.server import sample_nodes

    class Proxy:
        def __init__(self, nid):
            self.cid, self.node_id = str(nid), nid

    class Manager:
        proxies = {str(n): Proxy(n) for n in range(100, 110)}

        def num_available(self):
            return len(self.proxies)

        def wait_for(self, n, timeout=None):
            return True

        def all(self):
            return self.proxies

    def sample(rnd, ids):
        return sample_nodes(ids, 0.3, 2, seed=7, rnd=rnd)

    strategy = MeanDeltaFedAvg(
        {"w": torch.zeros(2)},
        ["w"],
        sample=sample,
        fraction_fit=0.3,
        min_fit_clients=2,
        on_fit_config_fn=lambda rnd: {"server-round": rnd},
    )
    for rnd in (1, 2, 3):
        picked = [p.node_id for p, _ in strategy.configure_fit(rnd, strategy.initial_parameters, Manager())]
        assert picked == sample_nodes(list(range(100, 110)), 0.3, 2, seed=7, rnd=rnd)


# ---------------------------------------------------------------- the codec SecAgg+ can sum


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    # tensors below and above randk's small-n cutoff (4096), and one of a single entry
    shapes = {"a.lora_A": (8, 64), "a.lora_B": (96, 80), "b.bias": (1,), "head.weight": (2, 3000)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("ratio,unbiased", [(0.1, False), (0.1, True), (0.37, False), (1.0, False)])
def test_shared_randk_keeps_what_the_randk_codec_keeps(ratio, unbiased):
    """Both sides of SecAgg+ pick the coordinates the ``randk`` codec picks from the same round seed."""
    from fedtune.compression import layout_of, make_codec
    from fedtune.compression.masked import SharedRandK

    delta, seed = _delta(), 123456789
    layout = layout_of(delta)
    ref_codec = make_codec("randk", ratio=ratio, randk_unbiased=unbiased)
    ref = ref_codec.decode(ref_codec.encode(delta, seed=seed), layout, seed=seed)
    codec = SharedRandK(ratio, unbiased=unbiased)
    values = codec.encode(delta, seed=seed)
    assert values.dtype == np.float32 and values.size == codec.size(layout)
    assert codec.size(layout) == sum(math.ceil(ratio * math.prod(s)) for s in layout.values())
    ours = codec.decode(values, layout, seed=seed)
    for k in layout:
        assert torch.equal(ours[k], ref[k]), k
    # the kept values, in order, are the delta's entries at the codec's positions
    pos = codec.positions(layout, seed=seed)
    assert np.array_equal(values, np.concatenate([delta[k].reshape(-1).numpy()[pos[k]] for k in layout]))
    if ratio < 1:  # another round, other coordinates
        assert not all(np.array_equal(pos[k], codec.positions(layout, seed=seed + 1)[k]) for k in layout)


def test_shared_randk_is_linear_so_the_sum_can_stay_masked():
    """decode(mean of encodings) == mean of decodings: what the server unmasks is the clients' mean, sparsified."""
    from fedtune.compression import layout_of
    from fedtune.compression.masked import SharedRandK

    deltas = [_delta(i) for i in range(3)]
    layout, codec, seed = layout_of(deltas[0]), SharedRandK(0.2, unbiased=True), 7
    mean_of_codes = codec.decode(np.mean([codec.encode(d, seed=seed) for d in deltas], axis=0), layout, seed=seed)
    for k in layout:
        want = sum(codec.decode(codec.encode(d, seed=seed), layout, seed=seed)[k] for d in deltas) / 3
        assert torch.allclose(mean_of_codes[k], want, atol=1e-6)
    with pytest.raises(PayloadError, match="values for a layout that keeps"):
        codec.decode(np.zeros(codec.size(layout) + 1, np.float32), layout, seed=seed)
    bad = {**deltas[0], "b.bias": torch.tensor([float("nan")])}
    with pytest.raises(ValueError, match="non-finite"):
        SharedRandK(1.0).encode(bad, seed=seed)


@pytest.mark.parametrize("bits", [1, 7, 18, 23, 24, 25, 32])
@pytest.mark.parametrize("count", [0, 1, 9, 16384, 16385])
def test_packed_residues_round_trip_at_their_size(bits, count):
    from fedtune.compression.masked import RESIDUE_HEADER, pack_residues, packed_size, unpack_residues

    values = np.random.default_rng(bits * count).integers(0, 2**bits, count, dtype=np.int64)
    if count:
        values[0] = 2**bits - 1  # the largest residue survives
    blob = pack_residues(values, bits)
    assert len(blob) == packed_size(count, bits) == RESIDUE_HEADER.size + math.ceil(count * bits / 8)
    back = unpack_residues(blob, bits, count)
    assert back.dtype == np.int64 and np.array_equal(back, values)


def test_packed_residues_refuse_what_a_peer_could_malform():
    from fedtune.compression.masked import pack_residues, residue_bits, unpack_residues

    blob = pack_residues(np.arange(10, dtype=np.int64), 5)
    for bad, needle in [
        (blob[:-1], "bytes, 10 residues of 5 bits need"),
        (blob + b"\0", "bytes, 10 residues of 5 bits need"),
        (b"XX" + blob[2:], "bad magic"),
        (blob[:5], "shorter than the header"),
        (blob[:-1] + bytes([blob[-1] | 0x80]), "nonzero padding bits"),
    ]:
        with pytest.raises(PayloadError, match=needle):
            unpack_residues(bad, 5)
    with pytest.raises(PayloadError, match="5 bits a residue, expected 6"):
        unpack_residues(blob, 6)
    with pytest.raises(PayloadError, match="10 of them, expected 11"):
        unpack_residues(blob, 5, 11)
    with pytest.raises(ValueError, match="outside"):
        pack_residues(np.array([32]), 5)
    with pytest.raises(ValueError, match="power of two"):
        residue_bits(3 * 2**20)
    assert residue_bits(2**32) == 32


def test_a_weight_that_could_wrap_the_masked_sum_is_refused():
    from fedtune.errors import FedtuneError
    from fedtune.flower.secagg import check_weight

    # 4 clients a round, modulus 2**25: each weight factor round(n / 1000 * 2**22) must stay <= (2**25 - 1) // 4
    cfg = _load(**{"aggregation.modulus_range": 2**25})
    check_weight(1999, cfg)  # factor 8384512 <= 8388607
    with pytest.raises(FedtuneError, match="aggregation.max_weight: this client's 2000 examples"):
        check_weight(2000, cfg)  # factor 8388608
    check_weight(100_000, _load())  # Flower's modulus 2**32 leaves room for 1024x max_weight over 4 clients


# ------------------------------------------------------------ the flow, in one process (no Ray)


def _run_in_process(cfg, out, client_fn=None):
    """run_secagg over fedtune's in-process LocalGrid: Flower's SecAgg+ workflow and mod, real messages."""
    from types import SimpleNamespace

    from flwr.app import Context, Message, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from fedtune.flower.client import class_counts
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.secagg import handle_secagg_train, run_secagg

    def wire(m):  # each party gets its own copy of a message, as over the wire (secaggplus_mod edits its input)
        if not m.has_content():
            return m
        return Message(metadata=m.metadata, content=recorddict_from_proto(recorddict_to_proto(m.content)))

    class Grid(LocalGrid):
        run = SimpleNamespace(run_id=1)  # Flower's client-manager thread reads it

        def send_and_receive(self, messages, *, timeout=None):
            return [wire(r) for r in super().send_and_receive([wire(m) for m in messages], timeout=timeout)]

    grid = Grid(
        cfg.federation.num_clients,
        client_fn or (lambda m, c: handle_secagg_train(m, c, cfg)),
        class_counts=lambda c: class_counts(c, cfg),  # asked only when federation.sampling = "label-balanced"
    )
    steps = []
    logging.getLogger("flwr").setLevel(logging.WARNING)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    summary = run_secagg(grid, context, cfg, out, lambda s: None, on_aggregate=lambda *a: steps.append(a))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, steps


def _weighted_mean(deltas, weights):
    return {k: sum(w * d[k] for w, d in zip(weights, deltas)) / sum(weights) for k in deltas[0]}


def _client_deltas(cfg, start, rnd, pids):
    from flwr.app import Context, RecordDict

    from fedtune.flower.secagg import fit_config, train_delta

    out = []
    for pid in pids:
        ctx = Context(
            run_id=0,
            node_id=pid + 1,
            node_config={"partition-id": pid, "num-partitions": cfg.federation.num_clients},
            state=RecordDict(),
            run_config={},
        )
        delta, metrics = train_delta(start, fit_config(cfg, rnd), ctx, cfg)
        out.append((delta, float(metrics["num-examples"])))
    return out


# 3 clients, rand-k at 25% with n/k scaling, and 18-bit masked entries: 3 x 2**16 < 2**18; the clipping
# range is narrowed so the 2**16 levels still resolve the deltas
RANDK_18BIT = {
    "federation.num_clients": 3,
    "federation.rounds": 2,
    "federation.fraction_train": 1.0,
    "compression.codec": "randk",
    "compression.ratio": 0.25,
    "compression.randk_unbiased": True,
    "aggregation.quantization_range": 2**16,
    "aggregation.modulus_range": 2**18,
    "aggregation.clipping_range": 0.25,
}


def test_randk_secagg_mean_is_the_mean_of_the_kept_coordinates(tmp_path):
    """Flower's SecAgg+ over the rand-k vectors: the unmasked, scattered mean equals the plain weighted mean of
    the clients' deltas on the round seed's coordinates (times n/k), within the quantization error, and zero
    elsewhere; the masked vectors travel at 18 bits an entry."""
    from fedtune.compression import k_for, randk_indices
    from fedtune.compression.masked import packed_size
    from fedtune.flower.secagg import layouts
    from fedtune.flower.server import round_seed

    cfg = _load(**RANDK_18BIT)
    summary, rows, steps = _run_in_process(cfg, tmp_path)
    assert summary["rounds_completed"] == 2 and [r for r, _, _ in steps] == [1, 2]
    _, layout = layouts(cfg)
    agg, n = cfg.aggregation, 3
    for rnd, before, secure_mean in steps:
        pairs = _client_deltas(cfg, before, rnd, range(n))
        ref = _weighted_mean([d for d, _ in pairs], [w for _, w in pairs])
        weights = [w for _, w in pairs]
        step = 2 * agg.clipping_range / agg.quantization_range
        bound = n * step / (sum(weights) / agg.max_weight) + 1e-7
        assert list(secure_mean) == list(layout)
        worst, size = 0.0, 0.0
        for i, (key, shape) in enumerate(layout.items()):
            numel = math.prod(shape)
            k = k_for(numel, 0.25)
            pos = randk_indices(numel, k, round_seed(cfg, rnd), i)  # the codec's draw for this round
            got = secure_mean[key].reshape(-1).numpy()
            off = np.ones(numel, bool)
            off[pos] = False
            assert not got[off].any(), key  # nothing outside the round's coordinates
            scale = numel / k
            want = ref[key].reshape(-1).numpy()[pos] * scale
            worst = max(worst, float(np.abs(got[pos] - want).max()) / scale)
            size = max(size, float(np.abs(want).max()) / scale)
        assert worst <= bound, (rnd, worst, bound)
        assert size > 100 * bound  # far above the quantization error: the check means something
    kept = sum(k_for(math.prod(s), 0.25) for s in layout.values())
    for row in rows[1:]:
        assert row["accepted"] == n and set(row["bytes_by_stage"]) == {
            "setup",
            "share_keys",
            "collect_masked_vectors",
            "unmask",
        }
        up = row["bytes_by_stage"]["collect_masked_vectors"]["up"] / n
        # per client: the packed weight factor and k residues at 18 bits, plus the reply's train metrics
        assert packed_size(1, 18) + packed_size(kept, 18) < up < packed_size(1, 18) + packed_size(kept, 18) + 1500
        assert row["bytes_up"] == sum(s["up"] for s in row["bytes_by_stage"].values())
        assert row["bytes_down"] == sum(s["down"] for s in row["bytes_by_stage"].values())
        assert len(row["bytes_up_per_client"]) == n


def test_a_malformed_masked_vector_drops_that_client_not_the_round(tmp_path):
    """A client whose packed vector does not unpack is an error reply: SecAgg+ removes its masks from the
    others' shares and the round's mean is the other clients' (within the quantization error)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedtune.flower.secagg import handle_secagg_train

    dense = {k: v for k, v in RANDK_18BIT.items() if not k.startswith("compression.")}
    cfg = _load(**{**dense, "federation.rounds": 1})
    bad_node = 1001  # LocalGrid's node of partition 1

    def client(msg, ctx):
        reply = handle_secagg_train(msg, ctx, cfg)
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if ctx.node_id == bad_node and configs is not None and Key.MASKED_PARAMETERS in configs:
            factor, values = configs[Key.MASKED_PARAMETERS]
            configs[Key.MASKED_PARAMETERS] = [factor, values[:-1]]
        return reply

    _, rows, steps = _run_in_process(cfg, tmp_path, client)
    row = rows[1]
    assert row["accepted"] == 2 and len(row["rejected"]) == 1
    assert row["rejected"][0]["node"] == bad_node
    assert row["rejected"][0]["reason"].startswith("collect_masked_vectors: masked vector refused: packed residues")
    [(rnd, before, secure_mean)] = steps
    pairs = _client_deltas(cfg, before, rnd, [0, 2])
    ref = _weighted_mean([d for d, _ in pairs], [w for _, w in pairs])
    agg = cfg.aggregation
    bound = 2 * (2 * agg.clipping_range / agg.quantization_range) / (sum(w for _, w in pairs) / agg.max_weight)
    worst = max(float((secure_mean[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= bound + 1e-7, (worst, bound)
    assert max(float(ref[k].abs().max()) for k in ref) > 100 * bound
    # the dropped client's weight is not in the mean: it differs from the mean over all three
    full = _weighted_mean(*zip(*_client_deltas(cfg, before, rnd, [0, 1, 2])))
    assert max(float((secure_mean[k] - full[k]).abs().max()) for k in ref) > 100 * bound


def test_label_balanced_sampling_picks_the_secagg_rounds_from_every_silos_true_counts(tmp_path):
    """Under SecAgg+ the server still learns each silo's class counts (the identity query, outside the
    masked sum) and trains exactly the rounds the label-balanced sampler picks from them."""
    from fedtune.flower.server import balanced_sample_nodes, sample_nodes

    from .test_balanced_sampling import _six_silos, _trained

    cfg, truth = _six_silos(rounds=3, **SECURE, **{"federation.fraction_train": 0.5})  # 3 a round
    _run_in_process(cfg, tmp_path)
    trained = _trained(tmp_path)  # each round's clients by partition id, which orders the sampler's nodes
    expected = [balanced_sample_nodes(truth, 3, seed=cfg.federation.seed, rnd=r, weighted=True) for r in (1, 2, 3)]
    assert trained == expected
    assert trained != [sample_nodes(range(6), 0.5, 3, seed=cfg.federation.seed, rnd=r) for r in (1, 2, 3)]
