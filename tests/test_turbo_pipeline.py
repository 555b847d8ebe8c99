"""Chatterbox Turbo through the product: streaming, voices, the daemon into real playback,
nsay, synth, and the original T3 paired with Turbo's MeanFlow decoder."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from nightingale import protocol as p
from nightingale.dev.metrics import log_spectral_distance
from nightingale.models import cloning
from nightingale.models.positions import START_SPEECH_TOKEN
from nightingale.models.streaming import ChunkSchedule, StreamOptions, render_tokens, stream_tokens
from nightingale.models.t3_turbo import S3GEN_SIL

from .helpers.cli import nsay
from .helpers.daemon import DaemonThread, pcm_of, request, tiny_factory, until_done
from .helpers.playback import assert_same_audio, pulse, pulse_device, wait_generated  # noqa: F401 (fixture)
from .helpers.pulse import MonitorRecorder

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
RATE = 24000


def speech_tokens(tokens: list[int]) -> list[int]:
    """What the stream renders of T3's output: ids below SOS, as they arrive."""
    return [t for t in tokens if t < START_SPEECH_TOKEN]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nightingale.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# -- streaming ------------------------------------------------------------------------------


def test_stream_matches_one_shot(tiny_turbo_model):
    """Turbo streams through the same renderer as the original model: 960 samples per token
    (the 3 silence tokens included); one window reproduces one-shot rendering exactly, and
    windowed chunks stay far closer to it than a render with other noise. Measured on the
    tiny random checkpoint (100 tokens, seeds 0-2): log-spectral distance 4.5-4.8 dB
    streamed vs 7.9 dB with other noise (random weights attend over the whole window)."""
    model = tiny_turbo_model
    chunks = list(model.stream("Hello there, listener.", seed=4, max_new_tokens=40, chunk_schedule="8,1,8"))
    tokens = speech_tokens(list(model.generate_tokens("Hello there, listener.", seed=4, max_new_tokens=40)))
    assert len(chunks) >= 3 and chunks[-1].is_last and tokens[-3:] == [S3GEN_SIL] * 3
    assert sum(len(c.samples) for c in chunks) == 960 * len(tokens)

    conds = model.resolve_voice(None)
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 6561, 100)]
    one_shot = render_tokens(model, tokens, conds.gen, seed=5)
    whole = np.concatenate([c.samples for c in stream_tokens(
        model, iter(tokens), conds, seed=5, options=StreamOptions(chunk_schedule=ChunkSchedule(200)))])
    np.testing.assert_allclose(whole, one_shot, atol=1e-6)
    streamed = np.concatenate([c.samples for c in stream_tokens(model, iter(tokens), conds, seed=5)])
    assert len(streamed) == len(one_shot)
    other_noise = render_tokens(model, tokens, conds.gen, seed=6)
    assert log_spectral_distance(one_shot, streamed) < 6.0 < log_spectral_distance(one_shot, other_noise)


# -- voices -----------------------------------------------------------------------------------


def test_voice_prompt_must_be_longer_than_5_s(tiny_turbo_model):
    wav24 = np.load(FIXTURES / "voice_audio.npz")["wav24"]
    with pytest.raises(cloning.VoiceError, match=r"4\.00 s long; Chatterbox Turbo needs a voice prompt longer than 5 s"):
        tiny_turbo_model.prepare_voice(wav24[: 4 * RATE], sample_rate=RATE)


def test_voice_loudness_matches_reference_and_makes_prompts_gain_invariant(tiny_turbo_model):
    ref = np.load(FIXTURES / "turbo_voice.npz")
    wav24 = np.load(FIXTURES / "voice_audio.npz")["wav24"]
    normed = cloning.normalize_loudness(wav24, RATE, -27.0)
    peak = int(np.argmax(np.abs(wav24)))
    assert normed[peak] / wav24[peak] == pytest.approx(float(ref["gain"]), rel=1e-5)
    np.testing.assert_allclose(normed[:RATE], ref["normed24_head"], atol=1e-6)
    np.testing.assert_allclose(cloning.resample_soxr(normed, RATE, 16000)[:16000], ref["normed16_head"], atol=1e-5)

    loud = tiny_turbo_model.prepare_voice(wav24, sample_rate=RATE)
    quiet = tiny_turbo_model.prepare_voice(wav24 * 0.05, sample_rate=RATE)
    assert loud.t3.cond_prompt_speech_tokens.shape[1] == 135  # 5.4 s at 25 Hz, under the 375 cap
    np.testing.assert_allclose(np.array(quiet.gen["prompt_feat"]), np.array(loud.gen["prompt_feat"]), atol=1e-3)
    np.testing.assert_allclose(np.array(quiet.t3.speaker_emb), np.array(loud.t3.speaker_emb), atol=1e-4)


