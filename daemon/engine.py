"""The engine thread: the only thread that calls the model (model.stream runs T3 on a
helper thread of its own, which it starts and stops).

It loads and warms the model, then runs one utterance at a time: the utterance's text feed
goes through one model.stream() call, and each AudioChunk goes to the player
(local playback) and/or back to the event loop as PCM (streaming clients). Everything the
loop must learn crosses through `post(fn, *args)`, which schedules fn on the loop thread
(loop.call_soon_threadsafe); the loop never calls the model. The utterance's `cancelled`
event is handed to model.stream(cancel=...), which checks it between T3 steps and between
CFM steps, so a cancel (or a shutdown) stops synthesis within about one step even inside
a long chunk; it is also checked before each chunk is delivered.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from nightingale import protocol as p
from nightingale.models.positions import segment_origins
from nightingale.models.chunks import Cancelled

from nightingale.playback import PlaybackError
from .utterance import Utterance

log = logging.getLogger(__name__)

Post = Callable[..., None]


class Listener(Protocol):
    """Loop-side callbacks (scheduler.Scheduler); the engine only ever reaches them through `post`."""

    def on_loaded(self, info: EngineInfo) -> None: ...
    def on_load_failed(self, error: BaseException) -> None: ...
    def on_started(self, utt: Utterance, language: str | None = None) -> None: ...
    def on_audio(self, utt: Utterance, seq: int, pcm: bytes, start_s: float) -> None: ...
    def on_chunk(self, utt: Utterance, info: dict) -> None: ...
    def on_generated(self, utt: Utterance, outcome: str, stats: dict, error: tuple[str, str] | None) -> None: ...


class TextPlaces:
    """Maps character offsets of the text model.stream sees (the feed's runs, joined) to
    offsets of the text the client sent (`feed.text`), for progress events. The runs are
    stripped sentences of the feed, in order; `runs` wraps their iterator (consumed on
    T3's thread, before any chunk of a run exists)."""

    def __init__(self, feed) -> None:
        self._feed = feed
        self._origins: list[int] = []  # joined-runs offset -> feed.text offset
        self._cursor = 0

    def runs(self, runs: Iterator[str]) -> Iterator[str]:
        for run in runs:
            found = segment_origins(self._feed.text[self._cursor :], [run])[0]
            origins = [self._cursor + k for k in found]
            if origins:
                self._cursor = origins[-1] + 1
            self._origins.extend(origins)
            yield run

    def describe(self, start: int | None, end: int | None) -> dict:
        """{text_start, text_end, text} in the client's text, or {} when unknown."""
        origins = self._origins
        if start is None or end is None or not origins:
            return {}
        a = origins[min(start, len(origins) - 1)]
        b = origins[min(end, len(origins)) - 1] + 1 if end > start else a
        return {"text_start": a, "text_end": b, "text": self._feed.text[a:b]}


class UnsupportedLanguage(Exception):
    """The utterance's language is not one the model speaks (or its front end is missing)."""


class UnknownVoice(Exception):
    pass


def encode_pcm(samples: np.ndarray, audio_format: str) -> bytes:
    """float32 samples (n,) in [-1, 1] as little-endian PCM bytes."""
    if audio_format == "s16le":
        return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    return np.asarray(samples, dtype="<f4").tobytes()


@dataclass
class EngineInfo:
    """What the engine learned at load time (read by the loop after on_loaded)."""

    sample_rate: int = 24000
    describe: dict = field(default_factory=dict)
    load_s: float = 0.0
    warmup_s: float = 0.0


@dataclass
class RunStats:
    """What the synthesis of one utterance measured; finish() is the stats dict the loop
    gets with on_generated (the `done` event's figures come from it)."""

    sample_rate: int
    t_start: float = field(default_factory=time.monotonic)
    ttfa_ms: float | None = None  # first non-empty chunk, from the engine's start
    model_ttfa_ms: float | None = None  # the model's own figure for it
    tokens: int = 0
    audio_s: float = 0.0
    chunks: int = 0
    t3_ms: float = 0.0
    s3gen_ms: float = 0.0
    blocked_s: float = 0.0  # waiting on the player's full buffer (not synthesis)
    played: bool = False  # some audio went to the player
    audio_frames: int = 0  # `audio` events posted (their seq)

    def add(self, chunk: Any, samples: np.ndarray) -> float:
        """Count a chunk (samples: (n,)); returns where its audio starts in the utterance (s)."""
        if self.ttfa_ms is None:
            self.ttfa_ms = (time.monotonic() - self.t_start) * 1000.0
            self.model_ttfa_ms = chunk.timings.get("ttfa_ms")
        start_s = self.audio_s
        self.chunks += 1
        self.tokens += max(0, int(chunk.token_end) - int(chunk.token_start))
        self.audio_s += len(samples) / self.sample_rate
        self.t3_ms += float(chunk.timings.get("t3_ms", 0.0))
        self.s3gen_ms += float(chunk.timings.get("s3gen_ms", 0.0))
        return start_s

    def next_seq(self) -> int:
        self.audio_frames += 1
        return self.audio_frames - 1

    def progress(self, chunk: Any) -> dict:
        """on_chunk's info about the chunk just added."""
        return {
            "chunk": self.chunks - 1,
            "segment": chunk.timings.get("segment", 0),
            "tokens": self.tokens,
            "audio_s": self.audio_s,
            "t3_ms": chunk.timings.get("t3_ms"),
            "s3gen_ms": chunk.timings.get("s3gen_ms"),
            "t3_tokens_per_s": chunk.timings.get("t3_tokens_per_s"),
            "first": self.chunks == 1,
        }

    def finish(self) -> dict:
        return {
            "ttfa_ms": self.ttfa_ms, "model_ttfa_ms": self.model_ttfa_ms, "tokens": self.tokens,
            "audio_s": self.audio_s, "chunks": self.chunks, "t3_ms": self.t3_ms, "s3gen_ms": self.s3gen_ms,
            "blocked_s": self.blocked_s, "synth_s": time.monotonic() - self.t_start - self.blocked_s,
            "played": self.played,
        }  # fmt: skip


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (macOS returns freed memory by itself)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


def memory_stats() -> dict:
    """MLX allocator figures in MB (engine thread only: they are MLX calls)."""
    try:
        import mlx.core as mx

        mb = 1.0 / (1 << 20)
        return {
            "mlx_active_mb": round(mx.get_active_memory() * mb, 1),
            "mlx_peak_mb": round(mx.get_peak_memory() * mb, 1),
            "mlx_cache_mb": round(mx.get_cache_memory() * mb, 1),
        }
    except Exception:
        return {}


def voice_file_stamp(name: str) -> tuple | None:
    """Identity of the file a voice name or path loads from (inode, size, mtime), or None when
    there is none (the built-in voice, a missing file). A stored voice is replaced by renaming
    a new record over the old one, so any change gives a new stamp."""
    from nightingale.models import voice_store

    if name == "default":
        return ("default",)
    path = Path(name)
    if path.suffix != ".pt" and os.sep not in name:
        try:
            path = voice_store.voices_dir() / f"{voice_store.normalize_name(name)}.json"
        except voice_store.VoiceError:
            return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _user_fixable(err: BaseException) -> bool:
    """A load failure the user fixes (no checkpoint there, a damaged one), not a bug."""
    from nightingale.models import hub, loading

    return isinstance(err, (hub.CheckpointNotFoundError, loading.CheckpointError))


def _failure(utt: Utterance, err: Exception) -> tuple[str, tuple[str, str] | None]:
    """The outcome and (error code, message) of a synthesis that raised `err` (called in the
    except block, so an unexpected error is logged with its traceback)."""
    if isinstance(err, Cancelled):
        return "cancelled", None
    if isinstance(err, UnsupportedLanguage):
        return "failed", (p.E_UNSUPPORTED_LANGUAGE, str(err))
    if isinstance(err, UnknownVoice):
        return "failed", (p.E_UNKNOWN_VOICE, f"unknown voice {utt.voice!r}: {err}")
    if isinstance(err, PlaybackError):
        log.error("%s", err)
        return "failed", (p.E_NO_PLAYBACK, f"local playback failed: {err}")
    log.exception("synthesis of %s failed", utt.id)
    return "failed", (p.E_SYNTHESIS, f"{type(err).__name__}: {err}")


class Engine:
    """Owns the model on its own thread.

    model_factory() runs on the engine thread and returns a loaded model (see
    nightingale.models.load_model). player is a playback.Player or None.
    """

    def __init__(self, model_factory: Callable[[], Any], listener: Listener, post: Post, player: Any = None, warmup: bool = True):
        self._factory = model_factory
        self._listener = listener
        self._post = post
        self.player = player
        self._warmup = warmup
        self._inbox: queue.Queue = queue.Queue()
        self._calls: collections.deque = collections.deque()
        self._thread = threading.Thread(target=self._main, name="nightingale-engine", daemon=True)
        self._voices: dict[str, Any] = {}
        self.model: Any = None
        self.info = EngineInfo()
        self.memory: dict = {}

    # ------------------------------------------------------------------ loop side (thread-safe)

    def start(self) -> None:
        self._thread.start()

    def submit(self, utt: Utterance) -> None:
        self._inbox.put(("utt", utt))

    def call(self, fn: Callable[[Any], Any], on_result: Callable[[Any, BaseException | None], None]) -> None:
        """Run fn(model) on the engine thread, between chunks if an utterance is running;
        on_result(value, error) is then posted to the loop."""
        self._calls.append((fn, on_result))
        self._inbox.put(("wake",))

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to end after the current utterance; True if it ended in time."""
        self._inbox.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread

    def _main(self) -> None:
        try:
            try:
                self._load()
            except BaseException as err:  # report any failure, then end the thread
                if not _user_fixable(err):  # the listener reports those, once and without a traceback
                    log.exception("model load failed")
                self._post(self._listener.on_load_failed, err)
                return
            self._post(self._listener.on_loaded, self.info)
            while True:
                item = self._inbox.get()
                if item[0] == "stop":
                    self._run_calls()
                    return
                if item[0] == "utt":
                    self._run_utterance(item[1])
                self._run_calls()
        finally:
            self._close_thread()

    def _close_thread(self) -> None:
        """Free the model and this thread's MLX streams. MLX streams belong to the thread
        that made them; left behind, their workers abort the process at exit."""
        self.model = None
        self._voices.clear()
        if "mlx.core" not in sys.modules:
            return
        try:
            import mlx.core as mx

            mx.synchronize()
            mx.clear_streams()
        except Exception as err:
            log.debug("releasing MLX streams failed: %s", err)

    def _load(self) -> None:
        t0 = time.monotonic()
        self.model = self._factory()
        self.info.load_s = time.monotonic() - t0
        self.info.sample_rate = int(getattr(self.model, "sample_rate", 24000))
        if self._warmup:
            t1 = time.monotonic()
            self.model.warmup()
            self.info.warmup_s = time.monotonic() - t1
            self._release_memory()
        try:
            self.info.describe = dict(self.model.describe())
        except Exception as err:
            log.warning("model.describe() failed: %s", err)
            self.info.describe = {}
        self.memory = memory_stats()

    def _run_calls(self) -> None:
        while self._calls:
            fn, on_result = self._calls.popleft()
            try:
                value, error = fn(self.model), None
            except Exception as err:
                value, error = None, err
            self._post(on_result, value, error)

    def _voice(self, name: str | None) -> Any:
        """Conditionals for a voice name or conds.pt path (None = model default), cached while
        the file behind it is unchanged: a removed or replaced voice is noticed at once."""
        if name is None:
            return None
        stamp = voice_file_stamp(name)
        cached = self._voices.get(name)
        if cached is None or cached[0] != stamp or stamp is None:
            try:
                self._voices[name] = (stamp, self.model.load_voice(name))
            except (KeyError, ValueError, FileNotFoundError) as err:
                self._voices.pop(name, None)
                msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise UnknownVoice(str(msg)) from None
        return self._voices[name][1]

    def _language(self, utt: Utterance) -> str | None:
        """The language to speak (asked, else the voice's, else English), checked with its
        front end loaded; UnsupportedLanguage otherwise. None for English-only models."""
        resolve = getattr(self.model, "resolve_language", None)
        if resolve is None:
            if utt.language not in (None, "en"):
                raise UnsupportedLanguage(f"unsupported language {utt.language!r}; supported: en")
            return None
        from nightingale.models.mtl_tokenizer import MissingFrontEndError, UnsupportedLanguageError

        try:
            language = resolve(utt.language, utt.voice)
            if language is not None:
                self.model.text_tokens("a", language)  # loads the language's front end
            return language
        except (UnsupportedLanguageError, MissingFrontEndError) as err:
            raise UnsupportedLanguage(str(err)) from None

    def _run_utterance(self, utt: Utterance) -> None:
        """Synthesize one utterance; whatever happens, the loop gets one on_generated."""
        if utt.cancelled.is_set():
            self._post(self._listener.on_generated, utt, "cancelled", {}, None)
            return
        run = RunStats(self.info.sample_rate)
        outcome, error = "completed", None
        try:
            self._synthesize(utt, run)
            if utt.cancelled.is_set():
                outcome = "cancelled"
        except Exception as err:
            outcome, error = _failure(utt, err)
        finally:
            if utt.plays and self.player is not None and run.played:
                if outcome == "completed":
                    self.player.end(utt)
                else:
                    self.player.flush(utt)
            stats = run.finish()
            self._release_memory()
            self.memory = memory_stats()
            self._post(self._listener.on_generated, utt, outcome, stats, error)

    def _synthesize(self, utt: Utterance, run: RunStats) -> None:
        language = self._language(utt)
        self._post(self._listener.on_started, utt, language)
        conds = self._voice(utt.voice)
        # One stream over the whole feed: the model splits the text (models/text.py),
        # seeds each segment and runs T3 ahead of S3Gen on its own thread; `cancel`
        # stops both at their next step. Options were checked against
        # protocol.SPEAK_OPTIONS, which every model family's stream() takes.
        kwargs = dict(utt.options, cancel=utt.cancelled)
        if language is not None:
            kwargs["language"] = language
        where = TextPlaces(utt.feed)
        gen = self.model.stream(where.runs(utt.feed.segments(utt.cancelled)), voice=conds, **kwargs)
        try:
            for chunk in gen:
                if utt.cancelled.is_set():
                    break
                samples = np.asarray(chunk.samples, dtype=np.float32).reshape(-1)
                if not len(samples):
                    continue
                self._deliver(utt, run, chunk, samples, where)
                self._run_calls()
                if utt.cancelled.is_set():
                    break
        finally:
            gen.close()

    def _deliver(self, utt: Utterance, run: RunStats, chunk: Any, samples: np.ndarray, where: TextPlaces) -> None:
        """One chunk (samples: (n,) float32) to the streaming client, the progress event,
        then the player (which blocks only when its buffer is full: paused, or far ahead)."""
        start_s = run.add(chunk, samples)
        sr = self.info.sample_rate
        if utt.streams:
            for off in range(0, len(samples), p.MAX_AUDIO_FRAME_SAMPLES):
                part = samples[off : off + p.MAX_AUDIO_FRAME_SAMPLES]
                self._post(self._listener.on_audio, utt, run.next_seq(), encode_pcm(part, utt.audio_format), start_s + off / sr)
        info = run.progress(chunk)
        info.update(where.describe(getattr(chunk, "text_start", None), getattr(chunk, "text_end", None)))
        self._post(self._listener.on_chunk, utt, info)
        if utt.plays and self.player is not None:
            run.blocked_s += self.player.write(utt, samples, utt.cancelled)
            run.played = True

    @staticmethod
    def _release_memory() -> None:
        # A long-lived process must give MLX's buffer cache back between utterances, or it
        # grows with the longest utterance seen; on glibc, freed heap pages also stay mapped
        # until trimmed (the resident size then drifts with allocation patterns).
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:
            pass
        if _malloc_trim is not None:
            _malloc_trim(0)
