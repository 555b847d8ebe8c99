"""CAMPPlus: the 192-d x-vector S3Gen conditions on (s3gen.safetensors, `speaker_encoder.`).

Kaldi fbank (80 bins) with per-utterance mean removal, then an FCM head (2-D residual convs
over frequency x time), a strided TDNN, three densely connected CAM blocks (context-aware
masking with segment pooling), statistics pooling (mean and unbiased std) and a dense layer
with an affine-free BatchNorm. The output is not normalised (flow does that).
Reference: chatterbox/models/s3gen/xvector.py (from 3D-Speaker / FunASR) and
torchaudio.compliance.kaldi.fbank.

Every BatchNorm runs with running statistics, so at load time each one that directly follows
a convolution is folded into it (the conv gains a bias); the ones that precede a ReLU at the
start of a layer become a per-channel `scale`/`shift`. Kernel-1 convolutions are Linear layers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import Config
from .convert import conv1d_from_torch, conv2d_from_torch, fold_batch_norm

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz
# Kaldi fbank options as torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80) uses them.
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
PADDED_FRAME = 512  # round_to_power_of_two
PREEMPHASIS = 0.97
POVEY_POWER = 0.85  # povey window = symmetric Hann ** 0.85
MEL_LOW_HZ = 20.0
LOG_FLOOR = float(np.finfo(np.float32).eps)  # torch.finfo(torch.float).eps

FCM_CHANNELS = 32  # FCM(m_channels=32), fixed in the reference
DENSE_KERNEL = 3
DENSE_DILATIONS = (1, 2, 2)
CAM_SEGMENT = 100  # CAMLayer.seg_pooling(seg_len=100)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class CAMPPlusConfig(Config):
    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    block_layers: tuple[int, ...] = (12, 24, 16)

    @classmethod
    def full(cls) -> "CAMPPlusConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "CAMPPlusConfig":
        return cls(block_layers=(2, 2, 2))  # the embedding stays 192 (flow's spk_embed_affine_layer)

    @property
    def bn_channels(self) -> int:
        return self.bn_size * self.growth_rate

    def block_channels(self) -> list[tuple[int, int]]:
        """(input channels, channels after the dense layers) of each CAM block."""
        out, channels = [], self.init_channels
        for layers in self.block_layers:
            grown = channels + layers * self.growth_rate
            out.append((channels, grown))
            channels = grown // 2  # the transit layer halves them
        return out

    @property
    def out_channels(self) -> int:
        return self.block_channels()[-1][1] // 2


def _bn_shapes(prefix: str, channels: int, affine: bool = True) -> dict[str, tuple[int, ...]]:
    keys = BN_KEYS if affine else BN_KEYS[2:]
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (channels,)) for k in keys}


def upstream_shapes(cfg: CAMPPlusConfig) -> dict[str, tuple[int, ...]]:
    """Every `speaker_encoder.` key (relative, torch layout), BatchNorm statistics included."""
    m = FCM_CHANNELS
    shapes: dict[str, tuple[int, ...]] = {"head.conv1.weight": (m, 1, 3, 3), **_bn_shapes("head.bn1", m)}
    for layer in ("layer1", "layer2"):
        for j in range(2):  # FCM(num_blocks=[2, 2]); the first block of each layer strides
            p = f"head.{layer}.{j}"
            shapes[f"{p}.conv1.weight"] = (m, m, 3, 3)
            shapes.update(_bn_shapes(f"{p}.bn1", m))
            shapes[f"{p}.conv2.weight"] = (m, m, 3, 3)
            shapes.update(_bn_shapes(f"{p}.bn2", m))
            if j == 0:
                shapes[f"{p}.shortcut.0.weight"] = (m, m, 1, 1)
                shapes.update(_bn_shapes(f"{p}.shortcut.1", m))
    shapes["head.conv2.weight"] = (m, m, 3, 3)
    shapes.update(_bn_shapes("head.bn2", m))

    fcm_out = m * (cfg.feat_dim // 8)
    shapes["xvector.tdnn.linear.weight"] = (cfg.init_channels, fcm_out, 5)
    shapes.update(_bn_shapes("xvector.tdnn.nonlinear.batchnorm", cfg.init_channels))
    bn, g = cfg.bn_channels, cfg.growth_rate
    for b, ((c_in, c_out), layers) in enumerate(zip(cfg.block_channels(), cfg.block_layers), start=1):
        for j in range(layers):
            p = f"xvector.block{b}.tdnnd{j + 1}"
            c = c_in + j * g
            shapes.update(_bn_shapes(f"{p}.nonlinear1.batchnorm", c))
            shapes[f"{p}.linear1.weight"] = (bn, c, 1)
            shapes.update(_bn_shapes(f"{p}.nonlinear2.batchnorm", bn))
            shapes[f"{p}.cam_layer.linear_local.weight"] = (g, bn, DENSE_KERNEL)
            shapes[f"{p}.cam_layer.linear1.weight"] = (bn // 2, bn, 1)
            shapes[f"{p}.cam_layer.linear1.bias"] = (bn // 2,)
            shapes[f"{p}.cam_layer.linear2.weight"] = (g, bn // 2, 1)
            shapes[f"{p}.cam_layer.linear2.bias"] = (g,)
        shapes.update(_bn_shapes(f"xvector.transit{b}.nonlinear.batchnorm", c_out))
        shapes[f"xvector.transit{b}.linear.weight"] = (c_out // 2, c_out, 1)
    c = cfg.out_channels
    shapes.update(_bn_shapes("xvector.out_nonlinear.batchnorm", c))
    shapes["xvector.dense.linear.weight"] = (cfg.embedding_size, 2 * c, 1)
    shapes.update(_bn_shapes("xvector.dense.nonlinear.batchnorm", cfg.embedding_size, affine=False))
    return shapes


def convert_weights(weights: dict[str, np.ndarray], cfg: CAMPPlusConfig) -> dict[str, mx.array]:
    """`speaker_encoder.`-relative weights -> CAMPPlus parameters, batch norms folded.

    conv + BN pairs become one conv with a bias (named after the conv); a BN that starts a
    layer (before its ReLU) becomes `<path>.batchnorm.scale/shift`; kernel-1 convs lose
    their last axis (Linear); num_batches_tracked is read and dropped.
    """
    expected = upstream_shapes(cfg)
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(f"CAMPPlus weights do not match the config: missing {missing}, unexpected {extra}")
    for key, shape in expected.items():
        if tuple(np.shape(weights[key])) != shape:
            raise ValueError(f"CAMPPlus weight {key}: shape {tuple(np.shape(weights[key]))}, expected {shape}")
    w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if not k.endswith("num_batches_tracked")}

    def bn(prefix: str, affine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        return fold_batch_norm(
            w[f"{prefix}.running_mean"], w[f"{prefix}.running_var"],
            w.get(f"{prefix}.weight") if affine else None, w.get(f"{prefix}.bias") if affine else None,
        )

    out: dict[str, np.ndarray] = {}

    def conv_bn(conv: str, norm: str, name: str, layout) -> None:
        scale, shift = bn(norm)
        weight = w[f"{conv}.weight"] * scale.reshape((-1,) + (1,) * (w[f"{conv}.weight"].ndim - 1))
        out[f"{name}.weight"] = layout(weight)
        out[f"{name}.bias"] = shift

    def affine(norm: str) -> None:
        out[f"{norm}.scale"], out[f"{norm}.shift"] = bn(norm)

    def squeeze(weight: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(weight[..., 0])  # kernel-1 Conv1d (out, in, 1) -> Linear (out, in)

    conv_bn("head.conv1", "head.bn1", "head.conv1", conv2d_from_torch)
    for layer in ("layer1", "layer2"):
        for j in range(2):
            p = f"head.{layer}.{j}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", f"{p}.conv1", conv2d_from_torch)
            conv_bn(f"{p}.conv2", f"{p}.bn2", f"{p}.conv2", conv2d_from_torch)
            if j == 0:
                conv_bn(f"{p}.shortcut.0", f"{p}.shortcut.1", f"{p}.shortcut.0", conv2d_from_torch)
    conv_bn("head.conv2", "head.bn2", "head.conv2", conv2d_from_torch)

    conv_bn("xvector.tdnn.linear", "xvector.tdnn.nonlinear.batchnorm", "xvector.tdnn.linear", conv1d_from_torch)
    for b, layers in enumerate(cfg.block_layers, start=1):
        for j in range(layers):
            p = f"xvector.block{b}.tdnnd{j + 1}"
            affine(f"{p}.nonlinear1.batchnorm")
            conv_bn(f"{p}.linear1", f"{p}.nonlinear2.batchnorm", f"{p}.linear1", squeeze)
            out[f"{p}.cam_layer.linear_local.weight"] = conv1d_from_torch(w[f"{p}.cam_layer.linear_local.weight"])
            for lin in ("linear1", "linear2"):
                out[f"{p}.cam_layer.{lin}.weight"] = squeeze(w[f"{p}.cam_layer.{lin}.weight"])
                out[f"{p}.cam_layer.{lin}.bias"] = w[f"{p}.cam_layer.{lin}.bias"]
        affine(f"xvector.transit{b}.nonlinear.batchnorm")
        out[f"xvector.transit{b}.linear.weight"] = squeeze(w[f"xvector.transit{b}.linear.weight"])
    affine("xvector.out_nonlinear.batchnorm")
    scale, shift = bn("xvector.dense.nonlinear.batchnorm", affine=False)
    out["xvector.dense.linear.weight"] = squeeze(w["xvector.dense.linear.weight"]) * scale[:, None]
    out["xvector.dense.linear.bias"] = shift
    return {k: mx.array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Kaldi fbank


def _kaldi_mel(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + freq / 700.0)


def _kaldi_mel_banks(num_bins: int) -> np.ndarray:
    """get_mel_banks(num_bins, 512, 16000, low 20 Hz, high = Nyquist), padded with a zero
    column for the Nyquist bin: (num_bins, 257) float32 triangles on Kaldi's mel scale."""
    num_fft_bins = PADDED_FRAME // 2
    mel_low, mel_high = _kaldi_mel(np.float64(MEL_LOW_HZ)), _kaldi_mel(np.float64(SAMPLE_RATE / 2))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = _kaldi_mel((SAMPLE_RATE / PADDED_FRAME) * np.arange(num_fft_bins, dtype=np.float64))[None, :]
    banks = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)


