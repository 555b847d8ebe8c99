"""Precision and quantization: speed, memory, size, load time and fidelity, one table.

    .venv/bin/python bench/precision.py [--checkpoint /work/ckpt-full] [--cache /work/bench-cache]
        [--configs float32,float16,bfloat16,int8,int4] [--metrics t3,s3gen,fidelity]
        [--decode-steps 16] [--greedy-steps 100] [--teacher-positions 200] [--s3gen-seconds 2]
        [--out results.md]

Each configuration is converted once (models/cache.convert, into --cache, reused while the
checkpoint's fingerprint and the settings match) and then measured in its own process, so
memory figures are clean and the load is a cold process's:
- decode tok/s: T3 greedy decoding at batch 2 (CFG), the sampler included, over
  --decode-steps steps after 4 warm-up steps; prefill ms: conditioning + prefill of
  [cond | text | BOS BOS] at batch 2 (after one warm-up prefill of the same shape);
- S3Gen s/s: seconds of compute (flow + HiFT) per second of audio for --s3gen-seconds of
  random tokens in the checkpoint's built-in voice (after a short warm-up);
- memory: MLX active memory after loading (the weights), MLX peak while measuring, the
  process's peak RSS; weights on disk: the converted directory's safetensors;
- load s: load_model(converted dir) inside the worker, and the whole cold process
  (interpreter, imports, load) timed from outside;
- fidelity against float32 on the same inputs and the same noise: mean KL(float32 || x) of
  the CFG-combined next-token distribution and top-1 agreement over --teacher-positions
  teacher-forced positions (a fixed random token sequence); greedy decoding (CFG,
  repetition penalty, argmax) over --greedy-steps steps: identical prefix and position-wise
  agreement; S3Gen mel SNR (dB) and waveform log-spectral distance (dB) for the same tokens.

int8/int4 keep the float parts in float32 on the CPU backend (MLX's CPU quantized matmul
wants float32 activations) and in float16 elsewhere (--int-dtype). On the CPU backend,
float16/bfloat16 matmuls of many rows run 20-30x slower than float32, so the configurations
named by --light (default on CPU: float16,bfloat16) measure only decoding, one cold prefill,
memory, size and load; their fidelity comes from a GPU run. On CUDA, float32 matmuls would
use TF32 by default: workers run with MLX_ENABLE_TF32=0 (--tf32 to allow it).

Random weights are only a proxy for trained ones: fidelity figures say how far each format
moves the same network, not how speech quality changes.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from nightingale.blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()  # before MLX is imported: Debian's OpenBLAS under MLX's CPU backend

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402

CONFIGS = {  # name -> (quantize bits, dtype of the float parts; None: --int-dtype)
    "float32": (None, "float32"),
    "float16": (None, "float16"),
    "bfloat16": (None, "bfloat16"),
    "int8": (8, None),
    "int4": (4, None),
}
GROUP_SIZE = 64
TEXT = "Hello there, this is a short benchmark sentence for the precision table."
CFG_WEIGHT = 0.5
REPETITION_PENALTY = 1.2
MIN_P = 0.05
DECODE_WARMUP_STEPS = 4
TOKENS_PER_SECOND = 25
SPEECH_VOCAB = 6561
INPUT_SEED = 0
NOISE_SEED = 11
S3GEN_WARMUP_TOKENS = 8


# ---------------------------------------------------------------------------------------
# Workers (each prints one JSON line)


def worker_convert(args: argparse.Namespace) -> dict:
    from nightingale.models import cache

    bits, dtype = args.bits or None, args.dtype
    start = time.perf_counter()
    cache.convert(str(args.checkpoint), str(args.dir), quantize=bits, group_size=GROUP_SIZE, dtype=dtype)
    return {"convert_s": time.perf_counter() - start, "max_rss_mb": common.max_rss_mb()}


def worker_load(args: argparse.Namespace) -> dict:
    import mlx.core as mx

    from nightingale.models import load_model

    start = time.perf_counter()
    model = load_model(args.dir)
    mx.eval(model.t3.parameters())
    return {"load_s": time.perf_counter() - start, "since_start_s": time.perf_counter() - T_START}


def _greedy_decode(model, cond, text, steps: int) -> tuple[list[int], list[float]]:
    """Greedy T3 decoding at batch 2 (CFG): the tokens and the time each became available."""
    import mlx.core as mx

    from nightingale.models import t3 as t3_mod

    t3 = model.t3
    params = t3_mod.SamplingParams(cfg_weight=CFG_WEIGHT, temperature=0.0, repetition_penalty=REPETITION_PENALTY,
                                   min_p=MIN_P, top_p=1.0)
    vocab = mx.arange(t3.cfg.speech_tokens_dict_size)
    seen = vocab == t3.cfg.start_speech_token
    logits, cache = t3.prefill(t3.prepare_conditioning(cond), text, use_cfg=True)
    token = t3_mod.sample_token(logits, seen, params, None)
    mx.async_eval(token)
    tokens, times = [], []
    # pipelined as t3.generate_tokens: step i+1 is queued before token i is read; EOS is not
    # special here, so every configuration decodes the same number of steps
    for i in range(steps):
        if i + 1 < steps:
            seen = seen | (vocab == token)
            logits, cache = t3.step(token, i + 1, cache)
            next_token = t3_mod.sample_token(logits, seen, params, None)
            mx.async_eval(next_token)
        tokens.append(int(token.item()))
        times.append(time.perf_counter())
        if i + 1 < steps:
            token = next_token
    return tokens, times


def _s3gen(model, tokens: list[int], gen: dict, n_timesteps: int | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Fixed-noise S3Gen of `tokens`: (mel (80, 2N), wav (960 N,), flow s, HiFT s)."""
    import mlx.core as mx

    from nightingale.models.s3gen.flow import fixed_noise
    from nightingale.models.streaming import source_noise, source_phase

    flow, hift = model.s3gen.flow, model.s3gen.mel2wav
    n_frames = 2 * len(tokens)
    noise = fixed_noise(gen["prompt_feat"].shape[1] + n_frames, NOISE_SEED)
    start = time.perf_counter()
    mel = flow.inference(mx.array([tokens], dtype=mx.int32), gen["prompt_token"], gen["prompt_feat"], gen["embedding"],
                         noise=noise, n_timesteps=n_timesteps)
    mx.eval(mel)
    flow_s = time.perf_counter() - start
    n_harm = hift.cfg.nb_harmonics + 1
    start = time.perf_counter()
    source = hift.source(hift.f0(mel), phase=source_phase(NOISE_SEED, n_harm),
                         noise=source_noise(NOISE_SEED, 0, n_frames, n_harm))
    wav = hift.decode(mel, source)[0]
    mx.eval(wav)
    hift_s = time.perf_counter() - start
    return np.array(mel[0].astype(mx.float32)), np.array(wav.astype(mx.float32)), flow_s, hift_s


