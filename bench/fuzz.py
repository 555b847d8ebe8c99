"""Fuzz `nightingale serve` with hostile frames; count crashes and tracebacks.

Starts the daemon as a process (the real CLI, playback off, a tiny random checkpoint unless
--model), then sends --frames fuzzed frames over as many connections as it takes, one connection
after another (at most --per-connection frames each): valid requests with mutated fields (NaN, inf, huge or negative numbers, wrong
types, deep nesting, odd versions), random bytes, bit-flipped frames, bad UTF-8, oversized
and truncated frames, and abrupt disconnects mid-frame. After each connection the daemon
must still answer `ping`. At the end it is sent SIGTERM and must exit 0, and its log must
hold no traceback.

    python bench/fuzz.py                     # 10,000 frames, tiny checkpoint
    python bench/fuzz.py --frames 2000 --seed 7 --per-connection 50

Exit status 1 on any crash, traceback, unanswered ping or non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import msgpack
from daemon import scratch_daemon, status  # bench/daemon.py, beside this script

from nightingale import protocol as p
from nightingale.client.connection import Connection

NASTY_VALUES = [
    float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1,
    True, False, None, "", "x" * 5000, "\udc80".encode("utf-8", "surrogatepass"), b"\x00" * 100,
    [], {}, [[[[[]]]]], {"a": {"b": {"c": {}}}}, 1.0, 0.5, "1,1,1", "0,0,0", "inf,1,1", "abc", "4,2,16",
]  # fmt: skip
OPTION_NAMES = list(p.SPEAK_OPTIONS) + ["bogus"]
SAFE_OPTIONS = {"max_new_tokens": 6, "n_timesteps": 1}


def base_messages(rng: random.Random) -> list[dict]:
    uid = f"f{rng.randrange(50)}"
    return [
        {"v": 1, "type": "ping"},
        {"v": 1, "type": "status"},
        {"v": 1, "type": "voices"},
        {"v": 1, "type": "speak", "id": uid, "text": "Hi.", "output": "stream", "options": dict(SAFE_OPTIONS)},
        {"v": 1, "type": "speak", "id": uid, "stream": True, "output": "stream", "options": dict(SAFE_OPTIONS)},
        {"v": 1, "type": "speak_text", "id": uid, "text": "more text."},
        {"v": 1, "type": "speak_end", "id": uid},
        {"v": 1, "type": "cancel", "id": uid},
        {"v": 1, "type": "cancel", "all": True},
        {"v": 1, "type": "pause"},
        {"v": 1, "type": "resume"},
    ]


def mutate(msg: dict, rng: random.Random) -> dict:
    msg = dict(msg)
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.35 and msg.get("type") == "speak":
            opts = dict(msg.get("options") or {})
            opts[rng.choice(OPTION_NAMES)] = rng.choice(NASTY_VALUES)
            msg["options"] = opts
        elif r < 0.55:
            msg[rng.choice(["v", "type", "id", "text", "priority", "output", "audio_format", "stream", "voice", "all", "ref", "keep"])] = rng.choice(NASTY_VALUES)
        elif r < 0.65:
            if msg:
                msg.pop(rng.choice(list(msg)), None)
        elif r < 0.75:
            depth = rng.choice([10, 100, 1000])
            value: object = 0
            for _ in range(depth):
                value = [value]
            msg[rng.choice(["options", "text", "x"])] = value
        else:
            msg[f"extra{rng.randrange(5)}"] = rng.choice(NASTY_VALUES)
    return msg


def frame(body: bytes) -> bytes:
    return p.HEADER.pack(len(body)) + body


def fuzz_frame(rng: random.Random) -> tuple[bytes, bool]:
    """(bytes to send, whether the connection should be cut right after)."""
    kind = rng.random()
    msg = rng.choice(base_messages(rng))
    if kind < 0.55:
        try:
            return frame(msgpack.packb(mutate(msg, rng), use_bin_type=True)), False
        except (ValueError, TypeError, OverflowError):  # msgpack cannot encode it: send junk instead
            return frame(os.urandom(rng.randint(0, 64))), False
    if kind < 0.65:
        data = bytearray(frame(msgpack.packb(msg)))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(p.HEADER.size, len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data), False
    if kind < 0.75:
        return frame(os.urandom(rng.randint(0, 256))), False
    if kind < 0.8:
        return frame(b"\x82\xa1v\x01\xa4type\xa5speak" + b"\xa4text\xa3\xff\xfe\xfd"), False  # bad UTF-8 (map count off on purpose)
    if kind < 0.85:
        n = p.MAX_FRAME_BYTES + rng.randint(1, 1000)
        return p.HEADER.pack(n) + os.urandom(min(n, 4096)), True  # oversized, then cut
    if kind < 0.9:
        whole = frame(msgpack.packb(msg))
        return whole[: rng.randrange(1, len(whole))], True  # truncated, then cut
    if kind < 0.95:
        return struct.pack(">I", rng.choice([0, 1, 2**32 - 1])), False
    return frame(msgpack.packb({"v": 1, "type": "ping"})), False


def drain(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not sock.recv(1 << 16):
                return
        except socket.timeout:
            continue
        except OSError:
            return


def ping(path: Path) -> bool:
    try:
        with Connection(path, timeout=30) as c:
            c.send(p.Ping(ref="alive"))
            while True:
                ev = c.recv(30)
                if isinstance(ev, p.Pong):
                    return True
                if ev is None:
                    return False
    except Exception as err:
        print("ping failed:", err)
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random one, seed 0)")
    ap.add_argument("--quantize", choices=("8", "4", "none"), default="8")
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--per-connection", type=int, default=100, help="frames per connection at most (cuts end one sooner)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    with scratch_daemon(args, "fuzz") as (proc, path, log_path):
        rss_ready = status(path).memory["rss_mb"]
        t0 = time.monotonic()
        sent = cut = failed_pings = connections = 0
        while sent < args.frames:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            sock.settimeout(0.2)
            connections += 1
            stop = threading.Event()
            reader = threading.Thread(target=drain, args=(sock, stop), daemon=True)
            reader.start()
            try:
                for _ in range(min(args.per_connection, args.frames - sent)):
                    data, cut_after = fuzz_frame(rng)
                    sock.sendall(data)
                    sent += 1
                    if cut_after:
                        cut += 1
                        break
            except OSError:
                pass  # the daemon may drop a hostile client
            stop.set()
            sock.close()
            reader.join()
            if not ping(path):
                failed_pings += 1
            if proc.poll() is not None:
                break
        wall = time.monotonic() - t0
        crashed = proc.poll() is not None
        rss_end = status(path).memory["rss_mb"] if not crashed else float("nan")
        if not crashed:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log = log_path.read_text(errors="replace")
        tracebacks = log.count("Traceback")
        print(f"# nightingale fuzz ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()})")
        print(f"{sent} frames over {connections} connections ({cut} cut mid-frame), seed {args.seed}, {wall:.1f} s")
        print()
        print("| metric | value |")
        print("|---|---|")
        print(f"| frames sent | {sent} |")
        print(f"| daemon crashes | {int(crashed)} |")
        print(f"| pings unanswered after a connection | {failed_pings} |")
        print(f"| tracebacks in the daemon log | {tracebacks} |")
        print(f"| RSS at ready / after fuzzing (MB) | {rss_ready:.1f} / {rss_end:.1f} |")
        print(f"| exit code after SIGTERM | {rc} |")
        if tracebacks:
            i = log.index("Traceback")
            print(log[max(0, i - 500) : i + 2000])
        return 0 if not crashed and not tracebacks and not failed_pings and rc == 0 and sent >= args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
