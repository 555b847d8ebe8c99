"""VoiceEncoder: upstream layout, front end (trim, mel, partials) and embeddings against the
PyTorch reference (fixtures from tools/fixtures_voice.py, tiny weights, seed 0)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nightingale.dev.checkpoint import random_weights, weights_sha256
from nightingale.models import voice_encoder as vem

FIXTURES = Path(__file__).parent / "fixtures"



@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "voice_ve.npz")), dict(np.load(FIXTURES / "voice_audio.npz"))


@pytest.fixture(scope="module")
def tiny_ve(ref):
    cfg = vem.VoiceEncoderConfig.tiny()
    weights = random_weights(vem.upstream_shapes(cfg), np.random.default_rng(0))
    assert weights_sha256(weights) == str(ref[0]["weights_sha256"]), "tiny weights changed: rerun tools/fixtures_voice.py"
    model = vem.VoiceEncoder(cfg)
    model.load_weights(list(vem.convert_weights(weights, cfg).items()), strict=True)
    return model


def test_full_layout_is_ve_safetensors():
    shapes = vem.upstream_shapes(vem.VoiceEncoderConfig.full())
    assert len(shapes) == 16
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_423_618
    assert shapes["lstm.weight_ih_l0"] == (1024, 40) and shapes["lstm.weight_ih_l2"] == (1024, 256)


def test_convert_is_strict():
    cfg = vem.VoiceEncoderConfig.tiny()
    weights = random_weights(vem.upstream_shapes(cfg), np.random.default_rng(0))
    with pytest.raises(ValueError, match="missing"):
        vem.convert_weights({k: v for k, v in weights.items() if k != "proj.bias"}, cfg)
    with pytest.raises(ValueError, match="shape"):
        vem.convert_weights({**weights, "proj.bias": np.zeros(3, np.float32)}, cfg)


def test_config_round_trip():
    cfg = vem.VoiceEncoderConfig.tiny()
    assert vem.VoiceEncoderConfig.from_dict(cfg.to_dict()) == cfg


def test_trim_matches_librosa(ref):
    ve_ref, audio = ref
    _, interval = vem.trim_silence(audio["wav16"])
    assert interval == tuple(ve_ref["interval"])


def test_mel_matches_reference(ref):
    # librosa computes the STFT in float64 and rounds to complex64; ours is float32 throughout.
    ve_ref, audio = ref
    start, end = ve_ref["interval"]
    mel = vem.mel_spectrogram(audio["wav16"][start:end])
    assert mel.shape == ve_ref["mel"].shape
    np.testing.assert_allclose(mel, ve_ref["mel"], rtol=1e-4, atol=1e-5)


def test_partial_windows():
    # 423 frames: divmod(423 - 160 + 77, 77) = (4, 32); (32 + 83) / 160 < 0.8, so 4 windows.
    assert vem.frame_step() == 77
    mel = np.arange(423 * 2, dtype=np.float32).reshape(423, 2)
    parts = vem.partials(mel)
    assert parts.shape == (4, 160, 2)
    np.testing.assert_array_equal(parts[3], mel[231:391])
    # A short utterance is one zero-padded window.
    short = vem.partials(mel[:50])
    assert short.shape == (1, 160, 2) and not short[0, 50:].any()
    # 442 frames: divmod(359, 77) = (4, 51) and (51 + 83) / 160 >= 0.8, so a fifth, padded window.
    long = vem.partials(np.ones((442, 2), np.float32))
    assert long.shape[0] == 5 and not long[4, 442 - 308 :].any()


def test_partial_embeddings_match_reference(ref, tiny_ve):
    ve_ref, _ = ref
    embeds = tiny_ve(mx.array(vem.partials(ve_ref["mel"])))
    np.testing.assert_allclose(np.array(embeds), ve_ref["partial_embeds"], atol=1e-5)


def test_utterance_embedding_matches_reference(ref, tiny_ve):
    ve_ref, audio = ref
    embed = np.array(vem.embed_utterance(tiny_ve, audio["wav16"]))
    assert embed.shape == (1, 256)
    np.testing.assert_allclose(embed, ve_ref["embedding"], atol=1e-5)
    assert abs(np.linalg.norm(embed) - 1.0) < 1e-5 and (embed >= 0).all()
