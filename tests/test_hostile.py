"""A hostile local client against the real daemon (tiny checkpoint, real Unix sockets).

Each test reproduces one item of issue 13 (daemon hardening) and checks that it now gets a
clear error or bounded behaviour.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from nightingale.client import protocol as p
from nightingale.models.stream import Cancelled
from test_daemon import FAST, TIMEOUT, DaemonThread, assert_idle, connect_when_up, tiny_factory, until_done, wait_for
from test_daemon_process import serve

# A 12-token first chunk (its `progress` says the engine is in the utterance), then one
# chunk of ~300 tokens with 100 CFM steps: half a minute of S3Gen on the tiny model on an
# idle 2-core machine, all inside one chunk.
HEAVY = {"seed": 3, "max_new_tokens": 400, "n_timesteps": 100, "chunk_schedule": "12,100,1000"}
HEAVY_TEXT = "Hello there, this is a rather longer test sentence that keeps the tiny model busy for a while"


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


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, tmp_path_factory):
    d = DaemonThread(tmp_path_factory.mktemp("hostile") / "h.sock", tiny_factory(tiny_checkpoint)).start()
    yield d
    assert d.stop() == 0


# ----------------------------------------------------------------------------- cancel inside a chunk


def test_model_stream_stops_between_cfm_steps(tiny_model):
    # 100,000 CFM steps would take hours; the event is set at its 40th check.
    cancel = CountdownEvent(40)
    with pytest.raises(Cancelled):
        for _ in tiny_model.stream(HEAVY_TEXT, seed=1, max_new_tokens=60, n_timesteps=100_000, chunk_schedule="48", cancel=cancel):
            pass
    assert cancel.calls == 40


def test_model_stream_stops_between_t3_steps(tiny_model):
    # A chunk of 1000 tokens: T3 runs to its budget before any S3Gen call; cancel at token 5.
    cancel = CountdownEvent(5)
    taken = []
    with pytest.raises(Cancelled):
        tokens = tiny_model.generate_tokens(HEAVY_TEXT, seed=1, max_new_tokens=200, cancel=cancel)
        for token in tokens:
            taken.append(token)
    assert len(taken) < 5
    # A set event stops the stream before any audio.
    done = threading.Event()
    done.set()
    with pytest.raises(Cancelled):
        next(iter(tiny_model.stream(HEAVY_TEXT, seed=1, max_new_tokens=20, cancel=done)))


def test_cancel_frees_the_engine_inside_a_long_chunk(daemon):
    with daemon.connect() as conn:
        conn.send(p.Speak(id="heavy", text=HEAVY_TEXT, output="stream", options=HEAVY))
        wait_for(conn, p.Progress, id="heavy")
        conn.send(p.Cancel(id="heavy"))
        assert wait_for(conn, p.Done, id="heavy").reason == "cancelled"
        # The engine is free again: the next utterance starts and completes at once instead
        # of after the rest of the heavy chunk (about 50 s of CFM steps).
        t0 = time.monotonic()
        conn.send(p.Speak(id="next", text="Hi.", output="stream", options=FAST))
        assert until_done(conn, "next")[-1].reason == "completed"
        assert time.monotonic() - t0 < 20.0
    assert assert_idle(daemon).current is None


def test_sigterm_inside_a_long_chunk_exits_0(tiny_checkpoint, tmp_path):
    sock = tmp_path / "t.sock"
    proc = serve(tiny_checkpoint, sock, "--no-playback", "--drain-timeout", "0.5")
    try:
        with connect_when_up(sock, proc) as conn:
            if conn.hello.state != "ready":
                wait_for(conn, p.Ready)
            conn.send(p.Speak(id="heavy", text=HEAVY_TEXT, output="stream", options=HEAVY))
            wait_for(conn, p.Progress, id="heavy")
            proc.send_signal(signal.SIGTERM)
            done = wait_for(conn, p.Done, id="heavy")
            assert done.reason == "cancelled"
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "still busy" not in out
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