def kaldi_fbank(wav16: np.ndarray, num_mel_bins: int = 80) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=80) with its defaults.

    snip_edges framing (25 ms / 10 ms), per-frame DC removal, pre-emphasis 0.97 (the first
    sample against itself), povey window, zero-pad to 512, power spectrum, Kaldi mel banks
    20 Hz..8 kHz, log with a float32-eps floor; no dither, no energy column.
    wav16: (N,) -> (1 + (N - 400) // 160, num_mel_bins) float32.
    """
    wav = np.asarray(wav16, dtype=np.float64)
    if wav.shape[0] < FRAME_LENGTH:
        raise ValueError(f"fbank needs at least {FRAME_LENGTH} samples, got {wav.shape[0]}")
    frames = np.lib.stride_tricks.sliding_window_view(wav, FRAME_LENGTH)[::FRAME_SHIFT]  # (m, 400)
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - PREEMPHASIS * previous
    n = np.arange(FRAME_LENGTH)
    povey = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (FRAME_LENGTH - 1))) ** POVEY_POWER  # symmetric Hann
    spec = np.fft.rfft(frames * povey, n=PADDED_FRAME, axis=1)  # zero-padded to 512
    power = spec.real**2 + spec.imag**2  # (m, 257)
    energies = power @ _kaldi_mel_banks(num_mel_bins).astype(np.float64).T
    return np.log(np.maximum(energies, LOG_FLOOR)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Network (MLX, channels last: 2-D maps are (B, freq, time, C), sequences (B, T, C))


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm that could not be folded into a neighbouring conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = mx.ones((channels,))
        self.shift = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale + self.shift


class BatchNormReLU(nn.Module):
    """get_nonlinear("batchnorm-relu") where the BN comes first in its layer."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = ChannelAffine(channels)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(self.batchnorm(x))


class BasicResBlock(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=(stride, 1), padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.shortcut = [nn.Conv2d(channels, channels, 1, stride=(stride, 1))] if stride != 1 else []

    def __call__(self, x: mx.array) -> mx.array:
        out = self.conv2(nn.relu(self.conv1(x)))
        for conv in self.shortcut:
            x = conv(x)
        return nn.relu(out + x)


class FCM(nn.Module):
    def __init__(self):
        super().__init__()
        m = FCM_CHANNELS
        self.conv1 = nn.Conv2d(1, m, 3, stride=1, padding=1)
        self.layer1 = [BasicResBlock(m, 2), BasicResBlock(m, 1)]
        self.layer2 = [BasicResBlock(m, 2), BasicResBlock(m, 1)]
        self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1)

    def __call__(self, feats: mx.array) -> mx.array:
        """feats: (B, T, F) -> (B, T, 32 * F / 8), channel-major like torch's reshape."""
        x = feats.transpose(0, 2, 1)[..., None]  # (B, F, T, 1): frequency is the height
        x = nn.relu(self.conv1(x))
        for block in self.layer1 + self.layer2:
            x = block(x)
        x = nn.relu(self.conv2(x))  # (B, F/8, T, 32)
        batch, freq, steps, channels = x.shape
        return x.transpose(0, 2, 3, 1).reshape(batch, steps, channels * freq)


class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 5, stride=2, padding=2)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(self.linear(x))


