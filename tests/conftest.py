"""Shared fixtures: tiny random checkpoints in the upstream layout, and a loaded tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint (the five upstream files + dims.json), seed 0."""
    from nightingale.dev.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), "tiny", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_mtl_checkpoint(tmp_path_factory) -> Path:
    """A tiny random multilingual checkpoint (upstream's six files + dims.json), seed 0."""
    from nightingale.dev.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-mtl-ckpt"), "tiny", seed=TINY_SEED, family="multilingual")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded in float32 (shared: tests must not mutate it)."""
    from nightingale.models import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_turbo_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Chatterbox Turbo checkpoint (the upstream files + dims.json), seed 0."""
    from nightingale.dev.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-turbo"), "tiny", seed=TINY_SEED, family="turbo")


@pytest.fixture(scope="session")
def tiny_turbo_model(tiny_turbo_checkpoint):
    """The tiny Turbo checkpoint loaded in float32 (shared: tests must not mutate it)."""
    from nightingale.models import load_model

    return load_model(tiny_turbo_checkpoint)


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path, monkeypatch):
    """Voices and sockets go to a per-test directory, never the real user's."""
    monkeypatch.setenv("NIGHTINGALE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NIGHTINGALE_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def pytest_configure(config):
    # MLX's Linux CPU wheel has a reference BLAS; re-run the test process once with Debian's
    # OpenBLAS preloaded when it is installed (.ci/run installs it): see nightingale/blas.py.
    # Output capture is suspended first so the new process writes to the real terminal.
    from nightingale.blas import needs_reexec, reexec_with_openblas

    if needs_reexec():
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        reexec_with_openblas()
    # Converted-model cache for the whole run (subprocess daemons inherit it), removed at the
    # end. Made after any re-exec above, so only the process that runs the tests owns one.
    import tempfile

    if "NIGHTINGALE_CACHE_DIR" not in os.environ:
        config._nightingale_cache_dir = tempfile.mkdtemp(prefix="nightingale-cache-")
        os.environ["NIGHTINGALE_CACHE_DIR"] = config._nightingale_cache_dir


def pytest_unconfigure(config):
    import shutil

    owned = getattr(config, "_nightingale_cache_dir", None)
    if owned is not None:
        shutil.rmtree(owned, ignore_errors=True)
        if os.environ.get("NIGHTINGALE_CACHE_DIR") == owned:
            del os.environ["NIGHTINGALE_CACHE_DIR"]
