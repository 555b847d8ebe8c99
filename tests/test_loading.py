"""Strict loading of the upstream layout, the generated checkpoints, and the converted cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from nightingale.dev import checkpoint
from nightingale.models import cache, loading, t3, voice_encoder
from nightingale.models.config import ConfigError
from nightingale.models.model import load_model
from nightingale.models.s3gen import s3gen


def test_full_spec_matches_the_upstream_key_counts():
    """The reference's state_dict counts (chatterbox-tts 0.1.7, tools/check_reference_load.py
    loads them strictly): 292 T3 tensors, 16 VE tensors, 2488 S3Gen tensors (2490 with the
    two tokenizer buffers the reference may omit)."""
    cfgs = checkpoint.component_configs("full")
    t3_shapes = t3.upstream_shapes(cfgs["t3"])
    assert len(t3_shapes) == 292
    assert sum(int(np.prod(s)) for s in t3_shapes.values()) == 532_405_248
    assert len(voice_encoder.upstream_shapes(cfgs["ve"])) == 16
    s3_shapes = s3gen.upstream_shapes(cfgs["s3gen"])
    assert len(s3_shapes) + len(s3gen.optional_shapes(cfgs["s3gen"])) == 2490
    assert s3_shapes["flow.decoder.estimator.down_blocks.0.1.0.attn1.to_q.weight"] == (512, 256)
    assert s3_shapes["mel2wav.ups.0.parametrizations.weight.original1"] == (512, 256, 16)
    assert s3_shapes["speaker_encoder.xvector.dense.linear.weight"] == (192, 1024, 1)


def test_make_checkpoint_is_deterministic(tmp_path):
    a = checkpoint.make_checkpoint(tmp_path / "a", "tiny", seed=3)
    b = checkpoint.make_checkpoint(tmp_path / "b", "tiny", seed=3)
    for name in ("t3_cfg.safetensors", "ve.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt", "dims.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = checkpoint.make_checkpoint(tmp_path / "c", "tiny", seed=4)
    assert (a / "t3_cfg.safetensors").read_bytes() != (c / "t3_cfg.safetensors").read_bytes()


def _corrupt(src, dst, file_name, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / file_name))
    edit(tensors)
    save_file(tensors, str(dst / file_name))
    return dst


@pytest.mark.parametrize(
    "file_name, edit, message",
    [
        ("t3_cfg.safetensors", lambda t: t.pop("speech_head.weight"), "t3_cfg.safetensors: missing key 'speech_head.weight'"),
        (
            "t3_cfg.safetensors",
            lambda t: t.__setitem__("tfmr.norm.weight", np.ones(7, np.float32)),
            "t3_cfg.safetensors: key 'tfmr.norm.weight' has shape (7,), expected",
        ),
        (
            "s3gen.safetensors",
            lambda t: t.__setitem__("flow.encoder.after_norm.gain", t.pop("flow.encoder.after_norm.weight")),
            "s3gen.safetensors: missing key 'flow.encoder.after_norm.weight'",
        ),
        (
            "s3gen.safetensors",
            lambda t: t.__setitem__("mel2wav.extra.weight", np.zeros(3, np.float32)),
            "s3gen.safetensors: unexpected key 'mel2wav.extra.weight'",
        ),
        ("ve.safetensors", lambda t: t.pop("lstm.weight_hh_l2"), "ve.safetensors: missing key 'lstm.weight_hh_l2'"),
    ],
)
def test_corrupted_key_is_named(tiny_checkpoint, tmp_path, file_name, edit, message):
    bad = _corrupt(tiny_checkpoint, tmp_path / "bad", file_name, edit)
    with pytest.raises(loading.CheckpointError) as err:
        load_model(bad, cache=False)
    assert message in str(err.value)


def test_optional_tokenizer_buffers_are_tolerated_either_way(tiny_checkpoint, tmp_path):
    """The reference saves s3gen without tokenizer._mel_filters/window; with them it loads too."""
    from nightingale.models import s3tokenizer

    cfg = checkpoint.component_configs("tiny")["s3gen"].tokenizer
    buffers = {
        "tokenizer._mel_filters": s3tokenizer.mel_filters(16000, s3tokenizer.N_FFT, cfg.n_mels, 0.0, 8000.0),
        "tokenizer.window": s3tokenizer.hann_window(s3tokenizer.N_FFT),
    }
    with_buffers = _corrupt(tiny_checkpoint, tmp_path / "buf", "s3gen.safetensors", lambda t: t.update(buffers))
    assert "tokenizer.window" in load_file(str(with_buffers / "s3gen.safetensors"))
    load_model(with_buffers, cache=False)
    wrong = _corrupt(
        tiny_checkpoint, tmp_path / "wrong", "s3gen.safetensors",
        lambda t: t.update({"tokenizer.window": np.ones(7, np.float32)}),
    )
    with pytest.raises(loading.CheckpointError, match="tokenizer.window"):
        load_model(wrong, cache=False)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["s3gen"]["flow"].update(n_timestep=3), "unknown FlowConfig field: n_timestep"),
        (lambda d: d["s3gen"]["hift"].update(sample_rate=22050), "unknown HiFTConfig field: sample_rate"),
        (lambda d: d["s3gen"].update(mean_flow=True), "unknown S3GenConfig field: mean_flow"),
        (lambda d: d["ve"].update(hidden=64), "unknown VoiceEncoderConfig field: hidden"),
    ],
)
def test_unknown_config_key_is_named(tiny_checkpoint, tmp_path, edit, message):
    """A misspelt or newer field in dims.json, or in a converted model's config.json, is an
    error that names it, never silently dropped."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    _edit_json(bad / "dims.json", edit)
    with pytest.raises(ConfigError, match=message):
        load_model(bad, cache=False)
    converted = cache.convert(str(tiny_checkpoint), str(tmp_path / "conv"), quantize=None)
    _edit_json(converted / cache.CONFIG_FILE, lambda config: edit(config["dims"]))
    with pytest.raises(ConfigError, match=message):
        load_model(converted)


