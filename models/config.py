"""One rule for every model config read from disk (config.json, a converted cache).

Configs are dataclasses. `from_dict` is strict: an unknown key is an error that names it
(a misspelt or newer field must never be dropped silently), and JSON lists come back as the
tuples the dataclasses hold. `to_dict` is the inverse, with tuples written as lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config mapping that does not fit its dataclass (unknown key, wrong container)."""


def _as_tuples(value):
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


def _as_lists(value):
    if isinstance(value, tuple):
        return [_as_lists(v) for v in value]
    if isinstance(value, list):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


class Config:
    """Mixin for config dataclasses: strict `from_dict`, JSON-ready `to_dict`."""

    @classmethod
    def from_dict(cls: type[C], d: Mapping) -> C:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise ConfigError(f"unknown {cls.__name__} field{plural}: {', '.join(unknown)}")
        return cls(**{k: _as_tuples(v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return _as_lists(asdict(self))
