"""Real playback: PortAudio into a PulseAudio null sink, recorded from the sink's monitor.

The fixture starts PulseAudio if none runs (CI: root, no sound card) and fails with the
install command when it is missing; nothing waits without a timeout. Each comparison
checks that what played is what was generated: same amount of sound, same waveform
(correlation after PulseAudio's resampling round trip), tail not cut.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nightingale import protocol as p
from nightingale.daemon.playback import Player
from nightingale.playback import DeviceNotFound, probe_output

from .helpers.daemon import (
    FAST,
    LONG,
    LONG_TEXT,
    TIMEOUT,
    DaemonThread,
    connect_when_up,
    pcm_of,
    request,
    tiny_factory,
    until_done,
    wait_for,
)
from .helpers.playback import assert_same_audio, pulse, pulse_device, wait_generated  # noqa: F401 (pulse is a fixture)
from .helpers.pulse import MonitorRecorder

RATE = 24000
PLAYBACK_TEST_LATENCY_S = 0.5  # output buffer for tests that compare what played (see below)
def test_signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(seconds * RATE)).astype(np.float32) * 0.2
    return np.clip(x, -0.9, 0.9)


test_signal.__test__ = False  # a helper, not a test


def played_event():
    done = threading.Event()
    got: dict = {}

    def on_played(key, underruns):
        got.update(key=key, underruns=underruns, at=time.monotonic())
        done.set()

    return done, got, on_played


def test_player_plays_exactly_what_it_was_given_and_holds_it_while_paused(pulse, tmp_path):
    probe = probe_output(None, RATE)
    assert probe.available, probe.reason
    done, got, on_played = played_event()
    # What is compared is the player's output, not its latency: an ALSA buffer of half a
    # second rides out a starved callback thread on a loaded machine (0.1 s underran).
    player = Player(RATE, probe, on_played=on_played, latency=PLAYBACK_TEST_LATENCY_S)
    ref = test_signal(1.5)
    try:
        with MonitorRecorder(tmp_path / "rec.raw") as rec:
            player.pause()
            for i in range(0, len(ref), 4800):  # 200 ms chunks while paused: all held
                player.write("u", ref[i : i + 4800])
            player.end("u")
            time.sleep(0.3)
            assert player.stats()["buffered_s"] == pytest.approx(1.5, abs=0.01)
            assert not done.is_set()
            t_resume = time.monotonic()
            player.resume()
            assert done.wait(TIMEOUT)
            time.sleep(0.2)
            recorded = rec.stop()
        # "played" comes after the last sample reached the sink, never before.
        assert got["at"] - t_resume >= 1.5
        assert got["key"] == "u" and player.stats()["buffered_s"] == 0.0
        xruns = player.xruns
    finally:
        player.close()
    assert_same_audio(recorded, ref, f"PortAudio output underflows: {xruns}")


def test_player_counts_underruns(pulse):
    probe = probe_output(None, RATE)
    done, got, on_played = played_event()
    player = Player(RATE, probe, on_played=on_played)
    try:
        player.write("u", test_signal(0.2, 1))
        # The buffer runs dry in the middle of the utterance (however late the stream starts).
        deadline = time.monotonic() + TIMEOUT
        while player.stats()["underruns"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # more silent blocks: still one dry spell
        player.write("u", test_signal(0.2, 2))
        player.end("u")
        assert done.wait(TIMEOUT)
        assert got["underruns"] == 1
        assert player.stats()["underruns"] == 1
        # Between utterances an empty buffer is not an underrun.
        done.clear()
        time.sleep(0.3)
        player.write("v", test_signal(0.1, 3))
        player.end("v")
        assert done.wait(TIMEOUT) and got["underruns"] == 0
        assert player.stats()["underruns"] == 1
    finally:
        player.close()


def test_player_flush_drops_audio_at_once(pulse):
    probe = probe_output(None, RATE)
    done, _, on_played = played_event()
    player = Player(RATE, probe, on_played=on_played)
    try:
        player.write("u", test_signal(3.0))
        time.sleep(0.3)
        player.flush("u")
        assert player.stats()["buffered_s"] < 0.01
        assert not done.wait(0.5)  # a flushed utterance is never reported as played
    finally:
        player.close()


def test_unknown_device_is_a_clear_error(pulse):
    with pytest.raises(DeviceNotFound, match="no-such-device.*outputs:"):
        probe_output("no-such-device", RATE)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses an ALSA configuration without devices")
def test_no_audio_device_is_detected(tmp_path):
    conf = tmp_path / "asound.conf"
    conf.write_text("pcm.!default { type hw card 0 }\n")  # no card 0 here: no output at all
    code = "from nightingale.playback import probe_output; r = probe_output(None, 24000); print(r.available, r.reason)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "ALSA_CONFIG_PATH": str(conf)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False no audio output device")


# ----------------------------------------------------------------------------- through the daemon


@pytest.fixture(scope="module")
def playing_daemon(pulse, tiny_checkpoint, tmp_path_factory):
    # A 0.5 s output buffer: these tests compare what played, and on a loaded machine the
    # default 0.1 s underran, splicing silence into the recording (latency is not under test).
    d = DaemonThread(
        tmp_path_factory.mktemp("play") / "n.sock", tiny_factory(tiny_checkpoint), playback=True, device=pulse_device(),
        latency=PLAYBACK_TEST_LATENCY_S,
    ).start()
    yield d
    assert d.stop() == 0


def test_daemon_plays_what_it_generated(playing_daemon, tmp_path):
    with playing_daemon.connect() as c:
        assert c.hello.playback is True
        st = request(c, p.GetStatus(), p.Status)
        assert st.playback["available"] is True and st.playback["device"] == (pulse_device() or "default")
        with MonitorRecorder(tmp_path / "rec.raw") as rec:
            # Paused first: synthesis fills the buffer, nothing is dropped, then all of it plays.
            request(c, p.Pause(), p.Paused)
            c.send(p.Speak(id="x", text="Hello there, listener.", output="both", options={"seed": 5, "max_new_tokens": 30, "n_timesteps": 2}))
            events: list[p.Event] = []
            st = wait_generated(c, events)
            assert st.paused is True and not any(isinstance(e, p.Done) for e in events)
            t_resume = time.monotonic()
            request(c, p.Resume(), p.Resumed, skipped=events)
            events += until_done(c, "x")
            t_done = time.monotonic()
            time.sleep(0.2)
            recorded = rec.stop()
        done = events[-1]
        streamed = pcm_of(events, "x")
        assert done.reason == "completed" and len(streamed) == round(done.audio_s * RATE) > 0
        # The held audio is the whole utterance, and done waits until it has been heard.
        assert st.playback["buffered_s"] == pytest.approx(done.audio_s, abs=0.01)
        assert t_done - t_resume >= done.audio_s
        assert_same_audio(recorded, streamed, f"status after playing: {request(c, p.GetStatus(), p.Status).playback}")


def test_daemon_cancel_silences_playback(playing_daemon):
    with playing_daemon.connect() as c:
        c.send(p.Speak(id="long", text=LONG_TEXT, output="play", options=LONG))
        wait_for(c, p.Progress, id="long")
        c.send(p.Cancel(id="long"))
        assert wait_for(c, p.Done, id="long").reason == "cancelled"
        st = request(c, p.GetStatus(), p.Status)
        assert st.playback["buffered_s"] < 0.01
        c.send(p.Speak(id="next", text="Next.", output="play", options=FAST))
        assert until_done(c, "next")[-1].reason == "completed"


def test_play_goes_on_after_the_client_leaves(playing_daemon):
    with playing_daemon.connect() as c:
        before = request(c, p.GetStatus(), p.Status).counters
        c.send(p.Speak(id="bye", text="Said after you left.", output="play", options=FAST))
        wait_for(c, p.Accepted, id="bye")
    with playing_daemon.connect() as c:
        deadline = time.monotonic() + TIMEOUT
        while True:
            st = request(c, p.GetStatus(), p.Status)
            if st.counters["completed"] == before["completed"] + 1:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert st.counters["cancelled"] == before["cancelled"]


def test_serve_command_plays_speech(pulse, tiny_checkpoint, tmp_path):
    """`nightingale serve --model DIR` (default INT8) answers status and plays speak requests."""
    sock = tmp_path / "cli.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nightingale.cli", "serve", "--model", str(tiny_checkpoint), "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        conn = connect_when_up(sock, proc)
        with conn:
            if conn.hello.state != "ready":
                wait_for(conn, p.Ready)
            st = request(conn, p.GetStatus(), p.Status)
            assert st.model["quantize"] == 8 and st.playback["available"] is True
            with MonitorRecorder(tmp_path / "rec.raw") as rec:
                conn.send(p.Speak(id="hi", text="Hello from the service.", options={"seed": 3, "max_new_tokens": 20, "n_timesteps": 2}))
                done = wait_for(conn, p.Done, id="hi")
                time.sleep(0.2)
                recorded = rec.stop()
            assert done.reason == "completed" and done.audio_s > 0
            # Played while synthesized, on a machine that may be busy: the monitor misses a
            # stream's first ms and ALSA may drop a period, so allow a margin.
            sounding = np.count_nonzero(np.abs(recorded) > 1e-7) / RATE
            assert 0.7 * done.audio_s <= sounding <= 1.05 * done.audio_s + 0.03, (sounding, done)
            conn.send(p.Shutdown())
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "ready" in out and "stopped" in out, out
