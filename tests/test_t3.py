"""T3 on MLX against the PyTorch reference (fixtures from tools/fixtures_t3.py), plus the
cache and sampler semantics that parity alone does not pin down.

Tolerance for float32 parity: |ours - ref| <= 1e-3 + 1e-3 |ref| (measured: ~5e-6).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nightingale.dev.checkpoint import random_weights
from nightingale.models import sampling, t3 as t3_module
from nightingale.models.config import ConfigError
from nightingale.models.conds import T3Cond
from nightingale.models.t3 import (
    SamplingParams,
    T3Config,
    build_t3,
    convert_weights,
    generate_tokens,
    llama3_rope_periods,
    process_logits,
    sample_token,
    upstream_shapes,
)

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = RTOL = 1e-3
BOS, EOS = 6561, 6562


def check_weights(weights: dict, fixture) -> None:
    keys = ("speech_emb.weight", "speech_head.weight", "cond_enc.perceiver.pre_attention_query", "tfmr.norm.weight")
    ours = np.array([float(np.asarray(weights[k], dtype=np.float64).sum()) for k in keys])
    assert np.allclose(ours, fixture["weights_check"], rtol=1e-9), (
        f"fixture made from other weights ({fixture['weights_recipe']}): regenerate with tools/fixtures_t3.py")


@pytest.fixture(scope="module")
def weights() -> dict:
    # As make_checkpoint(dir, "tiny", seed=0) draws t3_cfg.safetensors (tools/fixtures_t3.py).
    return random_weights(upstream_shapes(T3Config.tiny()), np.random.default_rng([0, 0]))


@pytest.fixture(scope="module")
def model(weights):
    return build_t3(weights, T3Config.tiny())


@pytest.fixture(scope="module")
def fwd(weights):
    f = dict(np.load(FIXTURES / "t3_tiny_forward.npz"))
    check_weights(weights, f)
    return f


@pytest.fixture(scope="module")
def dec(weights):
    f = dict(np.load(FIXTURES / "t3_tiny_decode.npz"))
    check_weights(weights, f)
    return f


def fixture_cond(fwd) -> T3Cond:
    return T3Cond(mx.array(fwd["speaker_emb"]), mx.array(fwd["prompt_tokens"]), mx.array(fwd["emotion_adv"]))


def assert_close(ours, ref, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.array(ours), ref, atol=atol, rtol=rtol)


# -- layout ---------------------------------------------------------------------------------


def test_upstream_layout_full():
    shapes = upstream_shapes(T3Config.full())
    assert len(shapes) == 292
    # upstream T3 at full size: the 0.5B Llama plus conditioning, embeddings and heads
    assert sum(int(np.prod(s)) for s in shapes.values()) == 532_405_248
    assert shapes["speech_pos_emb.emb.weight"] == (4100, 1024)
    assert shapes["text_pos_emb.emb.weight"] == (2050, 1024)
    assert shapes["cond_enc.emotion_adv_fc.weight"] == (1024, 1)
    assert set(upstream_shapes(T3Config.tiny())) == {
        k for k in shapes if not k.startswith("tfmr.layers.") or int(k.split(".")[2]) < 2}


def test_module_names_are_checkpoint_keys(model, weights):
    """Every parameter is a checkpoint key, except the merged projections, each of which
    is its parts' rows stacked in order."""
    names = {k for k, _ in tree_flatten(model.parameters())}
    merged = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
              "self_attn.v_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj"}
    expected = set()
    for key in upstream_shapes(T3Config.tiny()):
        for part, whole in merged.items():
            key = key.replace(f".{part}.", f".{whole}.")
        expected.add(key)
    assert names == expected
    params = convert_weights(weights, T3Config.tiny())
    stacked = np.concatenate([weights[f"tfmr.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    np.testing.assert_array_equal(np.array(params["tfmr.layers.1.self_attn.qkv_proj.weight"]), stacked)
    stacked = np.concatenate([weights[f"tfmr.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    np.testing.assert_array_equal(np.array(params["tfmr.layers.0.mlp.gate_up_proj.weight"]), stacked)
    broken = dict(weights)
    del broken["text_head.weight"]
    with pytest.raises(ValueError, match="missing"):
        convert_weights(broken, T3Config.tiny())
    broken = dict(weights, **{"tfmr.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        convert_weights(broken, T3Config.tiny())


def test_config_round_trip():
    """One rule for every config (models/config.py): unknown keys are named, JSON lists
    come back as the tuples the config holds."""
    for cfg in (T3Config.tiny(), T3Config.tiny().multilingual(), T3Config.full().multilingual()):
        assert T3Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert T3Config.full().multilingual().alignment_heads == ((12, 15), (13, 11), (9, 2))
    with pytest.raises(ConfigError, match="unknown T3Config field: nonsense"):
        T3Config.from_dict({"nonsense": 1})


def test_llama3_rope_changes_17_of_32_pairs():
    cfg = T3Config.full()
    plain = cfg.rope_theta ** (np.arange(0, 64, 2) / 64)
    scaled = llama3_rope_periods(cfg)
    changed = ~np.isclose(scaled, plain, rtol=1e-6)
    assert changed.sum() == 17 and changed[15:].all()
    np.testing.assert_allclose(scaled[18:], plain[18:] * 8, rtol=1e-5)


# -- parity with the reference ------------------------------------------------------------


def test_cond_encoder_matches_reference(model, fwd):
    cond_emb = model.prepare_conditioning(fixture_cond(fwd))
    assert cond_emb.shape == (1, 34, 256)
    assert_close(cond_emb, fwd["cond_emb"])


def test_cached_prompt_embedding_is_used(model, fwd):
    cond = fixture_cond(fwd)
    cached = T3Cond(cond.speaker_emb, cond.cond_prompt_speech_tokens, cond.emotion_adv,
                    cond_prompt_speech_emb=model.prompt_speech_embeds(cond.cond_prompt_speech_tokens))
    assert_close(model.prepare_conditioning(cached), fwd["cond_emb"])


def test_teacher_forced_forward_matches_reference(model, fwd):
    cond_emb = model.prepare_conditioning(fixture_cond(fwd))
    text, speech = mx.array(fwd["text_tokens"]), mx.array(fwd["speech_tokens"])
    embeds = model.prefill_embeds(cond_emb, text)
    speech_emb = mx.broadcast_to(model.speech_embeds(speech, 1), (2, speech.shape[0], 256))
    hidden = model.tfmr(mx.concatenate([embeds, speech_emb], axis=1), model.make_cache(2))
    assert_close(hidden, fwd["hidden"])
    logits = model.teacher_forced_logits(cond_emb, text, speech)
    tail = fwd["tail_logits"].shape[1]
    assert logits.dtype == mx.float32
    assert_close(logits[:, -tail:], fwd["tail_logits"])


def test_cached_decode_matches_reference_loop(model, fwd, dec):
    """Prefill + one step per injected choice (ids >= 6561 included) against the raw
    logits of every backbone call of upstream's own inference loop."""
    cond_emb = model.prepare_conditioning(fixture_cond(fwd))
    logits, cache = model.prefill(cond_emb, mx.array(fwd["text_tokens"]))
    ours = [logits]
    for k, tok in enumerate(dec["choices"].tolist()):
        logits, cache = model.step(tok, k + 1, cache)
        ours.append(logits)
    assert len(ours) == dec["step_logits"].shape[0]
    for got, ref in zip(ours, dec["step_logits"]):
        assert_close(got, ref)


@pytest.mark.parametrize("which", ["probs_top_p_1", "probs_top_p_variant"])
def test_sampler_matches_hf_processors(dec, which):
    """CFG, repetition penalty over BOS + choices, temperature, min_p, top_p: the
    distribution handed to multinomial, on the reference's own logits."""
    sampler = json.loads(str(dec["sampler"]))
    top_p = 1.0 if which == "probs_top_p_1" else float(dec["top_p_variant"])
    params = SamplingParams(top_p=top_p, **sampler)
    seen = mx.arange(8194) == BOS
    for k, ref in enumerate(dec[which]):
        probs = np.array(mx.softmax(process_logits(mx.array(dec["step_logits"][k]), seen, params), axis=-1))[0]
        np.testing.assert_array_equal(probs > 0, ref > 0)  # same support after min_p / top_p
        np.testing.assert_allclose(probs, ref, atol=1e-6)
        seen = seen | (mx.arange(8194) == int(dec["choices"][k]))


def test_greedy_tokens_match_reference(model, fwd, dec):
    ref = dec["greedy_tokens"].tolist()
    if ref and ref[-1] == EOS:
        ref = ref[:-1]
    text = fwd["text_tokens"][1:-1].tolist()  # generate_tokens adds SOT/EOT itself
    ours = list(generate_tokens(model, fixture_cond(fwd), text, temperature=0, max_new_tokens=len(dec["greedy_tokens"])))
    assert len(ours) >= 50 or ref[-1:] == [EOS]
    assert ours == ref


# -- cache ----------------------------------------------------------------------------------


def test_cached_steps_and_chunks_equal_full_forward(model, fwd, monkeypatch):
    """Step-by-step and chunked decoding equal one forward pass, across several cache
    growths (CACHE_STEP made small so the buffers grow many times)."""
    monkeypatch.setattr(t3_module, "CACHE_STEP", 8)
    cond_emb = model.prepare_conditioning(fixture_cond(fwd))
    text = mx.array(fwd["text_tokens"])
    speech = mx.array(np.random.default_rng(3).integers(0, 8194, 21).astype(np.int32))
    full = model.teacher_forced_logits(cond_emb, text, speech)  # (2, L, V)
    start = full.shape[1] - speech.shape[0] - 1  # position whose logits predict token 0

    logits, cache = model.prefill(cond_emb, text)
    assert_close(logits, np.array(full[:, start]), atol=1e-4, rtol=1e-4)
    for k in range(11):
        logits, cache = model.step(int(speech[k]), k + 1, cache)
        assert_close(logits, np.array(full[:, start + k + 1]), atol=1e-4, rtol=1e-4)
    # The rest as one chunk appended to the cache ("causal" aligned to the cache's end).
    chunk = mx.broadcast_to(model.speech_embeds(speech[11:], 12), (2, 10, 256))
    logits, cache = model.forward(chunk, cache)
    assert_close(logits, np.array(full[:, start + 12:]), atol=1e-4, rtol=1e-4)
    assert cache.offset == full.shape[1]


# -- sampler semantics -------------------------------------------------------------------------


def test_repetition_penalty_and_cfg():
    v = 16
    cond = mx.array(np.linspace(-3, 3, v, dtype=np.float32))
    uncond = mx.array(np.linspace(1, -1, v, dtype=np.float32))
    logits = mx.stack([cond, uncond])
    seen = mx.zeros(v, dtype=mx.bool_)
    seen[2] = True
    seen[13] = True
    params = SamplingParams(cfg_weight=0.5, temperature=1.0, repetition_penalty=1.2, min_p=0.0)
    out = np.array(process_logits(logits, seen, params))[0]
    c, u = np.array(cond), np.array(uncond)
    expected = c + 0.5 * (c - u)
    assert expected[2] < 0 < expected[13]
    expected[2] *= 1.2  # negative: multiplied
    expected[13] /= 1.2  # positive: divided
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # batch 1 (cfg_weight 0 path) passes through
    np.testing.assert_allclose(np.array(process_logits(cond[None], None, SamplingParams(temperature=1.0, min_p=0.0)))[0], c)


def test_min_p_and_temperature():
    x = mx.log(mx.array([[0.5, 0.3, 0.02, 0.03, 0.15]]))
    params = SamplingParams(cfg_weight=0.0, temperature=0.5, repetition_penalty=1.0, min_p=0.05)
    out = np.array(process_logits(x, None, params))[0]
    # after temperature 0.5 the probabilities are p^2 / sum: 0.02 and 0.03 fall below 0.05 * p_max
    assert np.isinf(out[2]) and np.isinf(out[3]) and np.isfinite(out[[0, 1, 4]]).all()
    np.testing.assert_allclose(out[[0, 1, 4]], np.log([0.5, 0.3, 0.15]) / 0.5, rtol=1e-6)
    # top_p 1.0 is a no-op, top_p 0.6 keeps only the tokens that make up 60 %
    same = np.array(process_logits(x, None, SamplingParams(cfg_weight=0.0, temperature=1.0, min_p=0.0, top_p=1.0)))
    np.testing.assert_array_equal(same, np.array(x))
    kept = np.isfinite(np.array(process_logits(x, None, SamplingParams(cfg_weight=0.0, temperature=1.0, min_p=0.0, top_p=0.6))))[0]
    assert kept.tolist() == [True, True, False, False, False]


def test_sampling_follows_the_filtered_distribution():
    x = mx.log(mx.array([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(cfg_weight=0.0, temperature=1.0, repetition_penalty=1.0, min_p=0.1)
    keys = mx.random.split(mx.random.key(5), 1000)
    draws = np.array([sample_token(x, None, params, keys[i]).item() for i in range(1000)])
    assert set(draws.tolist()) <= {0, 1}  # min_p removed 2 and 3
    assert abs((draws == 0).mean() - 2 / 3) < 0.05
    greedy = SamplingParams(cfg_weight=0.0, temperature=0.0, repetition_penalty=1.0, min_p=0.1)
    assert sample_token(x, None, greedy, None).item() == 0


def test_seed_reproducibility(model, fwd):
    cond, text = fixture_cond(fwd), fwd["text_tokens"][1:-1].tolist()
    a = list(generate_tokens(model, cond, text, max_new_tokens=12, seed=7))
    b = list(generate_tokens(model, cond, text, max_new_tokens=12, seed=7))
    c = list(generate_tokens(model, cond, text, max_new_tokens=12, seed=8))
    d = list(generate_tokens(model, cond, text, max_new_tokens=5, seed=7))
    assert a == b and a != c
    assert d == a[:5]  # the key of step k does not depend on max_new_tokens


def test_generator_positions_eos_and_limit(model, fwd, monkeypatch):
    """The k-th token is fed at speech position k+1; EOS ends the stream unyielded; at most
    max_new_tokens tokens are sampled. EOS is forced by lifting its logit at one step."""
    cond, text = fixture_cond(fwd), fwd["text_tokens"][1:-1].tolist()
    real_step = model.step
    fed = []

    def step(token, position, cache, eos_at=None):
        fed.append((int(token.item()), position))
        logits, cache = real_step(token, position, cache)
        if eos_at is not None and position == eos_at:
            logits = logits + 1e4 * (mx.arange(logits.shape[-1]) == EOS)
        return logits, cache

    monkeypatch.setattr(model, "step", step, raising=False)
    out = list(generate_tokens(model, cond, text, max_new_tokens=6, temperature=0))
    assert len(out) == 6 and [p for _, p in fed] == [1, 2, 3, 4, 5]
    assert [t for t, _ in fed] == out[:5]

    fed.clear()
    monkeypatch.setattr(model, "step", lambda t, p, c: step(t, p, c, eos_at=3), raising=False)
    out = list(generate_tokens(model, cond, text, max_new_tokens=20, temperature=0))
    assert len(out) == 3 and EOS not in out  # tokens 0..2 yielded, token 3 was EOS


def test_cfg_weight_zero_uses_the_conditional_row(model, fwd):
    cond_emb = model.prepare_conditioning(fixture_cond(fwd))
    text = mx.array(fwd["text_tokens"])
    both, _ = model.prefill(cond_emb, text, use_cfg=True)
    single, cache = model.prefill(cond_emb, text, use_cfg=False)
    assert single.shape == (1, 8194) and cache.batch == 1
    assert_close(single, np.array(both[:1]), atol=1e-5, rtol=1e-5)
    out = list(generate_tokens(model, fixture_cond(fwd), fwd["text_tokens"][1:-1].tolist(), cfg_weight=0.0,
                               max_new_tokens=4, seed=1))
    assert len(out) == 4


def test_half_precision_cast(weights, model, fwd):
    half = build_t3(weights, T3Config.tiny(), dtype=mx.bfloat16)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(half.parameters()))
    text = mx.array(fwd["text_tokens"])
    logits, cache = half.prefill(half.prepare_conditioning(fixture_cond(fwd)), text)
    assert logits.dtype == mx.float32 and cache.keys[0].dtype == mx.bfloat16
    ref, _ = model.prefill(model.prepare_conditioning(fixture_cond(fwd)), text)
    # bf16 has 8 mantissa bits: loose agreement only.
    assert float(mx.abs(logits - ref).max()) < 0.25 * float(mx.abs(ref).max())


def test_text_is_wrapped_with_the_configs_start_and_stop_ids(weights, model, fwd):
    """generate_tokens wraps the text with T3Config.start_text_token / stop_text_token, not
    with fixed ids: a config with other ids (the same weights) prefills with those."""
    cfg = replace(T3Config.tiny(), start_text_token=254, stop_text_token=1)
    custom = build_t3(weights, cfg)
    text = fwd["text_tokens"][1:-1].tolist()
    assert custom.wrap_text(text).tolist() == [254, *text, 1]
    assert model.wrap_text(text).tolist() == fwd["text_tokens"].tolist()  # upstream's 255 ... 0
    cond = fixture_cond(fwd)
    cond_emb = custom.prepare_conditioning(cond)
    logits, _ = custom.prefill(cond_emb, mx.array([254, *text, 1]))
    default_logits, _ = custom.prefill(cond_emb, mx.array(fwd["text_tokens"]))
    assert not np.allclose(np.array(logits), np.array(default_logits), atol=1e-3)  # the ids matter
    first = int(mx.argmax(logits[0] + 0.5 * (logits[0] - logits[1])).item())
    ours = list(generate_tokens(custom, cond, text, temperature=0, repetition_penalty=1.0, max_new_tokens=1))
    assert ours == [first]


def test_sampling_defaults_per_family():
    """One definition per family (models/sampling.py), as the references' generate()."""
    assert sampling.DEFAULTS["chatterbox"] == SamplingParams(0.5, 0.8, 1.2, 0.05, 1.0) == SamplingParams()
    assert sampling.DEFAULTS["multilingual"] == SamplingParams(0.5, 0.8, 2.0, 0.05, 1.0)
    assert sampling.DEFAULTS["turbo"] == sampling.TurboSamplingParams(temperature=0.8, top_k=1000, top_p=0.95,
                                                                       repetition_penalty=1.2)
    params = sampling.MULTILINGUAL.with_options(temperature=0.3, top_p=None)
    assert params == SamplingParams(0.5, 0.3, 2.0, 0.05, 1.0)
    with pytest.raises(TypeError, match="top_k"):
        sampling.ENGLISH.with_options(top_k=5)
