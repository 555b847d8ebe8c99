"""T3: Chatterbox's text-to-speech-token language model (a 0.5B Llama), on MLX.

Port of chatterbox-tts 0.1.7 `models/t3` (t3.py, modules/cond_enc.py, modules/perceiver.py,
inference/t3_hf_backend.py) and of the HF `LlamaModel` it wraps (transformers 5.2). What the
reference does, and this module reproduces:

- Conditioning (`prepare_conditioning`): [speaker (1) | perceiver(prompt speech) (32) |
  emotion (1)] = 34 embeddings. The prompt speech tokens get `speech_emb` plus learned speech
  positions 0..P-1 before the perceiver; the perceiver is one attention block applied twice
  (cross, then self) with shared weights.
- Prefill: `[cond 34 | SOT text EOT | BOS | BOS]`, both BOS at learned speech position 0;
  the k-th generated token is fed back at learned speech position k+1. RoPE positions are
  the absolute index over the whole sequence, independent of the learned tables.
- CFG: batch 2; row 1 (unconditional) zeroes only the text *token* embeddings (the text
  position embeddings and the conditioning prefix stay). logits = c + w (c - u).
- Sampler order: CFG, repetition penalty (over BOS and every generated id, each distinct id
  once), temperature, min_p, top_p, multinomial.

The KV cache is an explicit `T3Cache` object; decode is one token per step and is bound by
per-step host overhead on a GPU, so the step function builds as small a graph as it can.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Iterator, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import sampling
from .conds import T3Cond
from .config import Config
from .sampling import SamplingParams, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_p, draw
from .tokenizer import wrap_text_tokens

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

PERCEIVER_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default, used by the perceiver block
CACHE_STEP = 256  # the KV cache grows in blocks of this many positions
MTL_TEXT_VOCAB_SIZE = 2454  # T3Config.multilingual()
# alignment_stream_analyzer.LLAMA_ALIGNED_HEADS: (layer, head) of the full backbone.
LLAMA_ALIGNED_HEADS = ((12, 15), (13, 11), (9, 2))
TINY_ALIGNED_HEADS = ((1, 3), (1, 1), (0, 2))  # the same roles inside T3Config.tiny()


def _default_rope_scaling() -> dict:
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@dataclass
class T3Config(Config):
    """T3 dimensions. Field names follow upstream's LlamaConfig dict and T3Config."""

    # Llama backbone (LLAMA_520M_CONFIG_DICT)
    num_hidden_layers: int = 30
    hidden_size: int = 1024
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict = field(default_factory=_default_rope_scaling)
    vocab_size: int = 8  # the backbone's dummy embed_tokens (in the checkpoint, never used)
    # T3 (modules/t3_config.py)
    text_tokens_dict_size: int = 704
    speech_tokens_dict_size: int = 8194
    max_text_tokens: int = 2048
    max_speech_tokens: int = 4096
    start_text_token: int = 255
    stop_text_token: int = 0
    start_speech_token: int = 6561
    stop_speech_token: int = 6562
    speaker_embed_size: int = 256
    speech_cond_prompt_len: int = 150
    # Perceiver resampler (modules/perceiver.py defaults)
    perceiver_query_tokens: int = 32
    perceiver_heads: int = 4
    # Multilingual only: the (layer, head) pairs whose attention tracks the text
    # (alignment_stream_analyzer.LLAMA_ALIGNED_HEADS); None for English.
    alignment_heads: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def full(cls) -> "T3Config":
        return cls()

    @classmethod
    def tiny(cls) -> "T3Config":
        """A few-MB model for tests. Token ids, vocabularies and position tables keep their
        real sizes (the special ids 6561/6562 and long generations must still work); head_dim
        stays 64 so the llama3 RoPE frequencies are the real ones."""
        return cls(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                   head_dim=64, intermediate_size=512, perceiver_heads=4)

    @property
    def is_multilingual(self) -> bool:
        """Upstream's test (T3Config.is_multilingual): the 2454-id text vocabulary."""
        return self.text_tokens_dict_size == MTL_TEXT_VOCAB_SIZE

    def multilingual(self) -> "T3Config":
        """This config with T3Config.multilingual()'s text vocabulary and aligned heads
        (upstream's for the full 30x16 backbone; ones inside the tiny backbone otherwise)."""
        full = self.num_hidden_layers == 30 and self.num_attention_heads == 16
        heads = LLAMA_ALIGNED_HEADS if full else TINY_ALIGNED_HEADS
        if any(layer >= self.num_hidden_layers or head >= self.num_attention_heads for layer, head in heads):
            raise ValueError("the backbone is too small for the aligned heads")
        return replace(self, text_tokens_dict_size=MTL_TEXT_VOCAB_SIZE, alignment_heads=heads)

    @property
    def cond_len(self) -> int:
        """Conditioning embeddings: speaker + perceiver queries + emotion."""
        return 1 + self.perceiver_query_tokens + 1


