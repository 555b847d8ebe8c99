"""HiFT vocoder (models/s3gen/hifigan.py) against the PyTorch reference.

Golden files come from tools/fixtures_hift.py, which loads the same tiny random weights
(regenerated here from the same seed) into the reference HiFTGenerator, with SineGen's
phase and noise injected.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nightingale.dev.checkpoint import random_weights
from nightingale.models.s3gen import conv, hifigan
from nightingale.models.s3gen.hifigan import HiFTConfig, HiFTGenerator, convert_weights, upstream_shapes

FIXTURES = Path(__file__).parent / "fixtures"
SEED = 0  # as tools/fixtures_hift.py
VOICED_F0_BIAS_HZ = 150.0  # as tools/fixtures_hift.py
PREFIX = "mel2wav."


def tiny_weights() -> dict[str, np.ndarray]:
    cfg = HiFTConfig.tiny()
    weights = random_weights(upstream_shapes(cfg), np.random.default_rng(SEED), PREFIX)
    return {k[len(PREFIX) :]: v for k, v in weights.items()}


@pytest.fixture(scope="module")
def weights():
    return tiny_weights()


def build(weights: dict[str, np.ndarray]) -> HiFTGenerator:
    """A tiny HiFTGenerator loaded strictly, as S3Gen.load_upstream loads `mel2wav.`."""
    cfg = HiFTConfig.tiny()
    model = HiFTGenerator(cfg)
    model.load_weights(list(convert_weights(weights, cfg).items()), strict=True)
    return model


@pytest.fixture(scope="module")
def model(weights):
    return build(weights)


@pytest.fixture(scope="module")
def voiced_model(weights):
    voiced = dict(weights)
    voiced["f0_predictor.classifier.bias"] = np.full_like(weights["f0_predictor.classifier.bias"], VOICED_F0_BIAS_HZ)
    return build(voiced)


@pytest.fixture(params=[("matmul", "poly"), ("native", "sin")], ids=["cpu-kernels", "native-ops"])
def conv_impl(request, monkeypatch):
    """Run a test with the CPU paths (BLAS-matmul convolutions, polynomial Snake) and with
    MLX's native conv ops and sin (the GPU paths)."""
    monkeypatch.setattr(conv, "CONV_IMPL", request.param[0])
    monkeypatch.setattr(hifigan, "SNAKE_IMPL", request.param[1])
    return request.param


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"hift_{name}.npz") as f:
        return dict(f)


def rel_err(actual: mx.array, expected: np.ndarray) -> float:
    """max |a - e| / max |e|."""
    return float(np.abs(np.array(actual) - expected).max() / np.abs(expected).max())


# ---------------------------------------------------------------------------------------
# Layout


def test_upstream_layout_and_conversion_cover_every_parameter(weights):
    cfg = HiFTConfig.tiny()
    shapes = upstream_shapes(cfg)
    assert len(shapes) == 328  # the reference's state_dict has as many (tools/ loads it strictly)
    params = dict(tree_flatten(HiFTGenerator(cfg).parameters()))
    converted = convert_weights(weights, cfg)
    assert set(converted) == set(params)
    for name, value in converted.items():
        assert value.shape == params[name].shape, name
        assert value.dtype == mx.float32, name


def test_full_config_parameter_count():
    """20,821,295 parameters with weight-norm g and v both counted (the reference's
    HiFTGenerator at its default config; tools/fixtures_hift.py loads the tiny one strictly)."""
    shapes = upstream_shapes(HiFTConfig.full())
    assert sum(int(np.prod(s)) for s in shapes.values()) == 20_821_295
    assert shapes["ups.0.parametrizations.weight.original0"] == (512, 1, 1)  # g over in_channels
    assert shapes["source_downs.0.weight"] == (256, 18, 30)
    assert HiFTConfig.full().upsample_total == HiFTConfig.tiny().upsample_total == 480


def test_config_round_trips_through_a_dict():
    cfg = HiFTConfig.tiny()
    assert HiFTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_conversion_rejects_a_missing_key(weights):
    broken = dict(weights)
    del broken["conv_post.bias"]
    with pytest.raises(ValueError):
        convert_weights(broken, HiFTConfig.tiny())


# ---------------------------------------------------------------------------------------
# Convolutions


