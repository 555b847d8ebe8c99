"""Incremental streaming synthesis whose cost per chunk stays flat.

S3Gen is not causal (full attention in the flow encoder and estimator, symmetric convs in
HiFT), so audio is produced by windowed re-synthesis:

* Flow: each call runs over [prompt | up to `context_tokens` already-rendered tokens | the
  new tokens | 3 lookahead tokens] and keeps only the new tokens' mel frames. The CFM noise
  is a fixed, position-indexed buffer (`fixed_noise`), so a frame gets the same noise
  whichever window it is in. Every mel frame is computed exactly once.
* HiFT: each call vocodes [`hift_context_frames` already-emitted frames | the new frames],
  with the excitation source of the overlap taken from the previous call (`cache_source`)
  and the harmonic phase carried across calls, so the sine source is continuous. The last
  `hift_holdback_frames` frames of a call lack right context; they are held back and
  emitted by the next call, cross-faded with their first rendering over `crossfade_samples`.
* Accounting is exact: a segment of N tokens yields exactly 960 N samples, as one-shot
  synthesis of the same tokens does (`render_tokens`, which uses the same noise scheme).

Long text is split into sentences and clauses under the reference's limits and streamed
segment after segment in the same voice; a token budget proportional to the text and a
stop on long runs of one repeated token guard against runaway generation.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np

from . import dsp
from .conds import Conditionals
from .s3gen.flow import fixed_noise
from .stream import SAMPLE_RATE, SAMPLES_PER_TOKEN, AudioChunk, check_cancel

logger = logging.getLogger(__name__)

START_SPEECH_TOKEN = 6561
MEL_FRAMES_PER_TOKEN = 2
SAMPLES_PER_FRAME = SAMPLES_PER_TOKEN // MEL_FRAMES_PER_TOKEN  # 480 at 24 kHz
LOOKAHEAD_TOKENS = 3  # the flow encoder's pre-lookahead conv sees 3 tokens ahead
MAX_SEGMENT_CHARS = 300  # the reference's practical limit per generate() call
SOURCE_NOISE_BLOCK_FRAMES = 64
BUDGET_BASE_TOKENS = 40  # runaway guard: base + per-text-token allowance, capped by max_new_tokens
BUDGET_TOKENS_PER_TEXT_TOKEN = 8
MAX_REPEAT_RUN = 50  # 2 s of one identical token ends the segment


@dataclass(frozen=True)
class ChunkSchedule:
    """Tokens per chunk: `first`, then growing by `growth` up to `max_tokens`.

    A small first chunk gives fast first audio; larger later chunks amortise the fixed
    per-call cost (the prompt is re-encoded and re-denoised on every call).
    """

    # Measured on an H100 with INT8 (docs/benchmarks.md): a 12-token first chunk gave
    # 0.37 s to first audio but ~0.45 s of stalls, since each S3Gen call costs ~0.4-0.5 s
    # there whatever its size; 24 tokens gave 0.5-0.7 s and 0-0.3 s of stalls.
    first: int = 24
    growth: float = 2.0
    max_tokens: int = 48

    def sizes(self) -> Iterator[int]:
        size = self.first
        while True:
            yield max(1, int(size))
            size = min(self.max_tokens, size * self.growth)

    @classmethod
    def parse(cls, value: "ChunkSchedule | Iterable[int] | str | None") -> "ChunkSchedule":
        """Accepts a ChunkSchedule, None (defaults) or "first,growth,max"."""
        if value is None:
            return cls()
        if isinstance(value, ChunkSchedule):
            return value
        if isinstance(value, str):
            value = [float(v) for v in value.split(",")]
        parts = list(value)
        if not 1 <= len(parts) <= 3 or any(p <= 0 for p in parts):
            raise ValueError("chunk schedule is first[,growth[,max_tokens]] with positive numbers")
        first = int(parts[0])
        growth = float(parts[1]) if len(parts) > 1 else 2.0
        max_tokens = int(parts[2]) if len(parts) > 2 else max(first, cls.max_tokens)
        return cls(first, growth, max(first, max_tokens))


@dataclass(frozen=True)
class StreamOptions:
    chunk_schedule: ChunkSchedule = ChunkSchedule()
    context_tokens: int = 24  # left context of already-rendered tokens in each flow call
    hift_context_frames: int = 16  # mel frames of left context for each HiFT call
    # Frames kept back for the next call (no right context yet). Measured on random HiFT
    # weights (docs/benchmarks.md): 8 frames gave 25 dB SNR against one-shot vocoding of
    # the same mel, 12 gave 78 dB, 16 was exact to float precision.
    hift_holdback_frames: int = 12
    crossfade_samples: int = 480  # 20 ms raised-cosine join of the held-back frames
    n_timesteps: int | None = None  # CFM steps (None: the model's 10)
    prompt_tokens: int | None = None  # shorten the S3Gen prompt to its last K tokens (None: all)


# -- text ------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")


def split_text(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Sentences, split further at clauses and then words while longer than max_chars."""
    segments: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= max_chars:
            segments.append(sentence)
            continue
        current = ""
        for piece in _split_long(sentence, max_chars):
            if current and len(current) + 1 + len(piece) > max_chars:
                segments.append(current)
                current = piece
            else:
                current = f"{current} {piece}".strip()
        if current:
            segments.append(current)
    return segments


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    for clause in _CLAUSE_END.split(sentence):
        if len(clause) <= max_chars:
            yield clause
            continue
        words = clause.split(" ")
        current = ""
        for word in words:
            while len(word) > max_chars:  # one enormous "word": cut it
                if current:
                    yield current
                    current = ""
                yield word[:max_chars]
                word = word[max_chars:]
            if current and len(current) + 1 + len(word) > max_chars:
                yield current
                current = word
            else:
                current = f"{current} {word}".strip()
        if current:
            yield current