def worker_measure(args: argparse.Namespace) -> dict:
    import mlx.core as mx

    from nightingale.models import load_model
    from nightingale.models.quantize import quantized_layer_bytes
    from nightingale.models.tokenizer import wrap_text_tokens

    metrics = set(args.metrics.split(","))
    light = args.light
    on_cpu = mx.default_device() == mx.cpu
    start = time.perf_counter()
    model = load_model(args.dir)
    load_s = time.perf_counter() - start
    result: dict = {"load_s": load_s, "machine": common.machine(), "dtype": model.dtype, "quantize": model.quantize}
    result["mlx_weights_mb"] = common.mlx_memory_mb()["active"]
    quantized = [quantized_layer_bytes(m) for m in (model.t3, model.s3gen.flow)]
    result["quantized_bytes"] = {"t3": quantized[0], "flow": quantized[1]}
    common.reset_mlx_peak()

    rng = np.random.default_rng(INPUT_SEED)
    teacher = rng.integers(0, SPEECH_VOCAB, args.teacher_positions).tolist()
    s3_tokens = rng.integers(0, SPEECH_VOCAB, round(args.s3gen_seconds * TOKENS_PER_SECOND)).tolist()
    arrays: dict[str, np.ndarray] = {}
    conds = model.conds
    if conds is None:
        raise SystemExit("the checkpoint has no conds.pt (built-in voice): the benchmark needs one")
    text = mx.array(wrap_text_tokens(model.text_tokens(TEXT)), dtype=mx.int32)
    t3 = model.t3

    if "t3" in metrics or "fidelity" in metrics:
        result["prefill_positions"] = int(t3.prepare_conditioning(conds.t3).shape[1]) + int(text.shape[0]) + 2

        def prefill():
            logits, cache = t3.prefill(t3.prepare_conditioning(conds.t3), text, use_cfg=True)
            mx.eval(logits, *cache.state())

        _, cold = common.timed(prefill)
        result["prefill_cold_ms"] = cold * 1e3
        result["prefill_ms"] = cold * 1e3 if light else common.timed(prefill)[1] * 1e3
        steps = DECODE_WARMUP_STEPS + args.decode_steps + 1
        if "fidelity" in metrics and not light:
            steps = max(steps, args.greedy_steps)
        if not on_cpu:  # GPU kernels are JIT-compiled on first use: one short untimed run first
            _greedy_decode(model, conds.t3, text, DECODE_WARMUP_STEPS + 8)
        tokens, times = _greedy_decode(model, conds.t3, text, steps)
        timed = times[DECODE_WARMUP_STEPS : DECODE_WARMUP_STEPS + args.decode_steps + 1]
        result["decode_tok_s"] = common.rate(timed)
        result["decode_steps_timed"] = len(timed) - 1
        arrays["greedy"] = np.array(tokens[: args.greedy_steps], dtype=np.int64)

    if "fidelity" in metrics and not light:
        logits = t3.teacher_forced_logits(t3.prepare_conditioning(conds.t3), text, mx.array(teacher, dtype=mx.int32))
        combined = logits[0] + CFG_WEIGHT * (logits[0] - logits[1])  # (L, V): what the sampler starts from
        arrays["teacher_logits"] = np.array(combined[-len(teacher) - 1 : -1])  # position k predicts token k

    if ("s3gen" in metrics or "fidelity" in metrics) and not light:
        # warm-up, one CFM step: on the CPU a short prompt (allocator, compiled activations); on
        # a GPU the measured shapes, whose kernels are JIT-compiled on first use
        if on_cpu:
            short = dict(conds.gen, prompt_token=conds.gen["prompt_token"][:, -S3GEN_WARMUP_TOKENS:],
                         prompt_feat=conds.gen["prompt_feat"][:, -2 * S3GEN_WARMUP_TOKENS :])
            _s3gen(model, s3_tokens[:S3GEN_WARMUP_TOKENS], short, n_timesteps=1)
        else:
            _s3gen(model, s3_tokens, conds.gen, n_timesteps=1)
        mel, wav, flow_s, hift_s = _s3gen(model, s3_tokens, conds.gen)
        audio_s = len(wav) / model.sample_rate
        result.update(s3gen_flow_s=flow_s, s3gen_hift_s=hift_s, s3gen_audio_s=audio_s,
                      s3gen_rtf=(flow_s + hift_s) / audio_s, prompt_tokens=int(conds.gen["prompt_token"].shape[1]))
        arrays["mel"], arrays["wav"] = mel, wav

    result["mlx_peak_mb"] = common.mlx_memory_mb()["peak"]
    result["max_rss_mb"] = common.max_rss_mb()
    np.savez(args.arrays, **arrays)
    return result


