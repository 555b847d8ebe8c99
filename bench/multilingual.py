"""Multilingual decode speed and first-audio latency per language.

    python bench/multilingual.py --model DIR [--quantize 8|none] [--languages en,fr,ja,...]

For each language, the same short sentence (translated) goes through the pipeline once to
warm up and --repeats times measured (the run with the lowest first-audio time is kept): text tokens
(the tokenizer's length differs per language), T3 prefill, T3 tokens per second with the
alignment analyzer, and time to the first audio chunk of a streamed utterance (front end,
T3, streaming S3Gen). Random weights never reach the end of the text, so --max-new-tokens
bounds each decode.
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time

SENTENCES = {
    "en": "The weather is nice today, let's go for a walk.",
    "fr": "Il fait beau aujourd'hui, allons nous promener.",
    "de": "Das Wetter ist heute schön, lass uns spazieren gehen.",
    "es": "Hoy hace buen tiempo, vamos a dar un paseo.",
    "ru": "Сегодня хорошая погода, давай погуляем.",
    "el": "Ο καιρός είναι ωραίος σήμερα, πάμε μια βόλτα.",
    "ar": "الطقس جميل اليوم، لنذهب في نزهة.",
    "he": "מזג האוויר נעים היום, בוא נלך לטייל.",
    "hi": "आज मौसम अच्छा है, चलो टहलने चलते हैं।",
    "ja": "今日は天気がいいので、散歩に行きましょう。",
    "ko": "오늘 날씨가 좋으니 산책하러 가자.",
}


def main() -> int:
    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", default="none", choices=("8", "4", "none"))
    parser.add_argument("--languages", default=",".join(SENTENCES))
    parser.add_argument("--max-new-tokens", type=int, default=40, help="token budget per utterance")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs per language (after one warm-up)")
    args = parser.parse_args()

    import mlx.core as mx

    from common import describe_machine, machine, markdown_table
    from nightingale.models import load_model
    from nightingale.models.alignment import generate_aligned
    from nightingale.models.tokenizer import wrap_text_tokens

    quantize = None if args.quantize == "none" else int(args.quantize)
    t0 = time.perf_counter()
    model = load_model(args.model, quantize=quantize, dtype="float32")
    print(f"{describe_machine(machine())}; model {args.model} ({model.checkpoint.size}, {model.family}), "
          f"quantize {args.quantize}, loaded in {time.perf_counter() - t0:.1f} s; {time.strftime('%Y-%m-%d')}")
    rows = []
    for lang in args.languages.split(","):
        text = SENTENCES[lang]
        ids = model.text_tokens(text, lang)
        best = None
        for attempt in range(1 + args.repeats):  # the first run compiles kernels; the best of the rest
            cond = model.conds.t3
            cond_emb = model.t3.prepare_conditioning(cond)
            t = time.perf_counter()
            logits, _ = model.t3.prefill(cond_emb, mx.array(wrap_text_tokens(ids), dtype=mx.int32))
            mx.eval(logits)
            prefill_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            n = sum(1 for _ in generate_aligned(model.t3, cond, ids, max_new_tokens=args.max_new_tokens, seed=attempt))
            decode_tps = n / (time.perf_counter() - t)
            first = next(iter(model.stream(text, language=lang, seed=attempt, max_new_tokens=args.max_new_tokens)))
            run = (prefill_ms, decode_tps, first.timings["ttfa_ms"], first.timings["audio_ms"])
            if attempt and (best is None or run[2] < best[2]):
                best = run
        rows.append([lang, len(ids), round(best[0]), round(best[1], 1), round(best[2]), round(best[3])])
        print(f"  {lang}: {rows[-1]}", flush=True)
    print(markdown_table(["language", "text tokens", "T3 prefill ms", "T3 tokens/s (analyzer on)",
                          "first audio ms", "first chunk audio ms"], rows,
                         [False, True, True, True, True, True]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
