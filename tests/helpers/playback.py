"""Real playback in tests: the PulseAudio null sink fixture, the device the daemon plays
to, and the comparison of what played with what was generated (tests/helpers/pulse.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nightingale import protocol as p
from nightingale.client.connection import Connection

from .daemon import TIMEOUT, request
from .pulse import PulseNullSink, PulseUnavailable, compare_playback


def assert_same_audio(recorded: np.ndarray, reference: np.ndarray, note: str = "") -> None:
    """The recording holds the reference: its waveform block by block, in order, with the
    whole tail, and the same amount of sound. Slack: the monitor can miss a few ms at a
    stream's start, and a starved machine can lose a period to an ALSA underrun."""
    m = compare_playback(recorded, reference)
    assert m["matched"] >= 0.9 and m["in_order"] and m["tail"], (m, note)
    assert 0.9 <= m["sound_ratio"] <= 1.03, (m, note)


@pytest.fixture(scope="module")
def pulse():
    sink = PulseNullSink()
    try:
        sink.start()
    except PulseUnavailable as err:
        pytest.fail(f"real-audio tests need PulseAudio: {err}", pytrace=False)
    yield sink
    sink.stop()


def pulse_device() -> str | None:
    """ALSA's `pulse` device when present (chosen by name, as --device does), else the default."""
    import sounddevice as sd

    names = [d["name"] for d in sd.query_devices() if d["max_output_channels"] > 0]
    return "pulse" if "pulse" in names else None


def wait_generated(conn: Connection, events: list, timeout: float = TIMEOUT) -> p.Status:
    """Status once synthesis is over and the audio waits in the playback buffer; the
    utterance's events read meanwhile go to `events`."""
    deadline = time.monotonic() + timeout
    while True:
        st = request(conn, p.GetStatus(), p.Status, skipped=events)
        if st.current is None and st.playback["buffered_s"] > 0:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
