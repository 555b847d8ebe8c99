"""VoiceEncoder: the 256-d speaker embedding T3 is conditioned on (ve.safetensors).

A 3-layer LSTM over 40-bin *linear power* mel frames of 16 kHz audio, after a 20 dB
silence trim. The utterance is cut into 1.6 s partials every 77 frames; each partial's last
hidden state goes through proj + ReLU + L2 norm, and the partial embeddings are averaged and
normalised again (reference: chatterbox/models/voice_encoder/). The front end is numpy and
reproduces librosa.effects.trim and librosa.stft without librosa.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import Config
from .dsp import hann_window, mel_filters, stft

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz
LSTM_LAYERS = 3  # fixed in the reference (nn.LSTM(..., num_layers=3))
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms -> 100 frames/s
FMAX = 8000.0
PARTIAL_FRAMES = 160  # ve_partial_frames: 1.6 s per partial
PARTIAL_RATE = 1.3  # partials per second ("Resemble's default"), gives a 77-frame step
MIN_COVERAGE = 0.8  # a last, shorter partial counts if it covers 80% of a window
TRIM_TOP_DB = 20.0  # librosa.effects.trim(top_db=20)
TRIM_FRAME = 2048  # librosa.effects.trim defaults
TRIM_HOP = 512


@dataclass
class VoiceEncoderConfig(Config):
    num_mels: int = 40
    ve_hidden_size: int = 256
    speaker_embed_size: int = 256

    @classmethod
    def full(cls) -> "VoiceEncoderConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "VoiceEncoderConfig":
        # The embedding stays 256 wide: T3's spkr_enc expects it.
        return cls(ve_hidden_size=64)


def upstream_shapes(cfg: VoiceEncoderConfig) -> dict[str, tuple[int, ...]]:
    """The 16 tensors of ve.safetensors (torch layout)."""
    h, gates = cfg.ve_hidden_size, 4 * cfg.ve_hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LSTM_LAYERS):
        shapes[f"lstm.weight_ih_l{layer}"] = (gates, cfg.num_mels if layer == 0 else h)
        shapes[f"lstm.weight_hh_l{layer}"] = (gates, h)
        shapes[f"lstm.bias_ih_l{layer}"] = (gates,)
        shapes[f"lstm.bias_hh_l{layer}"] = (gates,)
    shapes["proj.weight"] = (cfg.speaker_embed_size, h)
    shapes["proj.bias"] = (cfg.speaker_embed_size,)
    shapes["similarity_weight"] = (1,)
    shapes["similarity_bias"] = (1,)
    return shapes


def convert_weights(weights: dict[str, np.ndarray], cfg: VoiceEncoderConfig) -> dict[str, mx.array]:
    """ve.safetensors -> VoiceEncoder parameters. The names are the same (LSTM weights keep
    torch's (4H, in) layout and gate order i, f, g, o); only the dtype is fixed to float32."""
    expected = upstream_shapes(cfg)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ValueError(f"VoiceEncoder weights do not match the config: missing {missing}, unexpected {extra}")
    out = {}
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"VoiceEncoder weight {key}: shape {tuple(weights[key].shape)}, expected {shape}")
        out[key] = mx.array(np.asarray(weights[key], dtype=np.float32))
    return out


