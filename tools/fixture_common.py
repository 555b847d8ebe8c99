"""What the golden-fixture generators (tools/fixtures_*.py) share.

Every generator works in two virtual environments. Step 1 runs in ours: it writes tiny
random weights (or a whole checkpoint) into a directory, exactly as the tests regenerate
them. Step 2 runs in the reference's (tools/make_reference_env.sh builds it: torch and
chatterbox-tts 0.1.7): it builds the reference modules with those dimensions, loads the
weights strictly, replaces the reference's random draws with injected values and writes
tests/fixtures/. Run without a checkpoint, step 2 runs step 1 itself in a temporary
directory, with $NIGHTINGALE_PYTHON (default .venv/bin/python) as our interpreter.

Only the standard library and numpy are imported at the top: the functions that need
torch, safetensors or nightingale import them where they run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
S3GEN_FILE = "s3gen.safetensors"
DIMS_FILE = "dims.json"


def our_python() -> str:
    """The interpreter of our virtual environment (step 1)."""
    return os.environ.get("NIGHTINGALE_PYTHON", str(REPO / ".venv" / "bin" / "python"))


def make_from(checkpoint: Path | None, script: str, write_args: list[str], make: Callable[[Path], None]) -> None:
    """Step 2 on `checkpoint`; without one, on a temporary directory that our venv fills
    first by running `script *write_args DIR` (step 1)."""
    if checkpoint is not None:
        make(checkpoint)
        return
    with tempfile.TemporaryDirectory() as tmp:
        # PYTHONPATH is the reference venv's business: keep it out of ours
        subprocess.run([our_python(), str(Path(script).resolve()), *write_args, tmp], check=True,
                       env=dict(os.environ, PYTHONPATH=""))
        make(Path(tmp))


def run_generator(doc: str, script: str, write: Callable[[Path, argparse.Namespace], None],
                  make: Callable[[Path, argparse.Namespace], None],
                  options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Every generator's command line:

        our venv:       tools/fixtures_X.py --write DIR [--seed N]       step 1 into DIR
        reference venv: tools/fixtures_X.py [--checkpoint DIR] [--out DIR] [--seed N]

    Step 2 writes the fixtures into --out (default tests/fixtures/) from --checkpoint, or
    from a temporary directory that our venv fills first (`script --seed N --write TMP`).
    `options` adds a generator's own arguments."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, metavar="DIR", help="(our venv) write step 1's files into DIR and exit")
    parser.add_argument("--checkpoint", type=Path, help="(reference venv) read this directory instead of a fresh one")
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture directory (default tests/fixtures)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (the tests use 0)")
    if options is not None:
        options(parser)
    args = parser.parse_args()
    if args.write is not None:
        write(args.write, args)
        return
    make_from(args.checkpoint, script, ["--seed", str(args.seed), "--write"], lambda checkpoint: make(checkpoint, args))


def write_s3gen_part(out_dir: Path, part: str, prefix: str, cfg, shapes: dict, seed: int) -> None:
    """Step 1 for one S3Gen part (our venv): its random weights as the tests draw them
    (`random_weights(shapes, default_rng(seed), prefix)`) in s3gen.safetensors, and
    {"s3gen": {part: cfg}} in dims.json: the layout of a make_checkpoint directory."""
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import random_weights

    weights = random_weights(shapes, np.random.default_rng(seed), prefix)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / S3GEN_FILE))
    (out_dir / DIMS_FILE).write_text(json.dumps({"s3gen": {part: cfg.to_dict()}}, indent=1))


def read_s3gen_part(checkpoint: Path, part: str, prefix: str, file_name: str = S3GEN_FILE) -> tuple[dict, dict]:
    """(the part's dims, {key relative to prefix: torch tensor}) from a checkpoint directory."""
    from safetensors.torch import load_file

    dims = json.loads((checkpoint / DIMS_FILE).read_text())["s3gen"][part]
    tensors = load_file(str(checkpoint / file_name))
    return dims, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_strict(module, state: dict):
    """`module.load_state_dict(state, strict=True)`, asserting every key was used; returns the module."""
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return module


@contextlib.contextmanager
def patched(obj, name: str, value) -> Iterator[None]:
    """obj.name is `value` inside the block."""
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def injected_multinomial(choose: Callable) -> Iterator[tuple[list, list]]:
    """torch.multinomial returns [[choose(step, probs of row 0)]] inside the block. Yields
    (the probabilities handed to it, as numpy, and the tokens chosen), filled as it runs."""
    import torch

    probs_seen: list[np.ndarray] = []
    chosen: list[int] = []

    def fake_multinomial(probs, num_samples=1):
        probs_seen.append(probs[0].clone().numpy())
        token = choose(len(chosen), probs[0])
        chosen.append(token)
        return torch.tensor([[token]], dtype=torch.long)

    with patched(torch, "multinomial", fake_multinomial):
        yield probs_seen, chosen


def token_rows(ids: list[list[int]]) -> dict[str, np.ndarray]:
    """Ragged token-id rows as two arrays: ids_flat and ids_lengths (int32)."""
    return {
        "ids_flat": np.array([i for row in ids for i in row], dtype=np.int32),
        "ids_lengths": np.array([len(row) for row in ids], dtype=np.int32),
    }


def turbo_t3_config(text_vocab: int = 50276, backbone: str = "GPT2_medium"):
    """The reference's Turbo T3Config, set as `ChatterboxTurboTTS.from_local` sets it (tools/fixtures_turbo.py;
    bench/turbo.py runs the reference's Turbo T3 on a GPU with it)."""
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config(text_tokens_dict_size=text_vocab)
    hp.llama_config_name = backbone
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp
