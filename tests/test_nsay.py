"""`nsay` as a subprocess against a real daemon on the tiny checkpoint.

The daemon plays into a PulseAudio null sink (tests/helpers/pulse.py), whose monitor is recorded,
so "speech started" is checked on real played audio. The tiny model rarely emits EOS, so
every utterance is bounded with --max-new-tokens; a fixed --seed makes files repeatable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile

from nightingale import protocol as p
from nightingale.client.connection import Connection, DaemonUnavailable

from .helpers.cli import NIGHTINGALE, NSAY, nsay
from .helpers.pulse import PulseNullSink

SHORT = ["--max-new-tokens", "8", "--seed", "1"]
@dataclass
class Daemon:
    socket: Path
    process: subprocess.Popen
    log: Path

    def status(self) -> p.Status:
        with Connection(self.socket) as conn:
            conn.send(p.GetStatus())
            while True:
                event = conn.recv(timeout=10)
                if isinstance(event, p.Status):
                    return event


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, NIGHTINGALE_DATA_DIR=str(tmp / "data"), HF_HUB_OFFLINE="1", XDG_STATE_HOME=str(tmp / "state"))
    env.pop("NIGHTINGALE_SOCKET", None)
    env.update(extra)
    return env


def _wait_ready(socket: Path, process: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"daemon exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            with Connection(socket, timeout=5) as conn:
                if conn.hello.state == "ready":
                    return
                while not isinstance(conn.recv(timeout=deadline - time.monotonic()), p.Ready):
                    pass
                return
        except DaemonUnavailable:
            time.sleep(0.1)
    pytest.fail(f"daemon not ready within {timeout_s} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def pulse():
    sink = PulseNullSink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, pulse, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nsayd")
    sock = tmp / "ng.sock"
    log = tmp / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*NIGHTINGALE, "serve", "--model", str(tiny_checkpoint), "--quantize", "none", "--socket", str(sock)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(tmp),
        )
    try:
        _wait_ready(sock, proc, log)
        yield Daemon(sock, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.count("\n") == 1 and text.startswith("nsay: "), text
    return text


def recorded_audio(path: Path, threshold: float = 1e-3) -> bool:
    data = np.fromfile(path, dtype="<f4") if path.exists() else np.zeros(0, np.float32)
    return bool(data.size and np.abs(data).max() > threshold)


# ----------------------------------------------------------------------------- without a daemon


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus", "hi"], "unrecognized arguments"),
        (["-r", "20", "hi"], "words per minute"),
        (["-o", "out.mp3", "hi"], "cannot tell the audio format"),
        (["--data-format", "LEI16", "hi"], "need -o"),
        (["--no-wait", "-o", "x.wav", "hi"], "--no-wait"),
        (["-f", "notes.txt", "hi"], "not both"),
        (["--priority", "urgent", "hi"], "invalid choice"),
        (["-f", "/nonexistent/notes.txt"], "cannot read"),
    ],
)
def test_bad_flags_exit_2(args, message, tmp_path):
    result = nsay(None, "--socket", str(tmp_path / "none.sock"), *args)
    assert result.returncode == 2
    assert message in one_line(result.stderr)


def test_missing_daemon_exit_1(tmp_path):
    result = nsay(None, "--socket", str(tmp_path / "none.sock"), "hello")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "no Nightingale daemon" in line and "nightingale serve" in line and "--spawn" in line


# ----------------------------------------------------------------------------- with the daemon


def test_argument_text_is_spoken_without_numpy(daemon, pulse, tmp_path):
    # -X importtime lists every module the plain path loads.
    argv = [sys.executable, "-X", "importtime", "-c", "import sys; from nightingale.client.nsay import main; sys.exit(main())"]
    with pulse.recorder(tmp_path / "rec.raw") as rec:
        result = subprocess.run(
            [*argv, "--socket", str(daemon.socket), "--progress", *SHORT, "Build finished."],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert recorded_audio(rec.path)
    lines = result.stderr.decode().splitlines()
    modules = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert "nightingale.client.nsay" in modules
    for heavy in ("numpy", "mlx", "mlx.core", "soundfile", "sounddevice", "nightingale.models"):
        assert heavy not in modules, f"nsay's plain path imported {heavy}"
    assert any(line.startswith("nsay: done:") for line in lines)


def test_piped_text_starts_before_stdin_closes(daemon, pulse, tmp_path):
    proc = subprocess.Popen(
        [*NSAY, "--socket", str(daemon.socket), *SHORT], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with pulse.recorder(tmp_path / "rec.raw") as rec:
            proc.stdin.write(b"First line of the build log.\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 30
            while not recorded_audio(rec.path):
                assert time.monotonic() < deadline, "no audio within 30 s of the first line"
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
            assert proc.poll() is None  # still waiting for more input: speech began first
            proc.stdin.write(b"Second line.\n")
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_output_files_in_each_format(daemon, tmp_path):
    text = "One two three."
    wav = tmp_path / "note.wav"
    assert nsay(daemon, "-o", str(wav), *SHORT, text).returncode == 0
    info = soundfile.info(wav)
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 24000, 1)
    reference, _ = soundfile.read(wav, dtype="float32")
    assert reference.size > 2400 and np.isfinite(reference).all() and np.abs(reference).max() > 1e-3

    aiff = tmp_path / "note.aiff"
    result = nsay(daemon, "-o", str(aiff), "--data-format", "BEI24@16000", *SHORT, text)
    assert result.returncode == 0, result.stderr
    info = soundfile.info(aiff)
    assert (info.format, info.subtype, info.samplerate) == ("AIFF", "PCM_24", 16000)
    assert abs(info.frames - reference.size * 16000 / 24000) <= 2  # same speech, resampled

    # -f FILE (a text stream) into FLAC, twice as fast: same seed, half the length.
    notes = tmp_path / "notes.txt"
    notes.write_text(text + "\n")
    flac = tmp_path / "note.flac"
    result = nsay(daemon, "-o", str(flac), "-f", str(notes), "-r", "350", *SHORT)
    assert result.returncode == 0, result.stderr
    fast, sr = soundfile.read(flac, dtype="float32")
    assert soundfile.info(flac).format == "FLAC" and sr == 24000
    assert abs(fast.size - reference.size / 2) <= 2

    assert sorted(os.listdir(tmp_path)) == ["note.aiff", "note.flac", "note.wav", "notes.txt"]  # no temporaries


def test_list_voices_and_unknown_voice(daemon):
    result = nsay(daemon, "-v", "?")
    assert result.returncode == 0
    assert "default" in result.stdout.decode().split()

    result = nsay(daemon, "-v", "no-such-voice", *SHORT, "Hello.")
    assert result.returncode == 2
    assert "no-such-voice" in one_line(result.stderr)


def test_unknown_voice_with_output_leaves_no_file(daemon, tmp_path):
    target = tmp_path / "x.wav"
    result = nsay(daemon, "-o", str(target), "-v", "no-such-voice", *SHORT, "Hello.")
    assert result.returncode == 2
    assert os.listdir(tmp_path) == []  # no file, no temporary left behind


def test_stop_interrupts_speech(daemon):
    long_speech = subprocess.Popen(
        [*NSAY, "--socket", str(daemon.socket), "--progress", "--max-new-tokens", "2000", "--seed", "2",
         "This sentence goes on and on for a long while."],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        seen = b""
        while b"s of audio" not in seen:  # synthesis has produced its first chunk
            line = long_speech.stderr.readline()
            assert line, f"nsay ended early: {seen.decode()}"
            seen += line
        t0 = time.monotonic()
        stop = nsay(daemon, "--stop")
        assert stop.returncode == 0, stop.stderr
        code = long_speech.wait(timeout=15)
        assert time.monotonic() - t0 < 10
        rest = long_speech.stderr.read().decode()
        assert code == 1
        assert "cancelled" in rest.splitlines()[-1]
    finally:
        if long_speech.poll() is None:
            long_speech.kill()
    assert daemon.status().current is None


def test_no_wait_returns_once_queued(daemon):
    before = daemon.status().counters
    result = nsay(daemon, "--no-wait", "--max-new-tokens", "4", "Queued for later.")
    assert result.returncode == 0, result.stderr
    # nsay is gone before the speech is (synthesis alone takes longer than its exit) ...
    assert daemon.status().counters["completed"] == before["completed"]
    deadline = time.monotonic() + 30
    while (after := daemon.status().counters)["completed"] == before["completed"]:
        assert time.monotonic() < deadline, "the queued speech never completed"
        time.sleep(0.1)
    # ... and the daemon finished it rather than cancelling it when nsay disconnected.
    assert after["cancelled"] == before["cancelled"]


def test_interrupt_cancels_own_speech(daemon):
    proc = subprocess.Popen(
        [*NSAY, "--socket", str(daemon.socket), "--progress", "--max-new-tokens", "2000", "Interrupted."],
        stderr=subprocess.PIPE,
        # Ctrl-C reaches nsay as from a terminal, whatever this process inherited (a background
        # job of a non-interactive shell starts with SIGINT ignored, and children keep that).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while b"s of audio" not in (line := proc.stderr.readline()):
            assert line, "nsay ended early"
        before = daemon.status().counters["cancelled"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=15) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert daemon.status().counters["cancelled"] == before + 1


def test_rate_and_device_play_locally(daemon, pulse, tmp_path):
    with pulse.recorder(tmp_path / "rec.raw") as rec:
        result = nsay(daemon, "-r", "260", "-a", "pulse", *SHORT, "Faster now.")
        assert result.returncode == 0, result.stderr
        assert recorded_audio(rec.path)
    listing = nsay(None, "-a", "?")
    assert listing.returncode == 0 and "pulse" in listing.stdout.decode()


@pytest.mark.skipif(sys.platform == "darwin", reason="drives the Linux service path")
def test_service_status_asks_the_installed_daemon(daemon, tmp_path):
    from .helpers.cli import make_fake_systemctl, nightingale

    env, _ = make_fake_systemctl(tmp_path)
    env.pop("NIGHTINGALE_SOCKET", None)
    assert nightingale("service", "install", "--socket", str(daemon.socket), env=env).returncode == 0
    result = nightingale("service", "status", env=env)  # the socket is read back from the unit
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"daemon: ready, pid {daemon.process.pid}" in result.stdout


def test_spawn_starts_a_daemon(tiny_checkpoint, pulse, tmp_path):
    sock = tmp_path / "spawned.sock"
    env = _env(tmp_path, NIGHTINGALE_MODEL=str(tiny_checkpoint))
    result = nsay(None, "--socket", str(sock), "--spawn", "--progress", *SHORT, "Started on demand.", env=env)
    try:
        stderr = result.stderr.decode()
        assert result.returncode == 0, stderr
        assert "started the daemon" in stderr
        log = Path(stderr.split("log ", 1)[1].split(")", 1)[0])
        assert log.is_file() and str(log).startswith(str(tmp_path))  # XDG_STATE_HOME honoured
        loading = [line for line in stderr.splitlines() if "loading the model" in line]
        assert loading, stderr  # progress shows the daemon's messages, not its log records
        assert not any(" INFO " in line or "nightingale.daemon" in line for line in loading), loading
    finally:
        try:
            with Connection(sock, timeout=5) as conn:
                conn.send(p.GetStatus())
                status = conn.recv(timeout=10)
                while not isinstance(status, p.Status):
                    status = conn.recv(timeout=10)
                conn.send(p.Shutdown())
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(status.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        except DaemonUnavailable:
            pass


def test_spawn_that_cannot_load_says_how_in_one_line(tmp_path):
    sock = tmp_path / "spawned.sock"
    env = _env(tmp_path)  # no NIGHTINGALE_MODEL, offline: the default repo cannot be had
    env.pop("NIGHTINGALE_MODEL", None)
    result = nsay(None, "--socket", str(sock), "--spawn", *SHORT, "Hello.", env=env, timeout=120)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "could not be loaded" not in line and "Error:" not in line  # no repeated prefix, no class name
    assert "NIGHTINGALE_MODEL=DIR" in line and "pass --model" not in line  # nsay has no --model


# ----------------------------------------------------------------------------- voices and the daemon

CLIP = Path(__file__).parent / "fixtures" / "ref_clip.wav"


def _voices_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    """`nightingale voices ...` on the daemon's voice store, finding the daemon by its socket."""
    env = _env(daemon.socket.parent, NIGHTINGALE_SOCKET=str(daemon.socket))
    return subprocess.run([*NIGHTINGALE, "voices", *args], capture_output=True, text=True, env=env, timeout=180)


