"""Driving a daemon from tests: in-process (DaemonThread) or as a `nightingale serve`
process, and reading its events (wait_for, until_done, request, pcm_of)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable

import anyio
import numpy as np

from nightingale import protocol as p
from nightingale.client.connection import Connection, DaemonUnavailable
from nightingale.daemon.config import DaemonConfig
from nightingale.daemon.server import Daemon

# Small, fast utterances: few tokens, one flow step. LONG makes many 4-token chunks.
FAST = {"seed": 1, "max_new_tokens": 6, "n_timesteps": 1}
LONG = {"seed": 2, "max_new_tokens": 120, "n_timesteps": 1, "chunk_schedule": "4,1,4"}
LONG_TEXT = "This sentence is long enough to keep the tiny model talking for a good while, chunk after chunk."
# A valid value of every speak option. The daemon hands them all to model.stream(), so every
# model family must take each one: an option it could not take would fail mid-synthesis,
# where an unknown option is refused up front as bad_field (test_hostile.py).
EVERY_OPTION = {
    "seed": 3, "temperature": 0.8, "cfg_weight": 0.5, "exaggeration": 0.5, "top_p": 0.9, "min_p": 0.05,
    "repetition_penalty": 1.2, "max_new_tokens": 6, "n_timesteps": 1, "first_chunk_timesteps": 1, "chunk_schedule": "4,1,4",
}  # fmt: skip
TIMEOUT = 60.0


def tiny_factory(checkpoint: Path, quantize: int | None = None) -> Callable[[], object]:
    """Loads on the engine thread (MLX arrays belong to the thread that made them)."""
    from nightingale.models import load_model

    return partial(load_model, checkpoint, quantize)


class DaemonThread:
    """A Daemon running `anyio.run` on a background thread, as tests drive it."""

    def __init__(self, path: Path, factory: Callable[[], object], **config):
        config.setdefault("playback", False)
        config.setdefault("warmup", False)
        self.path = path
        self.daemon = Daemon(DaemonConfig(socket=path, **config), factory)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="daemon-loop", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = anyio.run(self.daemon.run)
        except BaseException as err:  # surfaced by start()/stop()
            self.error = err

    def start(self, wait_ready: bool = True) -> "DaemonThread":
        self._thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.daemon.bound.wait(0.05):
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not bind: {self.error!r}")
        if wait_ready:
            with self.connect() as conn:
                if conn.hello.state != "ready":
                    wait_for(conn, p.Ready)
        return self

    def connect(self) -> Connection:
        return Connection(self.path, timeout=TIMEOUT)

    def stop(self) -> int | None:
        self.daemon.request_shutdown()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "daemon did not stop"
        if self.error is not None:
            raise self.error
        return self.exit_code


def wait_for(conn: Connection, kind: type, timeout: float = TIMEOUT, skipped: list | None = None, **match) -> p.Event:
    """Read events until one of `kind` whose fields equal `match`; return it. Events read
    on the way are appended to `skipped` (when given) or dropped."""
    deadline = time.monotonic() + timeout
    while True:
        ev = conn.recv(max(0.1, deadline - time.monotonic()))
        if ev is None:
            raise EOFError(f"connection closed while waiting for {kind.__name__} {match}")
        if isinstance(ev, kind) and all(getattr(ev, k) == v for k, v in match.items()):
            return ev
        if skipped is not None:
            skipped.append(ev)


def until_done(conn: Connection, uid: str, timeout: float = TIMEOUT) -> list[p.Event]:
    """All events up to and including the Done of `uid`."""
    events: list[p.Event] = []
    deadline = time.monotonic() + timeout
    while True:
        ev = conn.recv(max(0.1, deadline - time.monotonic()))
        if ev is None:
            raise EOFError(f"connection closed before done of {uid}; got {[type(e).__name__ for e in events]}")
        events.append(ev)
        if isinstance(ev, p.Done) and ev.id == uid:
            return events


def pcm_of(events: list[p.Event], uid: str) -> np.ndarray:
    audio = [e for e in events if isinstance(e, p.Audio) and e.id == uid]
    assert [a.seq for a in audio] == list(range(len(audio)))
    parts = [np.frombuffer(a.pcm, "<i2").astype(np.float32) / 32767.0 if a.format == "s16le" else np.frombuffer(a.pcm, "<f4") for a in audio]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def request(conn: Connection, msg: p.Request, kind: type, skipped: list | None = None) -> p.Event:
    msg.ref = msg.ref or f"r{time.monotonic_ns()}"
    conn.send(msg)
    return wait_for(conn, kind, skipped=skipped, ref=msg.ref)


def connect_when_up(sock, proc: subprocess.Popen, timeout: float = TIMEOUT) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            return Connection(sock, timeout=timeout)
        except DaemonUnavailable:
            assert time.monotonic() < deadline, "daemon did not bind"
            time.sleep(0.05)


def assert_idle(daemon: DaemonThread, timeout: float = 10.0) -> p.Status:
    """The daemon returns to no current utterance and an empty queue."""
    deadline = time.monotonic() + timeout
    with daemon.connect() as c:
        while True:
            st = request(c, p.GetStatus(), p.Status)
            if st.current is None and st.queue_depth == 0:
                return st
            assert time.monotonic() < deadline, f"daemon not idle: {st.current} {st.queue}"
            time.sleep(0.05)


def serve(checkpoint: Path, sock: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nightingale.cli", "serve", "--model", str(checkpoint), "--socket", str(sock), "--quantize", "none", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


class CountdownEvent(threading.Event):
    """An Event that sets itself after `checks` calls of is_set(): cancels at a chosen
    step of the model's loops without relying on timing."""

    def __init__(self, checks: int):
        super().__init__()
        self.left = checks
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        self.left -= 1
        if self.left <= 0:
            self.set()
        return super().is_set()
