"""The daemon's local playback: utterances played one after another, each reported once heard.

nightingale/playback.py's AudioPlayer does the stream, the queue and the underrun counts;
this layer adds what the daemon needs on top of it. The engine thread write()s each chunk
as soon as it is synthesized (so the first chunk plays at once) and is held back when
synthesis runs far ahead of playback (backpressure). end(key) marks an utterance's last
sample; `on_played(key)` fires once that sample has left the speakers (output latency
waited out), so the utterance's `done` means "heard" and closing the stream never cuts a
tail. flush(key) drops one utterance's audio at once (cancel). The stream opens on the
first write and closes after a short idle time, so an idle daemon holds no audio device.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Hashable

import numpy as np

from nightingale.playback import DEFAULT_LATENCY, AudioPlayer, ProbeResult

log = logging.getLogger(__name__)

MAX_BUFFER_S = 10.0  # write() blocks beyond this much unplayed audio (backpressure)
IDLE_CLOSE_S = 2.0  # close the output stream after this long with nothing to play
TAIL_PAD_S = 0.05  # extra wait after the DAC time of the last sample before "played"
_WAIT_S = 0.05  # poll interval of blocked writers (they re-check cancellation)


class Player(AudioPlayer):
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
        super().__init__(
            sample_rate,
            probe.device,
            device_name=probe.device_name,
            stream_rate=probe.samplerate or sample_rate,
            latency=DEFAULT_LATENCY if latency is None else latency,
        )
        self.on_played = on_played
        self.max_buffer_s = max_buffer_s
        self.idle_close_s = idle_close_s
        self._played: list[tuple[float, Hashable]] = []  # (monotonic deadline, key)
        self._manager = threading.Thread(target=self._manage, name="nightingale-playback", daemon=True)
        self._manager.start()

    # ------------------------------------------------------------------ engine side

    def write(self, key: Hashable, samples: np.ndarray, cancelled: threading.Event | None = None) -> float:
        """Queue float32 mono samples (model rate) for `key`; returns seconds spent
        blocked because the buffer was full (while paused, or synthesis ahead of playback)."""
        samples = self._to_stream_rate(key, samples)
        limit = int(self.max_buffer_s * self.stream_rate)
        with self._lock:
            t0 = time.monotonic()
            while self._buffered > limit and not (cancelled is not None and cancelled.is_set()) and not self._closing:
                self._lock.wait(_WAIT_S)
            blocked = time.monotonic() - t0
            if cancelled is not None and cancelled.is_set():
                return blocked
            self._append(key, samples)
        self._ensure_stream()
        return blocked

    # ------------------------------------------------------------------ loop side

    def flush(self, key: Hashable) -> None:
        """Drop `key`'s unplayed audio now; its on_played will not fire."""
        with self._lock:  # reentrant: the base takes it too
            super().flush(key)
            self._played = [(t, k) for t, k in self._played if k != key]

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
        super().close()

    # ------------------------------------------------------------------ played reports

    def _ended(self, key: Hashable, offset: int, time_info: Any) -> None:
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
