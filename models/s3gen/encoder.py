"""S3Gen's flow encoder: `UpsampleConformerEncoder` (tokens' embeddings -> 2x-rate features).

Port of chatterbox/models/s3gen/transformer/upsample_encoder.py with its pieces
(LinearNoSubsampling, EspnetRelPositionalEncoding, RelPositionMultiHeadedAttention,
ConformerEncoderLayer without macaron FFN or conv module). Attention is full
(bidirectional): the only mask is padding. Activations are (B, T, C) throughout.
"""

from __future__ import annotations

import functools
import logging
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .conv import conv1d

logger = logging.getLogger(__name__)

EMBED_LN_EPS = 1e-5  # LinearNoSubsampling's LayerNorm and after_norm
LAYER_LN_EPS = 1e-12  # norm_mha / norm_ff inside each conformer layer
LOOKAHEAD_LEAKY_SLOPE = 0.01  # F.leaky_relu default in PreLookaheadLayer


@functools.lru_cache(maxsize=32)
def _rel_position_table(length: int, d_model: int) -> np.ndarray:
    """ESPnet relative positional encoding for `length` frames: (2*length - 1, d_model).

    Row k encodes relative position r = (length - 1) - k, i.e. +(T-1) down to -(T-1), as
    interleaved [sin(r w_i), cos(r w_i)] with w_i = 10000^(-2i/d). The float32 products
    r * w_i are formed as the reference forms them (position * div_term in float32).
    """
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d_model)))
    rel = np.arange(length - 1, -length, -1, dtype=np.float32)
    angles = (rel[:, None] * div_term[None, :]).astype(np.float32)  # (2T-1, d/2)
    table = np.empty((2 * length - 1, d_model), dtype=np.float32)
    table[:, 0::2] = np.sin(angles.astype(np.float64))
    table[:, 1::2] = np.cos(angles.astype(np.float64))
    return table


def rel_position_encoding(length: int, d_model: int) -> mx.array:
    """(1, 2*length - 1, d_model) relative position embedding (see _rel_position_table)."""
    return mx.array(_rel_position_table(length, d_model))[None]


