"""The ServerApp's round loop: one loop for every kind of round.

`ServerLoop` owns what every federated run does the same way: sampling
(seeded by (seed, round) over nodes ordered by partition id, so a run is
reproducible and a resumed run samples what the uninterrupted one would have;
a fixed-size sample, Poisson with ``federation.sampling = "poisson"``, whose
rounds may sample nobody: such a round sends nothing, and only client-central
DP still releases its noise, or a fixed-size sample whose classes are mixed
like the federation's, ``"label-balanced"``),
sending a round and collecting its replies, mapping SuperLink error replies to
the node they were sent to (a sampled node's reply to another node's message,
or a second reply, is dropped), rejections with reasons, privacy accounting
(`fedtune.privacy.ledger.RunPrivacy`), checkpoints and resume, and, through
`fedtune.runlog.RunLog`, evaluation cadence, metrics rows, progress lines,
export and the summary.

What differs between kinds of round plugs in behind `RoundProtocol`:

- `DeltaRounds` (here): the global adapter goes down (dense, compressed
  `Broadcast`, or cut to each node's rank, `HeteroRanks`), adapter deltas come
  up (dense or through an uplink codec), are checked (the round the reply
  claims, a size bound before decoding, a per-node digest against replays,
  then `validate_update`) and combined, each weighted as ``aggregation.weighting``
  says (`AggregationConfig.client_weight`), by the aggregation chosen once at
  set-up: a Flower strategy (``aggregate_train`` sees global + delta per
  client, so FedAvg, FedAdam, Krum, ... see ordinary model arrays), a LoRA-aware aggregator (product-space,
  FFA-LoRA, heterogeneous ranks), or client-level central DP (DP-FedAvg).
- `fedtune.flower.zo_server.SeedRounds`: FedKSeed's seeds and scalars.

SecAgg+ runs on Flower's own workflow (`fedtune.flower.secagg`) with the same
sampler, ledger and `RunLog`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum
from flwr.serverapp.strategy import Strategy

from fedtune import adapters, config, workspace
from fedtune.aggregation import AggregationConfig, Layout, validate_update
from fedtune.config import FedtuneConfig, fixed_sample_size
from fedtune.delta import Delta
from fedtune.errors import FedtuneError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.identity import NodeIdentities
from fedtune.flower.records import (
    from_arrayrecord,
    pack,
    state_digest,
    to_arrayrecord,
    update_bytes,
    update_digest,
    wire_bytes,
)
from fedtune.flower.transport import send_and_receive
from fedtune.metrics import held_out_metrics
from fedtune.privacy.ledger import RunPrivacy
from fedtune.rundir import replace_dir
from fedtune.runlog import RunLog, round_record, short_reason
from fedtune.seeds import derive_seed
from fedtune.workspace import export_adapter

log = logging.getLogger("fedtune")

# label-balanced sampling: candidates within this L1 distance of the best class mix are drawn alike
BALANCE_SLACK = 0.1


def sample_nodes(
    node_ids: Iterable[int],
    fraction: float,
    minimum: int,
    *,
    seed: int,
    rnd: int,
    order: Callable[[Iterable[int]], list[int]] = sorted,
) -> list[int]:
    """Sample ``max(fraction * N, minimum)`` nodes, reproducibly from (seed, round).

    ``order`` puts the nodes in a run-independent order first (`NodeIdentities.order`:
    by partition id); picks index into that order. A fixed-size sample without
    replacement, not Poisson: what that means for client-level DP's epsilon is in
    `fedtune.privacy.client_level.central_accounting_statement`;
    `poisson_sample_nodes` is the Poisson sampler.
    """
    nodes = list(order(node_ids))
    k = fixed_sample_size(len(nodes), fraction, minimum)
    rng = np.random.default_rng([seed, rnd])
    picks = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids can exceed int64
    return sorted(nodes[int(i)] for i in picks)


def poisson_sample_nodes(
    node_ids: Iterable[int],
    rate: float,
    *,
    seed: int,
    rnd: int,
    order: Callable[[Iterable[int]], list[int]] = sorted,
) -> list[int]:
    """Each node in independently with probability ``rate``, reproducibly from (seed, round).

    Poisson sampling, the sampler whose amplification opacus' RDP analysis of the
    subsampled Gaussian proves (Mironov, Talwar, Zhang 2019, arXiv:1908.10530) and
    that DP-FedAvg assumes (McMahan et al. 2018, arXiv:1710.06963, Alg. 1): the
    count varies from round to round and may be 0, and nothing draws again to
    reach a minimum. One uniform per node, in ``order`` (as `sample_nodes`), from
    the generator `sample_nodes` uses.
    """
    nodes = list(order(node_ids))
    rng = np.random.default_rng([seed, rnd])
    keep = rng.random(len(nodes)) < rate
    return sorted(n for n, k in zip(nodes, keep) if k)


def balanced_sample_nodes(
    class_counts: Mapping[int, Sequence[int] | None],
    k: int,
    *,
    seed: int,
    rnd: int,
    weighted: bool,
    order: Callable[[Iterable[int]], list[int]] = sorted,
) -> list[int]:
    """Pick ``k`` nodes whose pooled class mix is closest to the federation's, reproducibly from (seed, round).

    Label-balanced client selection (after Yang et al. 2021, "Federated learning with
    class imbalance reduction", arXiv:2011.11266): the first node is uniform at
    random; each next one is drawn uniformly from the nodes that bring the round's
    class shares within `BALANCE_SLACK` (L1) of the best choice, so that under label
    skew a round does not train only silos of one label, and every node still takes
    part. The round's shares average each node's shares, weighted by its example
    count when ``weighted`` (as ``aggregation.weighting = "examples"`` averages their
    updates), else equally; the target is all nodes' examples together.
    ``class_counts``: node -> its training examples per class, or None for a node
    that did not say (counted as holding the target mix, at the mean known weight).
    """
    nodes = list(order(class_counts))
    k = min(k, len(nodes))
    known = {n: np.asarray(c, dtype=np.float64) for n, c in class_counts.items() if c is not None}
    total = sum(known.values()) if known else None
    target = total / max(total.sum(), 1.0) if total is not None else None
    mean_weight = float(np.mean([c.sum() for c in known.values()])) if known else 1.0

    def shares(n: int):
        return known[n] / max(known[n].sum(), 1.0) if n in known else target

    def weight(n: int) -> float:
        return (float(known[n].sum()) if n in known else mean_weight) if weighted else 1.0

    rng = np.random.default_rng([seed, rnd])
    chosen = [nodes[int(rng.integers(len(nodes)))]]
    while len(chosen) < k:
        rest = [n for n in nodes if n not in chosen]
        if target is None:  # nobody said: a uniform draw
            chosen.append(rest[int(rng.integers(len(rest)))])
            continue
        gaps = []
        for n in rest:
            group = [*chosen, n]
            w = np.array([weight(m) for m in group])
            mix = sum(wi * shares(m) for wi, m in zip(w, group)) / max(w.sum(), 1e-12)
            gaps.append(float(np.abs(mix - target).sum()))
        best = min(gaps)
        near = [n for n, g in zip(rest, gaps) if g <= best + BALANCE_SLACK]
        chosen.append(near[int(rng.integers(len(near)))])
    return sorted(chosen)


class _FixedGrid:
    """Presents only the sampled nodes to a Flower strategy's ``configure_train``."""

    def __init__(self, node_ids: list[int]):
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


class MultiKrum(FlowerMultiKrum):
    """Flower's MultiKrum (Blanchard et al. 2017) keeping ``aggregation.krum_kept(n)`` of each round's n
    replies: its default, n - f, follows the round's size, which Flower's fixed ``num_nodes_to_select``
    cannot. Its name is the summary's ``aggregation.strategy``."""

    def __init__(self, agg: AggregationConfig, **kwargs: Any):
        super().__init__(num_malicious_nodes=agg.num_malicious, **kwargs)
        self.agg = agg

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # the server passes only accepted replies, so n counts what Multi-Krum ranks
        self.num_nodes_to_select = self.agg.krum_kept(len(replies))
        return super().aggregate_train(server_round, replies)


def build_strategy(cfg: FedtuneConfig) -> Strategy:
    """The Flower strategy named by ``[aggregation]`` (server optimizer or robust rule)."""
    from flwr.serverapp import strategy as fs

    agg = cfg.aggregation
    # fraction 1.0 over the already-sampled nodes: sampling is ours (see module doc)
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 1, "min_available_nodes": 1}
    if agg.robust == "trimmed-mean":
        strategy = fs.FedTrimmedAvg(beta=agg.trim_beta, **common)
    elif agg.robust == "median":
        strategy = fs.FedMedian(**common)
    elif agg.robust == "krum":
        strategy = fs.Krum(num_malicious_nodes=agg.num_malicious, **common)
    elif agg.robust == "multikrum":  # Blanchard et al. 2017; m = n - f unless aggregation.krum_select
        strategy = MultiKrum(agg, **common)
    elif agg.server_optimizer == "fedadam":
        strategy = fs.FedAdam(eta=agg.server_lr, beta_1=agg.beta_1, beta_2=agg.beta_2, tau=agg.tau, **common)
    elif agg.server_optimizer == "fedyogi":
        strategy = fs.FedYogi(eta=agg.server_lr, beta_1=agg.beta_1, beta_2=agg.beta_2, tau=agg.tau, **common)
    elif agg.server_optimizer == "fedavgm":
        strategy = fs.FedAvgM(server_learning_rate=agg.server_lr, server_momentum=agg.server_momentum, **common)
    elif agg.server_optimizer == "fedprox":
        strategy = fs.FedProx(proximal_mu=agg.proximal_mu, **common)
    elif agg.server_optimizer == "scaffold":  # FedAvg's weighted mean; DeltaRounds takes SCAFFOLD's eta_g step and c
        strategy = fs.FedAvg(**common)
    else:
        strategy = fs.FedAvg(**common)
    strategy.fraction_evaluate = 0.0  # evaluation is centralized, on the held-out split (no warning)
    return strategy


