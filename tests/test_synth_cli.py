"""`nightingale synth` end to end on a tiny checkpoint, and its one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from .helpers.cli import run_cli



def test_synth_writes_24k_mono_wav_of_960_samples_per_token(tiny_checkpoint, tiny_model, tmp_path):
    out = tmp_path / "hello.wav"
    res = run_cli("synth", "Hello there.", "-o", str(out), "--model", str(tiny_checkpoint), "--seed", "7",
                  "--max-new-tokens", "12", "--quantize", "none")
    assert res.returncode == 0, res.stderr
    audio, rate = sf.read(out, dtype="float32")
    info = sf.info(out)
    assert rate == 24000 and info.channels == 1 and info.format == "WAV"
    tokens = [t for t in tiny_model.generate_tokens("Hello there.", seed=7, max_new_tokens=12) if t < 6561]
    assert len(audio) == 960 * len(tokens) > 0
    expected = tiny_model.synthesize("Hello there.", seed=7, max_new_tokens=12)
    # Two float32 runs of the same model agree to float32 rounding scaled by the signal (the
    # order of BLAS sums depends on threads and load: ~1e-4 relative through the vocoder),
    # and the file holds 16-bit samples (half a step of rounding).
    peak = float(np.abs(expected).max())
    assert np.abs(audio - expected).max() <= 1e-3 * peak + 0.5 / 32768


def test_synth_streamed_reports_ttfa_and_rtf(tiny_checkpoint, tmp_path):
    out = tmp_path / "s.flac"
    res = run_cli("synth", "Hello there, streaming.", "-o", str(out), "--stream", "--model", str(tiny_checkpoint),
                  "--seed", "1", "--max-new-tokens", "30")
    assert res.returncode == 0, res.stderr
    assert "TTFA" in res.stderr and "RTF" in res.stderr
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) % 960 == 0 and len(audio) > 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["synth", "   ", "-o", "{tmp}/x.wav"], 2, "text is empty"),
        (["synth", "Hi.", "-o", "{tmp}/x.wav", "--voice", "nobody"], 2, "nobody"),
        (["synth", "Hi.", "-o", "{tmp}/missing-dir/x.wav"], 2, "no such directory"),
        (["synth", "Hi.", "-o", "{tmp}/x.mp9"], 2, "format"),
        (["synth", "Hi.", "--model", "{tmp}/no-such-checkpoint", "-o", "{tmp}/x.wav"], 2, "no-such-checkpoint"),
    ],
)
def test_synth_bad_input_is_one_line_without_traceback(tiny_checkpoint, tmp_path, args, code, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_checkpoint)]
    res = run_cli(*args)
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("nightingale:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not any(p.name.endswith(".wav") for p in tmp_path.iterdir())


def test_synth_messages_name_the_voice_and_no_missing_option(tiny_checkpoint, tmp_path):
    res = run_cli("synth", "Hi.", "--voice", "zelda", "-o", str(tmp_path / "z.wav"), "--model", str(tiny_checkpoint))
    assert res.returncode == 2 and "no voice named 'zelda'" in res.stderr, res.stderr
    res = run_cli("synth", "Hi.", "-o", str(tmp_path / "z.mp3"), "--model", str(tiny_checkpoint))
    assert res.returncode == 2 and ".wav" in res.stderr, res.stderr
    assert "--file-format" not in res.stderr  # synth has no such option


def test_unwritable_output_leaves_nothing(tiny_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out = target / "x.wav"
        else:
            out = locked / "x.wav"
        res = run_cli("synth", "Hi.", "-o", str(out), "--model", str(tiny_checkpoint), "--max-new-tokens", "4")
        assert res.returncode in (1, 2) and "Traceback" not in res.stderr
        assert not out.exists()
    finally:
        locked.chmod(0o700)


def _parsers(parser, path=("nightingale",)):
    """Every (command path, parser) of the `nightingale` CLI, sub-commands included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_command_and_option_is_described():
    import argparse

    from nightingale.cli import build_parser

    undescribed = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                undescribed += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                undescribed.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert undescribed == []


def test_service_help_lists_its_actions_and_status_has_no_dry_run():
    listing = run_cli("service", "--help")
    assert listing.returncode == 0
    described = " ".join(listing.stdout.split())
    for action, what in (("install", "write the service file"), ("uninstall", "stop the service"), ("status", "whether")):
        assert action in described and what in described, listing.stdout
    status = run_cli("service", "status", "--help")
    assert status.returncode == 0 and "--dry-run" not in status.stdout
    models = run_cli("models", "--help")
    assert "inspect" not in models.stdout  # there is no inspect action


def test_models_convert_hint_names_its_own_arguments(tmp_path):
    res = run_cli("models", "convert", "ResembleAI/chatterbox", str(tmp_path / "out"),
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--model" not in res.stderr and "give SRC as a directory" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_synth_speaks_a_language_and_names_the_supported_ones(tiny_mtl_checkpoint, tmp_path):
    from nightingale.models import load_model

    out = tmp_path / "fr.wav"
    res = run_cli("synth", "Bonjour tout le monde.", "-o", str(out), "--model", str(tiny_mtl_checkpoint), "--seed", "3",
                  "--max-new-tokens", "12", "--quantize", "none", "--language", "fr")
    assert res.returncode == 0, res.stderr
    audio, _ = sf.read(out, dtype="float32")
    model = load_model(tiny_mtl_checkpoint)
    expected = model.synthesize("Bonjour tout le monde.", language="fr", seed=3, max_new_tokens=12)
    assert len(audio) == len(expected) > 0 and np.abs(audio - expected).max() < 1e-4 + 1 / 32768
    bad = run_cli("synth", "Hallo.", "-o", str(tmp_path / "x.wav"), "--model", str(tiny_mtl_checkpoint), "-l", "xx")
    assert bad.returncode == 2 and not (tmp_path / "x.wav").exists()
    assert bad.stderr.strip().splitlines()[-1].endswith("supported: ar, da, de, el, en, es, fi, fr, he, hi, it, ja, ko, ms, nl, no, pl, pt, ru, sv, sw, tr, zh")


def test_synth_english_model_refuses_other_languages(tiny_checkpoint, tmp_path):
    res = run_cli("synth", "Hallo.", "-o", str(tmp_path / "x.wav"), "--model", str(tiny_checkpoint), "-l", "de")
    assert res.returncode == 2 and "supported: en" in res.stderr and len(res.stderr.strip().splitlines()) == 1
