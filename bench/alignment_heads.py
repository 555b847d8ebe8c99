"""Can the multilingual alignment guard protect the English model? Look for aligned heads.

The English T3 has no LLAMA_ALIGNED_HEADS list. This script decodes a few texts with every
head of every layer probed (models/t3.AttentionProbe), scores each head by how well the
argmax of its attention over the text tracks the generation (Spearman correlation of
step and text position, and how far along the text it gets), then runs the analyzer
(models/alignment.py) with the best three heads and compares where generation stops
with and without it.

    python bench/alignment_heads.py --model DIR [--steps 120] [--seed 0]

Prints a table per model; the findings go to docs/notes.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from nightingale.blas import reexec_with_openblas

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you have a moment, there is something I want to tell you.",
    "Numbers like one, two and three should be spoken clearly.",
]


def spearman(x, y) -> float:
    import numpy as np

    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def head_rows(model, text: str, steps: int, seed: int):
    """Decode `text` (English sampling defaults) with every head probed; returns
    (rows (steps, layers, heads, S), tokens)."""
    import mlx.core as mx
    import numpy as np

    from nightingale.models import t3 as t3_mod
    from nightingale.models.tokenizer import wrap_text_tokens

    t3, cfg = model.t3, model.t3.cfg
    heads = [(layer, head) for layer in range(cfg.num_hidden_layers) for head in range(cfg.num_attention_heads)]
    probe = t3_mod.AttentionProbe(heads)
    cond_emb = t3.prepare_conditioning(model.conds.t3)
    text_ids = wrap_text_tokens(model.text_tokens(text) if model.family == "chatterbox" else model.text_tokens(text, "en"))
    i, j = cond_emb.shape[1], cond_emb.shape[1] + len(text_ids)
    params = t3_mod.SamplingParams(repetition_penalty=1.2)
    keys = mx.random.split(mx.random.key(seed), steps + 1)
    seen = mx.arange(cfg.speech_tokens_dict_size) == cfg.start_speech_token
    logits, cache = t3.prefill(cond_emb, mx.array(text_ids, dtype=mx.int32), probe=probe)
    rows, tokens = [], []
    for k in range(steps):
        mx.eval(logits, *probe.weights)
        rows.append(np.stack([np.array(w)[-1, i:j] for w in probe.weights]).reshape(cfg.num_hidden_layers, cfg.num_attention_heads, -1))
        token = t3_mod.sample_token(logits, seen, params, keys[k]).item()
        if token == cfg.stop_speech_token:
            break
        tokens.append(token)
        seen = seen | (mx.arange(cfg.speech_tokens_dict_size) == token)
        logits, cache = t3.step(token, k + 1, cache, probe=probe)
    return np.stack(rows), tokens


def score_heads(rows) -> list[tuple[float, float, float, int, int]]:
    """(score, rho, coverage, layer, head), best first."""
    import numpy as np

    steps, layers, heads, s = rows.shape
    out = []
    for layer in range(layers):
        for head in range(heads):
            pos = rows[:, layer, head].argmax(axis=-1)
            rho = spearman(np.arange(steps), pos)
            coverage = float(pos.max()) / max(s - 1, 1)
            out.append((rho * coverage, rho, coverage, layer, head))
    return sorted(out, reverse=True)


def tokens_until_stop(model, text: str, heads, steps: int, seed: int) -> tuple[int, str]:
    from nightingale.models import alignment

    cfg = dataclasses.replace(model.t3.cfg, alignment_heads=[list(h) for h in heads])
    t3 = model.t3
    original = t3.cfg
    t3.cfg = cfg
    try:
        gen = alignment.generate_aligned(t3, model.conds.t3, model.text_tokens(text) if model.family == "chatterbox"
                                         else model.text_tokens(text, "en"), repetition_penalty=1.2,
                                         max_new_tokens=steps, seed=seed)
        n = 0
        try:
            while True:
                next(gen)
                n += 1
        except StopIteration as stop:
            r = stop.value
    finally:
        t3.cfg = original
    if r is None:
        return n, "budget"
    why = [name for name in ("long_tail", "alignment_repetition", "token_repetition") if getattr(r, name)]
    return n, "+".join(why) or "eos"


def main() -> int:
    reexec_with_openblas()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nightingale.models import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, quantize=None)
    print(f"model {args.model} ({model.family}, {model.t3.cfg.num_hidden_layers} layers x "
          f"{model.t3.cfg.num_attention_heads} heads), loaded in {time.perf_counter() - t0:.1f} s")
    print("| text | steps | best heads (layer, head: rho x coverage) | tokens, no guard | tokens, guard (why) |")
    print("|---|---|---|---|---|")
    for n, text in enumerate(TEXTS):
        rows, tokens = head_rows(model, text, args.steps, args.seed + n)
        ranked = score_heads(rows)[:3]
        heads = [(layer, head) for _, _, _, layer, head in ranked]
        guarded, why = tokens_until_stop(model, text, heads, args.steps, args.seed + n)
        best = ", ".join(f"{l},{h}: {r:.2f}x{c:.2f}" for _, r, c, l, h in ranked)
        print(f"| {text[:28]}... | {len(rows)} | {best} | {len(tokens)} | {guarded} ({why}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