def _segment_mean(x: mx.array, seg_len: int = CAM_SEGMENT) -> mx.array:
    """avg_pool1d(kernel=stride=seg_len, ceil_mode=True) expanded back to every frame: the
    last, partial segment is averaged over its own frames only. (B, T, C) -> (B, T, C)."""
    batch, steps, channels = x.shape
    n_seg = math.ceil(steps / seg_len)
    padded = mx.pad(x, [(0, 0), (0, n_seg * seg_len - steps), (0, 0)])
    sums = padded.reshape(batch, n_seg, seg_len, channels).sum(axis=2)
    counts = mx.array([min(seg_len, steps - i * seg_len) for i in range(n_seg)], dtype=x.dtype)[:, None]
    means = sums / counts  # (B, n_seg, C)
    return mx.repeat(means, seg_len, axis=1)[:, :steps]


class CAMLayer(nn.Module):
    def __init__(self, bn_channels: int, out_channels: int, dilation: int):
        super().__init__()
        pad = (DENSE_KERNEL - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn_channels, out_channels, DENSE_KERNEL, padding=pad, dilation=dilation, bias=False)
        self.linear1 = nn.Linear(bn_channels, bn_channels // 2)
        self.linear2 = nn.Linear(bn_channels // 2, out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear_local(x)
        context = mx.mean(x, axis=1, keepdims=True) + _segment_mean(x)
        mask = mx.sigmoid(self.linear2(nn.relu(self.linear1(context))))
        return y * mask


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, cfg: CAMPPlusConfig, dilation: int):
        super().__init__()
        self.nonlinear1 = BatchNormReLU(in_channels)
        self.linear1 = nn.Linear(in_channels, cfg.bn_channels)  # its BN (nonlinear2) is folded in
        self.cam_layer = CAMLayer(cfg.bn_channels, cfg.growth_rate, dilation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.cam_layer(nn.relu(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.Module):
    def __init__(self, layers: int, in_channels: int, cfg: CAMPPlusConfig, dilation: int):
        super().__init__()
        self.num_layers = layers
        for j in range(layers):
            setattr(self, f"tdnnd{j + 1}", CAMDenseTDNNLayer(in_channels + j * cfg.growth_rate, cfg, dilation))

    def __call__(self, x: mx.array) -> mx.array:
        for j in range(self.num_layers):
            x = mx.concatenate([x, getattr(self, f"tdnnd{j + 1}")(x)], axis=-1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = BatchNormReLU(in_channels)
        self.linear = nn.Linear(in_channels, out_channels, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)  # its affine-free BN is folded in

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class XVector(nn.Module):
    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        self.num_blocks = len(cfg.block_layers)
        self.tdnn = TDNNLayer(FCM_CHANNELS * (cfg.feat_dim // 8), cfg.init_channels)
        for b, ((c_in, c_out), layers, dilation) in enumerate(
            zip(cfg.block_channels(), cfg.block_layers, DENSE_DILATIONS), start=1
        ):
            setattr(self, f"block{b}", CAMDenseTDNNBlock(layers, c_in, cfg, dilation))
            setattr(self, f"transit{b}", TransitLayer(c_out, c_out // 2))
        self.out_nonlinear = BatchNormReLU(cfg.out_channels)
        self.dense = DenseLayer(2 * cfg.out_channels, cfg.embedding_size)

    def __call__(self, x: mx.array) -> mx.array:
        """x: (B, T, 320) -> (B, embedding_size)."""
        x = self.tdnn(x)
        for b in range(1, self.num_blocks + 1):
            x = getattr(self, f"transit{b}")(getattr(self, f"block{b}")(x))
        x = self.out_nonlinear(x)
        # Statistics pooling: mean and unbiased std over time.
        stats = mx.concatenate([mx.mean(x, axis=1), mx.sqrt(mx.var(x, axis=1, ddof=1))], axis=-1)
        return self.dense(stats)


class CAMPPlus(nn.Module):
    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        if cfg.feat_dim % 8 or len(cfg.block_layers) != len(DENSE_DILATIONS):
            raise ValueError(f"unsupported CAMPPlus config {cfg}")
        self.cfg = cfg
        self.head = FCM()
        self.xvector = XVector(cfg)

    def __call__(self, feats: mx.array) -> mx.array:
        """feats: (B, T, 80) mean-normalised fbank -> (B, 192) raw x-vector."""
        return self.xvector(self.head(feats))


def xvector_from_wav(campplus: CAMPPlus, wav16: np.ndarray) -> mx.array:
    """speaker_encoder.inference([wav16]): fbank, minus its time mean (CMN), through the
    network. wav16: (N,) at 16 kHz -> (1, 192)."""
    feats = kaldi_fbank(wav16, campplus.cfg.feat_dim)
    feats = feats - feats.mean(axis=0, keepdims=True)
    return campplus(mx.array(feats)[None])
