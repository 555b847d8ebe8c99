"""Golden outputs of the reference S3Gen flow (tiny dims) for tests/test_flow.py.

Run in the reference's virtual environment (tools/make_reference_env.sh builds .ref-venv):

    .ref-venv/bin/python tools/fixtures_flow.py            # writes tests/fixtures/flow_*.npz

Weights: by default our venv writes the tiny flow's random weights, exactly as the tests
regenerate them (`random_weights(upstream_shapes(FlowConfig.tiny()), default_rng(0))`),
into a temporary checkpoint-like directory (s3gen.safetensors with `flow.` keys +
dims.json; tools/fixture_common.py). With `--checkpoint DIR` it reads any such directory
instead (e.g. one from make_checkpoint); fixtures made that way only match tests that load
the same weights.

The reference modules are built with the tiny dims. Upstream hard-codes three things to the
full size, which the script rebuilds at the tiny width with the reference's own classes:
`pre_lookahead_layer` (512 channels), `up_layer` (512 channels) and the number of
`up_encoders` (4). The weights then load with strict=True, so every `flow.` key is used
and none is missing. CFM noise is injected by patching torch.randn_like.

tools/fixtures_turbo.py builds its MeanFlow flow and draws its inputs with this file's
functions.

Mode for our venv (used by the default path above):
    .venv/bin/python tools/fixtures_flow.py --write DIR [--seed 0]
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from fixture_common import load_strict, read_s3gen_part, run_generator, write_s3gen_part  # noqa: E402

INPUT_SEED = 1234  # inputs (tokens, noise, mels) drawn here and stored in the fixtures
PREFIX = "flow."


def write_weights(out_dir: Path, seed: int) -> None:
    """Our venv: tiny flow weights in the upstream layout + dims.json."""
    from nightingale.models.s3gen.flow import FlowConfig, upstream_shapes

    cfg = FlowConfig.tiny()
    write_s3gen_part(out_dir, "flow", PREFIX, cfg, upstream_shapes(cfg), seed)


def build_reference(dims: dict, meanflow: bool = False):
    """The reference CausalMaskedDiffWithXvec with the given (tiny) FlowConfig dims; with
    `meanflow`, Turbo's estimator (the r time input) behind the same CFM."""
    import torch

    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
    from chatterbox.models.s3gen.transformer.upsample_encoder import (
        PreLookaheadLayer,
        Upsample1D,
        UpsampleConformerEncoder,
    )

    d = dims["encoder_output_size"]
    encoder = UpsampleConformerEncoder(  # the arguments S3Token2Mel passes, at tiny width
        output_size=d,
        attention_heads=dims["encoder_attention_heads"],
        linear_units=dims["encoder_linear_units"],
        num_blocks=dims["encoder_num_blocks"],
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        normalize_before=True,
        input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
        input_size=dims["input_size"],
        use_cnn_module=False,
        macaron_style=False,
    )
    # upstream builds these at 512 channels and 4 up_encoders regardless of the arguments
    encoder.pre_lookahead_layer = PreLookaheadLayer(channels=d, pre_lookahead_len=dims["pre_lookahead_len"])
    encoder.up_layer = Upsample1D(channels=d, out_channels=d, stride=dims["token_mel_ratio"])
    assert dims["encoder_num_up_blocks"] <= len(encoder.up_encoders)
    encoder.up_encoders = encoder.up_encoders[: dims["encoder_num_up_blocks"]]

    estimator = ConditionalDecoder(
        in_channels=dims["decoder_in_channels"],
        out_channels=dims["output_size"],
        causal=True,
        channels=list(dims["decoder_channels"]),
        dropout=0.0,
        attention_head_dim=dims["decoder_attention_head_dim"],
        n_blocks=dims["decoder_n_blocks"],
        num_mid_blocks=dims["decoder_num_mid_blocks"],
        num_heads=dims["decoder_num_heads"],
        act_fn="gelu",
        meanflow=meanflow,
    )
    # a MeanFlow config says no guidance (0), but upstream's CFM keeps its rate; it skips CFG
    assert meanflow or CFM_PARAMS.inference_cfg_rate == dims["inference_cfg_rate"]
    decoder = CausalConditionalCFM(spk_emb_dim=dims["output_size"], cfm_params=CFM_PARAMS, estimator=estimator)
    flow = CausalMaskedDiffWithXvec(
        input_size=dims["input_size"],
        output_size=dims["output_size"],
        spk_embed_dim=dims["spk_embed_dim"],
        vocab_size=dims["vocab_size"],
        token_mel_ratio=dims["token_mel_ratio"],
        pre_lookahead_len=dims["pre_lookahead_len"],
        encoder=encoder,
        decoder=decoder,
    )
    return flow.eval().to(torch.float32)


