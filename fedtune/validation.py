"""One validation idiom for every configuration section.

A section is a frozen dataclass that mixes in `Section`. Its ``__post_init__``
checks every field against its type annotation, then runs the section's
``problems()``, and raises one `~fedtune.errors.ConfigError` that lists every
problem found, each as ``section.key: why (got value)``. `Section.from_dict`
is the boundary: it rejects unknown keys, converts what a TOML file or Flower's
flat ``run_config`` can only spell one way (``"true"``, ``2.0`` for an integer,
``"2,4,8"`` for a list) and leaves everything else to the checks, so that a
wrong type and a wrong value elsewhere are reported together.

The helpers below (`choice`, `positive`, `fraction`, `between`, `at_least`,
`only_with`) append a message to a list; ``problems()`` only sees values of the
declared types (a field of the wrong type is checked with its default instead,
and messages that mention it are dropped), so they need no type checks.

This is the pattern of torchtune's config checks (all errors at once, before
training) with PEFT's dataclass configs (``__post_init__`` names the field).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from fedtune.errors import ConfigError

__all__ = [
    "Section",
    "at_least",
    "between",
    "build_section",
    "choice",
    "coerce",
    "fraction",
    "only_with",
    "positive",
    "type_problem",
]


# --- value checks (each appends `key: why (got value)` to `errors`) -----------------------------


def choice(errors: list[str], key: str, value: Any, allowed: Iterable[str]) -> None:
    """``value`` must be one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        errors.append(f"{key}: must be one of {', '.join(allowed)} (got {value!r})")


def positive(errors: list[str], key: str, value: float | None, *, allow_zero: bool = False) -> None:
    """``value`` must be > 0 (>= 0 with ``allow_zero``); None (unset) passes."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'} (got {value!r})")


def at_least(errors: list[str], key: str, value: float | None, low: float) -> None:
    """``value`` must be >= ``low``; None passes."""
    if value is not None and value < low:
        errors.append(f"{key}: must be >= {low} (got {value!r})")


def between(errors: list[str], key: str, value: float | None, low: float, high: float, bounds: str = "[]") -> None:
    """``value`` must lie in the interval ``low, high``; ``bounds`` is ``"[]"``, ``"[)"``, ``"(]"`` or ``"()"``."""
    if value is None:
        return
    above = value > low if bounds[0] == "(" else value >= low
    below = value < high if bounds[1] == ")" else value <= high
    if not (above and below):
        errors.append(f"{key}: must be in {bounds[0]}{low}, {high}{bounds[1]} (got {value!r})")


def fraction(errors: list[str], key: str, value: float | None, *, open_low: bool = True) -> None:
    """``value`` must be in (0, 1] (or [0, 1] with ``open_low=False``)."""
    between(errors, key, value, 0, 1, "(]" if open_low else "[]")


def only_with(errors: list[str], key: str, value: Any, other_key: str, other: Any, allowed: Iterable[Any]) -> None:
    """A setting read only when ``other`` is one of ``allowed``: refuse it elsewhere, since it would be ignored."""
    allowed = tuple(allowed)
    if value is not None and other not in allowed:
        wanted = " or ".join(repr(a) for a in allowed)
        errors.append(f"{key}: only used with {other_key} = {wanted}, which is {other!r}; unset it (got {value!r})")


# --- types ------------------------------------------------------------------------------------

_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _noun(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {_noun(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    return _NOUNS.get(tp, getattr(tp, "__name__", str(tp)))


def _members(tp: Any) -> tuple[list[Any], bool] | None:
    """(non-None members, whether None is allowed) of a union type, or None if ``tp`` is no union."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(tp)
    return [a for a in args if a is not type(None)], type(None) in args


def type_problem(tp: Any, value: Any) -> str | None:
    """Why ``value`` is not of the declared type ``tp`` (``"expected a number, got 'abc'"``), or None.

    ``bool`` is not accepted as a number, an integer is accepted as a float, and a
    float must be finite (no configuration setting means anything at NaN or inf).
    """
    union = _members(tp)
    if union is not None:
        members, optional = union
        if (value is None and optional) or any(type_problem(m, value) is None for m in members):
            return None
        finite = [m for m in members if m is float and isinstance(value, float) and not math.isfinite(value)]
        nouns = " or ".join(_noun(m) for m in members)
        return f"expected {'a finite number' if finite else nouns}, got {value!r}"
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
        ok = False
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        ok = isinstance(value, tuple) and all(type_problem(item, v) is None for v in value)
    else:
        return None
    return None if ok else f"expected {_noun(tp)}, got {value!r}"


