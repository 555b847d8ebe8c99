"""Where the checkpoint comes from: a local directory, or a Hugging Face repository.

Upstream's `from_pretrained` calls `hf_hub_download` for each of the five files and loads
from the folder they land in (a snapshot of the HF cache). `resolve_checkpoint` does the
same, and when the files cannot be had (offline, no network, nothing cached) raises a
`CheckpointNotFoundError` whose message says which files are missing and how to get them,
so a CLI can print `str(err)` instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# The upstream layouts: what ChatterboxTTS.from_pretrained fetches, and what
# ChatterboxTurboTTS.from_local reads (models/turbo.py). Multilingual: models/multilingual.py.
CHECKPOINT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
TURBO_CHECKPOINT_FILES = (
    "ve.safetensors", "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "conds.pt",
    "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
)
DEFAULT_REPO = "ResembleAI/chatterbox"
MODEL_ENV = "NIGHTINGALE_MODEL"  # overrides DEFAULT_REPO; a repo id or a directory
# owner/name, as Hugging Face spells repo ids (a bare name would be mistaken for a typo'd path)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 3.0  # one TCP connect to the Hub before downloading


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint is not usable; the message says what is missing and what to do."""

    def __str__(self) -> str:  # FileNotFoundError would prefix errno details otherwise
        return str(self.args[0]) if self.args else ""


def checkpoint_files(family: str) -> tuple[str, ...]:
    """The files of an upstream checkpoint of this family ("chatterbox", "multilingual" or "turbo")."""
    from . import multilingual

    if family == "turbo":
        return TURBO_CHECKPOINT_FILES
    if family == multilingual.FAMILY:
        return multilingual.REQUIRED_FILES
    if family == "chatterbox":
        return CHECKPOINT_FILES
    raise CheckpointNotFoundError(f"unknown model family {family!r}; choose chatterbox, multilingual or turbo")


def repo_family(repo_id: str) -> str:
    """The family a Hugging Face repo id names: Resemble's Turbo repo is `chatterbox-turbo`
    (the multilingual model shares ResembleAI/chatterbox: ask for it with family)."""
    return "turbo" if "turbo" in repo_id.split("/")[-1].lower() else "chatterbox"


def dir_family(path: Path) -> str:
    """The family of a local checkpoint directory, by the T3 file it holds."""
    from . import multilingual

    if (path / "t3_turbo_v1.safetensors").is_file():
        return "turbo"
    return multilingual.FAMILY if multilingual.is_multilingual_dir(path) else "chatterbox"


