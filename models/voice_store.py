"""The named-voice store: cloned voices saved once, loaded by name in milliseconds.

Layout, under `<data dir>/voices/` (the data dir is $NIGHTINGALE_DATA_DIR when set, else
platformdirs' user data dir for "nightingale"):

    <name>.json                      the voice's record; its presence is what makes the voice exist
    <name>-<sha256[:12]>.safetensors the Conditionals tensors (named by their content)

Writes are atomic: the tensors go to a temporary file that is renamed into place, then the
JSON record is published the same way, pointing at them. A crash leaves either the old voice
or the new one, never half of one (at worst an unreferenced tensor file, which `add` sweeps
up later). Adding without `force` publishes the record with a hard link, which fails if the
name was taken in the meantime, so two concurrent adds cannot overwrite each other.

`default` is reserved: it names the checkpoint's built-in voice (conds.pt), which the model
loads itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import save as safetensors_bytes

from .conds import Conditionals, T3Cond
from .cloning import VoiceError

logger = logging.getLogger(__name__)


class VoiceStoreError(VoiceError):
    """A store operation that cannot be done (invalid, reserved or taken name; damaged record)."""


class VoiceNotFoundError(VoiceStoreError):
    """No stored voice has that name."""


DATA_DIR_ENV = "NIGHTINGALE_DATA_DIR"
APP_NAME = "nightingale"
VOICES_SUBDIR = "voices"
DEFAULT_VOICE = "default"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
STORE_FORMAT = 1
STALE_AFTER_S = 3600.0  # unreferenced files older than this are debris from a crashed add

T3_KEYS = ("speaker_emb", "cond_prompt_speech_tokens", "emotion_adv")
GEN_TENSOR_KEYS = ("prompt_token", "prompt_token_len", "prompt_feat", "embedding")  # + optional prompt_feat_len


@dataclass(frozen=True)
class VoiceInfo:
    """A stored voice's record (the JSON file)."""

    name: str
    weights: str  # the tensor file's name, beside the record
    source_name: str  # the reference file's base name
    source_sha256: str
    duration_s: float  # of the reference recording
    created: str  # ISO 8601, UTC
    exaggeration: float
    format: int = STORE_FORMAT
    language: str | None = None  # spoken when a request names this voice and no language