class Broadcast:
    """Compressed downlink: each client holds a copy of the global adapter the server can reproduce.

    ``compression.downlink_catchup = "replay"``: every client tracks one *public* copy.
    Each round the server compresses ``global - public`` (so what compression
    dropped last round is sent again: error feedback on the downlink), applies the
    decoded change to ``public`` and keeps the payload. A client that holds version
    v receives the payloads v+1..r.

    ``"delta"``: the server keeps each node's copy and sends one payload,
    ``global - copy`` compressed, whatever the number of rounds the node missed
    (what compression dropped stays in the difference: error feedback per node);
    the node's copy advances by the decoded payload once its reply is accepted. The
    copies cost the server one adapter per node that has taken part. In both modes
    a node whose reply was an error, was dropped or never came, after it held a
    copy, gets the adapter in full next time (it may have kept the copy it was
    sent, or not).

    Version 0 is the seeded initial adapter, which every client builds itself, so a
    client with no copy yet starts from it, with the digest of version 0
    (`state_digest`) to check its own against. A client gets the adapter in full
    instead when that is smaller than what it needs, when it is too far behind
    (replay: its payloads are no longer kept), or when it could not start from
    version 0 (its reply was an error). Clients train from their copy; the server
    adds their deltas to the true global. ``seeded``: the seeded initial adapter
    when ``state`` differs from it (a prototype head installed before round 1,
    `install_head`): under replay every node gets the full copy the first time;
    under delta a node with no copy yet is sent ``state - seeded`` coded, like any
    other node's difference from its copy.
    """

    def __init__(self, cfg: FedtuneConfig, state: Delta, max_payloads: int = 32, *, seeded: Delta | None = None):
        from fedtune.compression import build_codec

        self.codec = build_codec(cfg.compression, "downlink")
        self.per_node = cfg.compression.downlink_catchup == "delta"
        self.keys = sorted(state)
        self.public = {k: state[k].clone() for k in self.keys}  # replay: the public copy; delta: the global
        version0 = state if seeded is None else seeded  # what a client with no copy holds
        self.base = {k: version0[k].clone() for k in self.keys} if self.per_node else None
        self.base_digest = state_digest({k: version0[k] for k in self.keys})
        self.payloads: dict[int, bytes] = {}
        self.version = 0
        self.node_version: dict[int, int] = {}
        self.no_base: set[int] = set()  # nodes sent from version 0 whose reply failed: full copies
        self.copies: dict[int, Delta] = {}  # delta: each node's copy, as of node_version
        self.pending: dict[int, Delta] = {}  # delta: the copy a node holds once this round's reply is accepted
        self.resync: set[int] = set()  # nodes whose reply failed after they held a copy: the full adapter next
        self.shared_base = seeded is None or self.per_node  # a client with no copy can start from version 0
        self.max_payloads = max_payloads
        self.full_bytes = sum(v.numel() * 4 for v in self.public.values())

    def advance(self, rnd: int, state: Delta) -> None:
        self.version = rnd
        if self.per_node:
            self.public = {k: state[k].clone() for k in self.keys}
            self.pending.clear()
            return
        payload, decoded = self._coded({k: state[k] - self.public[k] for k in self.keys})
        for k in self.keys:
            self.public[k] = self.public[k] + decoded[k]
        self.payloads[rnd] = payload
        self.payloads.pop(rnd - self.max_payloads, None)

    def _coded(self, change: Delta) -> tuple[bytes, Delta]:
        """``change`` through the downlink codec: the payload, and what a client decodes from it."""
        payload = self.codec.encode(change, seed=0)
        return payload, self.codec.decode(payload, {k: tuple(v.shape) for k, v in change.items()}, seed=0)

    def content_for(self, node: int, config: ConfigRecord) -> RecordDict:
        have = self.node_version.get(node)
        if have is None and node not in self.no_base and self.shared_base:
            have = 0
        if node in self.resync:
            have = None
        if self.per_node:
            return self._delta_for(node, have, config)
        needed = list(range(have + 1, self.version + 1)) if have is not None else []
        if have is not None and all(r in self.payloads for r in needed):
            blobs = [self.payloads[r] for r in needed]
            if sum(map(len, blobs)) < self.full_bytes:
                return self._payloads(node, have, blobs, config)
        return RecordDict({P.CONFIG: config, P.ARRAYS: pack(self.public)})

    def _payloads(self, node: int, have: int, blobs: list[bytes], config: ConfigRecord) -> RecordDict:
        down = ConfigRecord({"from-version": have, "payloads": blobs})
        if node not in self.node_version:  # it starts from its own version 0
            down["base-digest"] = self.base_digest
        return RecordDict({P.CONFIG: config, P.DOWNLINK: down})

    def _delta_for(self, node: int, have: int | None, config: ConfigRecord) -> RecordDict:
        if have is not None:
            copy = self.copies.get(node, self.base)
            payload, decoded = self._coded({k: self.public[k] - copy[k] for k in self.keys})
            if len(payload) < self.full_bytes:
                self.pending[node] = {k: copy[k] + decoded[k] for k in self.keys}
                return self._payloads(node, have, [payload], config)
        self.pending[node] = {k: v.clone() for k, v in self.public.items()}
        return RecordDict({P.CONFIG: config, P.ARRAYS: pack(self.public)})

    def acknowledge(self, node: int, rnd: int) -> None:
        self.node_version[node] = rnd
        self.resync.discard(node)
        if self.per_node:
            self.copies[node] = self.pending.pop(node)

    def failed(self, node: int) -> None:
        """``node``'s reply was an error, was dropped or never came: if it had no copy yet, its version 0 may
        differ (full copies until a reply is accepted); if it had one, it may hold the old or the new version
        (the full adapter next time)."""
        if node not in self.node_version:
            self.no_base.add(node)
        else:
            self.resync.add(node)
        self.pending.pop(node, None)