# ---------------------------------------------------------------------------------------
# Driver


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fidelity(ref: dict, ours: dict) -> dict:
    """Fidelity of one configuration's arrays against float32's."""
    from nightingale.dev.metrics import log_spectral_distance, snr_db

    out: dict = {}
    if "teacher_logits" in ref and "teacher_logits" in ours:
        lp, lq = log_softmax(ref["teacher_logits"]), log_softmax(ours["teacher_logits"])
        out["kl"] = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
        out["top1"] = float((lp.argmax(-1) == lq.argmax(-1)).mean())
        out["positions"] = int(lp.shape[0])
    if "greedy" in ref and "greedy" in ours and len(ours["greedy"]) == len(ref["greedy"]):
        same = ref["greedy"] == ours["greedy"]
        out["greedy_prefix"] = int(len(same) if same.all() else np.argmin(same))
        out["greedy_agree"] = float(same.mean())
        out["greedy_steps"] = int(len(same))
    if "mel" in ref and "mel" in ours:
        out["mel_snr_db"] = snr_db(ref["mel"], ours["mel"])
        out["wav_lsd_db"] = log_spectral_distance(ref["wav"], ours["wav"])
    return out


def convert_all(args: argparse.Namespace, configs: list[tuple[str, int | None, str]], env: dict) -> dict[str, Path]:
    from nightingale.models import cache

    fingerprints = cache.source_fingerprints(args.checkpoint)
    dirs = {}
    for name, bits, dtype in configs:
        key = cache.cache_key(fingerprints, cache.settings(bits, GROUP_SIZE, dtype))
        target = args.cache / f"{name}-{dtype}-{key}"
        if not cache.is_converted(target):
            print(f"converting {name} ({dtype}) -> {target} ...", file=sys.stderr)
            r = common.run_worker([sys.executable, __file__, "--worker", "convert", "--checkpoint", str(args.checkpoint),
                                   "--dir", str(target), "--bits", str(bits or 0), "--dtype", dtype], env)
            print(f"  converted in {r['convert_s']:.1f} s (peak RSS {r['max_rss_mb']:.0f} MB)", file=sys.stderr)
        dirs[name] = target
    return dirs


