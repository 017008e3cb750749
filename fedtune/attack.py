"""Simulated Byzantine and broken clients: the ``[attack]`` section and what an attacker sends.

An attacking client runs the normal client code path (`fedtune.flower.client.handle_train`):
it trains on its data as an honest client would, then turns what it would have
sent into what the attack says, so the server and its defences see exactly what
a real bad client would send. Data poisoning (``label-flip``) happens before
training instead. Kinds (``attack.kind``):

Model poisoning (on the client's update ``d``, after client-level DP, before compression):

* ``sign-flip``: ``-d`` (e.g. Fang et al. 2020, "Local Model Poisoning Attacks to
  Byzantine-Robust Federated Learning", arXiv:1911.11815, the "sign flipping" baseline);
* ``scale``: ``factor * d`` (model replacement, Bagdasaryan et al. 2020, arXiv:1807.00459);
* ``gaussian``: the update is replaced by Gaussian noise scaled to L2 norm
  ``noise_norm`` (the "Gaussian attack" of Fang et al. 2020), drawn from a
  generator seeded by (attack.seed, round, partition);
* ``alie``: "A Little Is Enough" (Baruch et al. 2019, arXiv:1902.06156): every
  colluder sends ``mean - z * std`` per coordinate. In simulation the colluders
  are given the benign updates of *all* attacking clients (each attacker trains
  them itself: same global adapter, the colluder's partition and its batch seed,
  so they are the updates those clients would send if honest), the common
  choice in papers since the attackers' own benign updates are a sample of the
  honest ones. ``std`` is the per-coordinate sample standard deviation (n-1).
  ``z`` unset takes the paper's ``z_max``: with n = federation.num_clients
  workers and m attackers, s = floor(n/2 + 1) - m honest workers must be won
  over and z = Phi^-1((n - m - s) / (n - m)) (`alie_z`); where that is not
  positive (2 of 10 attackers give 0) ``z`` must be set (1.0 is common).
* ``agr-tailored``: the AGR-tailored attack of Shejwalkar & Houmansadr (NDSS 2021,
  "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses
  for Federated Learning"), with partial knowledge: the colluders know their own
  benign updates (obtained as for ``alie``) and the server's rule, and all send
  ``m = mean - gamma * p``. ``p`` (``perturbation``): ``std`` (the paper's
  "inverse std", sample std as for ALIE; default), ``unit-vector`` (``mean /
  ||mean||``) or ``sign`` (``sign(mean)``). ``gamma`` comes from the paper's
  Algorithm 1, a binary search (`search_gamma`: first probe ``gamma_init``,
  default `GAMMA_INIT`, then `SEARCH_STEPS` probes in all, halving the step) for
  the largest gamma at which the server's rule (`ServerRule`: Flower's median,
  trimmed mean, Krum or Multi-Krum, exactly as the server configures it), applied
  to the colluders' benign updates plus one copy of ``m`` per colluder, still (Krum)
  picks a copy of ``m``, (Multi-Krum) keeps every copy of ``m``, or (median,
  trimmed mean) lands at least as far from ``mean`` as the farthest probe so far. Under ``aggregation.max_update_norm``
  gamma is capped where ``||m||`` reaches the bound (`norm_cap`), the largest
  update the server accepts; with the bound alone (FedAvg behind it) that cap is
  gamma. Refused where neither a robust rule nor the bound is set.

Data poisoning:

* ``label-flip``: every label ``y`` of the attacker's own training data becomes
  ``num_labels - 1 - y`` (Tolpegin et al. 2020, arXiv:2007.08432), before training.

Hostile payloads (what a broken or malicious client sends; the server rejects each
with its reason, `fedtune.flower.server.DeltaRounds.receive`):

* ``nan``: the update carries a NaN and an Inf;
* ``wrong-layout``: ``layout`` = ``missing`` (a tensor left out), ``extra`` (an
  unknown tensor added), ``shape`` (a tensor with one row too many) or ``dtype``
  (a float64 tensor; dense updates only);
* ``oversized``: the update plus a padding tensor of `OVERSIZE` times its
  elements, far more bytes than the layout needs;
* ``replay``: the update the client sent the first time it was sampled, resent
  every later round;
* ``wrong-round``: the reply claims the previous round (``server-round`` metric).

Which clients attack: ``partition_ids`` (explicit), or ``fraction`` of the
``federation.num_clients`` partitions (the nearest whole number, at least one
wanted), chosen by a generator seeded from ``attack.seed`` (`attackers`).

Simulation only (``fedtune simulate``, or a ServerLoop over a LocalGrid): a run
configured through Flower's ``run_config`` (``flwr run``, deployment) refuses the
section unless ``attack.allow_deployment = true`` (for tests). With that flag in
the run config a SuperNode can also be told to attack through its node config
(``--node-config "attack='sign-flip' attack-factor=10"``: the keys of this
section prefixed ``attack-``, `node_attack`); it attacks as its own partition.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedtune.aggregation.config import multikrum_kept
from fedtune.delta import Delta, global_norm
from fedtune.errors import ConfigError
from fedtune.seeds import derive_seed
from fedtune.validation import Section, between, choice, only_with, positive

SECTION = "attack"
MODEL_POISONING = ("sign-flip", "scale", "gaussian", "alie", "agr-tailored")
COLLUDING = ("alie", "agr-tailored")  # each attacker also trains its colluders' benign updates
DATA_POISONING = ("label-flip",)
HOSTILE = ("nan", "wrong-layout", "oversized", "replay", "wrong-round")
KINDS = ("none", *MODEL_POISONING, *DATA_POISONING, *HOSTILE)
LAYOUT_CHANGES = ("missing", "extra", "shape", "dtype")
OVERSIZE = 10  # an oversized update carries this many times the layout's elements as padding
EXTRA_KEY = "attack.extra"
PADDING_KEY = "attack.padding"
REPLAY_STATE = "fedtune.attack-replay"  # per-node context.state: the update a replaying client resends
NODE_PREFIX = "attack"  # node_config keys: attack (the kind), attack-factor, attack-noise-norm, ...
PERTURBATIONS = ("std", "unit-vector", "sign")  # agr-tailored's direction p (m = mean - gamma * p)
# agr-tailored's search (Shejwalkar & Houmansadr 2021, Algorithm 1): the first gamma probed, in
# units of p (std: standard deviations, as ALIE's z), and the number of probes. Every probe is a
# multiple of GAMMA_INIT / 2**(SEARCH_STEPS - 1) below 2 * GAMMA_INIT, the largest gamma it can
# find; 20 probes resolve gamma to 2e-5 GAMMA_INIT, about the paper's tolerance of 1e-5.
GAMMA_INIT = 10.0
SEARCH_STEPS = 20


@dataclass(frozen=True)
class AttackConfig(Section):
    """``[attack]``: which simulated clients attack, and how (see the module docstring).

    Fields:
        kind: one of `KINDS`; ``"none"`` (default) turns attacks off.
        fraction: the fraction of the ``federation.num_clients`` partitions that
            attack, chosen from ``seed``; or
        partition_ids: exactly which partitions attack.
        seed: seeds the choice of attackers and the Gaussian attack's noise.
        factor: ``scale``'s multiplier (default 10).
        noise_norm: ``gaussian``'s L2 norm of the noise sent (required).
        z: ``alie``'s number of standard deviations (default: Baruch et al.'s z_max).
        perturbation: ``agr-tailored``'s direction, one of `PERTURBATIONS` (default ``"std"``).
        gamma_init: ``agr-tailored``'s first gamma probed (default `GAMMA_INIT`); the
            search finds gamma below twice this.
        layout: ``wrong-layout``'s change (default ``"shape"``).
        allow_deployment: let a run configured through Flower's run_config
            (``flwr run``) use this section and SuperNodes' ``attack`` node
            config; for tests only.
    """

    SECTION: ClassVar[str] = SECTION
    kind: str = "none"
    fraction: float | None = None
    partition_ids: tuple[int, ...] | None = None
    seed: int = 0
    factor: float | None = None
    noise_norm: float | None = None
    z: float | None = None
    layout: str | None = None
    perturbation: str | None = None
    gamma_init: float | None = None
    allow_deployment: bool = False

    def resolved(self) -> dict[str, Any]:
        tailored = self.kind == "agr-tailored"
        defaults = {
            "factor": 10.0 if self.kind == "scale" else None,
            "layout": "shape" if self.kind == "wrong-layout" else None,
            "perturbation": "std" if tailored else None,
            "gamma_init": GAMMA_INIT if tailored else None,
        }
        return {k: v for k, v in defaults.items() if v is not None and getattr(self, k) is None}

    def problems(self) -> list[str]:
        e: list[str] = []
        choice(e, "attack.kind", self.kind, KINDS)
        if self.kind == "none":
            for name in ("fraction", "partition_ids"):
                value = getattr(self, name)
                if value is not None:
                    e.append(
                        f"attack.{name}: only used with an attack.kind, which is 'none'; unset it or set "
                        f"attack.kind (got {_listed(value) if name == 'partition_ids' else value!r})"
                    )
        elif self.kind in KINDS and (self.fraction is None) == (self.partition_ids is None):
            e.append(
                f"attack.fraction: attack.kind = {self.kind!r} needs which clients attack: set attack.fraction or "
                f"attack.partition_ids, not both (got fraction = {self.fraction!r}, partition_ids = "
                f"{_listed(self.partition_ids)})"
            )
        between(e, "attack.fraction", self.fraction, 0, 1, "(]")
        if self.partition_ids is not None:
            ids = list(self.partition_ids)
            if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
                e.append(f"attack.partition_ids: must be distinct partition ids >= 0, at least one (got {ids!r})")
        only_with(e, "attack.factor", self.factor, "attack.kind", self.kind, ("scale",))
        only_with(e, "attack.noise_norm", self.noise_norm, "attack.kind", self.kind, ("gaussian",))
        only_with(e, "attack.z", self.z, "attack.kind", self.kind, ("alie",))
        only_with(e, "attack.layout", self.layout, "attack.kind", self.kind, ("wrong-layout",))
        only_with(e, "attack.perturbation", self.perturbation, "attack.kind", self.kind, ("agr-tailored",))
        only_with(e, "attack.gamma_init", self.gamma_init, "attack.kind", self.kind, ("agr-tailored",))
        positive(e, "attack.factor", self.factor)
        positive(e, "attack.noise_norm", self.noise_norm)
        positive(e, "attack.z", self.z)
        positive(e, "attack.gamma_init", self.gamma_init)
        if self.layout is not None:
            choice(e, "attack.layout", self.layout, LAYOUT_CHANGES)
        if self.perturbation is not None:
            choice(e, "attack.perturbation", self.perturbation, PERTURBATIONS)
        if self.kind == "gaussian" and self.noise_norm is None:
            e.append("attack.noise_norm: attack.kind = 'gaussian' needs the L2 norm of the noise it sends (got None)")
        return e


def _listed(ids) -> Any:
    return list(ids) if ids is not None else None


def num_attackers(a: AttackConfig, num_clients: int) -> int:
    """How many partitions attack: ``len(partition_ids)``, or ``fraction * num_clients`` rounded half up."""
    if a.kind == "none":
        return 0
    if a.partition_ids is not None:
        return len(a.partition_ids)
    return min(num_clients, int(math.floor(a.fraction * num_clients + 0.5)))


def attackers(a: AttackConfig, num_clients: int) -> tuple[int, ...]:
    """The attacking partition ids, sorted: the explicit list, or a seeded choice of ``fraction`` of them."""
    if a.kind == "none":
        return ()
    if a.partition_ids is not None:
        return tuple(sorted(a.partition_ids))
    rng = np.random.default_rng(derive_seed(a.seed, "attackers", num_clients))
    picks = rng.choice(num_clients, size=num_attackers(a, num_clients), replace=False)
    return tuple(sorted(int(p) for p in picks))


def alie_z(n: int, m: int) -> float:
    """Baruch et al. 2019's z_max for n workers of which m attack (their Algorithm 1):
    s = floor(n/2 + 1) - m, z_max = Phi^-1((n - m - s) / (n - m)).

    s is how many honest workers the attackers must win over for a majority; an
    update shifted by z_max standard deviations is still closer to the mean than
    s of the n - m honest ones (if they are normal), so a median or Krum can
    pick it. Raises ValueError where the formula gives no positive finite z
    (s < 1: the attackers are a majority; z_max <= 0: too few attackers, e.g.
    2 of 10, whose best is the honest mean itself).
    """
    s = math.floor(n / 2 + 1) - m
    if not 0 < m < n or s < 1:
        raise ValueError(f"z_max needs 0 < m < floor(n/2 + 1) attackers (got n = {n}, m = {m})")
    q = (n - m - s) / (n - m)
    if q <= 0.5:
        raise ValueError(f"z_max = Phi^-1({q:.3g}) is not positive for n = {n}, m = {m}")
    return statistics.NormalDist().inv_cdf(q)


def config_problems(cfg) -> list[str]:
    """What ``[attack]`` cannot be combined with, each naming both keys (the config's cross-check)."""
    a, e = cfg.attack, []
    if a.kind == "none":
        return e
    n = cfg.federation.num_clients
    if a.partition_ids is not None:
        outside = sorted(p for p in a.partition_ids if p >= n)
        if outside:
            e.append(
                f"attack.partition_ids: {outside} are not partitions of federation.num_clients = {n} "
                f"(0..{n - 1}) (got {list(a.partition_ids)!r})"
            )
    elif num_attackers(a, n) < 1:
        e.append(f"attack.fraction: of federation.num_clients = {n} partitions gives no attacker (got {a.fraction!r})")
    if cfg.train.mode == "zo" and a.kind != "label-flip":
        e.append(
            f"attack.kind: {a.kind!r} cannot be combined with train.mode = 'zo' (zeroth-order clients send (seed, "
            "scalar) pairs, not an update tensor); only 'label-flip' runs there"
        )
    if cfg.aggregation.secure != "none" and a.kind in HOSTILE:
        e.append(
            f"attack.kind: {a.kind!r} cannot be combined with aggregation.secure = {cfg.aggregation.secure!r} (the "
            "server sees only the masked sum, so it cannot check or reject one update); use a model or data "
            "poisoning kind"
        )
    codec = cfg.compression.codec
    if codec != "none" and a.kind == "nan":
        e.append(
            f"attack.kind: 'nan' cannot be combined with compression.codec = {codec!r} (the codec's encoder refuses "
            "non-finite values, so such a client cannot send them; the decoders' checks are fuzzed instead); "
            "use codec = 'none'"
        )
    if codec != "none" and a.kind == "wrong-layout" and a.layout == "dtype":
        e.append(
            f"attack.layout: 'dtype' cannot be combined with compression.codec = {codec!r} (a codec payload "
            "always decodes to float32); use 'missing', 'extra' or 'shape', or codec = 'none'"
        )
    if a.kind == "label-flip" and cfg.model.task == "causal-lm":
        e.append("attack.kind: 'label-flip' cannot be combined with model.task = 'causal-lm' (there are no labels)")
    if a.kind in COLLUDING:
        e.extend(_colluder_problems(cfg))
    return e


def _colluder_problems(cfg) -> list[str]:
    """ALIE and AGR-tailored: colluders that retrain each other's benign updates (and, for the latter, a rule)."""
    a, e = cfg.attack, []
    kind, agg = a.kind, cfg.aggregation
    m, n = num_attackers(a, cfg.federation.num_clients), cfg.federation.num_clients
    if m < 2:
        e.append(
            f"attack.kind: {kind!r} estimates the per-coordinate std over the colluders' benign updates, which needs "
            f"at least 2 attackers; attack.fraction / attack.partition_ids give {m}"
        )
    elif kind == "alie" and a.z is None:
        try:
            alie_z(n, m)
        except ValueError as exc:
            e.append(
                f"attack.z: Baruch et al.'s z_max for federation.num_clients = {n} and {m} attackers: {exc}; "
                "set attack.z (got None)"
            )
    if kind == "agr-tailored" and agg.robust == "none" and agg.max_update_norm is None:
        e.append(
            "attack.kind: 'agr-tailored' needs a known robust rule: set aggregation.robust or "
            "aggregation.max_update_norm (the update is crafted against the server's rule; plain FedAvg has none) "
            f"(got robust = {agg.robust!r}, max_update_norm = None)"
        )
    if cfg.privacy.mode != "none":
        e.append(
            f"attack.kind: {kind!r} cannot be combined with privacy.mode = {cfg.privacy.mode!r} (each attacker "
            "retrains its colluders' benign updates, which needs no per-client privacy state); use 'none'"
        )
    if agg.lora_mode == "hetero":
        e.append(
            f"attack.kind: {kind!r} cannot be combined with aggregation.lora_mode = 'hetero' (colluders at different "
            "ranks have no common coordinates to average); use 'naive' or 'exact'"
        )
    return e


def deployment_problems(cfg) -> list[str]:
    """A run configured through Flower's run_config (``flwr run``) refuses ``[attack]`` unless allowed for tests."""
    a = cfg.attack
    if a.kind == "none" or a.allow_deployment:
        return []
    return [
        f"attack.kind: simulated attacks are for simulations (fedtune simulate); a run started through Flower's "
        f"run_config refuses them unless attack.allow_deployment = true (for tests) (got {a.kind!r})"
    ]


# --- which attack a client runs ------------------------------------------------------------------


def node_attack(cfg, node_config: Mapping[str, Any], partition_id: int):
    """The attack a SuperNode's node config asks for (``attack = "<kind>"``, ``attack-<key> = value``), or None.

    Refused (`ConfigError`) unless the run config sets ``attack.allow_deployment = true``;
    the node attacks as its own partition; every check of the section applies.
    """
    keys = {k for k in node_config if k == NODE_PREFIX or k.startswith(NODE_PREFIX + "-")}
    if not keys:
        return None
    if not cfg.attack.allow_deployment:
        raise ConfigError(
            f"node_config {sorted(keys)}: a SuperNode attacks only in tests: set attack.allow_deployment = true "
            "in the run config"
        )
    values = {k.removeprefix(NODE_PREFIX).lstrip("-") or "kind": node_config[k] for k in keys}
    bad = sorted(
        k for k in values if k in ("fraction", "partition_ids", "partition-ids", "allow_deployment", "allow-deployment")
    )
    if bad:
        raise ConfigError(f"node_config attack-{bad[0]}: a SuperNode attacks as its own partition; remove it")
    overrides = {f"attack.{k.replace('-', '_')}": v for k, v in values.items()}
    overrides.update({"attack.partition_ids": (int(partition_id),), "attack.fraction": None})
    base = {f"attack.{k}": None for k in ("factor", "noise_norm", "z", "layout", "perturbation", "gamma_init")}
    return cfg.replace(**{**base, **overrides}).attack  # the whole config's checks, this node's attack


def client_attack(cfg, node_config: Mapping[str, Any], partition_id: int) -> AttackConfig | None:
    """The attack the client holding ``partition_id`` runs this run, or None for an honest client."""
    from_node = node_attack(cfg, node_config, partition_id)
    if from_node is not None:
        return from_node
    a = cfg.attack
    if a.kind != "none" and partition_id in attackers(a, cfg.federation.num_clients):
        return a
    return None


# --- what an attacker sends (pure functions on deltas and labels) --------------------------------


def flip_labels(examples: Sequence[dict], num_labels: int) -> list[dict]:
    """Label flipping: ``label -> num_labels - 1 - label`` on copies of the examples."""
    if num_labels < 2:
        raise ValueError(f"label flipping needs at least 2 labels, got {num_labels}")
    out = []
    for ex in examples:
        y = int(ex["label"])
        if not 0 <= y < num_labels:
            raise ValueError(f"label {y} outside 0..{num_labels - 1}")
        out.append({**ex, "label": num_labels - 1 - y})
    return out


def sign_flip(delta: Delta) -> Delta:
    """``-delta``."""
    return {k: -v for k, v in delta.items()}


def scale(delta: Delta, factor: float) -> Delta:
    """``factor * delta``."""
    return {k: v * factor for k, v in delta.items()}


def gaussian(delta: Delta, noise_norm: float, generator: torch.Generator) -> Delta:
    """Gaussian noise in ``delta``'s layout, scaled so that its L2 norm over all tensors is ``noise_norm``."""
    noise = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in delta.items()}
    norm = math.sqrt(sum(float(x.square().sum()) for x in noise.values()))
    return {k: (x * (noise_norm / norm)).to(delta[k].dtype) for k, x in noise.items()}


