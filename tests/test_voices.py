"""Voice cloning end to end (loading, resampling, prepare_conditionals parity with the
reference) and the named-voice store (atomic, validated, fast to load)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from nightingale.dev.checkpoint import random_weights
from nightingale.models import campplus as cpm
from nightingale.models import s3tokenizer as stm
from nightingale.models import cloning, voice_store
from nightingale.models import voice_encoder as vem
from nightingale.models.conds import Conditionals, T3Cond
from nightingale.models.t3 import T3Config

FIXTURES = Path(__file__).parent / "fixtures"
CLIP = FIXTURES / "ref_clip.wav"


def _build(module, cls, cfg, prefix: str = ""):
    """A tiny component with the fixture recipe's weights (seed 0, own generator)."""
    weights = random_weights(module.upstream_shapes(cfg), np.random.default_rng(0), prefix)
    model = cls(cfg)
    model.load_weights(list(module.convert_weights({k[len(prefix):]: v for k, v in weights.items()}, cfg).items()), strict=True)
    return model


@pytest.fixture(scope="module")
def tiny():
    """Stands in for ChatterboxModel: .ve, .s3gen.tokenizer / .s3gen.speaker_encoder and
    .t3.cfg (prepare_voice reads the T3 prompt length from it)."""
    return SimpleNamespace(
        t3=SimpleNamespace(cfg=T3Config.tiny()),
        ve=_build(vem, vem.VoiceEncoder, vem.VoiceEncoderConfig.tiny()),
        s3gen=SimpleNamespace(
            tokenizer=_build(stm, stm.S3Tokenizer, stm.S3TokenizerConfig.tiny(), "tokenizer."),
            speaker_encoder=_build(cpm, cpm.CAMPPlus, cpm.CAMPPlusConfig.tiny(), "speaker_encoder."),
        ),
    )


@pytest.fixture(scope="module")
def ref_conds():
    return dict(np.load(FIXTURES / "voice_conds.npz"))


@pytest.fixture(scope="module")
def clip_conds(tiny):
    return cloning.prepare_voice(tiny, CLIP)


def _as_conditionals(ref: dict) -> Conditionals:
    t3 = T3Cond(
        speaker_emb=mx.array(ref["speaker_emb"]),
        cond_prompt_speech_tokens=mx.array(ref["cond_prompt_speech_tokens"]),
        emotion_adv=mx.array(ref["emotion_adv"]),
    )
    gen = {k: mx.array(ref[k]) for k in ("prompt_token", "prompt_token_len", "prompt_feat", "embedding")}
    gen["prompt_feat_len"] = None
    return Conditionals(t3=t3, gen=gen)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tone(seconds: float, sample_rate: int = 16000, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Loading and resampling


def test_load_and_resample_match_librosa():
    audio = np.load(FIXTURES / "voice_audio.npz")
    wav, sample_rate = cloning.load_audio(CLIP)
    assert sample_rate == 22050  # espeak-ng's rate: the load path resamples
    wav24, wav16 = cloning.reference_waveforms(wav, sample_rate)
    # librosa.load/resample call the same soxr_hq; the samples agree exactly.
    np.testing.assert_array_equal(wav24, audio["wav24"])
    np.testing.assert_array_equal(wav16, audio["wav16"])


def test_sinc_resampler_matches_torchaudio():
    wav24 = np.load(FIXTURES / "voice_audio.npz")["wav24"][: cloning.DEC_COND_LEN]
    ref = np.load(FIXTURES / "voice_campplus.npz")["wav16_sinc"]
    ours = cloning.resample_sinc(wav24, 24000, 16000)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats_load(tmp_path, fmt, subtype):
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    wav, sample_rate = cloning.load_audio(CLIP)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(str(path), wav, sample_rate, format=fmt, subtype=subtype)
    loaded, rate = cloning.load_audio(path)
    assert rate == sample_rate and loaded.dtype == np.float32 and loaded.ndim == 1
    assert abs(loaded.shape[0] - wav.shape[0]) < 0.1 * sample_rate  # lossy codecs may pad frames
    rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))  # noqa: E731
    assert rms(loaded) == pytest.approx(rms(wav), rel=0.1)
    if fmt == "FLAC":  # lossless: the samples, to 16-bit precision
        np.testing.assert_allclose(loaded, wav, atol=1 / 32768)


