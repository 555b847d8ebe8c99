"""S3Gen flow (tokens -> mel) against the PyTorch reference, tiny dims, float32.

Fixtures come from tools/fixtures_flow.py (the reference's own modules, loaded strictly
with the same random weights the tests regenerate here). Errors are measured as
max|ours - ref| / max|ref|; the tolerance is 1e-3 for every stage. Measured on this
machine's CPU (float32): encoder mu 5.6e-7, estimator (batch 2, masked tail) 1.6e-6,
10-step CFM 7.5e-7, inference 7.5e-7 (10 steps) and 3.0e-6 (3 steps); with the
weights cast to bfloat16 1.0e-2 and float16 1.5e-3 (tested below at 0.1).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from nightingale.dev.checkpoint import random_weights
from nightingale.models.s3gen import conv
from nightingale.models.s3gen import estimator as estimator_module
from nightingale.models.s3gen.encoder import rel_position_encoding, rel_shift
from nightingale.models.s3gen.flow import (
    Flow,
    FlowConfig,
    convert_weights,
    cosine_t_span,
    fixed_noise,
    upstream_shapes,
)

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHTS_SEED = 0  # tools/fixtures_flow.py --seed (default 0)
REL_TOL = 1e-3


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"flow_{name}.npz") as data:
        fixture = dict(data)
    assert int(fixture["weights_seed"]) == WEIGHTS_SEED, "fixture made from other weights"
    return fixture


def rel_err(ours: mx.array, ref: np.ndarray) -> float:
    ours = np.array(ours)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def flow() -> Flow:
    cfg = FlowConfig.tiny()
    weights = random_weights(upstream_shapes(cfg), np.random.default_rng(WEIGHTS_SEED))
    model = Flow(cfg)
    model.update(tree_unflatten(list(convert_weights(weights, cfg).items())))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_convert_weights_sets_every_parameter(size: str) -> None:
    cfg = getattr(FlowConfig, size)()
    shapes = upstream_shapes(cfg)
    params = dict(tree_flatten(Flow(cfg).parameters()))
    # every parameter is a checkpoint key, except to_qkv: to_q, to_k and to_v stacked
    merged = {k.replace(".to_q.", ".to_qkv.") for k in shapes if ".to_k." not in k and ".to_v." not in k}
    assert set(params) == merged
    if size == "tiny":
        converted = convert_weights(random_weights(shapes, np.random.default_rng(0)), cfg)
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in params.items()}


def test_convert_weights_is_strict() -> None:
    cfg = FlowConfig.tiny()
    weights = random_weights(upstream_shapes(cfg), np.random.default_rng(0))
    weights.pop("encoder.after_norm.bias")
    with pytest.raises(ValueError, match="missing"):
        convert_weights(weights, cfg)


def test_config_roundtrip() -> None:
    cfg = FlowConfig.tiny()
    assert FlowConfig.from_dict(cfg.to_dict()) == cfg
    assert FlowConfig.full().decoder_channels == (256,)


def test_rel_shift_and_positions() -> None:
    t = 5
    x = mx.random.normal((2, 3, t, 2 * t - 1), key=mx.random.key(0))
    shifted = np.array(rel_shift(x))
    xn = np.array(x)
    for i in range(t):
        for j in range(t):
            np.testing.assert_array_equal(shifted[:, :, i, j], xn[:, :, i, t - 1 - i + j])
    pe = np.array(rel_position_encoding(t, 8))[0]
    # row k is relative position (t-1) - k; the middle row is position 0: sin 0, cos 1
    np.testing.assert_allclose(pe[t - 1], np.tile([0.0, 1.0], 4), atol=1e-7)
    np.testing.assert_allclose(pe[0, 0], np.sin(t - 1.0), rtol=1e-6)


def test_conv_paths_agree(monkeypatch) -> None:
    """Causal (left) and lookahead (right) padding: the BLAS path equals mx.conv1d."""
    x = mx.random.normal((2, 9, 6), key=mx.random.key(1))
    w = mx.random.normal((4, 3, 6), key=mx.random.key(2))
    b = mx.random.normal((4,), key=mx.random.key(3))
    monkeypatch.setattr(conv, "CONV_IMPL", "matmul")
    taps = conv.conv1d(x, w, b, padding=(2, 1))
    monkeypatch.setattr(conv, "CONV_IMPL", "native")
    native = conv.conv1d(x, w, b, padding=(2, 1))
    assert taps.shape == (2, 10, 4)
    # 1e-3 of the largest value: on CUDA both run as TF32 matmuls (measured 4e-4 there)
    assert rel_err(taps, np.array(native)) < 1e-3


def test_encoder_matches_reference(flow: Flow) -> None:
    f = load("encoder")
    mu, mask = flow.encode(mx.array(f["tokens"]), mx.array(f["token_lens"]))
    valid = np.arange(f["tokens"].shape[1])[None, :] < f["token_lens"][:, None]  # (B, T)
    embedded = flow.input_embedding(mx.array(f["tokens"])) * mx.array(valid[:, :, None].astype(np.float32))
    h, _ = flow.encoder(embedded, mx.array(f["token_lens"]))
    assert rel_err(h, f["h"]) < REL_TOL
    assert rel_err(mu, f["mu"]) < REL_TOL
    np.testing.assert_array_equal(np.array(mask), f["mask"].astype(np.float32))
    # batch 1 without lengths (no mask at all) is the full-length row 0
    mu_one, mask_one = flow.encode(mx.array(f["tokens"][:1]))
    assert mask_one is None
    assert rel_err(mu_one, f["mu"][:1]) < REL_TOL


def test_estimator_matches_reference(flow: Flow) -> None:
    f = load("estimator")
    args = [mx.array(f[k]) for k in ("x", "mask", "mu", "t", "spks", "cond")]
    out = flow.estimator(*args)
    assert rel_err(out, f["out"]) < REL_TOL
    assert np.all(np.array(out)[1, :, 14:] == 0.0)
    # row 0 is fully valid: the mask-free path gives the same
    x, _, mu, t, spks, cond = (a[:1] for a in args)
    assert rel_err(flow.estimator(x, None, mu, t, spks, cond), f["out"][:1]) < REL_TOL


def test_cfm_solve_matches_reference(flow: Flow) -> None:
    f = load("cfm")
    n = int(f["n_timesteps"])
    args = {k: mx.array(f[k]) for k in ("mu", "mask", "spks", "cond")}
    out = flow.decoder.solve_euler(mx.array(f["z"]), args["mu"], args["mask"], args["spks"], args["cond"], n)
    assert rel_err(out, f["out"]) < REL_TOL
    out_nomask = flow.decoder.solve_euler(mx.array(f["z"]), args["mu"], None, args["spks"], args["cond"], n)
    assert rel_err(out_nomask, f["out"]) < REL_TOL


def test_cosine_schedule() -> None:
    t = cosine_t_span(10)
    assert t.shape == (11,) and t[0] == 0.0 and abs(t[-1] - 1.0) < 1e-6
    np.testing.assert_allclose(t[5], 1 - np.cos(np.pi / 4), rtol=1e-6)


def test_inference_matches_reference(flow: Flow) -> None:
    f = load("inference")
    inputs = [mx.array(f[k]) for k in ("token", "prompt_token", "prompt_feat", "embedding")]
    noise = mx.array(f["noise"])
    for steps in (10, 3):
        mel = flow.inference(*inputs, noise=noise, n_timesteps=steps)
        assert mel.shape == (1, 80, 2 * f["token"].shape[1])
        assert rel_err(mel, f[f"mel_{steps}"]) < REL_TOL
    window = flow.inference(*inputs, noise=noise, n_timesteps=3, frames=(4, 10))
    assert rel_err(window, f["mel_3"][:, :, 4:10]) < REL_TOL


def test_inference_noise_is_explicit(flow: Flow) -> None:
    f = load("inference")
    inputs = [mx.array(f[k]) for k in ("token", "prompt_token", "prompt_feat", "embedding")]
    with pytest.raises(ValueError, match="key"):
        flow.inference(*inputs, n_timesteps=1)
    with pytest.raises(ValueError, match="noise shape"):
        flow.inference(*inputs, noise=mx.zeros((1, 80, 5)), n_timesteps=1)
    a = flow.inference(*inputs, key=mx.random.key(7), n_timesteps=1)
    b = flow.inference(*inputs, key=mx.random.key(7), n_timesteps=1)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_fixed_noise_is_position_indexed() -> None:
    whole = np.array(fixed_noise(2500, seed=3))
    assert whole.shape == (1, 80, 2500)
    np.testing.assert_array_equal(np.array(fixed_noise(300, seed=3, start=900)), whole[:, :, 900:1200])
    np.testing.assert_array_equal(np.array(fixed_noise(10, seed=3)), whole[:, :, :10])
    assert not np.array_equal(np.array(fixed_noise(10, seed=4)), whole[:, :, :10])
    assert abs(whole.std() - 1.0) < 0.02 and abs(whole.mean()) < 0.02


def test_activations_match_their_definitions() -> None:
    x = mx.concatenate([mx.linspace(-30.0, 30.0, 2001), 3.0 * mx.random.normal((4000,), key=mx.random.key(5))])
    reference_mish = x * mx.tanh(mx.logaddexp(x, 0.0))
    reference_gelu = 0.5 * x * (1.0 + mx.erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(np.array(estimator_module.mish(x)), np.array(reference_mish), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(estimator_module.gelu(x)), np.array(reference_gelu), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_runs_close_to_float32(flow: Flow, dtype: mx.Dtype) -> None:
    f = load("inference")
    inputs = [mx.array(f[k]) for k in ("token", "prompt_token", "prompt_feat", "embedding")]
    half = Flow(flow.cfg)
    half.update(flow.parameters())
    half.set_dtype(dtype)
    mel = half.inference(*inputs, noise=mx.array(f["noise"]), n_timesteps=3)
    assert mel.dtype == mx.float32
    assert rel_err(mel, f["mel_3"]) < 0.1
    # the masked estimator path stays finite (no 0 * -inf in the bias)
    e = load("estimator")
    out = half.estimator(*[mx.array(e[k]) for k in ("x", "mask", "mu", "t", "spks", "cond")])
    assert out.dtype == dtype and bool(mx.all(mx.isfinite(out)))
