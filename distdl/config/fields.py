"""Typing a section from YAML values: each value is checked against its field's type hint, and
against the limits annotated on it, with errors that name the key, the value and what is allowed.

A field's limits are annotated-types constraints (the vocabulary pydantic and msgspec read) on its
type, `Annotated[int, Ge(1)]`; a `Requirement` gives the error's words where the generated ones
would say less.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from annotated_types import BaseMetadata, Ge, GroupedMetadata, Gt, Le, Lt, MaxLen, MinLen, Predicate

from distdl.errors import ConfigError


@dataclass(frozen=True)
class Requirement:
    """What the value must be, in words, for the error when the type or limits around it fail."""

    text: str


Finite = Predicate(math.isfinite)
AtLeastOne = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
# Steps, or "epoch" (an epoch's steps, once the driver knows the data's size); 0: off.
StepInterval = Annotated[Union[NonNegative, Literal["epoch"]],
                         Requirement("must be 0 (off), a number of steps, or 'epoch'")]


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}.{key}; valid keys in {prefix}: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:
            try:
                return coerce(value, alternative, key)
            except ConfigError:
                pass
        return coerce(value, inner[-1], key)
    if origin is Annotated:
        return coerce_limited(value, args[0], hint.__metadata__, key)
    if origin is Literal:
        # By type too: YAML's true is not the 1 of Literal[0, 1, 2, 3].
        if not any(type(value) is type(allowed) and value == allowed for allowed in args):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {coerce(k, args[0], key): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return build_section(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "2e-3" (no dot) as a string; people write it that way all the time.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is Any or isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def coerce_limited(value: Any, inner: Any, metadata: tuple[Any, ...], key: str) -> Any:
    """`coerce` to the inner type, then check the field's limits."""
    requirement = next((m.text for m in metadata if isinstance(m, Requirement)), None)
    try:
        value = coerce(value, inner, key)
    except ConfigError:
        if requirement is None:
            raise
        raise ConfigError(f"{key}={shown(value)} {requirement}") from None
    limits = [limit for m in metadata if not isinstance(m, Requirement)
              for limit in (m if isinstance(m, GroupedMetadata) else [m])]
    if not all(satisfies(value, limit) for limit in limits):
        raise ConfigError(f"{key}={shown(value)} {requirement or describe(limits)}")
    return value


def satisfies(value: Any, limit: BaseMetadata) -> bool:
    if isinstance(limit, Ge):
        return value >= limit.ge
    if isinstance(limit, Gt):
        return value > limit.gt
    if isinstance(limit, Le):
        return value <= limit.le
    if isinstance(limit, Lt):
        return value < limit.lt
    if isinstance(limit, MinLen):
        return len(value) >= limit.min_length
    if isinstance(limit, MaxLen):
        return len(value) <= limit.max_length
    if isinstance(limit, Predicate):
        return bool(limit.func(value))
    raise TypeError(f"config fields do not support the constraint {limit!r}")


def describe(limits: list[BaseMetadata]) -> str:
    """The limits in words: 'must be at least 1', 'must lie in [0, 1)', 'must be a finite positive number'."""
    bound = {type(limit).__name__: getattr(limit, type(limit).__name__.lower()) for limit in limits
             if isinstance(limit, (Ge, Gt, Le, Lt))}
    finite = any(isinstance(limit, Predicate) and limit.func is math.isfinite for limit in limits)
    low = next((limit.min_length for limit in limits if isinstance(limit, MinLen)), None)
    high = next((limit.max_length for limit in limits if isinstance(limit, MaxLen)), None)
    if low is not None or high is not None:
        if low == high:
            return f"must hold {low} values"
        if high is None:
            return "must not be empty" if low == 1 else f"must hold at least {low} values"
        return f"must hold {low or 0} to {high} values"
    lower, upper = bound.get("Ge", bound.get("Gt")), bound.get("Le", bound.get("Lt"))
    if lower is not None and upper is not None:
        return f"must lie in {'[' if 'Ge' in bound else '('}{lower}, {upper}{']' if 'Le' in bound else ')'}"
    if bound.get("Gt") == 0:
        return "must be a finite positive number" if finite else "must be positive"
    if bound.get("Ge") == 0:
        return "must be finite and >= 0" if finite else "must be 0 or more"
    if lower is not None:
        return f"must be at least {lower}" if "Ge" in bound else f"must be greater than {lower}"
    if upper is not None:
        return f"must be at most {upper}" if "Le" in bound else f"must be below {upper}"
    return "must be a finite number" if finite else "is not allowed"


def shown(value: Any) -> str:
    """A value as an error shows it: numbers and lists as written, strings quoted."""
    return str(value) if isinstance(value, (int, float, list)) and not isinstance(value, bool) else repr(value)
