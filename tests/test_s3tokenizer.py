"""S3Tokenizer v2: upstream layout, log-mel front end, encoder + FSQ tokens against the
PyTorch reference (fixtures from tools/fixtures_voice.py, tiny weights, seed 0)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nightingale.dev.checkpoint import random_weights, weights_sha256
from nightingale.models import s3tokenizer as stm
from nightingale.models.dsp import hann_window, mel_filters

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "tokenizer."
TIE_MARGIN = 1e-3  # reference values this close to a rounding boundary may round either way



@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "voice_s3tok.npz"))


@pytest.fixture(scope="module")
def audio():
    return np.load(FIXTURES / "voice_audio.npz")["wav16"], np.load(FIXTURES / "voice_campplus.npz")["wav16_sinc"]


@pytest.fixture(scope="module")
def tiny_tokenizer(ref):
    cfg = stm.S3TokenizerConfig.tiny()
    weights = random_weights(stm.upstream_shapes(cfg), np.random.default_rng(0), PREFIX)
    assert weights_sha256(weights) == str(ref["weights_sha256"]), "tiny weights changed: rerun tools/fixtures_voice.py"
    model = stm.S3Tokenizer(cfg)
    model.load_weights(list(stm.convert_weights({k[len(PREFIX):]: v for k, v in weights.items()}, cfg).items()), strict=True)
    return model


def _assert_tokens_match(tokens: np.ndarray, ref_tokens: np.ndarray, pre_round: np.ndarray) -> None:
    """Equal everywhere except frames where a reference digit sits within TIE_MARGIN of +-0.5."""
    assert tokens.shape == ref_tokens.shape
    ties = (np.abs(np.abs(pre_round) - 0.5) < TIE_MARGIN).any(axis=-1)
    mismatched = tokens != ref_tokens
    assert not (mismatched & ~ties).any(), f"tokens differ at frames {np.flatnonzero(mismatched & ~ties)}"


def test_full_layout():
    cfg = stm.S3TokenizerConfig.full()
    shapes = stm.upstream_shapes(cfg)
    assert len(shapes) == 102
    assert sum(int(np.prod(s)) for s in shapes.values()) == 123_714_568
    assert "encoder.blocks.5.attn.key.weight" in shapes and "encoder.blocks.5.attn.key.bias" not in shapes
    assert stm.optional_shapes(cfg) == {"_mel_filters": (128, 201), "window": (400,)}
    assert set(stm.OPTIONAL_KEYS) == set(stm.optional_shapes(cfg))


def test_config_requires_64_wide_heads():
    assert stm.S3TokenizerConfig.from_dict(stm.S3TokenizerConfig.tiny().to_dict()) == stm.S3TokenizerConfig.tiny()
    with pytest.raises(ValueError, match="head_dim"):
        stm.S3TokenizerConfig(n_audio_state=128, n_audio_head=4)


def test_convert_accepts_the_optional_buffers_and_nothing_else():
    cfg = stm.S3TokenizerConfig.tiny()
    weights = random_weights(stm.upstream_shapes(cfg), np.random.default_rng(0))
    buffers = {"_mel_filters": np.array(mel_filters(16000, 400, 128, 0.0, 8000.0)), "window": hann_window(400)}
    with_buffers = stm.convert_weights({**weights, **buffers}, cfg)
    without = stm.convert_weights(weights, cfg)
    assert set(with_buffers) == set(without)
    assert "quantizer.project_down.weight" in without  # `_codebook` is dropped (MLX hides underscores)
    with pytest.raises(ValueError, match="unexpected"):
        stm.convert_weights({**weights, "encoder.blocks.0.attn.key.bias": np.zeros(128, np.float32)}, cfg)
    with pytest.raises(ValueError, match="missing"):
        stm.convert_weights({k: v for k, v in weights.items() if "fsmn" not in k}, cfg)


def test_log_mel_matches_reference(ref, audio):
    # float32 STFT on both sides; the difference is summation order (measured 6e-5).
    wav16, _ = audio
    mel = np.array(stm.log_mel_spectrogram(wav16[: 6 * 16000]))[:, : 150 * 4]
    assert mel.shape == ref["t3_mel"].shape
    np.testing.assert_allclose(mel, ref["t3_mel"], atol=3e-4)


def test_fsq_values_match_reference(ref, tiny_tokenizer):
    pre = np.array(tiny_tokenizer.pre_round(mx.array(ref["t3_mel"])[None]))[0]
    np.testing.assert_allclose(pre, ref["t3_pre_round"], atol=1e-4)


def test_fsq_index_is_base3_with_dim0_least_significant():
    pre = np.zeros((1, 3, 8), np.float32)
    pre[0, 0, 0] = 0.9  # digit 2 at 3^0
    pre[0, 1, 7] = -0.9  # digit 0 at 3^7
    pre[0, 2] = 0.99
    idx = np.array(stm.FSQQuantizer.indices(mx.array(pre)))[0]
    ones = sum(3**i for i in range(8))  # every digit 1 (value 0)
    assert idx.tolist() == [ones + 1, ones - 3**7, 3**8 - 1]


def test_t3_prompt_tokens_match_reference(ref, audio, tiny_tokenizer):
    wav16, _ = audio
    tokens = np.array(stm.tokenize_wav(tiny_tokenizer, wav16[: 6 * 16000], max_len=150))[0]
    _assert_tokens_match(tokens, ref["t3_tokens"], ref["t3_pre_round"])


def test_s3gen_prompt_tokens_match_reference(ref, audio, tiny_tokenizer):
    _, wav16_sinc = audio
    tokens = np.array(stm.tokenize_wav(tiny_tokenizer, wav16_sinc))[0]
    _assert_tokens_match(tokens, ref["gen_tokens"], ref["gen_pre_round"])


def test_max_len_and_limits(tiny_tokenizer):
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(int(6.5 * 16000))).astype(np.float32)
    assert stm.tokenize_wav(tiny_tokenizer, wav).shape == (1, 163)  # 650 mel frames -> ceil(650 / 4)
    assert stm.tokenize_wav(tiny_tokenizer, wav, max_len=150).shape == (1, 150)
    with pytest.raises(ValueError, match="30 s"):
        stm.tokenize_wav(tiny_tokenizer, np.zeros(31 * 16000, np.float32))
