"""INT8/INT4 quantization (models/quantize.py) on the tiny random checkpoint.

What is checked: the predicates quantize exactly the layers they promise and leave the rest
float; INT8 layers take at most 55% of their float16 bytes; quantized T3 and S3Gen run and
stay close to float32 on the same inputs and noise; a converted (cached) quantized model
loads back identical.

Tolerances (measured on the tiny seed-0 checkpoint, random weights; in brackets):
- INT8 T3 teacher-forced logits (CFG-combined, 64 positions): mean KL(float32 || int8)
  < 1e-3 [9e-5], top-1 agreement >= 0.85 [0.95]; S3Gen mel SNR >= 30 dB [41].
- INT4: mean KL < 0.1 [0.03]; mel SNR >= 10 dB [17]. INT4 is a size option, not a
  fidelity claim: random-weight logits are nearly flat, so top-1 ties flip easily.
Random weights are only a proxy for trained ones (bench/precision.py says the same).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nightingale.models import load_model
from nightingale.models.quantize import (
    CPU_DEQUANTIZE_MIN_ROWS,
    T3_QUANTIZED,
    QuantizedLinear,
    flow_predicate,
    quantized_layer_bytes,
    quantized_paths,
    scales_dtype,
    t3_predicate,
)
from nightingale.models.s3gen.flow import fixed_noise
from nightingale.models.tokenizer import wrap_text_tokens

TEXT = "Hello there, how are you?"
SPEECH_POSITIONS = 64
MEL_TOKENS = 40
CFG_WEIGHT = 0.5


@pytest.fixture(scope="module")
def float_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, quantize=None)


@pytest.fixture(scope="module")
def float_outputs(float_model):
    return t3_logits(float_model), flow_mel(float_model)


@pytest.fixture(scope="module")
def int8_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, quantize=8)


@pytest.fixture(scope="module")
def int4_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, quantize=4)


def t3_logits(model) -> np.ndarray:
    """CFG-combined teacher-forced logits at the positions predicting 64 fixed speech tokens, (64, V)."""
    rng = np.random.default_rng(0)
    speech = mx.array(rng.integers(0, 6561, SPEECH_POSITIONS), dtype=mx.int32)
    text = mx.array(wrap_text_tokens(model.text_tokens(TEXT)), dtype=mx.int32)
    logits = model.t3.teacher_forced_logits(model.t3.prepare_conditioning(model.conds.t3), text, speech)
    combined = logits[0] + CFG_WEIGHT * (logits[0] - logits[1])  # (L, V)
    return np.array(combined[-SPEECH_POSITIONS - 1 : -1], dtype=np.float64)


def flow_mel(model) -> np.ndarray:
    """Mel (80, 2N) of fixed tokens in the built-in voice with fixed noise."""
    gen = model.conds.gen
    tokens = np.random.default_rng(1).integers(0, 6561, MEL_TOKENS)
    noise = fixed_noise(gen["prompt_feat"].shape[1] + 2 * MEL_TOKENS, seed=7)
    mel = model.s3gen.flow.inference(mx.array(tokens[None], dtype=mx.int32), gen["prompt_token"], gen["prompt_feat"],
                                     gen["embedding"], noise=noise)
    return np.array(mel[0].astype(mx.float32), dtype=np.float64)


def kl_and_top1(ref: np.ndarray, est: np.ndarray) -> tuple[float, float]:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(est)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == est.argmax(-1)).mean())


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - est) ** 2)))


# -- the predicates -------------------------------------------------------------------


def test_predicate_rules():
    t3p, flowp = t3_predicate(64), flow_predicate(64)
    assert t3p("tfmr.layers.3.mlp.gate_up_proj", nn.Linear(128, 256))
    assert t3p("tfmr.layers.3.self_attn.qkv_proj", nn.Linear(128, 256))
    assert not t3p("tfmr.layers.3.mlp.up_proj", nn.Linear(128, 256)), "merged at conversion: the old name is gone"
    assert not t3p("tfmr.layers.3.mlp.gate_up_proj", nn.Linear(100, 256)), "input width not a multiple of the group"
    assert not t3p("tfmr.layers.3.mlp.gate_up_proj", nn.Linear(128, 32)), "too few outputs to be worth it"
    assert not t3p("text_head", nn.Linear(128, 256)), "not in the list"
    assert not t3p("speech_emb", nn.Embedding(256, 128)), "embeddings stay float"
    assert not t3p("cond_enc.emotion_adv_fc", nn.Linear(1, 256)), "one input column cannot be grouped"
    assert flowp("decoder.estimator.mid_blocks.0.1.0.attn1.to_qkv", nn.Linear(256, 512))
    assert not flowp("encoder_proj", nn.Linear(512, 80)), "outside the encoder and estimator"
    assert flowp("encoder.encoders.0.feed_forward.w_1", nn.Linear(512, 2048))
    assert not flowp("encoder.encoders.0.feed_forward.w_1", nn.Linear(512, 2048).to_quantized(group_size=64, bits=8))


def test_quantized_model_keeps_the_promised_layers_float(int8_model):
    t3, flow = int8_model.t3, int8_model.s3gen.flow
    t3_float = sorted(p for p, m in t3.named_modules() if type(m) is nn.Linear)
    assert t3_float == ["cond_enc.emotion_adv_fc", "text_head"]
    assert all(T3_QUANTIZED.match(p) for p in quantized_paths(t3))
    assert len(quantized_paths(t3)) == 4 * t3.cfg.num_hidden_layers + 1 + 1 + 4  # layers (qkv, o, gate_up, down), head, speaker, perceiver
    flow_float = sorted(p for p, m in flow.named_modules() if type(m) is nn.Linear)
    assert flow_float == ["encoder_proj", "spk_embed_affine_layer"]
    assert all(p.startswith(("encoder.", "decoder.estimator.")) for p in quantized_paths(flow))
    for module in (t3, flow):
        for path, m in module.named_modules():
            if isinstance(m, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
                assert all(v.dtype == mx.float32 for _, v in tree_flatten(m.parameters())), path
    # everything outside T3 and the flow is untouched: HiFT (Snake alphas), VE, S3Tokenizer, CAMPPlus
    for name, module in (("hift", int8_model.s3gen.mel2wav), ("ve", int8_model.ve),
                         ("tokenizer", int8_model.s3gen.tokenizer), ("campplus", int8_model.s3gen.speaker_encoder)):
        assert not quantized_paths(module), name
        assert {v.dtype for _, v in tree_flatten(module.parameters())} == {mx.float32}, name


@pytest.mark.parametrize("bits, limit", [(8, 0.55), (4, 0.30)])
def test_quantized_layers_take_at_most_their_share_of_float16_bytes(tiny_checkpoint, int8_model, int4_model, bits, limit):
    model = int8_model if bits == 8 else int4_model
    for module in (model.t3, model.s3gen.flow):
        quantized, half = quantized_layer_bytes(module)
        assert half > 0 and quantized / half <= limit, (bits, quantized, half)


def test_scales_dtype_rule():
    # float16 scales (bf16 for bf16 models); on the CPU, half models get float32 scales so that
    # their quantized matmuls run in float32 (MLX's half CPU kernels are far slower)
    assert scales_dtype(mx.float32, cpu=True) == mx.float16
    assert scales_dtype(mx.float16, cpu=True) == mx.float32
    assert scales_dtype(mx.bfloat16, cpu=True) == mx.float32
    assert scales_dtype(mx.float32, cpu=False) == mx.float16
    assert scales_dtype(mx.float16, cpu=False) == mx.float16
    assert scales_dtype(mx.bfloat16, cpu=False) == mx.bfloat16


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's float32 rule")
def test_quantized_matmuls_get_float32_activations_on_cpu(tiny_checkpoint):
    model = load_model(tiny_checkpoint, quantize=8, dtype="float16")
    layer = model.t3.tfmr.layers[0].self_attn.qkv_proj
    assert layer.scales.dtype == mx.float32
    assert layer(mx.zeros((1, 1, model.t3.cfg.hidden_size), dtype=mx.float16)).dtype == mx.float32
    assert model.t3.speech_emb.weight.dtype == mx.float16  # the float parts keep the chosen dtype


@pytest.mark.parametrize("bits", [8, 4])
def test_many_row_path_equals_the_quantized_kernel(bits):
    """Many rows take the dequantize + matmul path on the CPU: same result as MLX's kernel."""
    linear = nn.Linear(128, 96)
    mx.eval(linear.parameters())
    layer = QuantizedLinear.from_linear(linear, 64, bits)
    layer.scales, layer.biases = layer.scales.astype(mx.float16), layer.biases.astype(mx.float16)
    x = mx.random.normal((2, 3 * CPU_DEQUANTIZE_MIN_ROWS, 128), key=mx.random.key(0))
    kernel = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64, bits=bits)
    kernel = kernel + layer.bias
    ours = layer(x)
    assert ours.dtype == kernel.dtype == mx.float32
    assert mx.allclose(ours, kernel, atol=1e-5, rtol=1e-5)
    assert mx.allclose(layer(x[:, :1]), kernel[:, :1], atol=1e-5, rtol=1e-5)  # the few-row path


