"""nsay's own overhead: process start to request sent.

A stub daemon (this process, speaking protocol v1 through nightingale.protocol) listens
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
import sysconfig
import tempfile
import threading
import time

from nightingale import protocol as p

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
        self.got_frame = threading.Event()
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
                    self.got_frame.set()
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


def time_one(stub: StubDaemon, argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(ms from spawn to first complete frame, ms from spawn to exit, CPU ms of the process).

    CPU time (user + system, from wait4) hardly moves with the machine's load, unlike wall
    time, so it is the steadier measure of nsay's own work on a shared machine.
    """
    stub.first_frame_at = None
    stub.got_frame.clear()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    t_exit = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {stderr.decode().strip()}")
    # The client may exit (the floor case reads one byte of the stub's hello) before the
    # stub's thread has handled the frame; wait for that thread, the time is already taken.
    if not stub.got_frame.wait(timeout=10):
        raise SystemExit(f"{argv}: the stub received no request")
    return (stub.first_frame_at - t0) * 1000.0, (t_exit - t0) * 1000.0, (usage.ru_utime + usage.ru_stime) * 1000.0


def summarize(name: str, samples: list[tuple[float, float, float]]) -> str:
    sent = sorted(s[0] for s in samples)
    p90 = sent[min(len(sent) - 1, round(0.9 * (len(sent) - 1)))]
    total = statistics.median(s[1] for s in samples)
    cpu = statistics.median(s[2] for s in samples)
    return f"| {name} | {statistics.median(sent):.1f} | {p90:.1f} | {sent[0]:.1f} | {cpu:.1f} | {total:.1f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="nsay-bench-") as tmp:
        # nsay finds the stub at the default socket path, as a user's nsay finds the daemon
        # (platformdirs included): the per-user directories point into tmp.
        user_dirs = {"XDG_RUNTIME_DIR": os.path.join(tmp, "run"), "HOME": os.path.join(tmp, "home")}
        for d in user_dirs.values():
            os.mkdir(d, mode=0o700)  # platformdirs accepts only a private XDG_RUNTIME_DIR
        saved = {k: os.environ.get(k) for k in (*user_dirs, p.SOCKET_ENV)}
        os.environ.update(user_dirs)
        os.environ.pop(p.SOCKET_ENV, None)
        try:
            sock = str(p.socket_path())
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        os.makedirs(os.path.dirname(sock), mode=0o700, exist_ok=True)
        stub = StubDaemon(sock)
        script = os.path.join(sysconfig.get_path("scripts"), "nsay")  # the console script users run
        nsay = [script] if os.path.isfile(script) else [
            sys.executable, "-c", "import sys; from nightingale.client.nsay import main; sys.exit(main())"
        ]  # fmt: skip
        floor = [
            sys.executable,
            "-S",  # no site: the least an interpreter can do; the real floor below it is exec + libc
            "-c",
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); s.sendall(%r); s.recv(1)"
            % (sock, struct.pack(">I", 1) + b"\xc0"),
        ]
        cases = [
            ("python -S connect+send (floor)", floor),
            ("nsay TEXT (plays on the daemon)", [*nsay, "Build finished."]),
            ("nsay -o out.wav TEXT", [*nsay, "-o", os.path.join(tmp, "out.wav"), "Build finished."]),
        ]
        # As installed (pip writes .pyc files): bytecode is cached, in a private prefix so the
        # checkout is not touched. Without a cache every start recompiles nsay and protocol.
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", p.SOCKET_ENV)}
        base.update(user_dirs)
        cached = dict(base, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
        uncached = dict(base, PYTHONDONTWRITEBYTECODE="1")
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
    print("| case | start to request sent, median ms | p90 ms | min ms | CPU ms to exit, median | start to exit, median ms |")
    print("|---|---|---|---|---|---|")
    for name, samples in results.items():
        print(summarize(name, samples))
    print()
    print("Bytecode cached as after `pip install`, except the last row (PYTHONDONTWRITEBYTECODE=1 and")
    print("no __pycache__ in the checkout: nsay and the protocol modules are compiled at every start). The -o")
    print("case sends its request before importing numpy/soundfile; its exit time includes those imports")
    print("and writing the file. The floor is a bare interpreter (-S) connecting and sending one frame.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
