"""S3Tokenizer v2 (speech_tokenizer_v2_25hz): 16 kHz audio -> speech tokens at 25 Hz.

Whisper-style log-mel (128 bins, 100 frames/s), two stride-2 convolutions (25 Hz), then
blocks of FSMN attention (RoPE on q/k, a depthwise-conv memory on v added after `out`) and
an MLP, no final LayerNorm; an FSQ head rounds 8 tanh projections to {-1, 0, 1} and reads
them as a base-3 number (dimension 0 least significant), giving ids 0..6560.
Reference: s3tokenizer 0.3.0 model_v2.py and chatterbox/models/s3tokenizer/s3tokenizer.py.
Weights live in s3gen.safetensors under `tokenizer.`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import Config
from .convert import conv1d_from_torch
from .dsp import hann_window, mel_filters, stft

logger = logging.getLogger(__name__)

S3_SR = 16_000  # Hz: the tokenizer's input rate (also CAMPPlus' and the VoiceEncoder's)
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms: 100 mel frames/s, 4 per token
MEL_FRAMES_PER_TOKEN = 4
LOG_FLOOR = 1e-10  # clamp before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum (80 dB)
# s3tokenizer 0.3.0 (what `pip install s3tokenizer` gives the reference) uses torch's default
# 1e-5 for both LayerNorms of a block; releases up to 0.2.0 used 1e-6 (and an MLX peer port
# follows those). Parity here is with 0.3.0.
LAYER_NORM_EPS = 1e-5
FSMN_KERNEL = 31  # depthwise memory conv, padded 15 / 15
ROPE_DIM = 64  # precompute_freqs_cis(64, ...): fixed, so head_dim must be 64
ROPE_THETA = 10000.0
FSQ_DIMS = 8
FSQ_SCALE = 0.9990000128746033  # float32(0.999), as written in the reference
CODEBOOK_SIZE = 3**FSQ_DIMS  # 6561
MAX_MEL_FRAMES = 3000  # 30 s; longer input takes the reference's sliding-window path (not ported)

# Buffers the reference registers but tolerates missing from s3gen.safetensors
# (S3Tokenizer.ignore_state_dict_missing); both are recomputable from librosa/torch.
OPTIONAL_KEYS = ("_mel_filters", "window")


@dataclass
class S3TokenizerConfig(Config):
    n_mels: int = 128
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 6

    @classmethod
    def full(cls) -> "S3TokenizerConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "S3TokenizerConfig":
        return cls(n_audio_state=128, n_audio_head=2, n_audio_layer=2)  # head_dim stays 64 (RoPE)

    def __post_init__(self) -> None:
        if self.n_audio_state // self.n_audio_head != ROPE_DIM or self.n_audio_state % self.n_audio_head:
            raise ValueError(f"S3Tokenizer head_dim must be {ROPE_DIM} (state {self.n_audio_state}, heads {self.n_audio_head})")


def upstream_shapes(cfg: S3TokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Every `tokenizer.` key that must be in s3gen.safetensors (relative, torch layout).
    The two optional buffers are in OPTIONAL_KEYS."""
    s = cfg.n_audio_state
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.conv1.weight": (s, cfg.n_mels, 3),
        "encoder.conv1.bias": (s,),
        "encoder.conv2.weight": (s, s, 3),
        "encoder.conv2.bias": (s,),
    }
    for i in range(cfg.n_audio_layer):
        p = f"encoder.blocks.{i}."
        for name in ("query", "value", "out"):
            shapes[p + f"attn.{name}.weight"] = (s, s)
            shapes[p + f"attn.{name}.bias"] = (s,)
        shapes[p + "attn.key.weight"] = (s, s)  # no bias
        shapes[p + "attn.fsmn_block.weight"] = (s, 1, FSMN_KERNEL)
        for ln in ("attn_ln", "mlp_ln"):
            shapes[p + f"{ln}.weight"] = (s,)
            shapes[p + f"{ln}.bias"] = (s,)
        shapes[p + "mlp.0.weight"] = (4 * s, s)
        shapes[p + "mlp.0.bias"] = (4 * s,)
        shapes[p + "mlp.2.weight"] = (s, 4 * s)
        shapes[p + "mlp.2.bias"] = (s,)
    shapes["quantizer._codebook.project_down.weight"] = (FSQ_DIMS, s)
    shapes["quantizer._codebook.project_down.bias"] = (FSQ_DIMS,)
    return shapes


