"""Chatterbox Turbo benchmark: Turbo beside the original model and the reference's Turbo.

    python bench/turbo.py --turbo DIR [--original DIR] [--runs turbo:int8,turbo:float16,...] [--reference] [--out DIR]

DIR: full-size checkpoints (`nightingale dev make-checkpoint DIR --size full [--family turbo]`).
Each run is a subprocess (clean memory figures). A run is MODEL:CONFIG with MODEL one of
  turbo     Turbo T3 (GPT-2, batch 1) + MeanFlow S3Gen (2 steps, no CFG)
  original  the original T3 (Llama, CFG batch 2) + S3Gen (10 steps, CFG)
  paired    the original T3 + Turbo's MeanFlow S3Gen (`--decoder`; not a pairing Resemble ships)
  decoders  one streamed chunk through the original S3Gen and through Turbo's MeanFlow S3Gen,
            same tokens, voice and noise, interleaved in one process (what the decoder buys)
and CONFIG int8 (INT8 weights, float32 activations), float16, float32.

Per run:
- T3: prefill ms (conditioning + prefill to the first token) and decode tokens/s (steady gap
  between tokens of the public generator, sampler included), after a warm-up generation;
- S3Gen per streamed chunk: a fixed random token sequence streamed with the default chunk
  schedule; first chunk and steady (48-token) chunk S3Gen ms;
- a short sentence streamed end to end (T3 + S3Gen): time to first audio and RTF;
- peak MLX memory and maximum RSS.
`--reference` adds the PyTorch reference's Turbo (`ChatterboxTurboTTS.from_local` on the
same Turbo checkpoint, .ref-venv (tools/make_reference_env.sh), CPU): `inference_turbo` tokens/s (timed at each
multinomial) and one `S3Gen.inference` (2 MeanFlow steps + HiFT) on prompt + 48 tokens.
With `--reference-device cuda` it runs the reference's Turbo T3 alone on the GPU.
Random weights never emit EOS, so budgets bound every utterance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common  # bench/common.py (no MLX at import)

SHORT_TEXT = "The quick brown fox jumps over the lazy dog."
CONFIGS = {"int8": (8, "float32"), "float16": (None, "float16"), "float32": (None, "float32"), "bfloat16": (None, "bfloat16")}
CHUNK_TOKENS = 48


def worker_ours(args) -> dict:
    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()
    import mlx.core as mx
    import numpy as np

    from nightingale.models import load_model
    from nightingale.models.streaming import ChunkSchedule, StreamOptions, stream_tokens

    which, config = args.run.split(":")
    bits, dtype = CONFIGS[config]
    path = args.turbo if which == "turbo" else args.original
    decoder = args.turbo if which == "paired" else None
    t0 = time.perf_counter()
    model = load_model(path, quantize=bits, dtype=dtype, decoder=decoder)
    load_s = time.perf_counter() - t0
    conds = model.resolve_voice(None)
    for _ in model.stream("Warm up.", seed=0, max_new_tokens=40):
        pass

    def decode(n: int) -> tuple[float, float]:
        t_start = time.perf_counter()
        stamps = []
        for _ in model.generate_tokens(SHORT_TEXT, voice=conds, seed=1, max_new_tokens=n):
            stamps.append(time.perf_counter())
        stamps = stamps[:n]  # Turbo's generator ends with its 3 silence tokens
        return (stamps[0] - t_start) * 1000, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode(8)
    prefill_ms, tokens_per_s = decode(args.tokens)

    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 6561, args.chunk_tokens_total)]
    schedule = ChunkSchedule()
    chunks = list(stream_tokens(model, iter(tokens), conds, seed=3, options=StreamOptions(chunk_schedule=schedule)))
    steady = [c.timings["s3gen_ms"] for c in chunks if not c.is_last and c.token_end - c.token_start == schedule.max_tokens]

    t_start = time.perf_counter()
    first = None
    audio = 0
    for chunk in model.stream(SHORT_TEXT, seed=1, max_new_tokens=args.short_tokens):
        first = first if first is not None else time.perf_counter() - t_start
        audio += len(chunk.samples)
    elapsed = time.perf_counter() - t_start
    machine = common.machine()
    return {
        "run": args.run, "device": machine["device"], "machine": machine, "load_s": load_s,
        "prefill_ms": prefill_ms, "t3_tokens_per_s": tokens_per_s,
        "first_chunk_s3gen_ms": chunks[0].timings["s3gen_ms"], "first_chunk_tokens": chunks[0].token_end,
        "steady_chunk_s3gen_ms": float(np.median(steady)) if steady else None, "steady_chunk_tokens": schedule.max_tokens,
        "ttfa_ms": first * 1000, "rtf": elapsed / (audio / 24000), "short_audio_s": audio / 24000,
        "n_timesteps": model.s3gen.flow.cfg.n_timesteps,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "max_rss_mb": common.max_rss_mb(),
    }


def worker_decoders(args) -> dict:
    """The two decoders on the same tokens, voice and noise, interleaved in one process (so
    a busy machine slows both alike): one streamed chunk's flow call (prompt + 24 context +
    48 new + 3 lookahead tokens) and HiFT over its 96 frames, median of `--repeats`."""
    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()
    import mlx.core as mx
    import numpy as np

    from nightingale.models import load_model
    from nightingale.models.streaming import _prompt, speech_noise
    from nightingale.models.s3gen.flow import fixed_noise

    bits, dtype = CONFIGS[args.run.split(":")[1]]
    original = load_model(args.original, quantize=bits, dtype=dtype)
    paired = load_model(args.original, quantize=bits, dtype=dtype, decoder=args.turbo)
    gen = original.resolve_voice(None).gen
    prompt_token, prompt_feat = _prompt(gen, None)
    window = [int(t) for t in np.random.default_rng(0).integers(0, 6561, 24 + CHUNK_TOKENS + 3)]
    noise = mx.concatenate([fixed_noise(prompt_feat.shape[1], 1), speech_noise(1, 0, len(window))], axis=2)
    frames = (48, 48 + 2 * CHUNK_TOKENS)

    def chunk(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        mel = model.s3gen.flow.inference(mx.array([window], dtype=mx.int32), prompt_token, prompt_feat, gen["embedding"],
                                         noise=noise, frames=frames)
        mx.eval(mel)
        t1 = time.perf_counter()
        hift = model.s3gen.mel2wav
        mx.eval(hift.decode(mel, hift.source(hift.f0(mel), key=mx.random.key(0))))
        return (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000

    timings = {"original": [], "meanflow": []}
    chunk(original), chunk(paired)  # warm-up
    for _ in range(args.repeats):
        timings["original"].append(chunk(original))
        timings["meanflow"].append(chunk(paired))
    med = {k: [float(np.median([t[i] for t in v])) for i in (0, 1)] for k, v in timings.items()}
    machine = common.machine()
    return {"run": args.run, "device": machine["device"], "machine": machine, "prompt_tokens": int(prompt_token.shape[1]),
            "window_tokens": len(window), "chunk_tokens": CHUNK_TOKENS, "repeats": args.repeats,
            "original_flow_ms": med["original"][0], "meanflow_flow_ms": med["meanflow"][0],
            "original_hift_ms": med["original"][1], "meanflow_hift_ms": med["meanflow"][1],
            "flow_speedup": med["original"][0] / med["meanflow"][0]}


def _fixture_common():
    """tools/fixture_common.py (stdlib and numpy only), which sets up the reference's Turbo
    T3 for the parity fixtures."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "fixture_common.py"
    spec = importlib.util.spec_from_file_location("fixture_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_turbo_t3(directory: Path, device: str):
    """The reference's Turbo T3, built as `ChatterboxTurboTTS.from_local` builds it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    t3 = T3(_fixture_common().turbo_t3_config())
    t3.load_state_dict(load_file(directory / "t3_turbo_v1.safetensors"))
    del t3.tfmr.wte
    t3.to(device).eval()
    conds = torch.load(directory / "conds.pt", map_location=device, weights_only=True)
    cond = T3Cond(**conds["t3"]).to(device=device)
    return t3, cond, AutoTokenizer.from_pretrained(directory)


def _time_inference_turbo(t3, cond, text, tokens: int) -> tuple[float, float]:
    """Prefill ms and decode tokens/s of `T3.inference_turbo`, timed at each multinomial."""
    import torch

    stamps: list[float] = []
    original = torch.multinomial

    def timed(probs, num_samples=1):
        stamps.append(time.perf_counter())
        return original(probs, num_samples)

    torch.multinomial = timed
    try:
        with torch.inference_mode():
            t_start = time.perf_counter()
            t3.inference_turbo(cond, text, max_gen_len=tokens - 1)
    finally:
        torch.multinomial = original
    return (stamps[0] - t_start) * 1000, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def worker_reference(args) -> dict:
    """The reference's Turbo. On the CPU: the whole `ChatterboxTurboTTS` (T3 and one
    `S3Gen.inference`). On a GPU (`--reference-device cuda`): T3 alone, in float32, as
    `from_local` builds it (S3Gen's audio dependencies are not installed there)."""
    import numpy as np
    import torch

    device = args.reference_device
    torch.set_num_threads(int(os.environ.get("REFERENCE_THREADS", "2")))
    t0 = time.perf_counter()
    if device == "cpu":
        from chatterbox.tts_turbo import ChatterboxTurboTTS

        tts = ChatterboxTurboTTS.from_local(args.turbo, "cpu")
        t3, cond, tokenizer = tts.t3, tts.conds.t3, tts.tokenizer
    else:
        common.import_reference_t3_only()
        t3, cond, tokenizer = _reference_turbo_t3(Path(args.turbo), device)
    load_s = time.perf_counter() - t0
    text = tokenizer(SHORT_TEXT, return_tensors="pt").input_ids.to(device)
    _time_inference_turbo(t3, cond, text, 8)  # warm-up (CUDA kernels, allocator)
    prefill_ms, tokens_per_s = _time_inference_turbo(t3, cond, text, args.tokens)
    result = {"run": "reference-turbo:float32", "device": f"{device} (torch {torch.__version__})", "load_s": load_s,
              "prefill_ms": prefill_ms, "t3_tokens_per_s": tokens_per_s, "steady_chunk_tokens": CHUNK_TOKENS,
              "n_timesteps": 2, "max_rss_mb": common.max_rss_mb()}
    if device == "cpu":
        tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 6561, CHUNK_TOKENS))
        tts.s3gen.inference(tokens[:8], ref_dict=tts.conds.gen)  # warm-up
        t1 = time.perf_counter()
        tts.s3gen.inference(tokens, ref_dict=tts.conds.gen)
        result["steady_chunk_s3gen_ms"] = (time.perf_counter() - t1) * 1000
    else:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def render_decoders(r: dict) -> str:
    return ("| decoder | flow ms per chunk | HiFT ms per chunk |\n|---|---|---|\n"
            f"| original S3Gen (10 steps, CFG batch 2) | {r['original_flow_ms']:.0f} | {r['original_hift_ms']:.0f} |\n"
            f"| MeanFlow S3Gen (2 steps, batch 1) | {r['meanflow_flow_ms']:.0f} | {r['meanflow_hift_ms']:.0f} |\n\n"
            f"{r['run']} on {r['device']}: prompt {r['prompt_tokens']} + window {r['window_tokens']} tokens "
            f"({r['chunk_tokens']} new), median of {r['repeats']}; flow speed-up x{r['flow_speedup']:.1f}")


