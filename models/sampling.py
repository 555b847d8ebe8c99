"""Speech-token sampling shared by T3 (English, multilingual) and Turbo T3.

- The sampler settings of each model family, written once: `SamplingParams` (the Llama T3,
  whose field defaults are the English model's, `ENGLISH`), `MULTILINGUAL` (its repetition
  penalty of 2.0, as `mtl_tts.generate`) and `TurboSamplingParams` (`TURBO`, as
  `tts_turbo.generate`). `DEFAULTS` maps a family name to them.
- The logits processors both references use (HF's repetition penalty, temperature, min_p,
  top_k, top_p warpers) as single steps; each model module chains them in its reference's
  order (models/t3.py `process_logits`, models/t3_turbo.py `process_logits`).
- `decode`: the pipelined one-token-at-a-time loop both models run.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator, TypeVar

import mlx.core as mx

from .chunks import check_cancel

logger = logging.getLogger(__name__)

S = TypeVar("S", bound="_Settings")


class _Settings:
    """Mixin for the frozen settings dataclasses: options given by name override them."""

    def with_options(self: S, **options: float | None) -> S:
        """These settings with the named ones replaced; None keeps this value. An unknown
        name is a TypeError that names it."""
        unknown = sorted(set(options) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option(s) {', '.join(unknown)}")
        return replace(self, **{name: value for name, value in options.items() if value is not None})


@dataclass(frozen=True)
class SamplingParams(_Settings):
    """The Llama T3's sampler (T3.inference): CFG, repetition penalty, temperature, min_p,
    top_p. The field defaults are the English model's (`tts.generate`)."""

    cfg_weight: float = 0.5
    temperature: float = 0.8  # 0 means greedy: CFG, repetition penalty, argmax
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    top_p: float = 1.0


@dataclass(frozen=True)
class TurboSamplingParams(_Settings):
    """Turbo T3's sampler (inference_turbo): temperature, top-k, top-p, repetition penalty.
    The field defaults are `tts_turbo.generate`'s."""

    temperature: float = 0.8  # 0: greedy (argmax of the processed logits)
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2


ENGLISH = SamplingParams()
MULTILINGUAL = SamplingParams(repetition_penalty=2.0)
TURBO = TurboSamplingParams()
DEFAULTS: dict[str, SamplingParams | TurboSamplingParams] = {
    "chatterbox": ENGLISH, "multilingual": MULTILINGUAL, "turbo": TURBO,
}


# ---------------------------------------------------------------------------------------
# Logits processors: x (B, V) float32 -> (B, V), each one of HF's, as the references use them


def apply_repetition_penalty(x: mx.array, seen: mx.array | None, penalty: float) -> mx.array:
    """RepetitionPenaltyLogitsProcessor: each id of `seen` ((V,) bool) once, sign-dependent."""
    if seen is None or penalty == 1.0:
        return x
    return mx.where(seen, mx.where(x < 0, x * penalty, x / penalty), x)


def apply_temperature(x: mx.array, temperature: float) -> mx.array:
    """TemperatureLogitsWarper; 0 (greedy) and 1 leave the logits as they are."""
    if temperature > 0 and temperature != 1.0:
        return x / temperature
    return x


def apply_min_p(x: mx.array, min_p: float) -> mx.array:
    """MinPLogitsWarper: drop p < min_p * p_max, always keep the top token."""
    if min_p <= 0:
        return x
    probs = mx.softmax(x, axis=-1)
    top = mx.argmax(probs, axis=-1, keepdims=True)
    remove = probs < min_p * mx.max(probs, axis=-1, keepdims=True)
    remove = remove & (mx.arange(x.shape[-1])[None] != top)
    return mx.where(remove, -mx.inf, x)


def apply_top_k(x: mx.array, top_k: int) -> mx.array:
    """TopKLogitsWarper: drop everything below the k-th largest logit (ties kept)."""
    if top_k <= 0:
        return x
    k = min(top_k, x.shape[-1])
    kth = mx.sort(x, axis=-1)[..., x.shape[-1] - k : x.shape[-1] - k + 1]
    return mx.where(x < kth, -mx.inf, x)


def apply_top_p(x: mx.array, top_p: float) -> mx.array:
    """TopPLogitsWarper: sort ascending, drop the prefix whose cumulative probability is
    <= 1 - top_p, always keep the top token (top_p = 1.0 is a no-op)."""
    if top_p >= 1.0:
        return x
    order = mx.argsort(x, axis=-1)
    sorted_x = mx.take_along_axis(x, order, axis=-1)
    cum = mx.cumsum(mx.softmax(sorted_x, axis=-1), axis=-1)
    drop_sorted = cum <= (1.0 - top_p)
    drop_sorted[..., -1] = False
    drop = mx.put_along_axis(mx.zeros(x.shape, dtype=mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, -mx.inf, x)


def draw(x: mx.array, temperature: float, key: mx.array | None) -> mx.array:
    """Processed logits (1, V) -> token id (1,) int32 (lazy): argmax when temperature is 0,
    else a multinomial draw."""
    if temperature == 0:
        return mx.argmax(x, axis=-1).astype(mx.int32)
    return mx.random.categorical(x, axis=-1, key=key).astype(mx.int32)


# ---------------------------------------------------------------------------------------
# The decode loop


def step_keys(seed: int | None, count: int) -> mx.array:
    """`count` PRNG keys (count, 2), one per decode step, from `seed` (None: a random seed).
    Callers size the split by the model's position limit, not by max_new_tokens, so the same
    seed gives the same first tokens whatever the limit."""
    seed = secrets.randbits(63) if seed is None else seed
    return mx.random.split(mx.random.key(seed), count)


def decode(
    logits: mx.array,
    step: Callable[[mx.array, int], mx.array],
    sample: Callable[[mx.array, mx.array | None, mx.array], mx.array],
    keys: mx.array,
    *,
    max_new_tokens: int,
    vocab_size: int,
    bos: int,
    eos: int,
    penalise: bool,
    penalise_bos_after_first: bool = True,
    cancel: threading.Event | None = None,
) -> Iterator[int]:
    """Yield sampled token ids until EOS (not yielded) or `max_new_tokens` samples.

    logits: the prefill's (B, V). step(token, k): feed generated token k - 1 (a lazy (1,)
    array) and return the next logits. sample(logits, seen, key) -> (1,) int32 (lazy).
    With `penalise`, `seen` ((V,) bool) holds BOS and every generated id (Turbo's reference
    drops BOS after the first token: penalise_bos_after_first=False). Pipelined: the graph
    for step i+1 is built and queued (it only needs step i's lazy token) before waiting for
    token i, so host-side graph building overlaps device work. `cancel` is checked before
    each step (raises Cancelled, models/chunks.py).
    """
    vocab_ids = mx.arange(vocab_size)
    seen = (vocab_ids == bos) if penalise else None
    token = sample(logits, seen, keys[0])
    mx.async_eval(token)
    if penalise and not penalise_bos_after_first:
        seen = mx.zeros(vocab_ids.shape, dtype=mx.bool_)
    for i in range(max_new_tokens):
        check_cancel(cancel)
        if i + 1 < max_new_tokens:
            if penalise:
                seen = seen | (vocab_ids == token)
            next_token = sample(step(token, i + 1), seen, keys[i + 1])
            mx.async_eval(next_token)
        value = token.item()
        if value == eos:
            logger.debug("EOS after %d tokens", i)
            return
        yield value
        if i + 1 < max_new_tokens:
            token = next_token
