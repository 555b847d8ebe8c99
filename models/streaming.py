"""Incremental streaming synthesis whose cost per chunk stays flat.

S3Gen is not causal (full attention in the flow encoder and estimator, symmetric convs in
HiFT), so audio is produced by windowed re-synthesis:

* Flow (MelWindows): each call runs over [prompt | up to `context_tokens` already-rendered
  tokens | the new tokens | 3 lookahead tokens] and keeps only the new tokens' mel frames.
  The CFM noise is a fixed, position-indexed buffer (`fixed_noise`), so a frame gets the
  same noise whichever window it is in. Every mel frame is computed exactly once.
* HiFT (HiftStream): each call vocodes [`hift_context_frames` emitted frames | the new
  frames]. The excitation source and the harmonic phase are committed only for frames whose
  F0 had its full right context, and the last `hift_holdback_frames` frames wait for the
  next call, so the emitted samples equal one-shot vocoding of the same mel.
* Accounting is exact: a segment of N tokens yields exactly 960 N samples, as one-shot
  synthesis of the same tokens does (`render_tokens`, which uses the same noise scheme).

Long text is split into sentences (models/text.py) and streamed segment after segment in
the same voice; a token budget proportional to the text and a stop on long runs of one
repeated token guard against runaway generation. T3 runs on its own thread ahead of the
renderer (TokenPump), through a bounded queue. model.synthesize is the concatenation of
this stream, so a file and a stream of the same request hold the same samples.
"""

from __future__ import annotations

import atexit
import logging
import math
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np

from . import dsp
from .conds import Conditionals
from .s3gen.flow import fixed_noise
from .positions import START_SPEECH_TOKEN, SegmentPositions, segment_origins, tracked_tokens
from .chunks import SAMPLE_RATE, SAMPLES_PER_TOKEN, AudioChunk, check_cancel
from .text import split_text

logger = logging.getLogger(__name__)

MEL_FRAMES_PER_TOKEN = 2
SAMPLES_PER_FRAME = SAMPLES_PER_TOKEN // MEL_FRAMES_PER_TOKEN  # 480 at 24 kHz
LOOKAHEAD_TOKENS = 3  # the flow encoder's pre-lookahead conv sees 3 tokens ahead
SOURCE_NOISE_BLOCK_FRAMES = 64
BUDGET_BASE_TOKENS = 40  # runaway guard: base + per-text-token allowance, capped by max_new_tokens
BUDGET_TOKENS_PER_TEXT_TOKEN = 8
MAX_REPEAT_RUN = 50  # 2 s of one identical token ends the segment
T3_QUEUE_CHUNKS = 2  # T3 may run this many chunks (plus lookahead) ahead of rendering
FIRST_CHUNK_TIMESTEPS = 4  # CFM steps of an utterance's first chunk (StreamOptions)


@dataclass(frozen=True)
class ChunkSchedule:
    """Tokens per chunk: `first`, then growing by `growth` up to `max_tokens`.

    A small first chunk gives fast first audio; larger later chunks amortise the fixed
    per-call cost (the prompt is re-encoded and re-denoised on every call).
    """

    # Measured on an H100 with INT8 (docs/benchmarks.md): with T3 pipelined and
    # a 4-step first chunk, 16 tokens gave 0.29 s to first audio and no stalls (24 tokens:
    # 0.44-0.49 s). The first chunk emits first - 8 tokens of audio (HiFT holds 16 frames back).
    first: int = 16
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
    # Frames kept back for the next call (no right context yet). Against one-shot vocoding of
    # the same mel with a voiced tiny HiFT (F0 ~150 Hz), committed source and fixed-point
    # phase: 12 frames gave 57 dB SNR, 14 gave 65-78 dB, 16 is exact to float precision
    # (104 dB). The decoder reaches ~14 frames each way, the F0 predictor 5.
    hift_holdback_frames: int = 16
    n_timesteps: int | None = None  # CFM steps (None: the model's 10)
    # CFM steps of the utterance's first chunk only, capped by n_timesteps (None: the same
    # as the rest): first audio sooner, at the cost of a rougher first 0.3 s. On an H100,
    # 4 steps cut the first S3Gen call from ~110 to ~50 ms (bench/cfm.py: 4 steps give 21 dB
    # mel SNR against 10 on random weights, as 8 steps do).
    first_chunk_timesteps: int | None = FIRST_CHUNK_TIMESTEPS
    prompt_tokens: int | None = None  # shorten the S3Gen prompt to its last K tokens (None: all)


