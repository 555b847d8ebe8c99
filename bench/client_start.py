"""nsay's own overhead: process start to request sent.

A stub daemon (this process, speaking protocol v1 through nightingale.client.protocol) listens
on a temporary socket, greets with `hello` (state ready), and notes the moment the `speak`
frame is complete; the time from just before spawning `nsay` to that moment is nsay's
start-up overhead: interpreter start, imports, argument parsing, connect, hello, send.
The stub answers `accepted`, a little audio (for -o), and `done`, so nsay exits normally;
the total wall time is reported too.

Floor: the same measure for a bare `python -c` that connects and sends one byte, i.e. what
the interpreter alone costs on this machine.

    python bench/client_start.py            # 30 runs of each case
    python bench/client_start.py --runs 100
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from nightingale.client import protocol as p

SAMPLE_RATE = 24000
AUDIO_SAMPLES = 24000  # 1 s of silence for the -o case


class StubDaemon:
    """Answers one client at a time; records when each complete request frame arrived."""

    def __init__(self, path: str):
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.first_frame_at: float | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self._client(conn)

    def _client(self, conn: socket.socket) -> None:
        conn.sendall(p.encode_frame(p.Hello(server="stub", state="ready", sample_rate=SAMPLE_RATE, playback=True)))
        decoder = p.FrameDecoder()
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            decoder.feed(data)
            for body in decoder.frames():
                if self.first_frame_at is None:
                    self.first_frame_at = time.perf_counter()
                try:
                    if isinstance(body, p.ProtocolError):
                        raise body
                    msg = p.decode_request(p.unpack_body(body))
                except p.ProtocolError:
                    return  # the floor's dummy frame
                if isinstance(msg, p.Speak):
                    self._answer(conn, msg)
                    return

    def _answer(self, conn: socket.socket, speak: p.Speak) -> None:
        uid = speak.id or "u1"
        events: list[p.Event] = [p.Accepted(id=uid, position=0, priority=speak.priority, output=speak.output)]
        if speak.output != "play":
            pcm = bytes(4 * AUDIO_SAMPLES)  # float32 zeros
            events.append(p.Audio(id=uid, seq=0, pcm=pcm, sample_rate=SAMPLE_RATE))
        events.append(p.Done(id=uid, reason="completed", audio_s=AUDIO_SAMPLES / SAMPLE_RATE))
        conn.sendall(b"".join(p.encode_frame(e) for e in events))

    def close(self) -> None:
        self.server.close()


def time_one(stub: StubDaemon, argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(ms from spawn to first complete frame, ms from spawn to exit)."""
    stub.first_frame_at = None
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    t_exit = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}")
    if stub.first_frame_at is None:
        raise SystemExit(f"{argv}: the stub received no request")
    return (stub.first_frame_at - t0) * 1000.0, (t_exit - t0) * 1000.0


def summarize(name: str, samples: list[tuple[float, float]]) -> str:
    sent = sorted(s for s, _ in samples)
    total = sorted(t for _, t in samples)
    p90 = sent[min(len(sent) - 1, round(0.9 * (len(sent) - 1)))]
    return (
        f"| {name} | {statistics.median(sent):.1f} | {p90:.1f} | {sent[0]:.1f} | {statistics.median(total):.1f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="nsay-bench-") as tmp:
        sock = os.path.join(tmp, "s.sock")
        stub = StubDaemon(sock)
        nsay = [sys.executable, "-c", "import sys; from nightingale.client.nsay import main; sys.exit(main())"]
        floor = [
            sys.executable,
            "-S",  # no site: the least an interpreter can do; the real floor below it is exec + libc
            "-c",
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); s.sendall(%r); s.recv(1)"
            % (sock, struct.pack(">I", 1) + b"\xc0"),
        ]
        cases = [
            ("python -S connect+send (floor)", floor),
            ("nsay TEXT (plays on the daemon)", [*nsay, "--socket", sock, "Build finished."]),
            ("nsay -o out.wav TEXT", [*nsay, "--socket", sock, "-o", os.path.join(tmp, "out.wav"), "Build finished."]),
        ]
        # As installed (pip writes .pyc files): bytecode is cached, in a private prefix so the
        # checkout is not touched. Without a cache every start recompiles nsay and protocol.
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
        uncached = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        for _, argv in cases:  # fill the bytecode cache and the page cache
            time_one(stub, argv, cached)
        results = {}
        for _ in range(args.runs):  # interleaved, so load changes hit every case alike
            for name, argv in cases:
                results.setdefault(name, []).append(time_one(stub, argv, cached))
            results.setdefault("nsay TEXT, no bytecode cache", []).append(time_one(stub, cases[1][1], uncached))
        stub.close()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"nsay start-up, {args.runs} runs each, {os.cpu_count()} CPUs, load average {load:.2f}, Python {sys.version.split()[0]}")
    print()
    print("| case | start to request sent, median ms | p90 ms | min ms | start to exit, median ms |")
    print("|---|---|---|---|---|")
    for name, samples in results.items():
        print(summarize(name, samples))
    print()
    print("Bytecode cached as after `pip install`, except the last row (PYTHONDONTWRITEBYTECODE=1,")
    print("every module compiled at each start). The -o case sends its request before importing")
    print("numpy/soundfile; its exit time includes those imports and writing the file.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
