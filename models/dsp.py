"""Pure DSP for the S3Gen side of Chatterbox: windows, STFT/iSTFT, the S3Gen log-mel, the
output fade-in.

STFT and iSTFT follow torch.stft / torch.istft (onesided, unnormalised, window-square
normalisation in the inverse, centre padding and trimming), because the reference vocoder
and mel extractor are defined by those calls. Everything that runs per utterance is MLX;
the mel filterbank is built once in numpy (librosa's slaney formula, without librosa).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

S3GEN_SAMPLE_RATE = 24_000  # Hz, S3Gen's output and mel-input rate
S3GEN_N_FFT = 1920  # samples (80 ms at 24 kHz), also the window length
S3GEN_HOP = 480  # samples (20 ms): one mel frame
S3GEN_N_MELS = 80
S3GEN_FMIN = 0.0  # Hz
S3GEN_FMAX = 8000.0  # Hz
S3GEN_MAG_EPS = 1e-9  # added to |X|^2 before the square root (Matcha's mel)
S3GEN_LOG_FLOOR = 1e-5  # mel magnitude floor before the natural log

TRIM_SILENCE_SAMPLES = S3GEN_SAMPLE_RATE // 50  # 480 samples = 20 ms of zeros ...
TRIM_FADE_SAMPLES = S3GEN_SAMPLE_RATE // 50  # ... then a 20 ms raised-cosine fade-in

ISTFT_MIN_ENVELOPE = 1e-11  # torch.istft refuses windows whose overlap-add falls below this


def hann_window(n: int, periodic: bool = True) -> np.ndarray:
    """Hann window of length n, float32 (periodic = torch.hann_window / scipy fftbins=True)."""
    if n == 1:
        return np.ones(1, dtype=np.float32)
    denom = n if periodic else n - 1
    k = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / denom)).astype(np.float32)


def _full_window(window: np.ndarray | mx.array, n_fft: int) -> np.ndarray:
    """The window as float32 numpy, zero-padded on both sides to n_fft (torch does this for
    win_length < n_fft)."""
    w = np.asarray(window, dtype=np.float32)
    win_length = w.shape[0]
    if win_length > n_fft:
        raise ValueError(f"window length {win_length} exceeds n_fft {n_fft}")
    left = (n_fft - win_length) // 2
    return np.pad(w, (left, n_fft - win_length - left))


def frame_signal(x: mx.array, frame_length: int, hop: int) -> mx.array:
    """(B, L) -> (B, F, frame_length) frames at stride hop, F = 1 + (L - frame_length) // hop."""
    batch, length = x.shape
    if length < frame_length:
        raise ValueError(f"signal of {length} samples is shorter than one frame ({frame_length})")
    n_frames = 1 + (length - frame_length) // hop
    # A strided view over a contiguous copy, materialised by the consumer.
    return mx.as_strided(x, (batch, n_frames, frame_length), (length, hop, 1))


