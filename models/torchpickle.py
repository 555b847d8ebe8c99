"""Read `torch.save` zip archives without torch (the built-in voice, conds.pt).

A torch.save file (torch >= 1.6) is a zip archive `<root>/data.pkl` + `<root>/data/<key>`:
the pickle describes the object tree and refers to each tensor's raw bytes through a
persistent id `('storage', torch.<Type>Storage, key, location, numel)`, and rebuilds the
tensor with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

`load` unpickles with an allow-list in the spirit of `torch.load(weights_only=True)`: tensors
(returned as numpy arrays), numbers, strings, None and containers. Any other global is
refused *before* it is resolved, so a malicious file cannot run code: the refusal is an
`UnsafePickleError` that names the global. The writer of the same format (random
checkpoints, the parity fixtures) is development code: nightingale/dev/torchsave.py.

`load_conds` maps the upstream conds.pt structure, `{"t3": T3Cond.__dict__, "gen": ref_dict}`,
to `models.conds.Conditionals`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # mlx is imported lazily so that tools/ can use load from the torch venv
    from .conds import Conditionals

# torch.<Name>Storage -> little-endian dtype of its elements. bfloat16 has no numpy dtype:
# it is read as uint16 and widened to float32 (exact) when the tensor is rebuilt.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
# The first bytes of a pre-1.6 torch.save file: pickled LONG1 magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

T3_KEYS = ("speaker_emb", "clap_emb", "cond_prompt_speech_tokens", "cond_prompt_speech_emb", "emotion_adv")
GEN_KEYS = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")
DEFAULT_EMOTION_ADV = 0.5  # upstream T3Cond's default when the field is absent
INT32_MAX = 2**31 - 1


# Bounds checked before anything is allocated: a conds.pt holds well under 10 MB (a
# voice's conditioning tensors), so these leave ample room and stop zip bombs, zero-stride
# tensors that expand into gigabytes, and nesting that exhausts the stack.
MAX_ARCHIVE_BYTES = 256 << 20  # sum of the uncompressed sizes of all records
MAX_TENSOR_BYTES = 256 << 20  # sum of the bytes of all rebuilt tensors
MAX_DEPTH = 64  # containers inside containers


class TorchPickleError(ValueError):
    """The file is not a readable torch.save archive, or holds an unexpected structure."""


class UnsafePickleError(TorchPickleError):
    """The pickle references a global outside the allow-list; nothing of it was executed."""


# ---------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for the class `torch.<name>`: only usable inside a storage persistent id.

    It is deliberately not callable, so a pickle that tries to REDUCE it fails."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """A storage's elements as a flat read-only numpy array (dtype of the storage type)."""

    type_name: str
    elements: np.ndarray
    budget: list  # [bytes that rebuilt tensors may still allocate], shared by one load