def test_stereo_is_averaged(tmp_path):
    left, right = _tone(2.5, 44100), _tone(2.5, 44100, amplitude=0.1)
    path = tmp_path / "stereo.wav"
    soundfile.write(str(path), np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    wav, rate = cloning.load_audio(path)
    assert rate == 44100
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The recipe against the reference's prepare_conditionals


def test_conditionals_match_reference(clip_conds, ref_conds):
    t3, gen = clip_conds.t3, clip_conds.gen
    np.testing.assert_allclose(np.array(t3.speaker_emb), ref_conds["speaker_emb"], atol=1e-5)
    assert t3.cond_prompt_speech_tokens.dtype == mx.int32
    np.testing.assert_array_equal(np.array(t3.cond_prompt_speech_tokens), ref_conds["cond_prompt_speech_tokens"])
    np.testing.assert_array_equal(np.array(t3.emotion_adv), ref_conds["emotion_adv"])
    # The clip is not a whole number of 40 ms tokens, so the prompt tokens were cut to mel_len // 2.
    assert gen["prompt_feat"].shape[1] == 269 and gen["prompt_token"].shape[1] == 269 // 2
    np.testing.assert_array_equal(np.array(gen["prompt_token"]), ref_conds["prompt_token"])
    np.testing.assert_array_equal(np.array(gen["prompt_token_len"]), ref_conds["prompt_token_len"])
    # prompt_feat is models/dsp.py's S3Gen mel (float32 STFT on both sides).
    np.testing.assert_allclose(np.array(gen["prompt_feat"]), ref_conds["prompt_feat"], atol=5e-4)
    np.testing.assert_allclose(np.array(gen["embedding"]), ref_conds["embedding"], atol=1e-5)
    assert gen["prompt_feat_len"] is None


def test_same_voice_twice_is_bit_identical(tiny, clip_conds):
    again = cloning.prepare_voice(tiny, CLIP)
    for key in ("speaker_emb", "cond_prompt_speech_tokens", "emotion_adv"):
        assert np.array_equal(np.array(getattr(again.t3, key)), np.array(getattr(clip_conds.t3, key)))
    for key in ("prompt_token", "prompt_token_len", "prompt_feat", "embedding"):
        assert np.array_equal(np.array(again.gen[key]), np.array(clip_conds.gen[key]))


def test_long_reference_is_cut_like_the_reference(tiny):
    # 12 s of speech: T3 gets 150 tokens from the first 6 s, S3Gen a 10 s (500-frame) prompt.
    wav, sample_rate = cloning.load_audio(CLIP)
    long = np.tile(wav, 3)[: 12 * sample_rate]
    conds = cloning.compute_conditionals(tiny.ve, tiny.s3gen.tokenizer, tiny.s3gen.speaker_encoder, long, sample_rate, 0.7,
                                         t3_prompt_tokens=tiny.t3.cfg.speech_cond_prompt_len)
    assert conds.t3.cond_prompt_speech_tokens.shape == (1, 150)
    assert conds.gen["prompt_feat"].shape == (1, 500, 80)
    assert conds.gen["prompt_token"].shape == (1, 250)
    assert conds.gen["prompt_token_len"].tolist() == [250]
    assert conds.t3.emotion_adv.tolist() == [[[pytest.approx(0.7)]]]


def test_t3_prompt_length_comes_from_the_t3_config(tiny):
    """prepare_voice caps the T3 prompt at the model's T3Config.speech_cond_prompt_len, not
    at a number of its own: 40 here, where the 6 s window holds 150 tokens."""
    wav, sample_rate = cloning.load_audio(CLIP)
    long = np.tile(wav, 3)[: 12 * sample_rate]
    short_prompt = SimpleNamespace(ve=tiny.ve, s3gen=tiny.s3gen,
                                   t3=SimpleNamespace(cfg=replace(T3Config.tiny(), speech_cond_prompt_len=40)))
    conds = cloning.prepare_voice(short_prompt, long, sample_rate=sample_rate)
    assert conds.t3.cond_prompt_speech_tokens.shape == (1, 40)
    assert cloning.prepare_voice(tiny, long, sample_rate=sample_rate).t3.cond_prompt_speech_tokens.shape == (1, 150)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear VoiceError, and the store untouched


@pytest.fixture
def store_with_a_voice(ref_conds):
    voice_store.add("alice", _as_conditionals(ref_conds), CLIP)
    root = voice_store.voices_dir()
    return root, _snapshot(root)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    short = tmp_path / "short.wav"
    soundfile.write(str(short), _tone(1.5), 16000)
    silent = tmp_path / "silent.wav"
    soundfile.write(str(silent), np.zeros(16000 * 3, np.float32), 16000)
    return {"not audio": text, "too short": short, "silent": silent, "missing": tmp_path / "nope.wav"}


@pytest.mark.parametrize("case, message", [
    ("not audio", "not an audio file"), ("too short", "at least 2 s"), ("silent", "silent"), ("missing", "no such file"),
])
def test_bad_reference_is_a_clear_error(tiny, tmp_path, store_with_a_voice, case, message):
    root, before = store_with_a_voice
    with pytest.raises(cloning.VoiceError, match=message):
        cloning.prepare_voice(tiny, _bad_files(tmp_path)[case])
    assert _snapshot(root) == before


def test_taken_name_without_force(ref_conds, store_with_a_voice):
    root, before = store_with_a_voice
    with pytest.raises(voice_store.VoiceStoreError, match="already exists"):
        voice_store.check_new_name("Alice")
    with pytest.raises(voice_store.VoiceStoreError, match="already exists"):
        voice_store.add("alice", _as_conditionals(ref_conds), CLIP)
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "a\\b", ".hidden", "two words", "é", "\u212a", "x" * 65, "default", "DEFAULT", "a.json"]
)
def test_invalid_names(ref_conds, store_with_a_voice, name):
    root, before = store_with_a_voice
    with pytest.raises(voice_store.VoiceStoreError):
        voice_store.add(name, _as_conditionals(ref_conds), CLIP)
    assert _snapshot(root) == before


