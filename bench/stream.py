"""Streaming benchmark: time to first audio, real-time factor, flat per-chunk cost, seams.

    python bench/stream.py --model /path/to/full-checkpoint [--configs int8,float16] [--out DIR]

For each configuration (a subprocess each, so memory and warm-up do not leak between them):
* short sentence through the whole pipeline (T3 + streaming S3Gen): TTFA, RTF, T3 tokens/s;
* a ~30 s paragraph: RTF and the cost of the first and last chunks of equal size, showing
  that per-chunk cost does not grow along the paragraph. With --paragraph-tokens fixed, the
  paragraph's tokens are a fixed random sequence fed at once (S3Gen streaming cost alone,
  for slow CPUs where 750 T3 steps take many minutes); with `t3` they come from T3;
* deviation of the streamed waveform from one-shot synthesis of the same tokens and noise:
  log-spectral distance, and the largest sample jump at a seam vs inside chunks.
Random weights are a proxy: T3 never emits EOS, so the budget bounds every utterance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHORT_TEXT = "The quick brown fox jumps over the lazy dog."
PARAGRAPH_TEXT = (
    "Nightingale turns text into speech while you wait, and it starts talking long before the "
    "sentence is finished. It keeps the models warm in a small daemon, listens on a socket, "
    "and plays each piece of audio the moment it exists. The rest of the paragraph is still "
    "being generated while the first words are already playing through the speakers."
)
CONFIGS = {"int8": (8, "float32"), "int4": (4, "float32"), "float16": (None, "float16"),
           "bfloat16": (None, "bfloat16"), "float32": (None, "float32")}


def run_config(args) -> dict:
    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()
    import mlx.core as mx
    import numpy as np

    from nightingale.models import load_model
    from nightingale.models.metrics import largest_jump, log_spectral_distance
    from nightingale.models.streaming import ChunkSchedule, StreamOptions, render_tokens, stream_tokens

    name, schedule_spec, n_timesteps, prompt_tokens = parse_run(args.config)
    bits, dtype = CONFIGS[name]
    t0 = time.perf_counter()
    model = load_model(args.model, quantize=bits, dtype=dtype)
    load_s = time.perf_counter() - t0
    conds = model.resolve_voice(None)
    schedule = ChunkSchedule.parse(schedule_spec or args.chunk_schedule)
    stream_opts = dict(chunk_schedule=schedule, n_timesteps=n_timesteps, prompt_tokens=prompt_tokens)
    # warm-up: compile kernels for the shapes used below
    for _ in model.stream("Warm up.", seed=0, max_new_tokens=schedule.first + 8, **stream_opts):
        pass

    import common

    machine = common.machine()
    result = {"config": args.config, "load_s": load_s, "device": machine["device"],
              "openblas": machine["openblas"], "machine": machine}

    def timed_stream(chunks_iter):
        t_start = time.perf_counter()
        chunks, t_first = [], None
        for chunk in chunks_iter:
            if t_first is None:
                t_first = time.perf_counter() - t_start
            chunks.append(chunk)
        elapsed = time.perf_counter() - t_start
        audio_s = sum(len(c.samples) for c in chunks) / 24000
        return chunks, t_first, elapsed, audio_s

    chunks, ttfa, elapsed, audio_s = timed_stream(
        model.stream(SHORT_TEXT, seed=1, max_new_tokens=args.short_tokens, **stream_opts)
    )
    result["short"] = {
        "tokens": chunks[-1].token_end, "audio_s": audio_s, "ttfa_ms": ttfa * 1000, "rtf": elapsed / audio_s,
        "t3_tokens_per_s": chunks[-1].timings["t3_tokens_per_s"], "stall_ms": playback_stall_ms(chunks),
    }

    n_para = args.paragraph_seconds * 25
    if args.paragraph_tokens == "t3":
        gen = model.generate_tokens(PARAGRAPH_TEXT, voice=conds, seed=2, max_new_tokens=n_para)
        tokens = None
    else:
        tokens = [int(t) for t in np.random.default_rng(0).integers(0, 6561, n_para)]
        gen = iter(tokens)
    options = StreamOptions(chunk_schedule=schedule, n_timesteps=n_timesteps, prompt_tokens=prompt_tokens)
    chunks, ttfa, elapsed, audio_s = timed_stream(stream_tokens(model, gen, conds, seed=3, options=options))
    steady = [c for c in chunks if not c.is_last and c.token_end - c.token_start == schedule.max_tokens]
    result["paragraph"] = {
        "source": args.paragraph_tokens, "tokens": chunks[-1].token_end, "audio_s": audio_s,
        "ttfa_ms": ttfa * 1000, "rtf": elapsed / audio_s, "chunks": len(chunks),
        "chunk_s3gen_ms": [round(c.timings["s3gen_ms"], 1) for c in chunks],
        "first_steady_ms": steady[0].timings["s3gen_ms"] if steady else None,
        "last_steady_ms": steady[-1].timings["s3gen_ms"] if steady else None,
        "steady_chunk_audio_ms": schedule.max_tokens * 40,
        "stall_ms": playback_stall_ms(chunks),
    }
    result["schedule"] = f"{schedule.first},{schedule.growth:g},{schedule.max_tokens}"
    result["n_timesteps"] = n_timesteps or model.s3gen.flow.cfg.n_timesteps  # 10; Turbo's MeanFlow: 2
    result["prompt_tokens"] = prompt_tokens or "all"
    if args.skip_deviation:
        result["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        return result

    # seams and deviation: the same tokens streamed vs one-shot, same noise
    dev_tokens = tokens[: args.deviation_tokens] if tokens else [
        int(t) for t in np.random.default_rng(1).integers(0, 6561, args.deviation_tokens)]
    one_shot = render_tokens(model, dev_tokens, conds.gen, seed=4, options=options)
    streamed_chunks = list(stream_tokens(model, iter(dev_tokens), conds, seed=4, options=options))
    streamed = np.concatenate([c.samples for c in streamed_chunks])
    seams = list(np.cumsum([len(c.samples) for c in streamed_chunks])[:-1])
    inside = largest_jump(streamed, [p for p in range(1, len(streamed)) if p not in set(seams)])
    result["deviation"] = {
        "tokens": len(dev_tokens), "same_length": len(streamed) == len(one_shot),
        "lsd_db": log_spectral_distance(one_shot, streamed),
        "lsd_other_noise_db": log_spectral_distance(one_shot, render_tokens(model, dev_tokens, conds.gen, seed=5, options=options)),
        "seam_jump": largest_jump(streamed, seams), "inside_jump": inside,
        "one_shot_inside_jump": largest_jump(one_shot),
        # mean |x[n] - x[n-1]| at seams vs everywhere: a seam click shows as a higher mean
        "seam_mean_jump": float(np.mean(np.abs(np.diff(streamed))[[p - 1 for p in seams]])) if seams else 0.0,
        # the control: one-shot audio at the same sample positions (seams fall on frame edges)
        "one_shot_seam_mean_jump": float(np.mean(np.abs(np.diff(one_shot))[[p - 1 for p in seams]])) if seams else 0.0,
        "mean_jump": float(np.mean(np.abs(np.diff(streamed)))),
    }
    result["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return result


def parse_run(spec: str) -> tuple[str, str | None, int | None, int | None]:
    """"int8" or "int8:24,2,48:s5:p50" -> (config, schedule, CFM steps, prompt tokens)."""
    name, *rest = spec.split(":")
    schedule = steps = prompt = None
    for part in rest:
        if part.startswith("s"):
            steps = int(part[1:])
        elif part.startswith("p"):
            prompt = int(part[1:])
        else:
            schedule = part
    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    return name, schedule, steps, prompt


def playback_stall_ms(chunks) -> float:
    """Silence a listener would hear after the first chunk starts playing: each chunk plays
    when it is ready or when the previous one ends, whichever is later."""
    end = None
    stall = 0.0
    for chunk in chunks:
        ready = chunk.timings["elapsed_ms"]
        length = len(chunk.samples) / 24.0  # ms at 24 kHz
        if end is None:
            end = ready + length
        elif ready > end:
            stall += ready - end
            end = ready + length
        else:
            end += length
    return stall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--configs", default="int8,float16",
                        help="comma list of CONFIG[:first,growth,max][:sN CFM steps][:pN prompt tokens]")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-schedule", default=None, help="first,growth,max (default: the library's)")
    parser.add_argument("--short-tokens", type=int, default=75, help="T3 budget of the short sentence (3 s)")
    parser.add_argument("--paragraph-seconds", type=int, default=30)
    parser.add_argument("--paragraph-tokens", choices=("t3", "fixed"), default="t3")
    parser.add_argument("--deviation-tokens", type=int, default=150)
    parser.add_argument("--skip-deviation", action="store_true", help="only timing (for schedule sweeps)")
    parser.add_argument("--out", default=None, help="directory for stream.json and stream.md")
    args = parser.parse_args()
    if args.config:
        print("RESULT " + json.dumps(run_config(args)), flush=True)
        return 0

    results = []
    for config in args.configs.split(";") if ";" in args.configs else args.configs.split(","):
        cmd = [sys.executable, __file__, "--config", config, "--model", args.model,
               "--short-tokens", str(args.short_tokens), "--paragraph-seconds", str(args.paragraph_seconds),
               "--paragraph-tokens", args.paragraph_tokens, "--deviation-tokens", str(args.deviation_tokens)]
        if args.chunk_schedule:
            cmd += ["--chunk-schedule", args.chunk_schedule]
        if args.skip_deviation:
            cmd.append("--skip-deviation")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{config}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][7:]))
        print(f"{config}: done", file=sys.stderr, flush=True)

    table = render(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps(results, indent=2))
        (out / "stream.md").write_text(table + "\n")
    return 0


def render(results: list[dict]) -> str:
    from common import describe_machine

    lines = [f"Machine: {describe_machine(results[0]['machine']) if results else '-'}", "",
             "| config | device | schedule / CFM steps / prompt | short: TTFA ms | short: RTF | short: stall ms | T3 tok/s "
             "| paragraph: audio s | paragraph: RTF | paragraph: stall ms | first / last steady chunk ms (chunk audio ms) "
             "| stream vs one-shot LSD dB (other noise) | largest jump: seam / inside | mean jump at seams: stream / one-shot / all | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, p, d = r["short"], r["paragraph"], r.get("deviation")
        steady = (f"{p['first_steady_ms']:.0f} / {p['last_steady_ms']:.0f} ({p['steady_chunk_audio_ms']})"
                  if p["first_steady_ms"] else "n/a")
        dev = (f"{d['lsd_db']:.2f} ({d['lsd_other_noise_db']:.2f}) | {d['seam_jump']:.3f} / {d['inside_jump']:.3f} "
               f"| {d['seam_mean_jump']:.3f} / {d.get('one_shot_seam_mean_jump', float('nan')):.3f} / {d['mean_jump']:.3f}") if d else "- | - | -"
        lines.append(
            f"| {r['config']} | {r['device']}{' +OpenBLAS' if r['openblas'] else ''} "
            f"| {r['schedule']} / {r['n_timesteps']} / {r['prompt_tokens']} | {s['ttfa_ms']:.0f} | {s['rtf']:.2f} "
            f"| {s['stall_ms']:.0f} | {s['t3_tokens_per_s']:.1f} | {p['audio_s']:.1f} ({p['source']}) | {p['rtf']:.2f} "
            f"| {p['stall_ms']:.0f} | {steady} | {dev} | {r['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
