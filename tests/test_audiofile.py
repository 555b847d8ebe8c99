"""nsay's audio side: -o format options, the atomic streaming writer, and the WSOLA time-stretch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile

from nightingale.audiofile import AudioFileWriter, DataFormat, parse_data_format, resolve_output
from nightingale.client.nsay import NATURAL_WPM, WPM_MAX, WPM_MIN, speed_for_wpm
from nightingale.timestretch import TimeStretcher

SR = 24000


def tone(freq: float, seconds: float, amp: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(x: np.ndarray, sr: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / sr)[spectrum.argmax()])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("LEI16@24000", DataFormat("I", 16, "LE", 24000)),
        ("BEI24", DataFormat("I", 24, "BE", None)),
        ("f32", DataFormat("F", 32, None, None)),
        ("UI8@8000", DataFormat("UI", 8, None, 8000)),
        ("@16000", DataFormat(None, None, None, 16000)),
    ],
)
def test_parse_data_format(text, expected):
    assert parse_data_format(text) == expected


@pytest.mark.parametrize("text", ["", "I12", "F16", "LEI16@", "XXI16", "I16@4000", "aac"])
def test_parse_data_format_rejects(text):
    with pytest.raises(ValueError):
        parse_data_format(text)


def test_resolve_output_by_extension_and_flag(tmp_path):
    assert resolve_output(tmp_path / "a.wav").container == "WAV"
    assert resolve_output(tmp_path / "a.AIFF").container == "AIFF"
    assert resolve_output(tmp_path / "a.flac", data_format="I24").subtype == "PCM_24"
    assert resolve_output(tmp_path / "a.snd", file_format="WAVE").container == "WAV"
    assert resolve_output(tmp_path / "a.wav", file_format="flac").container == "FLAC"  # the flag wins
    for path, ff, df, message in [
        (tmp_path / "a.mp3", None, None, "cannot tell"),
        (tmp_path / "a.wav", "ogg", None, "file-format"),
        (tmp_path / "a.wav", None, "BEI16", "little-endian"),
        (tmp_path / "a.aiff", None, "LEI16", "big-endian"),
        (tmp_path / "a.flac", None, "F32", "cannot hold"),
        (tmp_path / "missing" / "a.wav", None, None, "no such directory"),
        (tmp_path, "wav", None, "directory"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_output(path, ff, df)


@pytest.mark.parametrize(
    "name, data_format, container, subtype, rate",
    [
        ("out.wav", None, "WAV", "PCM_16", SR),
        ("out.wav", "LEF32@16000", "WAV", "FLOAT", 16000),
        ("out.aiff", "BEI24", "AIFF", "PCM_24", SR),
        ("out.aif", "I16@22050", "AIFF", "PCM_16", 22050),
        ("out.flac", None, "FLAC", "PCM_16", SR),
        ("out.flac", "I24@48000", "FLAC", "PCM_24", 48000),
    ],
)
def test_writer_formats_round_trip(tmp_path, name, data_format, container, subtype, rate):
    x = tone(440, 1.0)
    spec = resolve_output(tmp_path / name, data_format=data_format)
    with AudioFileWriter(spec) as writer:
        for i in range(0, x.size, 1234):  # streamed in uneven chunks
            writer.write(x[i : i + 1234], SR)
    info = soundfile.info(tmp_path / name)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (container, subtype, rate, 1)
    y, sr = soundfile.read(tmp_path / name, dtype="float32")
    assert abs(y.size - rate) <= 2  # one second, resampled in a stream
    assert abs(peak_frequency(y, sr) - 440) < 2
    if rate == SR:
        assert np.max(np.abs(y - x)) < 1e-3 if subtype != "FLOAT" else np.array_equal(y, x)
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind
    assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writer_clips_integer_formats(tmp_path):
    spec = resolve_output(tmp_path / "loud.wav")
    with AudioFileWriter(spec) as writer:
        writer.write(np.array([2.0, -3.0, 0.5], dtype=np.float32), SR)
    y, _ = soundfile.read(tmp_path / "loud.wav", dtype="int16")
    assert y.tolist() == [32767, -32768, 16384]  # clipped, not wrapped around


def test_writer_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "keep.wav"
    target.write_bytes(b"previous contents")
    with pytest.raises(RuntimeError):
        with AudioFileWriter(resolve_output(target)) as writer:
            writer.write(tone(220, 0.5), SR)
            raise RuntimeError("daemon went away")
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["keep.wav"]


def test_writer_empty_stream_is_a_valid_file(tmp_path):
    spec = resolve_output(tmp_path / "empty.wav")
    AudioFileWriter(spec).commit(sample_rate_if_empty=SR)
    info = soundfile.info(tmp_path / "empty.wav")
    assert info.frames == 0 and info.samplerate == SR


@pytest.mark.parametrize("speed", [0.5, 0.8, 1.3, 2.0])
def test_time_stretch_keeps_pitch_and_scales_length(speed):
    x = tone(220, 1.5)
    stretcher = TimeStretcher(speed, SR)
    y = np.concatenate([stretcher.push(x), stretcher.flush()])
    assert y.size == round(x.size / speed)
    body = y[SR // 10 : -SR // 10]
    assert abs(peak_frequency(body) - 220) < 2  # pitch preserved
    # Aligned overlap-add keeps the level of a steady tone (no phasing dips).
    assert np.std(body) * np.sqrt(2) == pytest.approx(0.5, rel=0.02)


def test_time_stretch_is_chunking_invariant():
    rng = np.random.default_rng(0)
    x = (tone(180, 1.0) + 0.05 * rng.standard_normal(SR)).astype(np.float32)
    whole = TimeStretcher(1.4, SR)
    expected = np.concatenate([whole.push(x), whole.flush()])
    streamed = TimeStretcher(1.4, SR)
    parts, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 2500))
        parts.append(streamed.push(x[i : i + n]))
        i += n
    parts.append(streamed.flush())
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_wpm_range():
    assert speed_for_wpm(NATURAL_WPM) == 1.0
    assert speed_for_wpm(WPM_MAX) == pytest.approx(2.0)
    assert speed_for_wpm(WPM_MIN) == pytest.approx(WPM_MIN / NATURAL_WPM)
    for bad in (WPM_MIN - 1, WPM_MAX + 1, 0):
        with pytest.raises(ValueError, match="words per minute"):
            speed_for_wpm(bad)
    passthrough = TimeStretcher(1.0, SR)
    x = tone(300, 0.1)
    np.testing.assert_array_equal(passthrough.push(x), x)
