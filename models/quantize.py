"""Weight quantization (MLX affine, group size 64): which layers, and applying it.

The model decides: each component has a predicate naming the Linear layers that are
quantized. Layers whose input width is not a multiple of the group size, or that are too
small to matter, stay float, as do embeddings (measured: see docs/benchmarks.md) and
everything that is not a Linear (norms, convolutions, Snake alphas, STFT windows).

* T3: attention q/k/v/o and MLP gate/up/down of every layer, the speech head, the
  perceiver's projections and the speaker projection. The emotion projection is
  Linear(1 -> 1024): one input column cannot be grouped, so it stays float.
* S3Gen flow: every Linear of the conformer encoder and of the estimator (attention,
  feed-forward, time MLP, resnet time projections), except those narrower than the group.
* HiFT is convolutional (its two Linears are 9 -> 1 and 512 -> 1): it stays float.
* S3Tokenizer and CAMPPlus run only when a new voice is computed: they stay float, so
  voice tokens match the reference.
"""

from __future__ import annotations

import logging
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

logger = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 64
SUPPORTED_BITS = (4, 8)
MIN_OUTPUT_FEATURES = 64  # smaller Linears cost more in scales than they save

T3_QUANTIZED = re.compile(
    r"^(tfmr\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|speech_head|cond_enc\.spkr_enc|cond_enc\.emotion_adv_fc"
    r"|cond_enc\.perceiver\.attn\.(to_q|to_k|to_v|proj_out))$"
)
FLOW_QUANTIZED = re.compile(r"^(encoder|decoder\.estimator)\.")


def _quantizable(module: nn.Module, group_size: int) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    out_features, in_features = module.weight.shape
    return in_features % group_size == 0 and out_features >= MIN_OUTPUT_FEATURES


def t3_predicate(group_size: int):
    """Path (relative to T3) and module -> quantize it?"""
    return lambda path, module: bool(T3_QUANTIZED.match(path)) and _quantizable(module, group_size)


def flow_predicate(group_size: int):
    """Path (relative to the flow) and module -> quantize it?"""
    return lambda path, module: bool(FLOW_QUANTIZED.match(path)) and _quantizable(module, group_size)


def quantize_model(model, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Quantize a ChatterboxModel in place (T3 and the S3Gen flow)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize must be one of {SUPPORTED_BITS} or None, not {bits!r}")
    nn.quantize(model.t3, group_size=group_size, bits=bits, class_predicate=t3_predicate(group_size))
    nn.quantize(model.s3gen.flow, group_size=group_size, bits=bits, class_predicate=flow_predicate(group_size))
    mx.eval(model.t3.parameters(), model.s3gen.flow.parameters())
    model.quantize = bits
    model.group_size = group_size
    logger.info("quantized T3 and the S3Gen flow to %d bits (group size %d)", bits, group_size)


def quantized_paths(module: nn.Module) -> list[str]:
    """Paths of the quantized layers of a module (for tests and reports)."""
    return [path for path, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)]


def parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
