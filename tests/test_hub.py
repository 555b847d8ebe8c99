"""models/hub.py: local checkpoint directories and the Hugging Face cache, with no network.

Every Hugging Face case runs offline (HF_HUB_OFFLINE=1) against a temporary cache; this
machine cannot reach huggingface.co, and the tests must not try.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nightingale.models.hub import (
    CHECKPOINT_FILES,
    DEFAULT_REPO,
    CheckpointNotFoundError,
    resolve_checkpoint,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _checkpoint_dir(path: Path, files=CHECKPOINT_FILES) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_bytes(b"x")
    return path


def _fake_hf_cache(cache: Path, repo_id: str, files) -> Path:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return _checkpoint_dir(repo / "snapshots" / COMMIT, files)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NIGHTINGALE_MODEL", raising=False)


def test_local_directory_is_used_as_is(tmp_path: Path) -> None:
    ckpt = _checkpoint_dir(tmp_path / "ckpt")
    assert resolve_checkpoint(str(ckpt)) == ckpt.resolve()
    assert resolve_checkpoint(ckpt) == ckpt.resolve()  # a Path works too


def test_missing_file_is_named(tmp_path: Path) -> None:
    ckpt = _checkpoint_dir(tmp_path / "ckpt", [f for f in CHECKPOINT_FILES if f != "s3gen.safetensors"])
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint(str(ckpt))
    message = str(err.value)
    assert "is missing s3gen.safetensors " in message and str(ckpt.resolve()) in message


def test_file_instead_of_directory(tmp_path: Path) -> None:
    f = tmp_path / "conds.pt"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="is not a directory"):
        resolve_checkpoint(str(f))


def test_nonexistent_path_is_not_sent_to_the_hub(tmp_path: Path, offline) -> None:
    for source in (str(tmp_path / "nope"), "./nope", "~/definitely/not/here"):
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory at"):
            resolve_checkpoint(source)


def test_env_selects_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _checkpoint_dir(tmp_path / "ckpt")
    monkeypatch.setenv("NIGHTINGALE_MODEL", str(ckpt))
    assert resolve_checkpoint(None) == ckpt.resolve()


def test_offline_cache_hit_returns_the_snapshot(tmp_path: Path, offline) -> None:
    snapshot = _fake_hf_cache(tmp_path / "hub", DEFAULT_REPO, CHECKPOINT_FILES)
    assert resolve_checkpoint(None, cache_dir=tmp_path / "hub") == snapshot.resolve()


def test_offline_partial_cache_names_only_the_missing(tmp_path: Path, offline) -> None:
    _fake_hf_cache(tmp_path / "hub", DEFAULT_REPO, [f for f in CHECKPOINT_FILES if f != "conds.pt"])
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_checkpoint(DEFAULT_REPO, cache_dir=tmp_path / "hub")
    message = str(err.value)
    assert "missing conds.pt (not cached)." in message
    assert "ve.safetensors (" not in message


def test_offline_other_repo_from_env(tmp_path: Path, offline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTINGALE_MODEL", "someone/voices")
    with pytest.raises(CheckpointNotFoundError, match="hf download someone/voices"):
        resolve_checkpoint(None, cache_dir=tmp_path / "hub")


RESOLVE_SCRIPT = textwrap.dedent(
    """
    import time
    from nightingale.models.hub import CheckpointNotFoundError, resolve_checkpoint
    start = time.perf_counter()
    try:
        resolve_checkpoint(None)
    except CheckpointNotFoundError as err:
        print(f"{time.perf_counter() - start:.3f}")
        print(err)
    else:
        print("resolved")
    """
)


def _resolve_in_fresh_process(**env_vars: str) -> tuple[float, str, str]:
    """Run resolve_checkpoint(None) as the CLI would: a new process (huggingface_hub reads
    HF_HOME / HF_HUB_OFFLINE / HF_ENDPOINT at import). Returns (seconds, message, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "NIGHTINGALE_"))}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    env.update(env_vars)
    result = subprocess.run([sys.executable, "-c", RESOLVE_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    elapsed_s, message = result.stdout.split("\n", 1)
    return float(elapsed_s), message, result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


def test_offline_empty_cache_fails_fast_with_instructions(tmp_path: Path) -> None:
    """HF_HOME pointing at an empty folder, offline: a clear message, no network wait."""
    elapsed_s, message, stderr = _resolve_in_fresh_process(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    # The lookup itself is local-only (generous bound for a loaded 2-core box).
    assert elapsed_s < 5.0, elapsed_s
    assert f"missing {', '.join(CHECKPOINT_FILES)} (not cached)." in message
    assert "offline mode is on" in message
    assert f"hf download {DEFAULT_REPO}" in message and f"huggingface-cli download {DEFAULT_REPO}" in message
    assert "--model DIR" in message
    assert str(tmp_path / "hf" / "hub") in message  # where the files would be cached
    assert "Traceback" not in stderr


def test_unreachable_hub_falls_back_to_the_cache_quickly(tmp_path: Path) -> None:
    """Not offline, but the endpoint refuses connections: no retry back-off, same advice."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    elapsed_s, message, _ = _resolve_in_fresh_process(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint)
    assert elapsed_s < 5.0, elapsed_s  # huggingface_hub alone would back off ~25 s
    assert "could not be reached" in message
    assert f"missing {', '.join(CHECKPOINT_FILES)} (not cached)." in message
    assert "--model DIR" in message
