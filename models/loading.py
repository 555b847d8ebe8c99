"""Strict loading of the upstream checkpoint files.

Every key a component's spec (`upstream_shapes`) names must be present with that shape, and
no other key may be present: a missing, unexpected or misshaped key fails with a message
naming the key and the file. The only exceptions are the two S3Tokenizer buffers the
reference itself tolerates missing (they are recomputed).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DIMS_FILE = "dims.json"
SIZES = ("tiny", "full")  # a dims.json's "size": each config's tiny() or full()


class CheckpointError(ValueError):
    """A checkpoint file does not match the expected layout (names the file and key)."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CheckpointError(f"{path.name}: file not found in {path.parent}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({err})") from None


def check_keys(
    file_name: str,
    tensors: dict[str, np.ndarray],
    spec: dict[str, tuple],
    prefix: str = "",
    optional: frozenset[str] = frozenset(),
) -> None:
    """Raise CheckpointError unless `tensors` holds exactly `spec` (keys relative to prefix)."""
    present = set(tensors)
    expected = set(spec)
    missing = sorted(expected - present - optional)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file_name}: missing key '{prefix}{missing[0]}'{more}")
    unexpected = sorted(present - expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{file_name}: unexpected key '{prefix}{unexpected[0]}'{more}")
    for key in sorted(present):
        want = tuple(spec[key])
        got = tuple(tensors[key].shape)
        if got != want:
            raise CheckpointError(f"{file_name}: key '{prefix}{key}' has shape {got}, expected {want}")


@dataclass
class Dims:
    """Per-component configs of a checkpoint (dims.json, or the full configs if absent)."""

    raw: dict

    @classmethod
    def read(cls, directory: Path) -> "Dims":
        path = directory / DIMS_FILE
        if not path.exists():
            return cls({})
        try:
            return cls(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{DIMS_FILE}: unreadable ({err})") from None
