"""Local playback through PortAudio (sounddevice): the one player behind the daemon's
speakers (daemon/playback.py builds on it), `nsay -r` / `nsay -a` and `nightingale synth --play`.

Samples are queued in pieces tagged with a key (an utterance); the PortAudio callback copies
them out, so a writer never waits for the device. When the queue runs dry while a key is
open (written, not yet ended), that is an underrun: it is counted once per dry spell and
silence is played. pause() holds the queue (silence out, nothing dropped). The stream
opens when the first audio is queued (or `prebuffer_s` of it) and is stopped with
Pa_StopStream, which returns once the device has played its buffers, so no tail is cut.

Imported by nsay only on the paths that play locally: numpy loads here, sounddevice (which
probes the audio system, ~0.1 s) only when a stream opens.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np

log = logging.getLogger(__name__)

# Output latency asked of PortAudio. CoreAudio runs the callback on a real-time thread, so
# its "high" default (a few tens of ms) is safe. PortAudio's ALSA path (to PulseAudio) runs
# it on an ordinary thread: under CPU load 35 ms underran constantly and 100 ms did not.
DEFAULT_LATENCY: float | str = "high" if sys.platform == "darwin" else 0.1
FADE_S = 0.005  # fade applied when a cancel cuts audio mid-sample stream (no click)


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


def output_devices() -> list[tuple[int, str, bool]]:
    """(index, "name (host API)", is_default) for every device with output channels."""
    import sounddevice as sd

    default_out = sd.default.device[1]
    hostapis = sd.query_hostapis()
    out = []
    for index, dev in enumerate(sd.query_devices()):
        if dev["max_output_channels"] > 0:
            api = hostapis[dev["hostapi"]]["name"]
            out.append((index, f"{dev['name']} ({api})", index == default_out))
    return out


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


class AudioPlayer:
    """Plays mono float32 samples, queued per key, through one PortAudio output stream.

    sample_rate: the rate of the samples written; stream_rate: the device's, when it differs
    (each key is resampled on its own). latency: PortAudio's output latency (seconds, or
    "high"/"low"); the block size is PortAudio's choice (fixed small blocks under CPU load
    gave ALSA underruns). Thread use: any thread writes; the callback runs on PortAudio's
    thread and takes the lock only to copy samples.
    """

    def __init__(
        self,
        sample_rate: int,
        device: Any = None,
        *,
        device_name: str | None = None,
        stream_rate: int | None = None,
        latency: float | str = DEFAULT_LATENCY,
        prebuffer_s: float = 0.0,
    ):
        self.sample_rate = sample_rate
        self.device = device  # what sounddevice accepts (index or name), None = default
        self.device_name = device_name or ("default" if device is None else str(device))
        self.stream_rate = stream_rate or sample_rate
        self.latency = latency
        self.prebuffer = int(prebuffer_s * self.stream_rate)  # samples queued before the stream starts

        self._lock = threading.Condition()
        self._items: collections.deque[_Piece | _End] = collections.deque()
        self._buffered = 0  # unplayed samples at stream_rate
        self._open_keys: set[Hashable] = set()  # written, not yet ended: dry buffer = underrun
        self._key_underruns: dict[Hashable, int] = collections.defaultdict(int)
        self._paused = False
        self._dry = False
        self._last_audio = time.monotonic()
        self._resamplers: dict[Hashable, Any] = {}
        self._closing = False

        self.underruns = 0  # buffer ran dry mid-utterance
        self.xruns = 0  # PortAudio reported an output underflow
        self.latency_s = 0.0  # the latency PortAudio granted
        self._stream: Any = None
        self._running = False
        self._stream_lock = threading.Lock()  # open/start/close (never held by the callback)

    # ------------------------------------------------------------------ writers

    def write(self, key: Hashable, samples: np.ndarray) -> None:
        """Queue float32 mono samples (at sample_rate) for `key`; never blocks on the device."""
        samples = self._to_stream_rate(key, samples)
        with self._lock:
            self._append(key, samples)
            ready = self._buffered >= self.prebuffer
        if ready:
            self._ensure_stream()

    def end(self, key: Hashable) -> None:
        """No more audio for `key`: what is queued plays out (prebuffered or not)."""
        tail = self._to_stream_rate(key, np.zeros(0, np.float32), last=True)
        with self._lock:
            if len(tail):
                self._items.append(_Piece(key, tail))
                self._buffered += len(tail)
            self._open_keys.discard(key)
            self._items.append(_End(key))
            self._lock.notify_all()
        self._ensure_stream()

    def _append(self, key: Hashable, samples: np.ndarray) -> None:
        """Called with the lock held: queue samples already at stream_rate."""
        self._open_keys.add(key)
        if len(samples):
            self._items.append(_Piece(key, samples))
            self._buffered += len(samples)
        self._last_audio = time.monotonic()

    def _to_stream_rate(self, key: Hashable, samples: np.ndarray, last: bool = False) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.stream_rate == self.sample_rate:
            return samples
        import soxr

        rs = self._resamplers.get(key)
        if rs is None:
            rs = self._resamplers[key] = soxr.ResampleStream(self.sample_rate, self.stream_rate, 1, dtype="float32")
        out = rs.resample_chunk(samples, last=last)
        if last:
            del self._resamplers[key]
        return np.asarray(out, dtype=np.float32).reshape(-1)

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

    def flush(self, key: Hashable) -> None:
        """Drop `key`'s unplayed audio now (a cancel), with a short fade if it is playing."""
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
            self._key_underruns.pop(key, None)
            self._resamplers.pop(key, None)
            self._lock.notify_all()

    # ------------------------------------------------------------------ ending

    def finish(self) -> None:
        """No more audio: play out everything queued, then close the stream."""
        with self._lock:
            keys = list(self._open_keys)
        for key in keys:
            self.end(key)
        with self._lock:
            while self._items and not self._closing:
                self._lock.wait(0.1)
        self.close()

    def abort(self) -> None:
        """Stop now: the queue is dropped and the stream closed without playing out."""
        with self._lock:
            self._items.clear()
            self._buffered = 0
            self._closing = True
            self._lock.notify_all()
        self._close_stream(drain=False)

    def close(self) -> None:
        """Take no more audio and close the stream; the blocks PortAudio already holds are
        heard, the queue is not (finish() plays it out first)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
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
                    self._ended(item.key, filled, time_info)
                    continue
                n = min(frames - filled, len(item.samples) - item.pos)
                out[filled : filled + n] = item.samples[item.pos : item.pos + n]
                item.pos += n
                filled += n
                if item.pos >= len(item.samples):
                    items.popleft()
            # A lone end marker right after the block's last sample: report it now too.
            while items and isinstance(items[0], _End):
                self._ended(items.popleft().key, filled, time_info)
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

    def _ended(self, key: Hashable, offset: int, time_info: Any) -> None:
        """Called with the lock held when the last sample of `key` sits `offset` frames into
        the block being played (time_info: PortAudio's times of that block)."""

    # ------------------------------------------------------------------ stream lifecycle

    def open(self) -> None:
        """Open the output stream now, so a bad device is reported before any audio is
        queued (it starts with the audio). Raises PlaybackError."""
        with self._stream_lock:
            if self._stream is None:
                self._stream = self._new_stream()

    def _ensure_stream(self) -> None:
        """Open the output stream if it is closed, and start it."""
        with self._stream_lock:
            if self._closing or self._running:
                return
            if self._stream is None:
                self._stream = self._new_stream()
            try:
                self._stream.start()
            except Exception as err:  # sounddevice.PortAudioError: the device went away
                self._stream, stream = None, self._stream
                stream.close()
                raise PlaybackError(f"cannot open audio output {self.device_name!r}: {err}") from None
            self._running = True

    def _new_stream(self) -> Any:
        import sounddevice as sd

        try:
            stream = sd.OutputStream(
                samplerate=self.stream_rate,
                channels=1,
                dtype="float32",
                device=self.device,
                callback=self._callback,
                latency=self.latency,
            )
        except (sd.PortAudioError, ValueError) as err:
            raise PlaybackError(f"cannot open audio output {self.device_name!r}: {err}") from None
        self.latency_s = float(stream.latency)
        log.info("audio output open: %s at %d Hz, latency %.0f ms", self.device_name, self.stream_rate, self.latency_s * 1e3)
        return stream

    def _close_stream(self, drain: bool = True) -> None:
        """Stop (drain: once the device has played its buffers) and close the stream."""
        with self._stream_lock:
            stream, self._stream = self._stream, None
            running, self._running = self._running, False
        if stream is None:
            return
        try:
            if running:
                stream.stop() if drain else stream.abort()
            stream.close()
        except Exception as err:  # a vanished device must not take the caller down
            # Expected when aborting (a device that went away); news when draining.
            (log.warning if drain else log.debug)("closing the audio output failed: %s", err)
        log.info("audio output closed")
