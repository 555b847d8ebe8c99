"""`nightingale serve` as a process: signals, drain, one daemon per socket, stale sockets,
and a machine with no audio output at all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nightingale import protocol as p

from .helpers.daemon import FAST, LONG, LONG_TEXT, TIMEOUT, connect_when_up, request, serve, until_done, wait_for


def no_audio_env(tmp_path: Path) -> tuple[dict, list[str]]:
    """An environment in which PortAudio finds no output device (Linux: an ALSA
    configuration whose default card does not exist); elsewhere, --no-playback."""
    if sys.platform.startswith("linux"):
        conf = tmp_path / "asound.conf"
        conf.write_text("pcm.!default { type hw card 0 }\n")
        return {**os.environ, "ALSA_CONFIG_PATH": str(conf)}, []
    return dict(os.environ), ["--no-playback"]


def test_sigterm_during_speech_drains_and_cleans_up(tiny_checkpoint, tmp_path):
    sock = tmp_path / "d.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(sock))  # a stale socket file, as a killed daemon leaves it
    crashed.close()
    env, extra = no_audio_env(tmp_path)
    proc = serve(tiny_checkpoint, sock, "--drain-timeout", "1", *extra, env=env)
    try:
        with connect_when_up(sock, proc) as c:
            if c.hello.state != "ready":
                wait_for(c, p.Ready)
            assert c.hello.playback is False
            st = request(c, p.GetStatus(), p.Status)
            assert st.pid == proc.pid and st.state == "ready" and st.playback["available"] is False
            assert "unavailable" in st.playback["reason"] or "disabled" in st.playback["reason"]
            # Local playback is refused with the reason; streaming still works.
            c.send(p.Speak(id="play", text="Hi.", output="play"))
            err = wait_for(c, p.Error, id="play")
            assert err.code == p.E_NO_PLAYBACK and "stream" in err.message
            c.send(p.Speak(id="ok", text="Hi.", output="stream", options=FAST))
            assert until_done(c, "ok")[-1].reason == "completed"

            # A second daemon on the same socket refuses to start and says who serves it.
            second = subprocess.run(
                [sys.executable, "-m", "nightingale.cli", "serve", "--socket", str(sock), "--model", str(tiny_checkpoint), "--no-playback"],
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert second.returncode == 1
            assert f"already serving {sock}" in second.stderr and str(proc.pid) in second.stderr
            assert request(c, p.Ping(), p.Pong).state == "ready"  # the first one is unharmed

            # SIGTERM in the middle of a long utterance: it gets the drain timeout, then is cancelled.
            c.send(p.Speak(id="long", text=LONG_TEXT, output="stream", options=LONG))
            wait_for(c, p.Audio, id="long")
            t_signal = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = []
            while (ev := c.recv(TIMEOUT)) is not None:
                events.append(ev)
            t_closed = time.monotonic()
        assert any(isinstance(e, p.ShuttingDown) for e in events)
        done = [e for e in events if isinstance(e, p.Done)]
        assert len(done) == 1 and done[0].id == "long" and done[0].reason == "cancelled"
        assert t_closed - t_signal < 1.0 + 5.0  # drain timeout plus one chunk and the goodbyes
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert not sock.exists()
    for line in ("replacing stale socket", "listening on", "ready", "SIGTERM received", "draining", "drain timeout", "stopped"):
        assert line in out, (line, out)


def test_sigint_lets_the_current_utterance_finish(tiny_checkpoint, tmp_path):
    sock = tmp_path / "i.sock"
    proc = serve(tiny_checkpoint, sock, "--no-playback")
    try:
        with connect_when_up(sock, proc) as c:
            if c.hello.state != "ready":
                wait_for(c, p.Ready)
            c.send(p.Speak(id="a", text="Finish this one.", output="stream", options=FAST))
            c.send(p.Speak(id="b", text="Not this one.", output="stream", options=FAST))
            wait_for(c, p.Started, id="a")
            proc.send_signal(signal.SIGINT)
            events = []
            while (ev := c.recv(TIMEOUT)) is not None:
                events.append(ev)
        dones = {e.id: e.reason for e in events if isinstance(e, p.Done)}
        assert dones == {"a": "completed", "b": "cancelled"}
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "SIGINT received" in out and "stopped" in out and not sock.exists()


def test_bad_socket_path_and_device_are_usage_errors(tmp_path):
    long_path = tmp_path / ("x" * 120) / "n.sock"
    out = subprocess.run(
        [sys.executable, "-m", "nightingale.cli", "serve", "--socket", str(long_path)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 2 and "longer than" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "nightingale.cli", "serve", "--socket", str(tmp_path / "d.sock"), "--device", "no-such-device"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 2 and "no-such-device" in out.stderr and "not found" in out.stderr
    assert not (tmp_path / "d.sock").exists()


def test_serve_without_a_checkpoint_says_so_once_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NIGHTINGALE_MODEL"}
    env["HF_HUB_OFFLINE"] = "1"  # the default repo cannot be fetched, and is not cached here
    env["HF_HOME"] = str(tmp_path / "hf")
    result = subprocess.run(
        [sys.executable, "-m", "nightingale.cli", "serve", "--socket", str(tmp_path / "d.sock"), "--no-playback"],
        capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out
    assert out.count("cannot get the Chatterbox checkpoint") == 1, out
