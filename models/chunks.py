"""Audio chunks as the streaming synthesiser yields them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 24000  # Hz, S3Gen output
SAMPLES_PER_TOKEN = 960  # 40 ms per speech token at 24 kHz


class Cancelled(Exception):
    """Synthesis stopped because its `cancel` event was set (see `check_cancel`)."""


def check_cancel(cancel) -> None:
    """Raise Cancelled if `cancel` (a threading.Event, or None for never) is set.

    The model's loops call this between T3 steps and between CFM steps, so setting the
    event stops a long chunk within one step rather than at the next chunk boundary.
    """
    if cancel is not None and cancel.is_set():
        raise Cancelled()


@dataclass
class AudioChunk:
    """One piece of a streamed utterance.

    samples: float32 mono at 24 kHz, shape (n,). index: 0-based chunk number.
    token_start/token_end: the speech-token range [start, end) this chunk renders.
    timings: milliseconds and rates measured while producing it (keys such as
    ``t3_ms``, ``s3gen_ms``, ``ttfa_ms`` on the first chunk, ``t3_tokens_per_s``).
    is_last: True on the final chunk of the utterance.
    text_start/text_end: the [start, end) characters of the utterance's text this chunk
    speaks (models/positions.py), or None when unknown.
    """

    samples: np.ndarray
    index: int
    token_start: int
    token_end: int
    timings: dict = field(default_factory=dict)
    is_last: bool = False
    text_start: int | None = None
    text_end: int | None = None

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE
