"""Precision of the float parts: load_model(dtype=...) on the tiny random checkpoint.

float16 / bfloat16 cast T3 and the S3Gen flow. What must stay float32 does: HiFT (its Snake
alphas and the iSTFT window), the VoiceEncoder, S3Tokenizer and CAMPPlus, the CFM state, and
norm statistics (mx.fast layer/RMS norms accumulate in float32 whatever the input dtype).

Tolerances against float32 on the same inputs and noise (measured on the tiny seed-0
checkpoint, random weights, in brackets):
- float16: T3 mean KL(float32 || float16) of the CFG-combined teacher-forced distribution
  < 1e-4 [1.3e-6]; S3Gen mel SNR >= 45 dB [59].
- bfloat16: KL < 1e-3 [9e-5]; mel SNR >= 30 dB [40].
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nightingale.models import load_model
from nightingale.models.s3gen.flow import fixed_noise
from nightingale.models.tokenizer import wrap_text_tokens

TEXT = "Hello there, how are you?"
SPEECH_POSITIONS = 64
MEL_TOKENS = 40
CFG_WEIGHT = 0.5
HALF = ("float16", "bfloat16")
LIMITS = {"float16": (1e-4, 45.0), "bfloat16": (1e-3, 30.0)}  # (max mean KL, min mel SNR dB)


def t3_logits(model) -> np.ndarray:
    """CFG-combined teacher-forced logits at the positions predicting 64 fixed speech tokens, (64, V)."""
    speech = mx.array(np.random.default_rng(0).integers(0, 6561, SPEECH_POSITIONS), dtype=mx.int32)
    text = mx.array(wrap_text_tokens(model.text_tokens(TEXT)), dtype=mx.int32)
    logits = model.t3.teacher_forced_logits(model.t3.prepare_conditioning(model.conds.t3), text, speech)
    assert logits.dtype == mx.float32  # the sampler always gets float32
    combined = logits[0] + CFG_WEIGHT * (logits[0] - logits[1])
    return np.array(combined[-SPEECH_POSITIONS - 1 : -1], dtype=np.float64)


def flow_mel(model) -> np.ndarray:
    gen = model.conds.gen
    tokens = np.random.default_rng(1).integers(0, 6561, MEL_TOKENS)
    noise = fixed_noise(gen["prompt_feat"].shape[1] + 2 * MEL_TOKENS, seed=7)
    mel = model.s3gen.flow.inference(mx.array(tokens[None], dtype=mx.int32), gen["prompt_token"], gen["prompt_feat"],
                                     gen["embedding"], noise=noise)
    assert mel.dtype == mx.float32  # the CFM state stays float32
    return np.array(mel[0], dtype=np.float64)


def mean_kl(ref: np.ndarray, est: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(est)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def dtypes_of(module: nn.Module) -> set:
    return {v.dtype for _, v in tree_flatten(module.parameters())}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    return t3_logits(model), flow_mel(model)


@pytest.fixture(scope="module", params=HALF)
def half_model(request, tiny_checkpoint):
    return request.param, load_model(tiny_checkpoint, dtype=request.param)


def test_half_precision_casts_t3_and_flow_and_keeps_the_rest_float32(half_model, tiny_checkpoint):
    name, model = half_model
    dtype = getattr(mx, name)
    # the second load reads the converted cache: it must keep the same precisions
    for m in (model, load_model(tiny_checkpoint, dtype=name)):
        assert m.dtype == name
        assert dtypes_of(m.t3) == {dtype} and dtypes_of(m.s3gen.flow) == {dtype}
        hift = m.s3gen.mel2wav
        assert dtypes_of(hift) == {mx.float32}
        alphas = [v for k, v in tree_flatten(hift.parameters()) if k.endswith(".alpha")]
        assert alphas and all(a.dtype == mx.float32 for a in alphas)
        assert hift._window.dtype == np.float32  # iSTFT window (a constant, not a parameter)
        for part in (m.ve, m.s3gen.tokenizer, m.s3gen.speaker_encoder):
            assert dtypes_of(part) == {mx.float32}


def test_half_precision_stays_close_to_float32(half_model, reference):
    name, model = half_model
    max_kl, min_snr = LIMITS[name]
    ref_logits, ref_mel = reference
    logits, mel = t3_logits(model), flow_mel(model)
    assert np.isfinite(logits).all() and np.isfinite(mel).all()
    kl = mean_kl(ref_logits, logits)
    snr = 10 * np.log10(np.sum(ref_mel**2) / np.sum((ref_mel - mel) ** 2))
    assert kl < max_kl and snr >= min_snr, (name, kl, snr)


def test_norm_statistics_are_float32_in_half_models(half_model):
    """The model's own half-precision norms equal float32 norms of the same (rounded) input up
    to rounding of the affine output: mean and variance are accumulated in float32 (inputs
    near 40 over 1024 channels; float16 spacing at their sum, ~40k, is 32)."""
    name, model = half_model
    dtype = getattr(mx, name)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[name]
    norms = [model.t3.tfmr.layers[0].input_layernorm, model.t3.tfmr.norm,
             model.s3gen.flow.estimator.mid_blocks[0][1][0].norm1, model.s3gen.flow.encoder.after_norm]
    for norm in norms:
        width = norm.weight.shape[0]
        x = (40.0 + 3.0 * mx.random.normal((4, width), key=mx.random.key(1))).astype(dtype)
        y = norm(x)
        assert y.dtype == dtype
        x32 = x.astype(mx.float32)
        weight = norm.weight.astype(mx.float32)
        bias = norm.bias.astype(mx.float32) if "bias" in norm else mx.zeros_like(weight)
        if isinstance(norm, nn.RMSNorm):
            normalized = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + norm.eps)
        else:
            centred = x32 - mx.mean(x32, axis=-1, keepdims=True)
            normalized = centred * mx.rsqrt(mx.mean(centred * centred, axis=-1, keepdims=True) + norm.eps)
        scaled = normalized * weight
        err = mx.abs(y.astype(mx.float32) - (scaled + bias))
        # half-precision rounding of the scaled value, the sum and the output: a few ulps
        bound = 3 * eps * (mx.abs(scaled) + mx.abs(bias)) + 1e-6
        assert bool(mx.all(err <= bound)), (name, type(norm).__name__, float(err.max()))


def test_half_precision_synthesis_runs(half_model):
    _, model = half_model
    tokens = [t for t in model.generate_tokens("Half precision.", seed=0, max_new_tokens=10) if t < 6561]
    wav = model.tokens_to_audio(tokens or [1, 2, 3], seed=0)
    assert wav.dtype == np.float32 and np.isfinite(wav).all()


def test_unknown_dtype_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_checkpoint, dtype="float64")