def upstream_shapes(cfg: T3Config) -> dict[str, tuple[int, ...]]:
    """Every key of t3_cfg.safetensors (no prefix) with its PyTorch shape: 292 for any config."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tfmr.embed_tokens.weight": (cfg.vocab_size, d)}
    for n in range(cfg.num_hidden_layers):
        p = f"tfmr.layers.{n}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (i, d)
        shapes[p + "mlp.up_proj.weight"] = (i, d)
        shapes[p + "mlp.down_proj.weight"] = (d, i)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["tfmr.norm.weight"] = (d,)
    shapes["cond_enc.spkr_enc.weight"] = (d, cfg.speaker_embed_size)
    shapes["cond_enc.spkr_enc.bias"] = (d,)
    shapes["cond_enc.emotion_adv_fc.weight"] = (d, 1)
    shapes["cond_enc.perceiver.pre_attention_query"] = (1, cfg.perceiver_query_tokens, d)
    shapes["cond_enc.perceiver.attn.norm.weight"] = (d,)
    shapes["cond_enc.perceiver.attn.norm.bias"] = (d,)
    for name in ("to_q", "to_k", "to_v", "proj_out"):
        shapes[f"cond_enc.perceiver.attn.{name}.weight"] = (d, d)
        shapes[f"cond_enc.perceiver.attn.{name}.bias"] = (d,)
    shapes["text_emb.weight"] = (cfg.text_tokens_dict_size, d)
    shapes["speech_emb.weight"] = (cfg.speech_tokens_dict_size, d)
    shapes["text_pos_emb.emb.weight"] = (cfg.max_text_tokens + 2, d)
    shapes["speech_pos_emb.emb.weight"] = (cfg.max_speech_tokens + 2 + 2, d)
    shapes["text_head.weight"] = (cfg.text_tokens_dict_size, d)
    shapes["speech_head.weight"] = (cfg.speech_tokens_dict_size, d)
    return shapes


# Merged at conversion: one matmul (one kernel launch) per group in each decode step, where
# decoding is launch-bound. Rows are concatenated along the output axis, so quantization
# groups (along the input axis) are unchanged and so are the quantized values.
MERGED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def checked_float32(weights: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], name: str,
                    drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """`weights` as float32 arrays, after checking that their keys and shapes are exactly
    `expected` (ValueError naming `name` and the first differences otherwise). Keys in `drop`
    are checked but not returned."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{name} weights do not match the config: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    arrays = {}
    for key, shape in expected.items():
        value = np.asarray(weights[key])
        if tuple(value.shape) != shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {shape}")
        if key not in drop:
            arrays[key] = value.astype(np.float32, copy=False)
    return arrays


def convert_weights(weights: dict[str, np.ndarray], cfg: T3Config) -> dict[str, mx.array]:
    """Upstream T3 tensors -> MLX parameters (float32). Keys map to themselves (all layers
    are Linear/Embedding/norms, whose torch layout is MLX's), except each layer's q/k/v and
    gate/up projections, which are concatenated into `qkv_proj` and `gate_up_proj`
    (MERGED_PROJECTIONS). Strict: keys and shapes must equal `upstream_shapes(cfg)`."""
    arrays = checked_float32(weights, upstream_shapes(cfg), "T3")
    for n in range(cfg.num_hidden_layers):
        prefix = f"tfmr.layers.{n}."
        for merged, parts in MERGED_PROJECTIONS.items():
            arrays[prefix + merged + ".weight"] = np.concatenate([arrays.pop(prefix + p + ".weight") for p in parts])
    return {key: mx.array(value) for key, value in arrays.items()}