def coerce(tp: Any, value: Any) -> Any:
    """Convert a TOML / ``run_config`` / command-line value to ``tp`` where only the spelling differs.

    ``"true"`` / ``"false"`` to a bool, an integral float to an int, an int to a
    float, a comma-separated string (commas or spaces for integers) or a list
    to a tuple, one integer to a 1-tuple of integers. Anything else comes back
    unchanged, for `type_problem` to report.
    """
    union = _members(tp)
    if union is not None:
        members, _optional = union
        if value is None or any(type_problem(m, value) is None for m in members):
            return value
        for m in members:
            converted = coerce(m, value)
            if type_problem(m, converted) is None:
                return converted
        return value
    if tp is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            parts = value.replace(",", " ").split() if item is int else value.split(",")
            value = [_int_or_str(p.strip()) if item is int else p.strip() for p in parts if p.strip()]
        elif item is int and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(coerce(item, v) for v in value)
    return value


def _int_or_str(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


# --- the section mixin ----------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _takes_tuple(tp: Any) -> bool:
    union = _members(tp)
    return any(typing.get_origin(m) is tuple for m in (union[0] if union else [tp]))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"configuration field {f.name} has no default")


class Section:
    """Mixin for a frozen configuration dataclass: all problems reported at once, keys named.

    A subclass sets ``SECTION`` (its TOML table name) and overrides
    ``problems()`` (value checks, written with the helpers of this module);
    ``resolved()`` may fill settings whose default depends on another one
    (e.g. a server optimizer's learning rate).
    """

    SECTION: ClassVar[str] = ""

    def problems(self) -> list[str]:
        """Every bad value of this section, each ``section.key: why (got value)``; fields already have their types."""
        return []

    def resolved(self) -> dict[str, Any]:
        """``{field: value}`` to fill in after validation (defaults that depend on other fields)."""
        return {}

    def key(self, name: str) -> str:
        """``section.name``, the way messages name a key."""
        return f"{self.SECTION}.{name}"

    def changed(self, name: str) -> Any:
        """The value of field ``name`` if it differs from the field's default, else None.

        What `only_with` should judge for a setting that always has a value: left at
        its default it changes nothing wherever it is ignored (and a saved config,
        which writes every default, still loads).
        """
        value = getattr(self, name)
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        return None if value == _default(f) else value

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        errors: list[str] = []
        probe = copy.copy(self)  # problems() runs on a copy in which a field of the wrong type holds its default
        bad: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and _takes_tuple(hints[f.name]):
                value = coerce(hints[f.name], value)  # a list (or lists inside) would make the config unhashable
                object.__setattr__(self, f.name, value)
                object.__setattr__(probe, f.name, value)
            why = type_problem(hints[f.name], value)
            if why is not None:
                errors.append(f"{self.key(f.name)}: {why}")
                bad.append(self.key(f.name))
                object.__setattr__(probe, f.name, _default(f))
        fills = probe.resolved()
        for name, value in fills.items():
            object.__setattr__(probe, name, value)
        # a check that involves a field of the wrong type would judge its default, not what was given
        mentions = re.compile("|".join(re.escape(b) + r"\b" for b in bad)) if bad else None
        errors.extend(p for p in probe.problems() if mentions is None or not mentions.search(p))
        if errors:
            raise ConfigError(errors)
        for name, value in fills.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """Build from plain data (a TOML table, Flower ``run_config`` entries); all problems at once.

        Unknown keys are refused (a typo must not silently leave a setting at its
        default); ``-`` and ``_`` are the same in a key (Flower favours dashes).
        """
        return build_section(cls, cls.SECTION, values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` turns back into an equal section."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def build_section(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` for the dataclass of ``[section]``, every problem in one `ConfigError`.

    What `Section.from_dict` does: unknown keys named, values converted by
    `coerce`, the dataclass's own checks run; ``-`` in a key reads as ``_``.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}]: expected a table of settings, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    errors: list[str] = []
    kwargs: dict[str, Any] = {}
    for raw, value in values.items():
        name = str(raw).replace("-", "_")
        if name not in fields:
            errors.append(f"{section}.{raw}: unknown key (known: {', '.join(sorted(fields))})")
        elif name in kwargs:
            errors.append(f"{section}.{name}: given twice, with - and with _ (got {raw!r})")
        else:
            kwargs[name] = coerce(hints[name], value)
    built = None
    try:
        built = cls(**kwargs)
    except ConfigError as exc:
        for problem in exc.problems:  # a section outside this idiom may raise its list as one message
            errors.extend(problem.removeprefix("invalid configuration:\n  ").split("\n  "))
    if errors:
        raise ConfigError(errors)
    return built
