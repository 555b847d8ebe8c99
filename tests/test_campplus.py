"""CAMPPlus: upstream layout, batch-norm folding, Kaldi fbank and the x-vector against the
PyTorch reference (fixtures from tools/fixtures_voice.py, tiny weights, seed 0)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nightingale.dev.checkpoint import random_weights, weights_sha256
from nightingale.models import campplus as cpm

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "speaker_encoder."



@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "voice_campplus.npz"))


@pytest.fixture(scope="module")
def tiny_weights(ref):
    cfg = cpm.CAMPPlusConfig.tiny()
    weights = random_weights(cpm.upstream_shapes(cfg), np.random.default_rng(0), PREFIX)
    assert weights_sha256(weights) == str(ref["weights_sha256"]), "tiny weights changed: rerun tools/fixtures_voice.py"
    return {k[len(PREFIX):]: v for k, v in weights.items()}


@pytest.fixture(scope="module")
def tiny_campplus(tiny_weights):
    cfg = cpm.CAMPPlusConfig.tiny()
    model = cpm.CAMPPlus(cfg)
    model.load_weights(list(cpm.convert_weights(tiny_weights, cfg).items()), strict=True)
    return model


def test_full_layout():
    shapes = cpm.upstream_shapes(cpm.CAMPPlusConfig.full())
    stats = ("running_mean", "running_var", "num_batches_tracked")
    params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(stats))
    running = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith(stats))  # 122 BNs, 1 counter each
    assert (params, running) == (6_848_544, 82_298)
    assert shapes["xvector.dense.linear.weight"] == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.weight" not in shapes  # affine=False
    assert shapes["xvector.block3.tdnnd16.linear1.weight"] == (128, 512 + 15 * 32, 1)


def test_config_round_trip():
    cfg = cpm.CAMPPlusConfig.tiny()
    assert cpm.CAMPPlusConfig.from_dict(cfg.to_dict()) == cfg


def test_convert_consumes_every_key(tiny_weights):
    cfg = cpm.CAMPPlusConfig.tiny()
    with pytest.raises(ValueError, match="missing"):
        cpm.convert_weights({k: v for k, v in tiny_weights.items() if not k.endswith("head.bn1.running_var")}, cfg)
    with pytest.raises(ValueError, match="unexpected"):
        cpm.convert_weights({**tiny_weights, "xvector.dense.nonlinear.batchnorm.weight": np.ones(192, np.float32)}, cfg)


def test_folded_conv_equals_conv_then_batch_norm(tiny_weights):
    # head.conv1 + head.bn1, evaluated the long way in numpy on one 3x3 patch.
    cfg = cpm.CAMPPlusConfig.tiny()
    folded = cpm.convert_weights(tiny_weights, cfg)
    patch = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    conv = (tiny_weights["head.conv1.weight"][:, 0] * patch).sum(axis=(1, 2))
    bn = {k: tiny_weights[f"head.bn1.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    expected = (conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
    got = (np.array(folded["head.conv1.weight"])[:, :, :, 0] * patch).sum(axis=(1, 2)) + np.array(folded["head.conv1.bias"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_segment_mean_averages_the_partial_last_segment():
    x = mx.arange(250, dtype=mx.float32).reshape(1, 250, 1)
    seg = np.array(cpm._segment_mean(x))[0, :, 0]
    assert seg[0] == pytest.approx(49.5) and seg[199] == pytest.approx(149.5)
    assert seg[200] == pytest.approx(224.5) and seg[249] == pytest.approx(224.5)  # mean of 200..249 only


def test_fbank_matches_kaldi(ref):
    # Ours is float64 and rounded once; the reference is float32 throughout. Log energies are
    # within 2.3e-4 (the largest gaps are in the quietest bins); most agree to 1e-5.
    fbank = cpm.kaldi_fbank(ref["wav16_sinc"])
    assert fbank.shape == ref["fbank"].shape == (1 + (ref["wav16_sinc"].shape[0] - 400) // 160, 80)
    np.testing.assert_allclose(fbank, ref["fbank"], atol=1e-3)
    assert np.median(np.abs(fbank - ref["fbank"])) < 2e-5


def test_xvector_matches_reference(ref, tiny_campplus):
    xvector = np.array(cpm.xvector_from_wav(tiny_campplus, ref["wav16_sinc"]))
    assert xvector.shape == (1, 192)
    np.testing.assert_allclose(xvector, ref["xvector"], atol=1e-5)