# -- text and token guards -----------------------------------------------------------


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


class MelWindows:
    """The flow stage: speech tokens in order -> each token's 2 mel frames, computed once.

    Each call runs `flow.inference` over [prompt | up to `context_tokens` rendered tokens |
    new tokens | lookahead] and keeps the new tokens' frames. `flow` is any object with the
    Flow.inference signature (Turbo swaps in its own decoder).
    """

    def __init__(self, flow, gen: dict, seed: int, options: StreamOptions, cancel: threading.Event | None = None,
                 first_in_utterance: bool = True):
        self.first_in_utterance = first_in_utterance  # the utterance's first chunk may use fewer CFM steps
        self.flow = flow
        self.gen = gen
        self.seed = seed
        self.options = options
        self.cancel = cancel
        self.prompt_token, self.prompt_feat = _prompt(gen, options.prompt_tokens)
        self.prompt_noise = fixed_noise(self.prompt_feat.shape[1], seed)
        self.tokens: list[int] = []
        self.rendered_tokens = 0  # tokens whose mel exists
        self.last_window_tokens = 0  # window size of the last call: the per-chunk cost

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def ready(self, chunk_tokens: int) -> bool:
        """Enough tokens (chunk + lookahead) for the next non-final chunk?"""
        return len(self.tokens) - self.rendered_tokens >= chunk_tokens + LOOKAHEAD_TOKENS

    def render(self, chunk_tokens: int | None, final: bool) -> mx.array | None:
        """Mel (1, 80, 2n) of the next `chunk_tokens` (all remaining when final); None if none."""
        n0 = self.rendered_tokens
        n1 = len(self.tokens) if final else n0 + chunk_tokens
        if n1 <= n0:
            return None
        c0 = max(0, n0 - self.options.context_tokens)
        end = len(self.tokens) if final else min(len(self.tokens), n1 + LOOKAHEAD_TOKENS)
        window = self.tokens[c0:end]
        mel = self.flow.inference(
            mx.array([window], dtype=mx.int32),
            self.prompt_token,
            self.prompt_feat,
            self.gen["embedding"],
            noise=mx.concatenate([self.prompt_noise, speech_noise(self.seed, c0, len(window))], axis=2),
            n_timesteps=self._timesteps(n0),
            frames=(MEL_FRAMES_PER_TOKEN * (n0 - c0), MEL_FRAMES_PER_TOKEN * (n1 - c0)),
            cancel=self.cancel,
        )
        self.rendered_tokens = n1
        self.last_window_tokens = len(window)
        return mel

    def _timesteps(self, n0: int) -> int | None:
        steps, first = self.options.n_timesteps, self.options.first_chunk_timesteps
        if first is None or n0 != 0 or not self.first_in_utterance:
            return steps
        return min(first, steps if steps is not None else self.flow.cfg.n_timesteps)