def check_checkpoint_dir(path: str | os.PathLike, family: str | None = None) -> Path:
    """Return `path` resolved if it holds every file of its family's layout, else raise
    naming the missing ones. family None: told by the directory's T3 file."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{path} is not a directory (expected a checkpoint directory holding {', '.join(checkpoint_files(family or 'chatterbox'))})"
        )
    family = family or dir_family(path)
    files = checkpoint_files(family)
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        kind = {"turbo": "Chatterbox Turbo", "multilingual": "Chatterbox Multilingual"}.get(family, "Chatterbox")
        raise CheckpointNotFoundError(
            f"checkpoint directory {path} is missing {', '.join(missing)} "
            f"(a {kind} checkpoint holds {', '.join(files)})"
        )
    return path


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in TRUE_VALUES or constants.is_offline_mode()


def _missing_message(repo_id: str, missing: dict[str, str], offline: bool, cache_dir: str) -> str:
    files = checkpoint_files(repo_family(repo_id))
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "huggingface.co could not be reached"
    by_reason: dict[str, list[str]] = {}
    for name, reason in missing.items():
        by_reason.setdefault(reason, []).append(name)
    details = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
    steps = [
        ("unset HF_HUB_OFFLINE and " if offline else "") + "connect to the internet once and run again "
        f"(the files are then cached in {cache_dir}), or",
        f"download them with `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`), or",
        f"pass --model DIR, a directory holding {', '.join(files)}.",
    ]
    return (
        f"cannot get the Chatterbox checkpoint {repo_id}: {why}; missing {details}.\nTo fix it, either\n"
        + "\n".join(f"  - {step}" for step in steps)
    )


def _reachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint opens (True when a proxy is configured:
    then only the proxy can tell)."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _download(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, family: str | None = None) -> Path:
    """hf_hub_download each file into the HF cache; return the snapshot folder holding them."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from tqdm.auto import tqdm

    offline = _offline()
    local_only = offline
    if not offline and not _reachable(constants.ENDPOINT):
        # Without this, huggingface_hub retries a failed connection with back-off (about
        # 25 s) before falling back to the cache.
        logger.info("%s is unreachable; using the Hugging Face cache only", constants.ENDPOINT)
        local_only = True
    paths: dict[str, Path] = {}
    missing: dict[str, str] = {}
    cache_shown = str(cache_dir or constants.HF_HUB_CACHE)
    from . import multilingual

    family = family or repo_family(repo_id)
    files = checkpoint_files(family)
    if family == multilingual.FAMILY:
        files = multilingual.CHECKPOINT_FILES  # the Cangjie table too, as upstream fetches it
    with tqdm(total=len(files), desc=f"Fetching {repo_id}", unit="file", disable=None) as bar:
        for name in files:
            try:
                paths[name] = Path(
                    hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, local_files_only=local_only)
                )
            except RevisionNotFoundError:
                raise CheckpointNotFoundError(f"Hugging Face repo {repo_id} has no revision {revision!r}") from None
            except RepositoryNotFoundError:  # also gated/private repos without a token
                raise CheckpointNotFoundError(
                    f"Hugging Face repo {repo_id} was not found (or needs a token: `hf auth login`); "
                    "pass --model DIR to use a local checkpoint"
                ) from None
            except LocalEntryNotFoundError:
                missing[name] = "not cached"
                # The network is down or off: later files can only come from the cache, so
                # don't wait on connection timeouts again.
                local_only = True
            except EntryNotFoundError:
                if name == multilingual.CANGJIE_FILE:  # only Chinese needs it
                    continue
                missing[name] = f"not in {repo_id}"
            except (HfHubHTTPError, ConnectionError, TimeoutError) as e:
                missing[name] = f"download failed: {e}".splitlines()[0]
                local_only = True
            bar.update(1)
    if missing:
        raise CheckpointNotFoundError(_missing_message(repo_id, missing, offline, cache_shown))

    folders = {p.parent for p in paths.values()}
    if len(folders) != 1:  # cannot happen for one resolved revision, but upstream relies on it
        raise CheckpointNotFoundError(
            f"the files of {repo_id} landed in different folders: {sorted(map(str, folders))}"
        )
    return check_checkpoint_dir(folders.pop(), family)


def resolve_checkpoint(
    path_or_repo: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    family: str | None = None,
) -> Path:
    """The directory holding the checkpoint files (the five of Chatterbox, the six of
    Chatterbox Multilingual, or the nine of Chatterbox Turbo: a repo id whose name contains
    "turbo", a directory holding t3_turbo_v1.safetensors).

    path_or_repo: an existing directory (used as is, after checking the files), or a Hugging
    Face repo id `owner/name` (downloaded into the HF cache, or taken from it when offline).
    None means $NIGHTINGALE_MODEL, else `ResembleAI/chatterbox`. revision / cache_dir are
    passed to huggingface_hub (defaults: the main branch, its usual cache). family picks
    which model of a repo ("chatterbox", the English default, or "multilingual", both in
    ResembleAI/chatterbox); a directory's files say which it is.

    Raises CheckpointNotFoundError with a message meant for the user.
    """
    source = str(path_or_repo) if path_or_repo is not None else (os.environ.get(MODEL_ENV) or DEFAULT_REPO)
    local = Path(source).expanduser()
    if local.exists():
        path = check_checkpoint_dir(local, family)
        logger.info("checkpoint: %s", path)
        return path
    if not REPO_ID.match(source):
        raise CheckpointNotFoundError(
            f"no checkpoint directory at {local} (and {source!r} is not a Hugging Face repo id such as {DEFAULT_REPO})"
        )
    path = _download(source, revision, cache_dir, family)
    logger.info("checkpoint: %s (from Hugging Face %s)", path, source)
    return path
