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

SHORT_TEXT = "The quick brown fox jumps over the lazy dog."
WARMUP_TEXT = "Warming up the kernels for every window shape a stream uses, first and steady."
PARAGRAPH_TEXT = (
    "Nightingale turns text into speech while you wait, and it starts talking long before the "
    "sentence is finished. It keeps the models warm in a small daemon, listens on a socket, "
    "and plays each piece of audio the moment it exists. The rest of the paragraph is still "
    "being generated while the first words are already playing through the speakers."
)
CONFIGS = {"default": (8, None), "int8": (8, "float32"), "int4": (4, "float32"), "float16": (None, "float16"),
           "bfloat16": (None, "bfloat16"), "float32": (None, "float32")}


def run_config(args) -> dict:
    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()
    import mlx.core as mx
    import numpy as np

    from nightingale.dev.metrics import largest_jump, log_spectral_distance
    from nightingale.models import load_model
    from nightingale.models.s3gen import flow as flow_mod
    from nightingale.models.streaming import ChunkSchedule, StreamOptions, render_tokens, stream_tokens

    spec = parse_run(args.config)
    bits, dtype = CONFIGS[spec["name"]]
    if spec["compile"] is not None:
        flow_mod.COMPILE_STEP = "on" if spec["compile"] else "off"
    t0 = time.perf_counter()
    model = load_model(args.model, quantize=bits, dtype=dtype)
    load_s = time.perf_counter() - t0
    conds = model.resolve_voice(None)
    schedule = ChunkSchedule.parse(spec["schedule"] or args.chunk_schedule)
    n_timesteps, prompt_tokens, pipeline = spec["steps"], spec["prompt"], spec["pipeline"]
    stream_opts = dict(chunk_schedule=schedule, n_timesteps=n_timesteps, prompt_tokens=prompt_tokens, pipeline=pipeline)
    if spec["first_steps"] is not None:  # else the library's default
        stream_opts["first_chunk_timesteps"] = spec["first_steps"] or None  # f0: the same steps as the rest
    # warm-up: build kernels (and trace compiled steps) for the shapes used below: first and
    # steady chunks, twice (a shape is compiled the second time it is seen)
    t0 = time.perf_counter()
    for _ in range(2):
        for _ in model.stream(WARMUP_TEXT, seed=0, max_new_tokens=schedule.first + 2 * schedule.max_tokens + 8,
                              **stream_opts):
            pass
    warmup_s = time.perf_counter() - t0

    import common

    machine = common.machine()
    result = {"config": args.config, "load_s": load_s, "warmup_s": warmup_s, "device": machine["device"],
              "openblas": machine["openblas"], "machine": machine,
              "compile": flow_mod.compile_steps(), "pipeline": pipeline}

    def timed_stream(chunks_iter):
        t_start = time.perf_counter()
        chunks, t_first = [], None
        for chunk in chunks_iter:
            if t_first is None and len(chunk.samples):
                t_first = time.perf_counter() - t_start
            chunks.append(chunk)
        elapsed = time.perf_counter() - t_start
        audio_s = sum(len(c.samples) for c in chunks) / 24000
        return chunks, t_first, elapsed, audio_s

    shorts = []
    for seed in range(args.short_runs):
        chunks, ttfa, elapsed, audio_s = timed_stream(
            model.stream(SHORT_TEXT, seed=1 + seed, max_new_tokens=args.short_tokens, **stream_opts))
        shorts.append({"tokens": chunks[-1].token_end, "audio_s": audio_s, "ttfa_ms": ttfa * 1000,
                       "rtf": elapsed / audio_s, "t3_tokens_per_s": chunks[-1].timings["t3_tokens_per_s"],
                       "stall_ms": playback_stall_ms(chunks)})
    result["short"] = {
        "runs": len(shorts),
        "ttfa_ms": float(np.median([s["ttfa_ms"] for s in shorts])),
        "ttfa_ms_all": [round(s["ttfa_ms"], 1) for s in shorts],
        "rtf": float(np.median([s["rtf"] for s in shorts])),
        "t3_tokens_per_s": float(np.median([s["t3_tokens_per_s"] for s in shorts])),
        "stall_ms": float(max(s["stall_ms"] for s in shorts)),
        "audio_s": shorts[0]["audio_s"],
    }

    n_para = args.paragraph_seconds * 25
    tokens = None
    if args.paragraph_tokens == "t3":
        # the paragraph through model.stream: 4 sentences, each given a quarter of the tokens
        per_segment = -(-n_para // 4)
        chunk_iter = model.stream(PARAGRAPH_TEXT, seed=2, max_new_tokens=per_segment, **stream_opts)
    else:
        tokens = [int(t) for t in np.random.default_rng(0).integers(0, 6561, n_para)]
        chunk_iter = stream_tokens(model, iter(tokens), conds, seed=3, options=StreamOptions(
            chunk_schedule=schedule, n_timesteps=n_timesteps, prompt_tokens=prompt_tokens))
    chunks, ttfa, elapsed, audio_s = timed_stream(chunk_iter)
    steady = [c for c in chunks if c.token_end - c.token_start == schedule.max_tokens and len(c.samples)]
    steady_ms = [c.timings["s3gen_ms"] for c in steady]
    result["paragraph"] = {
        "source": args.paragraph_tokens, "tokens": sum(c.token_end - c.token_start for c in chunks), "audio_s": audio_s,
        "ttfa_ms": ttfa * 1000, "rtf": elapsed / audio_s, "chunks": len(chunks),
        "first_steady_ms": steady_ms[0] if steady_ms else None,
        "last_steady_ms": steady_ms[-1] if steady_ms else None,
        "median_steady_ms": float(np.median(steady_ms)) if steady_ms else None,
        "steady_chunk_audio_ms": schedule.max_tokens * 40,
        "stall_ms": playback_stall_ms(chunks),
        "t3_tokens_per_s": chunks[-1].timings.get("t3_tokens_per_s") if chunks[-1].timings.get("t3_tokens_per_s")
        else chunks[-2].timings.get("t3_tokens_per_s"),
        # per chunk: [render start ms, render ms, audio ms, T3 tokens generated at render start, at end]
        "timeline": [[round(c.timings.get("render_start_ms", 0), 1), round(c.timings.get("s3gen_ms", 0), 1),
                      round(c.timings.get("audio_ms", 0)), *c.timings.get("t3_tokens_at_render", [0, 0])]
                     for c in chunks if "s3gen_ms" in c.timings],
    }
    result["schedule"] = f"{schedule.first},{schedule.growth:g},{schedule.max_tokens}"
    result["n_timesteps"] = f"{n_timesteps or model.s3gen.flow.cfg.n_timesteps}" + (f" (first {spec['first_steps']})" if spec["first_steps"] else "")  # 10; Turbo's MeanFlow: 2
    result["prompt_tokens"] = prompt_tokens or "all"
    if args.skip_deviation:
        result["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        return result

    # seams and deviation: the same tokens streamed vs one-shot, same noise
    options = StreamOptions(chunk_schedule=schedule, n_timesteps=n_timesteps, prompt_tokens=prompt_tokens)
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
        "seam_mean_jump": float(np.mean(np.abs(np.diff(streamed))[[p - 1 for p in seams]])) if seams else 0.0,
        "one_shot_seam_mean_jump": float(np.mean(np.abs(np.diff(one_shot))[[p - 1 for p in seams]])) if seams else 0.0,
        "mean_jump": float(np.mean(np.abs(np.diff(streamed)))),
    }
    result["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return result


def parse_run(spec: str) -> dict:
    """"int8" or "int8:16,2,48:s5:f4:p50:seq:c1" -> config, schedule, CFM steps, first-chunk CFM
    steps, prompt tokens, pipeline (seq = T3 and S3Gen one after the other), compile (c0 / c1;
    default: auto)."""
    name, *rest = spec.split(":")
    out = {"name": name, "schedule": None, "steps": None, "prompt": None, "pipeline": True, "compile": None,
           "first_steps": None}
    for part in rest:
        if part.startswith("f"):
            out["first_steps"] = int(part[1:])
        elif part == "seq":
            out["pipeline"] = False
        elif part in ("c0", "c1"):
            out["compile"] = part == "c1"
        elif part.startswith("s"):
            out["steps"] = int(part[1:])
        elif part.startswith("p"):
            out["prompt"] = int(part[1:])
        else:
            out["schedule"] = part
    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    return out


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
    parser.add_argument("--short-runs", type=int, default=5, help="short sentences (median TTFA and RTF)")
    parser.add_argument("--timeline", action="store_true", help="print each paragraph chunk's render and T3 progress")
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
               "--short-tokens", str(args.short_tokens), "--short-runs", str(args.short_runs),
               "--paragraph-seconds", str(args.paragraph_seconds),
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
    if args.timeline:
        table += "\n\n" + render_timelines(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps(results, indent=2))
        (out / "stream.md").write_text(table + "\n")
    return 0


def render_timelines(results: list[dict]) -> str:
    """Paragraph chunks: when each render started and how long it took, the audio it gave,
    and how far T3 had got at its start and end (T3 advancing during a render = overlap)."""
    lines = []
    for r in results:
        lines.append(f"{r['config']} (pipeline {'on' if r['pipeline'] else 'off'}): "
                     "render start ms / render ms / audio ms / T3 tokens at start -> end")
        for start, ms, audio, t0, t1 in r["paragraph"]["timeline"]:
            lines.append(f"  {start:8.0f} {ms:7.0f} {audio:6.0f}   {t0:4d} -> {t1:4d}")
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    from common import describe_machine

    lines = [f"Machine: {describe_machine(results[0]['machine']) if results else '-'}", "",
             "| config | device | schedule / CFM steps / prompt / pipeline / compile | short: TTFA ms (median) | short: RTF "
             "| short: stall ms | T3 tok/s | paragraph: audio s | paragraph: RTF | paragraph: stall ms "
             "| first / median / last steady chunk ms (chunk audio ms) "
             "| stream vs one-shot LSD dB (other noise) | largest jump: seam / inside | mean jump at seams: stream / one-shot / all | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, p, d = r["short"], r["paragraph"], r.get("deviation")
        steady = (f"{p['first_steady_ms']:.0f} / {p['median_steady_ms']:.0f} / {p['last_steady_ms']:.0f} "
                  f"({p['steady_chunk_audio_ms']})"
                  if p["first_steady_ms"] else "n/a")
        dev = (f"{d['lsd_db']:.2f} ({d['lsd_other_noise_db']:.2f}) | {d['seam_jump']:.3f} / {d['inside_jump']:.3f} "
               f"| {d['seam_mean_jump']:.3f} / {d.get('one_shot_seam_mean_jump', float('nan')):.3f} / {d['mean_jump']:.3f}") if d else "- | - | -"
        lines.append(
            f"| {r['config']} | {r['device']}{' +OpenBLAS' if r['openblas'] else ''} "
            f"| {r['schedule']} / {r['n_timesteps']} / {r['prompt_tokens']} / {'on' if r['pipeline'] else 'off'} "
            f"/ {'on' if r['compile'] else 'off'} | {s['ttfa_ms']:.0f} | {s['rtf']:.2f} "
            f"| {s['stall_ms']:.0f} | {s['t3_tokens_per_s']:.1f} | {p['audio_s']:.1f} ({p['source']}) | {p['rtf']:.2f} "
            f"| {p['stall_ms']:.0f} | {steady} | {dev} | {r['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
