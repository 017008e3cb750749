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
import math
from collections.abc import Mapping
from typing import Any

from fedtune.errors import ConfigError

LORA_MODES = ("naive", "exact", "ffa", "hetero")
ROBUST_RULES = ("none", "trimmed-mean", "median", "krum")
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedavgm", "fedprox")
SECURE_MODES = ("none", "secagg+")
# Flower's SecAggPlusWorkflow parameters (flwr.server.workflow, flwr 1.41); the
# share counts are Flower's secaggplus example's, the ranges Flower's defaults.
_SECAGG_DEFAULTS = {
    "num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 8.0,
    "quantization_range": 2**22, "max_weight": 1000.0,
}

# Flower's defaults (flwr.serverapp.strategy, flwr 1.41): FedAdam eta=0.1,
# FedYogi eta=0.01, FedAvgM server_learning_rate=1.0; beta_1 0.9, beta_2 0.99,
# tau 1e-3 for both adaptive optimizers; FedAvgM momentum 0.0; FedProx mu 0.0.
_SERVER_LR_DEFAULT = {"fedavgm": 1.0, "fedadam": 1e-1, "fedyogi": 1e-2}
_ADAPTIVE_DEFAULTS = {"beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
# Which optional parameter each server optimizer reads; any other is rejected
# when set, because silently ignoring it would hide a typo in the run config.
_USES = {
    "server_lr": ("fedavgm", "fedadam", "fedyogi"),
    "server_momentum": ("fedavgm",),
    "beta_1": ("fedadam", "fedyogi"),
    "beta_2": ("fedadam", "fedyogi"),
    "tau": ("fedadam", "fedyogi"),
    "proximal_mu": ("fedprox",),
}


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
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
            (FedMedian, same paper), ``"krum"`` (Blanchard et al. 2017).
        trim_beta: fraction cut from each tail by ``"trimmed-mean"``, in [0, 0.5).
        num_malicious: number of Byzantine clients Krum tolerates, >= 0.
        server_optimizer: ``"fedavg"``, ``"fedadam"``/``"fedyogi"`` (Reddi et
            al. 2021, arXiv:2003.00295), ``"fedavgm"`` (Hsu et al. 2019,
            arXiv:1909.06335) or ``"fedprox"`` (Li et al. 2020, arXiv:1812.06127).
        server_lr, server_momentum, beta_1, beta_2, tau, proximal_mu: the
            chosen optimizer's parameters. Leave at ``None`` for Flower's
            default; after construction they hold the resolved value for the
            optimizer that reads them and ``None`` for the others. Setting one
            the chosen optimizer does not read is an error.
        secure: ``"none"`` or ``"secagg+"``: Flower's SecAgg+ (Bell et al. 2020,
            ePrint 2020/704), so the server learns only the weighted sum of the
            clients' deltas (`fedtune.flower.secagg`).
        num_shares, reconstruction_threshold, clipping_range,
            quantization_range, max_weight: ``SecAggPlusWorkflow``'s
            parameters under ``"secagg+"`` (an int share count, or a float
            fraction as in Flower); ``None`` elsewhere. Each delta coordinate,
            times its weight ``num_examples / max_weight``, is clipped to
            ``[-clipping_range, clipping_range]`` and quantized to
            ``quantization_range`` levels.
    """

    lora_mode: str = "naive"
    client_ranks: tuple[int, ...] | None = None
    rank: int | str | None = None
    max_update_norm: float | None = None
    robust: str = "none"
    trim_beta: float = 0.2
    num_malicious: int = 0
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

    def __post_init__(self) -> None:
        _choice("lora_mode", self.lora_mode, LORA_MODES)
        _choice("robust", self.robust, ROBUST_RULES)
        _choice("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", _ranks("client_ranks", self.client_ranks))
            if self.lora_mode != "hetero":
                raise ConfigError(
                    f"client_ranks={list(self.client_ranks)!r} is only used by lora_mode='hetero', got lora_mode={self.lora_mode!r}"
                )
        if self.rank is not None and self.rank != "lossless":
            if not _is_int(self.rank) or self.rank < 1:
                raise ConfigError(f"rank must be a positive int, 'lossless' or None, got {self.rank!r}")
            if self.lora_mode != "exact":
                raise ConfigError(f"rank={self.rank!r} is only used by lora_mode='exact', got lora_mode={self.lora_mode!r}")
        if self.rank == "lossless" and self.lora_mode != "exact":
            raise ConfigError(f"rank='lossless' is only used by lora_mode='exact', got lora_mode={self.lora_mode!r}")
        if self.max_update_norm is not None:
            _positive("max_update_norm", self.max_update_norm)
        _number("trim_beta", self.trim_beta)
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim_beta must be in [0, 0.5), got {self.trim_beta!r}")
        if not _is_int(self.num_malicious) or self.num_malicious < 0:
            raise ConfigError(f"num_malicious must be an int >= 0, got {self.num_malicious!r}")

        opt = self.server_optimizer
        for name, users in _USES.items():
            value = getattr(self, name)
            if value is not None and opt not in users:
                raise ConfigError(f"{name}={value!r} is not used by server_optimizer={opt!r} (only by {', '.join(users)})")
        resolved = {
            "server_lr": _SERVER_LR_DEFAULT.get(opt),
            "server_momentum": 0.0 if opt == "fedavgm" else None,
            "proximal_mu": 0.0 if opt == "fedprox" else None,
            **{k: (v if opt in ("fedadam", "fedyogi") else None) for k, v in _ADAPTIVE_DEFAULTS.items()},
        }
        for name, default in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.server_lr is not None:
            _positive("server_lr", self.server_lr)
        if self.server_momentum is not None:
            _number("server_momentum", self.server_momentum)
            if not 0.0 <= self.server_momentum < 1.0:
                raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum!r}")
        for name in ("beta_1", "beta_2"):
            value = getattr(self, name)
            if value is not None:
                _number(name, value)
                if not 0.0 <= value < 1.0:
                    raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.tau is not None:
            _positive("tau", self.tau)
        if self.proximal_mu is not None:
            _number("proximal_mu", self.proximal_mu)
            if self.proximal_mu < 0:
                raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")

        # Flower's robust strategies are FedAvg variants that aggregate each
        # array coordinate-wise: they need same-shape factors (not hetero),
        # cannot also run the product-space step (not exact), and do not
        # stack with a server optimizer other than plain FedAvg / FedProx.
        if self.robust != "none":
            if self.lora_mode not in ("naive", "ffa"):
                raise ConfigError(f"robust={self.robust!r} needs lora_mode 'naive' or 'ffa', got lora_mode={self.lora_mode!r}")
            if opt not in ("fedavg", "fedprox"):
                raise ConfigError(f"robust={self.robust!r} needs server_optimizer 'fedavg' or 'fedprox', got {opt!r}")
        # A server optimizer on arrays needs every client to send the same shapes.
        if self.lora_mode == "hetero" and opt not in ("fedavg", "fedprox"):
            raise ConfigError(f"lora_mode='hetero' needs server_optimizer 'fedavg' or 'fedprox', got {opt!r}")
        self._check_secure()

    def _check_secure(self) -> None:
        _choice("secure", self.secure, SECURE_MODES)
        if self.secure == "none":
            for name in _SECAGG_DEFAULTS:
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}={getattr(self, name)!r} is only used by secure='secagg+'")
            return
        for name, default in _SECAGG_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        # SecAgg+ hands the server one sum: every rule that must see individual updates is out
        if self.lora_mode not in ("naive", "ffa"):
            raise ConfigError(f"secure='secagg+' needs lora_mode 'naive' or 'ffa' (a plain mean of deltas), got {self.lora_mode!r}")
        if self.robust != "none":
            raise ConfigError(f"secure='secagg+' hides individual updates, so robust={self.robust!r} cannot rank them; set robust='none'")
        if self.server_optimizer not in ("fedavg", "fedprox"):
            raise ConfigError(f"secure='secagg+' needs server_optimizer 'fedavg' or 'fedprox', got {self.server_optimizer!r}")
        if self.max_update_norm is not None:
            raise ConfigError("max_update_norm: the server cannot measure individual updates under secure='secagg+'; unset it")
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            _number(name, value)
            if value <= 0 or (_is_int(value) and value == 2 and name == "num_shares") or (not _is_int(value) and value > 1):
                raise ConfigError(f"{name} must be an int (> 2 for num_shares) or a fraction in (0, 1], got {value!r}")
        if _is_int(self.num_shares) and _is_int(self.reconstruction_threshold) and self.num_shares > 1:
            if not self.reconstruction_threshold < self.num_shares:
                raise ConfigError(
                    f"reconstruction_threshold={self.reconstruction_threshold!r} must be < num_shares={self.num_shares!r}"
                )
        _positive("clipping_range", self.clipping_range)
        _positive("max_weight", self.max_weight)
        if not _is_int(self.quantization_range) or not 2 <= self.quantization_range < 2**32:
            raise ConfigError(f"quantization_range must be an int in [2, 2**32) (Flower's modulus), got {self.quantization_range!r}")

    def client_rank(self, partition_id: int, default: int) -> int:
        """LoRA rank of the client with ``partition_id`` under ``"hetero"``; ``default`` (``adapter.r``) if unset."""
        if not self.client_ranks:
            return default
        return self.client_ranks[int(partition_id) % len(self.client_ranks)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AggregationConfig:
        """Build from a flat mapping (TOML table, Flower run_config); unknown keys are rejected.

        Keys may use ``-`` or ``_`` (``"lora-mode"`` or ``"lora_mode"``), as
        Flower's run_config favours dashes.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown aggregation key {key!r}; known keys: {', '.join(sorted(known))}")
            if name in kwargs:
                raise ConfigError(f"aggregation key {key!r} given twice")
            kwargs[name] = value
        return cls(**kwargs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ranks(name: str, value: object) -> tuple[int, ...]:
    """A non-empty tuple of positive ints from a list, one int, or ``"2,4,8"`` / ``"2 4 8"``."""
    items: object = value
    if isinstance(value, str):
        items = [v for v in value.replace(",", " ").split()]
        try:
            items = [int(v) for v in items]
        except ValueError:
            raise ConfigError(f"{name} must be a list of positive ints, got {value!r}") from None
    elif _is_int(value):
        items = [value]
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"{name} must be a non-empty list of positive ints, got {value!r}")
    bad = [v for v in items if not _is_int(v) or v < 1]
    if bad:
        raise ConfigError(f"{name} must hold positive ints, got {bad[0]!r} in {list(items)!r}")
    return tuple(items)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _positive(name: str, value: object) -> None:
    _number(name, value)
    if value <= 0:  # type: ignore[operator]
        raise ConfigError(f"{name} must be > 0, got {value!r}")
