"""Golden outputs of the reference HiFT vocoder and S3Gen DSP (tests/test_hift.py, tests/test_dsp.py).

Runs in the reference's virtual environment:

    OMP_NUM_THREADS=1 .ref-venv/bin/python tools/fixtures_hift.py   # tools/make_reference_env.sh

The reference HiFTGenerator is built with HiFTConfig.tiny() and loads OUR random weights
strictly. By default the script asks our venv (NIGHTINGALE_PYTHON, else .venv/bin/python)
to write them, through this same file's `--write DIR` mode:
`random_weights(upstream_shapes(tiny), default_rng(0), "mel2wav.")`, exactly what the
tests regenerate, as s3gen.safetensors + dims.json (tools/fixture_common.py).
`--checkpoint DIR` reads `mel2wav.*` of any such directory instead, e.g. a make_checkpoint
one (the tests do not use fixtures made that way).

SineGen's randomness (the Uniform phase and randn_like noise) is replaced by injected
arrays, which the fixtures carry. Random F0-predictor weights give F0 far below SineGen's
10 Hz voicing threshold, so the harmonic branch is exercised with a synthetic F0 contour,
and full inference runs with the classifier bias raised to VOICED_F0_BIAS_HZ (the tests
apply the same change to the same weights).

Writes hift_{f0,source,decode,inference}.npz and dsp_{mel,stft}.npz into tests/fixtures/
(or --out).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np

from fixture_common import load_strict, read_s3gen_part, run_generator, write_s3gen_part

PREFIX = "mel2wav."
VOICED_F0_BIAS_HZ = 150.0  # f0_predictor.classifier.bias for the voiced inference fixture
N_FRAMES = 8  # mel frames per HiFT fixture (3840 samples)
CACHE_SOURCE_SAMPLES = 960  # streaming hook: samples of source carried into inference
FIXTURE_RNG_SEED = 1234  # numpy seed of the fixture inputs (mels, phases, noise, signals)
# HiFTGenerator arguments that are HiFTConfig fields of the same name
SAME_NAMED = ("in_channels", "base_channels", "nb_harmonics", "sampling_rate", "nsf_alpha", "nsf_sigma",
              "nsf_voiced_threshold", "lrelu_slope", "audio_limit")


def write_weights(out_dir: Path, seed: int) -> None:
    """Our venv: the tiny HiFT weights (mel2wav. keys, torch layout) and config."""
    from nightingale.models.s3gen.hifigan import HiFTConfig, upstream_shapes

    cfg = HiFTConfig.tiny()
    write_s3gen_part(out_dir, "hift", PREFIX, cfg, upstream_shapes(cfg), seed)


# ---------------------------------------------------------------------------------------
# Reference side (torch)


def build_reference(dims: dict, tensors: dict):
    """The reference HiFTGenerator (and its ConvRNNF0Predictor) at HiFTConfig dims, loaded strictly."""
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.hifigan import HiFTGenerator

    f0_predictor = ConvRNNF0Predictor(num_class=dims["f0_num_class"], in_channels=dims["in_channels"], cond_channels=dims["f0_cond_channels"])
    hift = HiFTGenerator(
        **{name: dims[name] for name in SAME_NAMED},
        upsample_rates=list(dims["upsample_rates"]),
        upsample_kernel_sizes=list(dims["upsample_kernel_sizes"]),
        istft_params={"n_fft": dims["istft_n_fft"], "hop_len": dims["istft_hop_len"]},
        resblock_kernel_sizes=list(dims["resblock_kernel_sizes"]),
        resblock_dilation_sizes=[list(d) for d in dims["resblock_dilation_sizes"]],
        source_resblock_kernel_sizes=list(dims["source_resblock_kernel_sizes"]),
        source_resblock_dilation_sizes=[list(d) for d in dims["source_resblock_dilation_sizes"]],
        f0_predictor=f0_predictor,
    )
    return load_strict(hift, tensors).eval()


@contextlib.contextmanager
def injected_sinegen_randomness(phase: np.ndarray, noise: np.ndarray):
    """Make SineGen draw `phase` (B, H) from its Uniform and `noise` (B, H, S) from randn_like.

    SourceModuleHnNSF's own randn_like(uv) (an output HiFT discards) gets zeros.
    """
    import torch
    from chatterbox.models.s3gen import hifigan

    class FixedUniform:
        def __init__(self, low, high):
            pass

        def sample(self, sample_shape):
            assert tuple(sample_shape) == (phase.shape[0], phase.shape[1], 1), sample_shape
            return torch.from_numpy(phase[..., None].copy())

    real_randn_like = torch.randn_like

    def fixed_randn_like(t, *args, **kwargs):
        if tuple(t.shape) == noise.shape:
            return torch.from_numpy(noise.copy())
        return torch.zeros_like(t)

    saved = hifigan.Uniform
    hifigan.Uniform = FixedUniform
    torch.randn_like = fixed_randn_like
    try:
        yield
    finally:
        hifigan.Uniform = saved
        torch.randn_like = real_randn_like


def reference_source(hift, f0: np.ndarray, phase: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The reference's f0 -> source path of HiFTGenerator.inference, (B, 1, S)."""
    import torch

    with torch.inference_mode(), injected_sinegen_randomness(phase, noise):
        s = hift.f0_upsamp(torch.from_numpy(f0)[:, None]).transpose(1, 2)
        s, _, _ = hift.m_source(s)
        return s.transpose(1, 2).numpy()