class HiftStream:
    """The vocoder stage: mel frames in order -> exactly 480 samples per frame.

    Each call vocodes [`hift_context_frames` emitted frames | the new frames] and emits all
    but the last `hift_holdback_frames`, which lack right context (the next call emits them).
    The excitation source must match one-shot vocoding, and the source of frame f depends
    on F0[f], which the F0 predictor (five k3 convolutions) computes from mel frames
    f - 5 .. f + 5. So the source and the carried harmonic phase are committed only for
    frames whose F0 had its full right context (all but the last 5 of the window, or all at
    the end); the rest of the window gets a provisional source, continuing the same phase,
    that only held-back samples see and that the next call recomputes. With the hold-back
    at least the decoder's reach beyond that, the emitted samples equal one-shot vocoding
    of the same mel (tests/test_streaming.py states the bound).
    """

    def __init__(self, hift, seed: int, options: StreamOptions):
        self.hift = hift
        self.seed = seed
        self.options = options
        self.f0_context_frames = hift.f0_context_frames  # 5 for ConvRNNF0Predictor
        if options.hift_holdback_frames < self.f0_context_frames:
            raise ValueError(f"hift_holdback_frames must be >= {self.f0_context_frames} (the F0 predictor's reach)")
        self.n_harm = hift.cfg.nb_harmonics + 1
        self.phase = source_phase(seed, self.n_harm)
        self.mel: mx.array | None = None  # (1, 80, F): the retained mel (context + pending)
        self.frame_offset = 0  # absolute index of the first retained frame
        self.emitted_frames = 0  # frames whose samples were yielded (relative)
        self.source: mx.array | None = None  # committed source from frame source_start
        self.source_start = 0
        self.source_frames = 0  # frames whose source is committed (relative)
        self.phase_at = mx.zeros((1, self.n_harm), dtype=mx.uint32)  # harmonic phase at source_frames (fixed point)
        self.last_window_frames = 0

    def push(self, mel: mx.array | None, final: bool) -> np.ndarray:
        """Append mel (1, 80, n) (or None) and return the samples that are now final."""
        if mel is not None and mel.shape[2]:
            self.mel = mel if self.mel is None else mx.concatenate([self.mel, mel], axis=2)
        opts = self.options
        total = self.mel.shape[2] if self.mel is not None else 0
        e = self.emitted_frames
        stop = total if final else total - opts.hift_holdback_frames
        if stop <= e:
            return np.zeros(0, dtype=np.float32)
        w0 = max(0, e - opts.hift_context_frames)
        window = self.mel[:, :, w0:total]
        f0 = self.hift.f0(window)  # (1, W)
        committed = total if final else total - self.f0_context_frames
        source = self._window_source(f0, w0, committed, total)
        wav = self.hift.decode(window, source)[0]  # 480 (total - w0)
        out = np.array(wav[(e - w0) * SAMPLES_PER_FRAME : (stop - w0) * SAMPLES_PER_FRAME], dtype=np.float32)
        if self.frame_offset + e == 0:
            out = np.array(dsp.apply_trim_fade(mx.array(out)), dtype=np.float32)
        self.last_window_frames = total - w0
        self.emitted_frames = stop
        keep_from = max(0, stop - opts.hift_context_frames)  # what a later window can need
        if keep_from > 0:
            self.mel = self.mel[:, :, keep_from:]
            self._shift_frames(keep_from)
        return out

    def _window_source(self, f0: mx.array, w0: int, committed: int, total: int) -> mx.array:
        """Excitation (1, 1, 480 (total - w0)): committed samples where they exist, new ones
        after, each harmonic's phase continuing from the committed phase at source_frames."""
        new_from = self.source_frames
        step = self.hift.phase_increments(f0)[0]  # (W, H) uint32: sums wrap exactly mod one cycle
        start_phase = self.phase_at - mx.sum(step[: new_from - w0], axis=0, keepdims=True)
        src = self.hift.source(
            f0,
            phase=self.phase,
            noise=source_noise(self.seed, self.frame_offset + w0, total - w0, self.n_harm),
            start_phase=start_phase,
        )
        if self.source is not None and new_from > w0:
            cached = self.source[:, :, (w0 - self.source_start) * SAMPLES_PER_FRAME :]
            src = mx.concatenate([cached, src[:, :, cached.shape[2] :]], axis=2)
        self.phase_at = self.phase_at + mx.sum(step[new_from - w0 : committed - w0], axis=0, keepdims=True)
        self.source = src[:, :, : (committed - w0) * SAMPLES_PER_FRAME]
        self.source_start, self.source_frames = w0, committed
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


class SegmentRenderer:
    """One segment's tokens, arriving in order -> exactly 960 samples per token
    (a MelWindows stage feeding a HiftStream stage). With keep_mel, every mel frame the
    flow stage produced is kept in `mel_chunks` (tests compare it with one-shot vocoding)."""

    def __init__(self, model, gen: dict, seed: int, options: StreamOptions, cancel: threading.Event | None = None,
                 keep_mel: bool = False, first_in_utterance: bool = True):
        self.mel_stage = MelWindows(model.s3gen.flow, gen, seed, options, cancel, first_in_utterance)
        self.hift_stage = HiftStream(model.s3gen.mel2wav, seed, options)
        self.mel_chunks: list[mx.array] | None = [] if keep_mel else None

    @property
    def tokens(self) -> list[int]:
        return self.mel_stage.tokens

    @property
    def rendered_tokens(self) -> int:
        return self.mel_stage.rendered_tokens

    def add(self, tokens: list[int]) -> None:
        self.mel_stage.add(tokens)

    def ready(self, chunk_tokens: int) -> bool:
        return self.mel_stage.ready(chunk_tokens)

    def render(self, chunk_tokens: int | None, final: bool) -> np.ndarray:
        """Render the next `chunk_tokens` (all remaining when final) and return new samples."""
        mel = self.mel_stage.render(chunk_tokens, final)
        if mel is not None and self.mel_chunks is not None:
            self.mel_chunks.append(mel)
        return self.hift_stage.push(mel, final)

    def timings(self) -> dict:
        return {"flow_window_tokens": self.mel_stage.last_window_tokens,
                "hift_window_frames": self.hift_stage.last_window_frames}


def stream_tokens(
    model,
    tokens: Iterable[int],
    conds: Conditionals,
    *,
    seed: int,
    options: StreamOptions = StreamOptions(),
    t_start: float | None = None,
    first_index: int = 0,
    cancel: threading.Event | None = None,
    pump: "TokenPump | None" = None,
    renderer: SegmentRenderer | None = None,
) -> Iterator[AudioChunk]:
    """Stream one segment: speech tokens in (any iterable, consumed lazily) -> AudioChunks.

    Ids >= 6561 are dropped as they arrive (the reference drops them after generation).
    `cancel` (threading.Event or None) is checked before each token is taken and between
    CFM steps; once set, Cancelled (models/chunks.py) is raised. `pump` is the TokenPump
    when T3 runs on its own thread (its rate and progress go into the timings); `renderer`
    may be passed to inspect it.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    renderer = renderer or SegmentRenderer(model, conds.gen, seed, options, cancel, first_in_utterance=first_index == 0)
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
        t3_at_start = pump.generated if pump else n_generated
        samples = renderer.render(None if exhausted else size, final=exhausted)
        t_done = time.perf_counter()
        token_end = renderer.rendered_tokens
        timings = {
            "t3_ms": (t_s3 - t_mark) * 1000,  # waiting for tokens (T3's own time when not pipelined)
            "s3gen_ms": (t_done - t_s3) * 1000,
            "t3_tokens_per_s": pump.rate() if pump else (n_generated / t3_seconds if t3_seconds > 0 else 0.0),
            # T3's progress (tokens of the whole utterance) when this render started and ended:
            # with the pump they differ, which is the overlap
            "t3_tokens_at_render": [t3_at_start, pump.generated if pump else n_generated],
            "render_start_ms": (t_s3 - t_start) * 1000,
            "audio_ms": len(samples) / SAMPLE_RATE * 1000,
            "elapsed_ms": (t_done - t_start) * 1000,
            **renderer.timings(),
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


# -- the pipelined engine: T3 on its own thread ------------------------------------------

_END = object()  # end of one segment's tokens in the queue
CLOSE_TIMEOUT_S = 5.0  # at exit, how long a T3 thread may take to finish its job


class _T3Thread:
    """A long-lived thread that runs one T3 job at a time, keeping its MLX stream between
    jobs: a fresh thread per stream paid a new stream's first-use costs before every first
    chunk (H100, Turbo: the first 19 tokens took 210-270 ms on a new thread against ~150 ms on
    a warm one). Idle threads wait in `_IDLE`; a stream that finds none (two streams at once)
    gets a new one, which then stays for the next."""

    _IDLE: list["_T3Thread"] = []
    _ALL: list["_T3Thread"] = []
    _LOCK = threading.Lock()

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="nightingale-t3", daemon=True)
        self._thread.start()
        if not self._ALL:
            atexit.register(_T3Thread._close_all)
        self._ALL.append(self)

    @classmethod
    def run(cls, job: Callable[[], None], done: threading.Event) -> None:
        """Start `job` on an idle T3 thread (or a new one) and return at once; `done` is set
        when the job has ended and its thread is idle again (so the next stream reuses it)."""
        with cls._LOCK:
            worker = cls._IDLE.pop() if cls._IDLE else cls()
        worker._jobs.put((job, done))

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, done = item
            try:
                job()
            finally:
                with self._LOCK:
                    self._IDLE.append(self)
                done.set()
        # MLX streams belong to the thread that made them; left behind at exit, their
        # workers abort the process, so each T3 thread frees its own before it ends.
        mx.synchronize()
        mx.clear_streams()

    @classmethod
    def _close_all(cls) -> None:
        """At interpreter exit: end every T3 thread (after its current job, if any)."""
        for worker in cls._ALL:
            worker._jobs.put(None)
        for worker in cls._ALL:
            worker._thread.join(CLOSE_TIMEOUT_S)


class TokenPump:
    """Runs T3 on a T3 thread (its own MLX stream, `_T3Thread`) into a bounded queue, segment
    after segment, while the caller's thread renders audio from it.

    `segments` yields (text, seed) pairs; it is consumed on the T3 thread, so a text feed
    that blocks for more input blocks T3, not rendering. Each segment's tokens are followed
    by an end marker; an exception on the T3 thread crosses the queue and is raised by
    `tokens()`. close() (or `cancel`) stops T3 at its next token, and waits for the job.
    """

    def __init__(self, generate: Callable[[str, int], Iterable[int]], segments: Iterable[tuple[str, int]],
                 max_tokens: int, cancel: threading.Event | None = None):
        self._generate = generate
        self._segments = segments
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_tokens))
        self._stop = threading.Event()
        self._cancel = cancel
        self.generated = 0
        self.busy_s = 0.0  # T3's own time: the rate excludes time blocked on a full queue
        self._done = threading.Event()  # the T3 job has ended
        _T3Thread.run(self._run, self._done)

    def _stopped(self) -> bool:
        return self._stop.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _put(self, item) -> bool:
        while not self._stopped():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for text, seed in self._segments:
                if not self._put(("segment", text)):
                    return
                t = time.perf_counter()
                for token in self._generate(text, seed):
                    self.generated += 1
                    self.busy_s += time.perf_counter() - t
                    if self._stopped() or not self._put(token):
                        return
                    t = time.perf_counter()
                if not self._put(_END):
                    return
            self._put(None)
        except BaseException as err:  # crosses to the rendering thread
            self._put(("error", err))
        finally:
            mx.synchronize()  # nothing of this job is left running on the thread's stream

    def rate(self) -> float:
        return self.generated / self.busy_s if self.busy_s > 0 else 0.0

    def _get(self):
        while True:
            check_cancel(self._cancel)
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._done.is_set() and self._queue.empty():
                    return None
                continue
            if isinstance(item, tuple) and item[0] == "error":
                raise item[1]
            return item

    def next_segment(self) -> str | None:
        """Text of the next segment whose tokens follow; None at the end."""
        item = self._get()
        return None if item is None else item[1]

    def tokens(self) -> Iterator[int]:
        """The current segment's tokens, until its end marker."""
        while True:
            item = self._get()
            if item is _END or item is None:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        while not self._done.is_set():
            try:  # unblock a put on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._done.wait(0.05)