def token_budget(n_text_tokens: int, max_new_tokens: int, per_text_token: int = BUDGET_TOKENS_PER_TEXT_TOKEN) -> int:
    return min(max_new_tokens, BUDGET_BASE_TOKENS + per_text_token * n_text_tokens)


def guard_runaway(tokens: Iterable[int], max_repeat_run: int = MAX_REPEAT_RUN) -> Iterator[int]:
    """Pass tokens through, stopping after `max_repeat_run` identical tokens in a row."""
    last, run = None, 0
    for token in tokens:
        run = run + 1 if token == last else 1
        last = token
        yield token
        if run >= max_repeat_run:
            logger.warning("stopping a segment after %d repeats of token %d", run, token)
            return


# -- position-indexed randomness ---------------------------------------------------------


def _source_noise_block(seed: int, block: int, n_harm: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1, block])
    return rng.standard_normal((n_harm, SOURCE_NOISE_BLOCK_FRAMES * SAMPLES_PER_FRAME), dtype=np.float32)


def source_noise(seed: int, start_frame: int, num_frames: int, n_harm: int) -> mx.array:
    """SineGen noise for frames [start, start + n): (1, n_harm, 480 n), a function of position."""
    stop = start_frame + num_frames
    first, last = start_frame // SOURCE_NOISE_BLOCK_FRAMES, max(start_frame, stop - 1) // SOURCE_NOISE_BLOCK_FRAMES
    blocks = np.concatenate([_source_noise_block(seed, b, n_harm) for b in range(first, last + 1)], axis=1)
    offset = (start_frame - first * SOURCE_NOISE_BLOCK_FRAMES) * SAMPLES_PER_FRAME
    return mx.array(blocks[:, offset : offset + num_frames * SAMPLES_PER_FRAME])[None]


def source_phase(seed: int, n_harm: int) -> mx.array:
    """SineGen's initial phase per harmonic, U(-pi, pi) (the fundamental's is forced to 0)."""
    rng = np.random.default_rng([seed, 2])
    return mx.array(rng.uniform(-math.pi, math.pi, size=(1, n_harm)).astype(np.float32))


# Speech frames draw noise from their own region of the buffer, so the prompt's length (which
# differs between voices and with prompt_tokens) never shifts the noise of speech frames.
_NOISE_SPEECH_OFFSET = 1 << 20


def speech_noise(seed: int, first_token: int, n_tokens: int) -> mx.array:
    """CFM noise for the mel frames of tokens [first, first + n): (1, 80, 2n)."""
    return fixed_noise(
        MEL_FRAMES_PER_TOKEN * n_tokens, seed, start=_NOISE_SPEECH_OFFSET + MEL_FRAMES_PER_TOKEN * first_token
    )


