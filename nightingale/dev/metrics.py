"""Fidelity measures shared by tests and benchmarks (numpy only)."""

from __future__ import annotations

import numpy as np

LSD_N_FFT = 1024
LSD_HOP = 256
LSD_FLOOR = 1e-8


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - est|^2); inf when identical."""
    reference = np.asarray(reference, dtype=np.float64)
    err = np.sum((reference - np.asarray(estimate, dtype=np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(reference**2) / err))


def log_spectral_distance(reference: np.ndarray, estimate: np.ndarray, n_fft: int = LSD_N_FFT, hop: int = LSD_HOP) -> float:
    """Mean over frames of the RMS (over bins) difference of log10 power spectra, in dB."""
    a, b = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (reference, estimate))
    n = min(len(a), len(b))
    if n < n_fft:
        raise ValueError("signals shorter than one analysis frame")
    window = np.hanning(n_fft)
    starts = range(0, n - n_fft + 1, hop)
    frames_a = np.stack([a[s : s + n_fft] * window for s in starts])
    frames_b = np.stack([b[s : s + n_fft] * window for s in starts])
    pa = np.abs(np.fft.rfft(frames_a, axis=1)) ** 2 + LSD_FLOOR
    pb = np.abs(np.fft.rfft(frames_b, axis=1)) ** 2 + LSD_FLOOR
    diff = 10 * np.log10(pa) - 10 * np.log10(pb)
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=1))))


def largest_jump(samples: np.ndarray, positions: list[int] | None = None) -> float:
    """Largest |x[n] - x[n-1]| at the given sample positions (all positions when None)."""
    x = np.asarray(samples, dtype=np.float64)
    d = np.abs(np.diff(x))
    if positions is None:
        return float(d.max(initial=0.0))
    picks = [d[p - 1] for p in positions if 0 < p < len(x)]
    return float(max(picks, default=0.0))
