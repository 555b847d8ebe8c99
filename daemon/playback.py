"""Local playback: a jitter buffer drained by a sounddevice (PortAudio) output callback.

The engine thread write()s each chunk as soon as it is synthesized, so the first chunk
plays at once; the PortAudio callback copies from the buffer. When the buffer runs dry in
the middle of an utterance, that is an underrun: it is counted and silence is played.
end(key) marks an utterance's last sample; `on_played(key)` fires once that sample has
left the speakers (output latency waited out), so the utterance's `done` means "heard"
and closing the stream never cuts a tail. pause() holds the buffer (silence out, nothing
dropped); flush(key) drops one utterance's audio at once (cancel). The stream opens on the
first write and closes after a short idle time, so an idle daemon holds no audio device.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import numpy as np

log = logging.getLogger(__name__)

MAX_BUFFER_S = 10.0  # write() blocks beyond this much unplayed audio (backpressure)
IDLE_CLOSE_S = 2.0  # close the output stream after this long with nothing to play
TAIL_PAD_S = 0.05  # extra wait after the DAC time of the last sample before "played"
FADE_S = 0.005  # fade applied when a cancel cuts audio mid-sample stream (no click)
_WAIT_S = 0.05  # poll interval of blocked writers (they re-check cancellation)
# Output latency asked of PortAudio. CoreAudio runs the callback on a real-time thread, so
# its "high" default (a few tens of ms) is safe. PortAudio's ALSA path (to PulseAudio) runs
# it on an ordinary thread: under CPU load 35 ms underran constantly and 100 ms did not.
DEFAULT_LATENCY: float | str = "high" if sys.platform == "darwin" else 0.1


class DeviceNotFound(ValueError):
    """The output device named by --device does not exist."""


class PlaybackError(RuntimeError):
    """The output stream could not be opened (e.g. the device went away)."""


@dataclass
class ProbeResult:
    available: bool
    reason: str = ""
    device: Any = None  # what sounddevice accepts (index or name), None = default
    device_name: str = ""
    samplerate: int = 0  # rate the stream will run at


def probe_output(device: str | int | None, sample_rate: int) -> ProbeResult:
    """Find out whether local playback can work, without opening a stream.

    Raises DeviceNotFound when `device` was named and does not exist (a user error);
    returns available=False with a reason when there is no audio output at all.
    """
    try:
        import sounddevice as sd
    except OSError as err:  # PortAudio library missing
        return ProbeResult(False, f"PortAudio is not available ({err})")
    try:
        info = sd.query_devices(device, kind="output")
    except (ValueError, sd.PortAudioError) as err:
        if device is not None:
            names = [f"{d['index']}: {d['name']}" for d in sd.query_devices() if d["max_output_channels"] > 0]
            raise DeviceNotFound(
                f"audio output device {device!r} not found ({err}); outputs: {'; '.join(names) or 'none'}"
            ) from None
        return ProbeResult(False, f"no audio output device ({err})")
    rate = sample_rate
    try:
        sd.check_output_settings(device=info["index"], channels=1, dtype="float32", samplerate=rate)
    except Exception:
        # The device cannot run at the model's rate: run at its own and resample.
        rate = int(info["default_samplerate"])
        try:
            sd.check_output_settings(device=info["index"], channels=1, dtype="float32", samplerate=rate)
        except Exception as err:
            return ProbeResult(False, f"output device {info['name']!r} rejects mono float32 ({err})")
    return ProbeResult(True, "", info["index"], info["name"], rate)


class _Piece:
    __slots__ = ("key", "samples", "pos")

    def __init__(self, key: Hashable, samples: np.ndarray):
        self.key = key
        self.samples = samples
        self.pos = 0


class _End:
    __slots__ = ("key",)

    def __init__(self, key: Hashable):
        self.key = key


class Player:
    """Plays utterances one after another through one output stream.

    Thread use: write/end come from the engine thread; flush/pause/resume/stats from the
    event loop; the callback runs on PortAudio's thread; a small manager thread reports
    played utterances and closes the idle stream. `on_played(key, underruns)` is called on
    the manager thread.
    """

    def __init__(
        self,
        sample_rate: int,
        probe: ProbeResult,
        on_played: Callable[[Hashable, int], None] | None = None,
        max_buffer_s: float = MAX_BUFFER_S,
        idle_close_s: float = IDLE_CLOSE_S,
        latency: float | str | None = None,
    ):
        if not probe.available:
            raise ValueError(f"playback unavailable: {probe.reason}")
        self.sample_rate = sample_rate
        self.device = probe.device
        self.device_name = probe.device_name
        self.stream_rate = probe.samplerate or sample_rate
        self.on_played = on_played
        self.max_buffer_s = max_buffer_s
        self.idle_close_s = idle_close_s
        self.latency = DEFAULT_LATENCY if latency is None else latency

        self._lock = threading.Condition()
        self._items: collections.deque[_Piece | _End] = collections.deque()
        self._buffered = 0  # unplayed samples at stream_rate
        self._open_keys: set[Hashable] = set()  # written, not yet ended: dry buffer = underrun
        self._key_underruns: dict[Hashable, int] = collections.defaultdict(int)
        self._played: list[tuple[float, Hashable]] = []  # (monotonic deadline, key)
        self._paused = False
        self._dry = False
        self._last_audio = time.monotonic()
        self._resamplers: dict[Hashable, Any] = {}

        self.underruns = 0  # buffer ran dry mid-utterance
        self.xruns = 0  # PortAudio reported an output underflow
        self.latency_s = 0.0
        self._stream: Any = None
        self._stream_lock = threading.Lock()  # open/close (never held by the callback)
        self._closing = False
        self._manager = threading.Thread(target=self._manage, name="nightingale-playback", daemon=True)
        self._manager.start()

    # ------------------------------------------------------------------ engine side

    def write(self, key: Hashable, samples: np.ndarray, cancelled: threading.Event | None = None) -> float:
        """Queue float32 mono samples (model rate) for `key`; returns seconds spent
        blocked because the buffer was full (while paused, or synthesis ahead of playback)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.stream_rate != self.sample_rate:
            samples = self._resample(key, samples, last=False)
        blocked = 0.0
        limit = int(self.max_buffer_s * self.stream_rate)
        with self._lock:
            t0 = time.monotonic()
            while self._buffered > limit and not (cancelled is not None and cancelled.is_set()) and not self._closing:
                self._lock.wait(_WAIT_S)
            blocked = time.monotonic() - t0
            if cancelled is not None and cancelled.is_set():
                return blocked
            self._open_keys.add(key)
            if len(samples):
                self._items.append(_Piece(key, samples))
                self._buffered += len(samples)
            self._last_audio = time.monotonic()
        self._ensure_stream()
        return blocked

    def end(self, key: Hashable) -> None:
        """No more audio for `key`: on_played(key) fires once its last sample is heard."""
        tail = self._resample(key, np.zeros(0, np.float32), last=True) if self.stream_rate != self.sample_rate else None
        with self._lock:
            if tail is not None and len(tail):
                self._items.append(_Piece(key, tail))
                self._buffered += len(tail)
            self._open_keys.discard(key)
            self._items.append(_End(key))
            self._lock.notify_all()
        self._ensure_stream()

    def _resample(self, key: Hashable, samples: np.ndarray, last: bool) -> np.ndarray:
        import soxr

        rs = self._resamplers.get(key)
        if rs is None:
            rs = self._resamplers[key] = soxr.ResampleStream(self.sample_rate, self.stream_rate, 1, dtype="float32")
        out = rs.resample_chunk(samples, last=last)
        if last:
            del self._resamplers[key]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    # ------------------------------------------------------------------ loop side

    def flush(self, key: Hashable) -> None:
        """Drop `key`'s unplayed audio now; its on_played will not fire."""
        fade_n = int(FADE_S * self.stream_rate)
        with self._lock:
            kept: collections.deque[_Piece | _End] = collections.deque()
            for i, item in enumerate(self._items):
                if item.key != key:
                    kept.append(item)
                elif i == 0 and isinstance(item, _Piece) and item.pos > 0:
                    # Mid-playback: end with a short fade instead of a click.
                    rest = item.samples[item.pos : item.pos + fade_n]
                    faded = rest * np.linspace(1.0, 0.0, len(rest), dtype=np.float32)
                    kept.append(_Piece(key, faded))
            self._items = kept
            self._buffered = sum(len(i.samples) - i.pos for i in kept if isinstance(i, _Piece))
            self._open_keys.discard(key)
            self._played = [(t, k) for t, k in self._played if k != key]
            self._key_underruns.pop(key, None)
            self._resamplers.pop(key, None)
            self._lock.notify_all()

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._last_audio = time.monotonic()
            self._lock.notify_all()
        if self._items:
            self._ensure_stream()

    @property
    def paused(self) -> bool:
        return self._paused

    def stats(self) -> dict:
        with self._lock:
            return {
                "available": True,
                "reason": "",
                "device": self.device_name,
                "active": self._stream is not None,
                "buffered_s": round(self._buffered / self.stream_rate, 3),
                "underruns": self.underruns,
                "xruns": self.xruns,
                "latency_ms": round(self.latency_s * 1000.0, 1),
                "stream_rate": self.stream_rate,
            }

    def close(self) -> None:
        """Stop the manager and the stream (after the audio already queued has played,
        but not longer than the output latency plus a pad)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._manager.join(timeout=5.0)
        self._close_stream()

    # ------------------------------------------------------------------ PortAudio side

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status.output_underflow:
            self.xruns += 1
        out = outdata[:, 0]
        with self._lock:
            if self._paused:
                outdata.fill(0.0)
                return
            filled = 0
            items = self._items
            while filled < frames and items:
                item = items[0]
                if isinstance(item, _End):
                    items.popleft()
                    self._schedule_played(item.key, filled, time_info)
                    continue
                n = min(frames - filled, len(item.samples) - item.pos)
                out[filled : filled + n] = item.samples[item.pos : item.pos + n]
                item.pos += n
                filled += n
                if item.pos >= len(item.samples):
                    items.popleft()
            # A lone end marker right after the block's last sample: report it now too.
            while items and isinstance(items[0], _End):
                self._schedule_played(items.popleft().key, filled, time_info)
            self._buffered -= filled
            if filled < frames:
                out[filled:] = 0.0
                # Count each dry spell once, not every silent block inside it.
                if self._open_keys and not self._dry:
                    self.underruns += 1
                    for key in self._open_keys:
                        self._key_underruns[key] += 1
                self._dry = bool(self._open_keys)
            else:
                self._dry = False
            if filled:
                self._last_audio = time.monotonic()
            self._lock.notify_all()

    def _schedule_played(self, key: Hashable, offset: int, time_info: Any) -> None:
        """Called with the lock held: the last sample of `key` sits `offset` frames into
        this block; it is heard at the block's DAC time plus offset."""
        delay = self.latency_s
        try:
            dac = time_info.outputBufferDacTime - time_info.currentTime
            if 0.0 < dac < 2.0:
                delay = dac
        except Exception:
            pass
        self._played.append((time.monotonic() + delay + offset / self.stream_rate + TAIL_PAD_S, key))

    # ------------------------------------------------------------------ stream lifecycle

    def _ensure_stream(self) -> None:
        with self._stream_lock:
            if self._stream is not None or self._closing:
                return
            import sounddevice as sd

            try:
                # Default blocksize (0): fixed small blocks under CPU load gave ALSA underruns.
                stream = sd.OutputStream(
                    samplerate=self.stream_rate,
                    channels=1,
                    dtype="float32",
                    device=self.device,
                    callback=self._callback,
                    latency=self.latency,
                )
                stream.start()
            except (sd.PortAudioError, ValueError) as err:
                raise PlaybackError(f"cannot open audio output {self.device_name!r}: {err}") from None
            self.latency_s = float(stream.latency)
            self._stream = stream
            log.info(
                "audio output open: %s at %d Hz, latency %.0f ms", self.device_name, self.stream_rate, self.latency_s * 1e3
            )

    def _close_stream(self) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
                stream.close()
            except Exception as err:  # a vanished device must not take the daemon down
                log.warning("closing the audio output failed: %s", err)
            log.info("audio output closed")

    def _manage(self) -> None:
        """Report played utterances at their deadlines; close the stream when idle."""
        while True:
            due: list[Hashable] = []
            close = False
            with self._lock:
                if self._closing and not self._played:
                    return
                now = time.monotonic()
                due = [k for t, k in self._played if t <= now]
                self._played = [(t, k) for t, k in self._played if t > now]
                idle = not self._items and not self._open_keys and not self._played
                if idle and self._stream is not None and now - self._last_audio > self.idle_close_s:
                    close = True
                if not due and not close:
                    waits = [t - now for t, _ in self._played]
                    self._lock.wait(min([0.25, *waits]) if waits else 0.25)
                    if not self._closing or self._played:
                        continue
            for key in due:
                underruns = self._key_underruns.pop(key, 0)
                if self.on_played is not None:
                    try:
                        self.on_played(key, underruns)
                    except Exception:
                        log.exception("on_played callback failed")
            if close:
                self._close_stream()
