"""`nightingale voices add/list/remove` and `synth --voice` end to end on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

from .helpers.cli import run_cli

CLIP = Path(__file__).parent / "fixtures" / "ref_clip.wav"


def test_add_list_synth_remove(tiny_checkpoint, tmp_path):
    env = {"NIGHTINGALE_DATA_DIR": str(tmp_path / "data")}
    model = ["--model", str(tiny_checkpoint)]
    res = run_cli("voices", "add", "alice", str(CLIP), *model, env=env)
    assert res.returncode == 0, res.stderr
    listed = run_cli("voices", "list", *model, env=env)
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert names[:2] == ["default", "alice"]

    again = run_cli("voices", "add", "alice", str(CLIP), *model, env=env)
    assert again.returncode == 2 and "alice" in again.stderr and "Traceback" not in again.stderr

    out = tmp_path / "alice.wav"
    res = run_cli("synth", "Hello from Alice.", "--voice", "alice", "-o", str(out), "--seed", "3",
                  "--max-new-tokens", "10", *model, env=env)
    assert res.returncode == 0, res.stderr
    audio, rate = sf.read(out)
    assert rate == 24000 and 0 < len(audio) <= 9600 and len(audio) % 960 == 0

    assert run_cli("voices", "remove", "alice", env=env).returncode == 0
    gone = run_cli("synth", "Hi.", "--voice", "alice", "-o", str(tmp_path / "x.wav"), *model, env=env)
    assert gone.returncode == 2 and "alice" in gone.stderr


def test_add_rejects_bad_input_with_one_line(tiny_checkpoint, tmp_path):
    env = {"NIGHTINGALE_DATA_DIR": str(tmp_path / "data")}
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    for args in (["bob", str(tmp_path / "missing.wav")], ["bob", str(not_audio)], ["../bob", str(CLIP)]):
        res = run_cli("voices", "add", *args, "--model", str(tiny_checkpoint), env=env)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and res.stderr.startswith("nightingale:")
    assert not (tmp_path / "data" / "voices").exists() or not any((tmp_path / "data" / "voices").glob("*.json"))


def test_voice_language_is_stored_and_used(tiny_mtl_checkpoint, tmp_path, monkeypatch):
    from nightingale.models import voice_store

    env = {"NIGHTINGALE_DATA_DIR": str(tmp_path / "data")}
    model = ["--model", str(tiny_mtl_checkpoint)]
    bad = run_cli("voices", "add", "hana", str(CLIP), "--language", "klingon", *model, env=env)
    assert bad.returncode == 2 and "supported: ar, da" in bad.stderr
    res = run_cli("voices", "add", "hana", str(CLIP), "--language", "ko", *model, env=env)
    assert res.returncode == 0, res.stderr
    assert "language ko" in run_cli("voices", "list", *model, env=env).stdout
    monkeypatch.setenv("NIGHTINGALE_DATA_DIR", env["NIGHTINGALE_DATA_DIR"])
    assert voice_store.info("hana").language == "ko"
    out = tmp_path / "hana.wav"
    res = run_cli("synth", "안녕하세요.", "--voice", "hana", "-o", str(out), "--seed", "3", "--max-new-tokens", "8",
                  *model, env=env)
    assert res.returncode == 0, res.stderr
