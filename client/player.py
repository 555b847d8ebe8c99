"""Local playback for `nsay -r` / `nsay -a`: audio streamed back from the daemon, played by
nsay itself through PortAudio (sounddevice), on the default or a chosen output device.

The daemon sends audio faster than real time and cancels a client that stops reading, so
samples are queued here without blocking and the PortAudio callback drains the queue.
Imported only on those paths (sounddevice probes the audio system, ~0.1 s).
"""

from __future__ import annotations

import threading

PREBUFFER_S = 0.3  # wait for this much audio before starting, so a slow first chunk does not stutter


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


class LocalPlayer:
    """Plays mono float32 samples as they are pushed; `finish` returns once they have been
    heard, `abort` stops at once."""

    def __init__(self, device: int | str | None, sample_rate: int):
        import sounddevice as sd

        self.sample_rate = sample_rate
        self._buf = bytearray()  # float32 little-endian samples not yet handed to PortAudio
        self._lock = threading.Lock()
        self._started = False
        self._ended = False
        self._drained = threading.Event()
        self.underruns = 0
        try:
            self._stream = sd.RawOutputStream(
                samplerate=sample_rate, channels=1, dtype="float32", device=device, callback=self._callback
            )
        except (ValueError, sd.PortAudioError) as err:
            raise RuntimeError(f"cannot open audio device {device!r}: {err}") from None
        self._prebuffer_bytes = int(PREBUFFER_S * sample_rate) * 4

    def _callback(self, outdata, frames: int, time_info, status) -> None:
        want = frames * 4
        with self._lock:
            chunk = bytes(self._buf[:want])
            del self._buf[:want]
            empty = not self._buf
            ended = self._ended
        outdata[: len(chunk)] = chunk
        if len(chunk) < want:
            outdata[len(chunk) :] = bytes(want - len(chunk))
            if not ended:
                self.underruns += 1
        if ended and empty:
            self._drained.set()

    def push(self, samples) -> None:
        """Queue (n,) float32 samples in -1..1."""
        data = samples.astype("<f4", copy=False).tobytes()
        with self._lock:
            self._buf += data
            ready = len(self._buf) >= self._prebuffer_bytes
        if ready and not self._started:
            self._started = True
            self._stream.start()

    def finish(self) -> None:
        """No more samples: play out what is queued, then close."""
        with self._lock:
            self._ended = True
            pending = bool(self._buf)
        if pending or not self._started:
            if not self._started:
                self._started = True
                self._stream.start()
            self._drained.wait()
        # stop() (Pa_StopStream) returns after the device has played its buffers, so the
        # last samples are heard rather than cut off.
        self._stream.stop()
        self._stream.close()

    def abort(self) -> None:
        with self._lock:
            self._buf.clear()
            self._ended = True
        try:
            self._stream.abort()
            self._stream.close()
        except Exception:  # stopping a stream that never started, or a device that vanished
            pass
