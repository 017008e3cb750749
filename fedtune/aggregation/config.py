"""Configuration of server-side aggregation, parsed once at the boundary.

`AggregationConfig` names *what* the server does with client adapter states:
how LoRA factors are combined (``lora_mode``), which robust rule replaces the
weighted mean (``robust``) and which server optimizer applies the result
(``server_optimizer``). The robust rules and server optimizers are Flower's own
strategies (``flwr.serverapp.strategy``); this module only validates their
names and parameters, with Flower's defaults, so a bad run config fails before
round one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from fedtune.validation import Section, between, choice, only_with, positive

if TYPE_CHECKING:
    from fedtune.config import FederationConfig

LORA_MODES = ("naive", "exact", "ffa", "hetero")
ROBUST_RULES = ("none", "trimmed-mean", "median", "krum", "multikrum")
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedavgm", "fedprox", "scaffold")
SECURE_MODES = ("none", "secagg+")
WEIGHTINGS = ("examples", "uniform")
# server optimizers whose server step is a weighted mean (FedProx's mu acts on the clients)
SERVER_MEAN_OPTIMIZERS = ("fedavg", "fedprox")
# Flower's SecAggPlusWorkflow parameters (flwr.server.workflow, flwr 1.41); the
# share counts are Flower's secaggplus example's, the ranges Flower's defaults.
_SECAGG_DEFAULTS = {
    "num_shares": 3,
    "reconstruction_threshold": 2,
    "clipping_range": 8.0,
    "quantization_range": 2**22,
    "max_weight": 1000.0,
    "modulus_range": 2**32,
}

# Flower's defaults (flwr.serverapp.strategy, flwr 1.41): FedAdam eta=0.1,
# FedYogi eta=0.01, FedAvgM server_learning_rate=1.0; beta_1 0.9, beta_2 0.99,
# tau 1e-3 for both adaptive optimizers; FedAvgM momentum 0.0; FedProx mu 0.0. SCAFFOLD's
# global step size eta_g is 1 (Karimireddy et al. 2020: x += eta_g * mean update, FedAvg's step at 1).
_SERVER_LR_DEFAULT = {"fedavgm": 1.0, "fedadam": 1e-1, "fedyogi": 1e-2, "scaffold": 1.0}
_ADAPTIVE_DEFAULTS = {"beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
# Which optional parameter each server optimizer reads; any other is rejected
# when set, because silently ignoring it would hide a typo in the run config.
_USES = {
    "server_lr": ("fedavgm", "fedadam", "fedyogi", "scaffold"),
    "server_momentum": ("fedavgm",),
    "beta_1": ("fedadam", "fedyogi"),
    "beta_2": ("fedadam", "fedyogi"),
    "tau": ("fedadam", "fedyogi"),
    "proximal_mu": ("fedprox",),
}


@dataclasses.dataclass(frozen=True)
class AggregationConfig(Section):
    """How the server combines client adapter states.

    Attributes:
        lora_mode: ``"naive"`` averages ``lora_A`` and ``lora_B`` separately
            (FedIT, Zhang et al. 2024, arXiv:2305.05644; biased: mean(B)mean(A)
            is not mean(BA)); ``"exact"`` averages the effective updates
            ``scaling * B @ A`` and re-factors them with a truncated SVD
            (FedEx-LoRA, Singhal et al. 2024, arXiv:2410.09432, in spirit);
            ``"ffa"`` keeps A frozen and averages B only, which is exact
            (FFA-LoRA, Sun et al. 2024, arXiv:2403.12313); ``"hetero"`` lets
            clients use different ranks (FlexLoRA, Bai et al. 2024,
            arXiv:2402.11505; HetLoRA, Cho et al. 2024): the global adapter
            stays at ``adapter.r`` and each client trains at its own rank.
        client_ranks: the clients' LoRA ranks under ``"hetero"``: client
            (partition id) i trains at ``client_ranks[i % len(client_ranks)]``,
            so a list of ``federation.num_clients`` entries gives every client
            its own. ``None``: every client at ``adapter.r``. A TOML list, or
            a string of ints separated by commas or spaces (flat run configs).
        rank: output rank of ``"exact"`` mode: ``None`` keeps the clients'
            rank, an int fixes it, ``"lossless"`` grows it to the sum of the
            clients' ranks so nothing is truncated.
        max_update_norm: reject a client update whose L2 distance from the
            global state exceeds this bound (``None``: no bound).
        robust: ``"none"`` (weighted mean), ``"trimmed-mean"`` (Flower
            FedTrimmedAvg, Yin et al. 2018, arXiv:1803.01498), ``"median"``
            (FedMedian, same paper), ``"krum"`` (Blanchard et al. 2017,
            NeurIPS: keeps the one update whose n - f - 2 nearest others are
            nearest) or ``"multikrum"`` (Multi-Krum, same paper, and El Mhamdi
            et al. 2018, arXiv:1802.07927: keeps the ``krum_select`` best-scored
            updates and averages them, weighted as ``weighting`` says).
        trim_beta: fraction cut from each tail by ``"trimmed-mean"``, in [0, 0.5).
        num_malicious: number of Byzantine clients f that Krum and Multi-Krum
            tolerate, >= 0.
        krum_select: how many updates m ``"multikrum"`` keeps a round, >= 1.
            ``None`` (only value allowed with another rule): n - f, where n is
            the number of replies the round accepted (at least 1), El Mhamdi et
            al.'s choice. A round that accepted fewer than m replies keeps them
            all. `fedtune.config` refuses an m above the clients a round samples
            and, with m unset, an f that leaves nothing to keep.
        server_optimizer: ``"fedavg"``, ``"fedadam"``/``"fedyogi"`` (Reddi et
            al. 2021, arXiv:2003.00295), ``"fedavgm"`` (Hsu et al. 2019,
            arXiv:1909.06335), ``"fedprox"`` (Li et al. 2020, arXiv:1812.06127) or
            ``"scaffold"`` (Karimireddy et al. 2020, arXiv:1910.06378: control
            variates correct each client's local gradients for its drift,
            `fedtune.aggregation.scaffold`; ``server_lr`` is its global step
            size eta_g, default 1; the server's ``c`` and each client's ``c_i``
            travel next to the adapter and the update, doubling the bytes).
            SCAFFOLD is named here, like FedProx, because it is a strategy in
            Flower's own baselines (``niid_bench``) that a user picks in place
            of FedAvg; it runs on the weighted mean alone, so it is refused
            with what would change that mean or the update (robust rules,
            LoRA-aware aggregators, SecAgg+, compression, privacy).
        server_lr, server_momentum, beta_1, beta_2, tau, proximal_mu: the
            chosen optimizer's parameters. Leave at ``None`` for Flower's
            default; after construction they hold the resolved value for the
            optimizer that reads them and ``None`` for the others. Setting one
            the chosen optimizer does not read is an error.
        secure: ``"none"`` or ``"secagg+"``: Flower's SecAgg+ (Bell et al. 2020,
            ePrint 2020/704), so the server learns only the weighted sum of the
            clients' deltas (`fedtune.flower.secagg`).
        num_shares, reconstruction_threshold, clipping_range,
            quantization_range, max_weight, modulus_range: ``SecAggPlusWorkflow``'s
            parameters under ``"secagg+"`` (an int share count, or a float
            fraction as in Flower); ``None`` elsewhere. Each delta coordinate,
            times its weight ``num_examples / max_weight`` (about 1 under
            ``weighting = "uniform"``, `fedtune.flower.secagg.secagg_weight`),
            is clipped to ``[-clipping_range, clipping_range]`` and quantized
            to ``quantization_range`` levels; masks and sums are taken modulo
            ``modulus_range`` (a power of two), and each masked entry travels
            in ``log2(modulus_range)`` bits.
        swa_start: server-side stochastic weight averaging (FedSWA, Caldarola
            et al. 2022, arXiv:2203.11834): from this round on, the adapter that
            is evaluated, checkpointed and exported is the uniform average of the
            global adapters after each round since ``swa_start``, while clients
            keep training from the latest global. Averaging the last rounds'
            globals cancels the pull of each round's few (label-skewed) clients.
            ``None``: off.
        weighting: each accepted client update's weight in the mean:
            ``"examples"`` (FedAvg, McMahan et al. 2017, arXiv:1602.05629: its
            ``num-examples``) or ``"uniform"`` (1 each: the unweighted mean of
            the clients' objectives, one of the client mixtures of Mohri et al.
            2019, arXiv:1902.00146), so every client, e.g. every silo of a
            cross-silo run, has an equal say however much data it holds. The
            server takes the weight once per accepted reply (`client_weight`),
            so every path that weights updates sees it: the Flower strategy's
            mean and the server optimizers and FedProx built on it, the
            LoRA-aware aggregators (exact / ffa / hetero), compressed updates,
            SecAgg+ (every client masks its delta with the same weight,
            `fedtune.flower.secagg`) and zeroth-order rounds (the mean of the
            seeds' scalars). The round's train metrics are averaged with the
            same weights. Two rules weight no update, so both values give the
            same global there: the robust rules (median and trimmed mean are
            coordinate-wise order statistics, Krum keeps one update; Multi-Krum
            picks its updates by distance alone but then averages them with
            these weights) and
            ``privacy.mode = "client-central"``, whose DP-FedAvg mean is
            unweighted by design (the clipped updates summed and divided by
            the number of sampled clients, or by the expected count q * N
            under Poisson sampling; a weight above 1 would raise a client's
            sensitivity). FedSWA averages rounds, not clients.
    """

    SECTION = "aggregation"
    lora_mode: str = "naive"
    client_ranks: tuple[int, ...] | None = None
    rank: int | str | None = None
    max_update_norm: float | None = None
    robust: str = "none"
    trim_beta: float = 0.2
    num_malicious: int = 0
    krum_select: int | None = None
    server_optimizer: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    proximal_mu: float | None = None
    secure: str = "none"
    num_shares: int | float | None = None
    reconstruction_threshold: int | float | None = None
    clipping_range: float | None = None
    quantization_range: int | None = None
    max_weight: float | None = None
    modulus_range: int | None = None
    swa_start: int | None = None
    weighting: str = "examples"

    def resolved(self) -> dict[str, Any]:
        """Flower's defaults for the parameters the chosen server optimizer (and SecAgg+) reads and left unset."""
        opt = self.server_optimizer
        defaults: dict[str, Any] = {
            "server_lr": _SERVER_LR_DEFAULT.get(opt),
            "server_momentum": 0.0 if opt == "fedavgm" else None,
            "proximal_mu": 0.0 if opt == "fedprox" else None,
            **{k: (v if opt in ("fedadam", "fedyogi") else None) for k, v in _ADAPTIVE_DEFAULTS.items()},
        }
        if self.secure == "secagg+":
            defaults.update(_SECAGG_DEFAULTS)
        return {k: v for k, v in defaults.items() if v is not None and getattr(self, k) is None}

    def problems(self) -> list[str]:
        e: list[str] = []
        choice(e, "aggregation.lora_mode", self.lora_mode, LORA_MODES)
        choice(e, "aggregation.robust", self.robust, ROBUST_RULES)
        choice(e, "aggregation.server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        choice(e, "aggregation.secure", self.secure, SECURE_MODES)
        choice(e, "aggregation.weighting", self.weighting, WEIGHTINGS)
        if self.client_ranks is not None:
            if not self.client_ranks or any(r < 1 for r in self.client_ranks):
                e.append(
                    f"aggregation.client_ranks: must be a non-empty list of positive integers (got {list(self.client_ranks)!r})"
                )
            only_with(
                e, "aggregation.client_ranks", self.client_ranks, "aggregation.lora_mode", self.lora_mode, ("hetero",)
            )
        if self.rank is not None:
            if self.rank != "lossless" and (isinstance(self.rank, str) or self.rank < 1):
                e.append(f"aggregation.rank: must be a positive integer, 'lossless' or unset (got {self.rank!r})")
            only_with(e, "aggregation.rank", self.rank, "aggregation.lora_mode", self.lora_mode, ("exact",))
        positive(e, "aggregation.max_update_norm", self.max_update_norm)
        reported = len(e)
        between(e, "aggregation.trim_beta", self.trim_beta, 0, 0.5, "[)")
        if len(e) == reported:  # a value out of range is reported once, for its range
            only_with(
                e,
                "aggregation.trim_beta",
                self.changed("trim_beta"),
                "aggregation.robust",
                self.robust,
                ("trimmed-mean",),
            )
        positive(e, "aggregation.num_malicious", self.num_malicious, allow_zero=True)
        positive(e, "aggregation.krum_select", self.krum_select)
        only_with(e, "aggregation.krum_select", self.krum_select, "aggregation.robust", self.robust, ("multikrum",))
        opt = self.server_optimizer
        for name, users in _USES.items():
            only_with(e, f"aggregation.{name}", getattr(self, name), "aggregation.server_optimizer", opt, users)
        positive(e, "aggregation.server_lr", self.server_lr)
        for name in ("server_momentum", "beta_1", "beta_2"):
            between(e, f"aggregation.{name}", getattr(self, name), 0, 1, "[)")
        positive(e, "aggregation.tau", self.tau)
        positive(e, "aggregation.proximal_mu", self.proximal_mu, allow_zero=True)
        if self.swa_start is not None and self.swa_start < 1:
            e.append(f"aggregation.swa_start: must be a round number >= 1, or unset (got {self.swa_start!r})")
        e.extend(self._composition_problems())
        e.extend(self._secure_problems())
        return e

    def _composition_problems(self) -> list[str]:
        """Pairs of this section that the server would not both apply.

        The server decides the new global state with a LoRA-aware aggregator when
        ``lora_mode`` is not ``"naive"``, else with the Flower strategy, which is
        the robust rule when one is set, else the server optimizer
        (`fedtune.flower.server`). A setting of a step that does not run would be
        computed and thrown away, so it is refused. FedProx composes with each:
        its server step is FedAvg's mean, its ``proximal_mu`` acts on the clients.
        ``lora_mode`` exact / ffa with a server optimizer depends on the adapter
        (a prompt adapter has no factors), so `fedtune.config` checks that pair.
        """
        e: list[str] = []
        robust, mode, opt = self.robust, self.lora_mode, self.server_optimizer
        if robust != "none" and mode != "naive":
            hint = (
                "use lora_mode = 'naive' with adapter.ffa = true (A stays frozen and untrained, the robust rule "
                "aggregates B)"
                if mode == "ffa"
                else "use lora_mode = 'naive', or robust = 'none'"
            )
            e.append(
                f"aggregation.robust: {robust!r} cannot be combined with aggregation.lora_mode = {mode!r} (the "
                f"LoRA-aware {mode} aggregator decides the new global state, so the robust rule would never "
                f"run); {hint}"
            )
        if robust != "none" and opt not in SERVER_MEAN_OPTIMIZERS:
            e.append(
                f"aggregation.robust: {robust!r} cannot be combined with aggregation.server_optimizer = {opt!r} (the "
                "robust rule replaces the weighted mean, and Flower's strategies do not stack); use 'fedavg' or "
                "'fedprox', or robust = 'none'"
            )
        if mode == "hetero" and opt not in SERVER_MEAN_OPTIMIZERS:  # exact / ffa: see fedtune.config
            e.append(
                f"aggregation.server_optimizer: {opt!r} cannot be combined with aggregation.lora_mode = 'hetero' "
                "(clients send factors of different shapes, which the hetero aggregator combines, so the "
                "optimizer's step would never run); use 'fedavg' or 'fedprox'"
            )
        return e

    def _secure_problems(self) -> list[str]:
        """SecAgg+ settings: its parameters, and what cannot see only the sum of the updates."""
        e: list[str] = []
        if self.secure != "secagg+":
            for name in _SECAGG_DEFAULTS:
                only_with(
                    e, f"aggregation.{name}", getattr(self, name), "aggregation.secure", self.secure, ("secagg+",)
                )
            return e
        # SecAgg+ hands the server one sum: every rule that must see individual updates is out
        if self.lora_mode not in ("naive", "ffa"):
            e.append(
                f"aggregation.lora_mode: {self.lora_mode!r} cannot be combined with aggregation.secure = 'secagg+' "
                "(the server sees only the sum of the deltas); use 'naive' or 'ffa'"
            )
        if self.robust != "none":
            e.append(
                f"aggregation.robust: {self.robust!r} cannot be combined with aggregation.secure = 'secagg+' (it hides "
                "individual updates, so the robust rule cannot rank them); use 'none'"
            )
        if self.server_optimizer not in SERVER_MEAN_OPTIMIZERS:
            e.append(
                f"aggregation.server_optimizer: {self.server_optimizer!r} cannot be combined with aggregation.secure = "
                "'secagg+'; use 'fedavg' or 'fedprox'"
            )
        if self.swa_start is not None:
            e.append(
                "aggregation.swa_start: not implemented with aggregation.secure = 'secagg+' (Flower's SecAgg+ "
                f"workflow holds the global adapter); unset it (got {self.swa_start!r})"
            )
        if self.max_update_norm is not None:
            e.append(
                "aggregation.max_update_norm: the server cannot measure individual updates under aggregation.secure "
                f"= 'secagg+'; unset it (got {self.max_update_norm!r})"
            )
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            share_count = isinstance(value, int)
            if value <= 0 or (share_count and name == "num_shares" and value == 2) or (not share_count and value > 1):
                e.append(
                    f"aggregation.{name}: must be an integer (> 2 for num_shares) or a fraction in (0, 1] (got {value!r})"
                )
        if isinstance(self.num_shares, int) and isinstance(self.reconstruction_threshold, int) and self.num_shares > 1:
            if not self.reconstruction_threshold < self.num_shares:
                e.append(
                    f"aggregation.reconstruction_threshold: must be less than aggregation.num_shares = "
                    f"{self.num_shares} (got {self.reconstruction_threshold!r})"
                )
        positive(e, "aggregation.clipping_range", self.clipping_range)
        positive(e, "aggregation.max_weight", self.max_weight)
        between(e, "aggregation.quantization_range", self.quantization_range, 2, 2**32, "[)")
        m, q = self.modulus_range, self.quantization_range
        if isinstance(m, int) and (m < 2 or m > 2**32 or m & (m - 1) or (isinstance(q, int) and m <= q)):
            e.append(
                f"aggregation.modulus_range: must be a power of two above aggregation.quantization_range = {q} "
                f"and at most 2**32 (got {m!r})"
            )
        return e

    def client_weight(self, num_examples: float) -> float:
        """A client update's weight in the server's mean: ``num_examples``, or 1 under ``weighting = "uniform"``."""
        return 1.0 if self.weighting == "uniform" else float(num_examples)

    def krum_kept(self, num_replies: int) -> int:
        """Multi-Krum's m for a round that accepted ``num_replies`` updates (`multikrum_kept`)."""
        return multikrum_kept(num_replies, self.num_malicious, self.krum_select)

    def client_rank(self, partition_id: int, default: int) -> int:
        """LoRA rank of the client with ``partition_id`` under ``"hetero"``; ``default`` (``adapter.r``) if unset."""
        if not self.client_ranks:
            return default
        return self.client_ranks[int(partition_id) % len(self.client_ranks)]


def multikrum_kept(num_replies: int, num_malicious: int, krum_select: int | None) -> int:
    """How many of a round's ``num_replies`` updates Multi-Krum keeps: ``krum_select``, or n - f when unset
    (El Mhamdi et al. 2018, arXiv:1802.07927), between 1 and n (a round of fewer replies keeps them all)."""
    m = num_replies - num_malicious if krum_select is None else krum_select
    return max(1, min(m, num_replies))


def multikrum_problems(agg: AggregationConfig, federation: FederationConfig) -> list[str]:
    """``robust = "multikrum"`` settings that a round of ``federation``'s size could not honour.

    Under ``federation.sampling = "fixed"`` a round samples ``federation.clients_per_round``
    clients n, so a ``krum_select`` above n would keep every update (the plain mean), and with
    ``krum_select`` unset an f >= n leaves n - f < 1 to keep. Under ``"poisson"`` a round's
    count varies up to ``federation.num_clients``, the only bound known before the run, so n
    is that there.
    """
    e: list[str] = []
    if agg.robust != "multikrum":
        return e
    m, f = agg.krum_select, agg.num_malicious
    if federation.sampling == "poisson":
        n = federation.num_clients
        why = f"federation.sampling = 'poisson' includes at most federation.num_clients = {n} clients a round"
    else:
        n = federation.clients_per_round
        why = (
            f"a round samples {n} clients (federation.num_clients = {federation.num_clients} x "
            f"federation.fraction_train = {federation.fraction_train:g}, at least federation.min_train_clients = "
            f"{federation.min_train_clients})"
        )
    if m is not None and m > n:
        e.append(
            f"aggregation.krum_select: Multi-Krum cannot keep more updates than a round has, and {why}, so every "
            f"update would be kept (the plain mean); lower it to at most {n} (got {m!r})"
        )
    if m is None and f >= n:
        e.append(
            f"aggregation.num_malicious: with aggregation.krum_select unset Multi-Krum keeps n - f of a round's n "
            f"updates, and {why}, which leaves none; lower it below {n} or set aggregation.krum_select (got {f!r})"
        )
    return e
