"""Soak benchmark of `nightingale serve`: many utterances from concurrent clients.

Starts the daemon as a process (the real CLI, local playback off), then N clients each send
their share of M utterances one after another (output "stream") and measure request to
first audio. Reports errors (must be 0), p50/p95 latencies, and the daemon's resident
memory at ready, after a warm-up round, and at the end (growth after warm-up must stay
under 5%). The warm-up round is long (100 utterances by default) because resident memory
rises once while the first inputs of new sizes go through the model (MLX kernels, allocator
pools); after that it stays flat (1000 utterances: within +-0.6%).

    python bench/daemon.py                       # a tiny random checkpoint, 200 x 10 clients
    python bench/daemon.py --model DIR --utterances 50 --clients 4 --options '{"max_new_tokens": 40}'

Exit status 1 if any request failed, the daemon logged a traceback, or memory grew 5% or more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from nightingale import protocol as p
from nightingale.client.connection import Connection, DaemonUnavailable

TEXTS = [
    "Hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "Is it going to rain today?",
    "Streaming speech, one chunk at a time.",
    "Numbers like 42 are read aloud.",
]
DEFAULT_OPTIONS = {"max_new_tokens": 16, "n_timesteps": 2}
MEMORY_GROWTH_LIMIT = 0.05


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]


def status(path: Path) -> p.Status:
    with Connection(path, timeout=30) as c:
        c.send(p.GetStatus(ref="bench"))
        while True:
            ev = c.recv(30)
            if isinstance(ev, p.Status):
                return ev


def start_daemon(args, path: Path, log_file) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "nightingale.cli", "serve",
        "--model", str(args.model), "--socket", str(path), "--no-playback", "--quantize", args.quantize,
        *(["--decoder", str(args.decoder)] if getattr(args, "decoder", None) else []),  # fuzz.py has no --decoder
    ]  # fmt: skip
    # The daemon runs in the scratch directory: started from a source checkout, the checkout's
    # own nightingale/ folder would shadow the installed package.
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=path.parent)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_file.flush()
            tail = Path(log_file.name).read_text(errors="replace").strip().splitlines()[-20:]
            raise SystemExit(f"the daemon exited with {proc.returncode} during start-up; its log ends:\n" + "\n".join(tail))
        try:
            with Connection(path, timeout=args.start_timeout) as c:
                if c.hello.state != "ready":
                    while not isinstance(c.recv(args.start_timeout), p.Ready):
                        pass
                return proc
        except (DaemonUnavailable, FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the daemon did not become ready in time")


@contextlib.contextmanager
def scratch_daemon(args, name: str) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """`nightingale serve` on a socket in a scratch directory (args.model, or a tiny random
    checkpoint made there), ready: yields (process, socket path, log path). The process is
    killed on the way out if it is still running; the log outlives it until the block ends."""
    with tempfile.TemporaryDirectory(prefix=f"ng-{name}-") as tmp:
        tmp_path = Path(tmp)
        if args.model is None:
            from nightingale.dev.checkpoint import make_checkpoint

            args.model = make_checkpoint(tmp_path / "tiny", "tiny", seed=0)
        path = tmp_path / f"{name}.sock"
        log_path = tmp_path / "daemon.log"
        with open(log_path, "w") as log_file:
            proc = start_daemon(args, path, log_file)
            try:
                yield proc, path, log_path
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(60)


def run_round(path: Path, clients: int, per_client: int, options: dict, tag: str) -> tuple[list[float], list[float], list[p.Done], list[str]]:
    """Each client speaks `per_client` utterances in turn. Returns first-audio latencies (ms),
    total latencies (ms), done events and error descriptions."""
    first_ms: list[float] = []
    total_ms: list[float] = []
    dones: list[p.Done] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            with Connection(path, timeout=120) as c:
                barrier.wait(60)
                for k in range(per_client):
                    uid = f"{tag}-{i}-{k}"
                    text = TEXTS[(i + k) % len(TEXTS)]
                    t0 = time.perf_counter()
                    c.send(p.Speak(id=uid, text=text, output="stream", options={**options, "seed": i * 1000 + k}))
                    t_first = None
                    while True:
                        ev = c.recv(300)
                        if ev is None:
                            raise EOFError("the daemon closed the connection")
                        if isinstance(ev, p.Audio) and t_first is None:
                            t_first = time.perf_counter()
                        elif isinstance(ev, p.Error):
                            with lock:
                                errors.append(f"{uid}: {ev.code}: {ev.message}")
                        elif isinstance(ev, p.Done) and ev.id == uid:
                            t_end = time.perf_counter()
                            with lock:
                                dones.append(ev)
                                if ev.reason != "completed":
                                    errors.append(f"{uid}: done {ev.reason} {ev.detail or ''}")
                                elif t_first is None:
                                    errors.append(f"{uid}: completed without audio")
                                else:
                                    first_ms.append((t_first - t0) * 1000.0)
                                    total_ms.append((t_end - t0) * 1000.0)
                            break
        except Exception as err:
            with lock:
                errors.append(f"client {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return first_ms, total_ms, dones, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random one, seed 0)")
    ap.add_argument("--quantize", choices=("8", "4", "none"), default="8")
    ap.add_argument("--decoder", default=None, help="a Turbo checkpoint whose MeanFlow S3Gen replaces the model's")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--utterances", type=int, default=200, help="total, split evenly over the clients")
    ap.add_argument("--warmup", type=int, default=100, help="utterances before the 'before' memory figure")
    ap.add_argument("--options", default=json.dumps(DEFAULT_OPTIONS), help="speak options as JSON")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    options = json.loads(args.options)
    per_client = max(1, args.utterances // args.clients)

    t_start = time.monotonic()
    with scratch_daemon(args, "bench") as (proc, path, log_path):
        t_ready = time.monotonic() - t_start
        st0 = status(path)
        rss_ready = st0.memory["rss_mb"]
        # Warm-up round: allocator pools and kernel caches settle.
        _, _, _, w_err = run_round(path, args.clients, max(1, args.warmup // args.clients), options, "warm")
        rss_warm = status(path).memory["rss_mb"]
        t0 = time.monotonic()
        first_ms, total_ms, dones, errors = run_round(path, args.clients, per_client, options, "soak")
        wall = time.monotonic() - t0
        st1 = status(path)
        rss_end = st1.memory["rss_mb"]
        with Connection(path, timeout=30) as c:
            c.send(p.Shutdown())
        rc = proc.wait(60)
        errors = w_err + errors
        tracebacks = log_path.read_text(errors="replace").count("Traceback")
        n = len(dones)
        growth = (rss_end - rss_warm) / rss_warm
        audio_s = sum(d.audio_s for d in dones)
        print(f"# nightingale daemon soak ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()})")
        print(f"model: {st0.model.get('source')} size={st0.model.get('size')} quantize={st0.model.get('quantize')} dtype={st0.model.get('dtype')}")
        print(f"options: {json.dumps(options)}; {args.clients} clients x {per_client} utterances, output=stream, playback off")
        print(f"start to ready: {t_ready:.1f} s")
        print()
        print("| metric | value |")
        print("|---|---|")
        print(f"| utterances completed | {sum(d.reason == 'completed' for d in dones)} / {n} |")
        print(f"| errors | {len(errors)} |")
        print(f"| tracebacks in the daemon log | {tracebacks} |")
        if first_ms:
            print(f"| request to first audio p50 / p95 (ms) | {pct(first_ms, 50):.0f} / {pct(first_ms, 95):.0f} |")
            print(f"| request to done p50 / p95 (ms) | {pct(total_ms, 50):.0f} / {pct(total_ms, 95):.0f} |")
            ttfa = [d.ttfa_ms for d in dones if d.ttfa_ms is not None]
            rtf = [d.rtf for d in dones if d.rtf is not None]
            print(f"| synthesis TTFA p50 (ms, daemon) | {statistics.median(ttfa):.0f} |")
            print(f"| RTF p50 (daemon) | {statistics.median(rtf):.2f} |")
        print(f"| audio produced (s) / wall (s) | {audio_s:.1f} / {wall:.1f} |")
        print(f"| RSS at ready / after {args.warmup} warm-up utterances / end (MB) | {rss_ready:.1f} / {rss_warm:.1f} / {rss_end:.1f} |")
        print(f"| RSS growth after warm-up | {growth * 100:+.2f}% (limit {MEMORY_GROWTH_LIMIT * 100:.0f}%) |")
        mem = st1.memory
        print(f"| MLX active / peak / cache (MB) at end | {mem.get('mlx_active_mb')} / {mem.get('mlx_peak_mb')} / {mem.get('mlx_cache_mb')} |")
        print(f"| daemon exit code | {rc} |")
        for e in errors[:20]:
            print("error:", e)
        ok = not errors and not tracebacks and growth < MEMORY_GROWTH_LIMIT and rc == 0 and n == args.clients * per_client
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
