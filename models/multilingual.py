"""Chatterbox Multilingual's checkpoint layout: the files, reading them, random ones.

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

import collections
import json
import logging
import os
from pathlib import Path

import numpy as np

from .mtl_tokenizer import CANGJIE_FILE, TOKENIZER_FILE

logger = logging.getLogger(__name__)

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


def s3tokenizer_buffers(s3_cfg) -> dict[str, np.ndarray]:
    """The values upstream's S3Tokenizer registers as buffers (saved in s3gen.pt)."""
    from .dsp import hann_window, mel_filters
    from .s3tokenizer import N_FFT, S3_SR

    filters = mel_filters(S3_SR, N_FFT, s3_cfg.tokenizer.n_mels, 0.0, S3_SR / 2)
    return {
        "tokenizer._mel_filters": np.asarray(filters, dtype=np.float32),
        "tokenizer.window": np.asarray(hann_window(N_FFT), dtype=np.float32),
    }


def make_checkpoint(directory: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random multilingual checkpoint in upstream's layout (the six files) plus
    dims.json. Deterministic in (size, seed); each file draws from its own generator."""
    from . import t3, torchpickle, voice_encoder
    from .checkpoint import DIMS_FILE, _save_safetensors, component_configs, random_conds, random_weights
    from .mtl_tokenizer import write_stand_in_cangjie_json, write_stand_in_tokenizer_json
    from .s3gen import s3gen

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = component_configs(size)
    cfgs["t3"] = cfgs["t3"].multilingual()
    rng = np.random.default_rng([seed, 0])
    logger.info("writing %s", T3_FILE)
    _save_safetensors(out / T3_FILE, random_weights(t3.upstream_shapes(cfgs["t3"]), rng))
    ve = random_weights(voice_encoder.upstream_shapes(cfgs["ve"]), np.random.default_rng([seed, 1]))
    torchpickle.save(out / VE_FILE, collections.OrderedDict(sorted(ve.items())))
    del ve
    s3 = random_weights(s3gen.upstream_shapes(cfgs["s3gen"]), np.random.default_rng([seed, 2]))
    s3.update(s3tokenizer_buffers(cfgs["s3gen"]))
    logger.info("writing %s (%d tensors)", S3GEN_FILE, len(s3))
    torchpickle.save(out / S3GEN_FILE, collections.OrderedDict(sorted(s3.items())))
    del s3
    write_stand_in_tokenizer_json(out / TOKENIZER_FILE)
    write_stand_in_cangjie_json(out / CANGJIE_FILE)
    conds = random_conds(np.random.default_rng([seed, 3]), size, speaker_dim=cfgs["t3"].speaker_embed_size,
                         xvector_dim=cfgs["s3gen"].flow.spk_embed_dim)
    torchpickle.save(out / CONDS_FILE, conds)
    dims = {"family": FAMILY, "size": size, "seed": seed, "t3": cfgs["t3"].to_dict(), "ve": cfgs["ve"].to_dict(),
            "s3gen": cfgs["s3gen"].to_dict()}
    (out / DIMS_FILE).write_text(json.dumps(dims, indent=2, sort_keys=True) + "\n")
    return out