def _read_audio(path: Path) -> np.ndarray:
    return soundfile.read(path, dtype="float32")[0]


def test_daemon_notices_removed_and_replaced_voices(daemon, tiny_checkpoint, tmp_path):
    clip, rate = soundfile.read(CLIP, dtype="float32")
    other = tmp_path / "other.wav"  # a second speaker: the clip played backwards
    soundfile.write(other, clip[::-1].copy(), rate)
    model = ["--model", str(tiny_checkpoint)]

    def speak(voice: str, name: str) -> np.ndarray:
        result = nsay(daemon, "-v", voice, *SHORT, "-o", str(tmp_path / name), "Which voice is this?")
        assert result.returncode == 0, result.stderr
        return _read_audio(tmp_path / name)

    assert _voices_cli(daemon, "add", "carol", str(CLIP), *model).returncode == 0
    first = speak("carol", "first.wav")
    replaced = _voices_cli(daemon, "add", "carol", str(other), "--force", *model)
    assert replaced.returncode == 0, replaced.stderr
    second = speak("carol", "second.wav")
    assert _voices_cli(daemon, "add", "dave", str(other), *model).returncode == 0
    fresh = speak("dave", "fresh.wav")  # the new timbre, loaded for the first time
    assert np.array_equal(second, fresh)
    assert not np.array_equal(first, second)

    assert _voices_cli(daemon, "remove", "carol").returncode == 0
    gone = nsay(daemon, "-v", "carol", *SHORT, "-o", str(tmp_path / "gone.wav"), "Still here?")
    assert gone.returncode == 2 and "carol" in one_line(gone.stderr)
    assert not (tmp_path / "gone.wav").exists()


