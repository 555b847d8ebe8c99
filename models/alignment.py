"""The multilingual model's alignment guard, and decoding with it.

Port of chatterbox-tts 0.1.7 `models/t3/inference/alignment_stream_analyzer.py`. A few of
T3's attention heads (LLAMA_ALIGNED_HEADS, layers 9-13) attend to the text position being
spoken. Each decode step, the analyzer averages those heads' attention over the text
tokens, tracks the position, and edits the CFG-combined logits:

- EOS is suppressed (set to -2^15) while the position is before the last 3 text tokens
  (only for texts of more than 5 tokens);
- EOS is forced (every other logit -2^15, EOS +2^15) on a long tail (>= 5 frames on the
  last 3 tokens after completion), on an alignment repetition (attention back on earlier
  text after completion) or when the last two generated tokens are equal.

Upstream reads the weights through forward hooks on eager attention; here `t3.AttentionProbe`
computes the same matrices for the probed heads only. The tracked position is also what
Nightingale reports as the live text position of the audio.

One deliberate difference: upstream raises (an empty max) when the text has 5 tokens or
fewer and generation completes; here an empty slice counts as no repetition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from . import sampling, t3 as t3_mod
from .chunks import check_cancel
from .conds import T3Cond

logger = logging.getLogger(__name__)

FORCE_LOGIT = 2.0**15  # upstream: safe for every dtype of at least 16 bits
TOKEN_HISTORY = 8  # generated ids the repetition check keeps


@dataclass(frozen=True)
class AlignmentResult:
    """What one step found (upstream's AlignmentAnalysisResult, plus the forced EOS)."""

    position: int  # text position (index into [SOT] text [EOT]) after this step
    started: bool
    complete: bool
    discontinuity: bool
    long_tail: bool
    alignment_repetition: bool
    token_repetition: bool
    eos_suppressed: bool

    @property
    def force_eos(self) -> bool:
        return self.long_tail or self.alignment_repetition or self.token_repetition


class AlignmentStreamAnalyzer:
    """Upstream's analyzer over explicit attention matrices.

    text_slice: (i, j), the text tokens' positions in the prefill (cond length, cond length
    + wrapped text length). eos_idx: the stop-speech id.
    """

    def __init__(self, text_slice: tuple[int, int], eos_idx: int) -> None:
        self.text_slice = (i, j) = text_slice
        self.eos_idx = eos_idx
        self.alignment = np.zeros((0, j - i), dtype=np.float32)
        self.curr_frame_pos = 0
        self.text_position = 0
        self.started = False
        self.started_at: int | None = None
        self.complete = False
        self.completed_at: int | None = None
        self.generated_tokens: list[int] = []
        self.last: AlignmentResult | None = None

    def step(self, head_weights: list[np.ndarray], logits: mx.array, next_token: int | None = None) -> mx.array:
        """head_weights: per aligned head, its (L, S_total) attention of this forward (L is
        the prefill length on the first step, then 1). logits: CFG-combined (1, V). Returns
        the logits with EOS suppressed or forced; `self.last` says what was found."""
        aligned = np.stack([np.asarray(w, dtype=np.float32) for w in head_weights]).mean(axis=0)
        i, j = self.text_slice
        if self.curr_frame_pos == 0:
            chunk = aligned[j:, i:j].copy()  # the prefill: the rows after the text (the two BOS)
        else:
            chunk = aligned[:, i:j].copy()
        chunk[:, self.curr_frame_pos + 1 :] = 0  # upstream's (loose) monotonic mask
        self.alignment = np.concatenate([self.alignment, chunk], axis=0)
        a = self.alignment
        t, s = a.shape

        cur = int(np.argmax(chunk[-1]))
        discontinuity = not (-4 < cur - self.text_position < 7)
        if not discontinuity:
            self.text_position = cur

        false_start = (not self.started) and (a[-2:, -2:].max() > 0.1 or a[:, :4].max() < 0.5)
        self.started = not false_start
        if self.started and self.started_at is None:
            self.started_at = t

        self.complete = self.complete or self.text_position >= s - 3
        if self.complete and self.completed_at is None:
            self.completed_at = t

        tail = a[self.completed_at :] if self.complete else a[:0]
        long_tail = self.complete and bool(tail[:, -3:].sum(axis=0).max() >= 5)
        earlier = tail[:, :-5]
        alignment_repetition = self.complete and earlier.size > 0 and bool(earlier.max(axis=1).sum() > 5)

        if next_token is not None:
            self.generated_tokens.append(int(next_token))
            self.generated_tokens = self.generated_tokens[-TOKEN_HISTORY:]
        token_repetition = len(self.generated_tokens) >= 3 and len(set(self.generated_tokens[-2:])) == 1

        vocab = logits.shape[-1]
        is_eos = mx.arange(vocab) == self.eos_idx
        suppressed = cur < s - 3 and s > 5
        if suppressed:
            logits = mx.where(is_eos, -FORCE_LOGIT, logits)
        if long_tail or alignment_repetition or token_repetition:
            logger.debug("forcing EOS: long_tail=%s alignment_repetition=%s token_repetition=%s",
                         long_tail, alignment_repetition, token_repetition)
            logits = mx.where(is_eos, FORCE_LOGIT, mx.full(logits.shape, -FORCE_LOGIT, dtype=logits.dtype))
        self.curr_frame_pos += 1
        self.last = AlignmentResult(self.text_position, self.started, self.complete, discontinuity,
                                    long_tail, alignment_repetition, token_repetition, suppressed)
        return logits


@dataclass(frozen=True)
class AlignedToken:
    """A sampled speech token and the text position the aligned heads put it at."""

    token: int
    position: int  # index into [SOT] text [EOT]
    result: AlignmentResult


def generate_aligned(
    t3: t3_mod.T3,
    cond: T3Cond,
    text_tokens: list[int],
    *,
    max_new_tokens: int = 1000,
    seed: int | None = None,
    cancel=None,
    **options: float | None,
) -> Iterator[AlignedToken]:
    """`t3.generate_tokens` for the multilingual model: upstream's T3.inference with the
    analyzer (CFG, analyzer, repetition penalty, temperature, min_p, top_p, sample).
    `options` default to `sampling.MULTILINGUAL` (mtl_tts.generate's: repetition penalty
    2.0). EOS ends the generator and is not yielded; the generator's return value is then
    the analyzer's last result (why it stopped), None when max_new_tokens ran out. Each step
    waits for its attention weights, so steps are not pipelined. `cancel` (threading.Event
    or None) is checked before each step (raises Cancelled)."""
    cfg = t3.cfg
    if not cfg.alignment_heads:
        raise ValueError("this T3 has no aligned heads (the English model has none)")
    params = sampling.MULTILINGUAL.with_options(**options)
    t3.check_request(text_tokens, max_new_tokens)
    if max_new_tokens == 0:
        return
    keys = sampling.step_keys(seed, cfg.max_speech_tokens + 4)
    vocab_ids = mx.arange(cfg.speech_tokens_dict_size)
    use_penalty = params.repetition_penalty != 1.0
    seen = (vocab_ids == cfg.start_speech_token) if use_penalty else None

    cond_emb = t3.prepare_conditioning(cond)
    text = t3.wrap_text(text_tokens)
    probe = t3_mod.AttentionProbe(cfg.alignment_heads)
    analyzer = AlignmentStreamAnalyzer((cond_emb.shape[1], cond_emb.shape[1] + text.shape[0]), cfg.stop_speech_token)
    logits, cache = t3.prefill(cond_emb, text, use_cfg=params.cfg_weight > 0, probe=probe)
    last = cfg.start_speech_token
    for i in range(max_new_tokens):
        check_cancel(cancel)
        x = t3_mod.cfg_combine(logits, params.cfg_weight)
        mx.eval(x, *probe.weights)
        x = analyzer.step([np.array(w) for w in probe.weights], x, next_token=last)
        token = t3_mod.sample_token(x, seen, params, keys[i]).item()
        if token == cfg.stop_speech_token:
            logger.debug("T3 EOS after %d tokens (%s)", i, analyzer.last)
            return analyzer.last
        yield AlignedToken(token, analyzer.text_position, analyzer.last)
        if use_penalty:
            seen = seen | (vocab_ids == token)
        last = token
        if i + 1 < max_new_tokens:
            logits, cache = t3.step(token, i + 1, cache, probe=probe)
    return None


def sharpen_aligned_heads(weights: dict[str, np.ndarray], cfg: t3_mod.T3Config, factor: float) -> dict[str, np.ndarray]:
    """For tests and benchmarks on random weights: scale the aligned heads' query and key
    projections by `factor`, so their attention is peaked (softmax of factor^2 x the
    scores) and the analyzer's position moves and its guards can fire. Returns new arrays."""
    out = dict(weights)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    hd = cfg.head_dim
    for layer, head in cfg.alignment_heads or ():
        for proj, index in (("q_proj", head), ("k_proj", head // group)):
            key = f"tfmr.layers.{layer}.self_attn.{proj}.weight"
            w = np.array(out[key], dtype=np.float32)
            w[index * hd : (index + 1) * hd] *= factor
            out[key] = w
    return out
