"""Golden outputs of the reference's Chatterbox Turbo modules (chatterbox-tts 0.1.7).

    .ref-venv/bin/python tools/fixtures_turbo.py     # writes tests/fixtures/turbo_*.npz/json

Step 1 (our venv, run by the script; tools/fixture_common.py):
`make_checkpoint(tmp, "tiny", seed=0, family="turbo")` writes a tiny random Turbo checkpoint
in the upstream layout. Step 2 (the reference venv): the reference's own classes are built
with those dims and load it strictly:

- T3: `T3(hp)` with hp as `ChatterboxTurboTTS.from_local` sets it, the GPT-2 config
  registered under a new name in `LLAMA_CONFIGS` with the tiny widths; `load_state_dict`
  strict from t3_turbo_v1.safetensors, then `del t3.tfmr.wte` as upstream does.
- MeanFlow flow: tools/fixtures_flow.py's tiny `CausalMaskedDiffWithXvec` with the
  estimator built as `ConditionalDecoder(meanflow=True)`; strict from the `flow.` keys of
  s3gen_meanflow.safetensors. Its inputs are drawn by fixtures_flow.py's functions.
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

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from fixture_common import (  # noqa: E402
    FIXTURES,
    injected_multinomial,
    load_strict,
    read_s3gen_part,
    run_generator,
    token_rows,
    turbo_t3_config,
)

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


def build_t3(dims: dict):
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS

    name = "GPT2_nightingale_test"
    LLAMA_CONFIGS[name] = {
        **GPT2_MEDIUM_CONFIG,
        "n_layer": dims["n_layer"], "n_embd": dims["n_embd"], "hidden_size": dims["n_embd"], "n_head": dims["n_head"],
        "n_positions": dims["n_positions"], "n_ctx": dims["n_positions"], "vocab_size": dims["vocab_size"],
    }
    return T3(turbo_t3_config(dims["text_tokens_dict_size"], name))


def layout() -> dict:
    """Full-size key -> shape maps of the upstream Turbo T3 and MeanFlow S3Gen (meta device)."""
    import torch

    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3

    with torch.device("meta"):
        t3 = T3(turbo_t3_config())
        s3gen = S3Gen(meanflow=True)
    return {
        "t3_turbo_v1.safetensors": {k: list(v.shape) for k, v in t3.state_dict().items()},
        "s3gen_meanflow.safetensors": {k: list(v.shape) for k, v in s3gen.state_dict().items()},
    }


def meanflow_fixture(ckpt: Path, out: Path, rng: np.random.Generator) -> None:
    """turbo_meanflow.npz: one estimator call with both time inputs, the 2-step solve and
    flow.inference, on tools/fixtures_flow.py's reference flow with the MeanFlow estimator."""
    import torch

    from fixtures_flow import build_reference, cfm_inputs, estimator_inputs, inference_inputs, run_cfm, run_estimator, run_inference

    dims, state = read_s3gen_part(ckpt, "flow", "flow.", "s3gen_meanflow.safetensors")
    flow = load_strict(build_reference(dims, meanflow=True), state)
    mel = dims["output_size"]
    with torch.inference_mode():
        est = estimator_inputs(rng, mel)
        t = np.array([0.0, 0.5], dtype=np.float32)
        r = np.array([0.5, 1.0], dtype=np.float32)
        estimator_out = run_estimator(flow, est, t, r=r)
        cfm = cfm_inputs(rng, mel)
        cfm_out = run_cfm(flow, cfm, 2, meanflow=True)
        inputs = inference_inputs(rng, dims)
        mel_out = run_inference(flow, inputs, 2, meanflow=True)
    np.savez_compressed(
        out / "turbo_meanflow.npz", **est, t=t, r=r, estimator_out=estimator_out,
        z=cfm["z"], cfm_mu=cfm["mu"], cfm_spks=cfm["spks"], cfm_cond=cfm["cond"], cfm_out=cfm_out,
        **inputs, mel=mel_out,
    )


def make(ckpt: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from chatterbox.tts_turbo import Conditionals, punc_norm

    torch.set_num_threads(1)
    dims = json.loads((ckpt / "dims.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(INPUT_SEED)

    # -- tokenizer ----------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    normed = [punc_norm(t) for t in TEXTS]
    ids = [tokenizer(t, return_tensors="pt", padding=True, truncation=True).input_ids[0].tolist() for t in normed]
    np.savez_compressed(out / "turbo_tokenizer.npz", texts=np.array(TEXTS), normed=np.array(normed), **token_rows(ids),
                        vocab_size=np.int64(len(tokenizer)))

    # -- T3 -----------------------------------------------------------------------------------
    t3 = load_strict(build_t3(dims["t3"]), load_file(str(ckpt / "t3_turbo_v1.safetensors")))
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
        with injected_multinomial(choose) as (probs_seen, chosen):
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
    meanflow_fixture(ckpt, out, rng)

    # -- voice prompt: the reference's loudness normalisation and 16 kHz copy ------------------
    import librosa

    from chatterbox.tts_turbo import ChatterboxTurboTTS

    wav24 = np.load(FIXTURES / "voice_audio.npz")["wav24"]  # the spoken test clip, an input
    normed24 = ChatterboxTurboTTS.norm_loudness(None, wav24, 24000)
    normed16 = librosa.resample(normed24, orig_sr=24000, target_sr=16000)
    peak = int(np.argmax(np.abs(wav24)))
    np.savez_compressed(out / "turbo_voice.npz", gain=np.float64(normed24[peak] / wav24[peak]),
                        normed24_head=normed24[:24000].astype(np.float32), normed16_head=normed16[:16000].astype(np.float32))

    # -- full layout ----------------------------------------------------------------------------
    (out / "turbo_layout.json").write_text(json.dumps(layout(), sort_keys=True) + "\n")
    print(f"wrote turbo fixtures into {out}; greedy tokens {greedy[:12]}...")


if __name__ == "__main__":
    run_generator(__doc__, __file__, write=lambda out_dir, args: write_checkpoint(out_dir, args.seed),
                  make=lambda checkpoint, args: make(checkpoint, args.out))