# -- daemon into real playback, nsay ------------------------------------------------------------


@pytest.fixture(scope="module")
def turbo_daemon(pulse, tiny_turbo_checkpoint, tmp_path_factory):  # noqa: F811
    d = DaemonThread(tmp_path_factory.mktemp("turbo") / "n.sock", tiny_factory(tiny_turbo_checkpoint, 8),
                     playback=True, device=pulse_device()).start()
    yield d
    assert d.stop() == 0


def test_turbo_daemon_streams_into_playback(turbo_daemon, tmp_path):
    with turbo_daemon.connect() as c:
        st = request(c, p.GetStatus(), p.Status)
        assert st.model["family"] == "turbo" and st.model["decoder"] == "meanflow" and st.model["quantize"] == 8
        voices = request(c, p.ListVoices(), p.Voices)
        assert voices.family == "turbo" and "default" in voices.voices
        with MonitorRecorder(tmp_path / "rec.raw") as rec:
            request(c, p.Pause(), p.Paused)
            c.send(p.Speak(id="t", text="Hello there [chuckle], listener.", output="both",
                           options={"seed": 5, "max_new_tokens": 30, "chunk_schedule": "8,1,8"}))
            events: list[p.Event] = []
            wait_generated(c, events)
            request(c, p.Resume(), p.Resumed, skipped=events)
            events += until_done(c, "t")
            time.sleep(0.2)
            recorded = rec.stop()
        done = events[-1]
        streamed = pcm_of(events, "t")
        assert done.reason == "completed" and len(streamed) == round(done.audio_s * RATE) > 0
        assert len(streamed) % 960 == 0
        assert sum(isinstance(e, p.Audio) for e in events) >= 3  # streamed in chunks
        assert_same_audio(recorded, streamed)


class _Socket:
    def __init__(self, path):
        self.socket = path


def test_nsay_lists_voices_with_the_family_and_speaks(turbo_daemon, tmp_path):
    result = nsay(_Socket(turbo_daemon.path), "-v", "?")
    assert result.returncode == 0, result.stderr
    assert "model family: turbo" in result.stderr.decode()
    assert result.stdout.decode().split() == ["default"]
    out = tmp_path / "n.wav"
    result = nsay(_Socket(turbo_daemon.path), "-o", str(out), "--max-new-tokens", "10", "--seed", "1",
                  "Hi [laugh] there.")
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == RATE and len(audio) > 0 and len(audio) % 960 == 0


# -- synth and voices CLI ----------------------------------------------------------------------


def test_synth_cli_with_turbo(tiny_turbo_checkpoint, tiny_turbo_model, tmp_path):
    out = tmp_path / "t.wav"
    res = run_cli("synth", "Hello there.", "-o", str(out), "--model", str(tiny_turbo_checkpoint), "--seed", "7",
                  "--max-new-tokens", "12", "--quantize", "none")
    assert res.returncode == 0, res.stderr
    audio, rate = sf.read(out, dtype="float32")
    expected = tiny_turbo_model.synthesize("Hello there.", seed=7, max_new_tokens=12)
    assert rate == RATE and len(audio) == len(expected) == 960 * 15  # 12 sampled + 3 silence
    assert np.abs(audio - expected).max() < 1e-4 + 1 / 32768


def test_voices_add_with_turbo_checks_length(tiny_turbo_checkpoint, tmp_path):
    wav24 = np.load(FIXTURES / "voice_audio.npz")["wav24"]
    short, good = tmp_path / "short.wav", tmp_path / "good.wav"
    sf.write(short, wav24[: 3 * RATE], RATE)
    sf.write(good, wav24, RATE)
    res = run_cli("voices", "add", "s", str(short), "--model", str(tiny_turbo_checkpoint))
    assert res.returncode == 2 and "longer than 5 s" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("voices", "add", "g", str(good), "--model", str(tiny_turbo_checkpoint))
    assert res.returncode == 0, res.stderr


