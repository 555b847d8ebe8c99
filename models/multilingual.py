"""Chatterbox Multilingual's checkpoint layout: the files and reading them (random ones:
nightingale/dev/checkpoint.py).

Upstream (`mtl_tts.ChatterboxMultilingualTTS.from_pretrained`) fetches six files from the
same Hugging Face repo as the English model:

- t3_mtl23ls_v2.safetensors: T3 with the 2454-id text vocabulary (T3Config.multilingual());
- ve.pt, s3gen.pt: `torch.save(state_dict)` archives of the VoiceEncoder and S3Gen, loaded
  strictly (for S3Gen too, unlike the English s3gen.safetensors), so the two S3Tokenizer
  buffers are present. Read here with models/torchpickle.py (allow-listed unpickling:
  nothing is executed);
- grapheme_mtl_merged_expanded_v1.json: the tokenizer (models/mtl_tokenizer.py);
- conds.pt: the built-in voice;
- Cangjie5_TC.json: the Chinese front end's table (only Chinese needs it).

Key names and shapes are the English components' (`upstream_shapes`), with T3's text
tables at 2454 rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .mtl_tokenizer import CANGJIE_FILE, TOKENIZER_FILE

FAMILY = "multilingual"
T3_FILE = "t3_mtl23ls_v2.safetensors"
VE_FILE = "ve.pt"
S3GEN_FILE = "s3gen.pt"
CONDS_FILE = "conds.pt"
REQUIRED_FILES = (VE_FILE, T3_FILE, S3GEN_FILE, TOKENIZER_FILE, CONDS_FILE)
CHECKPOINT_FILES = REQUIRED_FILES + (CANGJIE_FILE,)  # upstream's allow_patterns


def is_multilingual_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / T3_FILE).is_file()


def missing_files(directory: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (directory / name).is_file()]


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A torch.save'd state dict (ve.pt, s3gen.pt) as numpy arrays, without torch."""
    from . import torchpickle
    from .loading import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"{path.name}: file not found in {path.parent}")
    try:
        state = torchpickle.load(path)
    except torchpickle.TorchPickleError as err:
        raise CheckpointError(f"{path.name}: {err}") from None
    if isinstance(state, dict) and "model" in state and len(state) == 1:  # a wrapped checkpoint
        state = state["model"]
        state = state[0] if isinstance(state, (list, tuple)) else state
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path.name}: not a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def read_weights(directory: Path, t3_cfg, ve_cfg, s3_cfg) -> tuple[dict, dict, dict]:
    """The three weight files, checked strictly against the component specs."""
    from . import loading, t3 as t3_mod, voice_encoder
    from .s3gen import s3gen as s3gen_mod

    t3_weights = loading.read_safetensors(directory / T3_FILE)
    loading.check_keys(T3_FILE, t3_weights, t3_mod.upstream_shapes(t3_cfg))
    ve_weights = read_state_dict(directory / VE_FILE)
    loading.check_keys(VE_FILE, ve_weights, voice_encoder.upstream_shapes(ve_cfg))
    s3_weights = read_state_dict(directory / S3GEN_FILE)
    # upstream loads s3gen.pt with strict=True: the tokenizer buffers are required here
    loading.check_keys(S3GEN_FILE, s3_weights, {**s3gen_mod.upstream_shapes(s3_cfg), **s3gen_mod.optional_shapes(s3_cfg)})
    return t3_weights, ve_weights, s3_weights
