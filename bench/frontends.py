"""Time to first audio byte through each front end of one daemon: native socket, HTTP
(OpenAI-compatible) and Wyoming.

Starts `nightingale serve --http ... --wyoming ... --frontend-options OPTIONS` as a process
(local playback off), then for each round asks each protocol in turn (rotating the order)
for the same sentence with the same speak options, and measures from the request's first
byte sent to the first audio byte received: native, the first `audio` event; HTTP, the
first body byte (`response_format` pcm, chunked); Wyoming, the first `audio-chunk`. Each
response is read to its end, and the next request waits until the daemon is idle, so every
measurement starts from an idle engine. The table gives each protocol's median and p90 and
the median of its per-round difference to the native socket (the rounds share the
machine's load, so the paired difference is the steadier figure).
All three clients are plain blocking sockets in this process.

    python bench/frontends.py                     # tiny random checkpoint, 30 rounds
    python bench/frontends.py --model DIR --rounds 20 --quantize 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nightingale import protocol as p
from nightingale.client.connection import Connection, DaemonUnavailable
from wyoming.event import read_event, write_event
from wyoming.tts import Synthesize

TEXT = "Hello there, how are you today?"
# Small utterances of several chunks: the first chunk after 4 speech tokens.
OPTIONS = {"seed": 1, "max_new_tokens": 16, "n_timesteps": 2, "chunk_schedule": "4,2,8"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]


def wait_idle(path: Path) -> float | None:
    """Wait until nothing is queued or synthesized; the last utterance's first_audio_ms
    as the daemon measured it (request received to first audio chunk)."""
    with Connection(path, timeout=60) as c:
        while True:
            c.send(p.GetStatus(ref="b"))
            ev = c.recv(60)
            while not isinstance(ev, p.Status):
                ev = c.recv(60)
            if ev.current is None and ev.queue_depth == 0:
                return ev.metrics["first_audio_ms"]["last"]
            time.sleep(0.02)


def native(path: Path) -> float:
    with Connection(path, timeout=120) as c:
        t0 = time.perf_counter()
        c.send(p.Speak(id="b", text=TEXT, output="stream", audio_format="s16le", options=OPTIONS))
        t = None
        while True:
            ev = c.recv(120)
            if isinstance(ev, p.Audio) and t is None:
                t = time.perf_counter() - t0
            elif isinstance(ev, p.Error) or isinstance(ev, p.Done) and (ev.reason != "completed" or t is None):
                raise RuntimeError(f"native: {ev}")
            elif isinstance(ev, p.Done):
                return t


def http(port: int) -> float:
    body = json.dumps({"model": "nightingale", "voice": "default", "input": TEXT, "response_format": "pcm"}).encode()
    req = (
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t0 = time.perf_counter()
        s.sendall(req)
        got = b""
        while b"\r\n\r\n" not in got:  # the headers leave together with the first chunk
            got += s.recv(1 << 16)
        head, _, rest = got.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"http: {head[:200]!r}")
        while not rest.partition(b"\r\n")[2]:  # chunk size line, then at least one audio byte
            rest += s.recv(1 << 16)
        t = time.perf_counter() - t0
        while not rest.endswith(b"0\r\n\r\n"):  # the last chunk
            data = s.recv(1 << 16)
            if not data:
                raise RuntimeError("http: the response was cut short")
            rest += data
        return t


def wyoming(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        f = s.makefile("rwb")
        t0 = time.perf_counter()
        write_event(Synthesize(text=TEXT).event(), f)
        f.flush()
        t = None
        while True:
            ev = read_event(f)
            if ev is None or ev.type == "error":
                raise RuntimeError(f"wyoming: {ev}")
            if ev.type == "audio-chunk" and t is None:
                t = time.perf_counter() - t0
            if ev.type == "audio-stop":
                return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random one, seed 0)")
    ap.add_argument("--quantize", default="none", choices=("8", "4", "none"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="rounds not counted")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.model is None:
            from nightingale.dev.checkpoint import make_checkpoint

            args.model = make_checkpoint(tmp_path / "tiny", "tiny", seed=0)
        path = tmp_path / "n.sock"
        hport, wport = free_port(), free_port()
        cmd = [sys.executable, "-m", "nightingale.cli", "serve", "--model", str(args.model), "--socket", str(path),
               "--no-playback", "--quantize", args.quantize, "--http", f"127.0.0.1:{hport}", "--wyoming", f"tcp://127.0.0.1:{wport}",
               "--frontend-options", json.dumps(OPTIONS)]  # fmt: skip
        log = open(tmp_path / "daemon.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    with Connection(path, timeout=600) as c:
                        while c.hello.state != "ready" and not isinstance(c.recv(600), p.Ready):
                            pass
                        break
                except (DaemonUnavailable, FileNotFoundError, ConnectionRefusedError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the daemon did not start: {(tmp_path / 'daemon.log').read_text()[-2000:]}")
                    time.sleep(0.1)
            clients = {"native socket": lambda: native(path), "HTTP (OpenAI)": lambda: http(hport), "Wyoming": lambda: wyoming(wport)}
            names = list(clients)
            times: dict[str, list[float]] = {n: [] for n in names}
            inside: dict[str, list[float]] = {n: [] for n in names}  # the daemon's own first_audio_ms
            wait_idle(path)
            for r in range(args.warmup + args.rounds):
                order = names[r % 3 :] + names[: r % 3]
                for name in order:
                    t = clients[name]()
                    daemon_ms = wait_idle(path)
                    if r >= args.warmup:
                        times[name].append(t * 1000.0)
                        inside[name].append(daemon_ms)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"# model {args.model}, quantize {args.quantize}, {args.rounds} rounds (+{args.warmup} warm-up), text {TEXT!r}")
    print(f"# options {json.dumps(OPTIONS)}")
    print(
        "| protocol | median ms | p90 ms | median of (protocol - native) per round, ms | in the daemon: median ms | client - daemon: median ms |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        diff = statistics.median(a - b for a, b in zip(times[name], times["native socket"]))
        transport = statistics.median(a - b for a, b in zip(times[name], inside[name]))
        print(
            f"| {name} | {med:.1f} | {pct(times[name], 90):.1f} | {diff:+.1f} | {statistics.median(inside[name]):.1f} | {transport:+.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