class HeteroRanks:
    """Heterogeneous LoRA ranks: the rank each node trains at, and the global cut to it.

    A node's rank is learned from its replies (the ``lora-rank`` metric). Until
    then it is sent the global at full rank and cuts it itself with the same
    function (`fedtune.aggregation.cut_to_rank`), so both sides agree on the
    factors it started from; from the next round on it is sent only its cut.
    """

    def __init__(self, scaling, global_rank: int):
        self.scaling = scaling
        self.global_rank = global_rank
        self.node_rank: dict[int, int] = {}
        self._sent: dict[int, int] = {}
        self._cuts: dict[tuple[int, int], Delta] = {}

    def begin_round(self, state: Delta) -> None:
        self._sent.clear()
        self._cuts = {(self.global_rank, self.global_rank): state}

    def _cut(self, src: int, rank: int) -> Delta:
        from fedtune.aggregation import cut_to_rank

        if (src, rank) not in self._cuts:
            self._cuts[(src, rank)] = cut_to_rank(self._cut(self.global_rank, src), rank, self.scaling)
        return self._cuts[(src, rank)]

    def content_for(self, node: int, config: ConfigRecord) -> RecordDict:
        rank = self.node_rank.get(node, self.global_rank)
        self._sent[node] = rank
        return RecordDict({P.CONFIG: config, P.ARRAYS: pack(self._cut(self.global_rank, rank))})

    def start_for(self, node: int, metrics) -> tuple[int, Delta]:
        """(rank, factors the node started from) for its reply; PayloadError if the rank is unusable."""
        raw = metrics.get("lora-rank")
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= self.global_rank:
            raise PayloadError(f"metrics 'lora-rank' must be an int in 1..{self.global_rank} (adapter.r), got {raw!r}")
        rank, sent = int(raw), self._sent[node]
        self.node_rank[node] = rank
        if rank > sent:  # it padded a rank-`sent` cut: not the T_rank(G) start hetero_round assumes
            raise PayloadError(
                f"trained at rank {rank} from factors sent at rank {sent}; it gets rank {rank} next round"
            )
        return rank, self._cut(sent, rank)


REPLAY_WINDOW = 64  # rounds of accepted-update digests kept per node
SCAFFOLD_FILE = "scaffold_control.safetensors"  # the server's SCAFFOLD control variate c, in the checkpoint


def round_seed(cfg: FedtuneConfig, rnd: int) -> int:
    """The seed every party of round ``rnd`` shares (random-k coordinates, codec dithering)."""
    return derive_seed(cfg.federation.seed, "round", rnd)