def _is_empty_hooks(hooks: Any) -> bool:
    return hooks is None or (isinstance(hooks, dict) and len(hooks) == 0)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """Our `torch._utils._rebuild_tensor_v2`: a strided view of a storage, copied out.

    Shapes: size/stride are tuples of the same length (strides in elements). Every element
    the view would touch is bounds-checked first: as_strided reads raw memory."""
    if not isinstance(storage, _Storage):
        raise TorchPickleError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    if not _is_empty_hooks(backward_hooks):
        raise TorchPickleError("tensor carries backward hooks (code); refusing")
    if not (metadata is None or (isinstance(metadata, dict) and len(metadata) == 0)):
        raise TorchPickleError("tensor carries metadata; only plain tensors are supported")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise TorchPickleError(f"invalid storage offset {storage_offset!r}")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise TorchPickleError(f"invalid tensor size/stride {size!r}/{stride!r}")
    if not all(_is_int(n) and n >= 0 for n in size) or not all(_is_int(s) and s >= 0 for s in stride):
        raise TorchPickleError(f"invalid tensor size/stride {size!r}/{stride!r}")
    nbytes = math.prod(size) * storage.elements.dtype.itemsize
    if nbytes > storage.budget[0]:
        raise TorchPickleError(
            f"tensor of size {size} would need {nbytes} bytes, more than the {MAX_TENSOR_BYTES} bytes allowed in total"
        )
    storage.budget[0] -= nbytes

    elements = storage.elements
    if 0 in size:
        out = np.empty(size, dtype=elements.dtype)
    else:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise TorchPickleError(
                f"tensor of size {size} stride {stride} offset {storage_offset} overruns its "
                f"storage of {elements.size} elements"
            )
        itemsize = elements.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            elements[storage_offset:],
            shape=size,
            strides=tuple(s * itemsize for s in stride),
            writeable=False,
        )
        out = np.array(view, order="C")  # own the memory: the zip bytes go away after load
    if storage.type_name == "BFloat16Storage":
        # bfloat16 is the top half of a float32: widen exactly.
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from the open zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, label: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._label = label
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}
        self._budget = [MAX_TENSOR_BYTES]

    def find_class(self, module: str, name: str) -> Any:
        # Called for GLOBAL, STACK_GLOBAL, INST and EXT*: the only ways a pickle reaches code.
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        # Python-2 style names (protocol <= 2 writes subprocess as "commands") are shown as
        # Python 3 names; nothing is resolved either way.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        raise UnsafePickleError(
            f"refusing to load {self._label}: it references {module}.{name} "
            "(only tensors, numbers, strings, None and containers are allowed)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchPickleError(f"{self._label}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid  # location (cpu/cuda:N) is irrelevant here
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"{self._label}: persistent id names {storage_type!r}, not a storage type")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise TorchPickleError(f"{self._label}: malformed storage id {pid!r}")
        cached = self._storages.get(key)
        if cached is not None:  # several tensors may view one storage
            return cached
        record = f"{self._root}/data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError:
            raise TorchPickleError(f"{self._label}: storage record {record} is missing") from None
        dtype = STORAGE_DTYPES[storage_type.name]
        if self._byteorder == "big":
            dtype = dtype.newbyteorder(">")
        if len(raw) < numel * dtype.itemsize:
            raise TorchPickleError(
                f"{self._label}: storage {key} holds {len(raw)} bytes, expected {numel * dtype.itemsize}"
            )
        storage = _Storage(storage_type.name, np.frombuffer(raw, dtype=dtype, count=numel), self._budget)
        self._storages[key] = storage
        return storage