def alie(benign: Sequence[Delta], z: float) -> Delta:
    """A Little Is Enough: ``mean - z * std`` per coordinate over the colluders' ``benign`` updates.

    ``std`` is the sample standard deviation (n - 1), computed in float64.
    """
    if len(benign) < 2:
        raise ValueError(f"ALIE needs the benign updates of at least 2 colluders, got {len(benign)}")
    out: Delta = {}
    for k, ref in benign[0].items():
        stack = torch.stack([d[k].to(torch.float64) for d in benign])
        out[k] = (stack.mean(0) - z * stack.std(0, unbiased=True)).to(ref.dtype)
    return out


# --- AGR-tailored (Shejwalkar & Houmansadr, NDSS 2021) --------------------------------------------


@dataclass(frozen=True)
class ServerRule:
    """What the server makes of the updates it receives, as ``[aggregation]`` configures it.

    ``robust``: ``"none"`` (the weighted mean), ``"median"``, ``"trimmed-mean"``
    (``trim_beta`` of the updates cut from each tail), ``"krum"`` (tolerating
    ``num_malicious``) or ``"multikrum"`` (keeping ``krum_select`` updates, n - f
    when None: `fedtune.aggregation.config.multikrum_kept`); ``max_norm``: an
    update of larger L2 norm is rejected (``aggregation.max_update_norm``,
    `fedtune.aggregation.validate_update`).
    """

    robust: str = "none"
    trim_beta: float = 0.2
    num_malicious: int = 0
    max_norm: float | None = None
    krum_select: int | None = None

    @classmethod
    def of(cls, agg) -> ServerRule:
        """The rule of an `fedtune.aggregation.AggregationConfig`."""
        return cls(agg.robust, agg.trim_beta, agg.num_malicious, agg.max_update_norm, agg.krum_select)


