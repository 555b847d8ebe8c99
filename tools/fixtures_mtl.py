"""Golden outputs of the reference's multilingual front end, T3 and alignment analyzer.

Two steps, two virtual environments (run from the repo root):

    # 1. our venv: a tiny random multilingual checkpoint (make_checkpoint(..., "multilingual"))
    .venv/bin/python tools/fixtures_mtl.py --write /tmp/mtl_tiny
    # 2. the reference venv (chatterbox-tts 0.1.7, pykakasi 2.3.0; HF_HUB_OFFLINE=1)
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .ref-venv/bin/python tools/fixtures_mtl.py --checkpoint /tmp/mtl_tiny

(tools/make_reference_env.sh builds .ref-venv; add pykakasi==2.3.0 to it.) Without
--checkpoint, step 2 runs step 1 itself (tools/fixture_common.py). Fixtures (tests/fixtures/):
- mtl_tokenizer.npz: upstream `mtl_tts.punc_norm` and `MTLTokenizer.encode` for every
  language, with the stand-in grapheme_mtl_merged_expanded_v1.json and Cangjie5_TC.json
  (Chinese without pkuseg: its model cannot be downloaded here; see docs/notes.md).
- mtl_t3.npz: upstream `T3.inference` on the multilingual tiny T3 with the analyzer active
  (LLAMA_ALIGNED_HEADS replaced by the tiny model's heads), multinomial replaced by
  argmax: the raw logits of the first calls, per step the aligned heads' attention row,
  the analyzer's position and flags and the EOS logit it returned, and the greedy tokens;
  two runs: the random weights (EOS suppressed throughout: the model never gets near the
  end), and the aligned heads sharpened (alignment.sharpen_aligned_heads) so that position
  tracking, completion and the alignment-repetition guard act (it forces EOS).
- mtl_analyzer.npz: the analyzer alone on synthetic attention that walks the text, stalls
  at the end, jumps back, and repeats tokens (every guard fires).
- mtl_torch_state.pt/.npz: a state dict written by torch.save (OrderedDict with
  _metadata), for the restricted reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fixture_common import injected_multinomial, patched, run_generator, token_rows
from fixtures_t3 import build_reference, recorded_step_logits, weights_check
T3_FILE = "t3_mtl23ls_v2.safetensors"
SHARP_FILE = "t3_sharp.safetensors"
SHARPEN_FACTOR = 6.0
RAW_CALLS = 4  # raw logits stored for the prefill and the first steps (the tokens cover the rest)
INPUT_SEED = 4321
PROMPT_TOKENS = 24
T3_TEXT = ("fr", "Bonjour, comment allez-vous aujourd'hui?")
RUNS = {  # name: (weights file, repetition penalty, max_new_tokens)
    "plain": (T3_FILE, 2.0, 40),
    "sharp": (SHARP_FILE, 2.0, 160),
}

TEXTS = [
    ("en", "Hello World, it's a TEST"),
    ("ar", "مرحبا بالعالم، كيف حالك؟"),
    ("da", "Hej verden, hvordan går det? Æble og Ø."),
    ("de", "Grüße aus der Straße! ÄÖÜ"),
    ("el", "ΟΔΟΣ και Καλημέρα σας."),
    ("es", "¿Dónde está la estación? ¡Año nuevo!"),
    ("fi", "Hyvää päivää, mitä kuuluu?"),
    ("fr", "Émile a mangé… une crème brûlée; c'était «génial»"),
    ("he", "שלום עולם, מה שלומך?"),
    ("hi", "नमस्ते दुनिया। आप कैसे हैं?"),
    ("it", "Perché è così? Così è la vita."),
    ("ja", "今日は天気がいいです。カタカナとひらがな、東京へ行きます。"),
    ("ja", "私は学生です"),
    ("ko", "안녕하세요 여러분. 한국어 테스트입니다!"),
    ("ms", "Selamat pagi, apa khabar?"),
    ("nl", "Goedemorgen, hoe gaat het met je?"),
    ("no", "Hei verden, hvordan har du det? Blåbær."),
    ("pl", "Zażółć gęślą jaźń. Łódź!"),
    ("pt", "Olá, como você está? Ação e coração."),
    ("ru", "Привет, мир! Как дела?"),
    ("sv", "Hej världen, hur mår du? Åsa."),
    ("sw", "Habari ya asubuhi, rafiki yangu."),
    ("tr", "İstanbul'da güzel bir gün. IŞIK"),
    ("zh", "你好，我是中国人。今天天气很好！龍ABC"),
    ("zh", "囡囡说话"),
]


# ---------------------------------------------------------------------------------------
# Step 1 (our venv)


def write_checkpoint(out: Path, seed: int) -> None:
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import make_multilingual_checkpoint as make_checkpoint
    from nightingale.models import loading
    from nightingale.models.alignment import sharpen_aligned_heads
    from nightingale.models.t3 import T3Config

    make_checkpoint(out, "tiny", seed=seed)
    cfg = T3Config.from_dict(json.loads((out / "dims.json").read_text())["t3"])
    weights = loading.read_safetensors(out / T3_FILE)
    save_file(sharpen_aligned_heads(weights, cfg, SHARPEN_FACTOR), str(out / SHARP_FILE))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------
# Step 2 (reference venv)


def mtl_tokenizer(ckpt: Path):
    """The reference MTLTokenizer on the checkpoint's vocabulary and Cangjie table."""
    from chatterbox.models.tokenizers import tokenizer as tok_module

    # The converter fetches Cangjie5_TC.json with hf_hub_download; hand it the checkpoint's.
    def local_download(repo_id, filename, cache_dir=None, **_):
        return str(ckpt / filename)

    with patched(tok_module, "hf_hub_download", local_download):
        return tok_module.MTLTokenizer(str(ckpt / "grapheme_mtl_merged_expanded_v1.json"))


