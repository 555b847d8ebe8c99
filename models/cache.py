"""Convert once, load fast: MLX-native model directories.

The first load of an upstream checkpoint converts it (layout remaps, folded weight norms
and batch norms, quantization, precision) and writes the result as MLX safetensors plus a
config.json; later loads read that directory and skip every conversion step. The cache is
keyed by a fingerprint of the source files, the settings, the code's version and the MLX
device, so a changed source (or other settings, a new release, another device) converts again.

Fingerprint of a source file: its name, size, modification time and SHA-256 of its first
and last MiB. That is instant on multi-GB files and catches replaced or edited files; a
same-size in-place edit in the middle that preserves mtime would be missed (say so if you
build such a tool).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

logger = logging.getLogger(__name__)

FORMAT = "nightingale-mlx"
FORMAT_VERSION = 2  # 2: merged projections (MERGED_PROJECTIONS in models/t3.py and s3gen/flow.py)
CONFIG_FILE = "config.json"
COMPONENT_FILES = {"t3": "t3.safetensors", "s3gen": "s3gen.safetensors", "ve": "ve.safetensors"}
MTL_FILES = ("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json", "Cangjie5_TC.json")
COPIED_FILES = ("tokenizer.json", "conds.pt", "grapheme_mtl_merged_expanded_v1.json", "Cangjie5_TC.json")
SOURCE_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt", "dims.json",
                # Chatterbox Turbo (models/turbo.py)
                "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "vocab.json", "merges.txt",
                "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json") + MTL_FILES
FINGERPRINT_BYTES = 1 << 20


def cache_root() -> Path:
    env = os.environ.get("NIGHTINGALE_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("nightingale")) / "models"


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if st.st_size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, st.st_size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def source_fingerprints(directory: Path) -> dict[str, str]:
    return {name: file_fingerprint(directory / name) for name in SOURCE_FILES if (directory / name).exists()}


def device_kind() -> str:
    """The MLX device conversions run on ("cpu", "gpu"): quantization scales' dtype depends on it."""
    return mx.default_device().type.name


def code_version() -> str:
    """The code that wrote a conversion: a new release may convert differently."""
    from nightingale import __version__

    return f"nightingale {__version__}, mlx {mx.__version__}"


def settings(quantize: int | None, group_size: int, dtype: str) -> dict:
    return {
        "quantize": quantize,
        "group_size": group_size if quantize else None,
        "dtype": dtype,
        "device": device_kind(),
        "code": code_version(),
    }


def cache_key(fingerprints: dict[str, str], config: dict) -> str:
    blob = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "sources": fingerprints, **config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def is_converted(directory: Path) -> bool:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_config(directory: Path) -> dict:
    config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: not a {FORMAT} v{FORMAT_VERSION} model directory")
    return config


def save_converted(model, directory: Path, fingerprints: dict[str, str]) -> Path:
    """Write a loaded (and possibly quantized) model as an MLX-native directory, atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, file_name in COMPONENT_FILES.items():
            module = getattr(model, name)
            mx.save_safetensors(str(tmp / file_name), dict(tree_flatten(module.parameters())))
        for file_name in getattr(model, "copied_files", COPIED_FILES):
            src = model.checkpoint.path / file_name
            if src.exists():
                shutil.copy2(src, tmp / file_name)
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dims": model.dims,
            "family": getattr(model, "family", "chatterbox"),
            **settings(model.quantize, getattr(model, "group_size", 64), model.dtype),
            "source": model.checkpoint.source,
            "source_path": str(model.checkpoint.path),
            "sources": fingerprints,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def cached_dir(source_dir: Path, quantize: int | None, group_size: int, dtype: str) -> tuple[Path, dict[str, str]]:
    fingerprints = source_fingerprints(source_dir)
    key = cache_key(fingerprints, settings(quantize, group_size, dtype))
    return cache_root() / key, fingerprints


def prune_stale(source_path: Path, keep: Path) -> None:
    """Remove entries converted from the same source directory with the same settings as
    `keep`: they are stale conversions of an older version of the source."""
    root = cache_root()
    if not root.is_dir():
        return
    kept = read_config(keep)
    same = ("source_path", "quantize", "group_size", "dtype", "device")  # an older code's entry is stale
    for entry in root.iterdir():
        if entry == keep or not is_converted(entry):
            continue
        try:
            config = read_config(entry)
        except ValueError:
            continue
        if config.get("source_path") == str(source_path) and all(config.get(k) == kept.get(k) for k in same):
            logger.info("removing stale converted model %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def convert(src: str, dst: str, quantize: int | None = 8, group_size: int = 64, dtype: str | None = None) -> Path:
    """`nightingale models convert`: upstream checkpoint -> MLX-native directory."""
    from .model import load_model

    from . import hub

    source_dir = hub.resolve_checkpoint(src)
    model = load_model(source_dir, quantize=quantize, dtype=dtype, group_size=group_size, cache=False)
    return save_converted(model, Path(dst), source_fingerprints(source_dir))