def krum_rows(updates: torch.Tensor, rule: ServerRule) -> list[int]:
    """The rows of ``updates`` (``[k, d]``, flat) that Krum (one) or Multi-Krum keeps, best score first.

    Blanchard et al. 2017 (NeurIPS, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent"): each row scores the sum of its squared L2 distances
    to its k - f - 2 nearest other rows (f = ``num_malicious``) and the lowest scores
    are kept: one under ``"krum"``, `multikrum_kept` of the k rows under
    ``"multikrum"``, as the server keeps of a round's replies. Flower's own
    ``select_multikrum``, which both of the server's strategies call.
    """
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    if rule.robust not in ("krum", "multikrum"):
        raise ValueError(f"robust rule must be 'krum' or 'multikrum', got {rule.robust!r}")
    x = updates.detach().to(torch.float64).numpy()
    kept = 1 if rule.robust == "krum" else multikrum_kept(len(x), rule.num_malicious, rule.krum_select)
    contents = [RecordDict({"arrays": ArrayRecord([row])}) for row in x]
    row_of = {id(c): j for j, c in enumerate(contents)}
    picked = select_multikrum(contents, num_malicious_nodes=rule.num_malicious, num_nodes_to_select=kept)
    return [row_of[id(c)] for c in picked]


def robust_aggregate(updates: torch.Tensor, rule: ServerRule) -> tuple[torch.Tensor, int | None]:
    """``rule.robust`` over the rows of ``updates`` (``[k, d]``, flat): (aggregate in float64, Krum's pick or None).

    The code the server runs (`fedtune.flower.server.build_strategy`, flwr 1.41):
    FedMedian's ``np.median`` over the stacked updates (inline in its
    ``aggregate_train``, so the same call is made here), FedTrimmedAvg's
    ``trim_mean`` and Krum's and Multi-Krum's ``select_multikrum`` (`krum_rows`).
    Each is per coordinate or works on pairwise distances, so flat rows give what
    the server computes array by array on ``global + delta``. The median, trimmed
    mean and Krum are unweighted, as there; Multi-Krum's mean of the rows it keeps
    is unweighted here, where the server weights it as ``aggregation.weighting``
    says (the attackers do not know the honest clients' example counts, and the
    selection, all that `tailor` reads of Multi-Krum, has no weights).
    """
    x = updates.detach().to(torch.float64).numpy()
    # Flower's own functions, imported only here: nothing else in this module needs Flower
    if rule.robust == "median":
        return torch.from_numpy(np.asarray(np.median(x, axis=0))), None
    if rule.robust == "trimmed-mean":
        from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

        return torch.from_numpy(np.asarray(trim_mean(x, rule.trim_beta))), None
    if rule.robust == "krum":
        (i,) = krum_rows(updates, rule)
        return torch.from_numpy(x[i].copy()), i
    if rule.robust == "multikrum":
        return torch.from_numpy(x[krum_rows(updates, rule)].mean(axis=0)), None
    raise ValueError(f"robust rule must be 'median', 'trimmed-mean', 'krum' or 'multikrum', got {rule.robust!r}")