def load_parameters(model: M, params: dict[str, mx.array], dtype: mx.Dtype = mx.float32) -> M:
    """`model` with `params` loaded strictly, cast to `dtype` and evaluated."""
    model.load_weights(list(params.items()), strict=True)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def build_t3(weights: dict[str, np.ndarray], cfg: T3Config, dtype: mx.Dtype = mx.float32) -> "T3":
    """A T3 loaded strictly from upstream tensors, cast to `dtype` (float32 is the reference's)."""
    return load_parameters(T3(cfg), convert_weights(weights, cfg), dtype)


def llama3_rope_periods(cfg: T3Config) -> np.ndarray:
    """Per-pair RoPE periods (1 / inverse frequency) with HF's llama3 scaling, (head_dim/2,).

    The scaling changes the low-frequency pairs even for short sequences, so plain RoPE with
    theta 5e5 would be wrong. Same arithmetic as transformers' `_compute_llama3_parameters`
    (float32, as HF computes it).
    """
    dim = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None or rs.get("rope_type", "default") == "default":
        return (1.0 / inv_freq).astype(np.float32)
    if rs["rope_type"] != "llama3":
        raise ValueError(f"unsupported rope_type {rs['rope_type']!r}")
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return (1.0 / inv_freq).astype(np.float32)


# ---------------------------------------------------------------------------------------
# KV cache


