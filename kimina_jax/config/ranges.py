"""The allowed values of numeric keys, declared on the key's own annotation and checked after loading.

A key's range is annotated-types metadata on its type: `n: Annotated[int, Gt(0)] = 8`, an interval as
`Interval(ge=0, lt=1)`, alternatives as `OneOf(-1, Gt(0))`, and a note the error shows as `doc("...")`. Null, where
a key's type allows it, is always allowed; a list key's range is on its item type; every float must be finite.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Annotated, Callable

from annotated_types import BaseMetadata, Ge, Gt, Interval, Le, Lt, doc

__all__ = ["Ge", "Gt", "Interval", "Le", "Lt", "OneOf", "Range", "check_ranges", "doc", "range_of"]

_COMPARISONS: dict[type, tuple[str, str, Callable[[float, float], bool]]] = {
    Gt: ("gt", ">", lambda value, bound: value > bound),
    Ge: ("ge", ">=", lambda value, bound: value >= bound),
    Lt: ("lt", "<", lambda value, bound: value < bound),
    Le: ("le", "<=", lambda value, bound: value <= bound),
}


@dataclasses.dataclass(frozen=True)
class OneOf(BaseMetadata):
    """Any of the alternatives: a value (equal to it) or a comparison (`OneOf(-1, Gt(0))`)."""

    alternatives: tuple[Any, ...]

    def __init__(self, *alternatives: Any):
        object.__setattr__(self, "alternatives", alternatives)


@dataclasses.dataclass(frozen=True)
class Range:
    """A key's constraints (all must hold) and the note its error shows."""

    constraints: tuple[Any, ...]
    note: str | None

    def allows(self, value: float) -> bool:
        return all(_allows(constraint, value) for constraint in self.constraints)

    def describe(self) -> str:
        wanted = " and ".join(_describe(constraint) for constraint in self.constraints)
        return f"{wanted} ({self.note})" if self.note else wanted


def _allows(constraint: Any, value: float) -> bool:
    if isinstance(constraint, OneOf):
        return any(_allows(alt, value) for alt in constraint.alternatives)
    if isinstance(constraint, Interval):
        return all(_allows(part, value) for part in constraint)
    if type(constraint) in _COMPARISONS:
        attr, _, holds = _COMPARISONS[type(constraint)]
        return holds(value, getattr(constraint, attr))
    return value == constraint


def _describe(constraint: Any) -> str:
    if isinstance(constraint, OneOf):
        return " or ".join(_describe(alt) for alt in constraint.alternatives)
    if isinstance(constraint, Interval):
        low, opening = (constraint.gt, "(") if constraint.gt is not None else (constraint.ge, "[")
        high, closing = (constraint.lt, ")") if constraint.lt is not None else (constraint.le, "]")
        return f"in {opening}{low}, {high}{closing}"
    if type(constraint) in _COMPARISONS:
        attr, symbol, _ = _COMPARISONS[type(constraint)]
        return f"{symbol} {getattr(constraint, attr)}"
    return str(constraint)


def _range_in(tp: Any) -> Range | None:
    """The range annotated on `tp`, looked for inside `X | None` and `list[X]` too."""
    if typing.get_origin(tp) is Annotated:
        metadata = tp.__metadata__
        notes = [m.documentation for m in metadata if hasattr(m, "documentation")]
        constraints = tuple(m for m in metadata if not hasattr(m, "documentation"))
        return Range(constraints, notes[0] if notes else None) if constraints else None
    for arg in typing.get_args(tp):
        found = _range_in(arg)
        if found is not None:
            return found
    return None


@functools.cache
def _ranges(cls: type) -> dict[str, Range]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: found for f in dataclasses.fields(cls) if (found := _range_in(hints[f.name])) is not None}


def range_of(cls: type, name: str) -> Range | None:
    """The range declared on field `name` of section class `cls` (None: the key has none)."""
    return _ranges(cls).get(name)


def check_ranges(section: Any, prefix: str, fail: Callable[[str], None]) -> None:
    """Every numeric value of a built section (recursively) against the range on its key; floats must be finite."""
    for f in dataclasses.fields(section):
        key, value = f"{prefix}.{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key, fail)
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item):
                fail(f"'{key}' must be a finite number, got {item}")
            allowed = range_of(type(section), f.name)
            if allowed is not None and not allowed.allows(item):
                fail(f"'{key}' must be {allowed.describe()}, got {item}")
