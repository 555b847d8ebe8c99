"""models/dsp.py against torch.stft / torch.istft, librosa's mel filters and the reference's
S3Gen mel and trim fade (golden files from tools/fixtures_hift.py)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nightingale.models import dsp

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def stft_fx():
    return np.load(FIXTURES / "dsp_stft.npz")


@pytest.fixture(scope="module")
def mel_fx():
    return np.load(FIXTURES / "dsp_mel.npz")


def test_hann_window_is_periodic():
    w = dsp.hann_window(16)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16), atol=1e-7)
    np.testing.assert_allclose(dsp.hann_window(5, periodic=False), [0, 0.5, 1, 0.5, 0], atol=1e-7)


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_stft_matches_torch(stft_fx, case):
    n_fft, hop, _, center = (int(v) for v in stft_fx[f"{case}_params"])
    spec = dsp.stft(mx.array(stft_fx["x"]), n_fft, hop, stft_fx[f"{case}_window"], center=bool(center))
    expected = stft_fx[f"{case}_spec_re"] + 1j * stft_fx[f"{case}_spec_im"]
    assert spec.shape == expected.shape
    # float32 FFTs of O(1) data: errors ~1e-6 of the spectrum's scale.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.array(spec), expected, atol=1e-5 * scale)


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_istft_matches_torch_on_arbitrary_spectra(stft_fx, case):
    """An inconsistent spectrum (as a vocoder emits) exercises the window-square normalisation,
    the centre trim and the discarded DC/Nyquist imaginary parts."""
    n_fft, hop, _, center = (int(v) for v in stft_fx[f"{case}_params"])
    spec = mx.array(stft_fx[f"{case}_rand_re"]) + 1j * mx.array(stft_fx[f"{case}_rand_im"])
    wav = dsp.istft(spec, n_fft, hop, stft_fx[f"{case}_window"], center=bool(center))
    expected = stft_fx[f"{case}_istft"]
    assert wav.shape == expected.shape
    np.testing.assert_allclose(np.array(wav), expected, rtol=1e-4, atol=1e-5)


def test_stft_istft_round_trip_and_length(stft_fx):
    x = mx.array(stft_fx["x"])
    window = dsp.hann_window(16)
    spec = dsp.stft(x, 16, 4, window)
    np.testing.assert_allclose(np.array(dsp.istft(spec, 16, 4, window)), stft_fx["x"], atol=1e-5)
    padded = dsp.istft(spec, 16, 4, window, length=1010)
    np.testing.assert_allclose(np.array(padded), stft_fx["length_istft"], atol=1e-5)


def test_istft_refuses_a_vanishing_window():
    spec = mx.zeros((9, 10), dtype=mx.complex64)
    with pytest.raises(ValueError):
        dsp.istft(spec, 16, 4, dsp.hann_window(16), center=False)


def test_overlap_add_matches_a_loop():
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    expected = np.zeros((2, 4 * 3 + 7, 3), dtype=np.float32)
    for f in range(5):
        expected[:, f * 3 : f * 3 + 7] += frames[:, f]
    np.testing.assert_allclose(np.array(dsp.overlap_add(mx.array(frames), 3)), expected, atol=1e-6)


def test_mel_filters_match_librosa(mel_fx):
    fb = dsp.mel_filters(24000, 1920, 80, 0.0, 8000.0)
    assert fb.shape == (80, 961) and fb.dtype == np.float32
    np.testing.assert_allclose(fb, mel_fx["mel_fb"], rtol=1e-6, atol=1e-9)
    assert dsp.mel_filters(24000, 1920, 80, 0.0, 8000.0) is fb  # cached


def test_s3gen_mel_matches_reference(mel_fx):
    mel = dsp.s3gen_mel_spectrogram(mx.array(mel_fx["wav"]))
    expected = mel_fx["mel"]
    assert mel.shape == expected.shape == (1, 80, mel_fx["wav"].shape[0] // 480)
    # Natural-log mel: an absolute error of 1e-3 is a 0.1% relative error of the mel energy.
    np.testing.assert_allclose(np.array(mel), expected, atol=1e-3)


def test_trim_fade_matches_reference(mel_fx):
    fade = dsp.trim_fade()
    np.testing.assert_allclose(fade, mel_fx["trim_fade"], atol=1e-6)
    assert np.all(fade[:480] == 0.0)

    wav = mx.ones((1, 2000))
    faded = np.array(dsp.apply_trim_fade(wav))
    np.testing.assert_allclose(faded[0, :960], fade, atol=1e-7)
    assert np.all(faded[0, 960:] == 1.0)
    short = np.array(dsp.apply_trim_fade(mx.ones((1, 700))))  # shorter than the fade
    np.testing.assert_allclose(short[0], fade[:700], atol=1e-7)