def data_dir() -> Path:
    """Nightingale's data directory ($NIGHTINGALE_DATA_DIR, else the platform's user data dir)."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def voices_dir(root: Path | None = None) -> Path:
    return (data_dir() if root is None else Path(root)) / VOICES_SUBDIR


def normalize_name(name: str) -> str:
    """The stored form of a voice name (lower case); VoiceStoreError if it is not acceptable.

    Names are 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit;
    case is folded so that names stay distinct on case-insensitive file systems (macOS).
    """
    if not isinstance(name, str) or not name.isascii() or not NAME_PATTERN.fullmatch(name.lower()):
        raise VoiceStoreError(
            f"invalid voice name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    folded = name.lower()
    if folded == DEFAULT_VOICE:
        raise VoiceStoreError(f"'{DEFAULT_VOICE}' is reserved for the built-in voice")
    return folded


def check_new_name(name: str, force: bool = False, root: Path | None = None) -> str:
    """Validate a name for `add` before doing any work: returns its stored form;
    VoiceStoreError if it is invalid, reserved, or taken (unless force)."""
    folded = normalize_name(name)
    if not force and _record_path(voices_dir(root), folded).exists():
        raise VoiceStoreError(f"a voice named '{folded}' already exists (use --force to replace it)")
    return folded


def add(name: str, conds: Conditionals, source_path: str | os.PathLike, force: bool = False, root: Path | None = None,
        language: str | None = None) -> VoiceInfo:
    """Store `conds` under `name`. VoiceStoreError if the name is invalid, reserved, or taken
    and force is False; on any error the store is left as it was. language: the voice's
    default language code (checked by the caller against the model's languages)."""
    folded = check_new_name(name, force, root)
    source_path = Path(source_path)
    source_sha256, duration_s = _describe_source(source_path)
    tensors = _conds_to_numpy(conds)
    payload = safetensors_bytes(tensors, metadata={"format": str(STORE_FORMAT), "name": folded})
    digest = hashlib.sha256(payload).hexdigest()

    directory = voices_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    _sweep_debris(directory)
    weights_name = f"{folded}-{digest[:12]}.safetensors"
    info = VoiceInfo(
        name=folded,
        weights=weights_name,
        source_name=source_path.name,
        source_sha256=source_sha256,
        duration_s=round(duration_s, 3),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exaggeration=float(np.asarray(tensors["t3.emotion_adv"]).reshape(-1)[0]),
        language=language.lower() if language else None,
    )
    record = _record_path(directory, folded)
    try:
        previous = _read_record(record) if record.exists() else None
    except VoiceStoreError:  # a damaged record (only reachable with force) is simply replaced
        previous = None

    _write_atomic(directory / weights_name, payload)
    tmp_record = _write_temp(directory, json.dumps(asdict(info), indent=2).encode())
    try:
        if force:
            os.replace(tmp_record, record)
        else:
            _publish_new(tmp_record, record)
    except FileExistsError:
        try:  # keep the tensor file if the winner's record uses it (identical content)
            winner = _read_record(record).weights
        except VoiceStoreError:
            winner = None
        if winner != weights_name:
            _unlink_quietly(directory / weights_name)
        raise VoiceStoreError(f"a voice named '{folded}' already exists (use --force to replace it)") from None
    finally:
        _unlink_quietly(tmp_record)
    _fsync_dir(directory)
    if previous is not None and previous.weights != weights_name:
        _unlink_quietly(directory / previous.weights)
    logger.info("stored voice %s (%s, %.1f s)", folded, source_path.name, duration_s)
    return info


def list_voices(root: Path | None = None) -> list[VoiceInfo]:
    """Every stored voice, sorted by name (the built-in `default` is not listed here)."""
    directory = voices_dir(root)
    if not directory.is_dir():
        return []
    infos = []
    for record in sorted(directory.glob("*.json")):
        try:
            infos.append(_read_record(record))
        except VoiceStoreError as exc:
            logger.warning("skipping unreadable voice record %s: %s", record, exc)
    return infos


def names(root: Path | None = None) -> list[str]:
    """The names of the stored voices, sorted."""
    return [voice.name for voice in list_voices(root)]


def describe(voice: VoiceInfo) -> str:
    """One line for `nightingale voices list`: name, then what it was made from."""
    created = voice.created.replace("T", " ").replace("+00:00", " UTC")
    return (
        f"{voice.name}\t{voice.duration_s:.1f} s from {voice.source_name}, added {created}, "
        f"exaggeration {voice.exaggeration:g}" + (f", language {voice.language}" if voice.language else "")
    )


def info(name: str, root: Path | None = None) -> VoiceInfo:
    """The record of one stored voice (VoiceNotFoundError if there is none)."""
    folded = _lookup_name(name)
    record = _record_path(voices_dir(root), folded)
    if not record.exists():
        raise VoiceNotFoundError(f"no voice named '{folded}'")
    return _read_record(record)


def remove(name: str, root: Path | None = None) -> None:
    """Delete a stored voice (VoiceNotFoundError if there is none). The record goes first, so an
    interrupted remove leaves no half voice."""
    folded = _lookup_name(name)
    directory = voices_dir(root)
    record = _record_path(directory, folded)
    if not record.exists():
        raise VoiceNotFoundError(f"no voice named '{folded}'")
    weights = _read_record(record).weights
    record.unlink()
    _fsync_dir(directory)
    _unlink_quietly(directory / weights)
    logger.info("removed voice %s", folded)


def load(name: str, root: Path | None = None) -> Conditionals:
    """The Conditionals of a stored voice (VoiceNotFoundError if there is none,
    VoiceStoreError if it is damaged)."""
    voice = info(name, root)
    path = voices_dir(root) / voice.weights
    try:
        arrays = mx.load(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise VoiceStoreError(f"voice '{voice.name}' is damaged: cannot read {path.name} ({exc})") from exc
    return _conds_from_arrays(arrays, voice.name)


# ---------------------------------------------------------------------------------------------
# Internals


def _lookup_name(name: str) -> str:
    if isinstance(name, str) and name.lower() == DEFAULT_VOICE:
        raise VoiceNotFoundError(f"'{DEFAULT_VOICE}' is the built-in voice; the model loads it from conds.pt")
    return normalize_name(name)


def _record_path(directory: Path, folded: str) -> Path:
    return directory / f"{folded}.json"


def _read_record(record: Path) -> VoiceInfo:
    try:
        data = json.loads(record.read_text())
        voice = VoiceInfo(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise VoiceStoreError(f"voice record {record.name} is damaged ({exc})") from exc
    if voice.format != STORE_FORMAT or Path(voice.weights).name != voice.weights:
        raise VoiceStoreError(f"voice record {record.name} has an unsupported format")
    return voice


def _describe_source(path: Path) -> tuple[str, float]:
    """(sha256 of the file's bytes, duration in seconds)."""
    import soundfile

    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        duration_s = float(soundfile.info(str(path)).duration)
    except (OSError, RuntimeError) as exc:
        raise VoiceStoreError(f"cannot read the reference file {path} ({exc})") from exc
    return digest, duration_s


def _conds_to_numpy(conds: Conditionals) -> dict[str, np.ndarray]:
    t3 = conds.t3
    tensors = {
        "t3.speaker_emb": np.asarray(t3.speaker_emb, dtype=np.float32),
        "t3.cond_prompt_speech_tokens": np.asarray(t3.cond_prompt_speech_tokens, dtype=np.int32),
        "t3.emotion_adv": np.asarray(t3.emotion_adv, dtype=np.float32).reshape(1, 1, 1),
    }
    for key in GEN_TENSOR_KEYS:
        if conds.gen.get(key) is None:
            raise VoiceStoreError(f"conditionals lack gen['{key}']")
        dtype = np.float32 if key in ("prompt_feat", "embedding") else np.int32
        tensors[f"gen.{key}"] = np.asarray(conds.gen[key], dtype=dtype)
    if conds.gen.get("prompt_feat_len") is not None:
        tensors["gen.prompt_feat_len"] = np.asarray(conds.gen["prompt_feat_len"], dtype=np.int32)
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _conds_from_arrays(arrays: dict[str, mx.array], name: str) -> Conditionals:
    required = [f"t3.{k}" for k in T3_KEYS] + [f"gen.{k}" for k in GEN_TENSOR_KEYS]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise VoiceStoreError(f"voice '{name}' is damaged: missing {missing}")
    t3 = T3Cond(
        speaker_emb=arrays["t3.speaker_emb"],
        cond_prompt_speech_tokens=arrays["t3.cond_prompt_speech_tokens"],
        emotion_adv=arrays["t3.emotion_adv"],
    )
    gen = {key: arrays[f"gen.{key}"] for key in GEN_TENSOR_KEYS}
    gen["prompt_feat_len"] = arrays.get("gen.prompt_feat_len")
    return Conditionals(t3=t3, gen=gen)


def _write_temp(directory: Path, data: bytes) -> Path:
    """Write `data` to a fresh hidden file in `directory`, flushed to disk; returns its path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
    return Path(tmp)


def _publish_new(tmp: Path, record: Path) -> None:
    """Move `tmp` to `record` unless `record` exists (FileExistsError). A hard link makes the
    check and the publication one step, so a concurrent add of the same name cannot be lost."""
    try:
        os.link(tmp, record)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (racy, but rare)
        if record.exists():
            raise FileExistsError(record) from None
        os.replace(tmp, record)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    finally:
        _unlink_quietly(tmp)


def _fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _sweep_debris(directory: Path) -> None:
    """Remove leftovers of crashed writes: temp files and tensor files no record points at,
    once they are old enough that no add in progress can still own them."""
    now = time.time()
    referenced = set()
    for record in directory.glob("*.json"):
        try:
            referenced.add(_read_record(record).weights)
        except VoiceStoreError:
            continue
    for path in list(directory.glob(".tmp-*")) + list(directory.glob("*.safetensors")):
        if path.name in referenced:
            continue
        try:
            if now - path.stat().st_mtime > STALE_AFTER_S:
                path.unlink()
        except FileNotFoundError:
            pass
