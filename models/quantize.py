"""Weight quantization (MLX affine, group size 64): which layers, and applying it.

The model decides: each component has a predicate naming the Linear layers that are
quantized. Layers whose input width is not a multiple of the group size, or that are too
small to matter, stay float, as do embeddings (they are 2-3% of T3's weights and are
indexed, not multiplied, so quantizing them saves little and was not measured safe) and
everything that is not a Linear (norms, convolutions, Snake alphas, STFT windows).

* T3: attention qkv/o and MLP gate_up/down of every layer (q/k/v and gate/up are merged
  at conversion, models/t3.py), the speech head, the
  perceiver's projections and the speaker projection. The emotion projection is
  Linear(1 -> 1024): one input column cannot be grouped, so it stays float. The text head
  (unused at inference) stays float.
* Turbo T3 (GPT-2): c_attn, c_proj, c_fc and c_proj of every block, the speech head and
  the speaker projection. Its learned positions and token tables are embeddings (float).
* S3Gen flow: every Linear of the conformer encoder and of the estimator (attention,
  feed-forward, time MLP, resnet time projections), except those narrower than the group.
  `encoder_proj` (512 -> 80) and the speaker projection (192 -> 80) stay float.
* HiFT is convolutional (its two Linears are 9 -> 1 and 512 -> 1): it stays float.
* S3Tokenizer and CAMPPlus run only when a new voice is computed: they stay float, so
  voice tokens match the reference.

Scales and biases (the per-group affine parameters) are stored in float16 (bfloat16 for a
bfloat16 model): that puts INT8 at 53% of the float16 bytes of the same layers (float32
scales would make it 56%). On the CPU backend the matmul runs in the promoted dtype of
activations and scales, and MLX's half-precision CPU kernels are 15-40x slower than its
float32 one (docs/benchmarks.md): so on the CPU, a float32 model keeps float16 scales (the
activations are float32, the product is float32), and a float16/bfloat16 model gets float32
scales so that its quantized matmuls still run in float32 (its activations then stay
float32 after the first quantized layer).

MLX's CPU quantized matmul also costs time in proportion to the rows it multiplies (about
1 GMAC/s): fine for decoding (2 rows with CFG), hundreds of times slower than a dequantize
and BLAS matmul for a prefill or S3Gen's hundreds of frames. `QuantizedLinear` therefore
dequantizes on the CPU when it gets `CPU_DEQUANTIZE_MIN_ROWS` rows or more. On Metal and
CUDA the quantized kernels are used for every shape.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

logger = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 64
SUPPORTED_BITS = (4, 8)
MIN_OUTPUT_FEATURES = 64  # smaller Linears cost more in scales than they save
# Measured on the Linux CPU (1024 -> 4096, OpenBLAS): quantized matmul 4.5-9 ms per row pair
# (1-2 rows), dequantize + float32 matmul 15-30 ms whatever the rows; crossover near 3-5 rows.
CPU_DEQUANTIZE_MIN_ROWS = 4

T3_QUANTIZED = re.compile(
    r"^(tfmr\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)"
    r"|speech_head|cond_enc\.spkr_enc|cond_enc\.emotion_adv_fc"
    r"|cond_enc\.perceiver\.attn\.(to_q|to_k|to_v|proj_out)"
    # Turbo T3 (GPT-2): fused q/k/v and output projections, MLP, speech head (with bias)
    r"|tfmr\.h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj)))$"
)
FLOW_QUANTIZED = re.compile(r"^(encoder|decoder\.estimator)\.")

Predicate = Callable[[str, nn.Module], bool]


def _quantizable(module: nn.Module, group_size: int) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    out_features, in_features = module.weight.shape
    return in_features % group_size == 0 and out_features >= MIN_OUTPUT_FEATURES


def t3_predicate(group_size: int) -> Predicate:
    """Path (relative to T3) and module -> quantize it?"""
    return lambda path, module: bool(T3_QUANTIZED.match(path)) and _quantizable(module, group_size)


def flow_predicate(group_size: int) -> Predicate:
    """Path (relative to the flow) and module -> quantize it?"""
    return lambda path, module: bool(FLOW_QUANTIZED.match(path)) and _quantizable(module, group_size)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` that dequantizes for many-row inputs on the CPU backend.

    x (..., in) -> (..., out), in the dtype MLX's quantized matmul gives (activations and
    scales promoted). See the module docstring for why.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if on_cpu() and x.size >= CPU_DEQUANTIZE_MIN_ROWS * x.shape[-1]:
            out_dtype = mx.result_type(x, self["scales"])
            # float32 scales: MLX's half-precision dequantize is several times slower on the CPU
            weight = mx.dequantize(self["weight"], self["scales"].astype(mx.float32), self["biases"].astype(mx.float32),
                                   group_size=self.group_size, bits=self.bits)  # (out, in) float32
            y = (x.astype(mx.float32) @ weight.T).astype(out_dtype)
            return y + self["bias"] if "bias" in self else y
        return super().__call__(x)


def scales_dtype(model_dtype: mx.Dtype, cpu: bool | None = None) -> mx.Dtype:
    """The dtype of quantization scales/biases for a model whose float parts are `model_dtype`.

    See the module docstring: float16 (bfloat16 for bfloat16 models), except float32 for
    half-precision models on the CPU backend, so that their quantized matmuls run in float32.
    """
    cpu = on_cpu() if cpu is None else cpu
    if cpu and model_dtype != mx.float32:
        return mx.float32
    return mx.bfloat16 if model_dtype == mx.bfloat16 else mx.float16


def replace_linears(module: nn.Module, predicate: Predicate, bits: int, group_size: int) -> None:
    """Replace the Linears `predicate` selects by `QuantizedLinear`s quantized from them, in place.

    Also how a converted model is built before its stored quantized weights are loaded (the
    values quantized here are then overwritten).
    """

    def swap(path: str, m: nn.Module) -> nn.Module:
        return QuantizedLinear.from_linear(m, group_size, bits) if predicate(path, m) else m

    leaves = tree_map_with_path(swap, module.leaf_modules(), is_leaf=nn.Module.is_module)
    module.update_modules(leaves)


def quantized_structure(t3: nn.Module, flow: nn.Module, bits: int, group_size: int) -> None:
    """Give freshly built T3 and flow modules the quantized layout (for loading converted weights)."""
    replace_linears(t3, t3_predicate(group_size), bits, group_size)
    replace_linears(flow, flow_predicate(group_size), bits, group_size)


def _quantize_component(module: nn.Module, predicate: Predicate, bits: int, group_size: int, model_dtype: mx.Dtype) -> None:
    # Quantize from float32 weights (a half-precision model's weights upcast exactly), so the
    # group minima and scales are computed in float32, then store scales in `scales_dtype`.
    selected = [m for path, m in module.named_modules() if predicate(path, m)]
    for m in selected:
        m.weight = m.weight.astype(mx.float32)
    replace_linears(module, predicate, bits, group_size)
    sdt = scales_dtype(model_dtype)
    for _, m in module.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.scales = m.scales.astype(sdt)
            m.biases = m.biases.astype(sdt)
            if "bias" in m:
                m.bias = m.bias.astype(model_dtype)
    mx.eval(module.parameters())


def quantize_model(model, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Quantize a ChatterboxModel in place (T3 and the S3Gen flow).

    `model.dtype` (the precision of the float parts) decides the scales' dtype (see
    `scales_dtype`). Everything else (VoiceEncoder, S3Tokenizer, CAMPPlus, HiFT) is left alone.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize must be one of {SUPPORTED_BITS} or None, not {bits!r}")
    model_dtype = getattr(mx, model.dtype) if isinstance(model.dtype, str) else model.dtype
    _quantize_component(model.t3, t3_predicate(group_size), bits, group_size, model_dtype)
    _quantize_component(model.s3gen.flow, flow_predicate(group_size), bits, group_size, model_dtype)
    model.quantize = bits
    model.group_size = group_size
    logger.info("quantized T3 and the S3Gen flow to %d bits (group size %d, scales %s)",
                bits, group_size, scales_dtype(model_dtype))


def quantize_flow(flow: nn.Module, bits: int, group_size: int, model_dtype: mx.Dtype) -> None:
    """Quantize an S3Gen flow alone (a decoder loaded on its own, models/turbo.py)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize must be one of {SUPPORTED_BITS} or None, not {bits!r}")
    _quantize_component(flow, flow_predicate(group_size), bits, group_size, model_dtype)


def quantized_paths(module: nn.Module) -> list[str]:
    """Paths of the quantized layers of a module (for tests and reports)."""
    return [path for path, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)]


def parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def quantized_layer_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes the quantized Linears of `module` hold, bytes the same layers take in float16).

    Quantized: packed weights + scales + biases (+ the Linear's own bias). Float16: 2 bytes
    per weight and per bias element. The ratio is what quantization saves on those layers.
    """
    quantized = half = 0
    for _, m in module.named_modules():
        if not isinstance(m, nn.QuantizedLinear):
            continue
        out_features = m.weight.shape[0]
        in_features = m.weight.shape[1] * 32 // m.bits
        bias = m.bias.size if "bias" in m else 0
        quantized += m.weight.nbytes + m.scales.nbytes + m.biases.nbytes + (m.bias.nbytes if "bias" in m else 0)
        half += 2 * (out_features * in_features + bias)
    return quantized, half