def optional_shapes(cfg: S3TokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of OPTIONAL_KEYS for this config (the mel filterbank follows n_mels)."""
    return {"_mel_filters": (cfg.n_mels, N_FFT // 2 + 1), "window": (N_FFT,)}


def convert_weights(weights: dict[str, np.ndarray], cfg: S3TokenizerConfig) -> dict[str, mx.array]:
    """`tokenizer.`-relative weights -> S3Tokenizer parameters.

    Conv layouts are transposed; `quantizer._codebook.*` becomes `quantizer.*` (MLX does not
    treat underscore attributes as parameters). The optional buffers, when present, are
    checked against the filterbank and window this module computes, then dropped.
    """
    expected = upstream_shapes(cfg)
    optional = optional_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected) - set(optional))
    if missing or extra:
        raise ValueError(f"S3Tokenizer weights do not match the config: missing {missing}, unexpected {extra}")
    for key, shape in {**expected, **{k: v for k, v in optional.items() if k in weights}}.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"S3Tokenizer weight {key}: shape {tuple(weights[key].shape)}, expected {shape}")
    if "_mel_filters" in weights:
        _check_buffer("_mel_filters", weights["_mel_filters"], mel_filters(S3_SR, N_FFT, cfg.n_mels, 0.0, S3_SR / 2))
    if "window" in weights:
        _check_buffer("window", weights["window"], hann_window(N_FFT))

    out: dict[str, mx.array] = {}
    for key in expected:
        w = np.asarray(weights[key], dtype=np.float32)
        if key.endswith(("conv1.weight", "conv2.weight", "fsmn_block.weight")):
            w = conv1d_from_torch(w)  # (out, in/groups, k) -> (out, k, in/groups)
        out[key.replace("quantizer._codebook.", "quantizer.")] = mx.array(w)
    return out


def _check_buffer(name: str, stored: np.ndarray, computed: np.ndarray) -> None:
    err = float(np.max(np.abs(np.asarray(stored, dtype=np.float64) - computed)))
    if err > 1e-5:
        logger.warning("tokenizer.%s in the checkpoint differs from the computed one by %.3g; using the computed one", name, err)


# ---------------------------------------------------------------------------------------------
# Front end


def log_mel_spectrogram(wav16: np.ndarray, n_mels: int = 128) -> mx.array:
    """S3Tokenizer.log_mel_spectrogram: wav16 (N,) -> (n_mels, N // 160) float32.

    torch.stft (centred, reflect, periodic Hann 400) minus its last frame, power, slaney mel,
    log10 clamped at 1e-10, floored at (max - 8), then (x + 4) / 4.
    """
    spec = stft(mx.array(wav16, dtype=mx.float32), N_FFT, HOP, hann_window(N_FFT))[:, :-1]  # drop the last frame
    power = mx.real(spec) ** 2 + mx.imag(spec) ** 2  # (201, N // 160)
    mel = mx.array(mel_filters(S3_SR, N_FFT, n_mels, 0.0, S3_SR / 2)) @ power  # (n_mels, frames)
    log_spec = mx.log10(mx.maximum(mel, LOG_FLOOR))
    log_spec = mx.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0


# ---------------------------------------------------------------------------------------------
# Network


def _rope_tables(length: int) -> tuple[mx.array, mx.array]:
    """cos/sin (length, 64) of precompute_freqs_cis(64, ...) with both halves repeated, so
    that x * cos + rotate_half(x) * sin is the reference's NeoX-style (non-interleaved) RoPE."""
    freqs = 1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, ROPE_DIM, 2, dtype=np.float32) / np.float32(ROPE_DIM)))
    angles = np.outer(np.arange(length, dtype=np.float32), freqs.astype(np.float32)).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)  # (length, 64)
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class FSMNMultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        self.fsmn_block = nn.Conv1d(n_state, n_state, FSMN_KERNEL, padding=FSMN_KERNEL // 2, groups=n_state, bias=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """x: (B, T, S); cos/sin: (T, 64). One unpadded utterance per row, so no mask."""
        batch, steps, state = x.shape
        head_dim = state // self.n_head
        q = self.query(x).reshape(batch, steps, self.n_head, head_dim)
        k = self.key(x).reshape(batch, steps, self.n_head, head_dim)
        v = self.value(x)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # FSMN memory: depthwise conv over v (not rotated) plus v itself.
        memory = self.fsmn_block(v) + v
        # The reference scales q and k each by d^-1/4; together that is SDPA's d^-1/2.
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = v.reshape(batch, steps, self.n_head, head_dim).transpose(0, 2, 1, 3)
        attn = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
        attn = attn.transpose(0, 2, 1, 3).reshape(batch, steps, state)
        return self.out(attn) + memory  # the memory joins after `out`


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = FSMNMultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state, eps=LAYER_NORM_EPS)
        self.mlp = [nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state)]
        self.mlp_ln = nn.LayerNorm(n_state, eps=LAYER_NORM_EPS)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.attn(self.attn_ln(x), cos, sin)
        h = self.mlp_ln(x)
        for layer in self.mlp:
            h = layer(h)
        return x + h