def render(results: list[dict]) -> str:

    decoders = [r for r in results if r["run"].startswith("decoders:")]
    results = [r for r in results if not r["run"].startswith("decoders:")]
    machine = next((r["machine"] for r in results if "machine" in r), None)
    lines = [f"Machine: {common.describe_machine(machine) if machine else '-'}", "",
             "| run | device | CFM steps | T3 prefill ms | T3 decode tok/s | S3Gen first chunk ms (tokens) "
             "| S3Gen steady chunk ms (tokens) | short: TTFA ms | short: RTF | peak GB | max RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results:
        first = f"{r['first_chunk_s3gen_ms']:.0f} ({r['first_chunk_tokens']})" if "first_chunk_s3gen_ms" in r else "-"
        lines.append(
            f"| {r['run']} | {r['device']} | {r['n_timesteps']} | {f(r.get('prefill_ms'), '.0f')} "
            f"| {f(r.get('t3_tokens_per_s'), '.1f')} | {first} "
            f"| {f(r.get('steady_chunk_s3gen_ms'), '.0f')} ({r['steady_chunk_tokens']}) | {f(r.get('ttfa_ms'), '.0f')} "
            f"| {f(r.get('rtf'), '.2f')} | {f(r.get('peak_memory_gb'), '.2f')} | {f(r.get('max_rss_mb'), '.0f')} |")
    return "\n\n".join(["\n".join(lines)] + [render_decoders(r) for r in decoders])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turbo", required=True, help="full-size Turbo checkpoint directory (or repo id)")
    parser.add_argument("--original", help="full-size original checkpoint directory (original and paired runs)")
    parser.add_argument("--runs", default="turbo:int8,turbo:float16")
    parser.add_argument("--reference", action="store_true", help="also run the PyTorch reference's Turbo")
    parser.add_argument("--reference-python", default=common.REFERENCE_PYTHON)
    parser.add_argument("--reference-device", default="cpu", help="cpu (whole pipeline) or cuda (T3 alone)")
    parser.add_argument("--tokens", type=int, default=40, help="T3 decode steps timed")
    parser.add_argument("--short-tokens", type=int, default=75, help="T3 budget of the short sentence (3 s)")
    parser.add_argument("--chunk-tokens-total", type=int, default=150, help="tokens streamed for the chunk figures")
    parser.add_argument("--repeats", type=int, default=3, help="decoders run: timed chunks per decoder")
    parser.add_argument("--out", help="directory for turbo.json and turbo.md")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "reference":
            result = worker_reference(args)
        elif args.run.startswith("decoders:"):
            result = worker_decoders(args)
        else:
            result = worker_ours(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    common_args = ["--turbo", args.turbo, "--tokens", str(args.tokens), "--short-tokens", str(args.short_tokens),
                   "--chunk-tokens-total", str(args.chunk_tokens_total), "--repeats", str(args.repeats)]
    if args.original:
        common_args += ["--original", args.original]
    jobs = [([sys.executable, __file__, "--worker", "ours", "--run", run, *common_args], run)
            for run in args.runs.split(",") if run]
    if args.reference:
        jobs.append(([args.reference_python, __file__, "--worker", "reference", "--reference-device", args.reference_device,
                      *common_args], "reference"))
    results = []
    for cmd, name in jobs:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][7:]))
        print(f"{name}: done", file=sys.stderr, flush=True)
        if args.out:  # after every run: a run cut short by a time limit keeps what it has
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "turbo.json").write_text(json.dumps(results, indent=2))
            (out / "turbo.md").write_text(render(results) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