# ---------------------------------------------------------------------------------------------
# The store


def test_store_round_trip(clip_conds, monkeypatch):
    assert voice_store.list_voices() == [] and voice_store.names() == []
    info = voice_store.add("Narrator_1", clip_conds, CLIP)
    assert info.name == "narrator_1"  # names are case-folded
    assert info.source_sha256 == hashlib.sha256(CLIP.read_bytes()).hexdigest()
    assert info.duration_s == pytest.approx(soundfile.info(str(CLIP)).duration, abs=1e-3)
    assert info.exaggeration == 0.5
    assert voice_store.names() == ["narrator_1"]
    assert voice_store.describe(info).startswith("narrator_1\t5.4 s from ref_clip.wav")
    assert voice_store.data_dir() == Path(os.environ["NIGHTINGALE_DATA_DIR"])

    assert voice_store.load("NARRATOR_1").t3.speaker_emb is not None  # case-folded lookup

    def no_audio(*args, **kwargs):
        raise AssertionError("a stored voice loads from the store, never from audio")

    monkeypatch.setattr(soundfile, "read", no_audio)  # (its speed is a bench figure, not a test's)
    monkeypatch.setattr(soundfile, "SoundFile", no_audio)
    loaded = voice_store.load("narrator_1")
    mx.eval(loaded.t3.speaker_emb, loaded.gen["prompt_feat"])
    for key in ("speaker_emb", "cond_prompt_speech_tokens", "emotion_adv"):
        assert np.array_equal(np.array(getattr(loaded.t3, key)), np.array(getattr(clip_conds.t3, key)))
        assert getattr(loaded.t3, key).dtype == getattr(clip_conds.t3, key).dtype
    for key in ("prompt_token", "prompt_token_len", "prompt_feat", "embedding"):
        assert np.array_equal(np.array(loaded.gen[key]), np.array(clip_conds.gen[key]))
    assert loaded.gen["prompt_feat_len"] is None

    voice_store.remove("narrator_1")
    assert voice_store.names() == [] and not any(voice_store.voices_dir().iterdir())
    with pytest.raises(voice_store.VoiceNotFoundError):
        voice_store.load("narrator_1")
    with pytest.raises(voice_store.VoiceNotFoundError):
        voice_store.remove("narrator_1")
    with pytest.raises(voice_store.VoiceNotFoundError, match="built-in"):
        voice_store.load("default")