class T3Cache:
    """Keys and values of every layer, (B, kv_heads, capacity, head_dim) each, filled up to
    `offset` positions; `offset` is also the RoPE position of the next input.

    Passed explicitly into `T3.forward`/`prefill`/`step` and returned by them. Those calls
    update it in place (the buffers grow by CACHE_STEP positions at a time, so a step writes
    one slice instead of copying the whole history); keep no other reference to an old one.
    """

    def __init__(self, num_layers: int, batch: int) -> None:
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.offset = 0
        self.batch = batch

    def update(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store (B, H, L, hd) keys/values at positions offset..offset+L-1 of `layer`; return
        everything cached so far for it, (B, H, offset+L, hd). `offset` advances in
        `advance`, once all layers have been updated."""
        start, length = self.offset, keys.shape[2]
        end = start + length
        k_buf, v_buf = self.keys[layer], self.values[layer]
        if k_buf is None or end > k_buf.shape[2]:
            b, h, _, hd = keys.shape
            grow = ((length + CACHE_STEP - 1) // CACHE_STEP) * CACHE_STEP
            new_k = mx.zeros((b, h, grow, hd), dtype=keys.dtype)
            new_v = mx.zeros((b, h, grow, values.shape[3]), dtype=values.dtype)
            if k_buf is None:
                k_buf, v_buf = new_k, new_v
            else:
                k_buf = mx.concatenate([k_buf[:, :, :start], new_k], axis=2)
                v_buf = mx.concatenate([v_buf[:, :, :start], new_v], axis=2)
        k_buf[:, :, start:end, :] = keys
        v_buf[:, :, start:end, :] = values
        self.keys[layer], self.values[layer] = k_buf, v_buf
        return k_buf[:, :, :end, :], v_buf[:, :, :end, :]

    def advance(self, length: int) -> None:
        self.offset += length

    def state(self) -> list[mx.array]:
        """The arrays to evaluate so the cache holds no pending graph."""
        return [a for a in self.keys + self.values if a is not None]


class AttentionProbe:
    """Attention weights of chosen heads of batch row 0 (the conditional row), as HF's
    eager attention returns them with output_attentions=True: softmax(q k^T scale + causal
    mask) in float32. Pass one to `T3.prefill`/`step`; after the call `weights[n]` is the
    (L, S) matrix of heads[n]. Only the probed layers do any extra work."""

    def __init__(self, heads: list) -> None:
        self.heads = [(int(layer), int(head)) for layer, head in heads]
        self.layers = {layer for layer, _ in self.heads}
        self.weights: list[mx.array | None] = [None] * len(self.heads)

    def record(self, layer: int, q: mx.array, k: mx.array, scale: float, group: int) -> None:
        """q (B, H, L, hd) and k (B, kv_heads, S, hd), both after RoPE, k the whole cache."""
        for n, (probe_layer, head) in enumerate(self.heads):
            if probe_layer != layer:
                continue
            scores = (q[0, head].astype(mx.float32) @ k[0, head // group].astype(mx.float32).T) * scale  # (L, S)
            length, total = scores.shape
            if length > 1:  # query i sits at absolute position total - length + i
                visible = mx.arange(total)[None] <= mx.arange(total - length, total)[:, None]
                scores = mx.where(visible, scores, -mx.inf)
            self.weights[n] = mx.softmax(scores, axis=-1)


# ---------------------------------------------------------------------------------------
# Llama backbone (names follow transformers' LlamaModel so the checkpoint keys map 1:1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: T3Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        d = cfg.hidden_size
        # q_proj, k_proj and v_proj of the checkpoint, stacked (MERGED_PROJECTIONS)
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        # Leading underscore: a constant, not a parameter (MLX skips such attributes).
        self._rope_periods = mx.array(llama3_rope_periods(cfg))

    def __call__(self, x: mx.array, cache: T3Cache, layer: int, probe: "AttentionProbe | None" = None) -> mx.array:
        """x (B, L, D) -> (B, L, D); attends to the cache plus x, causally. A probe
        records the attention weights of its heads of this layer."""
        b, length, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, length, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)  # (B, H + 2 KV, L, hd)
        q = qkv[:, : self.n_heads]
        k = qkv[:, self.n_heads : self.n_heads + self.n_kv_heads]
        v = qkv[:, self.n_heads + self.n_kv_heads :]
        # HF "rotate half" RoPE at absolute positions offset..offset+L-1.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=None, scale=1.0, offset=cache.offset,
                         freqs=self._rope_periods)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=None, scale=1.0, offset=cache.offset,
                         freqs=self._rope_periods)
        k, v = cache.update(layer, k, v)
        if probe is not None:
            probe.record(layer, q, k, self.scale, self.n_heads // self.n_kv_heads)
        # "causal" aligns the last query with the last key, which is what a chunk appended
        # to a cache needs; a single query sees everything.
        mask = "causal" if length > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: T3Config) -> None:
        super().__init__()
        # gate_proj and up_proj of the checkpoint, stacked (MERGED_PROJECTIONS)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: T3Config) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        # mx.fast.rms_norm accumulates in float32 whatever the input dtype, as HF's does.
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: T3Cache, layer: int, probe: "AttentionProbe | None" = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache, layer, probe)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: T3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # unused, as upstream
        self.layers = [LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, embeds: mx.array, cache: T3Cache, probe: "AttentionProbe | None" = None) -> mx.array:
        """embeds (B, L, D) -> hidden state after the final RMSNorm (B, L, D)."""
        h = embeds
        for n, layer in enumerate(self.layers):
            h = layer(h, cache, n, probe if probe is not None and n in probe.layers else None)
        cache.advance(embeds.shape[1])
        return self.norm(h)


# ---------------------------------------------------------------------------------------
# Conditioning encoder


class AttentionBlock2(nn.Module):
    """Upstream's perceiver block: shared LayerNorm on both inputs, q/k/v/out projections
    with bias, softmax attention with scale 1/sqrt(head_dim), residual on the query side."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels, eps=PERCEIVER_LAYER_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x1: mx.array, x2: mx.array) -> mx.array:
        """x1 (B, Lq, C) attends to x2 (B, Lk, C) -> (B, Lq, C)."""
        b, lq, c = x1.shape
        lk = x2.shape[1]
        hd = c // self.num_heads
        n1, n2 = self.norm(x1), self.norm(x2)
        q = self.to_q(n1).reshape(b, lq, self.num_heads, hd).transpose(0, 2, 1, 3)
        k = self.to_k(n2).reshape(b, lk, self.num_heads, hd).transpose(0, 2, 1, 3)
        v = self.to_v(n2).reshape(b, lk, self.num_heads, hd).transpose(0, 2, 1, 3)
        h = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)
        h = h.transpose(0, 2, 1, 3).reshape(b, lq, c)
        return x1 + self.proj_out(h)


class Perceiver(nn.Module):
    def __init__(self, query_tokens: int, channels: int, num_heads: int) -> None:
        super().__init__()
        self.pre_attention_query = mx.zeros((1, query_tokens, channels))
        self.attn = AttentionBlock2(channels, num_heads)

    def __call__(self, h: mx.array) -> mx.array:
        """h (B, P, C) -> (B, query_tokens, C): cross-attention, then self-attention, with the
        same block both times."""
        query = mx.broadcast_to(self.pre_attention_query, (h.shape[0],) + self.pre_attention_query.shape[1:])
        pre_att = self.attn(query, h)
        return self.attn(pre_att, pre_att)