class NodeSampler:
    """This round's clients: `sample_nodes` (or `poisson_sample_nodes`, `balanced_sample_nodes`:
    ``federation.sampling``) seeded by (federation.seed, round) over nodes ordered by partition id."""

    def __init__(self, cfg: FedtuneConfig):
        self.fed = cfg.federation
        self.weighted = cfg.aggregation.weighting == "examples"
        self.identities = NodeIdentities(ask_counts=cfg.federation.sampling == "label-balanced")

    def sample(self, grid: Grid, rnd: int, available: Iterable[int] | None = None) -> list[int]:
        fed = self.fed
        if not fed.num_clients:
            return []
        available = list(grid.get_node_ids() if available is None else available)
        self.identities.learn(grid, available, timeout=fed.round_timeout)
        if fed.sampling == "poisson":  # no minimum: min_train_clients is not enforced (FederationConfig)
            return poisson_sample_nodes(
                available, fed.fraction_train, seed=fed.seed, rnd=rnd, order=self.identities.order
            )
        if fed.sampling == "label-balanced":
            k = fixed_sample_size(len(available), fed.fraction_train, fed.min_train_clients)
            counts = {n: self.identities.class_counts.get(n) for n in available}
            return balanced_sample_nodes(
                counts, k, seed=fed.seed, rnd=rnd, weighted=self.weighted, order=self.identities.order
            )
        return sample_nodes(
            available, fed.fraction_train, fed.min_train_clients, seed=fed.seed, rnd=rnd, order=self.identities.order
        )


def refuse_unfinished(path: Path, resume: bool) -> None:
    """A fresh run must not overwrite an unfinished one (a checkpoint and no summary.json)."""
    meta = path / "checkpoint" / "meta.json"
    if not resume and meta.is_file() and not (path / "summary.json").is_file():
        done = json.loads(meta.read_text()).get("round")
        raise FedtuneError(
            f"{path} holds an unfinished run (checkpoint after round {done}); resume it "
            "(fedtune simulate --resume, or resume=true in flwr's --run-config) or write to another directory"
        )