@contextlib.contextmanager
def injected_randn_like(noise):
    """torch.randn_like returns `noise` (the CFM's only draw) inside the block."""
    import torch

    original = torch.randn_like

    def fake(t, *args, **kwargs):
        assert tuple(t.shape) == tuple(noise.shape), (t.shape, noise.shape)
        return noise.clone().to(t.dtype)

    torch.randn_like = fake
    try:
        yield
    finally:
        torch.randn_like = original


def estimator_inputs(rng: np.random.Generator, mel: int, frames: int = 20) -> dict[str, np.ndarray]:
    """One estimator call's inputs, batch 2: row 1 with a masked tail, cond zero after frame 8."""
    x = rng.standard_normal((2, mel, frames), dtype=np.float32)
    mask = np.ones((2, 1, frames), dtype=np.float32)
    mask[1, :, 14:] = 0.0
    mu = rng.standard_normal((2, mel, frames), dtype=np.float32)
    spks = rng.standard_normal((2, mel), dtype=np.float32)
    cond = rng.standard_normal((2, mel, frames), dtype=np.float32)
    cond[:, :, 8:] = 0.0
    return {"x": x, "mask": mask, "mu": mu, "spks": spks, "cond": cond}


def cfm_inputs(rng: np.random.Generator, mel: int, frames: int = 24) -> dict[str, np.ndarray]:
    """A CFM solve's inputs, batch 1: noise z, mu, an all-valid mask, spks, an 8-frame cond."""
    z = rng.standard_normal((1, mel, frames), dtype=np.float32)
    mu = rng.standard_normal((1, mel, frames), dtype=np.float32)
    mask = np.ones((1, 1, frames), dtype=np.float32)
    spks = rng.standard_normal((1, mel), dtype=np.float32)
    cond = np.zeros((1, mel, frames), dtype=np.float32)
    cond[:, :, :8] = rng.standard_normal((1, mel, 8), dtype=np.float32)
    return {"z": z, "mu": mu, "mask": mask, "spks": spks, "cond": cond}


def inference_inputs(rng: np.random.Generator, dims: dict, n: int = 10, p: int = 6) -> dict[str, np.ndarray]:
    """flow.inference's inputs: n tokens after a p-token prompt (mel of 2p frames), an
    x-vector, and the noise for all 2 (p + n) frames."""
    mel = dims["output_size"]
    token = rng.integers(0, dims["vocab_size"], size=(1, n)).astype(np.int32)
    prompt_token = rng.integers(0, dims["vocab_size"], size=(1, p)).astype(np.int32)
    prompt_feat = (rng.standard_normal((1, 2 * p, mel), dtype=np.float32) - 5.0).astype(np.float32)
    embedding = (3.0 * rng.standard_normal((1, dims["spk_embed_dim"]), dtype=np.float32)).astype(np.float32)
    noise = rng.standard_normal((1, mel, 2 * (p + n)), dtype=np.float32)
    return {"token": token, "prompt_token": prompt_token, "prompt_feat": prompt_feat, "embedding": embedding,
            "noise": noise}