def overlap_add(frames: mx.array, hop: int) -> mx.array:
    """Overlap-add (B, F, K, C) frames at stride hop into (B, (F - 1) * hop + K, C).

    Written as R = ceil(K / hop) shifted sums of hop-long blocks, so it is a handful of
    dense ops (no scatter); the iSTFT and the transposed convolutions share it.
    """
    batch, n_frames, k, channels = frames.shape
    r = -(-k // hop)
    if r * hop != k:
        frames = mx.pad(frames, [(0, 0), (0, 0), (0, r * hop - k), (0, 0)])
    blocks = frames.reshape(batch, n_frames, r, hop, channels)
    out = None
    for i in range(r):
        # Block i of frame f lands in output block f + i.
        shifted = mx.pad(blocks[:, :, i], [(0, 0), (i, r - 1 - i), (0, 0), (0, 0)])
        out = shifted if out is None else out + shifted
    out = out.reshape(batch, (n_frames + r - 1) * hop, channels)
    return out[:, : (n_frames - 1) * hop + k]


def stft(
    x: mx.array,
    n_fft: int,
    hop: int,
    window: np.ndarray | mx.array,
    center: bool = True,
    pad_mode: str = "reflect",
) -> mx.array:
    """torch.stft(x, n_fft, hop, window=window, center, pad_mode, onesided=True, return_complex=True).

    x: (B, L) or (L,) float. Returns complex64 (B, n_fft // 2 + 1, F) (or without B), with
    F = 1 + L // hop when centred, else 1 + (L - n_fft) // hop.
    """
    squeeze = x.ndim == 1
    x = mx.array(x, dtype=mx.float32)
    if squeeze:
        x = x[None]
    if center:
        half = n_fft // 2
        x = mx.pad(x, [(0, 0), (half, half)], mode=pad_mode)
    frames = frame_signal(x, n_fft, hop) * mx.array(_full_window(window, n_fft))
    spec = mx.fft.rfft(frames, n=n_fft, axis=-1).transpose(0, 2, 1)  # (B, bins, F)
    return spec[0] if squeeze else spec


@functools.lru_cache(maxsize=32)
def _istft_envelope(window_bytes: bytes, n_fft: int, hop: int, n_frames: int) -> np.ndarray:
    """Overlap-added window^2 for n_frames frames, (n_fft + hop * (n_frames - 1),) float32."""
    r = -(-n_fft // hop)
    w2 = np.zeros(r * hop, dtype=np.float64)
    w2[:n_fft] = np.frombuffer(window_bytes, dtype=np.float32).astype(np.float64) ** 2
    env = np.zeros((n_frames + r - 1) * hop, dtype=np.float64)
    for i in range(r):
        # Block i of every frame: consecutive frames put it in consecutive hop-long slots.
        env[i * hop : (i + n_frames) * hop] += np.tile(w2[i * hop : (i + 1) * hop], n_frames)
    env = env[: n_fft + hop * (n_frames - 1)].astype(np.float32)
    env.flags.writeable = False
    return env


def istft(
    spec: mx.array,
    n_fft: int,
    hop: int,
    window: np.ndarray | mx.array,
    center: bool = True,
    length: int | None = None,
) -> mx.array:
    """torch.istft(spec, n_fft, hop, window=window, center, length) for a onesided spectrum.

    spec: complex (B, n_fft // 2 + 1, F) (or without B). Returns float32 (B, L) with
    L = hop * (F - 1) when centred and no length is given. As torch's C2R transform, the
    imaginary parts of the DC and Nyquist bins are ignored.
    """
    squeeze = spec.ndim == 2
    if squeeze:
        spec = spec[None]
    batch, n_bins, n_frames = spec.shape
    if n_bins != n_fft // 2 + 1:
        raise ValueError(f"expected {n_fft // 2 + 1} frequency bins, got {n_bins}")
    win = _full_window(window, n_fft)
    # C2R semantics (torch, numpy): the DC and Nyquist bins' imaginary parts do not count.
    # Zeroed here so the result does not depend on how a backend's irfft treats them.
    imag_mask = np.ones((n_bins, 1), dtype=np.float32)
    imag_mask[0] = 0.0
    if n_fft % 2 == 0:
        imag_mask[-1] = 0.0
    spec = mx.real(spec) + 1j * (mx.imag(spec) * mx.array(imag_mask))
    frames = mx.fft.irfft(spec.transpose(0, 2, 1), n=n_fft, axis=-1) * mx.array(win)  # (B, F, n_fft)
    y = overlap_add(frames[..., None], hop)[..., 0]  # (B, n_fft + hop * (F - 1))
    expected = y.shape[1]

    start = n_fft // 2 if center else 0
    if length is not None:
        end = start + length
    else:
        end = expected - n_fft // 2 if center else expected
    end = min(end, expected)
    envelope = _istft_envelope(win.tobytes(), n_fft, hop, n_frames)[start:end]
    if envelope.size and float(np.abs(envelope).min()) <= ISTFT_MIN_ENVELOPE:
        raise ValueError("window overlap-add falls to zero (NOLA violated); torch.istft refuses this too")
    y = y[:, start:end] / mx.array(envelope)
    if length is not None and y.shape[1] < length:
        y = mx.pad(y, [(0, 0), (0, length - y.shape[1])])
    return y[0] if squeeze else y


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3  # Hz per mel in the linear part
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mels = hz / f_sp
    log_region = hz >= min_log_hz
    mels = np.where(log_region, min_log_mel + np.log(np.maximum(hz, 1e-30) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    hz = f_sp * mels
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), hz)


@functools.lru_cache(maxsize=8)
def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) with htk=False, norm="slaney".

    Returns float32 (n_mels, n_fft // 2 + 1), read-only (it is cached). Computed in float64
    and cast at the same two points librosa casts, so the values agree to the last bit or two.
    """
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)  # Hz
    mel_points = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    mel_f = _mel_to_hz_slaney(mel_points)  # band edges in Hz
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:n_mels] / fdiff[:n_mels, None]
    upper = ramps[2 : n_mels + 2] / fdiff[1 : n_mels + 1, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])  # slaney: constant area per band
    weights = (weights * enorm[:, None]).astype(np.float32)
    weights.flags.writeable = False
    return weights


def s3gen_mel_spectrogram(wav: mx.array | np.ndarray) -> mx.array:
    """S3Gen's log-mel (the reference's utils/mel.py, Matcha style) of 24 kHz audio.

    wav: (L,) or (B, L) float at 24 kHz. Returns (B, 80, L // 480) float32: reflect-pad 720
    samples each side, uncentred STFT (n_fft 1920, hop 480, periodic Hann), magnitude
    sqrt(re^2 + im^2 + 1e-9), slaney mel (0-8 kHz), natural log of max(x, 1e-5).
    """
    x = mx.array(wav, dtype=mx.float32)
    if x.ndim == 1:
        x = x[None]
    pad = (S3GEN_N_FFT - S3GEN_HOP) // 2  # 720 samples
    x = mx.pad(x, [(0, 0), (pad, pad)], mode="reflect")
    spec = stft(x, S3GEN_N_FFT, S3GEN_HOP, hann_window(S3GEN_N_FFT), center=False)  # (B, 961, T)
    magnitude = mx.sqrt(mx.real(spec) ** 2 + mx.imag(spec) ** 2 + S3GEN_MAG_EPS)
    fb = mx.array(mel_filters(S3GEN_SAMPLE_RATE, S3GEN_N_FFT, S3GEN_N_MELS, S3GEN_FMIN, S3GEN_FMAX))
    mel = fb @ magnitude  # (B, 80, T)
    return mx.log(mx.maximum(mel, S3GEN_LOG_FLOOR))


def trim_fade() -> np.ndarray:
    """The reference's output fade, (960,) float32: 480 zeros, then (cos(linspace(pi, 0, 480)) + 1) / 2."""
    fade = np.zeros(TRIM_SILENCE_SAMPLES + TRIM_FADE_SAMPLES, dtype=np.float32)
    ramp = np.linspace(np.pi, 0.0, TRIM_FADE_SAMPLES, dtype=np.float64)
    fade[TRIM_SILENCE_SAMPLES:] = ((np.cos(ramp) + 1.0) / 2.0).astype(np.float32)
    return fade


def apply_trim_fade(wav: mx.array) -> mx.array:
    """Multiply trim_fade() onto the first 960 samples of wav (B, L) or (L,).

    The reference does this to every S3Gen output to hide spill-over from the reference
    clip. A waveform shorter than the fade gets the fade's first L samples (the reference
    crashes there instead).
    """
    fade = trim_fade()
    n = min(fade.shape[0], wav.shape[-1])
    gain = mx.concatenate([mx.array(fade[:n]), mx.ones(wav.shape[-1] - n, dtype=mx.float32)])
    return wav * gain