@contextlib.contextmanager
def captured_spectrum(hift):
    """Capture conv_post's output (the pre-iSTFT features) during a decode."""
    captured: dict = {}
    handle = hift.conv_post.register_forward_hook(lambda module, inputs, output: captured.__setitem__("x", output.detach().clone()))
    try:
        yield captured
    finally:
        handle.remove()


def spectrum_fields(hift, captured: dict) -> dict[str, np.ndarray]:
    """conv_post's captured output, and the reference's own magnitude/phase split and _istft
    on it before the clamp (the unclipped waveform)."""
    import torch

    features = captured["x"]
    n_bins = hift.istft_params["n_fft"] // 2 + 1
    with torch.inference_mode():
        wav = hift._istft(torch.exp(features[:, :n_bins]), torch.sin(features[:, n_bins:])).numpy()
    return {"spectrum": features.numpy(), "wav_unclipped": wav}


def hift_fixtures(dims: dict, tensors: dict, rng: np.random.Generator, out: Path) -> None:
    import torch

    hift = build_reference(dims, tensors)
    n_harm = dims["nb_harmonics"] + 1
    upsample = int(np.prod(dims["upsample_rates"])) * dims["istft_hop_len"]
    n_samples = N_FRAMES * upsample
    # Log-mel-like input: a smooth spectral slope plus variation, inside the real range.
    mel = (-4.0 + 1.5 * rng.standard_normal((1, dims["in_channels"], N_FRAMES))).astype(np.float32)

    with torch.inference_mode():
        f0 = hift.f0_predictor(torch.from_numpy(mel)).numpy()
    np.savez_compressed(out / "hift_f0.npz", mel=mel, f0=f0)

    def phase_noise():
        phase = rng.uniform(-np.pi, np.pi, (1, n_harm)).astype(np.float32)
        noise = rng.standard_normal((1, n_harm, n_samples)).astype(np.float32)
        return phase, noise

    # (a) the predictor's own (unvoiced) F0; (b) a voiced contour with one unvoiced frame.
    phase_a, noise_a = phase_noise()
    source_a = reference_source(hift, f0, phase_a, noise_a)
    f0_b = np.linspace(100.0, 250.0, N_FRAMES, dtype=np.float32)[None].copy()
    f0_b[0, 3] = 4.0  # below the 10 Hz threshold: noise-only frame
    phase_b, noise_b = phase_noise()
    source_b = reference_source(hift, f0_b, phase_b, noise_b)
    np.savez_compressed(
        out / "hift_source.npz", f0_random=f0, phase_random=phase_a, noise_random=noise_a, source_random=source_a,
        f0_voiced=f0_b, phase_voiced=phase_b, noise_voiced=noise_b, source_voiced=source_b,
    )

    with torch.inference_mode(), captured_spectrum(hift) as captured:
        wav = hift.decode(x=torch.from_numpy(mel), s=torch.from_numpy(source_b)).numpy()
    np.savez_compressed(out / "hift_decode.npz", mel=mel, source=source_b, **spectrum_fields(hift, captured), wav=wav)

    voiced = dict(tensors)
    voiced["f0_predictor.classifier.bias"] = torch.full_like(tensors["f0_predictor.classifier.bias"], VOICED_F0_BIAS_HZ)
    hift_v = build_reference(dims, voiced)
    phase_c, noise_c = phase_noise()
    cache = (0.05 * rng.standard_normal((1, 1, CACHE_SOURCE_SAMPLES))).astype(np.float32)
    mel_c = (-4.0 + 1.5 * rng.standard_normal((1, dims["in_channels"], N_FRAMES))).astype(np.float32)
    with torch.inference_mode(), injected_sinegen_randomness(phase_c, noise_c), captured_spectrum(hift_v) as captured:
        f0_c = hift_v.f0_predictor(torch.from_numpy(mel_c)).numpy()
        wav_c, source_c = hift_v.inference(speech_feat=torch.from_numpy(mel_c), cache_source=torch.from_numpy(cache))
    print(f"inference: f0 {f0_c.min():.1f}..{f0_c.max():.1f} Hz")
    np.savez_compressed(
        out / "hift_inference.npz", mel=mel_c, phase=phase_c, noise=noise_c, cache_source=cache, f0=f0_c,
        **spectrum_fields(hift_v, captured), wav=wav_c.numpy(), source=source_c.numpy(),
    )