def run_estimator(flow, inputs: dict, t: np.ndarray, **kwargs) -> np.ndarray:
    """The reference estimator on `estimator_inputs` at times t (kwargs: MeanFlow's r)."""
    import torch

    T = torch.from_numpy
    args = [T(inputs[k]) for k in ("x", "mask", "mu")] + [T(t)] + [T(inputs[k]) for k in ("spks", "cond")]
    return flow.decoder.estimator(*args, **{k: T(v) for k, v in kwargs.items()}).numpy()


def run_cfm(flow, inputs: dict, n_timesteps: int, **kwargs) -> np.ndarray:
    """The reference CFM solve on `cfm_inputs`, its noise injected (kwargs: meanflow=True)."""
    import torch

    T = torch.from_numpy
    with injected_randn_like(T(inputs["z"])):
        out, _ = flow.decoder(T(inputs["mu"]), T(inputs["mask"]), n_timesteps=n_timesteps, spks=T(inputs["spks"]),
                              cond=T(inputs["cond"]), **kwargs)
    return out.numpy()


def run_inference(flow, inputs: dict, n_timesteps: int, **kwargs) -> np.ndarray:
    """The reference flow.inference on `inference_inputs`, its noise injected."""
    import torch

    T = torch.from_numpy
    with injected_randn_like(T(inputs["noise"])):
        feat, _ = flow.inference(
            token=T(inputs["token"]).long(),
            token_len=torch.tensor([inputs["token"].shape[1]]),
            prompt_token=T(inputs["prompt_token"]).long(),
            prompt_token_len=torch.tensor([inputs["prompt_token"].shape[1]]),
            prompt_feat=T(inputs["prompt_feat"]),
            prompt_feat_len=None,
            embedding=T(inputs["embedding"]),
            finalize=True,
            n_timesteps=n_timesteps,
            **kwargs,
        )
    return feat.numpy()


def encoder_fixture(flow, dims: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """encode (embedding * pad mask -> encoder -> encoder_proj), batch 2, row 1 padded."""
    import torch

    tokens = rng.integers(0, dims["vocab_size"], size=(2, 12)).astype(np.int32)
    token_lens = np.array([12, 9], dtype=np.int32)
    pad = (torch.arange(12)[None, :] < torch.from_numpy(token_lens).long()[:, None]).float().unsqueeze(-1)
    emb = flow.input_embedding(torch.from_numpy(tokens).long()) * pad
    h, h_mask = flow.encoder(emb, torch.from_numpy(token_lens))
    mu = flow.encoder_proj(h).transpose(1, 2)
    return {"tokens": tokens, "token_lens": token_lens, "h": h.numpy(), "mask": h_mask.numpy(), "mu": mu.numpy()}


def make_fixtures(checkpoint: Path, out_dir: Path, weights_seed: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    dims, state = read_s3gen_part(checkpoint, "flow", PREFIX)
    flow = load_strict(build_reference(dims), state)

    rng = np.random.default_rng(INPUT_SEED)
    mel = dims["output_size"]
    meta = {"weights_seed": np.int64(-1 if weights_seed is None else weights_seed)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        fixtures = {"encoder": encoder_fixture(flow, dims, rng)}
        est = estimator_inputs(rng, mel)
        t = np.array([0.3, 0.7], dtype=np.float32)
        fixtures["estimator"] = {**est, "t": t, "out": run_estimator(flow, est, t)}
        cfm = cfm_inputs(rng, mel)  # the full solve: cosine schedule, Euler, CFG
        fixtures["cfm"] = {**cfm, "n_timesteps": np.int64(10), "out": run_cfm(flow, cfm, 10)}
        inputs = inference_inputs(rng, dims)  # with a prompt, 10 and 3 steps
        fixtures["inference"] = {**inputs, **{f"mel_{n}": run_inference(flow, inputs, n) for n in (10, 3)}}
    for name, arrays in fixtures.items():
        path = out_dir / f"flow_{name}.npz"
        np.savez(path, **arrays, **meta)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    run_generator(__doc__, __file__, write=lambda out_dir, args: write_weights(out_dir, args.seed),
                  make=lambda checkpoint, args: make_fixtures(checkpoint, args.out, None if args.checkpoint else args.seed))
