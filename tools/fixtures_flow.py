"""Golden outputs of the reference S3Gen flow (tiny dims) for tests/test_flow.py.

Run in the reference's virtual environment (torch + chatterbox-tts 0.1.7):

    /work/ref-venv/bin/python tools/fixtures_flow.py            # writes tests/fixtures/flow_*.npz

Weights: by default the script asks our venv (NIGHTINGALE_PYTHON, default .venv/bin/python)
to write the tiny flow's random weights, exactly as the tests regenerate them
(`random_weights(upstream_shapes(FlowConfig.tiny()), default_rng(SEED))`), into a temporary
checkpoint-like directory (s3gen.safetensors with `flow.` keys + dims.json). With
`--checkpoint DIR` it reads any such directory instead (e.g. one from make_checkpoint);
fixtures made that way only match tests that load the same weights.

The reference modules are built with the tiny dims. Upstream hard-codes three things to the
full size, which the script rebuilds at the tiny width with the reference's own classes:
`pre_lookahead_layer` (512 channels), `up_layer` (512 channels) and the number of
`up_encoders` (4). The weights then load with strict=True, so every `flow.` key is used
and none is missing. CFM noise is injected by patching torch.randn_like.

Mode for our venv (used by the default path above):
    .venv/bin/python tools/fixtures_flow.py --write-weights DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SEED = 0  # weights seed; tests/test_flow.py uses the same
INPUT_SEED = 1234  # inputs (tokens, noise, mels) drawn here and stored in the fixtures


def write_weights(out_dir: Path, seed: int) -> None:
    """Our venv: tiny flow weights in the upstream layout + dims.json."""
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import random_weights
    from nightingale.models.s3gen.flow import FlowConfig, upstream_shapes

    cfg = FlowConfig.tiny()
    weights = random_weights(upstream_shapes(cfg), np.random.default_rng(seed), prefix="flow.")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "s3gen.safetensors"))
    (out_dir / "dims.json").write_text(json.dumps({"s3gen": {"flow": cfg.to_dict()}}, indent=1))


def build_reference(dims: dict):
    """The reference CausalMaskedDiffWithXvec with the given (tiny) FlowConfig dims."""
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
    )
    assert CFM_PARAMS.inference_cfg_rate == dims["inference_cfg_rate"]
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


def load_flow_weights(checkpoint: Path) -> tuple[dict, dict]:
    """(dims of the flow, {relative key: torch tensor}) from a checkpoint-like directory."""
    from safetensors.torch import load_file

    dims = json.loads((checkpoint / "dims.json").read_text())["s3gen"]["flow"]
    tensors = load_file(str(checkpoint / "s3gen.safetensors"))
    return dims, {k[len("flow.") :]: v for k, v in tensors.items() if k.startswith("flow.")}


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


def make_fixtures(checkpoint: Path, out_dir: Path, weights_seed: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    dims, state = load_flow_weights(checkpoint)
    flow = build_reference(dims)
    result = flow.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(flow.state_dict()), "every flow.* key used, none missing"

    rng = np.random.default_rng(INPUT_SEED)
    mel = dims["output_size"]
    meta = {"weights_seed": np.int64(-1 if weights_seed is None else weights_seed)}
    out_dir.mkdir(parents=True, exist_ok=True)
    T = torch.from_numpy

    with torch.inference_mode():
        # 1. encode (embedding * pad mask -> encoder -> encoder_proj), batch 2, row 1 padded
        tokens = rng.integers(0, dims["vocab_size"], size=(2, 12)).astype(np.int32)
        token_lens = np.array([12, 9], dtype=np.int32)
        pad = (torch.arange(12)[None, :] < T(token_lens).long()[:, None]).float().unsqueeze(-1)
        emb = flow.input_embedding(T(tokens).long()) * pad
        h, h_mask = flow.encoder(emb, T(token_lens))
        mu = flow.encoder_proj(h).transpose(1, 2)
        np.savez(
            out_dir / "flow_encoder.npz",
            tokens=tokens,
            token_lens=token_lens,
            h=h.numpy(),
            mask=h_mask.numpy(),
            mu=mu.numpy(),
            **meta,
        )

        # 2. one estimator call, batch 2, row 1 with a masked tail
        frames = 20
        x = rng.standard_normal((2, mel, frames), dtype=np.float32)
        mask = np.ones((2, 1, frames), dtype=np.float32)
        mask[1, :, 14:] = 0.0
        mu_e = rng.standard_normal((2, mel, frames), dtype=np.float32)
        t = np.array([0.3, 0.7], dtype=np.float32)
        spks = rng.standard_normal((2, mel), dtype=np.float32)
        cond = rng.standard_normal((2, mel, frames), dtype=np.float32)
        cond[:, :, 8:] = 0.0
        v = flow.decoder.estimator(T(x), T(mask), T(mu_e), T(t), T(spks), T(cond))
        np.savez(
            out_dir / "flow_estimator.npz", x=x, mask=mask, mu=mu_e, t=t, spks=spks, cond=cond, out=v.numpy(), **meta
        )

        # 3. the full CFM solve (cosine schedule, Euler, CFG) with given noise
        frames = 24
        z = rng.standard_normal((1, mel, frames), dtype=np.float32)
        mu_c = rng.standard_normal((1, mel, frames), dtype=np.float32)
        mask_c = np.ones((1, 1, frames), dtype=np.float32)
        spks_c = rng.standard_normal((1, mel), dtype=np.float32)
        cond_c = np.zeros((1, mel, frames), dtype=np.float32)
        cond_c[:, :, :8] = rng.standard_normal((1, mel, 8), dtype=np.float32)
        with injected_randn_like(T(z)):
            out, _ = flow.decoder(T(mu_c), T(mask_c), n_timesteps=10, spks=T(spks_c), cond=T(cond_c))
        np.savez(
            out_dir / "flow_cfm.npz",
            z=z,
            mu=mu_c,
            mask=mask_c,
            spks=spks_c,
            cond=cond_c,
            n_timesteps=np.int64(10),
            out=out.numpy(),
            **meta,
        )

        # 4. flow.inference with a prompt, given noise (10 steps and 3 steps)
        n, p = 10, 6
        token = rng.integers(0, dims["vocab_size"], size=(1, n)).astype(np.int32)
        prompt_token = rng.integers(0, dims["vocab_size"], size=(1, p)).astype(np.int32)
        prompt_feat = (rng.standard_normal((1, 2 * p, mel), dtype=np.float32) - 5.0).astype(np.float32)
        embedding = (3.0 * rng.standard_normal((1, dims["spk_embed_dim"]), dtype=np.float32)).astype(np.float32)
        noise = rng.standard_normal((1, mel, 2 * (p + n)), dtype=np.float32)
        mels = {}
        for steps in (10, 3):
            with injected_randn_like(T(noise)):
                feat, _ = flow.inference(
                    token=T(token).long(),
                    token_len=torch.tensor([n]),
                    prompt_token=T(prompt_token).long(),
                    prompt_token_len=torch.tensor([p]),
                    prompt_feat=T(prompt_feat),
                    prompt_feat_len=None,
                    embedding=T(embedding),
                    finalize=True,
                    n_timesteps=steps,
                )
            mels[f"mel_{steps}"] = feat.numpy()
        np.savez(
            out_dir / "flow_inference.npz",
            token=token,
            prompt_token=prompt_token,
            prompt_feat=prompt_feat,
            embedding=embedding,
            noise=noise,
            **mels,
            **meta,
        )
    for name in ("encoder", "estimator", "cfm", "inference"):
        path = out_dir / f"flow_{name}.npz"
        print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-weights", type=Path, help="(our venv) write tiny weights + dims.json here and exit")
    parser.add_argument("--checkpoint", type=Path, help="(reference venv) directory with s3gen.safetensors + dims.json")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()

    if args.write_weights:
        write_weights(args.write_weights, args.seed)
        return
    if args.checkpoint:
        make_fixtures(args.checkpoint, args.out, weights_seed=None)
        return
    python = os.environ.get("NIGHTINGALE_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, str(Path(__file__).resolve()), "--write-weights", tmp, "--seed", str(args.seed)]
        subprocess.run(cmd, check=True)
        make_fixtures(Path(tmp), args.out, weights_seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
