"""Real audio for tests: a PulseAudio server with a null sink, and a recorder of its monitor.

PortAudio (sounddevice) reaches PulseAudio through ALSA's pulse plugin, so whatever the
daemon plays to the default device lands in the null sink; `parec` records the sink's
monitor to a file. Nothing here hangs: every external command has a timeout, and a missing
PulseAudio makes the fixture fail with the command that would install it. This set-up was
measured on CI-like machines (root, no sound card): no dbus or XDG_RUNTIME_DIR is needed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SINK = "nightingale_test"
RECORD_RATE = 24000  # Hz: the model's rate, so recordings compare sample for sample
PASSBAND_HZ = 7000.0  # compared band: PulseAudio's resampling round trip is transparent below it
_INSTALL_HINT = "apt-get install -y --no-install-recommends libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins"


class PulseUnavailable(RuntimeError):
    pass


def _run(args: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _server_up() -> bool:
    try:
        return _run(["pactl", "info"], timeout=5.0).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


class PulseNullSink:
    """Start (or reuse) a PulseAudio server and make a null sink its default.

    stop() unloads the sink and, if this object started the server, kills it.
    """

    def __init__(self) -> None:
        self.started_server = False
        self.module: str | None = None
        self.previous_default: str | None = None

    def start(self) -> "PulseNullSink":
        for tool in ("pulseaudio", "pactl", "parec"):
            if shutil.which(tool) is None:
                raise PulseUnavailable(f"{tool} is not installed; install it with: {_INSTALL_HINT}")
        if not _server_up():
            # As root PulseAudio warns that it is meant for --system, but a user-mode
            # server works and needs no dbus or XDG_RUNTIME_DIR.
            # The daemonized server inherits stdout/stderr: a file, never a pipe we wait on.
            with tempfile.TemporaryFile("w+") as log:
                try:
                    subprocess.run(
                        ["pulseaudio", "-D", "--exit-idle-time=-1", "--system=false"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=20.0,
                    )  # fmt: skip
                except subprocess.TimeoutExpired:
                    raise PulseUnavailable("`pulseaudio -D` did not return within 20 s") from None
                self.started_server = True
                deadline = time.monotonic() + 10.0
                while not _server_up():
                    if time.monotonic() > deadline:
                        log.seek(0)
                        raise PulseUnavailable(f"PulseAudio did not come up within 10 s: {log.read()[-500:]}")
                    time.sleep(0.1)
        info = _run(["pactl", "info"]).stdout
        for line in info.splitlines():
            if line.startswith("Default Sink:"):
                self.previous_default = line.split(":", 1)[1].strip()
        res = _run(["pactl", "load-module", "module-null-sink", f"sink_name={SINK}", "rate=48000"])
        if res.returncode != 0:
            raise PulseUnavailable(f"could not create the null sink: {res.stderr.strip()}")
        self.module = res.stdout.strip()
        _run(["pactl", "set-default-sink", SINK])
        return self

    def stop(self) -> None:
        if self.module is not None:
            _run(["pactl", "unload-module", self.module])
            self.module = None
        if self.previous_default and self.previous_default != SINK and not self.started_server:
            _run(["pactl", "set-default-sink", self.previous_default])
        if self.started_server:
            try:
                _run(["pulseaudio", "-k"], timeout=10.0)
            except subprocess.TimeoutExpired:
                pass
            self.started_server = False

    def recorder(self, path: Path) -> "MonitorRecorder":
        return MonitorRecorder(path)


class MonitorRecorder:
    """parec of the null sink's monitor into a file (float32, mono, 24 kHz).

    Into a file, not a pipe: an unread pipe stalls parec at 64 KiB. A small latency makes
    parec deliver promptly instead of buffering seconds and dropping them at exit.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._proc: subprocess.Popen | None = None

    def start(self) -> "MonitorRecorder":
        self._file = open(self.path, "wb")
        self._proc = subprocess.Popen(
            [
                "parec",
                f"--device={SINK}.monitor",
                "--format=float32le",
                f"--rate={RECORD_RATE}",
                "--channels=1",
                "--raw",
                "--latency-msec=20",
            ],
            stdout=self._file,
            stderr=subprocess.PIPE,
        )
        # parec is ready once it has written its first bytes (silence from the monitor is
        # only delivered while something plays, so wait on the process being alive instead).
        time.sleep(0.2)
        if self._proc.poll() is not None:
            err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            raise PulseUnavailable(f"parec exited at once: {err.strip()}")
        return self

    def stop(self) -> np.ndarray:
        """End the recording; the samples recorded (float32, RECORD_RATE)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5.0)
            self._proc = None
            self._file.close()
        return np.fromfile(self.path, dtype="<f4")

    def __enter__(self) -> "MonitorRecorder":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self.stop()


def best_alignment(recorded: np.ndarray, reference: np.ndarray) -> tuple[int, float, float]:
    """Where `reference` best matches `recorded`: (lag, corr, overlap).

    lag: index in `recorded` of the reference's first sample (negative when the recording
    starts after the reference does); corr: normalized correlation over the overlapping part
    (1.0 = same shape); overlap: the fraction of the reference that overlaps the recording.
    """
    na, nb = len(recorded), len(reference)
    size = 1 << (na + nb - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(recorded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.concatenate([np.arange(0, na), np.arange(-(nb - 1), 0)])
    values = np.concatenate([xc[:na], xc[size - (nb - 1) :]]) if nb > 1 else xc[:na]
    lag = int(lags[int(np.argmax(np.abs(values)))])
    a0, b0 = max(0, lag), max(0, -lag)
    n = min(na - a0, nb - b0)
    seg, ref = recorded[a0 : a0 + n], reference[b0 : b0 + n]
    denom = float(np.linalg.norm(seg) * np.linalg.norm(ref)) or 1.0
    return lag, float(np.dot(seg, ref) / denom), n / max(1, nb)


def active_span(samples: np.ndarray, threshold: float = 1e-3, rate: int = RECORD_RATE) -> tuple[int, int]:
    """[start, end) of the region where |samples| exceeds threshold (found by level, not
    by wall time: the monitor only delivers data while something plays)."""
    idx = np.flatnonzero(np.abs(samples) > threshold)
    if len(idx) == 0:
        return 0, 0
    return int(idx[0]), int(idx[-1]) + 1


def lowpass(x: np.ndarray, cutoff_hz: float, rate: int = RECORD_RATE) -> np.ndarray:
    """Zero-phase brick-wall low-pass (FFT); both sides of a comparison get the same one."""
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(len(x), 1.0 / rate) > cutoff_hz] = 0.0
    return np.fft.irfft(spec, len(x)).astype(np.float32)


def compare_playback(recorded: np.ndarray, reference: np.ndarray, block_s: float = 0.05, min_corr: float = 0.9) -> dict:
    """How well a recording of the sink's monitor reproduces `reference` (same rate).

    Silence that PulseAudio inserts when a client is late (exact zeros in the recording) is
    removed first, so a delayed stream still compares. The reference is then cut into
    `block_s` blocks and each is looked up in the recording: a block counts as played when
    its waveform (below PASSBAND_HZ) is found whole, with normalized correlation >= min_corr.
    Returns matched (fraction of blocks found), in_order (found blocks appear in reference
    order), tail (the last block was found: the end was not cut), sound_ratio (sounding
    samples recorded / in the reference), corr (of the whole, at its best lag) and gaps
    (inserted silences >= 10 ms).
    """
    silent = np.abs(recorded) <= 1e-7
    s, e = active_span(recorded, threshold=1e-7)
    runs = np.diff(np.concatenate([[0], silent[s:e].astype(np.int8), [0]]))
    gaps = int(np.count_nonzero(np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1) >= RECORD_RATE // 100))
    compact = recorded[s:e][~silent[s:e]]
    ref_sounding = int(np.count_nonzero(np.abs(reference) > 1e-7))
    sound_ratio = len(compact) / max(1, ref_sounding)
    # Compare the band PulseAudio's resampling keeps intact: the tiny random model puts most
    # of its energy near 12 kHz, which the 24k -> 48k -> 24k round trip attenuates.
    compact, reference = lowpass(compact, PASSBAND_HZ), lowpass(reference, PASSBAND_HZ)
    _, corr, _ = best_alignment(compact, reference)
    n = int(block_s * RECORD_RATE)
    found: list[int | None] = []
    for off in range(0, len(reference) - n + 1, n):
        lag, c, overlap = best_alignment(compact, reference[off : off + n])
        found.append(lag if c >= min_corr and overlap >= 0.99 else None)
    hits = [f for f in found if f is not None]
    return {
        "matched": len(hits) / max(1, len(found)),
        "in_order": all(b > a for a, b in zip(hits, hits[1:])),
        "tail": bool(found) and found[-1] is not None,
        "sound_ratio": sound_ratio,
        "corr": corr,
        "gaps": gaps,
    }
