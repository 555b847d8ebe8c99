"""S3Gen speed: seconds of compute per second of audio, encoder+flow and HiFT separately, ours
(MLX, float32 / float16) against the PyTorch reference on the same machine, in the same run.

    .venv/bin/python bench/s3gen.py [CHECKPOINT] [--seconds 1,4,10] [--dtypes float32,float16]
        [--no-reference] [--half-cfm-steps 1] [--out s3gen.md]

CHECKPOINT (default /work/ckpt-full) holds s3gen.safetensors, conds.pt and dims.json (a
full-size random one: `nightingale dev make-checkpoint DIR --size full`). Every row runs in
its own process (clean peak memory):
- ours: S3Gen built from s3gen.safetensors as load_model builds it (the flow cast to the
  dtype; HiFT stays float32), the checkpoint's built-in voice (conds.pt) as prompt;
- reference: chatterbox's S3Gen in /work/ref-venv, one thread (OMP_NUM_THREADS=1), loaded from
  the same s3gen.safetensors, `flow_inference(..., finalize=True)` then `hift_inference`.
For each length, random speech tokens (the same for every row) are rendered once after a
short warm-up (a 10-token prompt, one CFM step); "encoder+flow" is token -> mel (conformer encoder + 10 CFM steps of the
estimator, prompt included, as the reference runs it), "HiFT" is mel -> waveform.

On the CPU backend MLX's float16 matmuls of many rows run 20-30x slower than float32 (no
BLAS), so a float16 row there runs only --half-seconds lengths, with --half-cfm-steps CFM
steps, and its flow time is extrapolated to 10 steps as encoder + 10 x (one step) (every
step is the same computation on the same shapes); such cells are marked "~".
"""

from __future__ import annotations

import sys
from pathlib import Path


def _reference_worker() -> bool:
    return "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1 :][:1] == ["reference"]


if not _reference_worker():  # the reference worker runs torch in its own venv, without nightingale
    from nightingale.blas import reexec_with_openblas

    reexec_with_openblas()  # before MLX is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402

TOKENS_PER_SECOND = 25
SPEECH_VOCAB = 6561
WARMUP_TOKENS = 10
N_TIMESTEPS = 10
TOKEN_SEED = 0
REFERENCE_OPTIONAL_KEYS = {"tokenizer._mel_filters", "tokenizer.window"}


def token_sets(seconds: list[float]) -> dict[str, list[int]]:
    rng = np.random.default_rng(TOKEN_SEED)
    sets = {"warmup": rng.integers(0, SPEECH_VOCAB, WARMUP_TOKENS).tolist()}
    for s in seconds:
        sets[f"{s:g}"] = rng.integers(0, SPEECH_VOCAB, round(s * TOKENS_PER_SECOND)).tolist()
    return sets


# ---------------------------------------------------------------------------------------
# Workers (each prints one JSON line)