class T3CondEnc(nn.Module):
    def __init__(self, cfg: T3Config) -> None:
        super().__init__()
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.hidden_size)
        self.emotion_adv_fc = nn.Linear(1, cfg.hidden_size, bias=False)
        self.perceiver = Perceiver(cfg.perceiver_query_tokens, cfg.hidden_size, cfg.perceiver_heads)


class LearnedPositionEmbeddings(nn.Module):
    def __init__(self, seq_len: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(seq_len, dim)


# ---------------------------------------------------------------------------------------
# T3


def token_array(token: mx.array | int) -> mx.array:
    """A generated token id as a (1,) int32 array."""
    if isinstance(token, int):
        return mx.array([token], dtype=mx.int32)
    return token.reshape(1)


class T3Base(nn.Module):
    """What T3 and Turbo T3 (models/t3_turbo.py) share around their backbones.

    The constructor sets `cfg`, the backbone `tfmr` (called as tfmr(embeds (B, L, D), cache,
    ...) -> hidden (B, L, D), advancing the cache), `cond_enc` (with `spkr_enc`), `text_emb`
    and `speech_emb`; a subclass adds its heads (`speech_head`) and position tables. Logits
    are always float32. For `generate_tokens` a subclass also gives its sampler settings
    (`sampling_defaults`, `sample`), its checks (`check_request`) and its prefill (`start`).
    """

    sampling_defaults: sampling.SamplingParams | sampling.TurboSamplingParams
    penalise_bos_after_first = True  # the repetition penalty keeps counting BOS after the first token

    def __init__(self, cfg, num_layers: int, width: int, tfmr: nn.Module, cond_enc: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_layers = num_layers
        self.tfmr = tfmr
        self.cond_enc = cond_enc
        self.text_emb = nn.Embedding(cfg.text_tokens_dict_size, width)
        self.speech_emb = nn.Embedding(cfg.speech_tokens_dict_size, width)

    @property
    def dtype(self) -> mx.Dtype:
        return self.speech_emb.weight.dtype

    def make_cache(self, batch: int = 1) -> T3Cache:
        return T3Cache(self.num_layers, batch)

    def speech_logits(self, hidden: mx.array) -> mx.array:
        """Hidden states (..., D) -> float32 speech logits (..., V)."""
        return self.speech_head(hidden).astype(mx.float32)

    def forward(self, embeds: mx.array, cache: T3Cache | None = None) -> tuple[mx.array, T3Cache]:
        """embeds (B, L, D) -> (float32 speech logits (B, L, V), cache). A fresh cache when
        None; the input is appended after the cached positions."""
        if cache is None:
            cache = self.make_cache(embeds.shape[0])
        return self.speech_logits(self.tfmr(embeds, cache)), cache

    def last_logits(self, embeds: mx.array, cache: T3Cache, **backbone) -> mx.array:
        """Run `embeds` (B, L, D) after the cache; the last position's logits (B, V)."""
        return self.speech_logits(self.tfmr(embeds, cache, **backbone)[:, -1, :])

    def speaker_and_prompt(self, cond: T3Cond, embed_prompt) -> tuple[mx.array, mx.array | None]:
        """The speaker projection (B, 1, D) and the prompt speech embeddings (B, P, D) in the
        model's dtype: `cond.cond_prompt_speech_emb` when given (upstream caches it there),
        else `embed_prompt(tokens)` of the prompt tokens, else None."""
        speaker = cond.speaker_emb.reshape(-1, self.cfg.speaker_embed_size).astype(self.dtype)
        prompt = cond.cond_prompt_speech_emb
        if prompt is None and cond.cond_prompt_speech_tokens is not None:
            prompt = embed_prompt(cond.cond_prompt_speech_tokens.astype(mx.int32))
        return self.cond_enc.spkr_enc(speaker)[:, None], None if prompt is None else prompt.astype(self.dtype)


class T3(T3Base):
    """The whole T3. Attribute names equal the checkpoint's key segments.

    Text token sequences given to `prefill_embeds`/`prefill`/`teacher_forced_logits` are the
    exact sequence upstream feeds, i.e. already wrapped as [SOT] ids [EOT] (`wrap_text`).
    `generate_tokens` takes unwrapped ids and wraps them.

    The parameters are float32 (as the reference runs); `set_dtype(mx.bfloat16)` (or
    float16) casts them, and activations and the KV cache then follow; logits handed to the
    sampler are always float32.
    """

    sampling_defaults = sampling.ENGLISH

    def __init__(self, cfg: T3Config) -> None:
        d = cfg.hidden_size
        super().__init__(cfg, cfg.num_hidden_layers, d, LlamaModel(cfg), T3CondEnc(cfg))
        self.text_pos_emb = LearnedPositionEmbeddings(cfg.max_text_tokens + 2, d)
        self.speech_pos_emb = LearnedPositionEmbeddings(cfg.max_speech_tokens + 2 + 2, d)
        self.text_head = nn.Linear(d, cfg.text_tokens_dict_size, bias=False)  # unused at inference
        self.speech_head = nn.Linear(d, cfg.speech_tokens_dict_size, bias=False)

    def wrap_text(self, text_tokens: list[int]) -> mx.array:
        """Tokenizer ids (T,) -> [start_text_token] ids [stop_text_token], (T + 2,) int32,
        with the config's ids (upstream `generate` pads the token tensor so)."""
        ids = [int(t) for t in text_tokens]
        return mx.array(wrap_text_tokens(ids, self.cfg.start_text_token, self.cfg.stop_text_token), dtype=mx.int32)

    # -- conditioning and embeddings --------------------------------------------------

    def prompt_speech_embeds(self, tokens: mx.array) -> mx.array:
        """Prompt speech tokens (1, P) -> speech_emb + learned speech positions 0..P-1, (1, P, D)
        (what upstream caches as `cond_prompt_speech_emb`)."""
        return self.speech_emb(tokens) + self.speech_pos_emb.emb(mx.arange(tokens.shape[1]))

    def prepare_conditioning(self, cond: T3Cond) -> mx.array:
        """T3Cond -> conditioning embeddings (1, 34, D): speaker, perceiver(prompt), emotion.
        Without a prompt (neither embeddings nor tokens) the perceiver part is empty."""
        speaker, prompt = self.speaker_and_prompt(cond, self.prompt_speech_embeds)
        parts = [speaker]  # (B, 1, D)
        if prompt is not None:
            parts.append(self.cond_enc.perceiver(prompt))  # (B, 32, D)
        parts.append(self.cond_enc.emotion_adv_fc(cond.emotion_adv.reshape(-1, 1, 1).astype(self.dtype)))  # (B, 1, D)
        return mx.concatenate(parts, axis=1)

    def prefill_embeds(self, cond_emb: mx.array, text_tokens: mx.array, use_cfg: bool = True) -> mx.array:
        """[cond | text | BOS | BOS] input embeddings, (B, C + T + 2, D), B = 2 with CFG.

        cond_emb (1, C, D) from `prepare_conditioning`; text_tokens (T,) int, SOT/EOT included.
        Row 1 (CFG's unconditional row) has zero text *token* embeddings but keeps the text
        position embeddings. Both BOS carry learned speech position 0.
        """
        t = text_tokens.shape[0]
        text = self.text_emb(text_tokens.astype(mx.int32))[None]  # (1, T, D)
        if use_cfg:
            text = mx.concatenate([text, mx.zeros_like(text)], axis=0)  # (2, T, D)
        text = text + self.text_pos_emb.emb(mx.arange(t))
        b = text.shape[0]
        bos = self.speech_emb(mx.array([self.cfg.start_speech_token])) + self.speech_pos_emb.emb(mx.array([0]))  # (1, D)
        bos = mx.broadcast_to(bos, (b, 2, bos.shape[-1]))
        cond = mx.broadcast_to(cond_emb, (b,) + cond_emb.shape[1:])
        return mx.concatenate([cond, text, bos], axis=1)

    def speech_embeds(self, tokens: mx.array, first_position: int) -> mx.array:
        """Generated speech tokens (N,) -> (1, N, D) with learned speech positions
        first_position.. (the k-th generated token sits at position k + 1)."""
        n = tokens.shape[0]
        positions = mx.arange(first_position, first_position + n)
        return (self.speech_emb(tokens.astype(mx.int32)) + self.speech_pos_emb.emb(positions))[None]

    # -- forward passes -----------------------------------------------------------------

    def prefill(self, cond_emb: mx.array, text_tokens: mx.array, use_cfg: bool = True,
                probe: "AttentionProbe | None" = None) -> tuple[mx.array, T3Cache]:
        """Run the prefill (batch 2 with CFG, else 1); returns the last position's float32
        logits (B, V) and the cache."""
        embeds = self.prefill_embeds(cond_emb, text_tokens, use_cfg)
        cache = self.make_cache(embeds.shape[0])
        return self.last_logits(embeds, cache, probe=probe), cache

    def step(self, token: mx.array | int, position: int, cache: T3Cache,
             probe: "AttentionProbe | None" = None) -> tuple[mx.array, T3Cache]:
        """Feed one generated token (id as int or (1,) array) at learned speech position
        `position` (k + 1 for the k-th generated token) to every row; returns float32 logits
        (B, V) and the cache."""
        # Module calls rather than weight indexing, so a quantized embedding works too.
        emb = self.speech_emb(token_array(token)) + self.speech_pos_emb.emb(mx.array([position]))  # (1, D)
        emb = mx.broadcast_to(emb[None], (cache.batch, 1, emb.shape[-1]))
        return self.last_logits(emb, cache, probe=probe), cache

    # -- generate_tokens ---------------------------------------------------------------

    @property
    def key_count(self) -> int:
        """PRNG keys split per request: one per learned speech position."""
        return self.cfg.max_speech_tokens + 4

    def check_request(self, text_tokens: list[int], max_new_tokens: int) -> None:
        """ValueError unless the text and the speech budget fit the learned position tables."""
        cfg = self.cfg
        if max_new_tokens < 0 or max_new_tokens > cfg.max_speech_tokens + 3:
            raise ValueError(f"max_new_tokens must be in 0..{cfg.max_speech_tokens + 3} (learned speech positions)")
        if len(text_tokens) > cfg.max_text_tokens:
            raise ValueError(f"text is {len(text_tokens)} tokens; T3 takes at most {cfg.max_text_tokens}")

    def start(self, cond: T3Cond, text_tokens: list[int], params: SamplingParams, max_new_tokens: int):
        """Prefill [cond | SOT text EOT | BOS | BOS] (CFG's batch 2 unless cfg_weight is 0);
        returns its logits (B, V) and step(token, k), which feeds generated token k - 1 at
        learned speech position k and returns the next logits."""
        logits, cache = self.prefill(self.prepare_conditioning(cond), self.wrap_text(text_tokens),
                                     use_cfg=params.cfg_weight > 0)
        return logits, lambda token, position: self.step(token, position, cache)[0]

    def sample(self, logits: mx.array, seen: mx.array | None, params: SamplingParams, key: mx.array) -> mx.array:
        return sample_token(logits, seen, params, key)

    def teacher_forced_logits(self, cond_emb: mx.array, text_tokens: mx.array, speech_tokens: mx.array,
                              use_cfg: bool = True) -> mx.array:
        """One forward pass over [cond | text | BOS | BOS | speech_tokens] (speech token k at
        learned position k+1) -> float32 logits (B, C + T + 2 + N, V). Position C+T+1+k
        predicts generated token k, exactly as the cached decode does."""
        embeds = self.prefill_embeds(cond_emb, text_tokens, use_cfg)
        if speech_tokens.shape[0]:
            speech = mx.broadcast_to(self.speech_embeds(speech_tokens, 1), (embeds.shape[0],) + (speech_tokens.shape[0], embeds.shape[-1]))
            embeds = mx.concatenate([embeds, speech], axis=1)
        logits, _ = self.forward(embeds)
        return logits


# ---------------------------------------------------------------------------------------
# Sampler (upstream order: CFG, repetition penalty, temperature, min_p, top_p, multinomial;
# the steps and each family's defaults are in models/sampling.py)


def cfg_combine(logits: mx.array, cfg_weight: float) -> mx.array:
    """(B, V) -> (1, V): cond + w (cond - uncond) with batch 2; batch 1 passes through."""
    cond = logits[0:1]
    if logits.shape[0] == 1:
        return cond
    return cond + cfg_weight * (cond - logits[1:2])


def process_logits(logits: mx.array, seen: mx.array | None, params: SamplingParams) -> mx.array:
    """Model logits (B, V) float32 -> the logits multinomial samples from, (1, V).

    seen: (V,) bool, True for BOS and every id generated so far (None: no penalty).
    Each step of HF's processors, in the reference's order.
    """
    x = cfg_combine(logits, params.cfg_weight)
    x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    x = apply_temperature(x, params.temperature)
    x = apply_min_p(x, params.min_p)
    return apply_top_p(x, params.top_p)


def _sample(logits: mx.array, seen: mx.array | None, params: SamplingParams, key: mx.array | None) -> mx.array:
    return draw(process_logits(logits, seen, params), params.temperature, key)


# The sampler is ~20 small ops per decode step; on GPU backends (launch-bound at batch 2)
# it runs as one mx.compile'd function per set of sampling parameters: "auto" = on where
# the default device is a GPU, off on the CPU backend (compiling shells out to a C++
# compiler there); "on" / "off" force it.
COMPILE_SAMPLER = "auto"


@functools.lru_cache(maxsize=16)
def _compiled_sampler(params: SamplingParams, with_seen: bool):
    if with_seen:
        return mx.compile(lambda logits, seen, key: _sample(logits, seen, params, key))
    return mx.compile(lambda logits, key: _sample(logits, None, params, key))


def sample_token(logits: mx.array, seen: mx.array | None, params: SamplingParams, key: mx.array | None) -> mx.array:
    """Model logits (B, V) -> next token id, (1,) int32 (lazy). Greedy when temperature is 0."""
    compiled = mx.default_device() != mx.cpu if COMPILE_SAMPLER == "auto" else COMPILE_SAMPLER == "on"
    if not compiled or key is None:
        return _sample(logits, seen, params, key)
    if seen is None:
        return _compiled_sampler(params, False)(logits, key)
    return _compiled_sampler(params, True)(logits, seen, key)


def generate_tokens(
    t3: T3Base,
    cond: T3Cond,
    text_tokens: list[int],
    *,
    max_new_tokens: int = 1000,
    seed: int | None = None,
    cancel: threading.Event | None = None,
    defaults: SamplingParams | sampling.TurboSamplingParams | None = None,
    **options: float | None,
) -> Iterator[int]:
    """Yield speech tokens one by one as T3 (upstream `T3.inference`) or Turbo T3
    (`inference_turbo`, models/t3_turbo.py) samples them.

    text_tokens: the tokenizer's ids of the normalised text; T3 wraps them in SOT/EOT here,
    as upstream's `generate` does (Turbo adds nothing). Every sampled token is yielded,
    including ids >= 6561 (they are fed back like any other; filter them before S3Gen); EOS
    (6562) is not yielded and ends the generator. At most `max_new_tokens` tokens are
    sampled (EOS counts). `options` (T3: cfg_weight, temperature, repetition_penalty, min_p,
    top_p; Turbo: temperature, top_k, top_p, repetition_penalty) set the sampler; None or
    absent: `defaults`, else the model's `sampling_defaults` (models/sampling.py). With
    cfg_weight 0 T3 skips the unconditional row (batch 1): the logits equal what upstream's
    c + 0 (c - u) gives, where upstream itself crashes. `seed` fixes the mx.random key
    (None: a random seed). `cancel` (threading.Event or None) is checked before each step;
    when set, Cancelled (models/chunks.py) is raised.
    """
    params = (defaults or t3.sampling_defaults).with_options(**options)
    t3.check_request(text_tokens, max_new_tokens)
    if max_new_tokens == 0:
        return
    keys = sampling.step_keys(seed, t3.key_count)  # (S, 2)
    logits, step = t3.start(cond, text_tokens, params, max_new_tokens)
    cfg = t3.cfg
    yield from sampling.decode(
        logits, step, lambda x, seen, key: t3.sample(x, seen, params, key), keys,
        max_new_tokens=max_new_tokens, vocab_size=cfg.speech_tokens_dict_size, bos=cfg.start_speech_token,
        eos=cfg.stop_speech_token, penalise=params.repetition_penalty != 1.0,
        penalise_bos_after_first=t3.penalise_bos_after_first, cancel=cancel,
    )
