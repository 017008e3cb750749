"""Pure functions on adapter deltas.

A *delta* (or any adapter state) is plain data: ``dict[str, torch.Tensor]`` keyed
by the names peft's ``get_peft_model_state_dict`` produces. Nothing here touches a
model, a network or a global random state. Functions that mutate end in ``_``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# the one name for a dict of tensors: an update, a global adapter, tuned parameters
Delta = dict[str, torch.Tensor]


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Delta:
    """Return ``a - b`` key by key (the update a client made: local minus global)."""
    _check_same_keys(a, b)
    return {k: a[k] - b[k] for k in a}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Delta:
    """Return ``a + b`` key by key."""
    _check_same_keys(a, b)
    return {k: a[k] + b[k] for k in a}


def scale(a: Mapping[str, torch.Tensor], factor: float) -> Delta:
    """Return ``factor * a``."""
    return {k: v * factor for k, v in a.items()}


def global_norm(a: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors taken together as one flat vector."""
    sq = sum(float(v.double().pow(2).sum()) for v in a.values())
    return sq**0.5


def numel(a: Mapping[str, torch.Tensor]) -> int:
    """Total number of elements."""
    return sum(v.numel() for v in a.values())


def nbytes(a: Mapping[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' data as stored (dense)."""
    return sum(v.numel() * v.element_size() for v in a.values())


def clone(a: Mapping[str, torch.Tensor]) -> Delta:
    """Deep copy, detached, on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in a.items()}


def _check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))[:3]
        extra = sorted(set(b) - set(a))[:3]
        raise ValueError(f"deltas have different keys (only in first: {missing}, only in second: {extra})")
