"""Conditioning containers, in the structure of upstream conds.pt.

`Conditionals.t3` holds what T3 is conditioned on (speaker embedding, prompt speech tokens,
emotion exaggeration); `Conditionals.gen` holds S3Gen's reference dict, with exactly the
keyword names of the reference's `flow.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx

GEN_KEYS = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")


@dataclass
class T3Cond:
    """T3 conditioning. Shapes: speaker_emb (1, 256) float32; cond_prompt_speech_tokens
    (1, P<=150) int32; emotion_adv (1, 1, 1) float32; cond_prompt_speech_emb optional
    precomputed (1, P, D) prompt embedding (upstream caches it there)."""

    speaker_emb: mx.array
    cond_prompt_speech_tokens: mx.array
    emotion_adv: mx.array
    cond_prompt_speech_emb: mx.array | None = None

    def with_exaggeration(self, exaggeration: float) -> "T3Cond":
        return replace(self, emotion_adv=mx.full((1, 1, 1), exaggeration, dtype=mx.float32))


@dataclass
class Conditionals:
    """A voice: T3 conditioning plus S3Gen's reference dict.

    gen: prompt_token (1, P) int32, prompt_token_len (1,) int32, prompt_feat (1, 2P, 80)
    float32 log-mel, prompt_feat_len (1,) int32 or None, embedding (1, 192) float32 raw
    CAMPPlus x-vector (not normalised).
    """

    t3: T3Cond
    gen: dict = field(default_factory=dict)

    def arrays(self) -> list[mx.array]:
        """Every array of the voice (e.g. to evaluate them before another thread uses them:
        a lazy array, as mx.load gives, belongs to the stream of the thread that made it)."""
        t3 = [self.t3.speaker_emb, self.t3.cond_prompt_speech_tokens, self.t3.emotion_adv, self.t3.cond_prompt_speech_emb]
        return [a for a in t3 + list(self.gen.values()) if isinstance(a, mx.array)]