def direction(benign: torch.Tensor, perturbation: str) -> torch.Tensor:
    """AGR-tailored's ``p`` over flat benign updates ``[k, d]`` (the update is ``mean - gamma * p``):
    the per-coordinate sample std (n - 1), ``mean / ||mean||`` or ``sign(mean)``
    (Shejwalkar & Houmansadr's inverse std, inverse unit vector, inverse sign)."""
    x = benign.to(torch.float64)
    mean = x.mean(0)
    if perturbation == "std":
        return x.std(0, unbiased=True)
    if perturbation == "unit-vector":
        norm = float(mean.norm())
        return mean / norm if norm > 0 else torch.zeros_like(mean)
    if perturbation == "sign":
        return mean.sign()
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")


def norm_cap(mean: torch.Tensor, p: torch.Tensor, max_norm: float) -> float | None:
    """The largest ``gamma >= 0`` with ``||mean - gamma * p|| <= max_norm``, or None where there is none.

    The larger root of ``|p|^2 g^2 - 2 (mean.p) g + |mean|^2 - max_norm^2``; ``inf``
    when ``p`` is zero and ``mean`` is inside the bound.
    """
    a, b = float(p @ p), float(mean @ p)
    c = float(mean @ mean) - max_norm**2
    if a == 0:
        return math.inf if c <= 0 else None
    disc = b * b - a * c
    if disc < 0:
        return None
    root = (b + math.sqrt(disc)) / a if b >= 0 else c / (b - math.sqrt(disc))  # no cancellation either way
    return root if root >= 0 else None


def search_gamma(succeeds: Callable[[float], bool], gamma_init: float = GAMMA_INIT, steps: int = SEARCH_STEPS) -> float:
    """Shejwalkar & Houmansadr 2021, Algorithm 1, with a fixed number of probes: probe ``gamma_init``,
    then move up (after a success) or down by a step that starts at ``gamma_init / 2`` and
    halves after every probe; return the last gamma that succeeded (0.0 if none did).

    The probes walk a binary search tree over the grid ``j * gamma_init / 2**(steps - 1)``,
    ``0 < j < 2**steps``: where success holds exactly up to some gamma, the result is the
    largest grid point at which it holds; for any ``succeeds``, the grid point just above
    the result (where there is one) was probed and failed.
    """
    gamma, step, found = float(gamma_init), gamma_init / 2, 0.0
    for _ in range(steps):
        if succeeds(gamma):
            found, gamma = gamma, gamma + step
        else:
            gamma -= step
        step /= 2
    return found


def tailor(
    benign: torch.Tensor,
    rule: ServerRule,
    *,
    perturbation: str = "std",
    gamma_init: float = GAMMA_INIT,
    steps: int = SEARCH_STEPS,
) -> tuple[torch.Tensor, float]:
    """The AGR-tailored update against ``rule`` from flat benign updates ``[k, d]``: (``m`` in float64, gamma).

    Shejwalkar & Houmansadr, NDSS 2021 (partial knowledge): ``m = mean - gamma * p``
    (`direction`), every one of the k colluders sending it, and gamma from
    `search_gamma` on the rule applied to the benign rows plus k copies of ``m``
    (`robust_aggregate`): Krum succeeds where it picks a copy; Multi-Krum where it
    keeps every copy (`krum_rows`, so each colluder's update is in the mean), keeping
    of the 2k rows what the server's rule keeps of 2k replies: 2k - f under the
    default n - f, and all of them (so every probe succeeds and gamma reaches the
    top of the search) where ``krum_select`` >= 2k or f = 0; the median and the
    trimmed mean succeed where their output lies at least as far (L2) from ``mean``
    as at every gamma probed before (from gamma = 0 on). A norm bound caps gamma at
    `norm_cap` (probes above it are judged at the cap), so ``m`` is the largest
    update the server accepts in that direction; with no robust rule gamma is that
    cap (the weighted mean moves linearly with gamma). Where no gamma brings ``m``
    inside the bound, gamma is the one of least norm and ``m`` is scaled onto the bound.
    """
    if benign.dim() != 2 or benign.shape[0] < 2:
        raise ValueError(
            f"agr-tailored needs the flat benign updates of at least 2 colluders, got {tuple(benign.shape)}"
        )
    if rule.robust == "none" and rule.max_norm is None:
        raise ValueError("agr-tailored needs a robust rule or a norm bound to craft against")
    x = benign.to(torch.float64)
    k, mean, p = x.shape[0], x.mean(0), direction(x, perturbation)
    cap = math.inf
    if rule.max_norm is not None:
        cap = norm_cap(mean, p, rule.max_norm)
        if cap is None:
            a = float(p @ p)
            cap = max(0.0, float(mean @ p) / a) if a > 0 else 0.0
        elif math.isinf(cap):  # p = 0: every gamma sends the mean
            cap = 0.0

    def craft(g: float) -> torch.Tensor:
        v = mean - min(g, cap) * p
        norm = float(v.norm())
        if rule.max_norm is not None and norm > rule.max_norm:  # float slack at the cap, or no gamma fits
            v = v * (rule.max_norm / norm)
        return v

    def aggregate(v: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        return robust_aggregate(torch.cat([x, v.expand(k, -1)]), rule)

    if rule.robust == "none":
        gamma = cap
    elif rule.robust == "krum":
        gamma = search_gamma(lambda g: aggregate(craft(g))[1] >= k, gamma_init, steps)  # rows k.. are the copies
    elif rule.robust == "multikrum":
        copies = set(range(k, 2 * k))
        gamma = search_gamma(
            lambda g: copies <= set(krum_rows(torch.cat([x, craft(g).expand(k, -1)]), rule)), gamma_init, steps
        )
    else:
        farthest = float((aggregate(craft(0.0))[0] - mean).norm())

        def farther(g: float) -> bool:
            nonlocal farthest
            dev = float((aggregate(craft(g))[0] - mean).norm())
            if dev < farthest:
                return False
            farthest = dev
            return True

        gamma = search_gamma(farther, gamma_init, steps)
    gamma = min(gamma, cap)
    return craft(gamma), gamma


def agr_tailored(
    benign: Sequence[Delta],
    rule: ServerRule,
    *,
    perturbation: str = "std",
    gamma_init: float = GAMMA_INIT,
    steps: int = SEARCH_STEPS,
) -> Delta:
    """`tailor` on the colluders' ``benign`` updates, in their layout and dtypes.

    Under a norm bound the update is kept inside it after the cast to each tensor's
    dtype (the server measures what arrives), so its norm ends at the bound to
    within a few float32 roundings.
    """
    if len(benign) < 2:
        raise ValueError(f"agr-tailored needs the benign updates of at least 2 colluders, got {len(benign)}")
    ref = benign[0]
    flat = torch.stack([torch.cat([d[k].reshape(-1).to(torch.float64) for k in ref]) for d in benign])
    m, _ = tailor(flat, rule, perturbation=perturbation, gamma_init=gamma_init, steps=steps)
    out = _unflat(m, ref)
    for _ in range(8):
        norm = global_norm(out)
        if rule.max_norm is None or norm <= rule.max_norm:
            break
        m = m * (rule.max_norm / norm) * (1 - 2.0**-23)
        out = _unflat(m, ref)
    return out


def _unflat(vec: torch.Tensor, like: Delta) -> Delta:
    out, at = {}, 0
    for k, v in like.items():
        out[k] = vec[at : at + v.numel()].reshape(v.shape).to(v.dtype)
        at += v.numel()
    return out


def with_nan(delta: Delta) -> Delta:
    """``delta`` with a NaN in its first entry and an Inf in its last (of the first tensor)."""
    out = {k: v.clone() for k, v in delta.items()}
    first = out[next(iter(out))].view(-1)
    first[0] = float("nan")
    first[-1] = float("inf")
    return out


def wrong_layout(delta: Delta, change: str) -> Delta:
    """``delta`` with one tensor missing, an unknown one added, one row too many, or float64 (``change``)."""
    out = dict(delta)
    first = next(iter(out))
    if change == "missing":
        out.pop(next(reversed(out)))
    elif change == "extra":
        out[EXTRA_KEY] = torch.zeros(4, dtype=torch.float32)
    elif change == "shape":
        t = out[first]
        out[first] = torch.cat([t, t[:1]]) if t.dim() else t.reshape(1).repeat(2)
    elif change == "dtype":
        out[first] = out[first].to(torch.float64)
    else:
        raise ValueError(f"layout change must be one of {LAYOUT_CHANGES}, got {change!r}")
    return out


def oversized(delta: Delta, generator: torch.Generator) -> Delta:
    """``delta`` plus a padding tensor of `OVERSIZE` times its elements (random: no codec shrinks it)."""
    n = sum(v.numel() for v in delta.values())
    return {**delta, PADDING_KEY: torch.randn(OVERSIZE * n, generator=generator)}


def poison(
    a: AttackConfig,
    delta: Delta,
    *,
    rnd: int,
    partition_id: int,
    colluders: Sequence[Delta] | None = None,
    num_clients: int | None = None,
    rule: ServerRule | None = None,
) -> Delta:
    """What an attacker running ``a`` sends in place of its benign ``delta`` (model poisoning and
    the delta-level payloads: nan, wrong-layout, oversized); other kinds return ``delta``.

    ``colluders``: for ``alie`` and ``agr-tailored``, the benign updates of every
    attacking partition (``delta`` among them); ``num_clients`` sizes ALIE's default
    z; ``rule``: the server's rule ``agr-tailored`` crafts against.
    """
    if a.kind == "sign-flip":
        return sign_flip(delta)
    if a.kind == "scale":
        return scale(delta, a.factor)
    if a.kind in ("gaussian", "oversized"):
        gen = torch.Generator().manual_seed(derive_seed(a.seed, a.kind, rnd, partition_id))
        return gaussian(delta, a.noise_norm, gen) if a.kind == "gaussian" else oversized(delta, gen)
    if a.kind == "alie":
        if colluders is None or num_clients is None:
            raise ValueError("alie needs the colluders' benign updates and the number of clients")
        z = a.z if a.z is not None else alie_z(num_clients, num_attackers(a, num_clients))
        return alie(colluders, z)
    if a.kind == "agr-tailored":
        if colluders is None or rule is None:
            raise ValueError("agr-tailored needs the colluders' benign updates and the server's rule")
        return agr_tailored(colluders, rule, perturbation=a.perturbation, gamma_init=a.gamma_init)
    if a.kind == "nan":
        return with_nan(delta)
    if a.kind == "wrong-layout":
        return wrong_layout(delta, a.layout)
    return delta


def claimed_round(a: AttackConfig | None, rnd: int) -> int:
    """The ``server-round`` a client's reply claims: the previous round for ``wrong-round``, else ``rnd``."""
    return rnd - 1 if a is not None and a.kind == "wrong-round" else rnd


__all__ = [
    "AttackConfig",
    "COLLUDING",
    "GAMMA_INIT",
    "KINDS",
    "MODEL_POISONING",
    "DATA_POISONING",
    "HOSTILE",
    "LAYOUT_CHANGES",
    "OVERSIZE",
    "PERTURBATIONS",
    "REPLAY_STATE",
    "SEARCH_STEPS",
    "ServerRule",
    "agr_tailored",
    "alie",
    "alie_z",
    "attackers",
    "claimed_round",
    "client_attack",
    "config_problems",
    "deployment_problems",
    "direction",
    "flip_labels",
    "gaussian",
    "krum_rows",
    "node_attack",
    "norm_cap",
    "num_attackers",
    "oversized",
    "poison",
    "robust_aggregate",
    "scale",
    "search_gamma",
    "sign_flip",
    "tailor",
    "with_nan",
    "wrong_layout",
]
