"""Cost of one streaming S3Gen call, and where it goes: op counts, host vs device time,
compiled vs eager CFM steps, the number of CFM steps as a trade against mel fidelity.

    python bench/cfm.py --model CKPT [--quantize 8] [--dtype float16] [--out DIR]

For the steady streaming window (built-in voice prompt | 24 context | 48 new | 3 lookahead
tokens) and the first-chunk window (prompt | first + 3 tokens):
- ops per CFM step: nodes of one step's lazy graph (mx.export_to_dot), eager;
- host ms per step: Python time to build one step's graph (nothing evaluated), eager;
- step ms: one evaluated step, eager and compiled (flow.COMPILE_STEP), after warm-up;
- trace ms: the first compiled call of a new shape (tracing + kernel builds);
- call ms: a whole flow.inference of the window (encoder + k CFM steps), eager and compiled,
  and HiFT on a steady window (16 context + 96 new + 16 held-back frames);
- mel SNR of k steps against 10 on the same tokens and noise (compiled vs eager too).
Random tokens; random weights are a proxy for trained ones (speed depends on shapes only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

STEADY = (24, 48)  # context, new tokens
REPEATS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", default="8", help="8, 4 or none")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--first", type=int, default=16, help="first-chunk tokens")
    parser.add_argument("--steps", default="10,8,6,5,4,3")
    parser.add_argument("--no-compile", action="store_true", help="eager only (CPU smoke runs: compiling takes minutes there)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()
    import mlx.core as mx
    import numpy as np

    import common
    from nightingale.dev.metrics import snr_db
    from nightingale.models import load_model
    from nightingale.models.s3gen import flow as flow_mod
    from nightingale.models.streaming import LOOKAHEAD_TOKENS, _prompt, speech_noise, source_noise, source_phase

    model = load_model(args.model, quantize=None if args.quantize == "none" else int(args.quantize), dtype=args.dtype)
    flow, hift = model.s3gen.flow, model.s3gen.mel2wav
    gen = model.resolve_voice(None).gen
    prompt_token, prompt_feat = _prompt(gen, None)
    rng = np.random.default_rng(0)
    result: dict = {"machine": common.machine(), "quantize": args.quantize, "dtype": model.dtype,
                    "prompt_tokens": int(prompt_token.shape[1])}

    def window(n_tokens: int):
        tokens = mx.array([rng.integers(0, 6561, n_tokens).tolist()], dtype=mx.int32)
        noise = mx.concatenate([flow_mod.fixed_noise(prompt_feat.shape[1], 1), speech_noise(1, 0, n_tokens)], axis=2)
        return tokens, noise

    def call(tokens, noise, steps=10) -> mx.array:
        mel = flow.inference(tokens, prompt_token, prompt_feat, gen["embedding"], noise=noise, n_timesteps=steps)
        mx.eval(mel)
        return mel

    def timed(fn, repeats=REPEATS) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    shapes = {"steady": sum(STEADY) + LOOKAHEAD_TOKENS, "first": args.first + LOOKAHEAD_TOKENS}
    for name, n_tokens in shapes.items():
        tokens, noise = window(n_tokens)
        row: dict = {"tokens": n_tokens, "frames": 2 * (n_tokens + int(prompt_token.shape[1]))}
        # inputs of one CFM step, as solve_euler builds them
        mu, _ = flow.encode(mx.concatenate([prompt_token, tokens], axis=1))
        total = mu.shape[2]
        cond = mx.concatenate([prompt_feat.transpose(0, 2, 1),
                               mx.zeros((1, 80, total - prompt_feat.shape[1]), dtype=mu.dtype)], axis=2)
        spks = flow.speaker_projection(gen["embedding"])
        mu_in, _, spks_in, cond_in = flow.decoder.conditioning(mu, None, spks, cond)
        x = noise.astype(mx.float32)
        t, r = mx.array(0.5, dtype=mx.float32), mx.array(0.6, dtype=mx.float32)
        mx.eval(mu_in, spks_in, cond_in, x)
        cfm = flow.decoder
        eager = cfm.euler_step
        with tempfile.NamedTemporaryFile("r", suffix=".dot") as dot:
            mx.export_to_dot(dot.name, eager(x, t, r, mu_in, spks_in, cond_in))
            text = dot.read()
            row["ops_per_step"] = sum(1 for line in text.splitlines() if "->" not in line and "label" in line
                                      and "shape=box" not in line) or text.count("label")
        for _ in range(3):
            mx.eval(eager(x, t, r, mu_in, spks_in, cond_in))
        row["host_ms_per_step"] = timed(lambda: eager(x, t, r, mu_in, spks_in, cond_in), 10)
        row["eager_step_ms"] = timed(lambda: mx.eval(eager(x, t, r, mu_in, spks_in, cond_in)), 10)
        modes = ("off",) if args.no_compile else ("off", "on")
        row["call_ms_compiled"] = row["compiled_step_ms"] = row["trace_ms"] = float("nan")
        for mode in modes:
            flow_mod.COMPILE_STEP = mode
            call(tokens, noise)  # warm (and trace once when compiled)
            call(tokens, noise)
            row[f"call_ms_{'compiled' if mode == 'on' else 'eager'}"] = timed(lambda: call(tokens, noise))
        flow_mod.COMPILE_STEP = "auto"
        result[name] = row
        if args.no_compile:
            print(name, json.dumps(row), flush=True)
            continue
        compiled = mx.compile(cfm.euler_step)
        t0 = time.perf_counter()
        y_c = compiled(x, t, r, mu_in, spks_in, cond_in)
        mx.eval(y_c)
        row["trace_ms"] = (time.perf_counter() - t0) * 1000
        row["compiled_step_ms"] = timed(lambda: mx.eval(compiled(x, t, r, mu_in, spks_in, cond_in)), 10)
        y_e = eager(x, t, r, mu_in, spks_in, cond_in)
        row["compiled_vs_eager_max_abs"] = float(mx.max(mx.abs(y_c - y_e)))
        print(name, json.dumps(row), flush=True)

    # HiFT on a steady window: 16 context + 96 new + 16 held back frames
    n_frames = 16 + 96 + 16
    mel = mx.array(rng.standard_normal((1, 80, n_frames)).astype(np.float32) - 4)
    n_harm = hift.cfg.nb_harmonics + 1

    def vocode():
        f0 = hift.f0(mel)
        src = hift.source(f0, phase=source_phase(1, n_harm), noise=source_noise(1, 0, n_frames, n_harm))
        mx.eval(hift.decode(mel, src))

    vocode()
    result["hift_steady_ms"] = timed(vocode)

    # CFM steps as a trade: mel SNR of k steps against 10, same tokens and noise (steady window)
    tokens, noise = window(shapes["steady"])
    flow_mod.COMPILE_STEP = "off"
    ten = np.array(call(tokens, noise, 10))
    result["mel_snr_compiled_vs_eager_db"] = float("nan")
    if not args.no_compile:
        flow_mod.COMPILE_STEP = "on"
        result["mel_snr_compiled_vs_eager_db"] = snr_db(ten, np.array(call(tokens, noise, 10)))
    flow_mod.COMPILE_STEP = "auto"
    trade = []
    for k in [int(s) for s in args.steps.split(",")]:
        call(tokens, noise, k)
        ms = timed(lambda: call(tokens, noise, k))
        trade.append({"steps": k, "call_ms": ms, "mel_snr_vs_10_db": snr_db(ten, np.array(call(tokens, noise, k)))})
    result["steps"] = trade
    result["peak_memory_gb"] = mx.get_peak_memory() / 1e9

    table = render(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cfm.json").write_text(json.dumps(result, indent=2))
        (out / "cfm.md").write_text(table + "\n")
    return 0


def render(r: dict) -> str:
    from common import describe_machine

    lines = [f"Machine: {describe_machine(r['machine'])}; quantize {r['quantize']}, dtype {r['dtype']}, "
             f"prompt {r['prompt_tokens']} tokens", "",
             "| window | tokens (frames) | ops/step | host ms/step (eager) | step ms eager | step ms compiled | trace ms "
             "| call ms eager | call ms compiled |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("first", "steady"):
        w = r[name]
        lines.append(f"| {name} | {w['tokens']} ({w['frames']}) | {w['ops_per_step']} | {w['host_ms_per_step']:.2f} "
                     f"| {w['eager_step_ms']:.2f} | {w['compiled_step_ms']:.2f} | {w['trace_ms']:.0f} "
                     f"| {w['call_ms_eager']:.1f} | {w['call_ms_compiled']:.1f} |")
    lines += ["", f"HiFT, steady window (128 frames): {r['hift_steady_ms']:.1f} ms; "
              f"compiled vs eager 10-step mel SNR {r['mel_snr_compiled_vs_eager_db']:.1f} dB", "",
              "| CFM steps | steady call ms (default compile) | mel SNR vs 10 steps dB |", "|---:|---:|---:|"]
    for s in r["steps"]:
        lines.append(f"| {s['steps']} | {s['call_ms']:.1f} | {s['mel_snr_vs_10_db']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
