"""What `status` reports: counters, the recent utterances' timings (percentiles), memory,
and the loaded model in one line."""

from __future__ import annotations

import collections
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from nightingale import __version__
from nightingale import protocol as p

if TYPE_CHECKING:
    from .engine import EngineInfo
    from .scheduler import Scheduler

HISTORY = 50  # utterances kept for status metrics
COUNTERS = ("accepted", "completed", "cancelled", "preempted", "failed", "errors", "connections")
MODEL_LINE_CHARS = 300


def process_rss_mb() -> float | None:
    """Resident memory of this process in MB (Linux /proc, macOS proc_pidinfo)."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        if sys.platform == "darwin":
            import ctypes

            libc = ctypes.CDLL("/usr/lib/libproc.dylib")
            buf = (ctypes.c_uint64 * 12)()  # struct proc_taskinfo: virtual, resident, ...
            n = libc.proc_pidinfo(os.getpid(), 4, ctypes.c_uint64(0), buf, ctypes.sizeof(buf))  # PROC_PIDTASKINFO
            if n >= 16:
                return buf[1] / (1 << 20)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    except Exception:
        return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))], 3)


def plain(value: Any) -> Any:
    """A msgpack-safe copy of a describe() value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)


def model_line(info: EngineInfo | None) -> str:
    """The model's describe() scalars as "key=value, ..." ("" while loading)."""
    if info is None:
        return ""
    d = info.describe
    parts = [f"{k}={v}" for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None]
    return ", ".join(parts)[:MODEL_LINE_CHARS]


class Telemetry:
    """Counters and the timings of the last HISTORY completed utterances; status() is the
    snapshot the `status` request answers with."""

    def __init__(self, socket: str):
        self.socket = socket
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._history: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self._underruns_total = 0
        self._started_at = time.monotonic()

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def add_underruns(self, n: int) -> None:
        self._underruns_total += n

    def record(self, reason: str, done: p.Done) -> None:
        """One utterance ended (its `done`); completed ones join the timing history."""
        self.count(reason)
        if reason == "completed":
            self._history.append(
                {
                    "ttfa_ms": done.ttfa_ms,
                    "first_audio_ms": done.first_audio_ms,
                    "rtf": done.rtf,
                    "t3_tokens_per_s": done.t3_tokens_per_s,
                    "s3gen_ms_per_chunk": done.s3gen_ms_per_chunk,
                }
            )

    def _metrics(self) -> dict:
        hist = list(self._history)

        def series(key: str, pcts: tuple[int, ...] = (50,)) -> dict:
            vals = [h[key] for h in hist if h.get(key) is not None]
            out: dict[str, Any] = {"last": vals[-1] if vals else None}
            for q in pcts:
                out[f"p{q}"] = percentile(vals, q)
            return out

        return {
            "utterances": len(hist),
            "ttfa_ms": series("ttfa_ms", (50, 95)),
            "first_audio_ms": series("first_audio_ms", (50, 95)),
            "rtf": series("rtf"),
            "t3_tokens_per_s": series("t3_tokens_per_s"),
            "s3gen_ms_per_chunk": series("s3gen_ms_per_chunk"),
            "underruns": self._underruns_total,
        }

    def status(self, scheduler: Scheduler, ref: str | None = None) -> p.Status:
        now = time.monotonic()
        info = scheduler.info
        model: dict[str, Any] = {}
        if info is not None:
            model = plain(info.describe)
            model.update(sample_rate=info.sample_rate, load_s=round(info.load_s, 2), warmup_s=round(info.warmup_s, 2))
        if scheduler.player is not None:
            playback = scheduler.player.stats()
        else:
            playback = {"available": False, "reason": scheduler.playback_reason, "device": None, "active": False,
                        "buffered_s": 0.0, "underruns": 0}
        memory: dict[str, Any] = {"rss_mb": None if (r := process_rss_mb()) is None else round(r, 1)}
        if scheduler.engine is not None:
            memory.update(scheduler.engine.memory)
        running = scheduler.running
        current = running if running is not None and not running.finished else None
        return p.Status(
            state=scheduler.state,
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(now - self._started_at, 3),
            socket=self.socket,
            model=model,
            queue_depth=len(scheduler.queue),
            queue=[u.describe(now) for u in scheduler.queue],
            current=current.describe(now) if current else None,
            paused=scheduler.paused,
            playback=playback,
            clients=len(scheduler.peers),
            metrics=self._metrics(),
            memory=memory,
            counters=dict(self.counters),
            ref=ref,
        )