@pytest.mark.parametrize(
    "t, c_in, c_out, k, stride, padding, dilation",
    [
        (50, 18, 16, 30, 15, 7, 1),  # source_downs[0]
        (50, 64, 32, 11, 1, 15, 3),  # dilated resblock conv
        (40, 200, 24, 11, 1, 25, 5),  # wide
        (30, 18, 8, 1, 1, 0, 1),  # 1x1
    ],
)
@pytest.mark.parametrize("gemm", ["im2col", "per-tap"])
def test_matmul_conv1d_equals_native(t, c_in, c_out, k, stride, padding, dilation, gemm, monkeypatch):
    keys = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal((2, t, c_in), key=keys[0])
    w = mx.random.normal((c_out, k, c_in), key=keys[1]) / np.sqrt(k * c_in)
    b = mx.random.normal((c_out,), key=keys[2])
    expected = mx.conv1d(x, w, stride=stride, padding=padding, dilation=dilation) + b
    monkeypatch.setattr(conv, "CONV_IMPL", "matmul")
    # either GEMM layout whatever this process's BLAS (a strided conv is always im2col)
    monkeypatch.setattr(conv, "fast_blas_loaded", lambda: True)
    monkeypatch.setattr(conv, "IM2COL_MAX_ELEMENTS", 1 << 30 if gemm == "im2col" else 0)
    actual = conv.conv1d(x, w, b, stride, padding, dilation)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(np.array(actual), np.array(expected), atol=1e-4)


@pytest.mark.parametrize("t, c_in, c_out, k, stride", [(10, 32, 16, 16, 8), (20, 16, 8, 11, 5), (30, 8, 4, 7, 3)])
def test_matmul_conv_transpose1d_equals_native(t, c_in, c_out, k, stride, monkeypatch):
    keys = mx.random.split(mx.random.key(1), 3)
    x = mx.random.normal((2, t, c_in), key=keys[0])
    w = mx.random.normal((c_out, k, c_in), key=keys[1]) / np.sqrt(c_in)
    b = mx.random.normal((c_out,), key=keys[2])
    padding = (k - stride) // 2
    expected = mx.conv_transpose1d(x, w, stride=stride, padding=padding) + b
    monkeypatch.setattr(conv, "CONV_IMPL", "matmul")
    actual = conv.conv_transpose1d(x, w, b, stride, padding)
    assert actual.shape == expected.shape == (2, t * stride, c_out)
    np.testing.assert_allclose(np.array(actual), np.array(expected), atol=1e-4)


def test_polynomial_sin_squared():
    """The CPU Snake's sin^2 against mx.sin: error ~1e-7 |y| (float32 rounding of y itself)."""
    y = mx.concatenate([mx.linspace(-7.0, 7.0, 100_001), mx.linspace(-300.0, 300.0, 100_001)])
    expected = np.sin(np.array(y).astype(np.float64)) ** 2
    err = np.abs(np.array(hifigan.sin_squared(y)) - expected)
    assert err.max() <= 1e-6 + 2e-7 * np.abs(np.array(y)).max()
    assert err[:100_001].max() < 1e-6


def test_snake_paths_agree(monkeypatch):
    snake = hifigan.Snake(8)
    snake.alpha = mx.linspace(0.5, 1.5, 8)
    x = 3.0 * mx.random.normal((2, 50, 8), key=mx.random.key(3))
    monkeypatch.setattr(hifigan, "SNAKE_IMPL", "sin")
    exact = np.array(snake(x))
    monkeypatch.setattr(hifigan, "SNAKE_IMPL", "poly")
    np.testing.assert_allclose(np.array(snake(x)), exact, atol=2e-6)


# ---------------------------------------------------------------------------------------
# Parity with the reference


def test_f0_predictor(model, conv_impl):
    fx = load("f0")
    f0 = model.f0(mx.array(fx["mel"]))
    assert f0.shape == fx["f0"].shape
    assert rel_err(f0, fx["f0"]) < 1e-3  # float32 features: 1e-3 of the largest value


