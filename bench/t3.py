"""T3 speed and memory: our MLX port (float32 / float16 / bfloat16) against the PyTorch
reference on the same machine, in the same run. Prints a markdown table.

    .venv/bin/python bench/t3.py [CHECKPOINT_DIR] [--tokens 8] [--dtypes float32,bfloat16]

CHECKPOINT_DIR holds t3_cfg.safetensors (and optionally dims.json; without one the full
upstream dimensions are assumed). Without it, full-size random weights are written to a
temporary directory first (2.1 GB; seed 0).

What is measured, per configuration, each in its own process (clean peak memory):
- prefill ms: conditioning + prefill of [cond | text | BOS | BOS] (batch 2, CFG) up to the
  first sampled token;
- decode tokens/s: the steady gap between successive tokens of the public generator
  (batch 2 CFG, one token at a time, sampler included), after one warm-up generation;
- peak memory: mx.get_peak_memory during generation, and the process's maximum RSS
  (which includes loading).
The reference runs upstream's own `T3.inference` loop in .ref-venv (tools/make_reference_env.sh) with one thread; its
token times are taken at each `torch.multinomial` call (sampling is left intact).

On Linux, MLX's bundled CPU BLAS is slow; Debian's OpenBLAS (libopenblas0-pthread) is
LD_PRELOADed into the MLX workers when present (see the table's header; --no-openblas to
disable). Real-time figures come from the GPU; CPU figures are for ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py (no MLX at import)

REPO = Path(__file__).resolve().parent.parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
TEXT = "Hello there, this is a short benchmark sentence."
PROMPT_TOKENS = 150
SAMPLER = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


# ---------------------------------------------------------------------------------------
# Workers (each prints one JSON line)


def worker_ours(ckpt: Path | None, dtype_name: str, inputs: dict, tokens: int, bits: int | None) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from nightingale.models.conds import T3Cond
    from nightingale.models.t3 import T3, T3Config, convert_weights, generate_tokens, upstream_shapes

    dims_file = ckpt / "dims.json" if ckpt else None
    cfg = T3Config.from_dict(json.loads(dims_file.read_text())["t3"]) if dims_file and dims_file.exists() else T3Config.full()
    t_load = time.perf_counter()
    model = T3(cfg)
    if ckpt is not None:
        weights = mx.load(str(ckpt / "t3_cfg.safetensors"))  # straight into MLX: no numpy copy
        shapes = upstream_shapes(cfg)
        assert set(weights) == set(shapes) and all(tuple(weights[k].shape) == shapes[k] for k in shapes)
        model.load_weights(list(convert_weights(weights, cfg).items()), strict=True)
        del weights
    # else (--random-init): the layers' own random initialisation; values do not matter for speed.
    model.set_dtype(getattr(mx, dtype_name))
    if bits:
        from nightingale.models.quantize import t3_predicate

        nn.quantize(model, group_size=64, bits=bits, class_predicate=t3_predicate(64))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t_load

    cond = T3Cond(
        speaker_emb=mx.array(np.array(inputs["speaker_emb"], dtype=np.float32)),
        cond_prompt_speech_tokens=mx.array(np.array(inputs["prompt_tokens"], dtype=np.int32)),
        emotion_adv=mx.full((1, 1, 1), 0.5),
    )

    def run(n: int) -> list[float]:
        start = time.perf_counter()
        times = [start]
        for _ in generate_tokens(model, cond, inputs["text_ids"], max_new_tokens=n, seed=0, **SAMPLER):
            times.append(time.perf_counter())
        return times

    run(2)  # warm-up: allocator, first-use paths
    mx.reset_peak_memory()
    times = run(tokens + 1)
    return {
        "impl": f"MLX {dtype_name}" + (f" int{bits} (group 64)" if bits else ""),
        "load_s": load_s,
        "prefill_ms": (times[1] - times[0]) * 1e3,
        "decode_tok_s": decode_rate(times[1:]),
        "tokens": len(times) - 1,
        "mx_peak_mb": mx.get_peak_memory() / 2**20,
        "max_rss_mb": max_rss_mb(),
        "device": str(mx.default_device()),
    }


def worker_reference(ckpt: Path, inputs: dict, tokens: int, device: str = "cpu") -> dict:
    import torch
    from safetensors.torch import load_file

    if device != "cpu":
        common.import_reference_t3_only()
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if (ckpt / "dims.json").exists() and json.loads((ckpt / "dims.json").read_text())["t3"]["hidden_size"] != 1024:
        raise SystemExit("the reference worker runs full-size checkpoints only")
    t_load = time.perf_counter()
    t3 = T3()
    t3.load_state_dict(load_file(str(ckpt / "t3_cfg.safetensors")), strict=True)
    t3.to(device).eval()
    load_s = time.perf_counter() - t_load
    text = torch.tensor([[255] + inputs["text_ids"] + [0]] * 2, dtype=torch.long, device=device)

    def run(n: int) -> list[float]:
        times = []
        real_multinomial = torch.multinomial

        def timed_multinomial(probs, num_samples=1):
            times.append(time.perf_counter())
            return real_multinomial(probs, num_samples)

        cond = T3Cond(speaker_emb=torch.tensor(inputs["speaker_emb"], device=device),
                      cond_prompt_speech_tokens=torch.tensor(inputs["prompt_tokens"], device=device),
                      emotion_adv=0.5 * torch.ones(1, 1, 1, device=device))
        torch.manual_seed(0)
        torch.multinomial = timed_multinomial
        try:
            start = time.perf_counter()
            t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=n, **SAMPLER)
        finally:
            torch.multinomial = real_multinomial
        return [start] + times

    run(2)
    times = run(tokens + 1)
    return {
        "impl": "reference (torch fp32, 1 thread)" if device == "cpu" else f"reference (torch fp32, {device})",
        "load_s": load_s,
        "prefill_ms": (times[1] - times[0]) * 1e3,
        "decode_tok_s": decode_rate(times[1:]),
        "tokens": len(times) - 1,
        "mx_peak_mb": float("nan"),
        "max_rss_mb": max_rss_mb(),
        "device": device,
    }


# ---------------------------------------------------------------------------------------
# Driver


def write_random_checkpoint(out: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import random_weights
    from nightingale.models.t3 import T3Config, upstream_shapes

    weights = random_weights(upstream_shapes(T3Config.full()), np.random.default_rng(0))
    save_file(weights, str(out / "t3_cfg.safetensors"))


def bench_inputs(ckpt: Path) -> dict:
    import numpy as np

    from nightingale.models.tokenizer import EnTokenizer, punc_norm, write_stand_in_tokenizer_json

    tok_path = ckpt / "tokenizer.json"
    if not tok_path.exists():
        tok_path = write_stand_in_tokenizer_json(Path(tempfile.mkdtemp()) / "tokenizer.json")
    rng = np.random.default_rng(0)
    speaker = np.abs(rng.standard_normal((1, 256)))
    return {
        "speaker_emb": (speaker / np.linalg.norm(speaker)).tolist(),
        "prompt_tokens": rng.integers(0, 6561, size=(1, PROMPT_TOKENS)).tolist(),
        "text_ids": EnTokenizer(tok_path).encode(punc_norm(TEXT)),
    }


def run_worker(python: str, args: list[str], env: dict) -> dict:
    proc = subprocess.run([python, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {args[:2]} failed with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="T3 benchmark (prints a markdown table)")
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--no-openblas", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--random-init", action="store_true",
                        help="no checkpoint: full-size T3 with MLX's own random init (MLX only; for GPU machines)")
    parser.add_argument("--bits", default="", help="also run these quantized widths, e.g. 8 or 8,4 (float32 activations)")
    parser.add_argument("--reference-python", default=common.REFERENCE_PYTHON)
    parser.add_argument("--reference-device", default="cpu", help="torch device of the reference (cpu, cuda)")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        inputs = json.loads(Path(args.inputs).read_text())
        if args.worker == "ours":
            ckpt = None if args.random_init else args.checkpoint
            result = worker_ours(ckpt, args.dtype, inputs, args.tokens, int(args.bits) if args.bits else None)
        else:
            result = worker_reference(args.checkpoint, inputs, args.tokens, args.reference_device)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if args.random_init:
            args.no_reference = True
            ckpt = Path(tmp)
        elif ckpt is None:
            ckpt = Path(tmp)
            print("writing full-size random T3 weights (2.1 GB) ...", file=sys.stderr)
            write_random_checkpoint(ckpt)
        inputs_file = Path(tmp) / "inputs.json"
        inputs = bench_inputs(ckpt)
        inputs_file.write_text(json.dumps(inputs))
        worker_args = [str(ckpt), "--tokens", str(args.tokens), "--inputs", str(inputs_file)]
        if args.random_init:
            worker_args.append("--random-init")

        mlx_env = dict(os.environ)
        if not args.no_openblas and "LD_PRELOAD" not in mlx_env and Path(OPENBLAS).exists():
            mlx_env["LD_PRELOAD"] = OPENBLAS
        openblas = "openblas" in mlx_env.get("LD_PRELOAD", "")
        rows = []
        if not args.no_reference:
            ref_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            ref_env.pop("LD_PRELOAD", None)
            print("reference ...", file=sys.stderr)
            rows.append(run_worker(args.reference_python, ["--worker", "reference", "--reference-device",
                                                           args.reference_device, *worker_args], ref_env))
        for dtype in args.dtypes.split(","):
            print(f"MLX {dtype} ...", file=sys.stderr)
            rows.append(run_worker(sys.executable, ["--worker", "ours", "--dtype", dtype, *worker_args], mlx_env))
        for bits in filter(None, args.bits.split(",")):
            print(f"MLX int{bits} ...", file=sys.stderr)
            rows.append(run_worker(sys.executable, ["--worker", "ours", "--dtype", "float32", "--bits", bits, *worker_args], mlx_env))

    ref = rows[0] if not args.no_reference else None
    print(f"T3 on {platform.machine()} {platform.system()}, MLX device {rows[-1]['device']}, "
          f"OpenBLAS LD_PRELOAD for MLX: {'yes' if openblas else 'no'}; text {len(inputs['text_ids'])} tokens "
          f"(prefill {len(inputs['text_ids']) + 38} positions, batch 2 CFG), {args.tokens} decode steps timed.\n")
    print("| implementation | prefill ms | decode tok/s | decode vs reference | mx peak MB | max RSS MB | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        peak = "-" if r["mx_peak_mb"] != r["mx_peak_mb"] else f"{r['mx_peak_mb']:.0f}"
        print(f"| {r['impl']} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.2f} | {ratio} | {peak} | "
              f"{r['max_rss_mb']:.0f} | {r['load_s']:.1f} |")


if __name__ == "__main__":
    main()