class RoundProtocol(Protocol):
    """What one kind of round does; `ServerLoop` does the rest.

    ``receive`` raises `PayloadError` (or KeyError/TypeError/ValueError) for a
    reply it drops; the loop records the reason and goes on.
    """

    mode: str  # summary.json "mode"

    def setup(self, ws: workspace.Workspace) -> str:
        """Build the global state; return the progress header's description of what trains."""
        ...

    def messages(self, rnd: int, nodes: list[int]) -> list[Message]: ...

    def receive(self, rnd: int, node: int, reply: Message) -> dict[str, float]:
        """Decode and check one reply; return the client's metrics (kept for aggregation)."""
        ...

    def failed(self, node: int) -> None:
        """The node answered with an error (or the SuperLink did for it), sent an update that was dropped, or did
        not answer in time: what it holds of the global is unknown."""
        ...

    def install_head(self, head: Delta) -> None:
        """Make ``head`` (classifier keys of the adapter state) part of the initial global, before round 1
        or a checkpoint's load (``adapter.head_init = "prototypes"``, `fedtune.flower.prototypes`)."""
        ...

    def aggregate(self, rnd: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Fold this round's accepted replies into the global state: (train metrics, extra row fields)."""
        ...

    def global_state(self) -> Delta:
        """The global adapter, to evaluate and export."""
        ...

    def trainable_params(self) -> int: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def export(self, adapter_dir: Path) -> None: ...

    def finish(self, run_dir: Path) -> dict[str, Any]:
        """Write this kind's own final files into ``run_dir``; return its summary.json fields
        (``aggregation`` names what actually ran)."""
        ...


class DeltaRounds:
    """Adapter deltas up, the global adapter down; see the module docstring."""

    mode = "federated"

    def __init__(self, cfg: FedtuneConfig):
        self.cfg = cfg
        self.strategy = build_strategy(cfg)
        self.broadcast: Broadcast | None = None
        self.hetero: HeteroRanks | None = None
        self.uplink_codec = None
        # per node: digest -> round of the updates it had accepted (a replay is refused), the last REPLAY_WINDOW
        self.seen: dict[int, dict[bytes, int]] = {}
        if cfg.compression.codec != "none":
            from fedtune.compression import build_codec

            self.uplink_codec = build_codec(cfg.compression, "uplink")

    def setup(self, ws: workspace.Workspace) -> str:
        cfg = self.cfg
        self.ws = ws
        self.state = ws.initial_state()
        self.keys = ws.trainable_keys()
        self.expected = {k: (tuple(self.state[k].shape), torch.float32) for k in self.keys}
        self.lora_aggregator = self._lora_aggregator(ws)
        if cfg.aggregation.lora_mode == "hetero":
            self.hetero = HeteroRanks(self.lora_aggregator.scaling, cfg.adapter.r)
        # what travels and what the strategy averages: the trainable keys only (frozen ones, FFA's A,
        # lora-sb's fixed factors, head-only's identity LoRA, stay at their seeded values on every party)
        trainable = set(self.keys)
        self.sent_keys = [k for k in self.state if k in trainable or cfg.aggregation.lora_mode == "hetero"]
        if cfg.compression.downlink != "none":
            self.broadcast = Broadcast(cfg, self.sent())
        self.swa: Delta | None = None  # FedSWA's running mean of the globals since aggregation.swa_start
        self.swa_rounds = 0
        # client-central DP's bound C: fixed, or moved each round by adaptive clipping (a DP release, kept
        # in the checkpoint)
        self.clip_norm = cfg.privacy.clip_norm
        # SCAFFOLD's server control variate c over the trainable keys, zero at the start (kept in the checkpoint)
        self.control: Delta | None = None
        if cfg.aggregation.server_optimizer == "scaffold":
            from fedtune.aggregation.scaffold import zeros_like

            self.control = zeros_like({k: self.state[k] for k in self.keys})
        n = self.trainable_params()
        return f"adapter {cfg.adapter.method}: {n:,} trainable params ({4 * n / 1e6:.2f} MB fp32)"

    def install_head(self, head: Delta) -> None:
        # the head is trainable, so it travels with the global every round; a compressed broadcast's
        # global is no longer the version 0 clients build themselves
        seeded = self.sent()  # update() rebinds the head's keys to new tensors: these stay the seeded ones
        self.state.update({k: v.clone() for k, v in head.items()})
        if self.broadcast is not None:
            self.broadcast = Broadcast(self.cfg, self.sent(), seeded=seeded)

    def _lora_aggregator(self, ws: workspace.Workspace):
        """Product-space LoRA aggregation where ``aggregation.lora_mode`` asks for it, else None."""
        mode = self.cfg.aggregation.lora_mode
        if mode == "naive" or self.cfg.adapter.method == "prompt":  # config refuses 'head' with other modes
            return None
        from fedtune.aggregation import ExactLoRA, FactoredHeteroLoRA, FFALoRA, LoraScaling

        if mode == "ffa":
            return FFALoRA(atol=0.0)
        pcfg = ws.model.peft_config["default"]
        if mode == "hetero":
            return FactoredHeteroLoRA(LoraScaling.from_peft_config(pcfg), self.cfg.adapter.r)
        return ExactLoRA(LoraScaling.from_peft_config(pcfg), self.cfg.aggregation.rank)

    def aggregation_name(self) -> str:
        """What combines the accepted updates (config validation refuses what would not compose)."""
        if self.cfg.privacy.mode == "client-central":
            adaptive = ", adaptive clipping" if self.cfg.privacy.adaptive_clip else ""
            mean = (
                "clipped sum over the expected count q*N"
                if self.cfg.federation.sampling == "poisson"
                else "clipped unweighted mean"
            )
            return f"DP-FedAvg (client-level, central: {mean} + Gaussian noise{adaptive})"
        if self.lora_aggregator is not None:
            return type(self.lora_aggregator).__name__
        if self.control is not None:
            return f"SCAFFOLD (FedAvg mean, server_lr {self.cfg.aggregation.server_lr:g})"
        return type(self.strategy).__name__

    def trainable_params(self) -> int:
        return sum(self.state[k].numel() for k in self.keys)

    def global_state(self) -> Delta:
        """The adapter to evaluate and export: FedSWA's average once it has started, else the global."""
        return self.swa if self.swa is not None else self.state

    def average_(self, rnd: int) -> None:
        """FedSWA (Caldarola et al. 2022): fold this round's global into the uniform average of the
        globals since ``aggregation.swa_start``; clients keep training from the global itself."""
        start = self.cfg.aggregation.swa_start
        if start is None or rnd < start:
            return
        self.swa_rounds += 1
        if self.swa is None:
            self.swa = {k: v.clone() for k, v in self.state.items()}
            return
        w = 1.0 / self.swa_rounds
        for k, v in self.state.items():
            self.swa[k] = self.swa[k] + w * (v - self.swa[k])

    def sent(self, state: Delta | None = None) -> Delta:
        """``state`` (default: the global) restricted to the keys that travel."""
        state = self.state if state is None else state
        return {k: state[k] for k in self.sent_keys}

    def messages(self, rnd: int, nodes: list[int]) -> list[Message]:
        cfg = self.cfg
        self.global_arrays = to_arrayrecord(self.sent())
        self.round_seed = round_seed(cfg, rnd)
        self.accepted: list[Message] = []
        self.decoded: list[tuple[Delta, Delta, float]] = []  # (delta, global + delta, weight) per accepted reply
        self.control_deltas: list[Delta] = []  # SCAFFOLD: delta_c_i per accepted reply
        train_cfg = ConfigRecord({"server-round": rnd, "round-seed": self.round_seed, "version": rnd})
        if cfg.aggregation.server_optimizer == "fedprox":
            train_cfg["proximal-mu"] = float(cfg.aggregation.proximal_mu or 0.0)
        # a Poisson round may sample nobody; Flower's configure_train would wait for a node to connect
        msgs = (
            list(self.strategy.configure_train(rnd, self.global_arrays, train_cfg, _FixedGrid(nodes))) if nodes else []
        )
        if self.broadcast is None and self.hetero is None:  # (those two build each node's content themselves)
            wire = pack(self.sent())  # the same global, packed for the wire (records.pack)
            for m in msgs:
                m.content[P.ARRAYS] = wire
        if self.broadcast is not None:
            self.broadcast.advance(rnd, self.sent())
            for m in msgs:
                m.content = self.broadcast.content_for(m.metadata.dst_node_id, m.content[P.CONFIG])
        if self.hetero is not None:
            self.hetero.begin_round(self.state)
            for m in msgs:
                m.content = self.hetero.content_for(m.metadata.dst_node_id, m.content[P.CONFIG])
        if self.control is not None:  # c next to the adapter: as many bytes again
            wire_c = pack(self.control)
            for m in msgs:
                m.content[P.SCAFFOLD_C] = wire_c
        self.sampled = len(msgs)
        return msgs

    def decode_update(self, record, layout: dict[str, tuple[int, ...]]) -> Delta:
        """A client's delta from its ``update`` record; PayloadError if it is malformed."""
        if isinstance(record, ArrayRecord):
            if self.uplink_codec is not None:
                raise PayloadError(f"expected a {self.cfg.compression.codec!r} payload, got dense arrays")
            return from_arrayrecord(record)
        if not isinstance(record, ConfigRecord) or "payload" not in record:
            raise PayloadError("update is neither arrays nor a codec payload")
        if self.uplink_codec is None or record.get("codec") != self.uplink_codec.name:
            raise PayloadError(
                f"update uses codec {record.get('codec')!r}, this run expects {self.cfg.compression.codec!r}"
            )
        return self.uplink_codec.decode(bytes(record["payload"]), layout, seed=self.round_seed)

    def max_update_bytes(self, layout: dict[str, tuple[int, ...]]) -> int:
        """The most bytes an update of ``layout`` may carry before it is refused as oversized: twice
        what an honest one needs (the codec's bound: exact for dense and rand-k codecs, k kept entries
        with bitmap indices for the others; fp32 arrays otherwise), plus 256 bytes a tensor (``.npy``
        headers). The slack leaves a slightly wrong payload (a float64 tensor, one row too many) to
        the layout checks, which name what is wrong."""
        honest = (
            self.uplink_codec.wire_size(layout)
            if self.uplink_codec is not None
            else sum(4 * math.prod(shape) for shape in layout.values())
        )
        return 2 * honest + 256 * len(layout)

    def receive(self, rnd: int, node: int, reply: Message) -> dict[str, float]:
        m = reply.content[P.METRICS]
        claimed = m.get("server-round")
        if claimed is None or isinstance(claimed, bool) or claimed != rnd:
            raise PayloadError(
                f"reply claims server round {claimed!r}, this is round {rnd}"
                if claimed is not None
                else "metrics have no 'server-round' (the round the reply answers)"
            )
        start, node_expected = self.state, self.expected
        if self.hetero is not None:
            rank, start = self.hetero.start_for(node, m)
            node_expected = Layout(self.expected).for_rank(rank)
        node_layout = {k: shape for k, (shape, _) in node_expected.items()}
        record = reply.content[P.UPDATE]
        # before decoding: nothing is allocated for an oversized update or spent on a replayed one
        size, limit = update_bytes(record), self.max_update_bytes(node_layout)
        if size > limit:
            raise PayloadError(f"oversized update: {size} bytes, at most {limit} for this layout")
        digest = update_digest(record)
        seen = self.seen.setdefault(node, {})
        if digest in seen:
            raise PayloadError(f"replayed update: the same payload node {node} sent in round {seen[digest]}")
        delta = self.decode_update(record, node_layout)
        validate_update(delta, node_expected, max_norm=self.cfg.aggregation.max_update_norm)
        if float(m.get("num-examples", 0)) <= 0:
            raise PayloadError("metrics have no positive 'num-examples'")
        delta_c = self.receive_control(reply, node_layout) if self.control is not None else None
        seen[digest] = rnd
        while len(seen) > REPLAY_WINDOW:
            seen.pop(next(iter(seen)))
        m = MetricRecord({k: v for k, v in m.items() if k != "server-round"})  # checked; no train metric
        # the one place a reply's weight is taken (aggregation.weighting): the strategy (its arrays and
        # train metrics, so the server optimizers and FedProx too) and the LoRA aggregators read it
        weight = self.cfg.aggregation.client_weight(float(m["num-examples"]))
        # the same keys, in the same order, as the global record the strategy saw
        full = {k: start[k] + delta[k] if k in delta else start[k] for k in start}
        # mixed ranks cannot be averaged array by array: the strategy gets the global
        # (and only aggregates the metrics), hetero_round aggregates the factors
        arrays = self.global_arrays if self.hetero is not None else to_arrayrecord(self.sent(full))
        weighted = MetricRecord({**m, self.strategy.weighted_by_key: weight})
        reply.content = RecordDict({P.ARRAYS: arrays, P.METRICS: weighted})
        self.accepted.append(reply)
        self.decoded.append((delta, full, weight))
        if delta_c is not None:
            self.control_deltas.append(delta_c)
        if self.broadcast is not None:
            self.broadcast.acknowledge(node, rnd)
        return {k: float(v) for k, v in m.items()}

    def receive_control(self, reply: Message, layout: dict[str, tuple[int, ...]]) -> Delta:
        """SCAFFOLD: a reply's delta_c_i (packed fp32 arrays of the update's layout); PayloadError if absent,
        oversized or malformed."""
        record = reply.content[P.SCAFFOLD_DELTA_C] if P.SCAFFOLD_DELTA_C in reply.content else None
        if not isinstance(record, ArrayRecord):
            raise PayloadError(f"aggregation.server_optimizer = 'scaffold': reply has no {P.SCAFFOLD_DELTA_C!r} arrays")
        size, limit = update_bytes(record), self.max_update_bytes(layout)  # dense: config refuses a codec
        if size > limit:
            raise PayloadError(f"oversized {P.SCAFFOLD_DELTA_C}: {size} bytes, at most {limit} for this layout")
        delta_c = from_arrayrecord(record)
        validate_update(delta_c, {k: (shape, torch.float32) for k, shape in layout.items()}, max_norm=None)
        return delta_c

    def failed(self, node: int) -> None:
        if self.broadcast is not None:
            self.broadcast.failed(node)

    def aggregate(self, rnd: int) -> tuple[dict[str, float], dict[str, Any]]:
        cfg, state = self.cfg, self.state
        extra: dict[str, Any] = {}
        if cfg.privacy.adaptive_clip:
            extra["dp_clip_norm"] = self.clip_norm  # this round's C: public (post-processing of past releases)
        fed = cfg.federation
        # under Poisson sampling client-central DP releases its noise even when nobody was drawn or replied:
        # the analysis counts every round, and an unchanged global would tell that the round was empty
        release_anyway = cfg.privacy.mode == "client-central" and fed.sampling == "poisson"
        if not self.accepted and not release_anyway:
            self.average_(rnd)
            return {}, extra
        agg, agg_metrics = self.strategy.aggregate_train(rnd, self.accepted) if self.accepted else (None, None)
        if cfg.privacy.mode == "client-central":
            # DP-FedAvg (McMahan et al. 2018): clip each update, unweighted sum over a fixed denominator (the
            # m sampled clients, or the expected q*N under Poisson sampling), Gaussian noise from a generator
            # seeded by (seed, round)
            from fedtune.privacy import private_mean

            noise_gen = torch.Generator().manual_seed(derive_seed(fed.seed, "dp", rnd))
            deltas = [delta for delta, _, _ in self.decoded]
            count: dict[str, Any] = (
                {"expected_clients": fed.expected_clients_per_round, "like": {k: state[k] for k in self.keys}}
                if fed.sampling == "poisson"
                else {"num_sampled_clients": self.sampled}
            )
            adaptive = cfg.privacy.adaptive
            if adaptive is None:
                mean = private_mean(
                    deltas,
                    clip_norm=self.clip_norm,
                    noise_multiplier=cfg.privacy.noise_multiplier,
                    generator=noise_gen,
                    **count,
                )
            else:
                # adaptive clipping (Andrew et al. 2021): the unclipped fraction is released with noise from
                # its own (seed, round) stream, and moves C for the next round
                from fedtune.privacy.client_level import adaptive_private_mean, next_clip_norm

                mean, fraction = adaptive_private_mean(
                    deltas,
                    clip_norm=self.clip_norm,
                    noise_multiplier=cfg.privacy.noise_multiplier,
                    count_std=adaptive.count_std(fed.expected_clients_per_round),
                    generator=noise_gen,
                    count_generator=torch.Generator().manual_seed(derive_seed(fed.seed, "dp-count", rnd)),
                    **count,
                )
                extra["dp_unclipped_fraction"] = fraction
                self.clip_norm = next_clip_norm(
                    self.clip_norm, fraction, target_quantile=adaptive.target_quantile, clip_lr=adaptive.clip_lr
                )
            state.update({k: state[k] + mean[k] for k in self.keys})
        elif self.lora_aggregator is not None:
            # product-space LoRA averaging replaces the strategy's per-matrix mean
            merged, report = self.lora_aggregator.aggregate(
                [full for _, full, _ in self.decoded], [w for _, _, w in self.decoded], reference=state
            )
            state.update(merged)
            extra["lora_truncation_residual"] = float(report.total_residual)
        elif agg is not None:
            # Flower's adaptive optimizers (FedAdam, FedYogi, FedAdagrad) compute in float64;
            # the global keeps its dtypes, or the next round's replies would not match them
            new = {k: v.to(state[k].dtype) for k, v in from_arrayrecord(agg).items()}
            if self.control is not None:
                # SCAFFOLD (Karimireddy et al. 2020, Alg. 1 l. 16-17): x += eta_g * mean(update), the weighted mean
                # the strategy took; c += sum(delta_c_i) / N
                from fedtune.aggregation.scaffold import server_control_update

                lr = float(cfg.aggregation.server_lr)
                new = {k: state[k] + lr * (v - state[k]) for k, v in new.items()} if lr != 1.0 else new
                self.control = server_control_update(self.control, self.control_deltas, fed.num_clients)
            state.update(new)
        self.average_(rnd)
        return {k: float(v) for k, v in (agg_metrics or MetricRecord()).items()}, extra

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        extras = {
            "seen": self.seen,
            "strategy": {k: v for k, v in vars(self.strategy).items() if not callable(v)},
            "broadcast": vars(self.broadcast) if self.broadcast is not None else None,
            "hetero_node_rank": dict(self.hetero.node_rank) if self.hetero is not None else None,
            "swa_rounds": self.swa_rounds,
            "dp_clip_norm": self.clip_norm,
        }
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(directory / "adapter_state.safetensors"))
        if self.swa is not None:
            save_file({k: v.contiguous() for k, v in self.swa.items()}, str(directory / "swa_state.safetensors"))
        if self.control is not None:
            save_file({k: v.contiguous() for k, v in self.control.items()}, str(directory / SCAFFOLD_FILE))
        (directory / "server_state.pkl").write_bytes(pickle.dumps(extras))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        loaded = load_file(str(directory / "adapter_state.safetensors"))
        if set(loaded) != set(self.state):
            raise FedtuneError(f"--resume: {directory} holds a different adapter")
        self.state.update(loaded)
        extras = pickle.loads((directory / "server_state.pkl").read_bytes())  # our own file, written above
        self.seen = extras.get("seen", {})
        vars(self.strategy).update(extras["strategy"])
        if self.broadcast is not None and extras["broadcast"] is not None:
            vars(self.broadcast).update(extras["broadcast"])
        if self.hetero is not None and extras.get("hetero_node_rank"):
            self.hetero.node_rank.update(extras["hetero_node_rank"])
        self.swa_rounds = extras.get("swa_rounds", 0)
        if self.cfg.privacy.adaptive_clip and extras.get("dp_clip_norm") is None:
            raise FedtuneError(f"--resume: {directory} holds no adaptive clipping bound (privacy.adaptive_clip)")
        self.clip_norm = extras.get("dp_clip_norm", self.clip_norm)
        if (directory / "swa_state.safetensors").is_file():
            self.swa = load_file(str(directory / "swa_state.safetensors"))
        if self.control is not None:
            if not (directory / SCAFFOLD_FILE).is_file():
                raise FedtuneError(f"--resume: {directory} holds no SCAFFOLD control variate ({SCAFFOLD_FILE})")
            control = load_file(str(directory / SCAFFOLD_FILE))
            if set(control) != set(self.control):
                raise FedtuneError(f"--resume: {directory / SCAFFOLD_FILE} holds a different adapter's keys")
            self.control = control

    def export(self, adapter_dir: Path) -> None:
        export_adapter(self.ws, self.global_state(), adapter_dir)  # FedSWA: the average that was evaluated

    def finish(self, run_dir: Path) -> dict[str, Any]:
        out: dict[str, Any] = {
            "aggregation": {"strategy": self.aggregation_name(), **self.cfg.to_dict()["aggregation"]}
        }
        if self.swa is not None:  # what was evaluated and exported
            out["aggregation"]["swa_rounds_averaged"] = self.swa_rounds
        adaptive = self.cfg.privacy.adaptive if self.cfg.privacy.mode == "client-central" else None
        if adaptive is not None:
            from fedtune.privacy.client_level import update_noise_multiplier

            count_std = adaptive.count_std(self.cfg.federation.expected_clients_per_round)
            out["privacy"] = {
                "adaptive_clip": {
                    "target_quantile": adaptive.target_quantile,
                    "clip_lr": adaptive.clip_lr,
                    "count_noise_std": count_std,
                    "update_noise_multiplier": update_noise_multiplier(self.cfg.privacy.noise_multiplier, count_std),
                    "final_clip_norm": self.clip_norm,
                }
            }
        if self.cfg.attack.kind != "none":  # a simulated attack: which partitions ran it
            from fedtune.attack import attackers

            out["attack"] = {
                **self.cfg.to_dict()["attack"],
                "attackers": list(attackers(self.cfg.attack, self.cfg.federation.num_clients)),
            }
        return out