def ensure_checkpoint(args: argparse.Namespace) -> None:
    if (args.checkpoint / "t3_cfg.safetensors").exists():
        return
    if not args.make_checkpoint:
        raise SystemExit(f"no checkpoint at {args.checkpoint} (pass --make-checkpoint to write a full random one)")
    from nightingale.dev.checkpoint import make_checkpoint

    print(f"writing a full-size random checkpoint (seed 0) to {args.checkpoint} ...", file=sys.stderr)
    make_checkpoint(args.checkpoint, "full", 0)


def default_cache() -> Path:
    """/work/bench-cache on the development machine, else a folder under the temp dir."""
    env = os.environ.get("NIGHTINGALE_BENCH_CACHE")
    if env:
        return Path(env)
    work = Path("/work")
    return work / "bench-cache" if work.is_dir() and os.access(work, os.W_OK) else Path(tempfile.gettempdir()) / "bench-cache"


def checkpoint_size(directory: Path) -> str:
    dims = directory / "dims.json"
    if not dims.exists():
        return "upstream layout, full size"
    d = json.loads(dims.read_text())
    return f"{d.get('size', 'full')}-size random weights, seed {d.get('seed', '?')}"


def table(rows: list[dict], int_dtype: str) -> str:
    by_name = {r["name"]: r for r in rows}
    half = by_name.get("float16", {}).get("decode_tok_s")
    headers = ["config", "decode tok/s", "vs float16", "prefill ms", "S3Gen s/s", "MLX weights MB", "MLX peak MB",
               "max RSS MB", "on disk MB", "load s (cold process)", "KL vs f32", "top-1", "greedy same prefix / agree",
               "mel SNR dB", "wav LSD dB"]
    out = []
    for r in rows:
        label = r["name"] if r["name"] in ("float32", "float16", "bfloat16") else f"{r['name']} ({int_dtype})"
        f = r.get("fidelity", {})
        ratio = r["decode_tok_s"] / half if half and r.get("decode_tok_s") else None
        greedy = (f"{f['greedy_prefix']} / {f['greedy_agree']:.2f}" if "greedy_prefix" in f else "-")
        prefill = common.fmt(r.get("prefill_ms"), 0) + (" (cold)" if r.get("light") and r.get("prefill_ms") else "")
        out.append([
            label, common.fmt(r.get("decode_tok_s")), f"{ratio:.2f}x" if ratio else "-", prefill,
            common.fmt(r.get("s3gen_rtf")), common.fmt(r.get("mlx_weights_mb"), 0), common.fmt(r.get("mlx_peak_mb"), 0),
            common.fmt(r.get("max_rss_mb"), 0), common.fmt(r.get("disk_mb"), 0),
            f"{common.fmt(r.get('load_s'))} ({common.fmt(r.get('cold_process_s'))})",
            common.fmt(f.get("kl"), 6) if "kl" in f else "-", common.fmt(f.get("top1"), 3) if "top1" in f else "-",
            greedy, common.fmt(f.get("mel_snr_db"), 1) if "mel_snr_db" in f else "-",
            common.fmt(f.get("wav_lsd_db"), 2) if "wav_lsd_db" in f else "-",
        ])
    return common.markdown_table(headers, out)