def test_converted_config_round_trips(tiny_checkpoint, tmp_path):
    """config.json's dims read back to the configs the model was built with."""
    model = load_model(tiny_checkpoint, cache=False)
    out = cache.convert(str(tiny_checkpoint), str(tmp_path / "conv"), quantize=None)
    dims = cache.read_config(out)["dims"]
    assert s3gen.S3GenConfig.from_dict(dims["s3gen"]) == model.s3gen.cfg == checkpoint.component_configs("tiny")["s3gen"]
    assert voice_encoder.VoiceEncoderConfig.from_dict(dims["ve"]) == model.ve.cfg
    assert load_model(out).s3gen.cfg == model.s3gen.cfg


def test_converted_cache_is_reused_and_redone_when_the_source_changes(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTINGALE_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    model = load_model(src, quantize=8)
    entries = [p for p in (tmp_path / "cache").iterdir() if cache.is_converted(p)]
    assert len(entries) == 1
    config = json.loads((entries[0] / "config.json").read_text())
    assert config["quantize"] == 8 and config["group_size"] == 64
    stamp = (entries[0] / "config.json").stat().st_mtime_ns

    again = load_model(src, quantize=8)  # valid cache: no conversion, same directory
    assert again.checkpoint.path == entries[0]
    assert (entries[0] / "config.json").stat().st_mtime_ns == stamp
    tokens = list(model.generate_tokens("Hi there.", seed=1, max_new_tokens=8, temperature=0))
    assert list(again.generate_tokens("Hi there.", seed=1, max_new_tokens=8, temperature=0)) == tokens

    # a changed source converts again, and the stale entry goes
    _corrupt(src, tmp_path / "unused", "t3_cfg.safetensors", lambda t: None)
    tensors = load_file(str(src / "t3_cfg.safetensors"))
    tensors["speech_head.weight"] = tensors["speech_head.weight"] * 2
    save_file(tensors, str(src / "t3_cfg.safetensors"))
    changed = load_model(src, quantize=8)
    entries_after = [p for p in (tmp_path / "cache").iterdir() if cache.is_converted(p)]
    assert len(entries_after) == 1 and entries_after[0] != entries[0]
    assert changed.quantize == 8


def test_converted_cache_key_holds_the_code_version_and_device(tiny_checkpoint, tmp_path, monkeypatch):
    import nightingale

    monkeypatch.setenv("NIGHTINGALE_CACHE_DIR", str(tmp_path / "cache"))

    def entries() -> set:
        return {p for p in (tmp_path / "cache").iterdir() if cache.is_converted(p)}

    load_model(tiny_checkpoint, quantize=8)
    first = entries()
    assert len(first) == 1
    assert json.loads((next(iter(first)) / "config.json").read_text())["device"] == cache.device_kind()

    monkeypatch.setattr(nightingale, "__version__", "999.0")  # a new release converts again ...
    load_model(tiny_checkpoint, quantize=8)
    assert entries() != first and len(entries()) == 1  # ... and the old release's entry goes

    before = entries()
    monkeypatch.setattr(cache, "device_kind", lambda: "gpu")  # another device: its own entry
    load_model(tiny_checkpoint, quantize=8)
    assert before < entries() and len(entries()) == 2


def test_explicit_convert_directory_loads(tiny_checkpoint, tmp_path):
    out = cache.convert(str(tiny_checkpoint), str(tmp_path / "conv"), quantize=8)
    model = load_model(out)
    assert model.quantize == 8
    audio = model.synthesize("Hello.", seed=0, max_new_tokens=6)
    assert audio.dtype == np.float32 and np.isfinite(audio).all()


def test_a_test_run_removes_its_converted_model_cache(tmp_path):
    """tests/conftest.py makes a cache directory for the run (NIGHTINGALE_CACHE_DIR); the run
    removes it at the end, also when the run re-executes itself with OpenBLAS."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NIGHTINGALE_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    tests = Path(__file__).parent
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{tests / 'test_dsp.py'}::test_hann_window_is_periodic"],
        capture_output=True, text=True, env=env, cwd=tests.parent, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert not list(tmp_path.glob("nightingale-cache-*"))
