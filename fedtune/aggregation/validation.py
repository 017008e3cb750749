"""Reject malformed client updates before they reach aggregation.

A client may send a state with a missing or extra key, a wrong shape or
dtype, NaN/Inf, or an update far larger than honest training produces
(a norm bound is the first line of defence against model replacement, Bagdasaryan
et al. 2020, arXiv:1807.00459). `validate_update` raises `PayloadError` naming
every problem found, so the server can drop that one update and go on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch

from fedtune.aggregation.lora import lora_layers
from fedtune.errors import ConfigError, PayloadError

Spec = tuple[tuple[int, ...], torch.dtype]
_MAX_LISTED = 5


@dataclasses.dataclass(frozen=True, eq=False)
class Layout(Mapping[str, Spec]):
    """The expected ``{key: (shape, dtype)}`` of an update; a read-only mapping.

    Build it from the global state with `Layout.from_state`; `for_rank` gives
    the layout of a client training LoRA at another rank (heterogeneous ranks).
    """

    entries: Mapping[str, Spec]

    def __post_init__(self) -> None:
        fixed = {str(k): (tuple(int(d) for d in shape), dtype) for k, (shape, dtype) in self.entries.items()}
        object.__setattr__(self, "entries", MappingProxyType(fixed))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        return cls({k: (tuple(v.shape), v.dtype) for k, v in state.items()})

    def for_rank(self, rank: int | Mapping[str, int]) -> Layout:
        """The same layout with every LoRA layer at ``rank`` (an int or ``{prefix: int}``)."""
        entries = dict(self.entries)
        for prefix, (a_key, b_key) in lora_layers(entries).items():
            if isinstance(rank, Mapping) and prefix not in rank:
                raise ConfigError(f"rank has no entry for LoRA layer {prefix!r}")
            r = rank[prefix] if isinstance(rank, Mapping) else rank
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(f"rank for {prefix!r} must be a positive int, got {r!r}")
            (a_shape, a_dtype), (b_shape, b_dtype) = entries[a_key], entries[b_key]
            entries[a_key] = ((r, *a_shape[1:]), a_dtype)
            entries[b_key] = ((b_shape[0], r, *b_shape[2:]), b_dtype)
        return Layout(entries)

    def ranks(self) -> dict[str, int]:
        """``{prefix: rank}`` of the LoRA layers."""
        return {p: self.entries[a][0][0] for p, (a, _) in lora_layers(self.entries).items()}

    def __getitem__(self, key: str) -> Spec:
        return self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def validate_update(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    max_norm: float | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Check one client update against the expected layout; raise `PayloadError` if it is malformed.

    Checks, all reported at once: every expected key present, no extra key,
    each value a tensor of the expected shape and dtype, every floating value
    finite. Then, with ``max_norm``, the L2 norm over all keys of
    ``state - reference`` (or of ``state`` itself when it is already a delta)
    must be at most ``max_norm``.

    Raises:
        PayloadError: the update is malformed; the message lists why.
        ConfigError: ``max_norm`` is not a finite number > 0.
        ValueError: ``reference`` does not fit ``expected`` (a server bug).
    """
    if max_norm is not None and (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, (int, float))
        or not math.isfinite(max_norm)
        or max_norm <= 0
    ):
        raise ConfigError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    if not isinstance(state, Mapping):
        raise PayloadError(f"update must be a mapping of tensors, got {type(state).__name__}")
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing key(s) {_listed(missing)}")
    if extra:
        problems.append(f"unexpected key(s) {_listed(extra)}")
    for key, (shape, dtype) in expected.items():
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
            continue
        if tuple(value.shape) != tuple(shape):
            problems.append(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if value.dtype != dtype:
            problems.append(f"{key!r} has dtype {value.dtype}, expected {dtype}")
        elif (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.append(f"{key!r} has {bad} non-finite value(s)")
    if problems:
        raise PayloadError("rejected update: " + "; ".join(problems))
    if max_norm is None:
        return
    sq = 0.0
    for key in expected:
        v = state[key].detach().to(torch.float64)
        if reference is not None:
            if key not in reference or tuple(reference[key].shape) != tuple(v.shape):
                raise ValueError(f"reference does not fit the expected layout at {key!r}")
            v = v - reference[key].detach().to(torch.float64)
        sq += float(v.square().sum())
    norm = math.sqrt(sq)
    if not norm <= max_norm:
        what = "distance from the global state" if reference is not None else "norm"
        raise PayloadError(f"rejected update: L2 {what} {norm:.4g} exceeds max_update_norm={max_norm:g}")


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")