def worker_ours(ckpt: Path, dtype: str, inputs: dict, cfm_steps: int, lengths: list[str]) -> dict:
    import mlx.core as mx

    from nightingale.models import loading, torchpickle
    from nightingale.models.model import DTYPES
    from nightingale.models.s3gen import s3gen as s3gen_mod
    from nightingale.models.s3gen.flow import fixed_noise
    from nightingale.models.streaming import source_noise, source_phase

    start = time.perf_counter()
    dims = json.loads((ckpt / "dims.json").read_text()) if (ckpt / "dims.json").exists() else {}
    cfg = s3gen_mod.S3GenConfig.from_dict(dims.get("s3gen"))
    model = s3gen_mod.S3Gen(cfg)
    model.load_upstream(loading.read_safetensors(ckpt / "s3gen.safetensors"))
    if dtype != "float32":
        model.flow.set_dtype(DTYPES[dtype])  # as load_model: the flow only; HiFT stays float32
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    gen = torchpickle.load_conds(ckpt / "conds.pt").gen
    flow, hift = model.flow, model.mel2wav
    n_harm = hift.cfg.nb_harmonics + 1

    def render(tokens: list[int], steps: int, prompt_tokens: int | None = None) -> dict:
        token = mx.array([tokens], dtype=mx.int32)
        p = gen["prompt_token"].shape[1] if prompt_tokens is None else prompt_tokens
        prompt_token, prompt_feat = gen["prompt_token"][:, -p:], gen["prompt_feat"][:, -2 * p :]
        noise = fixed_noise(prompt_feat.shape[1] + 2 * len(tokens), seed=1)
        t0 = time.perf_counter()
        mel = flow.inference(token, prompt_token, prompt_feat, gen["embedding"], noise=noise, n_timesteps=steps)
        mx.eval(mel)
        t1 = time.perf_counter()
        source = hift.source(hift.f0(mel), phase=source_phase(1, n_harm), noise=source_noise(1, 0, mel.shape[2], n_harm))
        wav = hift.decode(mel, source)
        mx.eval(wav)
        t2 = time.perf_counter()
        return {"flow_s": t1 - t0, "hift_s": t2 - t1, "samples": int(wav.shape[-1])}

    def encode_s(tokens: list[int]) -> float:
        all_tokens = mx.concatenate([gen["prompt_token"].astype(mx.int32), mx.array([tokens], dtype=mx.int32)], axis=1)
        t0 = time.perf_counter()
        mx.eval(flow.encode(all_tokens)[0])
        return time.perf_counter() - t0

    # warm-up (allocator, compiled activations) on a short prompt and one CFM step: cheap even
    # where the measured rows are slow
    render(inputs["warmup"], 1, prompt_tokens=WARMUP_TOKENS)
    rows = []
    for key in lengths:
        tokens = inputs[key]
        if mx.default_device() != mx.cpu:
            render(tokens, 1)  # GPU kernels are JIT-compiled per shape on first use
        common.reset_mlx_peak()
        r = render(tokens, cfm_steps)
        r["seconds"] = float(key)
        r["audio_s"] = r["samples"] / 24000
        if cfm_steps != N_TIMESTEPS:
            # flow = encoder + steps x estimator: scale the measured steps to the full count
            enc = encode_s(tokens)
            r["encoder_s"] = enc
            r["flow_measured_s"] = r["flow_s"]
            r["flow_s"] = enc + (r["flow_s"] - enc) * N_TIMESTEPS / cfm_steps
            r["estimated"] = True
        r["mlx_peak_mb"] = common.mlx_memory_mb()["peak"]
        rows.append(r)
    return {"impl": "ours", "dtype": dtype, "cfm_steps": cfm_steps, "load_s": load_s, "rows": rows,
            "max_rss_mb": common.max_rss_mb(), "prompt_tokens": int(gen["prompt_token"].shape[1]),
            "machine": common.machine()}