def _located(runs: Iterable[str]) -> Iterator[tuple[str, list[int]]]:
    """Segments of the runs (models/text.py), each with its characters' indices in the text
    (the runs joined)."""
    offset = 0
    for run in runs:
        pieces = split_text(run)
        for segment, origins in zip(pieces, segment_origins(run, pieces)):
            yield segment, [offset + k for k in origins]
        offset += len(run)


class _TextStream:
    """One `stream_text` call: its segments, their seeds (segment n: T3 seed + 2n, S3Gen
    seed + 2n + 1) and text positions, rendered one after another with T3 pipelined
    (`pipelined`) or in turn (`serial`); the audio is the same either way."""

    def __init__(self, model, text, conds, seed: int, language, options: StreamOptions, t_start: float,
                 cancel, max_new_tokens: int, max_repeat_run: int, sampling: dict):
        self.model, self.conds, self.seed, self.language = model, conds, seed, language
        self.options, self.t_start, self.cancel, self.sampling = options, t_start, cancel, sampling
        self.max_new_tokens, self.max_repeat_run = max_new_tokens, max_repeat_run
        self.known = isinstance(text, str)
        self.segments = list(_located([text])) if self.known else _located(text)
        self.n_segments = len(self.segments) if self.known else None
        self.index = 0  # the next chunk's index, across segments
        # Per segment (keyed by its T3 seed): where its characters are, and the analyzer's text
        # position of each rendered token (filled on T3's thread before the token is queued).
        self.where: dict[int, tuple[SegmentPositions, list[int]]] = {}

    def numbered(self) -> Iterator[tuple[str, int]]:
        """(segment, T3 seed) pairs; consumed on T3's thread when pipelined."""
        for number, (segment, origins) in enumerate(self.segments):
            spans = self.model.text_spans(segment, self.language) if self.model.family == "multilingual" else None
            self.where[self.seed + 2 * number] = (SegmentPositions(origins, spans), [])
            yield segment, self.seed + 2 * number

    def generate(self, segment: str, t3_seed: int) -> Iterator[int]:
        model = self.model
        text_ids = model.text_tokens(segment, self.language) if self.language is not None else model.text_tokens(segment)
        budget = token_budget(len(text_ids), self.max_new_tokens,
                              getattr(model, "budget_tokens_per_text_token", BUDGET_TOKENS_PER_TEXT_TOKEN))
        tokens = tracked_tokens(model, segment, self.language, self.where[t3_seed][1], voice=self.conds, seed=t3_seed,
                                max_new_tokens=budget, cancel=self.cancel, **self.sampling)
        return guard_runaway(tokens, self.max_repeat_run)

    def render(self, number: int, tokens: Iterable[int], pump: "TokenPump | None" = None) -> Iterator[AudioChunk]:
        """Segment `number`'s audio from its tokens, with its text positions."""
        last = self.n_segments is not None and number == self.n_segments - 1
        mapper, positions = self.where[self.seed + 2 * number]
        for chunk in stream_tokens(self.model, tokens, self.conds, seed=self.seed + 2 * number + 1, options=self.options,
                                   t_start=self.t_start, first_index=self.index, cancel=self.cancel, pump=pump):
            chunk.is_last = chunk.is_last and last
            chunk.timings["segment"] = number
            chunk.text_start, chunk.text_end = mapper.char_range(positions[chunk.token_start : chunk.token_end])
            self.index = chunk.index + 1
            yield chunk

    def pipelined(self) -> Iterator[AudioChunk]:
        schedule = self.options.chunk_schedule
        max_chunk = max(schedule.first, schedule.max_tokens)
        pump = TokenPump(self.generate, self.numbered(), T3_QUEUE_CHUNKS * (max_chunk + LOOKAHEAD_TOKENS), self.cancel)
        try:
            number = 0
            while pump.next_segment() is not None:
                yield from self.render(number, pump.tokens(), pump)
                number += 1
        finally:
            pump.close()

    def serial(self) -> Iterator[AudioChunk]:
        for number, (segment, t3_seed) in enumerate(self.numbered()):
            yield from self.render(number, self.generate(segment, t3_seed))


