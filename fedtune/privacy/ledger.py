"""A run's privacy ledger on the server: what every training mode reports about DP.

Client-level DP (``privacy.mode = "client-central" | "client-local"``) is
accounted here, on the server, one sampled Gaussian mechanism per round
(`ClientLevelAccountant`); sample-level DP-SGD is accounted on each client
(opacus), which reports its epsilon in the ``dp-epsilon`` metric, and the
ledger keeps the worst client's. The backprop loop, SecAgg+ and every other
mode share this object, so their ``dp_*`` round fields and the summary's
``privacy`` block are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedtune.config import FedtuneConfig


class RunPrivacy:
    """Privacy accounting across one run's rounds; ``state_dict`` goes into checkpoints."""

    def __init__(self, cfg: FedtuneConfig):
        from fedtune.privacy.client_level import ClientLevelAccountant, check_budget_at_start

        self.cfg = cfg.privacy
        self.worst_sample_eps = 0.0
        self.accountant: ClientLevelAccountant | None = None
        if self.cfg.client_level:
            fed = cfg.federation
            if self.cfg.mode == "client-central":
                # the server sees a client with probability q a round (m/N, or fraction_train under Poisson)
                self.accountant = ClientLevelAccountant.from_config(self.cfg, sample_rate=fed.sample_rate)
            else:
                self.accountant = ClientLevelAccountant.from_config(self.cfg)
            check_budget_at_start(self.cfg, self.accountant, fed.rounds)

    def stop_reason(self) -> str | None:
        """Why the next round must not run (``epsilon_budget`` under policy "stop"), else None."""
        from fedtune.privacy.client_level import next_round_within_budget

        if self.accountant is None or next_round_within_budget(self.cfg, self.accountant):
            return None
        return (
            f"privacy budget reached: epsilon {self.accountant.epsilon():.3f}, one more round "
            f"would exceed privacy.epsilon_budget = {self.cfg.epsilon_budget}"
        )

    def end_round(self, client_metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """Account one finished round; returns the fields its metrics.jsonl row carries."""
        if self.accountant is not None:
            self.accountant.step()
            return {"dp_epsilon": self.accountant.epsilon()}
        if self.cfg.mode == "sample":
            eps = [float(c.get("dp-epsilon", math.nan)) for c in client_metrics]
            if eps:
                self.worst_sample_eps = max(self.worst_sample_eps, max(eps))
                return {"dp_epsilon_worst_client": max(eps)}
        return {}

    def summary(self) -> dict[str, Any]:
        """The summary.json ``privacy`` block: settings, epsilon, delta and the kind of guarantee."""
        out: dict[str, Any] = {"settings": self.cfg.to_dict(), "order": "clip + noise before compression"}
        if self.accountant is not None:
            out["epsilon"] = self.accountant.epsilon()
            out["delta"] = self.cfg.delta
            out["guarantee"] = "client-level" + (
                " (central, trusted server)" if self.cfg.mode == "client-central" else " (local)"
            )
        elif self.cfg.mode == "sample":
            out["epsilon"] = self.worst_sample_eps
            out["delta"] = self.cfg.delta
            out["guarantee"] = "example-level DP-SGD, worst client"
        else:
            out["epsilon"] = float("inf")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "worst_sample_eps": self.worst_sample_eps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.worst_sample_eps = float(state.get("worst_sample_eps", 0.0))


__all__ = ["RunPrivacy"]