def test_voices_add_and_synth_use_the_running_daemons_model(daemon, tmp_path):
    # No --model and no NIGHTINGALE_MODEL: the default repo is not reachable offline, the
    # daemon's checkpoint is.
    added = _voices_cli(daemon, "add", "erin", str(CLIP))
    assert added.returncode == 0, added.stderr
    env = _env(daemon.socket.parent, NIGHTINGALE_SOCKET=str(daemon.socket))
    out = tmp_path / "erin.wav"
    synth = subprocess.run(
        [*NIGHTINGALE, "synth", "Hello.", "--voice", "erin", "--max-new-tokens", "4", "--quantize", "none", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    assert len(_read_audio(out)) > 0
    assert _voices_cli(daemon, "remove", "erin").returncode == 0


def test_relative_voice_path_is_resolved_by_the_client(daemon, tiny_checkpoint, tmp_path):
    relative = subprocess.run(
        [*NSAY, "--socket", str(daemon.socket), "-v", "conds.pt", *SHORT, "-o", str(tmp_path / "rel.wav"), "Here."],
        capture_output=True, timeout=60, cwd=tiny_checkpoint,
    )  # fmt: skip
    assert relative.returncode == 0, relative.stderr
    absolute = nsay(daemon, "-v", str(tiny_checkpoint / "conds.pt"), *SHORT, "-o", str(tmp_path / "abs.wav"), "Here.")
    assert absolute.returncode == 0, absolute.stderr
    assert np.array_equal(_read_audio(tmp_path / "rel.wav"), _read_audio(tmp_path / "abs.wav"))


def test_no_playback_daemon_tells_nsay_users_what_to_do(tiny_checkpoint, tmp_path):
    sock, log = tmp_path / "quiet.sock", tmp_path / "quiet.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*NIGHTINGALE, "serve", "--model", str(tiny_checkpoint), "--quantize", "none", "--socket", str(sock), "--no-playback"],
            stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path),
        )  # fmt: skip
    try:
        _wait_ready(sock, proc, log)
        result = subprocess.run([*NSAY, "--socket", str(sock), *SHORT, "Hello."], capture_output=True, timeout=60)
        assert result.returncode != 0
        line = one_line(result.stderr)
        assert "ask for output" not in line  # protocol wording no nsay user can act on
        assert "-o FILE" in line and "libportaudio2" in line
        written = subprocess.run([*NSAY, "--socket", str(sock), *SHORT, "-o", str(tmp_path / "x.wav"), "Hello."], capture_output=True, timeout=60)
        assert written.returncode == 0, written.stderr  # and what it suggests works
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
