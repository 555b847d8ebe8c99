"""Streaming encoders for the HTTP front end: float32 chunks in, container bytes out.

`pcm`, `wav` and `opus` leave as the audio is produced: raw s16le; a WAV header whose sizes
say "unknown" (0xFFFFFFFF, as OpenAI's own streamed WAV does) followed by s16le; Ogg Opus
pages as libsndfile fills them. `flac` and `mp3` are encoded by libsndfile too, but their
encoders go back to the start of the file when it closes (FLAC's STREAMINFO totals, the
LAME/Xing tag of MP3), and a stream sent without that rewrite is misread by common decoders
(libsndfile itself stops early), so those two leave as one complete file at the end.
"""

from __future__ import annotations

import io
import struct

import numpy as np

# response_format -> (content type, streams as produced)
FORMATS: dict[str, tuple[str, bool]] = {
    "pcm": ("audio/pcm", True),
    "wav": ("audio/wav", True),
    "opus": ("audio/ogg", True),
    "flac": ("audio/flac", False),
    "mp3": ("audio/mpeg", False),
}
_SOUNDFILE = {"opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}


def s16(samples: np.ndarray) -> np.ndarray:
    """float32 -> int16 exactly as the daemon's s16le stream (engine.encode_pcm) rounds."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


def s16le(samples: np.ndarray) -> bytes:
    return s16(samples).tobytes()


def wav_header(sample_rate: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte PCM16 mono WAV header; the default sizes mean "until the end of the stream"."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_bytes)


class _Sink:
    """A seekable in-memory file for libsndfile that hands out each byte once, as soon as
    it is written (rewrites of bytes already handed out are dropped)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._sent = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)
        end = self._pos + len(data)
        if end > len(self._buf):
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[self._pos : end] = data
        self._pos = end
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._buf))[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out = bytes(self._buf[self._sent :])
        self._sent = len(self._buf)
        return out


class Encoder:
    """push(float32 samples) -> bytes ready to send; finish() -> the rest."""

    def __init__(self, fmt: str, sample_rate: int):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.format = fmt
        self.content_type, self.streams = FORMATS[fmt]
        self.sample_rate = sample_rate
        self._header_sent = False
        self._file = None
        self._sink: _Sink | io.BytesIO | None = None
        if fmt in _SOUNDFILE:
            import soundfile as sf

            container, subtype = _SOUNDFILE[fmt]
            self._sink = _Sink() if self.streams else io.BytesIO()
            self._file = sf.SoundFile(self._sink, "w", sample_rate, 1, format=container, subtype=subtype)

    def push(self, samples: np.ndarray) -> bytes:
        if self._file is not None:
            if len(samples):
                self._file.write(s16(samples))  # the same integers as pcm/wav: FLAC is exact
            if isinstance(self._sink, _Sink):
                self._file.flush()
                return self._sink.take()
            return b""
        out = s16le(samples)
        if self.format == "wav" and not self._header_sent:
            self._header_sent = True
            out = wav_header(self.sample_rate) + out
        return out

    def finish(self) -> bytes:
        if self._file is not None:
            self._file.close()
            sink = self._sink
            return sink.take() if isinstance(sink, _Sink) else sink.getvalue()
        return self.push(np.zeros(0, np.float32)) if not self._header_sent and self.format == "wav" else b""

    def close(self) -> None:
        """Release the encoder without producing output (a request that failed)."""
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except Exception:
                pass