def _check_tree(obj: Any, label: str, where: str = "", depth: int = 0) -> None:
    """Only the allowed value types may come out of a load (no stray storages or markers)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, np.ndarray)):
        return
    if depth >= MAX_DEPTH:
        raise TorchPickleError(f"{label}: containers nested more than {MAX_DEPTH} deep")
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_tree(item, label, f"{where}[{i}]", depth + 1)
        return
    if isinstance(obj, dict):  # includes OrderedDict
        for k, v in obj.items():
            _check_tree(k, label, f"{where}.key", depth + 1)
            _check_tree(v, label, f"{where}[{k!r:.40}]", depth + 1)
        return
    raise TorchPickleError(f"{label}: unsupported value of type {type(obj).__name__} at {where or 'top level'}")


def _archive_root(names: list[str], label: str) -> str:
    roots = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise TorchPickleError(
            f"{label} is a zip file but not a torch.save archive "
            f"(expected exactly one <root>/data.pkl, found {len(roots)})"
        )
    return roots[0]


def _not_zip_message(path: Path, label: str) -> str:
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if head == LEGACY_MAGIC or tarfile.is_tarfile(path):
        return (
            f"{label} uses the legacy torch.save format (torch < 1.6), which is not supported: "
            "re-save it once with a recent torch, e.g. torch.save(torch.load(f), f)"
        )
    return f"{label} is not a torch.save zip archive"


def load(path: str | os.PathLike) -> Any:
    """Read a torch.save zip archive; tensors come back as numpy arrays.

    Tensors keep their shape and values (strides and storage offsets are resolved, the
    result is C-contiguous and owns its memory); bfloat16 becomes float32. Containers keep
    their type (dict, OrderedDict, list, tuple).

    Raises UnsafePickleError when the pickle references anything outside the allow-list
    (nothing is executed), TorchPickleError for other malformed or unsupported files.
    """
    path = Path(path)
    label = path.name
    if not zipfile.is_zipfile(path):
        raise TorchPickleError(_not_zip_message(path, label))
    with zipfile.ZipFile(path) as archive:
        declared = sum(info.file_size for info in archive.infolist())
        if declared > MAX_ARCHIVE_BYTES:
            raise TorchPickleError(f"{label}: archive unpacks to {declared} bytes, more than the {MAX_ARCHIVE_BYTES} allowed")
        root = _archive_root(archive.namelist(), label)
        byteorder = "little"
        if f"{root}/byteorder" in archive.namelist():
            byteorder = archive.read(f"{root}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise TorchPickleError(f"{label}: unknown byte order {byteorder!r}")
        unpickler = _RestrictedUnpickler(archive.read(f"{root}/data.pkl"), archive, root, label, byteorder)
        try:
            obj = unpickler.load()
        except TorchPickleError:
            raise
        except RecursionError:
            raise TorchPickleError(f"{label}: the pickle is nested too deeply") from None
        except Exception as e:  # malformed opcodes, calling a non-callable marker, ...
            raise TorchPickleError(f"{label}: malformed pickle ({type(e).__name__}: {str(e)[:200]})") from e
    _check_tree(obj, label)
    return obj


# ---------------------------------------------------------------------------------------
# conds.pt -> Conditionals


def _field_array(value: Any, field: str, label: str, kind: str, ndim: int) -> np.ndarray:
    """A tensor field checked for kind ('float' or 'int'), rank and batch size 1."""
    if not isinstance(value, np.ndarray):
        raise TorchPickleError(f"{label}: {field} must be a tensor, got {type(value).__name__}")
    if kind == "float" and value.dtype.kind != "f":
        raise TorchPickleError(f"{label}: {field} must be a float tensor, got {value.dtype}")
    if kind == "int" and value.dtype.kind not in "iu":
        raise TorchPickleError(f"{label}: {field} must be an integer tensor, got {value.dtype}")
    if value.ndim != ndim or value.shape[0] != 1:
        raise TorchPickleError(
            f"{label}: {field} has shape {value.shape}, expected {ndim} dimensions with batch 1"
        )
    if kind == "int":
        if value.size and (value.min() < 0 or value.max() > INT32_MAX):
            raise TorchPickleError(f"{label}: {field} holds values outside [0, 2**31)")
        return value.astype(np.int32)
    return value.astype(np.float32)


def _emotion(value: Any, label: str) -> np.ndarray:
    # Upstream stores a (1, 1, 1) tensor; T3Cond's default is the plain float 0.5.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return np.full((1, 1, 1), float(value), dtype=np.float32)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size == 1:
        return value.astype(np.float32).reshape(1, 1, 1)
    raise TorchPickleError(f"{label}: t3.emotion_adv must be a number or a 1-element float tensor, got {value!r}")


def _check_keys(d: Any, keys: tuple[str, ...], required: tuple[str, ...], what: str, label: str) -> None:
    if not isinstance(d, dict):
        raise TorchPickleError(f"{label}: {what} must be a dict, got {type(d).__name__}")
    unknown = [k for k in d if k not in keys]
    if unknown:
        raise TorchPickleError(f"{label}: unexpected key(s) in {what}: {', '.join(map(repr, unknown))}")
    missing = [k for k in required if k not in d]
    if missing:
        raise TorchPickleError(f"{label}: {what} is missing {', '.join(missing)}")


CondsFields = dict[str, "np.ndarray | None"]


def conds_arrays(tree: Any, label: str = "conds.pt") -> tuple[CondsFields, CondsFields]:
    """Validate an upstream conds tree and return (t3, gen) numpy fields, in memory dtypes.

    t3: speaker_emb (1, S) f32, cond_prompt_speech_tokens (1, P) i32, emotion_adv (1, 1, 1)
    f32, cond_prompt_speech_emb (1, P, D) f32 or None. gen: prompt_token (1, P') i32,
    prompt_token_len (1,) i32, prompt_feat (1, T, M) f32, prompt_feat_len (1,) i32 or None,
    embedding (1, E) f32. Errors name the offending field.
    """
    _check_keys(tree, ("t3", "gen"), ("t3", "gen"), "the top level", label)
    t3_in, gen_in = tree["t3"], tree["gen"]
    _check_keys(t3_in, T3_KEYS, ("speaker_emb", "cond_prompt_speech_tokens"), "t3", label)
    _check_keys(gen_in, GEN_KEYS, GEN_KEYS, "gen", label)

    if t3_in.get("clap_emb") is not None:  # upstream T3 asserts it is None
        raise TorchPickleError(f"{label}: t3.clap_emb must be None")
    t3: CondsFields = {
        "speaker_emb": _field_array(t3_in["speaker_emb"], "t3.speaker_emb", label, "float", 2),
        "cond_prompt_speech_tokens": _field_array(
            t3_in["cond_prompt_speech_tokens"], "t3.cond_prompt_speech_tokens", label, "int", 2
        ),
        "emotion_adv": _emotion(t3_in.get("emotion_adv", DEFAULT_EMOTION_ADV), label),
        "cond_prompt_speech_emb": None,
    }
    if t3_in.get("cond_prompt_speech_emb") is not None:
        emb = _field_array(t3_in["cond_prompt_speech_emb"], "t3.cond_prompt_speech_emb", label, "float", 3)
        if emb.shape[1] != t3["cond_prompt_speech_tokens"].shape[1]:
            raise TorchPickleError(
                f"{label}: t3.cond_prompt_speech_emb covers {emb.shape[1]} positions but "
                f"t3.cond_prompt_speech_tokens has {t3['cond_prompt_speech_tokens'].shape[1]}"
            )
        t3["cond_prompt_speech_emb"] = emb

    gen: CondsFields = {
        "prompt_token": _field_array(gen_in["prompt_token"], "gen.prompt_token", label, "int", 2),
        "prompt_token_len": _field_array(gen_in["prompt_token_len"], "gen.prompt_token_len", label, "int", 1),
        "prompt_feat": _field_array(gen_in["prompt_feat"], "gen.prompt_feat", label, "float", 3),
        "prompt_feat_len": None,
        "embedding": _field_array(gen_in["embedding"], "gen.embedding", label, "float", 2),
    }
    n_tokens = gen["prompt_token"].shape[1]
    if gen["prompt_token_len"].shape != (1,) or gen["prompt_token_len"][0] > n_tokens:
        raise TorchPickleError(
            f"{label}: gen.prompt_token_len must be (1,) with a value <= {n_tokens} "
            f"(gen.prompt_token length), got {gen['prompt_token_len'].tolist()}"
        )
    if gen_in["prompt_feat_len"] is not None:
        feat_len = _field_array(gen_in["prompt_feat_len"], "gen.prompt_feat_len", label, "int", 1)
        n_frames = gen["prompt_feat"].shape[1]
        if feat_len.shape != (1,) or feat_len[0] > n_frames:
            raise TorchPickleError(
                f"{label}: gen.prompt_feat_len must be None or (1,) with a value <= {n_frames} "
                f"(gen.prompt_feat frames), got {feat_len.tolist()}"
            )
        gen["prompt_feat_len"] = feat_len
    return t3, gen


def load_conds(path: str | os.PathLike) -> "Conditionals":
    """Read an upstream conds.pt (the built-in voice) into Conditionals (mx arrays).

    Integer ids become int32 and floats float32 (see `conds_arrays` for the shapes)."""
    import mlx.core as mx

    from .conds import Conditionals, T3Cond

    path = Path(path)
    t3, gen = conds_arrays(load(path), path.name)
    to_mx = lambda a: None if a is None else mx.array(a)  # noqa: E731
    return Conditionals(
        t3=T3Cond(
            speaker_emb=to_mx(t3["speaker_emb"]),
            cond_prompt_speech_tokens=to_mx(t3["cond_prompt_speech_tokens"]),
            emotion_adv=to_mx(t3["emotion_adv"]),
            cond_prompt_speech_emb=to_mx(t3["cond_prompt_speech_emb"]),
        ),
        gen={k: to_mx(gen[k]) for k in GEN_KEYS},
    )