def stream_text(
    model,
    text: str | Iterable[str],
    *,
    voice=None,
    seed: int | None = None,
    chunk_schedule=None,
    context_tokens: int | None = None,
    n_timesteps: int | None = None,
    first_chunk_timesteps: int | None = FIRST_CHUNK_TIMESTEPS,
    prompt_tokens: int | None = None,
    max_new_tokens: int = 1000,
    max_repeat_run: int = MAX_REPEAT_RUN,
    pipeline: bool = True,
    cancel: threading.Event | None = None,
    **sampling,
) -> Iterator[AudioChunk]:
    """model.stream: text -> AudioChunks, segment after segment (models/text.py), in one voice.

    `text` is a string, or an iterable of text runs (the daemon's feed) that are split the
    same way; segment n uses seeds seed + 2n (T3) and seed + 2n + 1 (S3Gen), so a string and
    the same text in runs that end at sentence ends give the same audio. Chunk indices run
    across segments; the last chunk has is_last (for an iterable, an empty final chunk).
    With `pipeline`, T3 runs on its own thread (TokenPump) ahead of rendering; the audio is
    the same either way. `cancel` (threading.Event or None) is checked between T3 steps
    and between CFM steps (and before each token is taken); once set, the generator raises
    models.chunks.Cancelled within about one step, and T3's thread ends with it.
    """
    t_start = time.perf_counter()
    conds = model.resolve_voice(voice)
    # T3's thread must not evaluate arrays that are still lazy graphs of this thread's
    # stream (a voice read with mx.load is): MLX refuses another thread's stream
    mx.eval(conds.arrays())
    options = StreamOptions(
        chunk_schedule=ChunkSchedule.parse(chunk_schedule),
        context_tokens=StreamOptions.context_tokens if context_tokens is None else context_tokens,
        n_timesteps=n_timesteps,
        first_chunk_timesteps=first_chunk_timesteps,
        prompt_tokens=prompt_tokens,
    )
    language = model.resolve_language(sampling.pop("language", None), voice)
    run = _TextStream(model, text, conds, secrets.randbits(62) if seed is None else seed, language, options,
                      t_start, cancel, max_new_tokens, max_repeat_run, sampling)
    yield from run.pipelined() if pipeline else run.serial()
    check_cancel(cancel)
    if not run.known or run.index == 0:
        # an iterable's end is known only now; blank text still ends with one (empty) last chunk
        yield AudioChunk(np.zeros(0, dtype=np.float32), run.index, 0, 0,
                         {"elapsed_ms": (time.perf_counter() - t_start) * 1000}, is_last=True)
