"""Golden outputs of the reference T3 and text front end (chatterbox-tts 0.1.7).

Two steps, two virtual environments (run from the repo root):

    # 1. our venv: a T3 checkpoint directory (t3_cfg.safetensors, dims.json, tokenizer.json)
    .venv/bin/python tools/fixtures_t3.py --write /tmp/t3_tiny --size tiny --seed 0
    # 2. the reference venv: build upstream's T3 with those dims, load strictly, write fixtures
    OMP_NUM_THREADS=1 .ref-venv/bin/python tools/fixtures_t3.py --checkpoint /tmp/t3_tiny

(tools/make_reference_env.sh builds .ref-venv.) Without --checkpoint, step 2 runs step 1
itself (tiny, seed 0) with $NIGHTINGALE_PYTHON (default .venv/bin/python; see
tools/fixture_common.py). --checkpoint also accepts any directory holding t3_cfg.safetensors and
tokenizer.json: with a dims.json its "t3" entry gives the dimensions, without one the full
(upstream) dimensions are used, so the same harness runs on real weights later.

Fixtures (tests/fixtures/, `<tag>` = tiny by default):
- t3_<tag>_forward.npz: inputs (speaker embedding, prompt tokens, emotion, wrapped text,
  teacher-forced speech tokens), the cond encoder output (1, 34, D), the final hidden
  states of a teacher-forced forward over [cond | SOT text EOT | BOS | BOS | speech]
  (2, L, D), and the speech logits of its last positions.
- t3_<tag>_decode.npz: upstream's own `T3.inference` loop with `torch.multinomial` replaced
  by injected choices (ids >= 6561 included): the raw logits (2, V) of every backbone call
  and the probabilities handed to multinomial at every step (sampler parity), once with
  top_p 1.0 and once with top_p 0.8; then the same loop with multinomial replaced by argmax
  for 64 steps (greedy tokens).
- t3_tokenizer.npz: upstream `punc_norm` and `EnTokenizer.encode` on tricky strings, with
  the stand-in tokenizer.json.

The weights are never stored: the tests regenerate them (`weights_recipe`, `weights_check`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fixture_common import injected_multinomial, load_strict, patched, run_generator, token_rows

# Inputs. Teacher-forced speech and injected decode choices include ids >= 6561 (SOS and an
# unused id), which upstream feeds back like any other token.
PROMPT_TOKENS = 24
EMOTION = 0.7
TEXT = "Hello there, how are you today?"
TEACHER_SPEECH = [123, 6561, 4000, 7000]
INJECTED_CHOICES = [123, 6561, 4000, 7000]
GREEDY_STEPS = 64
SAMPLER = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05)
TOP_P_VARIANT = 0.8
INPUT_SEED = 1234
# LLaMA config entries that are T3Config (dims.json "t3") fields of the same name
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta")
HP_FIELDS = ("text_tokens_dict_size", "speech_tokens_dict_size", "max_text_tokens", "max_speech_tokens",
             "start_text_token", "stop_text_token", "start_speech_token", "stop_speech_token",
             "speaker_embed_size", "speech_cond_prompt_len")

# punc_norm / tokenizer edge cases.
TRICKY_TEXTS = [
    "",
    "   ",
    "hello world",
    "ßtraße is a street",
    "ǆungla starts with a digraph",
    "ﬁne ligature first",
    "émile went home",
    "   leading spaces and trailing   ",
    "Wait... what… really",
    "Time: 10:30 sharp",
    "Well - maybe; perhaps",
    "em—dash and en–dash",
    "Hello , world",
    "“Quoted” and ‘single’ quotes",
    "Tabs\tand\nnewlines  inside",
    "Ends with a question?",
    "Ends with a dash-",
    "Ends with a comma,",
    "Ends with bang!",
    "...",
    "…",
    " - ",
    "Numbers 123 and 4.56",
    "Unknown chars: café, naïve, 日本語",
    "Literal [SPACE] and [UNK] tokens",
    "ok :)",
]


def weights_check(weights: dict[str, np.ndarray]) -> np.ndarray:
    """A few sums that identify a weight set (the tests compare theirs with these)."""
    keys = ("speech_emb.weight", "speech_head.weight", "cond_enc.perceiver.pre_attention_query", "tfmr.norm.weight")
    return np.array([float(np.asarray(weights[k], dtype=np.float64).sum()) for k in keys])


# ---------------------------------------------------------------------------------------
# Step 1 (our venv)


def write_checkpoint(out: Path, size: str, seed: int) -> None:
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import random_weights
    from nightingale.models.t3 import T3Config, upstream_shapes
    from nightingale.models.tokenizer import write_stand_in_tokenizer_json

    cfg = T3Config.tiny() if size == "tiny" else T3Config.full()
    out.mkdir(parents=True, exist_ok=True)
    # The generator make_checkpoint uses for t3_cfg.safetensors (file index 0), so a
    # make_checkpoint(dir, size, seed) directory gives the same fixtures.
    weights = random_weights(upstream_shapes(cfg), np.random.default_rng([seed, 0]))
    save_file(weights, str(out / "t3_cfg.safetensors"))
    write_stand_in_tokenizer_json(out / "tokenizer.json")
    recipe = f"random_weights(upstream_shapes(T3Config.{size}()), np.random.default_rng([{seed}, 0]))"
    (out / "dims.json").write_text(json.dumps({"t3": cfg.to_dict(), "t3_weights_recipe": recipe}, indent=2))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------
# Step 2 (reference venv)


def build_reference(ckpt: Path, weights_file: str = "t3_cfg.safetensors"):
    """Upstream T3 with the checkpoint's dimensions, loaded strictly. Returns (t3, dims)."""
    import torch
    from safetensors.torch import load_file

    from chatterbox.models.t3 import t3 as t3_module
    from chatterbox.models.t3.llama_configs import LLAMA_520M_CONFIG_DICT, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.perceiver import Perceiver
    from chatterbox.models.t3.modules.t3_config import T3Config as RefT3Config

    dims_file = ckpt / "dims.json"
    meta = json.loads(dims_file.read_text()) if dims_file.exists() else {}
    dims = meta.get("t3")
    hp = RefT3Config()
    if dims is not None:
        name = "Llama_fixture"
        LLAMA_CONFIGS[name] = dict(
            LLAMA_520M_CONFIG_DICT, **{key: dims[key] for key in LLAMA_FIELDS}, rope_scaling=dict(dims["rope_scaling"])
        )
        hp.llama_config_name = name
        for key in HP_FIELDS:
            setattr(hp, key, dims[key])
    t3 = t3_module.T3(hp)
    if dims is not None:
        # Upstream's T3CondEnc builds Perceiver() with its 1024-wide defaults; rebuild it
        # for the checkpoint's width (same class, same code path).
        d = dims["hidden_size"]
        t3.cond_enc.perceiver = Perceiver(dims["perceiver_query_tokens"], d, d, dims["perceiver_heads"])
    state = load_file(str(ckpt / weights_file))
    load_strict(t3, state).eval()
    torch.set_grad_enabled(False)
    return t3, hp, meta, state


