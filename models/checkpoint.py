"""Random checkpoints in the exact upstream layout, for tests (tiny) and benchmarks (full).

The real weights live on Hugging Face and cannot be fetched everywhere; these checkpoints
carry the same five files, the same key names and (for `full`) the same shapes, filled
with random values drawn deterministically from numpy's PCG64 so that the same seed gives
the same bytes on every machine. The PyTorch reference loads them strictly (tools/), which
is what makes parity fixtures possible.

Random init leaves norms, batch-norm statistics, Snake alphas and weight-norm gains at
identity values; here they are perturbed so that a port that gets those ops wrong fails.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

SIZES = ("tiny", "full")
DIMS_FILE = "dims.json"
CHECKPOINT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")

# (pattern on the full key, sampler(rng, shape) -> array). First match wins.
Sampler = Callable[[np.random.Generator, tuple], np.ndarray]


def _normal(std: float) -> Sampler:
    return lambda rng, shape: (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def _uniform(low: float, high: float) -> Sampler:
    return lambda rng, shape: rng.uniform(low, high, size=shape).astype(np.float32)


def _around_one(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _fan_in(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Weights with std 1/sqrt(fan_in), fan_in = prod(shape[1:]) (torch layout)."""
    fan_in = max(1, int(np.prod(shape[1:]))) if len(shape) > 1 else 1
    return _normal(1.0 / math.sqrt(fan_in))(rng, shape)


INIT_RULES: list[tuple[str, Sampler]] = [
    (r"running_var$", _uniform(0.5, 1.5)),
    (r"running_mean$", _normal(0.1)),
    (r"parametrizations\.weight\.original0$", _uniform(0.5, 1.5)),  # weight-norm gain g
    (r"parametrizations\.weight\.original1$", _normal(1.0)),  # weight-norm direction v
    (r"\.alpha$", _uniform(0.5, 1.5)),  # Snake
    (r"pos_bias_[uv]$", _normal(0.1)),
    (r"pre_attention_query$", _normal(0.5)),
    (r"(^|\.)(text_emb|speech_emb|text_pos_emb\.emb|speech_pos_emb\.emb|input_embedding|embed_tokens)\.weight$", _normal(0.5)),
    (r"\.bias$", _normal(0.05)),
    (r"(similarity_weight|similarity_bias)$", _around_one),
]


def sample_tensor(key: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """One random tensor for `key`, by the rules above (1-D weights are norm gains)."""
    if key.endswith("num_batches_tracked"):
        return np.array(100, dtype=np.int64)
    for pattern, sampler in INIT_RULES:
        if re.search(pattern, key):
            return sampler(rng, shape)
    if key.endswith(".weight") and len(shape) == 1:
        return _around_one(rng, shape)
    return _fan_in(rng, shape)


def random_weights(shapes: dict[str, tuple], rng: np.random.Generator, prefix: str = "") -> dict[str, np.ndarray]:
    """Random tensors for every key of an upstream spec (keys sorted, so order is stable)."""
    return {prefix + key: sample_tensor(prefix + key, tuple(shapes[key]), rng) for key in sorted(shapes)}
