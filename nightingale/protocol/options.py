"""Sampling options of a `speak` request: wire types, bounds, and check_option()."""

from __future__ import annotations

import math
from typing import Any

# Sampling options a speak request may carry, with their wire types; the daemon passes the
# ones present to the model's stream() as keyword arguments.
SPEAK_OPTIONS: dict[str, type] = {
    "seed": int,
    "temperature": float,
    "cfg_weight": float,
    "exaggeration": float,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
    "n_timesteps": int,  # CFM steps of S3Gen's flow (fewer: faster, rougher)
    "first_chunk_timesteps": int,  # CFM steps of the utterance's first chunk only
    "chunk_schedule": str,  # "first,growth,max" speech tokens per audio chunk
}

# Inclusive bounds of each option: wide enough for any real use, narrow enough that no
# request can ask for hours of work. check_option() applies them; the daemon and every
# CLI that takes an option use it, so a value is refused the same way everywhere.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**62 - 1),
    "temperature": (0.0, 5.0),
    "cfg_weight": (0.0, 5.0),
    "exaggeration": (0.0, 2.0),
    "top_p": (0.01, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1.0, 5.0),
    "max_new_tokens": (1, 4096),  # T3's learned speech positions
    "n_timesteps": (1, 100),  # the model's default is 10
    "first_chunk_timesteps": (1, 100),  # the model's default is 4 (capped by n_timesteps)
}
CHUNK_TOKENS_RANGE = (4, 1000)  # first and max speech tokens per chunk
CHUNK_GROWTH_RANGE = (1.0, 10.0)


class OptionError(ValueError):
    """An option value out of type or range; the message is one line naming the field
    and what it accepts."""


def check_option(name: str, value: Any) -> Any:
    """Validate one speak option; returns it normalised (ints as float for float options,
    chunk_schedule as canonical "first,growth,max"). Raises OptionError."""
    want = SPEAK_OPTIONS.get(name)
    if want is None:
        raise OptionError(f"unknown option {name!r}; known: {', '.join(SPEAK_OPTIONS)}")
    if name == "chunk_schedule":
        return _check_chunk_schedule(value)
    low, high = OPTION_RANGES[name]
    if want is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise OptionError(f"option {name!r} must be an integer in {low}..{high}, got {value!r}")
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise OptionError(f"option {name!r} must be a finite number in {low:g}..{high:g}, got {value!r}")
    if not low <= value <= high:
        shown = f"{low}..{high}" if want is int else f"{low:g}..{high:g}"
        raise OptionError(f"option {name!r} must be in {shown}, got {value!r}")
    return float(value) if want is float else value


def _check_chunk_schedule(value: Any) -> str:
    lo, hi = CHUNK_TOKENS_RANGE
    glo, ghi = CHUNK_GROWTH_RANGE
    usage = f"option 'chunk_schedule' is first[,growth[,max]] with first and max in {lo}..{hi} tokens and growth in {glo:g}..{ghi:g}"
    if not isinstance(value, str) or len(value) > 64:
        raise OptionError(f"{usage}, got {value!r}")
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise OptionError(f"{usage}, got {value!r}") from None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(v) for v in parts):
        raise OptionError(f"{usage}, got {value!r}")
    first = parts[0]
    growth = parts[1] if len(parts) > 1 else 2.0
    top = parts[2] if len(parts) > 2 else max(first, 48)
    if first != int(first) or top != int(top) or not lo <= first <= top <= hi or not glo <= growth <= ghi:
        raise OptionError(f"{usage} (max not below first), got {value!r}")
    return f"{int(first)},{growth:g},{int(top)}"
