"""Pitch-preserving time-stretch of a mono audio stream (WSOLA), for `nsay -r WPM`.

WSOLA (waveform-similarity overlap-add, Verhelst & Roelands 1993): output frames are laid
down every `hop` samples; the matching input frame is taken near `speed * hop` further on,
shifted by up to `tolerance` samples so that it lines up with the natural continuation of
the previous frame (maximum normalised cross-correlation). Pitch is untouched because every
frame is copied, never resampled. The stretcher is stateful so chunks can be fed as they
stream in: the output is the same whatever the chunk sizes.

Numpy only, and imported by nothing on nsay's plain path (numpy costs ~250 ms to import).
"""

from __future__ import annotations

import numpy as np

FRAME_MS = 40.0  # long enough to hold two pitch periods of a low voice (~60 Hz)
TOLERANCE_MS = 10.0  # search range for the best-aligned frame: covers one pitch period down to 100 Hz


class TimeStretcher:
    """Streaming WSOLA time-stretch.

    `speed` > 1 shortens (faster speech), < 1 lengthens. Feed float32 mono chunks to
    `push` (shape (n,)), each call returns the output that is final so far (shape (m,));
    `flush` returns the rest, so that the total output length is round(n_in / speed).
    """

    def __init__(self, speed: float, sample_rate: int):
        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"speed must be within 0.25..4 (got {speed})")
        self.speed = float(speed)
        self.frame = 2 * max(8, round(sample_rate * FRAME_MS / 2000.0))  # even, so hop = frame / 2
        self.hop = self.frame // 2  # synthesis hop; 50 % overlap
        self.tolerance = max(1, round(sample_rate * TOLERANCE_MS / 1000.0))
        # Periodic Hann: at 50 % overlap the windows sum to exactly 1, so no gain ripple.
        n = np.arange(self.frame)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * n / self.frame)).astype(np.float32)
        # The input is seen with `hop` zeros in front, so the first real sample is already
        # at full window weight; the first `hop` output samples (silence) are dropped.
        self._buf = np.zeros(self.hop, dtype=np.float32)
        self._buf_start = 0  # absolute (padded) index of _buf[0]
        self._frames = 0  # frames laid down so far
        self._prev = 0  # padded input position of the last frame
        self._acc = np.zeros(self.frame, dtype=np.float32)  # overlap-add accumulator
        self._skip = self.hop
        self._n_in = 0
        self._n_out = 0
        self._done = False

    @property
    def passthrough(self) -> bool:
        return self.speed == 1.0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add input (n,) float32; returns the output that no later input can change."""
        if self._done:
            raise RuntimeError("push after flush")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._n_in += samples.size
        if self.passthrough:
            self._n_out += samples.size
            return samples
        self._buf = np.concatenate([self._buf, samples])
        return self._run(final=False)

    def flush(self) -> np.ndarray:
        """The remaining output; afterwards the stretcher is spent."""
        if self._done:
            return np.zeros(0, dtype=np.float32)
        self._done = True
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        return self._run(final=True)

    def _slice(self, start: int, length: int) -> np.ndarray:
        """Input [start, start+length) in padded coordinates, zeros past the end (at flush)."""
        lo = start - self._buf_start
        chunk = self._buf[lo : lo + length]
        if chunk.size < length:
            chunk = np.concatenate([chunk, np.zeros(length - chunk.size, dtype=np.float32)])
        return chunk

    def _best_position(self, nominal: int) -> int:
        """Input position within `tolerance` of `nominal` whose start best continues the
        previous frame (normalised cross-correlation over the overlap)."""
        overlap = self.frame - self.hop
        template = self._slice(self._prev + self.hop, overlap)
        lo = max(nominal - self.tolerance, self._buf_start)
        hi = nominal + self.tolerance
        region = self._slice(lo, hi - lo + overlap)
        corr = np.correlate(region, template, mode="valid")  # (hi - lo + 1,)
        # Energy of each candidate window, so loud stretches do not win by loudness alone.
        sq = np.concatenate([[0.0], np.cumsum(region.astype(np.float64) ** 2)])
        energy = sq[overlap:] - sq[:-overlap]
        score = corr / np.sqrt(energy + 1e-9)
        return lo + int(np.argmax(score))

    def _run(self, final: bool) -> np.ndarray:
        out: list[np.ndarray] = []
        target = round(self._n_in / self.speed) if final else None
        analysis_hop = self.hop * self.speed
        while True:
            if final and self._n_out >= target:
                break
            nominal = round(self._frames * analysis_hop)
            if not final and nominal + self.tolerance + self.frame > self._buf_start + self._buf.size:
                break  # not enough input yet to search and copy this frame
            pos = 0 if self._frames == 0 else self._best_position(nominal)
            self._acc += self._slice(pos, self.frame) * self.window
            block = self._acc[: self.hop].copy()
            self._acc = np.concatenate([self._acc[self.hop :], np.zeros(self.hop, dtype=np.float32)])
            self._prev = pos
            self._frames += 1
            if self._skip:
                block, self._skip = block[self._skip :], max(0, self._skip - block.size)
            out.append(block)
            self._n_out += block.size
            # Keep only what the next search can still reach.
            keep_from = min(round(self._frames * analysis_hop) - self.tolerance, self._prev + self.hop)
            drop = keep_from - self._buf_start
            if drop > 0:
                self._buf = self._buf[drop:]
                self._buf_start += drop
        result = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        if final:
            excess = self._n_out - target
            if excess > 0:
                result = result[: result.size - excess]
                self._n_out = target
        return result