def test_force_replaces_atomically(ref_conds, clip_conds, store_with_a_voice):
    root, _ = store_with_a_voice
    old_weights = voice_store.info("alice").weights
    voice_store.add("alice", clip_conds, CLIP, force=True)
    new_weights = voice_store.info("alice").weights
    assert new_weights != old_weights
    assert sorted(p.name for p in root.iterdir()) == sorted(["alice.json", new_weights])  # old tensors gone
    assert np.array_equal(np.array(voice_store.load("alice").gen["prompt_feat"]), np.array(clip_conds.gen["prompt_feat"]))


def test_a_crash_mid_add_leaves_the_old_voice(ref_conds, clip_conds, store_with_a_voice, monkeypatch):
    root, before = store_with_a_voice
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("power cut")
        return real_replace(src, dst)

    with monkeypatch.context() as patch, pytest.raises(OSError, match="power cut"):
        patch.setattr(voice_store.os, "replace", crash_on_publish)
        voice_store.add("alice", clip_conds, CLIP, force=True)
    # The record still points at the old tensors; only an unreferenced new tensor file remains.
    assert (root / "alice.json").read_bytes() == before["alice.json"]
    assert np.array_equal(np.array(voice_store.load("alice").gen["prompt_feat"]), ref_conds["prompt_feat"])
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_debris_of_crashed_adds_is_swept(ref_conds):
    root = voice_store.voices_dir()
    root.mkdir(parents=True)
    orphan, temp, fresh = root / "bob-0123456789ab.safetensors", root / ".tmp-x.part", root / "carol-ba9876543210.safetensors"
    for path in (orphan, temp, fresh):
        path.write_bytes(b"partial")
    old = time.time() - 2 * voice_store.STALE_AFTER_S
    os.utime(orphan, (old, old))
    os.utime(temp, (old, old))
    voice_store.add("alice", _as_conditionals(ref_conds), CLIP)
    assert not orphan.exists() and not temp.exists()
    assert fresh.exists()  # young enough to belong to an add in progress


def test_damaged_record_is_reported(ref_conds):
    voice_store.add("alice", _as_conditionals(ref_conds), CLIP)
    record = voice_store.voices_dir() / "alice.json"
    data = json.loads(record.read_text())
    (voice_store.voices_dir() / data["weights"]).write_bytes(b"garbage")
    with pytest.raises(voice_store.VoiceStoreError, match="damaged"):
        voice_store.load("alice")
    record.write_text("{not json")
    assert voice_store.list_voices() == []  # skipped with a warning, not fatal
    voice_store.add("alice", _as_conditionals(ref_conds), CLIP, force=True)  # force repairs it
    assert voice_store.names() == ["alice"]