def rel_shift(x: mx.array) -> mx.array:
    """(B, H, T, 2T-1) scores against relative positions -> (B, H, T, T) against keys.

    out[..., i, j] = x[..., i, (T-1) - i + j]: pad one zero column on the left, view as
    (2T, T), drop the first row and view back (Transformer-XL's shift, as the reference).
    """
    b, h, t, p = x.shape
    x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (1, 0)])  # (B, H, T, 2T)
    x = x.reshape(b, h, p + 1, t)[:, :, 1:]  # (B, H, 2T-1, T)
    return x.reshape(b, h, t, p)[..., : p // 2 + 1]


class LinearNoSubsampling(nn.Module):
    """`embed` / `up_embed`: Linear -> LayerNorm(eps 1e-5), then x * sqrt(d) and a fresh
    relative position embedding (EspnetRelPositionalEncoding)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = [nn.Linear(idim, odim), nn.LayerNorm(odim, eps=EMBED_LN_EPS)]  # out.2 is Dropout
        self.xscale = math.sqrt(odim)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x (B, T, idim) -> (x (B, T, odim), pos_emb (1, 2T-1, odim))."""
        x = self.out[1](self.out[0](x)) * self.xscale
        return x, rel_position_encoding(x.shape[1], x.shape[2]).astype(x.dtype)


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet/WeNet multi-head attention with relative positions (Transformer-XL style).

    scores = ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k), p = linear_pos(pos_emb).
    """

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = mx.zeros((n_head, self.d_k))
        self.pos_bias_v = mx.zeros((n_head, self.d_k))

    def __call__(self, x: mx.array, pos_emb: mx.array, key_bias: mx.array | None) -> mx.array:
        """x (B, T, D), pos_emb (1, 2T-1, D), key_bias (B, 1, 1, T) additive or None."""
        b, t, _ = x.shape
        q = self.linear_q(x).reshape(b, t, self.h, self.d_k)
        k = self.linear_k(x).reshape(b, t, self.h, self.d_k).transpose(0, 2, 1, 3)
        v = self.linear_v(x).reshape(b, t, self.h, self.d_k).transpose(0, 2, 1, 3)
        p = self.linear_pos(pos_emb).reshape(1, -1, self.h, self.d_k).transpose(0, 2, 3, 1)  # (1, H, d_k, 2T-1)
        q_u = (q + self.pos_bias_u).transpose(0, 2, 1, 3)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(0, 2, 1, 3)
        scale = 1.0 / math.sqrt(self.d_k)
        # the positional term enters the fused attention as an additive score bias
        pos_scores = rel_shift(q_v @ p) * scale  # (B, H, T, T)
        if key_bias is not None:
            pos_scores = pos_scores + key_bias
        o = mx.fast.scaled_dot_product_attention(q_u, k, v, scale=scale, mask=pos_scores)
        return self.linear_out(o.transpose(0, 2, 1, 3).reshape(b, t, -1))


class PositionwiseFeedForward(nn.Module):
    """w_1 -> SiLU (the config's "swish") -> w_2."""

    def __init__(self, idim: int, hidden_units: int):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w_2(nn.silu(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-LN: x + MHA(norm_mha(x)), then x + FFN(norm_ff(x)); LayerNorm eps 1e-12."""

    def __init__(self, size: int, attention_heads: int, linear_units: int):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(attention_heads, size)
        self.feed_forward = PositionwiseFeedForward(size, linear_units)
        self.norm_ff = nn.LayerNorm(size, eps=LAYER_LN_EPS)
        self.norm_mha = nn.LayerNorm(size, eps=LAYER_LN_EPS)

    def __call__(self, x: mx.array, pos_emb: mx.array, key_bias: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, key_bias)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Residual: conv1 (k = lookahead + 1) on input right-padded by `lookahead` (so each frame
    sees that many future tokens) -> leaky ReLU -> conv2 (k3, causal: left pad 2)."""

    def __init__(self, channels: int, pre_lookahead_len: int = 3):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = _ConvWeights(channels, channels, pre_lookahead_len + 1)
        self.conv2 = _ConvWeights(channels, channels, 3)

    def __call__(self, x: mx.array) -> mx.array:
        """x (B, T, C) -> (B, T, C)."""
        h = conv1d(x, self.conv1.weight, self.conv1.bias, padding=(0, self.pre_lookahead_len))
        h = nn.leaky_relu(h, LOOKAHEAD_LEAKY_SLOPE)
        h = conv1d(h, self.conv2.weight, self.conv2.bias, padding=(2, 0))
        return h + x


class _ConvWeights(nn.Module):
    """A Conv1d's parameters in MLX layout (C_out, K, C_in); the caller picks the padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = mx.zeros((out_channels, kernel_size, in_channels))
        self.bias = mx.zeros((out_channels,))


class Upsample1D(nn.Module):
    """Nearest-neighbour x stride in time, left-pad 2*stride zeros, Conv1d k = 2*stride + 1
    (so the upsampling is causal)."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = _ConvWeights(channels, out_channels, 2 * stride + 1)

    def __call__(self, x: mx.array) -> mx.array:
        """x (B, T, C) -> (B, stride*T, C_out)."""
        x = mx.repeat(x, self.stride, axis=1)
        return conv1d(x, self.conv.weight, self.conv.bias, padding=(2 * self.stride, 0))


def _key_bias(lengths: mx.array | None, t: int, dtype: mx.Dtype) -> tuple[mx.array | None, mx.array | None]:
    """Padding mask (B, 1, T) bool and its additive attention bias (B, 1, 1, T), or Nones."""
    if lengths is None:
        return None, None
    valid = mx.arange(t)[None, :] < lengths.astype(mx.int32)[:, None]  # (B, T)
    bias = mx.where(valid, 0.0, -mx.inf).astype(dtype)
    return valid[:, None, :], bias[:, None, None, :]


class UpsampleConformerEncoder(nn.Module):
    """embed -> pre_lookahead_layer -> encoders -> up_layer (x2) -> up_embed -> up_encoders
    -> after_norm.

    Each of `embed` and `up_embed` scales by sqrt(d) and makes a fresh relative position
    embedding for its own length.
    """

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 512,
        attention_heads: int = 8,
        linear_units: int = 2048,
        num_blocks: int = 6,
        num_up_blocks: int = 4,
        pre_lookahead_len: int = 3,
        upsample_stride: int = 2,
    ):
        super().__init__()
        self.upsample_stride = upsample_stride
        self.embed = LinearNoSubsampling(input_size, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, pre_lookahead_len)
        self.encoders = [ConformerEncoderLayer(output_size, attention_heads, linear_units) for _ in range(num_blocks)]
        self.up_layer = Upsample1D(output_size, output_size, upsample_stride)
        self.up_embed = LinearNoSubsampling(input_size, output_size)
        self.up_encoders = [
            ConformerEncoderLayer(output_size, attention_heads, linear_units) for _ in range(num_up_blocks)
        ]
        self.after_norm = nn.LayerNorm(output_size, eps=EMBED_LN_EPS)

    def __call__(self, xs: mx.array, xs_lens: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """xs (B, T, input_size), xs_lens (B,) int or None (all T valid).

        Returns (h (B, stride*T, output_size), mask (B, 1, stride*T) bool or None). As in the
        reference, padded frames are not zeroed between layers (only attention keys are
        masked), so their features are not meaningful; the mask says which are.
        """
        t = xs.shape[1]
        _, key_bias = _key_bias(xs_lens, t, xs.dtype)
        xs, pos_emb = self.embed(xs)
        xs = self.pre_lookahead_layer(xs)
        for layer in self.encoders:
            xs = layer(xs, pos_emb, key_bias)

        xs = self.up_layer(xs)
        up_lens = None if xs_lens is None else xs_lens * self.upsample_stride
        mask, key_bias = _key_bias(up_lens, xs.shape[1], xs.dtype)
        xs, pos_emb = self.up_embed(xs)
        for layer in self.up_encoders:
            xs = layer(xs, pos_emb, key_bias)
        return self.after_norm(xs), mask