def tokenizer_fixture(ckpt: Path, out: Path) -> None:
    from chatterbox.mtl_tts import punc_norm

    tokenizer = mtl_tokenizer(ckpt)
    assert tokenizer.cangjie_converter.segmenter is None, "spacy_pkuseg is installed: remove it for this fixture"
    assert tokenizer.cangjie_converter.word2cj, "Cangjie table not loaded"
    langs, texts, normed, ids = [], [], [], []
    for lang, text in TEXTS:
        n = punc_norm(text)
        langs.append(lang)
        texts.append(text)
        normed.append(n)
        ids.append(tokenizer.encode(n, language_id=lang))
    np.savez_compressed(
        out / "mtl_tokenizer.npz",
        languages=np.array(langs), texts=np.array(texts), normed=np.array(normed), **token_rows(ids),
    )


def t3_fixture(ckpt: Path, out: Path) -> None:
    import torch
    import torch.nn.functional as F

    from chatterbox.models.t3.inference import alignment_stream_analyzer as asa
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.mtl_tts import punc_norm

    dims = json.loads((ckpt / "dims.json").read_text())["t3"]
    heads = [tuple(h) for h in dims["alignment_heads"]]
    lang, text = T3_TEXT
    text_ids = mtl_tokenizer(ckpt).encode(punc_norm(text), language_id=lang)

    rng = np.random.default_rng(INPUT_SEED)
    speaker = np.abs(rng.standard_normal((1, dims["speaker_embed_size"]))).astype(np.float32)
    speaker /= np.linalg.norm(speaker)
    prompt = rng.integers(0, dims["start_speech_token"], size=(1, PROMPT_TOKENS)).astype(np.int64)
    emotion = np.full((1, 1, 1), 0.5, dtype=np.float32)
    fixture = dict(
        text_ids=np.array(text_ids, dtype=np.int32), speaker_emb=speaker, prompt_tokens=prompt.astype(np.int32),
        emotion_adv=emotion, heads=np.array(heads, dtype=np.int32),
    )

    for name, (weights_file, penalty, max_new) in RUNS.items():
        torch.manual_seed(0)
        t3, hp, _, state = build_reference(ckpt, weights_file)
        assert hp.is_multilingual
        fixture[f"{name}_weights_check"] = weights_check({k: v.numpy() for k, v in state.items()})
        text_t = torch.tensor([text_ids, text_ids], dtype=torch.long)
        text_t = F.pad(F.pad(text_t, (1, 0), value=hp.start_text_token), (0, 1), value=hp.stop_text_token)
        cond = T3Cond(speaker_emb=torch.from_numpy(speaker), cond_prompt_speech_tokens=torch.from_numpy(prompt),
                      emotion_adv=torch.from_numpy(emotion))
        rows, states, returned = [], [], []
        original_step = asa.AlignmentStreamAnalyzer.step

        def recording_step(self, logits, next_token=None):
            i, j = self.text_tokens_slice
            rows.append(torch.stack(self.last_aligned_attns).mean(dim=0)[-1, i:j].clone().numpy())
            result = original_step(self, logits, next_token=next_token)
            states.append([int(self.text_position), int(self.started), int(self.complete)])
            returned.append(result[0].clone().numpy())
            return result

        with patched(asa, "LLAMA_ALIGNED_HEADS", heads), recorded_step_logits() as raw, \
                patched(asa.AlignmentStreamAnalyzer, "step", recording_step), \
                injected_multinomial(lambda i, probs: int(torch.argmax(probs))) as (_, tokens):
            t3.inference(t3_cond=cond, text_tokens=text_t, max_new_tokens=max_new, temperature=0.8,
                         cfg_weight=0.5, repetition_penalty=penalty, min_p=0.05, top_p=1.0)
        fixture[f"{name}_tokens"] = np.array(tokens, dtype=np.int32)  # EOS included if it came
        fixture[f"{name}_raw_logits"] = np.stack(raw[:RAW_CALLS]).astype(np.float32)  # (calls, 2, V)
        fixture[f"{name}_attention_rows"] = np.stack(rows).astype(np.float32)  # (steps, S), before masking
        fixture[f"{name}_states"] = np.array(states, dtype=np.int32)  # (steps, 3): position, started, complete
        # the analyzer's output for the EOS logit and the maximum of the others
        eos = hp.stop_speech_token
        fixture[f"{name}_eos_logit"] = np.array([r[eos] for r in returned], dtype=np.float32)
        fixture[f"{name}_forced"] = np.array([bool(r[eos] == 2**15) for r in returned])
        fixture[f"{name}_penalty"] = np.array(penalty)
        print(f"{name}: {len(tokens)} tokens, last {tokens[-3:]}, positions {[s[0] for s in states][-8:]}")
    np.savez_compressed(out / "mtl_t3.npz", **fixture)