@contextlib.contextmanager
def recorded_step_logits() -> Iterator[list]:
    """Yields a list that gets the last position's logits (B, V) of every T3 backbone call
    (T3HuggingfaceBackend.forward: the prefill, then one per fed token) inside the block."""
    from chatterbox.models.t3.inference.t3_hf_backend import T3HuggingfaceBackend

    raw: list[np.ndarray] = []
    original_forward = T3HuggingfaceBackend.forward

    def recording_forward(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        raw.append(output.logits[:, -1, :].clone().numpy())
        return output

    with patched(T3HuggingfaceBackend, "forward", recording_forward):
        yield raw


def make(ckpt: Path, out: Path, tag: str) -> None:
    import torch
    import torch.nn.functional as F

    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.tts import punc_norm

    torch.manual_seed(0)
    t3, hp, meta, state = build_reference(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    recipe = meta.get("t3_weights_recipe", f"t3_cfg.safetensors of {ckpt}")
    check = weights_check({k: v.numpy() for k, v in state.items()})

    # Inputs (numpy, stored in the fixture so the tests need no RNG agreement).
    rng = np.random.default_rng(INPUT_SEED)
    speaker = np.abs(rng.standard_normal((1, hp.speaker_embed_size))).astype(np.float32)
    speaker /= np.linalg.norm(speaker)  # the VoiceEncoder's embeddings are unit-norm and >= 0
    prompt = rng.integers(0, hp.start_speech_token, size=(1, PROMPT_TOKENS)).astype(np.int64)
    emotion = np.full((1, 1, 1), EMOTION, dtype=np.float32)
    tokenizer = EnTokenizer(str(ckpt / "tokenizer.json"))
    text_ids = tokenizer.encode(punc_norm(TEXT))
    text = np.array([hp.start_text_token] + text_ids + [hp.stop_text_token], dtype=np.int64)

    def make_cond() -> T3Cond:
        return T3Cond(speaker_emb=torch.from_numpy(speaker), cond_prompt_speech_tokens=torch.from_numpy(prompt),
                      emotion_adv=torch.from_numpy(emotion))

    # generate(): duplicate for CFG, then pad SOT/EOT.
    text_t = torch.tensor([text_ids, text_ids], dtype=torch.long)
    text_t = F.pad(F.pad(text_t, (1, 0), value=hp.start_text_token), (0, 1), value=hp.stop_text_token)
    assert np.array_equal(text_t[0].numpy(), text)

    # -- cond encoder and teacher-forced forward ------------------------------------------
    cond_emb = t3.prepare_conditioning(make_cond())  # (1, 34, D)
    bos = torch.full((2, 1), hp.start_speech_token, dtype=torch.long)
    embeds, _ = t3.prepare_input_embeds(t3_cond=make_cond(), text_tokens=text_t, speech_tokens=bos, cfg_weight=0.5)
    bos_embed = t3.speech_emb(bos[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)  # as inference() appends it
    pieces = [embeds, torch.cat([bos_embed, bos_embed])]
    for k, tok in enumerate(TEACHER_SPEECH):
        e = t3.speech_emb(torch.tensor([[tok]])) + t3.speech_pos_emb.get_fixed_embedding(k + 1)
        pieces.append(torch.cat([e, e]))
    seq = torch.cat(pieces, dim=1)
    tf_out = t3.tfmr(inputs_embeds=seq, output_hidden_states=True, return_dict=True)
    hidden = tf_out.hidden_states[-1]
    assert torch.equal(hidden, tf_out.last_hidden_state)  # post final RMSNorm
    logits = t3.speech_head(hidden)
    tail = len(TEACHER_SPEECH) + 1  # second BOS (predicts token 0) and every teacher token
    np.savez_compressed(
        out / f"t3_{tag}_forward.npz",
        weights_recipe=np.array(recipe), weights_check=check,
        speaker_emb=speaker, prompt_tokens=prompt.astype(np.int32), emotion_adv=emotion,
        text_tokens=text.astype(np.int32), speech_tokens=np.array(TEACHER_SPEECH, dtype=np.int32),
        cond_emb=cond_emb.numpy(), hidden=hidden.numpy(), tail_logits=logits[:, -tail:].numpy(),
    )

    # -- upstream's decode loop with injected choices ----------------------------------------
    def run_inference(choose, steps: int, top_p: float) -> tuple[list, list, list]:
        with recorded_step_logits() as raw, injected_multinomial(choose) as (probs_seen, chosen):
            t3.inference(t3_cond=make_cond(), text_tokens=text_t, max_new_tokens=steps, top_p=top_p, **SAMPLER)
        return raw, probs_seen, chosen

    raw, probs_p1, _ = run_inference(lambda i, p: INJECTED_CHOICES[i], len(INJECTED_CHOICES), 1.0)
    raw2, probs_p08, _ = run_inference(lambda i, p: INJECTED_CHOICES[i], len(INJECTED_CHOICES), TOP_P_VARIANT)
    assert all(np.array_equal(a, b) for a, b in zip(raw, raw2))
    _, _, greedy = run_inference(lambda i, p: int(torch.argmax(p)), GREEDY_STEPS, 1.0)
    np.savez_compressed(
        out / f"t3_{tag}_decode.npz",
        weights_recipe=np.array(recipe), weights_check=check,
        choices=np.array(INJECTED_CHOICES, dtype=np.int32),
        step_logits=np.stack(raw).astype(np.float32),  # (calls, 2, V): prefill, then one per fed token
        probs_top_p_1=np.stack(probs_p1).astype(np.float32),  # (steps, V)
        probs_top_p_variant=np.stack(probs_p08).astype(np.float32),
        top_p_variant=np.array(TOP_P_VARIANT),
        sampler=np.array(json.dumps(SAMPLER)),
        greedy_tokens=np.array(greedy, dtype=np.int32),  # EOS included if it came
    )

    # -- text front end -------------------------------------------------------------------
    normed = [punc_norm(t) for t in TRICKY_TEXTS]
    ids = [tokenizer.encode(t) for t in normed]
    tok_bytes = (ckpt / "tokenizer.json").read_bytes()
    np.savez_compressed(
        out / "t3_tokenizer.npz",
        texts=np.array(TRICKY_TEXTS), normed=np.array(normed), **token_rows(ids),
        tokenizer_sha256=np.array(hashlib.sha256(tok_bytes).hexdigest()),
    )
    print(f"wrote fixtures into {out}; greedy tokens: {greedy[:12]}...")


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="(--write) checkpoint size")
    parser.add_argument("--tag", default="tiny", help="fixture name part: t3_<tag>_*.npz")


if __name__ == "__main__":
    run_generator(__doc__, __file__, write=lambda out_dir, args: write_checkpoint(out_dir, args.size, args.seed),
                  make=lambda checkpoint, args: make(checkpoint, args.out, args.tag), options=options)
