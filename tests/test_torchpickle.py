"""models/torchpickle.py (reader), nightingale/dev/torchsave.py (writer): torch.save files
read and written without torch.

Golden files come from tools/fixtures_conds.py (real torch 2.x and the reference's own
Conditionals.save); comparisons are exact (bit-equal), since no arithmetic is involved.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nightingale.dev import torchsave as ts
from nightingale.models import torchpickle as tp
from nightingale.models.conds import GEN_KEYS, Conditionals, T3Cond

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
TORCH_FILES = ("conds_torch.pt", "conds_torch_cached.pt", "conds_misc.pt")
# torch dtype name (as recorded by the tools script) -> what load returns
NUMPY_DTYPE = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.float32,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_,
}


def _tools_module():
    spec = importlib.util.spec_from_file_location("fixtures_conds", REPO / "tools" / "fixtures_conds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import; torch is imported inside main()
    return module


TOOLS = _tools_module()


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "conds_expected.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _assert_matches(obj, desc, arrays, where: str) -> None:
    """Compare a loaded tree with the JSON description written from torch's own load."""
    if isinstance(desc, dict) and "__tensor__" in desc:
        assert isinstance(obj, np.ndarray), where
        want = arrays[desc["__tensor__"]]
        assert obj.dtype == NUMPY_DTYPE[desc["dtype"]], f"{where}: {obj.dtype} vs {desc['dtype']}"
        assert obj.shape == want.shape, where
        np.testing.assert_array_equal(obj, want, err_msg=where)
    elif isinstance(desc, dict) and "__dict__" in desc:
        assert isinstance(obj, dict), where
        assert (type(obj) is collections.OrderedDict) == desc["ordered"], where
        assert list(obj) == [k for k, _ in desc["__dict__"]], where
        for k, d in desc["__dict__"]:
            _assert_matches(obj[k], d, arrays, f"{where}.{k}")
    elif isinstance(desc, dict):
        kind, items = next(iter(desc.items()))
        assert type(obj) is {"__tuple__": tuple, "__list__": list}[kind], where
        assert len(obj) == len(items), where
        for i, (o, d) in enumerate(zip(obj, items)):
            _assert_matches(o, d, arrays, f"{where}[{i}]")
    else:
        assert type(obj) is type(desc) and obj == desc, f"{where}: {obj!r} vs {desc!r}"


