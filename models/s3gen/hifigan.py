"""HiFT vocoder (`mel2wav`): S3Gen's 80-bin log-mel at 50 frames/s -> 24 kHz waveform.

Port of chatterbox/models/s3gen/hifigan.py (HiFTGenerator, SineGen, SourceModuleHnNSF,
ResBlock, Snake) and f0_predictor.py (ConvRNNF0Predictor): a neural source-filter front
(F0 -> harmonic sine source) feeding an iSTFTNet decoder (upsampling convs + Snake
resblocks -> 9-bin magnitude/phase -> iSTFT with n_fft 16, hop 4). 8 * 5 * 3 * 4 = 480
samples per mel frame.

Activations are channels-last (B, T, C) inside; the public boundary keeps the reference's
(B, C, T) for mels and sources. Weight norm is folded at load, so the module holds plain
conv weights in MLX layout (C_out, K, C_in).

The convolutions are models/s3gen/conv.py's (BLAS matmuls on the CPU backend, MLX's conv
ops on a GPU). On the Linux CPU backend sin costs ~18 ns per element (scalar libm), which
made the Snake activations a third of the vocoder's time, so there Snake's sin^2 is a
range-reduced polynomial (4x faster, float32-exact to ~2e-7). `SNAKE_IMPL` chooses; "auto"
takes the polynomial on CPU and sin on a GPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import dsp
from ..config import Config
from ..convert import conv1d_from_torch, conv_transpose1d_from_torch, fold_weight_norm
from .conv import conv1d, conv_transpose1d

logger = logging.getLogger(__name__)

# A module-level switch so a benchmark or a test can flip it.
SNAKE_IMPL = "auto"  # "auto" | "poly" | "sin"
# sin^2(pi u) on |u| <= 1/2 as sum_k c_k (u^2)^k, k = 1..6: a weighted least-squares fit,
# max error 6e-9 in float64 and 2.4e-7 when evaluated in float32 (c_1 = pi^2).
SIN2_PI_COEFFS = (9.869603157043457, -32.469581604003906, 42.72538757324219, -30.085968017578125, 12.990792274475098, -3.273036003112793)

SNAKE_EPS = 1e-9  # Snake's no_div_by_zero
FINAL_LRELU_SLOPE = 0.01  # F.leaky_relu default, used once before conv_post (not lrelu_slope)
MAGNITUDE_MAX = 100.0  # clip on exp(log-magnitude) before the iSTFT
WEIGHT_NORM_SUFFIXES = (".parametrizations.weight.original0", ".parametrizations.weight.original1")


@dataclass
class HiFTConfig(Config):
    """HiFTGenerator hyper-parameters; field names follow the reference's constructor."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24_000  # Hz
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16  # samples
    istft_hop_len: int = 4  # samples
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512  # ConvRNNF0Predictor cond_channels
    f0_num_class: int = 1

    @classmethod
    def full(cls) -> "HiFTConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "HiFTConfig":
        """Narrow channels only: rates, kernels and the iSTFT keep 480 samples per frame."""
        return cls(base_channels=32, f0_cond_channels=32)

    @property
    def upsample_total(self) -> int:
        """Samples per mel frame (480 for the real model)."""
        return int(np.prod(self.upsample_rates)) * self.istft_hop_len

    def stage_channels(self, i: int) -> int:
        """Channels after upsampling stage i."""
        return self.base_channels // (2 ** (i + 1))

    def source_down_specs(self) -> list[tuple[int, int, int]]:
        """(kernel, stride, padding) of source_downs[i], as the reference derives them."""
        rates = [1] + list(self.upsample_rates[::-1][:-1])
        cum = np.cumprod(rates)[::-1]
        return [(1, 1, 0) if u == 1 else (int(u) * 2, int(u), int(u) // 2) for u in cum]


# ---------------------------------------------------------------------------------------
# Convolutions


class Conv1d(nn.Module):
    """torch.nn.Conv1d (weight norm folded), channels-last. Weight (C_out, K, C_in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.weight = mx.zeros((out_channels, kernel_size, in_channels))
        self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.padding = padding
        self.dilation = dilation

    def __call__(self, x: mx.array) -> mx.array:
        return conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class ConvTranspose1d(nn.Module):
    """torch.nn.ConvTranspose1d (weight norm folded), channels-last. Weight (C_out, K, C_in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.weight = mx.zeros((out_channels, kernel_size, in_channels))
        self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.padding = padding

    def __call__(self, x: mx.array) -> mx.array:
        return conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding)


# ---------------------------------------------------------------------------------------
# Blocks


def _use_poly_snake() -> bool:
    if SNAKE_IMPL == "auto":
        return mx.default_device().type == mx.DeviceType.cpu
    if SNAKE_IMPL not in ("poly", "sin"):
        raise ValueError(f"SNAKE_IMPL must be 'auto', 'poly' or 'sin', not {SNAKE_IMPL!r}")
    return SNAKE_IMPL == "poly"


def sin_squared(y: mx.array) -> mx.array:
    """sin(y)^2 without sin: reduce y / pi to u in [-1/2, 1/2] (sin^2 has period pi), then
    a degree-6 polynomial in u^2. ~17 vectorised elementwise ops instead of scalar libm
    calls; the error is ~1e-7 |y|, the same order as float32 rounding of y itself."""
    t = y * (1.0 / math.pi)
    u = t - mx.round(t)
    v = u * u
    p = SIN2_PI_COEFFS[-1] * v + SIN2_PI_COEFFS[-2]
    for c in SIN2_PI_COEFFS[-3::-1]:
        p = p * v + c
    return p * v


class Snake(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), alpha per channel on a linear scale (float32)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        alpha = self.alpha.astype(mx.float32)
        ax = x * alpha
        s2 = sin_squared(ax) if _use_poly_snake() else mx.square(mx.sin(ax))
        return x + s2 * (1.0 / (alpha + SNAKE_EPS))


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation d, x += conv2(snake2(conv1_d(snake1(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = [Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, d), dilation=d) for d in dilations]
        self.convs2 = [Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size)) for _ in dilations]
        self.activations1 = [Snake(channels) for _ in dilations]
        self.activations2 = [Snake(channels) for _ in dilations]

    def __call__(self, x: mx.array) -> mx.array:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 x (Conv1d k3 + ELU), Linear -> |.|: mel (B, T, 80) -> F0 Hz (B, T)."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = layers  # parameters at condnet.{0,2,4,6,8}, as the checkpoint
        self.classifier = nn.Linear(cond_channels, num_class)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.condnet:
            x = layer(x)
        return mx.abs(self.classifier(x)[..., 0])


class SourceModule(nn.Module):
    """SourceModuleHnNSF's learnt part: harmonics (B, S, H+1) -> tanh(l_linear) (B, S, 1)."""

    def __init__(self, nb_harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(nb_harmonics + 1, 1)

    def __call__(self, harmonics: mx.array) -> mx.array:
        return mx.tanh(self.l_linear(harmonics))


PHASE_ONE = 4294967296.0  # 2^32: one cycle in the fixed-point phase
PHASE_MAX = 4294967040.0  # the largest float32 below 2^32


def phase_to_fixed(cycles: mx.array) -> mx.array:
    """Cycles (any float) -> uint32 fixed point, one cycle = 2^32 (so wrap-around is mod 1)."""
    frac = cycles.astype(mx.float32) - mx.floor(cycles.astype(mx.float32))
    return mx.minimum(frac * PHASE_ONE, PHASE_MAX).astype(mx.uint32)


def phase_increments(f0: mx.array, *, upsample: int, sampling_rate: int, n_harm: int) -> mx.array:
    """F0 (B, T) Hz -> each harmonic's phase advance over each frame, uint32 fixed point (B, T, H)."""
    harmonic = mx.arange(1, n_harm + 1, dtype=mx.float32)
    return phase_to_fixed((f0.astype(mx.float32) / sampling_rate)[..., None] * harmonic * upsample)


def sine_harmonics(
    f0: mx.array,
    phase: mx.array,
    noise: mx.array,
    *,
    upsample: int,
    sampling_rate: int,
    sine_amp: float,
    noise_std: float,
    voiced_threshold: float,
    start_phase: mx.array | None = None,
) -> mx.array:
    """SineGen on a frame-rate F0: (B, T) Hz -> (B, T * upsample, H) harmonics plus noise.

    phase (B, H) initial phases in radians (entry 0, the fundamental's, is forced to 0 as in
    the reference); noise (B, T * upsample, H) standard normal.

    The reference takes theta_h[n] = 2 pi frac(sum_{m<=n} h f0[m] / sr) over the
    nearest-upsampled F0. F0 is constant within a frame, so that sum is the phase at the
    frame start plus a linear ramp. The frame-start phases are a running sum of per-frame
    advances in uint32 fixed point (one cycle = 2^32), where wrap-around is exactly mod 1:
    the phase is exact to 2^-24 cycle at any length, and a stream that carries it
    (start_phase (B, H), uint32, the phase at the first frame) gets bit-identical values.
    (A float32 running sum drifts by ~1e-5 cycle per 300 frames, which alone limited
    streamed voiced audio to ~45 dB against one-shot.)
    """
    batch, n_frames = f0.shape
    n_harm = phase.shape[-1]
    harmonic = mx.arange(1, n_harm + 1, dtype=mx.float32)  # (H,)
    cycles_per_sample = (f0.astype(mx.float32) / sampling_rate)[..., None] * harmonic  # (B, T, H)
    step = phase_increments(f0, upsample=upsample, sampling_rate=sampling_rate, n_harm=n_harm)
    start_fixed = mx.cumsum(step, axis=1) - step  # exclusive: phase at each frame start
    if start_phase is not None:
        start_fixed = start_fixed + start_phase.astype(mx.uint32)[:, None, :]
    start = start_fixed.astype(mx.float32) * (1.0 / PHASE_ONE)
    ramp = mx.arange(1, upsample + 1, dtype=mx.float32)[:, None]  # (U, 1): sum includes sample n
    cycles = start[:, :, None, :] + ramp * cycles_per_sample[:, :, None, :]  # (B, T, U, H)
    theta = (2.0 * math.pi) * (cycles - mx.floor(cycles))
    phase = phase.astype(mx.float32) * mx.array([0.0] + [1.0] * (n_harm - 1))
    sine = sine_amp * mx.sin(theta + phase[:, None, None, :])
    voiced = (f0 > voiced_threshold).astype(mx.float32)[:, :, None, None]  # (B, T, 1, 1)
    noise_amp = voiced * noise_std + (1.0 - voiced) * (sine_amp / 3.0)
    noise = noise.astype(mx.float32).reshape(batch, n_frames, upsample, n_harm)
    out = sine * voiced + noise_amp * noise
    return out.reshape(batch, n_frames * upsample, n_harm)


# ---------------------------------------------------------------------------------------
# Generator


class HiFTGenerator(nn.Module):
    """HiFTNet generator (NSF + iSTFTNet) as configured for S3Gen (24 kHz, 480x upsampling)."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        n_stft = cfg.istft_n_fft + 2  # real and imaginary parts of n_fft // 2 + 1 bins
        self.m_source = SourceModule(cfg.nb_harmonics)
        self.conv_pre = Conv1d(cfg.in_channels, cfg.base_channels, 7, padding=3)
        self.ups = [
            ConvTranspose1d(cfg.base_channels // (2**i), cfg.stage_channels(i), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        ]
        self.source_downs = [
            Conv1d(n_stft, cfg.stage_channels(i), k, stride=s, padding=p) for i, (k, s, p) in enumerate(cfg.source_down_specs())
        ]
        self.source_resblocks = [
            ResBlock(cfg.stage_channels(i), k, tuple(d))
            for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes))
        ]
        self.resblocks = [
            ResBlock(cfg.stage_channels(i), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        ]
        self.conv_post = Conv1d(cfg.stage_channels(len(cfg.upsample_rates) - 1), n_stft, 7, padding=3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels, cfg.f0_num_class)
        self._window = dsp.hann_window(cfg.istft_n_fft)  # float32 numpy, not a parameter

    @property
    def f0_context_frames(self) -> int:
        """How many mel frames on each side the F0 of one frame depends on (5: five k3 convs)."""
        return sum(layer.weight.shape[1] // 2 for layer in self.f0_predictor.condnet if isinstance(layer, Conv1d))

    def phase_increments(self, f0: mx.array) -> mx.array:
        """F0 (B, T) Hz -> per-frame phase advance of each harmonic, uint32 (B, T, H+1)."""
        cfg = self.cfg
        return phase_increments(f0, upsample=cfg.upsample_total, sampling_rate=cfg.sampling_rate, n_harm=cfg.nb_harmonics + 1)

    def f0(self, mel: mx.array) -> mx.array:
        """mel (B, 80, T) -> F0 in Hz (B, T)."""
        return self.f0_predictor(mel.transpose(0, 2, 1))

    def source(
        self,
        f0: mx.array,
        *,
        phase: mx.array | None = None,
        noise: mx.array | None = None,
        key: mx.array | None = None,
        start_phase: mx.array | None = None,
    ) -> mx.array:
        """F0 (B, T) Hz -> excitation source (B, 1, 480 T).

        start_phase (B, H+1) uint32: phase of each harmonic at the first frame, fixed point
        (see `sine_harmonics`; default 0, as the reference), so a streamed window continues
        the previous one.

        phase (B, H+1): initial phase per harmonic in radians (entry 0 is ignored: the
        fundamental starts at 0); noise (B, H+1, 480 T): standard normal, as the
        reference's randn_like. Whatever is not given is drawn from `key`.
        """
        cfg = self.cfg
        batch, n_frames = f0.shape
        n_harm = cfg.nb_harmonics + 1
        n_samples = n_frames * cfg.upsample_total
        if (phase is None or noise is None) and key is None:
            raise ValueError("HiFT source needs a random key unless both phase and noise are given")
        if key is not None:
            phase_key, noise_key = mx.random.split(key)
        if phase is None:
            phase = mx.random.uniform(-math.pi, math.pi, (batch, n_harm), key=phase_key)
        if noise is None:
            noise_t = mx.random.normal((batch, n_samples, n_harm), key=noise_key)
        else:
            noise_t = noise.transpose(0, 2, 1)  # (B, S, H+1)
        harmonics = sine_harmonics(
            f0,
            phase.reshape(batch, n_harm),
            noise_t,
            upsample=cfg.upsample_total,
            sampling_rate=cfg.sampling_rate,
            sine_amp=cfg.nsf_alpha,
            noise_std=cfg.nsf_sigma,
            voiced_threshold=cfg.nsf_voiced_threshold,
            start_phase=None if start_phase is None else start_phase.reshape(batch, n_harm),
        )
        return self.m_source(harmonics).transpose(0, 2, 1)

    def decode_spectrum(self, mel: mx.array, source: mx.array) -> mx.array:
        """mel (B, 80, T) and source (B, 1, 480 T) -> conv_post output (B, 120 T + 1, n_fft + 2):
        per iSTFT frame, n_fft / 2 + 1 log-magnitudes then as many phase pre-activations."""
        cfg = self.cfg
        spec = dsp.stft(source[:, 0], cfg.istft_n_fft, cfg.istft_hop_len, self._window)  # (B, bins, F)
        s_stft = mx.concatenate([mx.real(spec), mx.imag(spec)], axis=1).transpose(0, 2, 1)  # (B, F, 18)

        x = self.conv_pre(mel.transpose(0, 2, 1))  # (B, T, C)
        n_stages = len(self.ups)
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i in range(n_stages):
            x = nn.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x)
            if i == n_stages - 1:
                # ReflectionPad1d((1, 0)): one mirrored sample in front -> 120 T + 1 steps,
                # the source STFT's frame count.
                x = mx.concatenate([x[:, 1:2], x], axis=1)
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_kernels](x)
            for j in range(1, n_kernels):
                xs = xs + self.resblocks[i * n_kernels + j](x)
            x = xs / n_kernels

        x = nn.leaky_relu(x, FINAL_LRELU_SLOPE)
        return self.conv_post(x)

    def spectrum_to_wav(self, x: mx.array) -> mx.array:
        """conv_post output (B, F, n_fft + 2) -> unclipped waveform (B, hop (F - 1)) by iSTFT."""
        cfg = self.cfg
        n_bins = cfg.istft_n_fft // 2 + 1
        magnitude = mx.minimum(mx.exp(x[..., :n_bins]), MAGNITUDE_MAX)
        phase = mx.sin(x[..., n_bins:])  # the reference's sin (its comment calls it redundant)
        spec = (magnitude * mx.cos(phase) + 1j * (magnitude * mx.sin(phase))).transpose(0, 2, 1)
        return dsp.istft(spec, cfg.istft_n_fft, cfg.istft_hop_len, self._window)

    def decode(self, mel: mx.array, source: mx.array) -> mx.array:
        """mel (B, 80, T) and source (B, 1, 480 T) -> waveform (B, 480 T) in [-0.99, 0.99]."""
        wav = self.spectrum_to_wav(self.decode_spectrum(mel, source))
        return mx.clip(wav, -self.cfg.audio_limit, self.cfg.audio_limit)

    def inference(
        self,
        mel: mx.array,
        cache_source: mx.array | None = None,
        *,
        key: mx.array | None = None,
        phase: mx.array | None = None,
        noise: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """mel (B, 80, T) -> (wav (B, 480 T), source (B, 1, 480 T)).

        cache_source (B, 1, S) replaces the first S samples of the new source (the
        reference's hook for seamless re-synthesis); pass the returned source's tail to the
        next call. Randomness: see `source`.
        """
        s = self.source(self.f0(mel), phase=phase, noise=noise, key=key)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if n > s.shape[-1]:
                raise ValueError(f"cache_source has {n} samples, more than the {s.shape[-1]} generated")
            s = mx.concatenate([cache_source.astype(s.dtype), s[..., n:]], axis=-1)
        return self.decode(mel, s), s


# ---------------------------------------------------------------------------------------
# Checkpoint layout


def _weight_norm_shapes(name: str, g_dim: int, v_shape: tuple[int, ...], bias: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.parametrizations.weight.original0": (g_dim, 1, 1),
        f"{name}.parametrizations.weight.original1": v_shape,
        f"{name}.bias": (bias,),
    }


def _resblock_shapes(name: str, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for j in range(len(dilations)):
        for convs in ("convs1", "convs2"):
            shapes.update(_weight_norm_shapes(f"{name}.{convs}.{j}", channels, (channels, channels, kernel_size), channels))
        shapes[f"{name}.activations1.{j}.alpha"] = (channels,)
        shapes[f"{name}.activations2.{j}.alpha"] = (channels,)
    return shapes


def upstream_shapes(cfg: HiFTConfig) -> dict[str, tuple[int, ...]]:
    """Every key under `mel2wav.` (relative), with its PyTorch shape."""
    n_stft = cfg.istft_n_fft + 2
    shapes: dict[str, tuple[int, ...]] = {
        "m_source.l_linear.weight": (1, cfg.nb_harmonics + 1),
        "m_source.l_linear.bias": (1,),
    }
    shapes.update(_weight_norm_shapes("conv_pre", cfg.base_channels, (cfg.base_channels, cfg.in_channels, 7), cfg.base_channels))
    for i, k in enumerate(cfg.upsample_kernel_sizes):
        c_in, c_out = cfg.base_channels // (2**i), cfg.stage_channels(i)
        # ConvTranspose1d keeps (in, out, k) and weight norm's dim 0 is in_channels.
        shapes.update(_weight_norm_shapes(f"ups.{i}", c_in, (c_in, c_out, k), c_out))
    for i, (k, _, _) in enumerate(cfg.source_down_specs()):
        ch = cfg.stage_channels(i)
        shapes[f"source_downs.{i}.weight"] = (ch, n_stft, k)
        shapes[f"source_downs.{i}.bias"] = (ch,)
    for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
        shapes.update(_resblock_shapes(f"source_resblocks.{i}", cfg.stage_channels(i), k, tuple(d)))
    n_kernels = len(cfg.resblock_kernel_sizes)
    for i in range(len(cfg.upsample_rates)):
        for j, (k, d) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            shapes.update(_resblock_shapes(f"resblocks.{i * n_kernels + j}", cfg.stage_channels(i), k, tuple(d)))
    last = cfg.stage_channels(len(cfg.upsample_rates) - 1)
    shapes.update(_weight_norm_shapes("conv_post", n_stft, (n_stft, last, 7), n_stft))
    for i in range(5):
        c_in = cfg.in_channels if i == 0 else cfg.f0_cond_channels
        shapes.update(
            _weight_norm_shapes(f"f0_predictor.condnet.{2 * i}", cfg.f0_cond_channels, (cfg.f0_cond_channels, c_in, 3), cfg.f0_cond_channels)
        )
    shapes["f0_predictor.classifier.weight"] = (cfg.f0_num_class, cfg.f0_cond_channels)
    shapes["f0_predictor.classifier.bias"] = (cfg.f0_num_class,)
    return shapes


def convert_weights(weights: dict[str, np.ndarray], cfg: HiFTConfig) -> dict[str, mx.array]:
    """Upstream `mel2wav.` tensors (relative keys, torch layout) -> HiFTGenerator parameters.

    Weight norm is folded (w = g v / ||v||, norm over every axis but 0: out_channels for
    Conv1d, in_channels for ConvTranspose1d), then conv weights go to MLX layout. Every
    key of upstream_shapes(cfg) must be present with its shape, and nothing else.
    """
    spec = upstream_shapes(cfg)
    missing = sorted(set(spec) - set(weights))
    unexpected = sorted(set(weights) - set(spec))
    if missing or unexpected:
        raise ValueError(f"HiFT weights do not match the layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in spec.items():
        if tuple(weights[key].shape) != tuple(shape):
            raise ValueError(f"HiFT weight {key}: shape {tuple(weights[key].shape)}, expected {tuple(shape)}")

    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.endswith(WEIGHT_NORM_SUFFIXES[1]):
            continue
        if key.endswith(WEIGHT_NORM_SUFFIXES[0]):
            name = key[: -len(WEIGHT_NORM_SUFFIXES[0])]
            w = fold_weight_norm(np.asarray(value, dtype=np.float32), np.asarray(weights[name + WEIGHT_NORM_SUFFIXES[1]], dtype=np.float32))
            w = conv_transpose1d_from_torch(w) if name.startswith("ups.") else conv1d_from_torch(w)
            out[name + ".weight"] = mx.array(w)
        elif value.ndim == 3:  # source_downs: plain Conv1d
            out[key] = mx.array(conv1d_from_torch(np.asarray(value, dtype=np.float32)))
        else:  # Linear weights, biases, Snake alphas (kept float32)
            out[key] = mx.array(np.asarray(value, dtype=np.float32))
    return out

