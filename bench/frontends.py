"""Time to first audio byte through each front end of one daemon: native socket, HTTP
(OpenAI-compatible) and Wyoming.

Starts `nightingale serve --http ... --wyoming ...` as a process (local playback off), then
for each round asks each protocol in turn (rotating the order) for the same sentence with
default options, and measures from the request's first byte sent to the first audio byte
received: native, the first `audio` event; HTTP, the first body byte (`response_format`
pcm, chunked); Wyoming, the first `audio-chunk`. The request is then withdrawn the way each
protocol's clients do it (native `cancel`; HTTP and Wyoming close the connection) and the
next one waits until the daemon is idle plus --settle seconds (a cancelled utterance leaves
the queue at once, but the engine finishes the chunk in hand), so every measurement starts
from an idle engine.
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

from wyoming.event import read_event, write_event
from wyoming.tts import Synthesize

from nightingale.client import protocol as p

TEXT = "Hello there, how are you today?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]


def wait_idle(path: Path) -> None:
    with p.Connection(path, timeout=60) as c:
        while True:
            c.send(p.GetStatus(ref="b"))
            ev = c.recv(60)
            while not isinstance(ev, p.Status):
                ev = c.recv(60)
            if ev.current is None and ev.queue_depth == 0:
                return
            time.sleep(0.02)


def native(path: Path) -> float:
    with p.Connection(path, timeout=120) as c:
        t0 = time.perf_counter()
        c.send(p.Speak(id="b", text=TEXT, output="stream", audio_format="s16le"))
        while True:
            ev = c.recv(120)
            if isinstance(ev, p.Audio):
                t = time.perf_counter() - t0
                c.send(p.Cancel(id="b"))
                return t
            if isinstance(ev, (p.Error, p.Done)):
                raise RuntimeError(f"native: {ev}")


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
        return time.perf_counter() - t0


def wyoming(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        f = s.makefile("rwb")
        t0 = time.perf_counter()
        write_event(Synthesize(text=TEXT).event(), f)
        f.flush()
        while True:
            ev = read_event(f)
            if ev is None or ev.type == "error":
                raise RuntimeError(f"wyoming: {ev}")
            if ev.type == "audio-chunk":
                return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random one, seed 0)")
    ap.add_argument("--quantize", default="none", choices=("8", "4", "none"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="rounds not counted")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds after idle before the next request")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.model is None:
            from nightingale.models.checkpoint import make_checkpoint

            args.model = make_checkpoint(tmp_path / "tiny", "tiny", seed=0)
        path = tmp_path / "n.sock"
        hport, wport = free_port(), free_port()
        cmd = [sys.executable, "-m", "nightingale.daemon.cli", "serve", "--model", str(args.model), "--socket", str(path),
               "--no-playback", "--quantize", args.quantize, "--http", f"127.0.0.1:{hport}", "--wyoming", f"tcp://127.0.0.1:{wport}"]  # fmt: skip
        log = open(tmp_path / "daemon.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    with p.Connection(path, timeout=600) as c:
                        while c.hello.state != "ready" and not isinstance(c.recv(600), p.Ready):
                            pass
                        break
                except (p.DaemonUnavailable, FileNotFoundError, ConnectionRefusedError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the daemon did not start: {(tmp_path / 'daemon.log').read_text()[-2000:]}")
                    time.sleep(0.1)
            clients = {"native socket": lambda: native(path), "HTTP (OpenAI)": lambda: http(hport), "Wyoming": lambda: wyoming(wport)}
            names = list(clients)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.warmup + args.rounds):
                order = names[r % 3 :] + names[: r % 3]
                for name in order:
                    wait_idle(path)
                    time.sleep(args.settle)
                    t = clients[name]()
                    if r >= args.warmup:
                        times[name].append(t * 1000.0)
            wait_idle(path)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"# model {args.model}, quantize {args.quantize}, {args.rounds} rounds (+{args.warmup} warm-up), text {TEXT!r}")
    base = statistics.median(times["native socket"])
    print("| protocol | median ms | p90 ms | median - native ms |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.1f} | {pct(times[name], 90):.1f} | {med - base:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
