"""Golden outputs of the reference's Chatterbox Turbo modules (chatterbox-tts 0.1.7).

    /work/ref-venv/bin/python tools/fixtures_turbo.py     # writes tests/fixtures/turbo_*.npz/json

Step 1 (our venv, run by the script): `make_checkpoint(tmp, "tiny", seed=0, family="turbo")`
writes a tiny random Turbo checkpoint in the upstream layout. Step 2 (the reference venv):
the reference's own classes are built with those dims and load it strictly:

- T3: `T3(hp)` with hp as `ChatterboxTurboTTS.from_local` sets it, the GPT-2 config
  registered under a new name in `LLAMA_CONFIGS` with the tiny widths; `load_state_dict`
  strict from t3_turbo_v1.safetensors, then `del t3.tfmr.wte` as upstream does.
- MeanFlow flow: tools/fixtures_flow.py's tiny `CausalMaskedDiffWithXvec` with the
  estimator rebuilt as `ConditionalDecoder(meanflow=True)`; strict from the `flow.` keys of
  s3gen_meanflow.safetensors.
- Tokenizer: `AutoTokenizer.from_pretrained(dir)` with pad = eos, as from_local does.
- Layout: `S3Gen(meanflow=True)` and the full Turbo `T3` built on the meta device; their
  state_dict key/shape maps are what the full upstream files hold.

Fixtures:
- turbo_t3.npz: inputs, the conditioning (1, 1+P, D), teacher-forced logits over
  [cond | text | BOS | speech], `inference_turbo` with multinomial replaced by argmax
  (temperature 0: greedy tokens) and with injected choices at the default sampler settings
  (the probabilities handed to multinomial at each step, and the raw logits).
- turbo_meanflow.npz: one estimator call with both time inputs (batch 2, a masked row), the
  2-step `basic_euler` solve, and `flow.inference(meanflow=True, n_timesteps=2)` with
  injected noise.
- turbo_tokenizer.npz: Turbo `punc_norm` and the tokenizer on texts with tags.
- turbo_voice.npz: the gain of the reference's `norm_loudness` (-27 LUFS, pyloudnorm) on the
  spoken test clip (tests/fixtures/voice_audio.npz), and the first second of the normalised
  clip and of its librosa 16 kHz copy.
- turbo_layout.json: the full upstream key -> shape maps of t3_turbo_v1 and s3gen_meanflow.
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
sys.path.insert(0, str(REPO / "tools"))

SEED = 0
INPUT_SEED = 4321
TEXT = "Hi there [chuckle], have you got one minute to chat? [clear throat] Well..."
TEACHER_SPEECH = [123, 4299, 6000, 6561, 17]
INJECTED_CHOICES = [123, 4299, 6000, 17, 123]
GREEDY_STEPS = 48
TAIL = len(TEACHER_SPEECH) + 4  # teacher-forced logits kept: the end of the text, BOS and the speech
TEXTS = [
    "",
    "hello world",
    "Oh, that's hilarious! [laugh] Anyway…",
    "[sigh] Time: 10:30 — sharp; “quoted” and ‘single’.",
    "Ünïcode   spaces\tand\nnewlines [whispering]quiet[happy]",
    "Wait... what [clear throat] really , yes",
    "<|endoftext|> is the end [advertisement]",
]


def write_checkpoint(out: Path, seed: int) -> None:
    from nightingale.dev.checkpoint import make_checkpoint

    make_checkpoint(out, "tiny", seed=seed, family="turbo")


@contextlib.contextmanager
def patched(obj, name, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def build_t3(dims: dict):
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config

    name = "GPT2_nightingale_test"
    LLAMA_CONFIGS[name] = {
        **GPT2_MEDIUM_CONFIG,
        "n_layer": dims["n_layer"], "n_embd": dims["n_embd"], "hidden_size": dims["n_embd"], "n_head": dims["n_head"],
        "n_positions": dims["n_positions"], "n_ctx": dims["n_positions"], "vocab_size": dims["vocab_size"],
    }
    hp = T3Config(text_tokens_dict_size=dims["text_tokens_dict_size"])  # the rest as from_local
    hp.llama_config_name = name
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return T3(hp)


def layout() -> dict:
    """Full-size key -> shape maps of the upstream Turbo T3 and MeanFlow S3Gen (meta device)."""
    import torch

    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config

    with torch.device("meta"):
        hp = T3Config(text_tokens_dict_size=50276)
        hp.llama_config_name = "GPT2_medium"
        hp.speech_tokens_dict_size = 6563
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
        t3 = T3(hp)
        s3gen = S3Gen(meanflow=True)
    return {
        "t3_turbo_v1.safetensors": {k: list(v.shape) for k, v in t3.state_dict().items()},
        "s3gen_meanflow.safetensors": {k: list(v.shape) for k, v in s3gen.state_dict().items()},
    }


def make(ckpt: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
    from chatterbox.tts_turbo import Conditionals, punc_norm
    from fixtures_flow import build_reference, injected_randn_like

    torch.set_num_threads(1)
    dims = json.loads((ckpt / "dims.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    T = torch.from_numpy
    rng = np.random.default_rng(INPUT_SEED)

    # -- tokenizer ----------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    normed = [punc_norm(t) for t in TEXTS]
    ids = [tokenizer(t, return_tensors="pt", padding=True, truncation=True).input_ids[0].tolist() for t in normed]
    np.savez_compressed(
        out / "turbo_tokenizer.npz", texts=np.array(TEXTS), normed=np.array(normed),
        ids_flat=np.array([i for row in ids for i in row], dtype=np.int32),
        ids_lengths=np.array([len(row) for row in ids], dtype=np.int32), vocab_size=np.int64(len(tokenizer)),
    )

    # -- T3 -----------------------------------------------------------------------------------
    t3 = build_t3(dims["t3"])
    state = load_file(str(ckpt / "t3_turbo_v1.safetensors"))
    result = t3.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    del t3.tfmr.wte
    t3.eval()
    conds = Conditionals.load(ckpt / "conds.pt")
    text_ids = tokenizer(punc_norm(TEXT), return_tensors="pt", padding=True, truncation=True).input_ids
    with torch.inference_mode():
        cond_emb = t3.prepare_conditioning(conds.t3)
        speech = torch.tensor([[t3.hp.start_speech_token] + TEACHER_SPEECH])
        embeds, _ = t3.prepare_input_embeds(t3_cond=conds.t3, text_tokens=text_ids, speech_tokens=speech)
        hidden = t3.tfmr(inputs_embeds=embeds)[0]
        logits = t3.speech_head(hidden)

    def run(temperature: float, choose, steps: int):
        probs_seen, chosen = [], []

        def fake_multinomial(probs, num_samples=1):
            probs_seen.append(probs[0].clone().numpy())
            tok = choose(len(chosen), probs[0])
            chosen.append(tok)
            return torch.tensor([[tok]], dtype=torch.long)

        with patched(torch, "multinomial", fake_multinomial):
            tokens = t3.inference_turbo(conds.t3, text_ids, temperature=temperature, max_gen_len=steps - 1)
        return tokens[0].tolist(), probs_seen, chosen

    greedy, _, _ = run(0.0, lambda i, p: int(torch.argmax(p)), GREEDY_STEPS)
    _, probs, chosen = run(0.8, lambda i, p: INJECTED_CHOICES[i], len(INJECTED_CHOICES))
    assert chosen == INJECTED_CHOICES
    np.savez_compressed(
        out / "turbo_t3.npz",
        text=np.array(TEXT), text_tokens=text_ids[0].numpy().astype(np.int32),
        speech_tokens=np.array(TEACHER_SPEECH, dtype=np.int32),
        cond_emb=cond_emb.numpy(), tail_logits=logits[0, -TAIL:].numpy(),
        greedy_tokens=np.array(greedy, dtype=np.int32), greedy_steps=np.int64(GREEDY_STEPS),
        choices=np.array(INJECTED_CHOICES, dtype=np.int32), probs=np.stack(probs).astype(np.float32),
    )

    # -- MeanFlow flow ------------------------------------------------------------------------
    fdims = dims["s3gen"]["flow"]
    flow = build_reference(fdims | {"inference_cfg_rate": CFM_PARAMS.inference_cfg_rate})
    estimator = ConditionalDecoder(
        in_channels=fdims["decoder_in_channels"], out_channels=fdims["output_size"], causal=True,
        channels=list(fdims["decoder_channels"]), dropout=0.0, attention_head_dim=fdims["decoder_attention_head_dim"],
        n_blocks=fdims["decoder_n_blocks"], num_mid_blocks=fdims["decoder_num_mid_blocks"],
        num_heads=fdims["decoder_num_heads"], act_fn="gelu", meanflow=True,
    )
    flow.decoder = CausalConditionalCFM(spk_emb_dim=fdims["output_size"], cfm_params=CFM_PARAMS, estimator=estimator)
    flow.eval()
    tensors = load_file(str(ckpt / "s3gen_meanflow.safetensors"))
    flow_state = {k[len("flow."):]: v for k, v in tensors.items() if k.startswith("flow.")}
    result = flow.load_state_dict(flow_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    mel = fdims["output_size"]
    with torch.inference_mode():
        frames = 20
        x = rng.standard_normal((2, mel, frames), dtype=np.float32)
        mask = np.ones((2, 1, frames), dtype=np.float32)
        mask[1, :, 14:] = 0.0
        mu = rng.standard_normal((2, mel, frames), dtype=np.float32)
        t = np.array([0.0, 0.5], dtype=np.float32)
        r = np.array([0.5, 1.0], dtype=np.float32)
        spks = rng.standard_normal((2, mel), dtype=np.float32)
        cond = rng.standard_normal((2, mel, frames), dtype=np.float32)
        cond[:, :, 8:] = 0.0
        v = flow.decoder.estimator(T(x), T(mask), T(mu), T(t), T(spks), T(cond), r=T(r))

        frames = 24
        z = rng.standard_normal((1, mel, frames), dtype=np.float32)
        mu_c = rng.standard_normal((1, mel, frames), dtype=np.float32)
        mask_c = np.ones((1, 1, frames), dtype=np.float32)
        spks_c = rng.standard_normal((1, mel), dtype=np.float32)
        cond_c = np.zeros((1, mel, frames), dtype=np.float32)
        cond_c[:, :, :8] = rng.standard_normal((1, mel, 8), dtype=np.float32)
        with injected_randn_like(T(z)):
            solved, _ = flow.decoder(T(mu_c), T(mask_c), n_timesteps=2, spks=T(spks_c), cond=T(cond_c), meanflow=True)

        n, p = 10, 6
        token = rng.integers(0, fdims["vocab_size"], size=(1, n)).astype(np.int32)
        prompt_token = rng.integers(0, fdims["vocab_size"], size=(1, p)).astype(np.int32)
        prompt_feat = (rng.standard_normal((1, 2 * p, mel), dtype=np.float32) - 5.0).astype(np.float32)
        embedding = (3.0 * rng.standard_normal((1, fdims["spk_embed_dim"]), dtype=np.float32)).astype(np.float32)
        noise = rng.standard_normal((1, mel, 2 * (p + n)), dtype=np.float32)
        with injected_randn_like(T(noise)):
            feat, _ = flow.inference(
                token=T(token).long(), token_len=torch.tensor([n]), prompt_token=T(prompt_token).long(),
                prompt_token_len=torch.tensor([p]), prompt_feat=T(prompt_feat), prompt_feat_len=None,
                embedding=T(embedding), finalize=True, n_timesteps=2, meanflow=True,
            )
    np.savez_compressed(
        out / "turbo_meanflow.npz",
        x=x, mask=mask, mu=mu, t=t, r=r, spks=spks, cond=cond, estimator_out=v.numpy(),
        z=z, cfm_mu=mu_c, cfm_spks=spks_c, cfm_cond=cond_c, cfm_out=solved.numpy(),
        token=token, prompt_token=prompt_token, prompt_feat=prompt_feat, embedding=embedding, noise=noise,
        mel=feat.numpy(),
    )

    # -- voice prompt: the reference's loudness normalisation and 16 kHz copy ------------------
    import librosa

    from chatterbox.tts_turbo import ChatterboxTurboTTS

    wav24 = np.load(REPO / "tests" / "fixtures" / "voice_audio.npz")["wav24"]
    normed24 = ChatterboxTurboTTS.norm_loudness(None, wav24, 24000)
    normed16 = librosa.resample(normed24, orig_sr=24000, target_sr=16000)
    peak = int(np.argmax(np.abs(wav24)))
    np.savez_compressed(out / "turbo_voice.npz", gain=np.float64(normed24[peak] / wav24[peak]),
                        normed24_head=normed24[:24000].astype(np.float32), normed16_head=normed16[:16000].astype(np.float32))

    # -- full layout ----------------------------------------------------------------------------
    (out / "turbo_layout.json").write_text(json.dumps(layout(), sort_keys=True) + "\n")
    print(f"wrote turbo fixtures into {out}; greedy tokens {greedy[:12]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-checkpoint", type=Path, help="(our venv) write the tiny Turbo checkpoint and exit")
    parser.add_argument("--checkpoint", type=Path, help="(reference venv) use this checkpoint directory")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.seed)
        return
    if args.checkpoint:
        make(args.checkpoint, args.out)
        return
    python = os.environ.get("NIGHTINGALE_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, str(Path(__file__).resolve()), "--write-checkpoint", tmp, "--seed", str(args.seed)],
                       check=True, env=dict(os.environ, PYTHONPATH=""))
        make(Path(tmp), args.out)


if __name__ == "__main__":
    sys.exit(main())
