"""Golden files for models/torchpickle.py and nightingale/dev/torchsave.py, written and
checked by real torch.

Run in the reference venv (from the repo root):

    OMP_NUM_THREADS=1 .ref-venv/bin/python tools/fixtures_conds.py

It writes into tests/fixtures/:
- conds_torch.pt, conds_torch_cached.pt: upstream-shaped voices saved by the reference's own
  `chatterbox.tts.Conditionals.save` (non-contiguous prompt_feat as embed_ref makes it,
  tensors viewing a storage at an offset, int64 ids, one storage shared by two tensors,
  the float default of emotion_adv);
- conds_misc.pt: a torch.save of every storage dtype, 0-d / empty / permuted tensors and
  nested containers;
- conds_expected.npz: the values torch sees in each file, with a JSON description of the
  tree (`<file>/__structure__`) so the tests compare the whole structure without torch;
- conds_writer_check.json: the check of OUR writer: files written by nightingale/dev/torchsave.py
  (imported from its path, as is the reader; both need only numpy) must load with
  `torch.load(weights_only=True)` and, for conds, with the reference's `Conditionals.load`.
  It records a digest of the records written, so the tests can confirm that our writer
  still produces exactly what torch accepted here.

Only numpy is imported at module level: tests import `writer_misc_tree` from this file.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CHECK_FILE = "conds_writer_check.json"
EXPECTED_FILE = "conds_expected.npz"


def writer_misc_tree() -> dict:
    """A tree exercising every type our writer supports (numpy only, deterministic)."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((2, 3, 4)).astype(np.float32)
    return {
        "f32_permuted": base.transpose(2, 0, 1),  # non-contiguous input, written contiguous
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": np.array([[-(2**40), 0, 2**40]], dtype=np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "i16": np.array([-300, 300], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(1.25, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "nested": [1, -7, 70000, -(2**31), 2**31, 2**70, -(2**70), 2.5, -0.0, "héllo", True, False, None, (1, 2), (1, 2, 3, 4)],
        "ordered": collections.OrderedDict([("b", np.ones(2, dtype=np.float32)), ("a", ())]),
        "big_list": list(range(1005)),  # more than one APPENDS batch
        "big_dict": {f"k{i}": i for i in range(1003)},  # more than one SETITEMS batch
    }


def records_digest(path: Path) -> str:
    """sha256 over every record's name and bytes (independent of zip container details)."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    return h.hexdigest()


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _describe(obj: Any, prefix: str, arrays: dict[str, np.ndarray], torch) -> Any:
    """JSON description of a torch tree; tensors go into `arrays` under their path."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        arrays[prefix] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
        return {"__tensor__": prefix, "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        items = [[k, _describe(v, f"{prefix}/{k}", arrays, torch)] for k, v in obj.items()]
        return {"__dict__": items, "ordered": type(obj) is collections.OrderedDict}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_describe(v, f"{prefix}/{i}", arrays, torch) for i, v in enumerate(obj)]}
    assert obj is None or isinstance(obj, (bool, int, float, str)), type(obj)
    return obj


def _assert_same(a: Any, b: Any, torch, where: str = "") -> None:
    """Equal trees: same container types, same tensor dtypes, shapes and bits."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], torch, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, torch, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def _torch_tree(tree: Any, torch) -> Any:
    """What torch.load should give back for a tree we wrote (numpy arrays -> tensors)."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.array(tree, order="C"))
    if isinstance(tree, dict):
        out = [(k, _torch_tree(v, torch)) for k, v in tree.items()]
        return collections.OrderedDict(out) if type(tree) is collections.OrderedDict else dict(out)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_torch_tree(v, torch) for v in tree)
    return tree


