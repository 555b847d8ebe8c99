"""S3Gen's flow: speech tokens -> 80-bin log-mel (CausalMaskedDiffWithXvec + CausalConditionalCFM).

Port of chatterbox/models/s3gen/flow.py and flow_matching.py (inference only). The
pipeline for one utterance:

1. tokens = [prompt_token | token] are embedded (input_embedding) and encoded
   (UpsampleConformerEncoder, 2 mel frames per token) and projected to 80 dims: `mu`.
2. The x-vector is L2-normalised and projected to 80 dims: `spks`.
3. `cond` holds the prompt mel in its first frames and zeros after.
4. The CFM integrates the estimator's velocity from noise z with Euler steps on a cosine
   time schedule, with classifier-free guidance (the unconditional row zeroes mu, spks and
   cond) computed as batch 2 in one estimator call.
5. The prompt's frames are sliced off the output.

Noise is always explicit: callers pass it, or pass an `mx.random` key. `fixed_noise`
gives position-indexed noise, so overlapping windows of a stream see identical noise on
the frames they share (upstream 0.1.7 draws fresh noise per call, so two windows would
disagree on their overlap; models/streaming.py relies on this).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..chunks import check_cancel
from ..config import Config
from ..convert import conv1d_from_torch
from .encoder import UpsampleConformerEncoder
from .estimator import ConditionalDecoder

logger = logging.getLogger(__name__)

L2_NORM_EPS = 1e-12  # F.normalize default
# Whether each CFM step (estimator batch + guidance + Euler update) runs as one mx.compile'd
# function: "auto" = on GPU backends (Metal, CUDA), where per-op launch and host overhead
# dominate a step and compiling fuses the elementwise ops and replays the graph without
# Python; off on the CPU backend (compiling shells out to a C++ compiler there, seconds per
# new kernel, for no measured gain). "on" / "off" force it. A window shape is compiled the
# second time it is seen (tracing costs about one eager call): shapes that repeat (first
# and steady streaming chunks) run compiled, one-off shapes (a segment's last chunk) eager.
COMPILE_STEP = "auto"
NOISE_BLOCK_FRAMES = 1024  # fixed_noise draws noise in blocks of this many frames


@dataclass
class FlowConfig(Config):
    """Dimensions of the flow (field names follow upstream's constructor arguments)."""

    vocab_size: int = 6561
    input_size: int = 512  # token embedding width (= encoder width)
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192  # CAMPPlus x-vector
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    # encoder (UpsampleConformerEncoder)
    encoder_output_size: int = 512
    encoder_attention_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_num_blocks: int = 6
    encoder_num_up_blocks: int = 4  # hard-coded to 4 upstream
    # estimator (ConditionalDecoder)
    decoder_in_channels: int = 320  # x, mu, spks, cond: 4 x 80
    decoder_channels: tuple[int, ...] = (256,)
    decoder_attention_head_dim: int = 64
    decoder_n_blocks: int = 4
    decoder_num_mid_blocks: int = 12
    decoder_num_heads: int = 8
    # CFM
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10

    def __post_init__(self) -> None:
        self.decoder_channels = tuple(self.decoder_channels)
        if self.input_size != self.encoder_output_size:
            # upstream's pre_lookahead_layer and up_layer are built at the encoder width and
            # up_embed takes input_size, so the two must agree
            raise ValueError("input_size must equal encoder_output_size")
        if self.decoder_in_channels != 4 * self.output_size:
            raise ValueError("decoder_in_channels must be 4 * output_size ([x, mu, spks, cond])")

    @classmethod
    def full(cls) -> "FlowConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "FlowConfig":
        return cls(
            input_size=128,
            encoder_output_size=128,
            encoder_attention_heads=2,
            encoder_linear_units=256,
            encoder_num_blocks=2,
            encoder_num_up_blocks=2,
            decoder_channels=(64,),
            decoder_attention_head_dim=32,
            decoder_n_blocks=1,
            decoder_num_mid_blocks=2,
            decoder_num_heads=2,
        )


def _linear(out_dim: int, in_dim: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {"weight": (out_dim, in_dim)}
    if bias:
        shapes["bias"] = (out_dim,)
    return shapes


def _norm(dim: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (dim,), "bias": (dim,)}


def _conv(out_dim: int, in_dim: int, k: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (out_dim, in_dim, k), "bias": (out_dim,)}


def _prefixed(prefix: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def _encoder_shapes(cfg: FlowConfig) -> dict[str, tuple[int, ...]]:
    d, units, heads = cfg.encoder_output_size, cfg.encoder_linear_units, cfg.encoder_attention_heads
    s: dict[str, tuple[int, ...]] = {}
    for embed in ("embed", "up_embed"):
        s |= _prefixed(f"{embed}.out.0", _linear(d, cfg.input_size))
        s |= _prefixed(f"{embed}.out.1", _norm(d))
    s |= _prefixed("pre_lookahead_layer.conv1", _conv(d, d, cfg.pre_lookahead_len + 1))
    s |= _prefixed("pre_lookahead_layer.conv2", _conv(d, d, 3))
    s |= _prefixed("up_layer.conv", _conv(d, d, 2 * cfg.token_mel_ratio + 1))
    s |= _prefixed("after_norm", _norm(d))
    layers = [f"encoders.{i}" for i in range(cfg.encoder_num_blocks)]
    layers += [f"up_encoders.{i}" for i in range(cfg.encoder_num_up_blocks)]
    for layer in layers:
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s |= _prefixed(f"{layer}.self_attn.{name}", _linear(d, d))
        s[f"{layer}.self_attn.linear_pos.weight"] = (d, d)
        s[f"{layer}.self_attn.pos_bias_u"] = (heads, d // heads)
        s[f"{layer}.self_attn.pos_bias_v"] = (heads, d // heads)
        s |= _prefixed(f"{layer}.feed_forward.w_1", _linear(units, d))
        s |= _prefixed(f"{layer}.feed_forward.w_2", _linear(d, units))
        s |= _prefixed(f"{layer}.norm_ff", _norm(d))
        s |= _prefixed(f"{layer}.norm_mha", _norm(d))
    return s


def _estimator_shapes(cfg: FlowConfig) -> dict[str, tuple[int, ...]]:
    (c,) = cfg.decoder_channels
    time_dim = 4 * c
    inner = cfg.decoder_num_heads * cfg.decoder_attention_head_dim

    def causal_block(dim: int, dim_out: int) -> dict[str, tuple[int, ...]]:
        return _prefixed("block.0", _conv(dim_out, dim, 3)) | _prefixed("block.2", _norm(dim_out))

    def resnet(dim: int, dim_out: int) -> dict[str, tuple[int, ...]]:
        return (
            _prefixed("mlp.1", _linear(dim_out, time_dim))
            | _prefixed("block1", causal_block(dim, dim_out))
            | _prefixed("block2", causal_block(dim_out, dim_out))
            | _prefixed("res_conv", _conv(dim_out, dim, 1))
        )

    def transformer() -> dict[str, tuple[int, ...]]:
        s = _prefixed("norm1", _norm(c)) | _prefixed("norm3", _norm(c))
        for name in ("to_q", "to_k", "to_v"):
            s |= _prefixed(f"attn1.{name}", _linear(inner, c, bias=False))
        s |= _prefixed("attn1.to_out.0", _linear(c, inner))
        s |= _prefixed("ff.net.0.proj", _linear(4 * c, c))
        s |= _prefixed("ff.net.2", _linear(c, 4 * c))
        return s

    def transformers(prefix: str) -> dict[str, tuple[int, ...]]:
        s: dict[str, tuple[int, ...]] = {}
        for j in range(cfg.decoder_n_blocks):
            s |= _prefixed(f"{prefix}.{j}", transformer())
        return s

    s = _prefixed("time_mlp.linear_1", _linear(time_dim, cfg.decoder_in_channels))
    s |= _prefixed("time_mlp.linear_2", _linear(time_dim, time_dim))
    s |= _prefixed("down_blocks.0.0", resnet(cfg.decoder_in_channels, c))
    s |= transformers("down_blocks.0.1")
    s |= _prefixed("down_blocks.0.2", _conv(c, c, 3))
    for i in range(cfg.decoder_num_mid_blocks):
        s |= _prefixed(f"mid_blocks.{i}.0", resnet(c, c))
        s |= transformers(f"mid_blocks.{i}.1")
    s |= _prefixed("up_blocks.0.0", resnet(2 * c, c))
    s |= transformers("up_blocks.0.1")
    s |= _prefixed("up_blocks.0.2", _conv(c, c, 3))
    s |= _prefixed("final_block", causal_block(c, c))
    s |= _prefixed("final_proj", _conv(cfg.output_size, c, 1))
    return s


def upstream_shapes(cfg: FlowConfig) -> dict[str, tuple[int, ...]]:
    """Every key under `flow.` in s3gen.safetensors (relative to it), torch layout."""
    s = {"input_embedding.weight": (cfg.vocab_size, cfg.input_size)}
    s |= _prefixed("spk_embed_affine_layer", _linear(cfg.output_size, cfg.spk_embed_dim))
    s |= _prefixed("encoder_proj", _linear(cfg.output_size, cfg.encoder_output_size))
    s |= _prefixed("encoder", _encoder_shapes(cfg))
    s |= _prefixed("decoder.estimator", _estimator_shapes(cfg))
    return s


# The estimator's attention q/k/v are stacked into one projection at conversion (fewer
# launches in every CFM step; rows stack along the output axis, so quantization groups and
# values are unchanged).
MERGED_PROJECTIONS = {"attn1.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v")}


def convert_weights(weights: dict[str, np.ndarray], cfg: FlowConfig) -> dict[str, mx.array]:
    """Upstream `flow.`-relative keys (torch layout) -> Flow parameter names (MLX layout).

    Names are unchanged (the module mirrors the checkpoint) except the merged projections
    (MERGED_PROJECTIONS); every 3-D tensor is a Conv1d weight and changes layout. Strict:
    the key set must equal upstream_shapes(cfg).
    """
    expected = upstream_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"flow weights mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    arrays: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {expected[key]}")
        value = np.asarray(value, dtype=np.float32)
        arrays[key] = conv1d_from_torch(value) if value.ndim == 3 else value
    for merged, parts in MERGED_PROJECTIONS.items():
        first = "." + parts[0] + ".weight"
        for key in [k for k in arrays if k.endswith(first)]:
            prefix = key[: -len(first)]
            arrays[f"{prefix}.{merged}.weight"] = np.concatenate([arrays.pop(f"{prefix}.{p}.weight") for p in parts])
    return {key: mx.array(value) for key, value in arrays.items()}


def cosine_t_span(n_timesteps: int) -> np.ndarray:
    """(n+1,) float32 times 1 - cos(pi/2 * linspace(0, 1, n+1)), computed in float32."""
    t = np.linspace(0.0, 1.0, n_timesteps + 1, dtype=np.float32)
    return (np.float32(1.0) - np.cos(t * np.float32(0.5 * math.pi))).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _noise_block(seed: int, block: int) -> np.ndarray:
    """(80, NOISE_BLOCK_FRAMES) standard normal noise, a pure function of (seed, block)."""
    rng = np.random.default_rng([seed, block])
    return rng.standard_normal((80, NOISE_BLOCK_FRAMES), dtype=np.float32)


def fixed_noise(num_frames: int, seed: int = 0, start: int = 0, mel_bins: int = 80) -> mx.array:
    """Position-indexed CFM noise: frames [start, start + num_frames) -> (1, 80, num_frames).

    Frame i's noise depends only on (seed, i), never on the window asked for, so two
    overlapping windows get identical noise on their shared frames.
    """
    if mel_bins != 80:
        raise ValueError("fixed_noise draws 80-bin noise")
    if num_frames < 0 or start < 0:
        raise ValueError("num_frames and start must be >= 0")
    stop = start + num_frames
    first, last = start // NOISE_BLOCK_FRAMES, max(start, stop - 1) // NOISE_BLOCK_FRAMES
    blocks = np.concatenate([_noise_block(seed, b) for b in range(first, last + 1)], axis=1)
    offset = start - first * NOISE_BLOCK_FRAMES
    return mx.array(blocks[:, offset : offset + num_frames])[None]


def compile_steps() -> bool:
    if COMPILE_STEP == "auto":
        return mx.default_device() != mx.cpu
    if COMPILE_STEP not in ("on", "off"):
        raise ValueError(f"COMPILE_STEP must be 'auto', 'on' or 'off', not {COMPILE_STEP!r}")
    return COMPILE_STEP == "on"


class EulerSolver(nn.Module):
    """Fixed-step Euler integration of the estimator's velocity, dx/dt = v(x, t), from noise
    at t = 0 to t = 1 (`flow.decoder`; holds `estimator`). A subclass gives the time
    schedule (`t_span`) and the velocity (`velocity`); the loop, the float32 state and
    cancellation are shared."""

    def __init__(self, estimator: ConditionalDecoder):
        super().__init__()
        self.estimator = estimator

    def t_span(self, n_timesteps: int) -> np.ndarray:
        """(n + 1,) float32 times from 0 to 1."""
        raise NotImplementedError

    def conditioning(self, mu: mx.array, mask: mx.array | None, spks: mx.array, cond: mx.array) -> tuple:
        """(mu, mask, spks, cond) as every step passes them to `velocity` (built once per solve)."""
        return mu, mask, spks, cond

    def velocity(self, x: mx.array, t: mx.array, r: mx.array, mu: mx.array, spks: mx.array, cond: mx.array,
                 mask: mx.array | None = None) -> mx.array:
        """v (B, 80, T) float32 at x (B, 80, T) for the step from time t to r (0-d float32)."""
        raise NotImplementedError

    def euler_step(self, x: mx.array, t: mx.array, r: mx.array, mu: mx.array, spks: mx.array, cond: mx.array,
                   mask: mx.array | None = None) -> mx.array:
        """One Euler step from t to r (0-d float32): x + (r - t) v."""
        return x + (r - t) * self.velocity(x, t, r, mu, spks, cond, mask)

    def step_function(self, shape: tuple[int, ...]):
        """The unmasked Euler step for inputs of `shape` (eager here; see CausalConditionalCFM)."""
        return self.euler_step

    def solve_euler(
        self,
        z: mx.array,
        mu: mx.array,
        mask: mx.array | None,
        spks: mx.array,
        cond: mx.array,
        n_timesteps: int,
        cancel: threading.Event | None = None,
    ) -> mx.array:
        """x <- x + (r - t) v(x, t, r) over the schedule's steps, from x = z.

        z, mu, cond: (B, 80, T); mask (B, 1, T) or None (all valid); spks (B, 80). Returns
        (B, 80, T) float32: the state x stays float32 whatever the estimator's dtype.
        `cancel` (a threading.Event or None) is checked before each step; when set,
        Cancelled is raised.
        """
        mu, mask, spks, cond = self.conditioning(mu, mask, spks, cond)
        step = self.step_function(tuple(z.shape)) if mask is None else functools.partial(self.euler_step, mask=mask)
        t_span = self.t_span(n_timesteps)
        x = z.astype(mx.float32)
        previous = None
        for t, r in zip(t_span[:-1], t_span[1:]):
            check_cancel(cancel)
            if cancel is not None and previous is not None:
                # at most two steps in flight, so a cancel acts within about one step
                mx.eval(previous)
            previous = x
            x = step(x, mx.array(t), mx.array(r), mu, spks, cond)
            # start this step while Python builds the next one
            mx.async_eval(x)
        return x


class CausalConditionalCFM(EulerSolver):
    """The CFM sampler: a cosine time schedule and classifier-free guidance.

    v = (1 + g) v(x | mu, spks, cond) - g v(x | 0, 0, 0) with g = inference_cfg_rate; both
    rows go through the estimator as one batch of 2B.
    """

    def __init__(self, estimator: ConditionalDecoder, inference_cfg_rate: float = 0.7):
        super().__init__(estimator)
        self.inference_cfg_rate = inference_cfg_rate
        # mx.compile of `euler_step`, made on first use (after the weights are loaded: it
        # captures them), and how often each window shape was seen; the leading underscores
        # keep both out of the parameters
        self._compiled_step = None
        self._shapes_seen: dict[tuple[int, ...], int] = {}

    def t_span(self, n_timesteps: int) -> np.ndarray:
        return cosine_t_span(n_timesteps)

    def conditioning(self, mu: mx.array, mask: mx.array | None, spks: mx.array, cond: mx.array) -> tuple:
        """Rows [:B] conditional, [B:] unconditional (mu, spks and cond zeroed)."""
        mu_in = mx.concatenate([mu, mx.zeros_like(mu)], axis=0)
        spks_in = mx.concatenate([spks, mx.zeros_like(spks)], axis=0)
        cond_in = mx.concatenate([cond, mx.zeros_like(cond)], axis=0)
        return mu_in, None if mask is None else mx.concatenate([mask, mask], axis=0), spks_in, cond_in

    def velocity(self, x: mx.array, t: mx.array, r: mx.array, mu: mx.array, spks: mx.array, cond: mx.array,
                 mask: mx.array | None = None) -> mx.array:
        """The guided velocity; mu, spks, cond (and mask) are `conditioning`'s 2B rows."""
        b = x.shape[0]
        rate = self.inference_cfg_rate
        t_in = mx.full((2 * b,), t, dtype=mx.float32)
        v = self.estimator(mx.concatenate([x, x], axis=0), mask, mu, t_in, spks, cond)
        return ((1.0 + rate) * v[:b] - rate * v[b:]).astype(mx.float32)

    def step_function(self, shape: tuple[int, ...]):
        """The Euler step for inputs of `shape`: compiled once the shape repeats (COMPILE_STEP)."""
        if not compile_steps():
            return self.euler_step
        seen = self._shapes_seen.get(shape, 0)
        self._shapes_seen[shape] = seen + 1
        if not seen:
            return self.euler_step
        if self._compiled_step is None:
            self._compiled_step = mx.compile(self.euler_step)
        return self._compiled_step


def build_estimator(cfg: FlowConfig, meanflow: bool = False) -> ConditionalDecoder:
    """The flow's U-Net estimator at cfg's dimensions (meanflow: with the r-time mixer)."""
    return ConditionalDecoder(
        in_channels=cfg.decoder_in_channels,
        out_channels=cfg.output_size,
        channels=cfg.decoder_channels,
        attention_head_dim=cfg.decoder_attention_head_dim,
        n_blocks=cfg.decoder_n_blocks,
        num_mid_blocks=cfg.decoder_num_mid_blocks,
        num_heads=cfg.decoder_num_heads,
        meanflow=meanflow,
    )


class Flow(nn.Module):
    """CausalMaskedDiffWithXvec at inference: tokens (+ prompt, x-vector) -> log-mel."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(
            input_size=cfg.input_size,
            output_size=cfg.encoder_output_size,
            attention_heads=cfg.encoder_attention_heads,
            linear_units=cfg.encoder_linear_units,
            num_blocks=cfg.encoder_num_blocks,
            num_up_blocks=cfg.encoder_num_up_blocks,
            pre_lookahead_len=cfg.pre_lookahead_len,
            upsample_stride=cfg.token_mel_ratio,
        )
        self.encoder_proj = nn.Linear(cfg.encoder_output_size, cfg.output_size)
        self.decoder = self.build_decoder(cfg)

    @staticmethod
    def build_decoder(cfg: FlowConfig) -> EulerSolver:
        """`flow.decoder`: the CFM around the estimator."""
        return CausalConditionalCFM(build_estimator(cfg), cfg.inference_cfg_rate)

    @property
    def estimator(self) -> ConditionalDecoder:
        return self.decoder.estimator

    def encode(self, tokens: mx.array, token_lens: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """tokens (B, T) int32, token_lens (B,) or None -> (mu (B, 80, 2T), mask (B, 1, 2T) or None).

        mu is encoder_proj(encoder(embedding * pad mask)); the mask (None when token_lens
        is None) marks the valid frames.
        """
        x = self.input_embedding(tokens.astype(mx.int32))  # (B, T, D)
        if token_lens is not None:
            valid = mx.arange(tokens.shape[1])[None, :] < token_lens.astype(mx.int32)[:, None]
            x = x * valid[:, :, None].astype(x.dtype)
        h, mask = self.encoder(x, token_lens)
        mu = self.encoder_proj(h).transpose(0, 2, 1)
        return mu, None if mask is None else mask.astype(mx.float32)

    def speaker_projection(self, embedding: mx.array) -> mx.array:
        """x-vector (B, 192) -> L2-normalised -> spk_embed_affine_layer -> (B, 80)."""
        norm = mx.sqrt(mx.sum(embedding * embedding, axis=-1, keepdims=True))
        return self.spk_embed_affine_layer(embedding / mx.maximum(norm, L2_NORM_EPS))

    def inference(
        self,
        token: mx.array,
        prompt_token: mx.array,
        prompt_feat: mx.array,
        embedding: mx.array,
        *,
        noise: mx.array | None = None,
        key: mx.array | None = None,
        n_timesteps: int | None = None,
        frames: tuple[int, int] | None = None,
        cancel: threading.Event | None = None,
    ) -> mx.array:
        """Mel for `token` spoken in the prompt's voice.

        token (1, N) int32; prompt_token (1, P) int32; prompt_feat (1, M, 80) log-mel of the
        prompt (normally M = 2P); embedding (1, 192) raw x-vector. noise (1, 80, 2(P+N))
        covers the prompt frames too; if None it is drawn from `key` (required then).
        n_timesteps defaults to the config's (10). `frames` = (start, stop) selects output
        frames (relative to the first generated frame) to return; default all.

        Returns (1, 80, 2(P+N) - M), i.e. (1, 80, 2N) for M = 2P.

        For streaming, pass as `token` [left context | new tokens | lookahead] and the
        matching slice of `fixed_noise`; `frames` then picks the new tokens' frames.
        `cancel` (threading.Event or None) is checked between CFM steps (raises Cancelled).
        """
        n_timesteps = self.cfg.n_timesteps if n_timesteps is None else n_timesteps
        tokens = mx.concatenate([prompt_token.astype(mx.int32), token.astype(mx.int32)], axis=1)
        mu, _ = self.encode(tokens)  # (1, 80, 2(P+N)); batch 1 has no padding
        total = mu.shape[2]
        prompt_frames = prompt_feat.shape[1]
        if prompt_frames > total:
            raise ValueError(f"prompt_feat has {prompt_frames} frames, more than the {total} encoded")
        if noise is None:
            if key is None:
                raise ValueError("pass noise or an mx.random key")
            noise = mx.random.normal(mu.shape, key=key)
        elif tuple(noise.shape) != tuple(mu.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)}, expected {tuple(mu.shape)}")
        cond = mx.concatenate(
            [prompt_feat.transpose(0, 2, 1), mx.zeros((1, mu.shape[1], total - prompt_frames), dtype=mu.dtype)],
            axis=2,
        )
        spks = self.speaker_projection(embedding)
        mel = self.decoder.solve_euler(noise, mu, None, spks, cond, n_timesteps, cancel)[:, :, prompt_frames:]
        if frames is not None:
            mel = mel[:, :, frames[0] : frames[1]]
        return mel