class LSTM(nn.Module):
    """torch.nn.LSTM(batch_first=True) inference, with torch's parameter names and layout."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            setattr(self, f"weight_ih_l{layer}", mx.zeros((4 * hidden_size, in_size)))
            setattr(self, f"weight_hh_l{layer}", mx.zeros((4 * hidden_size, hidden_size)))
            setattr(self, f"bias_ih_l{layer}", mx.zeros((4 * hidden_size,)))
            setattr(self, f"bias_hh_l{layer}", mx.zeros((4 * hidden_size,)))

    def __call__(self, x: mx.array) -> mx.array:
        """x: (B, T, input_size) -> final hidden state of the last layer, (B, hidden_size)."""
        batch, steps, _ = x.shape
        hs = self.hidden_size
        for layer in range(self.num_layers):
            w_hh_t = getattr(self, f"weight_hh_l{layer}").T
            # The input projection of every step at once; only h @ W_hh is sequential.
            x_proj = x @ getattr(self, f"weight_ih_l{layer}").T + (
                getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")
            )  # (B, T, 4H)
            h = mx.zeros((batch, hs), dtype=x.dtype)
            c = mx.zeros((batch, hs), dtype=x.dtype)
            outputs = []
            for t in range(steps):
                gates = x_proj[:, t] + h @ w_hh_t
                i, f, g, o = (gates[:, k * hs : (k + 1) * hs] for k in range(4))  # torch order i, f, g, o
                c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
                h = mx.sigmoid(o) * mx.tanh(c)
                outputs.append(h)
            x = mx.stack(outputs, axis=1)  # (B, T, H), the next layer's input
            mx.eval(x)  # keep the lazy graph one layer deep
        return x[:, -1]


class VoiceEncoder(nn.Module):
    def __init__(self, cfg: VoiceEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.lstm = LSTM(cfg.num_mels, cfg.ve_hidden_size, LSTM_LAYERS)
        self.proj = nn.Linear(cfg.ve_hidden_size, cfg.speaker_embed_size)
        # Used only for training (GE2E similarity); kept so loading consumes every key.
        self.similarity_weight = mx.zeros((1,))
        self.similarity_bias = mx.zeros((1,))

    def __call__(self, mels: mx.array) -> mx.array:
        """Partial embeddings. mels: (B, 160, num_mels) linear power mel -> (B, E), unit norm, >= 0."""
        raw = nn.relu(self.proj(self.lstm(mels)))  # ve_final_relu
        return raw / mx.linalg.norm(raw, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Front end


def trim_silence(wav: np.ndarray, top_db: float = TRIM_TOP_DB) -> tuple[np.ndarray, tuple[int, int]]:
    """librosa.effects.trim(wav, top_db): drop leading/trailing frames more than top_db below
    the loudest frame's RMS (2048-sample frames, 512 hop, zero-padded centred framing).

    wav: (N,) float32 -> (wav[start:end], (start, end)). Computed in float32 like librosa, so
    the frame decisions agree with it.
    """
    wav = np.asarray(wav, dtype=np.float32)
    padded = np.pad(wav, TRIM_FRAME // 2)
    n_frames = 1 + (padded.shape[0] - TRIM_FRAME) // TRIM_HOP
    # Frames along axis 0 of a (frame_length, n_frames) view, as librosa.util.frame lays them out.
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(TRIM_FRAME, n_frames), strides=(padded.strides[0], padded.strides[0] * TRIM_HOP), writeable=False
    )
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float32), axis=0, keepdims=True))[0]  # (n_frames,)
    # amplitude_to_db(rms, ref=np.max, amin=1e-5, top_db=None), in power terms.
    ref_power = np.square(np.max(rms))
    db = 10.0 * np.log10(np.maximum(np.float32(1e-10), np.square(rms)))
    db -= 10.0 * np.log10(np.maximum(np.float32(1e-10), ref_power))
    nonzero = np.flatnonzero(db > -top_db)
    if nonzero.size == 0:
        return wav[:0], (0, 0)
    start = int(nonzero[0] * TRIM_HOP)
    end = min(wav.shape[0], int((nonzero[-1] + 1) * TRIM_HOP))
    return wav[start:end], (start, end)


def mel_spectrogram(wav: np.ndarray, num_mels: int = 40) -> np.ndarray:
    """The VoiceEncoder mel: |STFT|^2 (n_fft 400, hop 160, centred, reflect) through a slaney
    40-bin filterbank (0-8 kHz). No log. wav: (N,) at 16 kHz -> (1 + N // 160, num_mels) float32."""
    spec = stft(mx.array(wav, dtype=mx.float32), N_FFT, HOP, hann_window(N_FFT))  # (201, frames)
    power = mx.real(spec) ** 2 + mx.imag(spec) ** 2
    mel = mx.array(mel_filters(SAMPLE_RATE, N_FFT, num_mels, 0.0, FMAX)) @ power  # (num_mels, frames)
    return np.array(mel.T)


def frame_step(rate: float = PARTIAL_RATE) -> int:
    """Frames between partial starts: round((16000 / rate) / 160) = 77 at rate 1.3. The
    reference divides the samples per partial by ve_partial_frames where the hop is meant;
    both are 160, so the result is the same."""
    return int(np.round((SAMPLE_RATE / rate) / PARTIAL_FRAMES))


def partials(mel: np.ndarray, rate: float = PARTIAL_RATE, min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """Overlapping 160-frame windows of an utterance mel (get_num_wins + stride_as_partials).

    mel: (T, M) -> (n, 160, M) float32; the mel is zero-padded (or cut) to 160 + step*(n-1).
    """
    if mel.shape[0] == 0:
        raise ValueError("empty mel")
    step = frame_step(rate)
    n_wins, remainder = divmod(max(mel.shape[0] - PARTIAL_FRAMES + step, 0), step)
    if n_wins == 0 or (remainder + (PARTIAL_FRAMES - step)) / PARTIAL_FRAMES >= min_coverage:
        n_wins += 1
    target = PARTIAL_FRAMES + step * (n_wins - 1)
    mel = mel[:target] if mel.shape[0] >= target else np.pad(mel, ((0, target - mel.shape[0]), (0, 0)))
    starts = np.arange(n_wins) * step
    return np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts]).astype(np.float32)


def embed_utterance(ve: VoiceEncoder, wav16: np.ndarray, batch_size: int = 32) -> mx.array:
    """Speaker embedding of one 16 kHz utterance, as ve.embeds_from_wavs([wav], 16000) followed
    by tts.py's mean over utterances. wav16: (N,) -> (1, E), unit norm."""
    trimmed, _ = trim_silence(wav16)
    if trimmed.shape[0] == 0:
        raise ValueError("nothing left after trimming silence")
    mels = partials(mel_spectrogram(trimmed, ve.cfg.num_mels))
    embeds = [ve(mx.array(mels[i : i + batch_size])) for i in range(0, mels.shape[0], batch_size)]
    mean = mx.mean(mx.concatenate(embeds, axis=0), axis=0, keepdims=True)  # (1, E)
    return mean / mx.linalg.norm(mean, axis=1, keepdims=True)
