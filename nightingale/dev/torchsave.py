"""Write `torch.save` zip archives without torch (random checkpoints' conds.pt, ve.pt, s3gen.pt).

The format is the one models/torchpickle.py reads: a zip archive `<root>/data.pkl` +
`<root>/data/<key>`, the pickle referring to each tensor's raw bytes through a persistent
id and rebuilding it with `torch._utils._rebuild_tensor_v2`. `save` emits the pickle
opcodes by hand, only the subset `torch.load(weights_only=True)` accepts, so the reference
reads our files (tools/fixtures_conds.py checks that with real torch).

Only numpy and the standard library are imported at module level: tools/fixtures_conds.py
loads this file by its path in the reference's virtual environment, where nightingale is
not installed. `save_conds` (the Conditionals -> conds.pt direction) needs the reader.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nightingale.models.conds import Conditionals

logger = logging.getLogger(__name__)

# numpy dtype -> the torch storage type written for it (models/torchpickle.py's
# STORAGE_DTYPES read back). bfloat16 is never written: numpy has no such dtype.
WRITE_STORAGES: dict[np.dtype, str] = {
    np.dtype("<f4"): "FloatStorage",
    np.dtype("<f8"): "DoubleStorage",
    np.dtype("<f2"): "HalfStorage",
    np.dtype("<i8"): "LongStorage",
    np.dtype("<i4"): "IntStorage",
    np.dtype("<i2"): "ShortStorage",
    np.dtype("i1"): "CharStorage",
    np.dtype("u1"): "ByteStorage",
    np.dtype("?"): "BoolStorage",
}

# torch 2.x writes these beside data.pkl; the reader only needs `version` (or .data/version).
ARCHIVE_VERSION = "3"
FORMAT_VERSION = "1"
STORAGE_ALIGNMENT = 64  # bytes; torch aligns each storage so that it can mmap them
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same tree gives the same bytes


class _PickleWriter:
    """Emits protocol-2 opcodes for the subset torch's weights-only unpickler accepts.

    Tensors are collected in `storages` (one storage per array, keys "0", "1", ...)."""

    MAX_DEPTH = 100
    BATCH = 1000  # items per MARK ... APPENDS/SETITEMS, as pickle does

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages: list[np.ndarray] = []
        self._active: set[int] = set()

    def finish(self) -> bytes:
        self.out += b"."  # STOP
        return bytes(self.out)

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            n = (v.bit_length() + 8) // 8  # room for the sign bit (two's complement)
            if n > 255:
                raise TypeError(f"integer too large to save: {v}")
            self.out += b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)

    def _str(self, s: str) -> None:
        data = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def _tuple(self, items: tuple | list, depth: int) -> None:
        if len(items) == 0:
            self.out += b")"
            return
        if len(items) > 3:
            self.out += b"("
        for item in items:
            self.dump(item, depth + 1)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

    def _items(self, pairs: list[tuple[Any, Any]], depth: int) -> None:
        for start in range(0, len(pairs), self.BATCH):
            self.out += b"("
            for k, v in pairs[start : start + self.BATCH]:
                self.dump(k, depth + 1)
                self.dump(v, depth + 1)
            self.out += b"u"  # SETITEMS

    def _tensor(self, array: np.ndarray) -> None:
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in WRITE_STORAGES:
            raise TypeError(f"cannot save arrays of dtype {array.dtype} (no torch storage type for it)")
        array = np.asarray(array, dtype=dtype, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        key = str(len(self.storages))
        self.storages.append(array)
        # C-contiguous strides, in elements
        strides = tuple(int(np.prod(array.shape[i + 1 :], dtype=np.int64)) for i in range(array.ndim))
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # args of _rebuild_tensor_v2
        self.out += b"("  # persistent id
        self._str("storage")
        self._global("torch", WRITE_STORAGES[dtype])
        self._str(key)
        self._str("cpu")
        self._int(int(array.size))
        self.out += b"t"
        self.out += b"Q"  # BINPERSID
        self._int(0)  # storage offset
        self._tuple(tuple(int(n) for n in array.shape), 0)
        self._tuple(strides, 0)
        self.out += b"\x89"  # requires_grad=False
        self._global("collections", "OrderedDict")  # backward_hooks = OrderedDict()
        self.out += b")R"
        self.out += b"t"
        self.out += b"R"

    def dump(self, obj: Any, depth: int = 0) -> None:
        if depth > self.MAX_DEPTH:
            raise ValueError("object tree too deep to save")
        if type(obj).__module__ == "mlx.core" and type(obj).__name__ == "array":
            obj = np.asarray(obj)  # mlx arrays convert without importing mlx here
        if obj is None:
            self.out += b"N"
        elif obj is True or isinstance(obj, np.bool_) and obj:
            self.out += b"\x88"
        elif obj is False or isinstance(obj, np.bool_):
            self.out += b"\x89"
        elif isinstance(obj, (int, np.integer)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            self.out += b"G" + struct.pack(">d", float(obj))
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, (list, tuple, dict)):
            if id(obj) in self._active:
                raise ValueError("cannot save a self-referencing structure")
            self._active.add(id(obj))
            if isinstance(obj, tuple):
                self._tuple(obj, depth)
            elif isinstance(obj, list):
                self.out += b"]"
                for start in range(0, len(obj), self.BATCH):
                    self.out += b"("
                    for item in obj[start : start + self.BATCH]:
                        self.dump(item, depth + 1)
                    self.out += b"e"  # APPENDS
            else:
                if type(obj) is collections.OrderedDict:
                    self._global("collections", "OrderedDict")
                    self.out += b")R"
                else:
                    self.out += b"}"
                if obj:
                    self._items(list(obj.items()), depth)
            self._active.discard(id(obj))
        else:
            raise TypeError(f"cannot save a value of type {type(obj).__name__}")


def _archive_name(path: Path) -> str:
    # torch names the root folder after the file (conds.pt -> conds/); keep it zip-safe.
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    return name or "archive"


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes, align: bool) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED  # torch reads storages in place; no compression
    info.external_attr = 0o644 << 16
    if align:
        # Pad the local header's extra field so the data starts on a STORAGE_ALIGNMENT
        # boundary, as torch does (extra-field id "FB").
        zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT  # zipfile then appends a 20-byte zip64 field
        start = archive.fp.tell() + 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
        pad = (-start) % STORAGE_ALIGNMENT
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    archive.writestr(info, data)


def save(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as a torch.save zip archive that `torch.load(weights_only=True)` reads.

    Supported: dict / OrderedDict / list / tuple, None, bool, int, float, str and numpy
    arrays (float16/32/64, int8/16/32/64, uint8, bool; mlx arrays are converted). Arrays
    are stored C-contiguous, little-endian, one storage each. The file is written to a
    temporary name beside `path` and renamed, so readers never see a partial file.
    """
    path = Path(path)
    writer = _PickleWriter()
    writer.dump(obj)
    pkl = writer.finish()
    root = _archive_name(path)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", allowZip64=True) as archive:
                _write_record(archive, f"{root}/data.pkl", pkl, align=False)
                _write_record(archive, f"{root}/.format_version", FORMAT_VERSION.encode(), align=False)
                _write_record(archive, f"{root}/.storage_alignment", str(STORAGE_ALIGNMENT).encode(), align=False)
                _write_record(archive, f"{root}/byteorder", b"little", align=False)
                for key, array in enumerate(writer.storages):
                    _write_record(archive, f"{root}/data/{key}", array.tobytes(), align=True)
                _write_record(archive, f"{root}/version", ARCHIVE_VERSION.encode(), align=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    logger.debug("wrote %s (%d tensors)", path, len(writer.storages))


# ---------------------------------------------------------------------------------------
# Conditionals -> conds.pt


def conds_tree(t3: dict[str, Any], gen: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The upstream conds.pt tree from numpy fields: ids as int64, floats as float32, keys in
    upstream order (T3Cond's fields, then embed_ref's dict)."""

    def as_file(value: Any, kind: str) -> np.ndarray | None:
        if value is None:
            return None
        return np.asarray(value).astype(np.int64 if kind == "int" else np.float32)

    return {
        "t3": {
            "speaker_emb": as_file(t3["speaker_emb"], "float"),
            "clap_emb": None,
            "cond_prompt_speech_tokens": as_file(t3["cond_prompt_speech_tokens"], "int"),
            "cond_prompt_speech_emb": as_file(t3.get("cond_prompt_speech_emb"), "float"),
            "emotion_adv": as_file(t3["emotion_adv"], "float"),
        },
        "gen": {
            "prompt_token": as_file(gen["prompt_token"], "int"),
            "prompt_token_len": as_file(gen["prompt_token_len"], "int"),
            "prompt_feat": as_file(gen["prompt_feat"], "float"),
            "prompt_feat_len": as_file(gen.get("prompt_feat_len"), "int"),
            "embedding": as_file(gen["embedding"], "float"),
        },
    }


def save_conds(path: str | os.PathLike, conds: "Conditionals") -> None:
    """Write Conditionals as an upstream conds.pt (what `Conditionals.save` in the reference
    writes: int64 ids, float32 tensors, clap_emb None). The structure is validated first."""
    from nightingale.models.torchpickle import GEN_KEYS, TorchPickleError, conds_arrays

    path = Path(path)
    to_np = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    t3 = {
        "speaker_emb": to_np(conds.t3.speaker_emb),
        "clap_emb": None,
        "cond_prompt_speech_tokens": to_np(conds.t3.cond_prompt_speech_tokens),
        "cond_prompt_speech_emb": to_np(conds.t3.cond_prompt_speech_emb),
        "emotion_adv": to_np(conds.t3.emotion_adv),
    }
    missing = [k for k in GEN_KEYS if k not in conds.gen]
    if missing:
        raise TorchPickleError(f"{path.name}: gen is missing {', '.join(missing)}")
    gen = {k: to_np(conds.gen[k]) for k in GEN_KEYS}
    checked_t3, checked_gen = conds_arrays({"t3": t3, "gen": gen}, path.name)
    save(path, conds_tree(checked_t3, checked_gen))
