"""S3Gen's 1-D convolutions (encoder, estimator, HiFT), channels-last, with one backend switch.

On a GPU (Metal, CUDA) MLX's own conv ops run: on an H100 a full-size 10-step CFM solve of
404-700 frames took 309-391 ms with them and 362-531 ms with per-tap matmuls. On the CPU
backend the convolutions are BLAS matmuls instead, because MLX's dilated and transposed
CPU convolutions run at about 1 GFLOP/s (a k11, dilation-5 HiFT resblock conv over 1200
steps, 256 channels: 1880 ms native, 60 ms as matmuls, Linux with OpenBLAS). A strided
conv, or one whose im2col matrix is small, is one GEMM over that matrix (every output
step's receptive field as one row); otherwise one GEMM per kernel tap on a shifted view,
accumulated in place (beta = 1). The im2col GEMM pays only with a fast BLAS
(nightingale/blas.py): under MLX's bundled reference BLAS the per-tap GEMMs are faster
(the estimator's k3 conv 512 -> 256 channels over 300 frames: 123 ms per tap, 251 ms
im2col). A transposed conv is one matmul plus an overlap-add.
"""

from __future__ import annotations

import mlx.core as mx

from nightingale.blas import fast_blas_loaded

from .. import dsp

# "auto" = "matmul" on the CPU backend, "native" on a GPU; set it to force either path
# (a benchmark, a test of one path against the other).
CONV_IMPL = "auto"  # "auto" | "matmul" | "native"
# An im2col matrix up to this many floats (2 MiB, cache-resident) beats per-tap GEMMs;
# larger ones cost more in copying than they save (measured with OpenBLAS on x86).
IM2COL_MAX_ELEMENTS = 1 << 19


def conv_impl() -> str:
    """The path convolutions take now: "matmul" or "native" (CONV_IMPL, or by the device)."""
    if CONV_IMPL == "auto":
        return "matmul" if mx.default_device().type == mx.DeviceType.cpu else "native"
    if CONV_IMPL not in ("matmul", "native"):
        raise ValueError(f"CONV_IMPL must be 'auto', 'matmul' or 'native', not {CONV_IMPL!r}")
    return CONV_IMPL


def conv1d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int = 1,
) -> mx.array:
    """torch Conv1d on channels-last input, with zero padding `padding` on both sides or
    (left, right).

    x (B, T, C_in), weight in MLX layout (C_out, K, C_in), bias (C_out,)
    -> (B, (T + left + right - dilation (K - 1) - 1) // stride + 1, C_out).
    """
    c_out, k, c_in = weight.shape
    left, right = (padding, padding) if isinstance(padding, int) else padding
    if k > 1 and conv_impl() == "native":
        if left == right:
            return mx.conv1d(x, weight, stride=stride, padding=left, dilation=dilation) + bias
        return mx.conv1d(mx.pad(x, [(0, 0), (left, right), (0, 0)]), weight, stride=stride, dilation=dilation) + bias
    if left or right:
        x = mx.pad(x, [(0, 0), (left, right), (0, 0)])
    batch, t_pad, _ = x.shape
    t_out = (t_pad - dilation * (k - 1) - 1) // stride + 1
    if k == 1:
        return mx.addmm(bias, x[:, : (t_out - 1) * stride + 1 : stride], weight[:, 0].T)
    if stride > 1 or (t_out * k * c_in <= IM2COL_MAX_ELEMENTS and fast_blas_loaded()):
        cols = mx.as_strided(x, (batch, t_out, k, c_in), (t_pad * c_in, stride * c_in, dilation * c_in, 1))
        return mx.addmm(bias, cols.reshape(batch, t_out, k * c_in), weight.reshape(c_out, k * c_in).T)
    y = mx.addmm(bias, x[:, :t_out], weight[:, 0].T)
    for j in range(1, k):
        y = mx.addmm(y, x[:, j * dilation : j * dilation + t_out], weight[:, j].T)
    return y


def conv_transpose1d(x: mx.array, weight: mx.array, bias: mx.array, stride: int, padding: int) -> mx.array:
    """torch ConvTranspose1d on channels-last input.

    x (B, T, C_in), weight (C_out, K, C_in), bias (C_out,)
    -> (B, (T - 1) stride - 2 padding + K, C_out).
    """
    if conv_impl() == "native":
        return mx.conv_transpose1d(x, weight, stride=stride, padding=padding) + bias
    c_out, k, c_in = weight.shape
    batch, t_in, _ = x.shape
    # Every input step's contribution to its K output taps, then overlap-add at the stride.
    w = weight.transpose(2, 1, 0).reshape(c_in, k * c_out)
    taps = (x @ w).reshape(batch, t_in, k, c_out)
    y = dsp.overlap_add(taps, stride)  # (B, (T - 1) stride + K, C_out)
    return y[:, padding : y.shape[1] - padding] + bias