def _prompt(gen: dict, prompt_tokens: int | None) -> tuple[mx.array, mx.array]:
    """The S3Gen prompt (tokens (1, P), mel (1, 2P, 80)), optionally shortened to its end.

    A reference clip that is not a whole number of 40 ms tokens gives 2P + 1 prompt frames.
    The reference then overlaps that odd frame with the first generated one and drops it
    (its output is one frame, 20 ms, short); here the prompt keeps its first 2P frames, so
    every speech token is exactly 2 mel frames and 960 samples.
    """
    tokens, feat = gen["prompt_token"], gen["prompt_feat"]
    feat = feat[:, : MEL_FRAMES_PER_TOKEN * tokens.shape[1]]
    if prompt_tokens is not None and prompt_tokens < tokens.shape[1]:
        tokens = tokens[:, tokens.shape[1] - prompt_tokens :]
        feat = feat[:, feat.shape[1] - MEL_FRAMES_PER_TOKEN * prompt_tokens :]
    return tokens, feat


# -- one-shot rendering with the same noise scheme ----------------------------------------


def render_tokens(model, tokens: list[int], gen: dict, seed: int, options: StreamOptions = StreamOptions()) -> np.ndarray:
    """One-shot S3Gen of `tokens` (ids < 6561) with the streaming noise scheme.

    Returns 960 N float32 samples with the trim fade applied: what the stream of the same
    tokens converges to.
    """
    if not tokens:
        return np.zeros(0, dtype=np.float32)
    prompt_token, prompt_feat = _prompt(gen, options.prompt_tokens)
    flow, hift = model.s3gen.flow, model.s3gen.mel2wav
    n_prompt_frames = prompt_feat.shape[1]
    n_frames = MEL_FRAMES_PER_TOKEN * len(tokens)
    noise = mx.concatenate([fixed_noise(n_prompt_frames, seed), speech_noise(seed, 0, len(tokens))], axis=2)
    mel = flow.inference(
        mx.array([tokens], dtype=mx.int32), prompt_token, prompt_feat, gen["embedding"],
        noise=noise, n_timesteps=options.n_timesteps,
    )
    n_harm = hift.cfg.nb_harmonics + 1
    src = hift.source(hift.f0(mel), phase=source_phase(seed, n_harm), noise=source_noise(seed, 0, n_frames, n_harm))
    wav = hift.decode(mel, src)[0]
    return np.array(dsp.apply_trim_fade(wav), dtype=np.float32)


# -- the streaming renderer --------------------------------------------------------------


