"""Golden outputs of the reference HiFT vocoder and S3Gen DSP (tests/test_hift.py, tests/test_dsp.py).

Runs in the reference's virtual environment:

    OMP_NUM_THREADS=1 /work/ref-venv/bin/python tools/fixtures_hift.py

The reference HiFTGenerator is built with HiFTConfig.tiny() and loads OUR random weights
strictly. By default the script asks our venv (NIGHTINGALE_PYTHON, else .venv/bin/python)
to write them, through this same file's `--write-weights DIR` mode:
`random_weights(upstream_shapes(tiny), default_rng(SEED), "mel2wav.")`, exactly what the
tests regenerate. `--weights FILE --dims FILE` takes them from elsewhere; `--checkpoint DIR`
reads `mel2wav.*` of a make_checkpoint directory's s3gen.safetensors and dims.json (the
tests do not use fixtures made that way).

SineGen's randomness (the Uniform phase and randn_like noise) is replaced by injected
arrays, which the fixtures carry. Random F0-predictor weights give F0 far below SineGen's
10 Hz voicing threshold, so the harmonic branch is exercised with a synthetic F0 contour,
and full inference runs with the classifier bias raised to VOICED_F0_BIAS_HZ (the tests
apply the same change to the same weights).

Writes tests/fixtures/hift_{f0,source,decode,inference}.npz and dsp_{mel,stft}.npz.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SEED = 0  # PCG64 seed of the tiny HiFT weights
VOICED_F0_BIAS_HZ = 150.0  # f0_predictor.classifier.bias for the voiced inference fixture
N_FRAMES = 8  # mel frames per HiFT fixture (3840 samples)
CACHE_SOURCE_SAMPLES = 960  # streaming hook: samples of source carried into inference
FIXTURE_RNG_SEED = 1234  # numpy seed of the fixture inputs (mels, phases, noise, signals)
WEIGHTS_FILE = "hift_tiny.safetensors"
DIMS_FILE = "hift_tiny_dims.json"


def write_weights(out_dir: Path) -> None:
    """Our venv: the tiny HiFT weights (relative mel2wav keys, torch layout) and config."""
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import random_weights
    from nightingale.models.s3gen.hifigan import HiFTConfig, upstream_shapes

    cfg = HiFTConfig.tiny()
    prefix = "mel2wav."
    weights = random_weights(upstream_shapes(cfg), np.random.default_rng(SEED), prefix)
    save_file({k[len(prefix) :]: np.ascontiguousarray(v) for k, v in weights.items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / DIMS_FILE).write_text(json.dumps(cfg.to_dict()))


# ---------------------------------------------------------------------------------------
# Reference side (torch)


def build_reference(dims: dict, tensors: dict):
    import torch
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.hifigan import HiFTGenerator

    f0_predictor = ConvRNNF0Predictor(num_class=dims["f0_num_class"], in_channels=dims["in_channels"], cond_channels=dims["f0_cond_channels"])
    hift = HiFTGenerator(
        in_channels=dims["in_channels"],
        base_channels=dims["base_channels"],
        nb_harmonics=dims["nb_harmonics"],
        sampling_rate=dims["sampling_rate"],
        nsf_alpha=dims["nsf_alpha"],
        nsf_sigma=dims["nsf_sigma"],
        nsf_voiced_threshold=dims["nsf_voiced_threshold"],
        upsample_rates=list(dims["upsample_rates"]),
        upsample_kernel_sizes=list(dims["upsample_kernel_sizes"]),
        istft_params={"n_fft": dims["istft_n_fft"], "hop_len": dims["istft_hop_len"]},
        resblock_kernel_sizes=list(dims["resblock_kernel_sizes"]),
        resblock_dilation_sizes=[list(d) for d in dims["resblock_dilation_sizes"]],
        source_resblock_kernel_sizes=list(dims["source_resblock_kernel_sizes"]),
        source_resblock_dilation_sizes=[list(d) for d in dims["source_resblock_dilation_sizes"]],
        lrelu_slope=dims["lrelu_slope"],
        audio_limit=dims["audio_limit"],
        f0_predictor=f0_predictor,
    )
    hift.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True)
    return hift.eval()


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


def unclipped_wav(hift, features):
    """The reference's own magnitude/phase split and _istft on captured features, before the clamp."""
    import torch

    n_bins = hift.istft_params["n_fft"] // 2 + 1
    with torch.inference_mode():
        return hift._istft(torch.exp(features[:, :n_bins]), torch.sin(features[:, n_bins:])).numpy()


