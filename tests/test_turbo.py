"""Chatterbox Turbo against the PyTorch reference: layout, tokenizer, GPT-2 T3, MeanFlow.

Fixtures come from tools/fixtures_turbo.py: the reference's own Turbo modules built with
our tiny dims, loaded strictly from the tiny Turbo checkpoint the tests regenerate here
(`make_checkpoint(dir, "tiny", seed=0, family="turbo")`). Tolerances (float32, CPU):
tokenizer identical; T3 conditioning and teacher-forced logits 1e-4 abs + 1e-4 rel; the
sampler's probabilities 1e-5 abs; greedy tokens identical; MeanFlow estimator, 2-step
solve and flow.inference 1e-3 of the peak. Measured errors are in docs/parity.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nightingale.models import loading, t3_turbo, turbo
from nightingale.models.config import ConfigError
from nightingale.models.s3gen import meanflow
from nightingale.models.s3gen.s3gen import S3GenConfig
from nightingale.models.tokenizer_turbo import TAGS, TurboTokenizer, punc_norm

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict:
    with np.load(FIXTURES / f"turbo_{name}.npz") as data:
        return dict(data)


def rel_err(ours, ref: np.ndarray) -> float:
    ours = np.array(ours)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# -- layout -------------------------------------------------------------------------------


def test_full_layout_is_the_reference_state_dict():
    """Our spec of t3_turbo_v1 / s3gen_meanflow equals what the reference's own modules
    (T3 as from_local configures it, S3Gen(meanflow=True)) hold, key for key, shape for shape."""
    ref = json.loads((FIXTURES / "turbo_layout.json").read_text())
    cfgs = turbo.turbo_configs("full")
    ours_t3 = {k: list(v) for k, v in t3_turbo.upstream_shapes(cfgs["t3"]).items()}
    ours_s3 = {k: list(v) for k, v in turbo.meanflow_shapes(cfgs["s3gen"]).items()}
    assert ours_t3 == ref["t3_turbo_v1.safetensors"]
    assert ours_s3 == ref["s3gen_meanflow.safetensors"]


def test_checkpoint_holds_the_upstream_files(tiny_turbo_checkpoint):
    from nightingale.models.hub import TURBO_CHECKPOINT_FILES

    for name in TURBO_CHECKPOINT_FILES:
        assert (tiny_turbo_checkpoint / name).is_file(), name
    assert json.loads((tiny_turbo_checkpoint / "dims.json").read_text())["family"] == "turbo"


def test_model_knows_its_family(tiny_turbo_model, tiny_model):
    assert tiny_turbo_model.family == "turbo" and tiny_turbo_model.describe()["family"] == "turbo"
    assert tiny_turbo_model.describe()["decoder"] == "meanflow"
    assert tiny_model.family == "chatterbox" and tiny_model.describe()["decoder"] == "cfm"


def test_module_parameters_are_the_converted_keys(tiny_turbo_model):
    cfg = tiny_turbo_model.t3.cfg
    expected = {k for k in t3_turbo.upstream_shapes(cfg) if k not in t3_turbo.UNUSED_KEYS}
    assert {k for k, _ in tree_flatten(tiny_turbo_model.t3.parameters())} == expected
    flow_params = {k for k, _ in tree_flatten(tiny_turbo_model.s3gen.flow.parameters())}
    assert meanflow.MIXER_KEY in flow_params


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_loading_is_strict(tiny_turbo_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    from nightingale.models import hub
    from nightingale.models.model import load_model

    bad = _copy_checkpoint(tiny_turbo_checkpoint, tmp_path / "bad")
    weights = load_file(str(bad / turbo.S3GEN_FILE))
    weights.pop(f"flow.{meanflow.MIXER_KEY}")
    save_file(weights, str(bad / turbo.S3GEN_FILE))
    with pytest.raises(loading.CheckpointError, match="time_embed_mixer"):
        load_model(bad, cache=False)

    weights = load_file(str(bad / turbo.T3_FILE))
    weights["tfmr.extra.weight"] = np.zeros(3, dtype=np.float32)
    save_file(weights, str(bad / turbo.T3_FILE))
    with pytest.raises(loading.CheckpointError, match="unexpected key 'tfmr.extra.weight'"):
        load_model(bad, cache=False)

    (bad / "merges.txt").unlink()
    with pytest.raises(hub.CheckpointNotFoundError, match="missing merges.txt"):
        load_model(bad, cache=False)


def test_repo_ids_pick_the_turbo_file_list():
    from nightingale.models import hub

    assert hub.repo_family("ResembleAI/chatterbox-turbo") == "turbo"
    assert hub.repo_family("ResembleAI/chatterbox") == "chatterbox"
    assert "s3gen_meanflow.safetensors" in hub.checkpoint_files("turbo")


# -- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_matches_reference(tiny_turbo_checkpoint):
    ref = fixture("tokenizer")
    tok = TurboTokenizer(tiny_turbo_checkpoint)
    assert len(tok) == int(ref["vocab_size"])
    ids = np.split(ref["ids_flat"], np.cumsum(ref["ids_lengths"])[:-1])
    for text, normed, want in zip(ref["texts"], ref["normed"], ids):
        assert punc_norm(str(text)) == str(normed)
        assert tok.encode(str(normed)) == want.tolist(), text


def test_tags_are_single_tokens(tiny_turbo_checkpoint):
    tok = TurboTokenizer(tiny_turbo_checkpoint)
    for tag in TAGS:
        ids = tok.encode(f"Well {tag} yes.")
        assert tok.tokenizer.token_to_id(tag) in ids, tag
        assert tok.decode(ids) == f"Well {tag} yes."


# -- T3 -----------------------------------------------------------------------------------


def test_conditioning_and_teacher_forced_logits_match_reference(tiny_turbo_model):
    ref = fixture("t3")
    t3 = tiny_turbo_model.t3
    cond = tiny_turbo_model.conds.t3
    cond_emb = t3.prepare_conditioning(cond)
    np.testing.assert_allclose(np.array(cond_emb), ref["cond_emb"], atol=1e-4, rtol=1e-4)
    ours_text = tiny_turbo_model.text_tokens(str(ref["text"]))
    assert ours_text == ref["text_tokens"].tolist()
    logits = t3.teacher_forced_logits(cond_emb, mx.array(ours_text), mx.array(ref["speech_tokens"]))
    tail = ref["tail_logits"]
    np.testing.assert_allclose(np.array(logits[0, -tail.shape[0]:]), tail, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_reference(tiny_turbo_model):
    ref = fixture("t3")
    want = ref["greedy_tokens"].tolist()
    ours = list(t3_turbo.generate_tokens(tiny_turbo_model.t3, tiny_turbo_model.conds.t3, ref["text_tokens"].tolist(),
                                         temperature=0, max_new_tokens=int(ref["greedy_steps"])))
    assert ours == want
    assert len(set(want)) > 10  # the penalty and filters are exercised, not one repeated id


def test_sampler_probabilities_match_reference(tiny_turbo_model):
    """inference_turbo's processors (temperature 0.8, top-k 1000, top-p 0.95, repetition
    penalty 1.2 over BOS first, then the generated ids) on our logits, fed the reference's
    injected choices, give the probabilities the reference handed to multinomial."""
    ref = fixture("t3")
    t3 = tiny_turbo_model.t3
    params = t3_turbo.TurboSamplingParams()
    vocab = mx.arange(t3.cfg.speech_tokens_dict_size)
    logits, cache = t3.prefill(t3.prepare_conditioning(tiny_turbo_model.conds.t3), mx.array(ref["text_tokens"]))
    seen = vocab == t3.cfg.start_speech_token
    generated = mx.zeros(vocab.shape, dtype=mx.bool_)
    for step, choice in enumerate(ref["choices"].tolist()):
        probs = mx.softmax(t3_turbo.process_logits(logits, seen, params), axis=-1)[0]
        np.testing.assert_allclose(np.array(probs), ref["probs"][step], atol=1e-5)
        generated = generated | (vocab == choice)
        seen = generated
        logits, cache = t3.step(choice, cache)


def test_silence_tokens_follow_the_sampled_ones(tiny_turbo_model):
    tokens = list(tiny_turbo_model.generate_tokens("Hello.", seed=3, max_new_tokens=6))
    assert tokens[-3:] == [t3_turbo.S3GEN_SIL] * 3 and len(tokens) <= 9


def test_seed_reproducibility(tiny_turbo_model):
    a = list(tiny_turbo_model.generate_tokens("Hello there.", seed=11, max_new_tokens=20))
    b = list(tiny_turbo_model.generate_tokens("Hello there.", seed=11, max_new_tokens=20))
    c = list(tiny_turbo_model.generate_tokens("Hello there.", seed=12, max_new_tokens=20))
    assert a == b and a != c


# -- MeanFlow -----------------------------------------------------------------------------


def test_meanflow_estimator_with_both_times_matches_reference(tiny_turbo_model):
    ref = fixture("meanflow")
    est = tiny_turbo_model.s3gen.flow.estimator
    out = est(*(mx.array(ref[k]) for k in ("x", "mask", "mu", "t", "spks", "cond")), r=mx.array(ref["r"]))
    assert rel_err(out, ref["estimator_out"]) < 1e-3
    # r matters: the same call with r = t is a different function
    same = est(*(mx.array(ref[k]) for k in ("x", "mask", "mu", "t", "spks", "cond")), r=mx.array(ref["t"]))
    assert rel_err(same, ref["estimator_out"]) > 1e-2


def test_meanflow_two_step_solve_matches_reference(tiny_turbo_model):
    ref = fixture("meanflow")
    flow = tiny_turbo_model.s3gen.flow
    out = flow.decoder.solve_euler(mx.array(ref["z"]), mx.array(ref["cfm_mu"]), None, mx.array(ref["cfm_spks"]),
                                   mx.array(ref["cfm_cond"]), n_timesteps=2)
    assert rel_err(out, ref["cfm_out"]) < 1e-3
    assert flow.cfg.n_timesteps == 2
    np.testing.assert_array_equal(meanflow.linear_t_span(2), [0.0, 0.5, 1.0])


def test_meanflow_inference_matches_reference(tiny_turbo_model):
    ref = fixture("meanflow")
    mel = tiny_turbo_model.s3gen.flow.inference(
        mx.array(ref["token"]), mx.array(ref["prompt_token"]), mx.array(ref["prompt_feat"]),
        mx.array(ref["embedding"]), noise=mx.array(ref["noise"]),
    )
    assert rel_err(mel, ref["mel"]) < 1e-3


# -- quantization and the converted cache -------------------------------------------------


def test_int8_quantizes_gpt2_and_meanflow_layers(tiny_turbo_checkpoint):
    from nightingale.models import load_model
    from nightingale.models.quantize import quantized_paths

    model = load_model(tiny_turbo_checkpoint, quantize=8)
    t3_paths = set(quantized_paths(model.t3))
    assert {"tfmr.h.0.attn.c_attn", "tfmr.h.1.mlp.c_proj", "speech_head", "cond_enc.spkr_enc"} <= t3_paths
    assert "decoder.estimator.time_embed_mixer" in quantized_paths(model.s3gen.flow)
    reloaded = load_model(tiny_turbo_checkpoint, quantize=8)  # from the converted cache
    assert reloaded.checkpoint.path != tiny_turbo_checkpoint and reloaded.family == "turbo"
    assert list(model.generate_tokens("Hi.", seed=1, max_new_tokens=12)) == list(
        reloaded.generate_tokens("Hi.", seed=1, max_new_tokens=12))
    # INT8 stays close to float32 on the first greedy step
    fp = load_model(tiny_turbo_checkpoint)
    cond = fp.conds.t3
    text = mx.array(fp.text_tokens("Hello there."))
    a, _ = fp.t3.prefill(fp.t3.prepare_conditioning(cond), text)
    b, _ = reloaded.t3.prefill(reloaded.t3.prepare_conditioning(cond), text)
    assert rel_err(b, np.array(a)) < 0.05


def test_offline_turbo_repo_names_its_missing_files(tmp_path):
    from nightingale.models import hub

    with pytest.raises(hub.CheckpointNotFoundError) as err:
        hub.resolve_checkpoint("ResembleAI/chatterbox-turbo", cache_dir=tmp_path)
    message = str(err.value)
    assert "t3_turbo_v1.safetensors" in message and "s3gen_meanflow.safetensors" in message and "vocab.json" in message
    assert "t3_cfg.safetensors" not in message


def test_config_round_trip_and_tiny_vocab():
    from nightingale.models.tokenizer_turbo import stand_in_vocab, stand_in_vocab_size

    cfg = t3_turbo.TurboT3Config.tiny()
    merges = len(stand_in_vocab()[1])  # as many as the stand-in's text yields (at most 480)
    assert cfg.text_tokens_dict_size == stand_in_vocab_size() == 256 + merges + 1 + len(TAGS) and merges > 300
    assert t3_turbo.TurboT3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown TurboT3Config field: n_inner"):
        t3_turbo.TurboT3Config.from_dict({**cfg.to_dict(), "n_inner": 7})
    s3 = turbo.turbo_configs("tiny")["s3gen"]
    assert S3GenConfig.from_dict(s3.to_dict()) == s3 and s3.meanflow and s3.flow.n_timesteps == 2
