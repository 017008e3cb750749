"""One `Aggregator` per LoRA mode (`AggregationConfig.lora_mode`).

Each takes the clients' adapter states and example counts and returns the new
global state with a report. The robust rules and server optimizers of the
config are Flower strategies applied around this step by the server layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from fedtune.aggregation.hetero import hetero_round
from fedtune.aggregation.lora import (
    AggregationReport,
    RankSpec,
    ScalingSpec,
    ffa_mean,
    naive_mean,
    product_space_mean,
)
from fedtune.delta import Delta


class Aggregator(Protocol):
    """Combines client states into a new global state."""

    def aggregate(
        self, states: Sequence[Delta], weights: Sequence[float], *, reference: Delta | None = None
    ) -> tuple[Delta, AggregationReport]:
        """``reference`` is the global state the clients started from (optional)."""
        ...


@dataclasses.dataclass(frozen=True)
class NaiveLoRA:
    """A and B averaged separately (`naive_mean`)."""

    def aggregate(
        self, states: Sequence[Delta], weights: Sequence[float], *, reference: Delta | None = None
    ) -> tuple[Delta, AggregationReport]:
        return naive_mean(states, weights)


@dataclasses.dataclass(frozen=True)
class FFALoRA:
    """B averaged, A checked frozen (`ffa_mean`)."""

    atol: float = 0.0

    def aggregate(
        self, states: Sequence[Delta], weights: Sequence[float], *, reference: Delta | None = None
    ) -> tuple[Delta, AggregationReport]:
        return ffa_mean(states, weights, atol=self.atol, reference=reference)


@dataclasses.dataclass(frozen=True)
class ExactLoRA:
    """Product-space mean re-factored by truncated SVD (`product_space_mean`)."""

    scaling: ScalingSpec
    rank: RankSpec | str | None = None

    def aggregate(
        self, states: Sequence[Delta], weights: Sequence[float], *, reference: Delta | None = None
    ) -> tuple[Delta, AggregationReport]:
        return product_space_mean(states, weights, self.scaling, self.rank, reference=reference)


@dataclasses.dataclass(frozen=True)
class FactoredHeteroLoRA:
    """Heterogeneous client ranks with the global held as factors at ``rank`` (`hetero_round`).

    Stateless: ``reference`` (required) is the global the clients' factors were
    cut from, so a checkpoint of the global is all a resumed server needs.
    """

    scaling: ScalingSpec
    rank: int

    def aggregate(
        self, states: Sequence[Delta], weights: Sequence[float], *, reference: Delta | None = None
    ) -> tuple[Delta, AggregationReport]:
        if reference is None:
            raise ValueError("FactoredHeteroLoRA needs reference=: the global state the clients' factors were cut from")
        return hetero_round(reference, states, weights, self.scaling, self.rank)
