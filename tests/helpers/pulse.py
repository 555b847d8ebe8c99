"""Real audio for tests: a private PulseAudio server with a null sink, and a recorder of
its monitor.

PortAudio (sounddevice) reaches PulseAudio through ALSA's pulse plugin, so whatever the
daemon plays to the default device lands in the null sink; `parec` records the sink's
monitor to a file. Each PulseNullSink runs its own server on its own socket and points
PULSE_SERVER at it (this process and every child inherit it), so tests never touch the
user's sound server or another test run's. Nothing here hangs: every external command has
a timeout, and a missing PulseAudio makes the fixture fail with the command that installs
it. Measured on CI-like machines (root, no sound card): no dbus or XDG_RUNTIME_DIR needed.
"""

from __future__ import annotations

import os
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



def _end_process(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` and wait; a process still there after 5 s is killed."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5.0)

class PulseUnavailable(RuntimeError):
    pass


class PulseNullSink:
    """A private PulseAudio server whose only (so default) sink is a null sink.

    start() launches it and sets PULSE_SERVER; stop() restores the environment and ends it.
    """

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.server: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._saved_server: str | None = None

    def start(self) -> "PulseNullSink":
        for tool in ("pulseaudio", "pactl", "parec"):
            if shutil.which(tool) is None:
                raise PulseUnavailable(f"{tool} is not installed; install it with: {_INSTALL_HINT}")
        # A short directory: the socket path must fit sockaddr_un.
        self.dir = Path(tempfile.mkdtemp(prefix="ngpa-", dir="/tmp"))
        self.server = f"unix:{self.dir / 'native'}"
        self._log = open(self.dir / "server.log", "w+")
        # -n: no default script (no hardware detection, no suspend-on-idle); as root
        # PulseAudio warns that it is meant for --system, but a user-mode server works.
        self._proc = subprocess.Popen(
            [
                "pulseaudio", "-n", "--daemonize=no", "--use-pid-file=no", "--exit-idle-time=-1", "--system=false",
                "-L", f"module-native-protocol-unix socket={self.dir / 'native'} auth-anonymous=1",
                "-L", f"module-null-sink sink_name={SINK} rate=48000",
            ],
            env={**os.environ, "PULSE_RUNTIME_PATH": str(self.dir)},
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10.0
        while not self._server_up():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                log = self._log.read()[-800:]
                self.stop()
                raise PulseUnavailable(f"PulseAudio did not start: {log}")
            time.sleep(0.05)
        self._saved_server = os.environ.get("PULSE_SERVER")
        os.environ["PULSE_SERVER"] = self.server
        return self

    def _server_up(self) -> bool:
        try:
            res = subprocess.run(
                ["pactl", "info"], capture_output=True, text=True, timeout=5.0, env={**os.environ, "PULSE_SERVER": self.server}
            )
        except (subprocess.TimeoutExpired, OSError):
            return False
        return res.returncode == 0 and f"Default Sink: {SINK}" in res.stdout

    def stop(self) -> None:
        if self.server is not None and os.environ.get("PULSE_SERVER") == self.server:
            if self._saved_server is None:
                os.environ.pop("PULSE_SERVER", None)
            else:
                os.environ["PULSE_SERVER"] = self._saved_server
        if self._proc is not None:
            _end_process(self._proc, signal.SIGTERM)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

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
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # stop() ends it with SIGINT
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
            _end_process(self._proc, signal.SIGINT)
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
    removed first, so a delayed stream still compares; exact zeros of the reference go too. The reference is then cut into
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
    # The same for the reference: its exact zeros (an utterance can start with ~20 ms of them)
    # cannot be found in a recording whose zeros were removed.
    reference = reference[np.abs(reference) > 1e-7]
    sound_ratio = len(compact) / max(1, len(reference))
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