# -- the original T3 with Turbo's MeanFlow decoder -----------------------------------------------


def test_original_t3_with_meanflow_decoder(tiny_checkpoint, tiny_turbo_checkpoint, tiny_model, tiny_turbo_model):
    from nightingale.models import load_model

    paired = load_model(tiny_checkpoint, decoder=tiny_turbo_checkpoint)
    assert paired.family == "chatterbox" and paired.s3gen.cfg.meanflow
    assert paired.describe()["decoder"] == str(tiny_turbo_checkpoint)
    tokens = list(paired.generate_tokens("Hello there.", seed=3, max_new_tokens=16))
    assert tokens == list(tiny_model.generate_tokens("Hello there.", seed=3, max_new_tokens=16))  # the original T3
    tokens = speech_tokens(tokens)
    ours = paired.tokens_to_audio(tokens, seed=9)
    # exactly Turbo's decoder on the same tokens and voice
    theirs = tiny_turbo_model.tokens_to_audio(tokens, voice=paired.conds, seed=9)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert not np.allclose(ours, tiny_model.tokens_to_audio(tokens, seed=9), atol=1e-3)
    chunks = list(paired.stream("Hello there.", seed=3, max_new_tokens=16, chunk_schedule="4,1,4"))
    assert sum(len(c.samples) for c in chunks) == 960 * len(tokens)


def test_synth_cli_with_decoder(tiny_checkpoint, tiny_turbo_checkpoint, tmp_path):
    out = tmp_path / "d.wav"
    res = run_cli("synth", "Hello there.", "-o", str(out), "--model", str(tiny_checkpoint), "--decoder",
                  str(tiny_turbo_checkpoint), "--seed", "2", "--max-new-tokens", "10", "--stream")
    assert res.returncode == 0, res.stderr
    audio, rate = sf.read(out)
    assert rate == RATE and len(audio) > 0
    res = run_cli("synth", "Hello.", "-o", str(out), "--model", str(tiny_checkpoint), "--decoder", str(tiny_checkpoint))
    assert res.returncode == 2 and "not a Chatterbox Turbo checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_cancel_stops_turbo_within_a_step(tiny_turbo_model):
    """The cancel hooks reach Turbo's T3 loop and the MeanFlow steps: with 100,000 flow
    steps (hours of work) an event that turns set at its 40th check, past the first chunk's
    15 T3 steps, stops the stream inside the flow solve; at its 5th, inside T3."""
    from nightingale.models.chunks import Cancelled
    from .helpers.daemon import CountdownEvent

    for checks in (5, 40):
        event = CountdownEvent(checks)
        with pytest.raises(Cancelled):
            list(tiny_turbo_model.stream("Hello there, a longer sentence.", seed=1, max_new_tokens=200,
                                         chunk_schedule="12,1,12", n_timesteps=100_000, cancel=event))
        assert checks <= event.calls < checks + 20  # T3's own thread checks it too, a few more times


def test_runaway_budget_counts_bpe_tokens(tiny_turbo_model):
    """A segment's token budget scales with Turbo's (longer) BPE tokens: 40 + 25 per text
    token, then the 3 silence tokens (random weights never emit EOS)."""
    n_text = len(tiny_turbo_model.text_tokens("Hi there."))
    chunks = list(tiny_turbo_model.stream("Hi there.", seed=2, chunk_schedule="48,1,48"))
    assert chunks[-1].token_end == 40 + 25 * n_text + 3


def test_service_status_and_install_with_turbo(turbo_daemon, tiny_checkpoint, tmp_path):
    from nightingale.client.service import daemon_status_line

    answering, line = daemon_status_line(str(turbo_daemon.path))
    assert answering and "(turbo)" in line, line
    res = run_cli("service", "install", "--dry-run", "--platform", "linux", "--model", str(tiny_checkpoint),
                  "--decoder", "ResembleAI/chatterbox-turbo")
    assert res.returncode == 0, res.stderr
    assert f"--model {tiny_checkpoint} --quantize 8 --decoder ResembleAI/chatterbox-turbo" in res.stdout, res.stdout