def worker_reference(ckpt: Path, inputs: dict, lengths: list[str]) -> dict:
    import torch
    from safetensors.torch import load_file

    from chatterbox.models.s3gen import S3Gen

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    dims = json.loads((ckpt / "dims.json").read_text()) if (ckpt / "dims.json").exists() else {}
    if dims.get("size", "full") != "full":
        raise SystemExit("the reference worker runs full-size checkpoints only")
    start = time.perf_counter()
    model = S3Gen()
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "s3gen.safetensors")), strict=False)
    if unexpected or set(missing) - REFERENCE_OPTIONAL_KEYS:
        raise SystemExit(f"reference load: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    load_s = time.perf_counter() - start
    gen = torch.load(str(ckpt / "conds.pt"), map_location="cpu", weights_only=True)["gen"]

    def render(tokens: list[int], ref_dict: dict = gen, n_cfm_timesteps: int | None = None) -> dict:
        token = torch.tensor([tokens], dtype=torch.long)
        t0 = time.perf_counter()
        mel = model.flow_inference(token, ref_dict=dict(ref_dict), finalize=True, n_cfm_timesteps=n_cfm_timesteps)
        t1 = time.perf_counter()
        wav, _ = model.hift_inference(mel, None)
        t2 = time.perf_counter()
        return {"flow_s": t1 - t0, "hift_s": t2 - t1, "samples": int(wav.shape[-1])}

    short = dict(gen, prompt_token=gen["prompt_token"][:, -WARMUP_TOKENS:], prompt_feat=gen["prompt_feat"][:, -2 * WARMUP_TOKENS :],
                 prompt_token_len=torch.tensor([WARMUP_TOKENS]), prompt_feat_len=None)
    render(inputs["warmup"], short, 1)  # warm-up, as ours
    rows = []
    for key in lengths:
        r = render(inputs[key])
        r["seconds"] = float(key)
        r["audio_s"] = r["samples"] / 24000
        rows.append(r)
    return {"impl": "reference", "dtype": "float32", "load_s": load_s, "rows": rows, "max_rss_mb": common.max_rss_mb(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------
# Driver


def render_table(results: list[dict], checkpoint: Path, half_cfm_steps: int) -> str:
    """The markdown report of the workers' results (reference first when present)."""
    ref_result = next((r for r in results if r["impl"] == "reference"), None)
    ref = {r["seconds"]: r for r in ref_result["rows"]} if ref_result else {}
    headers = ["implementation", "audio s", "encoder+flow s/s", "HiFT s/s", "total s/s", "flow vs ref", "HiFT vs ref",
               "total vs ref", "MLX peak MB", "max RSS MB"]
    table_rows = []
    for res in results:
        name = "reference (torch fp32, 1 thread)" if res["impl"] == "reference" else f"MLX {res['dtype']}"
        for r in res["rows"]:
            mark = "~" if r.get("estimated") else ""  # the flow (and so the total) was extrapolated
            flow, hift = r["flow_s"] / r["audio_s"], r["hift_s"] / r["audio_s"]
            base = ref.get(r["seconds"]) if res["impl"] != "reference" else None

            def ratio(ours: float, theirs: float | None, prefix: str = "") -> str:
                # above 1: faster than the reference
                return f"{prefix}{theirs / ours:.2f}x" if theirs else "-"

            table_rows.append([
                name, f"{r['audio_s']:g}", f"{mark}{flow:.2f}", f"{hift:.2f}", f"{mark}{flow + hift:.2f}",
                ratio(r["flow_s"], base and base["flow_s"], mark), ratio(r["hift_s"], base and base["hift_s"]),
                ratio(r["flow_s"] + r["hift_s"], base and base["flow_s"] + base["hift_s"], mark),
                common.fmt(r.get("mlx_peak_mb"), 0), common.fmt(res["max_rss_mb"], 0),
            ])
    ours_first = next(r for r in results if r["impl"] == "ours")
    lines = [
        f"Machine: {common.describe_machine(ours_first['machine'])}",
        f"Checkpoint: {checkpoint}; built-in voice prompt {ours_first['prompt_tokens']} tokens "
        f"({ours_first['prompt_tokens'] / TOKENS_PER_SECOND:.1f} s) re-encoded with every render, as the reference does; "
        f"{N_TIMESTEPS} CFM steps; random speech tokens; one render per length after a short warm-up.",
        "s/s: seconds of compute per second of audio (lower is better); vs ref: reference time / ours (above 1: faster).",
    ]
    if any(r.get("estimated") for res in results for r in res["rows"]):
        lines.append(f"~: flow extrapolated from {half_cfm_steps} CFM step(s) as encoder + {N_TIMESTEPS} x step "
                     "(MLX's CPU float16 matmuls are too slow to run all steps here).")
    lines += ["", common.markdown_table(headers, table_rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="S3Gen speed against the reference (prints a markdown table)")
    parser.add_argument("checkpoint", nargs="?", type=Path, default=Path("/work/ckpt-full"))
    parser.add_argument("--seconds", default="1,4,10")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reference-python", default=common.REFERENCE_PYTHON)
    parser.add_argument("--half-seconds", default="1", help="lengths a half-precision row runs on the CPU backend")
    parser.add_argument("--half-cfm-steps", type=int, default=1, help="CFM steps a half-precision row runs on the CPU backend")
    parser.add_argument("--out", type=Path, help="also write the table here (.md) and the results beside it (.json)")
    parser.add_argument("--table-from", type=Path, help="print the table of an earlier run's .json and exit")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--cfm-steps", type=int, default=N_TIMESTEPS, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        inputs = json.loads(Path(args.inputs).read_text())
        lengths = args.lengths.split(",")
        if args.worker == "ours":
            common.emit(worker_ours(args.checkpoint, args.dtype, inputs, args.cfm_steps, lengths))
        else:
            common.emit(worker_reference(args.checkpoint, inputs, lengths))
        return

    if args.table_from:
        print(render_table(json.loads(args.table_from.read_text()), args.checkpoint, args.half_cfm_steps))
        return

    import mlx.core as mx

    on_cpu = mx.default_device() == mx.cpu
    seconds = [float(s) for s in args.seconds.split(",")]
    keys = [f"{s:g}" for s in seconds]
    half_keys = [f"{float(s):g}" for s in args.half_seconds.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs_file = Path(tmp) / "inputs.json"
        inputs_file.write_text(json.dumps(token_sets(seconds + [float(k) for k in half_keys])))
        common_args = [str(args.checkpoint), "--inputs", str(inputs_file)]
        if not args.no_reference:
            print("reference ...", file=sys.stderr)
            results.append(common.run_worker([args.reference_python, __file__, "--worker", "reference", *common_args,
                                              "--lengths", ",".join(keys)], common.reference_env()))
        for dtype in args.dtypes.split(","):
            slow = on_cpu and dtype != "float32"
            lengths = [k for k in keys if k in half_keys] if slow else keys
            steps = args.half_cfm_steps if slow else N_TIMESTEPS
            print(f"ours {dtype} ({','.join(lengths)} s, {steps} CFM steps) ...", file=sys.stderr)
            results.append(common.run_worker([sys.executable, __file__, "--worker", "ours", "--dtype", dtype, *common_args,
                                              "--cfm-steps", str(steps), "--lengths", ",".join(lengths)], dict(os.environ)))

    text = render_table(results, args.checkpoint, args.half_cfm_steps)
    print(text)
    if args.out:
        md = args.out if args.out.suffix == ".md" else args.out / "s3gen.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text + "\n")
        md.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