class SegmentRenderer:
    """Turns one segment's tokens, arriving in order, into exactly 960 samples per token."""

    def __init__(self, model, gen: dict, seed: int, options: StreamOptions, cancel=None):
        self.cancel = cancel  # threading.Event or None: checked between CFM steps
        self.flow = model.s3gen.flow
        self.hift = model.s3gen.mel2wav
        self.gen = gen
        self.seed = seed
        self.options = options
        self.prompt_token, self.prompt_feat = _prompt(gen, options.prompt_tokens)
        self.n_prompt_frames = self.prompt_feat.shape[1]
        self.prompt_noise = fixed_noise(self.n_prompt_frames, seed)
        self.n_harm = self.hift.cfg.nb_harmonics + 1
        self.phase = source_phase(seed, self.n_harm)
        self.harmonics = mx.arange(1, self.n_harm + 1, dtype=mx.float32)
        self.tokens: list[int] = []
        self.mel: mx.array | None = None  # (1, 80, F): every mel frame rendered so far
        self.rendered_tokens = 0  # tokens whose mel exists
        self.emitted_frames = 0  # frames whose samples have been yielded (E)
        self.source: mx.array | None = None  # (1, 1, 480 * (F_prev - window start)) of the last call
        self.source_start = 0  # frame where self.source begins
        self.cycles = mx.zeros((1, self.n_harm))  # harmonic phase (cycles) at frame F_prev
        self.source_frames = 0  # F_prev: frames whose source samples exist
        self.pending: np.ndarray | None = None  # first rendering of the held-back frames
        self.frame_offset = 0  # absolute index of the first retained mel frame
        self.last_flow_tokens = 0  # window sizes of the last calls: the per-chunk cost
        self.last_hift_frames = 0

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def ready(self, chunk_tokens: int) -> bool:
        """Enough tokens (chunk + lookahead) for the next non-final chunk?"""
        return len(self.tokens) - self.rendered_tokens >= chunk_tokens + LOOKAHEAD_TOKENS

    def render(self, chunk_tokens: int | None, final: bool) -> np.ndarray:
        """Render the next `chunk_tokens` (all remaining when final) and return new samples."""
        n0 = self.rendered_tokens
        n1 = len(self.tokens) if final else n0 + chunk_tokens
        if n1 > n0:
            self._render_mel(n0, n1, final)
        return self._vocode(final)

    def _render_mel(self, n0: int, n1: int, final: bool) -> None:
        c0 = max(0, n0 - self.options.context_tokens)
        end = len(self.tokens) if final else min(len(self.tokens), n1 + LOOKAHEAD_TOKENS)
        window = self.tokens[c0:end]
        mel = self.flow.inference(
            mx.array([window], dtype=mx.int32),
            self.prompt_token,
            self.prompt_feat,
            self.gen["embedding"],
            noise=mx.concatenate([self.prompt_noise, speech_noise(self.seed, c0, len(window))], axis=2),
            n_timesteps=self.options.n_timesteps,
            frames=(MEL_FRAMES_PER_TOKEN * (n0 - c0), MEL_FRAMES_PER_TOKEN * (n1 - c0)),
            cancel=self.cancel,
        )
        self.mel = mel if self.mel is None else mx.concatenate([self.mel, mel], axis=2)
        self.rendered_tokens = n1
        self.last_flow_tokens = len(window)

    def _vocode(self, final: bool) -> np.ndarray:
        opts = self.options
        total = self.mel.shape[2] if self.mel is not None else 0
        e = self.emitted_frames
        stop = total if final else total - opts.hift_holdback_frames
        if stop <= e and not final:
            return np.zeros(0, dtype=np.float32)
        w0 = max(0, e - opts.hift_context_frames)
        if total <= w0:
            return np.zeros(0, dtype=np.float32)
        mel = self.mel[:, :, w0:total]
        f0 = self.hift.f0(mel)  # (1, W)
        source = self._window_source(f0, w0, total)
        wav = np.array(self.hift.decode(mel, source)[0], dtype=np.float32)  # 480 (total - w0)
        self.last_hift_frames = total - w0
        out = wav[(e - w0) * SAMPLES_PER_FRAME : (stop - w0) * SAMPLES_PER_FRAME]
        if self.pending is not None and len(self.pending):
            n = min(opts.crossfade_samples, len(self.pending), len(out))
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
            out = out.copy()
            out[:n] = self.pending[:n] * (1.0 - ramp) + out[:n] * ramp
        self.pending = None if final else wav[(stop - w0) * SAMPLES_PER_FRAME :].copy()
        if e == 0 and len(out):
            out = np.array(dsp.apply_trim_fade(mx.array(out)), dtype=np.float32)
        self.emitted_frames = stop
        # keep only the mel a later HiFT window can need
        keep_from = max(0, stop - opts.hift_context_frames)
        if keep_from > 0 and self.mel is not None:
            self.mel = self.mel[:, :, keep_from:]
            self._shift_frames(keep_from)
        return out

    def _window_source(self, f0: mx.array, w0: int, total: int) -> mx.array:
        """The excitation for frames [w0, total): cached samples where they exist, new ones
        after, with each harmonic's phase continuing from where the last call left it."""
        new_from = self.source_frames  # first frame without source samples
        # Cycles per frame of each harmonic under this window's F0.
        per_frame = (f0[0, :, None] / SAMPLE_RATE) * SAMPLES_PER_FRAME * self.harmonics  # (W, H)
        before_new = mx.sum(per_frame[: new_from - w0], axis=0, keepdims=True)  # cycles w0 -> new_from
        start_cycles = self.cycles - before_new  # so the phase at new_from equals the carried phase
        src = self.hift.source(
            f0,
            phase=self.phase,
            noise=source_noise(self.seed, self.frame_offset + w0, total - w0, self.n_harm),
            start_cycles=start_cycles,
        )
        if self.source is not None and new_from > w0:
            cached = self.source[:, :, (w0 - self.source_start) * SAMPLES_PER_FRAME :]
            src = mx.concatenate([cached, src[:, :, cached.shape[2] :]], axis=2)
        self.cycles = self.cycles + mx.sum(per_frame[new_from - w0 :], axis=0, keepdims=True)
        self.cycles = self.cycles - mx.floor(self.cycles)
        self.source, self.source_start, self.source_frames = src, w0, total
        return src

    def _shift_frames(self, n: int) -> None:
        """Drop n frames from the front: frame indices are relative to the retained mel."""
        self.frame_offset += n
        self.emitted_frames -= n
        self.source_frames -= n
        self.source_start -= n
        if self.source_start < 0:
            self.source = self.source[:, :, -self.source_start * SAMPLES_PER_FRAME :]
            self.source_start = 0


