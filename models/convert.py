"""The few real remaps between PyTorch checkpoint layouts and MLX.

Linear weights need no change. Convolutions change their axis order, and weight-norm and
batch-norm parameters are folded once, at load time, so no module carries them at run
time. Everything here works on numpy arrays (the loader's format) and returns numpy.
"""

from __future__ import annotations

import numpy as np

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm default


def conv1d_from_torch(weight: np.ndarray) -> np.ndarray:
    """Conv1d weight: torch (out, in/groups, k) -> MLX (out, k, in/groups)."""
    return np.ascontiguousarray(weight.transpose(0, 2, 1))


def conv_transpose1d_from_torch(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose1d weight: torch (in, out, k) -> MLX (out, k, in)."""
    return np.ascontiguousarray(weight.transpose(1, 2, 0))


def conv2d_from_torch(weight: np.ndarray) -> np.ndarray:
    """Conv2d weight: torch (out, in, kh, kw) -> MLX (out, kh, kw, in)."""
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1))


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """torch weight_norm (dim=0): w = g * v / ||v||, the norm over every axis but 0.

    Works in the torch layout, where axis 0 is out_channels for Conv1d and in_channels
    for ConvTranspose1d (which is what torch normalises over in both cases).
    """
    v64 = v.astype(np.float64)
    norm = np.sqrt((v64**2).reshape(v.shape[0], -1).sum(axis=1))
    norm = norm.reshape((v.shape[0],) + (1,) * (v.ndim - 1))
    return (g.astype(np.float64) * v64 / norm).astype(v.dtype)


def fold_batch_norm(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = BATCH_NORM_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm as an affine map: y = x * scale + shift, per channel."""
    mean = running_mean.astype(np.float64)
    inv_std = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    w = np.ones_like(mean) if weight is None else weight.astype(np.float64)
    b = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
    scale = w * inv_std
    shift = b - mean * scale
    return scale.astype(np.float32), shift.astype(np.float32)