class AudioEncoderV2(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        s = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, s, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(s, s, 3, stride=2, padding=1)
        self.blocks = [ResidualAttentionBlock(s, cfg.n_audio_head) for _ in range(cfg.n_audio_layer)]

    def __call__(self, mel: mx.array) -> mx.array:
        """mel: (B, T, n_mels) -> (B, ceil(ceil(T / 2) / 2), S)."""
        x = nn.gelu(self.conv1(mel))
        x = nn.gelu(self.conv2(x))
        cos, sin = _rope_tables(x.shape[1])
        for block in self.blocks:
            x = block(x, cos, sin)
        return x


class FSQQuantizer(nn.Module):
    def __init__(self, n_state: int):
        super().__init__()
        self.project_down = nn.Linear(n_state, FSQ_DIMS)

    def pre_round(self, hidden: mx.array) -> mx.array:
        """(B, T, S) -> (B, T, 8): 0.999 * tanh(project_down(h)), the values that get rounded."""
        return mx.tanh(self.project_down(hidden)) * FSQ_SCALE

    @staticmethod
    def indices(pre: mx.array) -> mx.array:
        """(B, T, 8) -> (B, T) int32: digits round(pre) + 1 in {0, 1, 2}, dimension 0 least significant."""
        digits = mx.round(pre) + 1.0
        powers = mx.array([3.0**i for i in range(FSQ_DIMS)], dtype=mx.float32)
        return mx.sum(digits * powers, axis=-1).astype(mx.int32)


class S3Tokenizer(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoderV2(cfg)
        self.quantizer = FSQQuantizer(cfg.n_audio_state)

    def pre_round(self, mel: mx.array) -> mx.array:
        """mel: (1, n_mels, T) as the reference lays it out -> (1, T', 8) FSQ values before rounding."""
        return self.quantizer.pre_round(self.encoder(mel.transpose(0, 2, 1)))

    def __call__(self, mel: mx.array) -> mx.array:
        """quantize(): mel (1, n_mels, T) -> tokens (1, ceil(T / 4)) int32."""
        return FSQQuantizer.indices(self.pre_round(mel))


def tokenize_wav(tokenizer: S3Tokenizer, wav16: np.ndarray, max_len: int | None = None) -> mx.array:
    """S3Tokenizer.forward([wav16], max_len): one 16 kHz clip (N,) -> (1, T') int32 tokens,
    T' = ceil(min(N // 160, 4 * max_len) / 4). Clips over 30 s are refused (the reference
    switches to a sliding window there; voice prompts are at most 10 s)."""
    mel = log_mel_spectrogram(wav16, tokenizer.cfg.n_mels)
    if max_len is not None:
        mel = mel[:, : max_len * MEL_FRAMES_PER_TOKEN]
    if mel.shape[1] > MAX_MEL_FRAMES:
        raise ValueError(f"S3Tokenizer input of {mel.shape[1] / 100:.1f} s exceeds 30 s")
    if mel.shape[1] == 0:
        raise ValueError("S3Tokenizer input is shorter than one mel frame")
    return tokenizer(mel[None])