@pytest.mark.parametrize("case", ["random", "voiced"])
def test_source(model, case):
    """(random) the predictor's own F0, all below 10 Hz: noise only; (voiced) a 100-250 Hz
    contour with one unvoiced frame: 9 harmonics with injected phases."""
    fx = load("source")
    source = model.source(mx.array(fx[f"f0_{case}"]), phase=mx.array(fx[f"phase_{case}"]), noise=mx.array(fx[f"noise_{case}"]))
    expected = fx[f"source_{case}"]
    assert source.shape == expected.shape == (1, 1, 480 * fx[f"f0_{case}"].shape[1])
    # The phase is built per frame (see sine_harmonics) while the reference sums per sample;
    # over 3840 samples the two agree to ~1e-5 rad, far inside this bound.
    np.testing.assert_allclose(np.array(source), expected, atol=2e-5)


def test_decode(model, conv_impl):
    fx = load("decode")
    mel, source = mx.array(fx["mel"]), mx.array(fx["source"])
    spectrum = model.decode_spectrum(mel, source)  # (B, F, 18)
    spectrum_t = np.array(spectrum).transpose(0, 2, 1)  # -> reference (B, 18, F)
    assert spectrum_t.shape == fx["spectrum"].shape
    assert rel_err(mx.array(spectrum_t), fx["spectrum"]) < 1e-3

    # Random weights drive most samples into the +-0.99 clamp, so the iSTFT is checked
    # before it too (the reference's own _istft on its features).
    unclipped = np.array(model.spectrum_to_wav(spectrum))
    assert unclipped.shape == fx["wav_unclipped"].shape
    assert np.corrcoef(unclipped.ravel(), fx["wav_unclipped"].ravel())[0, 1] >= 0.999
    assert rel_err(mx.array(unclipped), fx["wav_unclipped"]) < 2e-3

    wav = np.array(model.decode(mel, source))
    assert wav.shape == fx["wav"].shape == (1, 480 * fx["mel"].shape[2])
    assert np.abs(wav - fx["wav"]).max() < 2e-3  # absolute, on a +-0.99 waveform


def test_inference_voiced_with_cache_source(voiced_model, conv_impl):
    """Full inference on a voiced F0 (~150 Hz), with the first 960 source samples taken from
    a streaming cache."""
    fx = load("inference")
    mel = mx.array(fx["mel"])
    wav, source = voiced_model.inference(mel, mx.array(fx["cache_source"]), phase=mx.array(fx["phase"]), noise=mx.array(fx["noise"]))
    f0 = voiced_model.f0(mel)
    assert float(f0.min()) > 10.0  # the harmonic branch really runs
    assert rel_err(f0, fx["f0"]) < 1e-3
    np.testing.assert_allclose(np.array(source), fx["source"], atol=2e-5)
    np.testing.assert_array_equal(np.array(source)[..., :960], fx["cache_source"])

    # Our source differs from the reference's by ~1e-5 and the random network amplifies
    # that (unclipped peaks near 30): features and unclipped waveform to 1e-3 of their
    # peaks, the clamped waveform to correlation and a 1e-2 absolute bound.
    spectrum = voiced_model.decode_spectrum(mel, source)
    assert rel_err(mx.array(np.array(spectrum).transpose(0, 2, 1)), fx["spectrum"]) < 1e-3
    assert rel_err(voiced_model.spectrum_to_wav(spectrum), fx["wav_unclipped"]) < 1e-3
    wav = np.array(wav)
    assert wav.shape == fx["wav"].shape == (1, 480 * fx["mel"].shape[2])
    assert np.corrcoef(wav.ravel(), fx["wav"].ravel())[0, 1] >= 0.999
    assert np.abs(wav - fx["wav"]).max() < 1e-2


# ---------------------------------------------------------------------------------------
# Randomness


def test_drawn_randomness_is_keyed(voiced_model):
    mel = mx.array(load("inference")["mel"])
    wav_a, src_a = voiced_model.inference(mel, key=mx.random.key(7))
    wav_b, src_b = voiced_model.inference(mel, key=mx.random.key(7))
    _, src_c = voiced_model.inference(mel, key=mx.random.key(8))
    assert np.array_equal(np.array(src_a), np.array(src_b))
    assert np.array_equal(np.array(wav_a), np.array(wav_b))
    assert not np.allclose(np.array(src_a), np.array(src_c))
    with pytest.raises(ValueError):
        voiced_model.inference(mel)  # nothing injected and no key