def analyzer_scenarios(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Synthetic per-step attention rows over a prefill of P positions whose text is at
    [C, C+S). Returns name -> (prefill weights (2 rows, total), step rows (N, total+n),
    text length)."""
    scenarios = {}
    cond, s = 10, 14

    def walk(positions: list[int], noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        prefill_len = cond + s + 2
        steps = len(positions) - 2
        total = prefill_len + steps
        rows = np.abs(rng.standard_normal((len(positions), total)).astype(np.float32)) * noise
        for r, p in enumerate(positions):
            rows[r, cond + p] += 0.9
        return rows[:2, :prefill_len], rows[2:]

    diag = [0, 0] + [min(k // 2, s - 1) for k in range(2, 60)]
    scenarios["long_tail"] = (*walk(diag), s)
    back = [0, 0] + [min(k // 2, s - 1) for k in range(2, 30)] + [2, 3, 2, 3, 2, 3, 2, 3]
    scenarios["repetition"] = (*walk(back), s)
    jumpy = [0, 0, 1, 2, 12, 3, 4, 5, 13, 6]
    scenarios["discontinuity"] = (*walk(jumpy), s)
    late = [0, 0] + [13, 12] + [min(k // 2, s - 1) for k in range(4, 20)]
    scenarios["false_start"] = (*walk(late), s)
    short = [0, 0, 1, 2, 3, 3, 3, 3, 3, 3]
    scenarios["short_text"] = (walk(short)[0][:, : cond + 5 + 2], None, 5)
    return scenarios


def analyzer_fixture(out: Path) -> None:
    import torch

    from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

    rng = np.random.default_rng(7)
    vocab, eos = 32, 31
    fixture = {}
    for name, (prefill, steps, s) in analyzer_scenarios(rng).items():
        cond = 10
        if steps is None:  # short text: a fresh walk with this text length
            total = prefill.shape[1]
            steps = np.abs(rng.standard_normal((8, total + 8)).astype(np.float32)) * 0.02
            for r, p in enumerate([1, 2, 3, 3, 3, 3, 3, 3]):
                steps[r, cond + p] += 0.9
        n = len(steps)
        tokens = [6561] + list(range(1, n + 1))  # distinct: the token guard stays quiet
        if name == "discontinuity":
            tokens[5] = tokens[6] = 17  # two equal tokens in a row: the token guard
        logits = rng.standard_normal((n + 1, vocab)).astype(np.float32)

        analyzer = AlignmentStreamAnalyzer.__new__(AlignmentStreamAnalyzer)
        # __init__ without the forward hooks (the attention is handed in below)
        analyzer.text_tokens_slice = (cond, cond + s)
        analyzer.eos_idx = eos
        analyzer.alignment = torch.zeros(0, s)
        analyzer.curr_frame_pos = 0
        analyzer.text_position = 0
        analyzer.started = False
        analyzer.started_at = None
        analyzer.complete = False
        analyzer.completed_at = None
        analyzer.generated_tokens = []
        returned, states = [], []
        for k in range(n + 1):
            if k == 0:
                head = torch.from_numpy(np.pad(prefill, ((prefill.shape[1] - 2, 0), (0, 0))))  # (P, P), rows j: used
            else:
                row = steps[k - 1][: prefill.shape[1] + k][None]
                head = torch.from_numpy(row)
            # three heads: the same rows scaled, so their mean is the rows themselves
            analyzer.last_aligned_attns = [head * 0.5, head * 1.0, head * 1.5]
            try:
                result = analyzer.step(torch.from_numpy(logits[k : k + 1].copy()), next_token=tokens[k])
            except IndexError:  # upstream: empty max() once a <= 5-token text completes
                fixture[f"{name}_raised_at"] = np.array(k)
                break
            returned.append(result[0].numpy())
            states.append([int(analyzer.text_position), int(analyzer.started), int(analyzer.complete)])
        fixture[f"{name}_prefill"] = prefill
        fixture[f"{name}_steps"] = steps
        fixture[f"{name}_text_len"] = np.array(s)
        fixture[f"{name}_tokens"] = np.array(tokens, dtype=np.int64)
        fixture[f"{name}_logits"] = logits
        fixture[f"{name}_returned"] = np.stack(returned)
        fixture[f"{name}_states"] = np.array(states, dtype=np.int32)
        forced = [bool(r[eos] == 2**15) for r in returned]
        print(f"analyzer {name}: forced EOS at steps {[i for i, f in enumerate(forced) if f][:3]}")
    fixture["cond_len"] = np.array(10)
    fixture["eos"] = np.array(eos)
    np.savez_compressed(out / "mtl_analyzer.npz", **fixture)


def torch_state_fixture(out: Path) -> None:
    import torch

    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.LSTM(4, 3, num_layers=2, batch_first=True), torch.nn.Linear(3, 2))
    module[1].weight.data = module[1].weight.data.half().float()
    state = module.state_dict()
    state["half"] = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    state["view"] = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3]  # a strided view
    torch.save(state, out / "mtl_torch_state.pt")
    np.savez_compressed(out / "mtl_torch_state.npz", **{k.replace(".", "__"): v.numpy() for k, v in state.items()})


def make(ckpt: Path, out: Path) -> None:
    import torch

    torch.set_grad_enabled(False)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_fixture(ckpt, out)
    t3_fixture(ckpt, out)
    analyzer_fixture(out)
    torch_state_fixture(out)
    # The writer's ve.pt and s3gen.pt are torch.load-able with weights_only, key for key.
    for name in ("ve.pt", "s3gen.pt", "conds.pt"):
        state = torch.load(ckpt / name, weights_only=True)
        print(f"torch.load({name}, weights_only=True): {len(state)} entries")
    print(f"wrote fixtures into {out}")


if __name__ == "__main__":
    run_generator(__doc__, __file__, write=lambda out_dir, args: write_checkpoint(out_dir, args.seed),
                  make=lambda checkpoint, args: make(checkpoint, args.out))