def main() -> None:
    import torch
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    FIXTURES.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    # 1. An upstream-shaped voice, saved by the reference's own Conditionals.save.
    speaker_rows = torch.rand(3, 256, generator=g)
    ids = torch.randint(0, 6561, (1, 20), generator=g)  # int64, as S3Tokenizer returns
    conds = Conditionals(
        T3Cond(
            speaker_emb=speaker_rows[1:2],  # storage offset 256
            cond_prompt_speech_tokens=ids[:, 4:16],  # storage offset 4
            emotion_adv=0.5 * torch.ones(1, 1, 1),
        ),
        dict(
            prompt_token=torch.randint(0, 6561, (1, 12), generator=g),
            prompt_token_len=torch.tensor([12]),
            prompt_feat=torch.randn(1, 80, 24, generator=g).transpose(1, 2),  # (1, 24, 80), strides (1920, 1, 24)
            prompt_feat_len=None,
            embedding=torch.randn(1, 192, generator=g),
        ),
    )
    assert not conds.gen["prompt_feat"].is_contiguous()
    conds.save(FIXTURES / "conds_torch.pt")

    # 2. A voice with T3's cached prompt embedding, the float default of emotion_adv,
    #    prompt_feat_len set, and prompt_token sharing one storage with the T3 prompt.
    ids = torch.randint(0, 6561, (1, 16), generator=g)
    cached = Conditionals(
        T3Cond(
            speaker_emb=torch.rand(1, 256, generator=g),
            cond_prompt_speech_tokens=ids[:, 2:12],
            cond_prompt_speech_emb=torch.randn(1, 10, 32, generator=g)[:, :, ::2],  # stride 2 in the last dim
        ),
        dict(
            prompt_token=ids[:, :14],
            prompt_token_len=torch.tensor([14], dtype=torch.int32),
            prompt_feat=torch.randn(1, 28, 80, generator=g),
            prompt_feat_len=torch.tensor([28]),
            embedding=torch.randn(1, 192, generator=g, dtype=torch.float64),
        ),
    )
    assert cached.t3.emotion_adv == 0.5 and isinstance(cached.t3.emotion_adv, float)
    cached.save(FIXTURES / "conds_torch_cached.pt")

    # 3. Every storage type and container, saved by plain torch.save.
    base = torch.randn(2, 3, 4, generator=g)
    misc = {
        "float": base.permute(2, 0, 1),  # non-contiguous
        "double": torch.randn(3, generator=g, dtype=torch.float64),
        "half": torch.randn(2, 2, generator=g).half(),
        "bfloat16": torch.randn(5, generator=g).bfloat16(),
        "long": torch.tensor([[-(2**40), 0, 2**40]]),
        "int": torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3).t(),
        "short": torch.tensor([-300, 300], dtype=torch.int16),
        "char": torch.tensor([-128, 127], dtype=torch.int8),
        "byte": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.25),
        "empty": torch.zeros(0, 4),
        "sliced": torch.arange(20.0)[3:15:4],  # offset 3, stride 4
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
        "nested": [1, -7, 2**40, 2.5, "s", True, None, (1, (2, 3))],
        "ordered": collections.OrderedDict([("z", torch.ones(2)), ("a", None)]),
    }
    torch.save(misc, FIXTURES / "conds_misc.pt")

    # Expected values, as torch itself reads each file back.
    arrays: dict[str, np.ndarray] = {}
    for name in ("conds_torch.pt", "conds_torch_cached.pt", "conds_misc.pt"):
        tree = torch.load(FIXTURES / name, weights_only=True)
        arrays[f"{name}/__structure__"] = np.array(json.dumps(_describe(tree, name, arrays, torch)))
    np.savez(FIXTURES / EXPECTED_FILE, **arrays)

    # 4. Our writer, checked by torch.load(weights_only=True) and the reference's Conditionals.load.
    tp = _import_file("torchpickle", REPO / "models" / "torchpickle.py")
    ts = _import_file("torchsave", REPO / "nightingale" / "dev" / "torchsave.py")
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "chatterbox_tts": importlib.metadata.version("chatterbox-tts"),
        "files": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("conds_torch.pt", "conds_torch_cached.pt"):
            # Exactly what save_conds(load_conds(name)) writes, minus the mlx round trip.
            t3, gen = tp.conds_arrays(tp.load(FIXTURES / name), name)
            out = Path(tmp) / "conds.pt"
            ts.save(out, ts.conds_tree(t3, gen))
            ours = torch.load(out, weights_only=True)
            ref = torch.load(FIXTURES / name, weights_only=True)
            for section in ("t3", "gen"):
                for key, value in ref[section].items():
                    if isinstance(value, torch.Tensor):
                        want = value.long() if not value.is_floating_point() else value.float()
                        _assert_same(ours[section][key], want, torch, f"{name}:{section}.{key}")
                    elif isinstance(value, float):  # the emotion_adv default becomes a (1, 1, 1) tensor
                        _assert_same(ours[section][key], torch.full((1, 1, 1), value), torch, f"{name}:{section}.{key}")
                    else:
                        assert ours[section][key] is None, f"{name}:{section}.{key}"
            loaded = Conditionals.load(out)  # the reference's own loader (weights_only=True)
            assert torch.equal(loaded.t3.speaker_emb, ref["t3"]["speaker_emb"])
            assert loaded.t3.clap_emb is None
            assert loaded.gen["prompt_token"].dtype == torch.int64
            report["files"][name] = {
                "written_by": "save(path, conds_tree(*conds_arrays(load(fixture))))",
                "records_sha256": records_digest(out),
                "torch_load_weights_only": "passed",
                "reference_Conditionals_load": "passed",
            }

        out = Path(tmp) / "misc.pt"
        tree = writer_misc_tree()
        ts.save(out, tree)
        ours = torch.load(out, weights_only=True)
        _assert_same(ours, _torch_tree(tree, torch), torch, "misc")
        report["files"]["writer_misc_tree"] = {
            "written_by": "save(path, writer_misc_tree())",
            "records_sha256": records_digest(out),
            "torch_load_weights_only": "passed",
        }
    (FIXTURES / CHECK_FILE).write_text(json.dumps(report, indent=2) + "\n")
    for name in sorted(FIXTURES.glob("conds_*")):
        print(f"{name.relative_to(REPO)}  {name.stat().st_size} bytes")
    print("writer check passed:", ", ".join(report["files"]))


if __name__ == "__main__":
    sys.exit(main())