def stream_tokens(
    model,
    tokens: Iterable[int],
    conds: Conditionals,
    *,
    seed: int,
    options: StreamOptions = StreamOptions(),
    t_start: float | None = None,
    first_index: int = 0,
    cancel=None,
) -> Iterator[AudioChunk]:
    """Stream one segment: speech tokens in (any iterable, consumed lazily) -> AudioChunks.

    Ids >= 6561 are dropped as they arrive (the reference drops them after generation).
    `cancel` (threading.Event or None) is checked before each token is taken and between
    CFM steps; once set, Cancelled (models/stream.py) is raised.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    renderer = SegmentRenderer(model, conds.gen, seed, options, cancel)
    sizes = options.chunk_schedule.sizes()
    size = next(sizes)
    index = first_index
    token_start = 0
    t3_seconds = 0.0
    n_generated = 0
    t_mark = time.perf_counter()
    iterator = iter(tokens)
    exhausted = False
    while not exhausted:
        check_cancel(cancel)
        try:
            token = next(iterator)
            n_generated += 1
            if token < START_SPEECH_TOKEN:
                renderer.add([token])
        except StopIteration:
            exhausted = True
        if not exhausted and not renderer.ready(size):
            continue
        t_s3 = time.perf_counter()
        t3_seconds += t_s3 - t_mark
        samples = renderer.render(None if exhausted else size, final=exhausted)
        t_done = time.perf_counter()
        token_end = renderer.rendered_tokens
        timings = {
            "t3_ms": (t_s3 - t_mark) * 1000,
            "s3gen_ms": (t_done - t_s3) * 1000,
            "t3_tokens_per_s": n_generated / t3_seconds if t3_seconds > 0 else 0.0,
            "audio_ms": len(samples) / SAMPLE_RATE * 1000,
            "elapsed_ms": (t_done - t_start) * 1000,
            "flow_window_tokens": renderer.last_flow_tokens,
            "hift_window_frames": renderer.last_hift_frames,
        }
        if index == 0:
            timings["ttfa_ms"] = timings["elapsed_ms"]
        if len(samples) or exhausted:
            yield AudioChunk(samples, index, token_start, token_end, timings, is_last=exhausted)
            index += 1
            token_start = token_end
        if not exhausted:
            size = next(sizes)
        t_mark = time.perf_counter()


def stream_text(
    model,
    text: str,
    *,
    voice=None,
    seed: int | None = None,
    chunk_schedule=None,
    context_tokens: int | None = None,
    n_timesteps: int | None = None,
    prompt_tokens: int | None = None,
    max_new_tokens: int = 1000,
    max_repeat_run: int = MAX_REPEAT_RUN,
    cancel=None,
    **sampling,
) -> Iterator[AudioChunk]:
    """model.stream: text -> AudioChunks, segment after segment, in one voice.

    Chunk indices run across segments; the last chunk of the last segment has is_last.

    cancel: a threading.Event or None. It is checked between T3 steps and between CFM
    steps (and before each token is taken); once set, the generator raises
    models.stream.Cancelled within about one step, even inside a long chunk.
    """
    t_start = time.perf_counter()
    conds = model.resolve_voice(voice)
    seed = secrets.randbits(62) if seed is None else seed
    options = StreamOptions(
        chunk_schedule=ChunkSchedule.parse(chunk_schedule),
        context_tokens=StreamOptions.context_tokens if context_tokens is None else context_tokens,
        n_timesteps=n_timesteps,
        prompt_tokens=prompt_tokens,
    )
    segments = split_text(text) or [text]
    index = 0
    for number, segment in enumerate(segments):
        budget = token_budget(len(model.text_tokens(segment)), max_new_tokens,
                              getattr(model, "budget_tokens_per_text_token", BUDGET_TOKENS_PER_TEXT_TOKEN))
        tokens = guard_runaway(
            model.generate_tokens(
                segment, voice=conds, seed=seed + 2 * number, max_new_tokens=budget, cancel=cancel, **sampling
            ),
            max_repeat_run,
        )
        last_segment = number == len(segments) - 1
        for chunk in stream_tokens(
            model, tokens, conds, seed=seed + 2 * number + 1, options=options, t_start=t_start, first_index=index,
            cancel=cancel,
        ):
            chunk.is_last = chunk.is_last and last_segment
            index = chunk.index + 1
            yield chunk