def _assert_same(a, b, where: str) -> None:
    """Equal trees: same container types, array dtypes, shapes and values."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and str(a) == str(b), f"{where}: {a!r} vs {b!r}"  # str: -0.0 stays -0.0


# ---------------------------------------------------------------------------------------
# Reading files written by torch


@pytest.mark.parametrize("name", TORCH_FILES)
def test_reads_torch_files_exactly(name: str, expected) -> None:
    tree = tp.load(FIXTURES / name)
    desc = json.loads(str(expected[f"{name}/__structure__"]))
    _assert_matches(tree, desc, expected, name)


def test_strided_views_are_resolved(expected) -> None:
    misc = tp.load(FIXTURES / "conds_misc.pt")
    # permuted, transposed, offset+stride and stride-0 views all come back as plain arrays
    for key in ("float", "int", "sliced", "expanded"):
        assert misc[key].flags.c_contiguous and misc[key].flags.owndata
    np.testing.assert_array_equal(misc["sliced"], [3.0, 7.0, 11.0])
    np.testing.assert_array_equal(misc["expanded"], np.repeat(np.arange(3.0)[:, None], 4, axis=1))
    assert misc["scalar"].shape == () and misc["empty"].shape == (0, 4)


def test_load_conds_upstream_file(expected) -> None:
    conds = tp.load_conds(FIXTURES / "conds_torch.pt")
    assert isinstance(conds, Conditionals) and isinstance(conds.t3, T3Cond)
    e = lambda k: expected[f"conds_torch.pt/{k}"]  # noqa: E731
    t3 = conds.t3
    assert t3.speaker_emb.dtype == mx.float32 and t3.speaker_emb.shape == (1, 256)
    np.testing.assert_array_equal(np.array(t3.speaker_emb), e("t3/speaker_emb"))
    assert t3.cond_prompt_speech_tokens.dtype == mx.int32  # int64 on disk
    np.testing.assert_array_equal(np.array(t3.cond_prompt_speech_tokens), e("t3/cond_prompt_speech_tokens"))
    np.testing.assert_array_equal(np.array(t3.emotion_adv), np.full((1, 1, 1), 0.5, np.float32))
    assert t3.cond_prompt_speech_emb is None
    assert list(conds.gen) == list(GEN_KEYS)
    assert conds.gen["prompt_feat_len"] is None
    for key in ("prompt_token", "prompt_token_len"):
        assert conds.gen[key].dtype == mx.int32
        np.testing.assert_array_equal(np.array(conds.gen[key]), e(f"gen/{key}"))
    for key in ("prompt_feat", "embedding"):  # prompt_feat is non-contiguous in the file
        assert conds.gen[key].dtype == mx.float32
        np.testing.assert_array_equal(np.array(conds.gen[key]), e(f"gen/{key}"))


def test_load_conds_cached_embedding_and_defaults(expected) -> None:
    conds = tp.load_conds(FIXTURES / "conds_torch_cached.pt")
    e = lambda k: expected[f"conds_torch_cached.pt/{k}"]  # noqa: E731
    # emotion_adv was the plain float default 0.5 in the file
    np.testing.assert_array_equal(np.array(conds.t3.emotion_adv), np.full((1, 1, 1), 0.5, np.float32))
    emb = conds.t3.cond_prompt_speech_emb
    assert emb is not None and emb.shape == (1, 10, 16) and emb.dtype == mx.float32
    np.testing.assert_array_equal(np.array(emb), e("t3/cond_prompt_speech_emb"))
    assert conds.gen["prompt_feat_len"].dtype == mx.int32
    np.testing.assert_array_equal(np.array(conds.gen["prompt_feat_len"]), [28])
    # prompt_token and the T3 prompt share one storage in the file
    np.testing.assert_array_equal(np.array(conds.gen["prompt_token"])[:, 2:12], np.array(conds.t3.cond_prompt_speech_tokens))
    # float64 on disk -> float32, rounded once
    np.testing.assert_array_equal(np.array(conds.gen["embedding"]), e("gen/embedding").astype(np.float32))


# ---------------------------------------------------------------------------------------
# Writing


def test_round_trip_generic_tree(tmp_path: Path) -> None:
    tree = TOOLS.writer_misc_tree()
    ts.save(tmp_path / "misc.pt", tree)
    back = tp.load(tmp_path / "misc.pt")
    _assert_same(back, tree, "misc")
    assert type(back["ordered"]) is collections.OrderedDict


def test_conds_round_trip(tmp_path: Path) -> None:
    for name in ("conds_torch.pt", "conds_torch_cached.pt"):
        conds = tp.load_conds(FIXTURES / name)
        ts.save_conds(tmp_path / "conds.pt", conds)
        back = tp.load_conds(tmp_path / "conds.pt")
        for field in ("speaker_emb", "cond_prompt_speech_tokens", "emotion_adv", "cond_prompt_speech_emb"):
            a, b = getattr(conds.t3, field), getattr(back.t3, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b)), field
        for key in GEN_KEYS:
            a, b = conds.gen[key], back.gen[key]
            assert (a is None) == (b is None), key
            if a is not None:
                assert a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b)), key
        raw = tp.load(tmp_path / "conds.pt")  # upstream dtypes on disk
        assert raw["t3"]["clap_emb"] is None
        assert raw["t3"]["cond_prompt_speech_tokens"].dtype == np.int64
        assert raw["gen"]["prompt_token"].dtype == np.int64


def test_writer_output_is_what_torch_accepted(tmp_path: Path) -> None:
    """tools/fixtures_conds.py loaded files from our writer with torch.load(weights_only=True)
    (and the reference's Conditionals.load); the same records must still come out."""
    check = json.loads((FIXTURES / "conds_writer_check.json").read_text())
    for name in ("conds_torch.pt", "conds_torch_cached.pt"):
        entry = check["files"][name]
        assert entry["torch_load_weights_only"] == "passed"
        assert entry["reference_Conditionals_load"] == "passed"
        out = tmp_path / "conds.pt"
        ts.save_conds(out, tp.load_conds(FIXTURES / name))
        assert TOOLS.records_digest(out) == entry["records_sha256"], name
    entry = check["files"]["writer_misc_tree"]
    assert entry["torch_load_weights_only"] == "passed"
    ts.save(tmp_path / "misc.pt", TOOLS.writer_misc_tree())
    assert TOOLS.records_digest(tmp_path / "misc.pt") == entry["records_sha256"]


def test_storages_are_aligned(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    ts.save(path, {"x": np.arange(7, dtype=np.float32), "y": [np.ones(3, np.int64), np.zeros(1, np.int8)]})
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        data = [i for i in z.infolist() if "/data/" in i.filename]
        assert len(data) == 3 and all(i.filename.startswith("a/") for i in data)
        for info in data:
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            assert (info.header_offset + 30 + name_len + extra_len) % ts.STORAGE_ALIGNMENT == 0


def test_save_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "conds.pt"
    ts.save(path, {"x": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="complex"):
        ts.save(path, {"x": np.ones(2, np.complex64)})
    with pytest.raises(TypeError, match="set"):
        ts.save(path, {"x": {1, 2}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conds.pt"]  # no temp files left


def test_save_rejects_cycles(tmp_path: Path) -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="self-referencing"):
        ts.save(tmp_path / "x.pt", loop)


# ---------------------------------------------------------------------------------------
# Malicious and malformed files


def _archive(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3")
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


class _SystemCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _PopenCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import subprocess

        return (subprocess.Popen, (["touch", str(self.marker)],))


class Payload:
    """An ordinary class: its instances pickle as a reference to this module's global."""

    def __init__(self) -> None:
        self.value = 1


def _global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-2 pickle of `module.name(arg)`, written opcode by opcode."""
    data = arg.encode()
    return (
        b"\x80\x02c" + f"{module}\n{name}\n".encode()
        + b"X" + struct.pack("<I", len(data)) + data + b"\x85R."
    )


def test_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # Hand-written: GLOBAL os.system, exactly as the attack is usually phrased.
    evil = _archive(tmp_path / "conds.pt", _global_call("os", "system", f"touch {marker}"))
    with pytest.raises(tp.UnsafePickleError, match=r"refusing to load conds\.pt: it references os\.system"):
        tp.load(evil)
    assert not marker.exists()
    # Via __reduce__, as pickle.dumps writes it (os.system is posix.system), nested in a dict
    # after a harmless entry.
    payload = pickle.dumps({"ok": 1, "evil": _SystemCall(f"touch {marker}")}, protocol=2)
    assert b"system" in payload
    evil = _archive(tmp_path / "conds.pt", payload)
    with pytest.raises(tp.UnsafePickleError, match=r"it references (posix|os)\.system"):
        tp.load_conds(evil)
    assert not marker.exists()


def test_refuses_eval(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close()"
    evil = _archive(tmp_path / "conds.pt", _global_call("builtins", "eval", code))
    with pytest.raises(tp.UnsafePickleError, match=r"builtins\.eval"):
        tp.load(evil)
    assert not marker.exists()


def test_refuses_subprocess_popen(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _archive(tmp_path / "conds.pt", pickle.dumps(_PopenCall(marker), protocol=2))
    with pytest.raises(tp.UnsafePickleError, match=r"subprocess\.Popen"):
        tp.load(evil)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refuses_class_instances(tmp_path: Path, protocol: int) -> None:
    evil = _archive(tmp_path / "conds.pt", pickle.dumps({"x": Payload()}, protocol=protocol))
    with pytest.raises(tp.UnsafePickleError, match=r"refusing to load conds\.pt: it references \S*(Payload|_reconstructor)"):
        tp.load(evil)


def test_refuses_calling_a_storage_type(tmp_path: Path) -> None:
    # The storage classes are allowed as names only; REDUCE on one must not construct anything.
    bad = _archive(tmp_path / "conds.pt", b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(tp.TorchPickleError, match="malformed pickle"):
        tp.load(bad)


def test_rejects_tensor_overrunning_its_storage(tmp_path: Path) -> None:
    # A valid file whose tensor claims 100 elements of a 2-element storage (as_strided would read
    # past the buffer).
    good = tmp_path / "good.pt"
    ts.save(good, np.zeros(2, np.float32))
    with zipfile.ZipFile(good) as z:
        pkl = z.read("good/data.pkl")
        storage = z.read("good/data/0")
    pkl = pkl.replace(b"K\x02\x85K\x01\x85", b"Kd\x85K\x01\x85")  # size (2,) -> (100,)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("bad/data.pkl", pkl)
        z.writestr("bad/data/0", storage)
    with pytest.raises(tp.TorchPickleError, match="overruns"):
        tp.load(bad)


def test_rejects_non_zip_and_legacy_files(tmp_path: Path) -> None:
    text = tmp_path / "conds.pt"
    text.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(tp.TorchPickleError, match=r"conds\.pt is not a torch\.save zip archive"):
        tp.load(text)
    # The pre-1.6 format: a bare pickle stream starting with torch's magic number.
    legacy = tmp_path / "old.pt"
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)
    pickle.dump({"t3": {}}, buf, protocol=2)
    legacy.write_bytes(buf.getvalue())
    with pytest.raises(tp.TorchPickleError, match="legacy torch.save format"):
        tp.load(legacy)
    # A zip that is not a torch archive
    other = tmp_path / "other.pt"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(tp.TorchPickleError, match="not a torch.save archive"):
        tp.load(other)


def test_reads_big_endian_archives(tmp_path: Path) -> None:
    # torch writes byteorder "big" on big-endian hosts; storages are then big-endian.
    values = {"f": np.linspace(-1, 1, 5, dtype=np.float32), "i": np.array([1, -2, 3**30], dtype=np.int64)}
    little = tmp_path / "little.pt"
    ts.save(little, values)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "little/byteorder":
                data = b"big"
            elif name in ("little/data/0", "little/data/1"):
                array = values["f" if name.endswith("0") else "i"]
                data = array.astype(array.dtype.newbyteorder(">")).tobytes()
            dst.writestr(name, data)
    back = tp.load(big)
    for key, array in values.items():
        assert back[key].dtype == array.dtype  # native order again
        np.testing.assert_array_equal(back[key], array)


def test_missing_storage_record(tmp_path: Path) -> None:
    good = tmp_path / "x.pt"
    ts.save(good, np.zeros(2, np.float32))
    with zipfile.ZipFile(good) as z:
        pkl = z.read("x/data.pkl")
    bad = _archive(tmp_path / "y.pt", pkl)
    with pytest.raises(tp.TorchPickleError, match="archive/data/0 is missing"):
        tp.load(bad)


# ---------------------------------------------------------------------------------------
# conds.pt structure validation


def _conds_tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "t3": {
            "speaker_emb": rng.standard_normal((1, 256)).astype(np.float32),
            "clap_emb": None,
            "cond_prompt_speech_tokens": rng.integers(0, 6561, (1, 6)),
            "cond_prompt_speech_emb": None,
            "emotion_adv": np.full((1, 1, 1), 0.7, np.float32),
        },
        "gen": {
            "prompt_token": rng.integers(0, 6561, (1, 5)),
            "prompt_token_len": np.array([5]),
            "prompt_feat": rng.standard_normal((1, 10, 80)).astype(np.float32),
            "prompt_feat_len": None,
            "embedding": rng.standard_normal((1, 192)).astype(np.float32),
        },
    }


def _edit(tree: dict, section: str, key: str, value) -> dict:
    tree[section][key] = value
    return tree


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"t3": {}}, "the top level is missing gen"),
        ({**_conds_tree(), "extra": 1}, "unexpected key.*'extra'"),
        (_edit(_conds_tree(), "t3", "bogus", 1), "unexpected key.*t3.*'bogus'"),
        (
            {"t3": _conds_tree()["t3"], "gen": {k: v for k, v in _conds_tree()["gen"].items() if k != "embedding"}},
            "gen is missing embedding",
        ),
        (_edit(_conds_tree(), "t3", "speaker_emb", np.zeros(256, np.float32)), r"t3\.speaker_emb has shape \(256,\)"),
        (
            _edit(_conds_tree(), "t3", "cond_prompt_speech_tokens", np.zeros((1, 6), np.float32)),
            r"t3\.cond_prompt_speech_tokens must be an integer tensor",
        ),
        (_edit(_conds_tree(), "t3", "clap_emb", np.zeros((1, 4), np.float32)), r"t3\.clap_emb must be None"),
        (_edit(_conds_tree(), "t3", "emotion_adv", "loud"), r"t3\.emotion_adv"),
        (
            _edit(_conds_tree(), "t3", "cond_prompt_speech_emb", np.zeros((1, 5, 8), np.float32)),
            r"t3\.cond_prompt_speech_emb covers 5",
        ),
        (_edit(_conds_tree(), "gen", "prompt_feat", np.zeros((1, 10, 80), np.int64)), r"gen\.prompt_feat must be a float tensor"),
        (_edit(_conds_tree(), "gen", "prompt_token", np.full((1, 5), -1)), r"gen\.prompt_token holds values outside"),
        (_edit(_conds_tree(), "gen", "prompt_token_len", np.array([9])), r"gen\.prompt_token_len must be \(1,\)"),
        (_edit(_conds_tree(), "gen", "prompt_feat_len", np.array([11])), r"gen\.prompt_feat_len must be None or \(1,\)"),
        (_edit(_conds_tree(), "gen", "embedding", None), r"gen\.embedding must be a tensor"),
    ],
)
def test_load_conds_names_the_bad_field(tmp_path: Path, tree: dict, message: str) -> None:
    ts.save(tmp_path / "conds.pt", tree)
    with pytest.raises(tp.TorchPickleError, match=message):
        tp.load_conds(tmp_path / "conds.pt")


def test_load_conds_accepts_valid_tree(tmp_path: Path) -> None:
    tree = _conds_tree()
    ts.save(tmp_path / "conds.pt", tree)
    conds = tp.load_conds(tmp_path / "conds.pt")
    np.testing.assert_array_equal(np.array(conds.t3.emotion_adv), tree["t3"]["emotion_adv"])
    np.testing.assert_array_equal(np.array(conds.gen["prompt_token"]), tree["gen"]["prompt_token"])


def test_save_conds_validates(tmp_path: Path) -> None:
    conds = tp.load_conds(FIXTURES / "conds_torch.pt")
    conds.gen = {k: v for k, v in conds.gen.items() if k != "prompt_feat"}
    with pytest.raises(tp.TorchPickleError, match="gen is missing prompt_feat"):
        ts.save_conds(tmp_path / "conds.pt", conds)
    assert not (tmp_path / "conds.pt").exists()