def dsp_fixtures(rng: np.random.Generator, out: Path) -> None:
    import librosa
    import torch
    from chatterbox.models.s3gen.s3gen import S3Token2Wav
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram

    sr = 24000
    t = np.arange(int(0.3 * sr)) / sr  # 7200 samples -> 15 frames
    wav = 0.4 * np.sin(2 * np.pi * (150 * t + 2000 * t**2)) + 0.05 * rng.standard_normal(t.shape)
    wav = wav.astype(np.float32)
    mel = mel_spectrogram(torch.from_numpy(wav)).numpy()
    mel_fb = librosa.filters.mel(sr=sr, n_fft=1920, n_mels=80, fmin=0, fmax=8000)
    trim_fade = S3Token2Wav().trim_fade.numpy()  # the real (non-persistent) buffer
    np.savez_compressed(out / "dsp_mel.npz", wav=wav, mel=mel, mel_fb=mel_fb, trim_fade=trim_fade)

    x = rng.standard_normal((2, 1000)).astype(np.float32)
    arrays: dict[str, np.ndarray] = {"x": x}
    # (n_fft, hop, win_length, center): HiFT's, a wider one with a shorter window, and an
    # uncentred one (Hamming, since a Hann window's zero first tap makes torch refuse it).
    cases = {"a": (16, 4, 16, True), "b": (64, 16, 48, True), "c": (32, 8, 32, False)}
    for name, (n_fft, hop, win, center) in cases.items():
        window = torch.hann_window(win) if center else torch.hamming_window(win)
        spec = torch.stft(torch.from_numpy(x), n_fft, hop, win, window=window, center=center, pad_mode="reflect", return_complex=True)
        # An arbitrary (inconsistent) spectrum, as HiFT's conv_post produces.
        rand = rng.standard_normal(spec.shape) + 1j * rng.standard_normal(spec.shape)
        rand = torch.from_numpy(rand.astype(np.complex64))
        inv = torch.istft(rand, n_fft, hop, win, window=window, center=center)
        arrays.update(
            {
                f"{name}_params": np.array([n_fft, hop, win, int(center)]),
                f"{name}_window": window.numpy(),
                f"{name}_spec_re": spec.real.numpy(),
                f"{name}_spec_im": spec.imag.numpy(),
                f"{name}_rand_re": rand.real.numpy(),
                f"{name}_rand_im": rand.imag.numpy(),
                f"{name}_istft": inv.numpy(),
            }
        )
    # torch.istft with an explicit length, longer than the frames cover (zero-padded tail).
    window = torch.hann_window(16)
    spec = torch.stft(torch.from_numpy(x), 16, 4, 16, window=window, return_complex=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The length of signal is shorter")  # intended here
        arrays["length_istft"] = torch.istft(spec, 16, 4, 16, window=window, length=1010).numpy()
    np.savez_compressed(out / "dsp_stft.npz", **arrays)


def make(checkpoint: Path, out: Path) -> None:
    import torch

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    dims, tensors = read_s3gen_part(checkpoint, "hift", PREFIX)
    rng = np.random.default_rng(FIXTURE_RNG_SEED)
    hift_fixtures(dims, tensors, rng, out)
    dsp_fixtures(rng, out)
    for path in sorted(out.glob("hift_*.npz")) + sorted(out.glob("dsp_*.npz")):
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    run_generator(__doc__, __file__, write=lambda out_dir, args: write_weights(out_dir, args.seed),
                  make=lambda checkpoint, args: make(checkpoint, args.out))