# -- fidelity and running ------------------------------------------------------------


def test_int8_t3_and_s3gen_stay_close_to_float32(float_outputs, int8_model):
    ref_logits, ref_mel = float_outputs
    kl, top1 = kl_and_top1(ref_logits, t3_logits(int8_model))
    assert kl < 1e-3 and top1 >= 0.85, (kl, top1)
    mel = flow_mel(int8_model)
    assert np.isfinite(mel).all() and snr_db(ref_mel, mel) >= 30.0


def test_int4_t3_and_s3gen_run_and_stay_near_float32(float_outputs, int4_model):
    ref_logits, ref_mel = float_outputs
    logits = t3_logits(int4_model)
    kl, _ = kl_and_top1(ref_logits, logits)
    assert np.isfinite(logits).all() and kl < 0.1, kl
    mel = flow_mel(int4_model)
    assert np.isfinite(mel).all() and snr_db(ref_mel, mel) >= 10.0


def test_int8_synthesis_runs_end_to_end(int8_model):
    tokens = [t for t in int8_model.generate_tokens("Quantized speech.", seed=0, max_new_tokens=12) if t < 6561]
    assert tokens and all(0 <= t < 6561 for t in tokens)
    wav = int8_model.tokens_to_audio(tokens, seed=0)
    assert wav.dtype == np.float32 and wav.shape == (960 * len(tokens),)
    assert np.isfinite(wav).all() and np.abs(wav).max() < 1.0


def test_converted_int8_model_loads_back_identical(tiny_checkpoint, int8_model):
    fresh = load_model(tiny_checkpoint, quantize=8, cache=False)  # converted in memory, now
    again = load_model(tiny_checkpoint, quantize=8)  # the int8_model fixture cached it: read back
    assert again.quantize == 8 and again.group_size == 64
    for name in ("t3", "s3gen"):
        ours, theirs = dict(tree_flatten(getattr(fresh, name).parameters())), dict(tree_flatten(getattr(again, name).parameters()))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and mx.array_equal(ours[key], theirs[key]), key
    assert np.array_equal(t3_logits(fresh), t3_logits(again))


def test_unsupported_bits_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantize"):
        load_model(tiny_checkpoint, quantize=3)