def hift_fixtures(dims: dict, tensors: dict, rng: np.random.Generator) -> None:
    import torch

    hift = build_reference(dims, tensors)
    n_harm = dims["nb_harmonics"] + 1
    upsample = int(np.prod(dims["upsample_rates"])) * dims["istft_hop_len"]
    n_samples = N_FRAMES * upsample
    # Log-mel-like input: a smooth spectral slope plus variation, inside the real range.
    mel = (-4.0 + 1.5 * rng.standard_normal((1, dims["in_channels"], N_FRAMES))).astype(np.float32)

    with torch.inference_mode():
        f0 = hift.f0_predictor(torch.from_numpy(mel)).numpy()
    np.savez_compressed(FIXTURES / "hift_f0.npz", mel=mel, f0=f0)

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
        FIXTURES / "hift_source.npz",
        f0_random=f0,
        phase_random=phase_a,
        noise_random=noise_a,
        source_random=source_a,
        f0_voiced=f0_b,
        phase_voiced=phase_b,
        noise_voiced=noise_b,
        source_voiced=source_b,
    )

    with torch.inference_mode(), captured_spectrum(hift) as captured:
        wav = hift.decode(x=torch.from_numpy(mel), s=torch.from_numpy(source_b)).numpy()
    np.savez_compressed(
        FIXTURES / "hift_decode.npz",
        mel=mel,
        source=source_b,
        spectrum=captured["x"].numpy(),
        wav_unclipped=unclipped_wav(hift, captured["x"]),
        wav=wav,
    )

    voiced = dict(tensors)
    voiced["f0_predictor.classifier.bias"] = np.full_like(tensors["f0_predictor.classifier.bias"], VOICED_F0_BIAS_HZ)
    hift_v = build_reference(dims, voiced)
    phase_c, noise_c = phase_noise()
    cache = (0.05 * rng.standard_normal((1, 1, CACHE_SOURCE_SAMPLES))).astype(np.float32)
    mel_c = (-4.0 + 1.5 * rng.standard_normal((1, dims["in_channels"], N_FRAMES))).astype(np.float32)
    with torch.inference_mode(), injected_sinegen_randomness(phase_c, noise_c), captured_spectrum(hift_v) as captured:
        f0_c = hift_v.f0_predictor(torch.from_numpy(mel_c)).numpy()
        wav_c, source_c = hift_v.inference(speech_feat=torch.from_numpy(mel_c), cache_source=torch.from_numpy(cache))
    print(f"inference: f0 {f0_c.min():.1f}..{f0_c.max():.1f} Hz")
    np.savez_compressed(
        FIXTURES / "hift_inference.npz",
        mel=mel_c,
        phase=phase_c,
        noise=noise_c,
        cache_source=cache,
        f0=f0_c,
        spectrum=captured["x"].numpy(),
        wav_unclipped=unclipped_wav(hift_v, captured["x"]),
        wav=wav_c.numpy(),
        source=source_c.numpy(),
    )


def dsp_fixtures(rng: np.random.Generator) -> None:
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
    np.savez_compressed(FIXTURES / "dsp_mel.npz", wav=wav, mel=mel, mel_fb=mel_fb, trim_fade=trim_fade)

    x = rng.standard_normal((2, 1000)).astype(np.float32)
    out: dict[str, np.ndarray] = {"x": x}
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
        out.update(
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
        out["length_istft"] = torch.istft(spec, 16, 4, 16, window=window, length=1010).numpy()
    np.savez_compressed(FIXTURES / "dsp_stft.npz", **out)


def _load_weights(args: argparse.Namespace) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        dims = json.loads((ckpt / "dims.json").read_text())["s3gen"]["hift"]
        prefix = "mel2wav."
        tensors = {k[len(prefix) :]: v for k, v in load_file(str(ckpt / "s3gen.safetensors")).items() if k.startswith(prefix)}
        return dims, tensors
    if args.weights:
        return json.loads(Path(args.dims).read_text()), load_file(args.weights)
    our_python = os.environ.get("NIGHTINGALE_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    tmp = Path(tempfile.mkdtemp(prefix="hift_weights_"))
    subprocess.run([our_python, str(Path(__file__).resolve()), "--write-weights", str(tmp)], check=True)
    return json.loads((tmp / DIMS_FILE).read_text()), load_file(str(tmp / WEIGHTS_FILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-weights", metavar="DIR", help="(our venv) write the tiny weights and dims into DIR and exit")
    parser.add_argument("--weights", help="safetensors of relative mel2wav keys (with --dims)")
    parser.add_argument("--dims", help="HiFTConfig.to_dict() json for --weights")
    parser.add_argument("--checkpoint", help="a make_checkpoint directory instead")
    args = parser.parse_args()
    if args.write_weights:
        write_weights(Path(args.write_weights))
        return

    import torch

    torch.manual_seed(0)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    dims, tensors = _load_weights(args)
    rng = np.random.default_rng(FIXTURE_RNG_SEED)
    hift_fixtures(dims, tensors, rng)
    dsp_fixtures(rng)
    for path in sorted(FIXTURES.glob("hift_*.npz")) + sorted(FIXTURES.glob("dsp_*.npz")):
        print(f"{path.relative_to(REPO)}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