def make_protocol(cfg: FedtuneConfig) -> RoundProtocol:
    """The round protocol ``cfg`` asks for (SecAgg+ runs on Flower's workflow instead, `fedtune.flower.secagg`)."""
    if cfg.train.mode == "zo":
        from fedtune.flower.zo_server import SeedRounds

        return SeedRounds(cfg)
    return DeltaRounds(cfg)


class ServerLoop:
    """One federated run on a Flower ``Grid``: the rounds of ``protocol`` (by default the one ``cfg`` asks for)."""

    def __init__(
        self,
        cfg: FedtuneConfig,
        out_dir: str | Path,
        progress: Callable[[str], None] | None = None,
        *,
        resume: bool = False,
        protocol: RoundProtocol | None = None,
    ):
        self.cfg = cfg
        self.resume = resume
        self.runlog = RunLog(cfg, out_dir, progress)
        self.progress = self.runlog.progress
        self.protocol = protocol or make_protocol(cfg)
        self.sampler = NodeSampler(cfg)
        self.privacy: RunPrivacy | None = None
        self.head_init = None  # adapter.head_init = "prototypes": the exchange before round 1, and its head
        if cfg.adapter.head_init == "prototypes":
            from fedtune.flower.prototypes import HeadInit

            self.head_init = HeadInit(cfg)

    @property
    def path(self) -> Path:
        return self.runlog.path

    # --- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, rnd: int) -> None:
        """After every round, atomically: the protocol's state, the privacy ledger, the round."""
        config_text = config.to_toml(self.cfg)
        ledger = self.privacy.state_dict()

        def fill(tmp: Path) -> None:
            self.protocol.save(tmp)
            if self.head_init is not None:
                self.head_init.save(tmp)
            (tmp / "privacy.pkl").write_bytes(pickle.dumps(ledger))
            (tmp / "config.toml").write_text(config_text)
            (tmp / "meta.json").write_text(json.dumps({"round": rnd, "format": 2}))

        replace_dir(self.path / "checkpoint", fill)

    def load_checkpoint(self) -> int | None:
        """The last complete round of the checkpoint, its state loaded; None if there is none."""
        ckpt = self.path / "checkpoint"
        if not (ckpt / "meta.json").is_file():
            self.progress(f"no checkpoint in {ckpt}: starting from round 1")
            return None
        saved_cfg = config.load(ckpt / "config.toml")
        if saved_cfg.to_dict() != self.cfg.to_dict():
            raise FedtuneError(
                f"--resume: the config differs from the one in {ckpt / 'config.toml'}; resume with the same config"
            )
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta.get("format") != 2:
            raise FedtuneError(f"--resume: {ckpt} was written by another fedtune version (format {meta.get('format')})")
        if self.head_init is not None:  # before the protocol's state: ZO replays its history from it
            self.head_init.load(ckpt, workspace.get(self.cfg), self.protocol)
        self.protocol.load(ckpt)
        self.privacy.load_state_dict(pickle.loads((ckpt / "privacy.pkl").read_bytes()))  # our own file
        return int(meta["round"])

    def evaluate(self, ws: workspace.Workspace, final: bool) -> dict[str, float]:
        """Held-out metrics of the global adapter (intermediate rounds may use a prefix of the test split)."""
        adapters.set_state_(ws.model, self.protocol.global_state())
        return held_out_metrics(ws, self.cfg, final=final)

    def main(self, grid: Grid) -> dict[str, Any]:
        cfg, fed, proto = self.cfg, self.cfg.federation, self.protocol
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        ws = workspace.get(cfg)
        what = proto.setup(ws)
        self.privacy = RunPrivacy(cfg)
        refuse_unfinished(self.path, self.resume)
        resumed = self.load_checkpoint() if self.resume else None
        setup = None
        if self.head_init is not None and resumed is None:  # before round 0's evaluation, which then scores it
            setup = self.head_init.run(grid, ws, self.sampler.identities, proto)

        def evaluate(final: bool) -> dict[str, float]:
            return self.evaluate(ws, final)

        self.runlog.start(
            f"model {cfg.model.name} ({ws.task}), {what}; {fed.num_clients} clients, {fed.rounds} rounds, "
            f"{len(ws.test_data())} held-out examples",
            evaluate,
            resumed_round=resumed,
            setup=setup,
        )
        stopped = None
        for rnd in range((resumed or 0) + 1, fed.rounds + 1):
            stopped = self.privacy.stop_reason()
            if stopped:
                self.progress(f"stopping before round {rnd}: {stopped}")
                break
            t0 = time.monotonic()
            self.runlog.end_round(self.run_round(grid, rnd), t0, evaluate)
            self.save_checkpoint(rnd)
        summary = proto.finish(self.path)
        if self.head_init is not None:
            self.head_init.finish(self.path)
        privacy = self.privacy.summary()
        if cfg.privacy.mode == "client-central":  # what its epsilon assumes about the sampler above
            from fedtune.privacy.client_level import central_accounting_statement

            privacy.update(central_accounting_statement(self.privacy.accountant, sampling=fed.sampling))
        privacy.update(summary.pop("privacy", {}))
        return self.runlog.finish(
            ws.task,
            evaluate,
            proto.export,
            trainable_params=proto.trainable_params(),
            aggregation=summary.pop("aggregation"),
            privacy=privacy,
            mode=proto.mode,
            stopped_early=stopped,
            **summary,
        )

    def run_round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        """Sample, send, collect and check the replies, aggregate: the round's metrics.jsonl row."""
        proto = self.protocol
        nodes = self.sampler.sample(grid, rnd)
        msgs = proto.messages(rnd, nodes)
        down = {m.metadata.dst_node_id: wire_bytes(m.content) for m in msgs}
        # a Poisson round that drew nobody sends nothing and records sampled = accepted = 0
        replies = send_and_receive(grid, msgs, timeout=self.cfg.federation.round_timeout) if msgs else []
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        rejected: list[dict] = []
        up: dict[int, int] = {}
        clients: list[dict] = []
        replied: set[int] = set()
        for r in replies:
            node = r.metadata.src_node_id
            meant = sent_to.get(r.metadata.reply_to_message_id)
            if node not in nodes:  # Flower's own error replies (node unavailable) come from the SuperLink
                node = meant if meant is not None else node
            elif (meant is not None and meant != node) or node in replied:
                # a sampled node answering another's message, or twice: neither counts as an update
                why = f"replied for node {meant}" if meant != node else "replied twice"
                rejected.append({"node": node, "reason": f"{why}; that reply is dropped"})
                continue
            replied.add(node)
            if r.has_error():
                proto.failed(node)
                rejected.append({"node": node, "reason": short_reason(r.error.reason)})
                continue
            up[node] = wire_bytes(r.content)
            try:
                metrics = proto.receive(rnd, node, r)
            except (PayloadError, KeyError, TypeError, ValueError) as exc:  # a bad update, never a crash
                proto.failed(node)  # it may hold what it was sent, or not
                rejected.append({"node": node, "reason": str(exc)})
                continue
            clients.append({"node": node, **metrics})
        answered = {r["node"] for r in rejected} | {c["node"] for c in clients}
        for node in nodes:
            if node not in answered:
                proto.failed(node)
                rejected.append(
                    {
                        "node": node,
                        "reason": f"no reply within federation.round_timeout = {self.cfg.federation.round_timeout} s",
                    }
                )
        for rej in rejected:
            log.warning("round %d: update from node %s dropped: %s", rnd, rej["node"], rej["reason"])
        train, extra = proto.aggregate(rnd)
        extra.update(self.privacy.end_round(clients))
        return round_record(rnd, len(msgs), len(clients), rejected, train, up, down, clients, **extra)


__all__ = [
    "ServerLoop",
    "RoundProtocol",
    "DeltaRounds",
    "NodeSampler",
    "Broadcast",
    "HeteroRanks",
    "build_strategy",
    "sample_nodes",
    "poisson_sample_nodes",
    "round_seed",
    "make_protocol",
    "refuse_unfinished",
]