def quantized_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        qb = r.get("quantized_bytes", {})
        parts = []
        for comp in ("t3", "flow"):
            q, h = qb.get(comp, (0, 0))
            if h:
                parts.append(f"{comp} {q:,} of {h:,} bytes = {100 * q / h:.2f}%")
        if parts:
            total_q = sum(qb[c][0] for c in qb)
            total_h = sum(qb[c][1] for c in qb)
            lines.append(f"- {r['name']}: quantized layers vs the same layers in float16: " + "; ".join(parts)
                         + f"; together {100 * total_q / total_h:.2f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="precision / quantization benchmark (prints a markdown table)")
    parser.add_argument("--checkpoint", "--model", type=Path, default=Path("/work/ckpt-full"))
    parser.add_argument("--make-checkpoint", action="store_true", help="write a full random checkpoint if missing")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="converted models (reused while valid)")
    parser.add_argument("--configs", default="float32,float16,bfloat16,int8,int4")
    parser.add_argument("--metrics", default="t3,s3gen,fidelity", help="any of t3, s3gen, fidelity")
    parser.add_argument("--int-dtype", default="auto", help="float parts of int8/int4 (auto: float32 on CPU, else float16)")
    parser.add_argument("--light", default=None, help="configs measured without S3Gen/fidelity (default on CPU: float16,bfloat16)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--greedy-steps", type=int, default=100)
    parser.add_argument("--teacher-positions", type=int, default=200)
    parser.add_argument("--s3gen-seconds", type=float, default=2.0)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 float32 matmuls on CUDA")
    parser.add_argument("--convert-only", action="store_true", help="only convert the configurations")
    parser.add_argument("--out", type=Path,
                        help="also write the table and the results: a directory (precision.md, precision.json) or a .md path")
    parser.add_argument("--worker", choices=("convert", "load", "measure"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--arrays", help=argparse.SUPPRESS)
    parser.add_argument("--light-worker", dest="light_flag", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.light = args.light_flag
        common.emit({"convert": worker_convert, "load": worker_load, "measure": worker_measure}[args.worker](args))
        return

    import mlx.core as mx

    on_cpu = mx.default_device() == mx.cpu
    int_dtype = args.int_dtype if args.int_dtype != "auto" else ("float32" if on_cpu else "float16")
    light = set(filter(None, (args.light if args.light is not None else ("float16,bfloat16" if on_cpu else "")).split(",")))
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    configs = [(n, CONFIGS[n][0], CONFIGS[n][1] or int_dtype) for n in names]
    ensure_checkpoint(args)
    env = dict(os.environ)
    if not on_cpu and not args.tf32:
        env["MLX_ENABLE_TF32"] = "0"
    dirs = convert_all(args, configs, env)
    if args.convert_only:
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits, dtype in configs:
            print(f"measuring {name} ...", file=sys.stderr)
            start = time.perf_counter()
            common.run_worker([sys.executable, __file__, "--worker", "load", "--dir", str(dirs[name])], env)
            cold_process_s = time.perf_counter() - start
            arrays = Path(tmp) / f"{name}.npz"
            argv = [sys.executable, __file__, "--worker", "measure", "--dir", str(dirs[name]), "--metrics", args.metrics,
                    "--decode-steps", str(args.decode_steps), "--greedy-steps", str(args.greedy_steps),
                    "--teacher-positions", str(args.teacher_positions), "--s3gen-seconds", str(args.s3gen_seconds),
                    "--arrays", str(arrays)]
            if name in light:
                argv.append("--light-worker")
            r = common.run_worker(argv, env)
            r.update(name=name, bits=bits, light=name in light, cold_process_s=cold_process_s,
                     disk_mb=common.dir_bytes(dirs[name], ".safetensors") / common.MB)
            r["arrays"] = dict(np.load(arrays))
            rows.append(r)
            print(f"  {json.dumps({k: v for k, v in r.items() if k not in ('arrays', 'machine')})}", file=sys.stderr)

    ref = next((r for r in rows if r["name"] == "float32"), None)
    for r in rows:
        if ref is not None and r is not ref and "fidelity" in args.metrics:
            r["fidelity"] = fidelity(ref["arrays"], r["arrays"])
    for r in rows:
        del r["arrays"]

    info = rows[0]["machine"]
    lines = [
        f"Machine: {common.describe_machine(info)}" + ("" if on_cpu or args.tf32 else "; MLX_ENABLE_TF32=0"),
        f"Checkpoint: {args.checkpoint} ({checkpoint_size(args.checkpoint)}); text {len(TEXT)} chars "
        f"(prefill {rows[0].get('prefill_positions', '-')} positions, batch 2 with CFG); "
        f"decode: {args.decode_steps} greedy steps timed after {DECODE_WARMUP_STEPS}; S3Gen: {args.s3gen_seconds:g} s of "
        f"random tokens after a built-in voice prompt of {rows[0].get('prompt_tokens', '-')} tokens, 10 CFM steps.",
        f"int8/int4: MLX affine quantization, group size {GROUP_SIZE}, float parts in {int_dtype}.",
        f"Fidelity vs float32 (same inputs, same noise): KL and top-1 over {args.teacher_positions} teacher-forced "
        f"positions; greedy over {args.greedy_steps} steps. Random weights are only a proxy for trained ones: these "
        "figures say how far each format moves the same network, not how speech quality changes.",
    ]
    if light:
        lines.append(f"Light configs ({', '.join(sorted(light))}): decode, one cold prefill, memory, size and load only "
                     "(on the CPU backend MLX's float16/bfloat16 matmuls of many rows are 20-30x slower than float32).")
    lines += ["", table(rows, int_dtype), "", "Quantized layers (weights + scales + biases) against float16:"]
    lines += quantized_lines(rows)
    text = "\n".join(lines)
    print(text)
    if args.out:
        md = args.out if args.out.suffix == ".md" else args.out / "precision.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text + "\n")
        results = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        md.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
