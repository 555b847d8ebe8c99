"""Random checkpoints in the exact upstream layout, for tests (tiny) and benchmarks (full).

The real weights live on Hugging Face and cannot be fetched everywhere; these checkpoints
carry the same files, the same key names and (for `full`) the same shapes, filled with
random values drawn deterministically from numpy's PCG64 so that the same seed gives the
same bytes on every machine. The PyTorch reference loads them strictly (tools/), which is
what makes parity fixtures possible. Three layouts (families): Chatterbox (the five files
of models/hub.py's CHECKPOINT_FILES), Chatterbox Multilingual (models/multilingual.py) and
Chatterbox Turbo (models/turbo.py).

Random init leaves norms, batch-norm statistics, Snake alphas and weight-norm gains at
identity values; here they are perturbed so that a port that gets those ops wrong fails.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from nightingale.models.loading import DIMS_FILE, SIZES

from . import torchsave

logger = logging.getLogger(__name__)

FAMILIES = ("chatterbox", "multilingual", "turbo")

# (pattern on the full key, sampler(rng, shape) -> array). First match wins.
Sampler = Callable[[np.random.Generator, tuple], np.ndarray]


def _normal(std: float) -> Sampler:
    return lambda rng, shape: (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def _uniform(low: float, high: float) -> Sampler:
    return lambda rng, shape: rng.uniform(low, high, size=shape).astype(np.float32)


def _around_one(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _fan_in(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Weights with std 1/sqrt(fan_in), fan_in = prod(shape[1:]) (torch layout)."""
    fan_in = max(1, int(np.prod(shape[1:]))) if len(shape) > 1 else 1
    return _normal(1.0 / math.sqrt(fan_in))(rng, shape)


INIT_RULES: list[tuple[str, Sampler]] = [
    (r"running_var$", _uniform(0.5, 1.5)),
    (r"running_mean$", _normal(0.1)),
    (r"parametrizations\.weight\.original0$", _uniform(0.5, 1.5)),  # weight-norm gain g
    (r"parametrizations\.weight\.original1$", _normal(1.0)),  # weight-norm direction v
    (r"\.alpha$", _uniform(0.5, 1.5)),  # Snake
    (r"pos_bias_[uv]$", _normal(0.1)),
    (r"pre_attention_query$", _normal(0.5)),
    (r"(^|\.)(text_emb|speech_emb|text_pos_emb\.emb|speech_pos_emb\.emb|input_embedding|embed_tokens)\.weight$", _normal(0.5)),
    (r"\.bias$", _normal(0.05)),
    (r"(similarity_weight|similarity_bias)$", _around_one),
]


def sample_tensor(key: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """One random tensor for `key`, by the rules above (1-D weights are norm gains)."""
    if key.endswith("num_batches_tracked"):
        return np.array(100, dtype=np.int64)
    for pattern, sampler in INIT_RULES:
        if re.search(pattern, key):
            return sampler(rng, shape)
    if key.endswith(".weight") and len(shape) == 1:
        return _around_one(rng, shape)
    return _fan_in(rng, shape)


def random_weights(shapes: dict[str, tuple], rng: np.random.Generator, prefix: str = "") -> dict[str, np.ndarray]:
    """Random tensors for every key of an upstream spec (keys sorted, so order is stable)."""
    return {prefix + key: sample_tensor(prefix + key, tuple(shapes[key]), rng) for key in sorted(shapes)}


# Built-in voice of a generated checkpoint: prompt lengths in speech tokens (25 per second).
CONDS_PROMPT_TOKENS = {"tiny": (50, 25), "full": (150, 157)}  # (T3 prompt, S3Gen prompt)
SPEECH_CODEBOOK = 6561
XVECTOR_NORM = 13.9  # the shipped voice's CAMPPlus x-vector norm


def component_configs(size: str) -> dict:
    """The per-component configs for a size, as model objects (see dims.json)."""
    from nightingale.models import t3, voice_encoder
    from nightingale.models.s3gen.s3gen import S3GenConfig

    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose from {', '.join(SIZES)}")
    pick = (lambda c: c.tiny()) if size == "tiny" else (lambda c: c.full())
    return {"t3": pick(t3.T3Config), "ve": pick(voice_encoder.VoiceEncoderConfig), "s3gen": pick(S3GenConfig)}


def random_conds(rng: np.random.Generator, size: str, speaker_dim: int, xvector_dim: int, mel_bins: int = 80):
    """A random built-in voice in the upstream conds.pt structure (numpy arrays)."""
    t3_tokens, gen_tokens = CONDS_PROMPT_TOKENS[size]
    speaker = np.abs(rng.standard_normal((1, speaker_dim))).astype(np.float32)
    speaker /= np.linalg.norm(speaker)
    xvector = rng.standard_normal((1, xvector_dim)).astype(np.float32)
    xvector *= XVECTOR_NORM / np.linalg.norm(xvector)
    prompt_token = rng.integers(0, SPEECH_CODEBOOK, size=(1, gen_tokens), dtype=np.int64)
    return {
        "t3": {
            "speaker_emb": speaker,
            "clap_emb": None,
            "cond_prompt_speech_tokens": prompt_token[:, :t3_tokens].copy(),
            "cond_prompt_speech_emb": None,
            "emotion_adv": np.full((1, 1, 1), 0.5, dtype=np.float32),
        },
        "gen": {
            "prompt_token": prompt_token,
            "prompt_token_len": np.array([gen_tokens], dtype=np.int64),
            "prompt_feat": (rng.standard_normal((1, 2 * gen_tokens, mel_bins)) * 2.0 - 3.5).astype(np.float32),
            "prompt_feat_len": None,
            "embedding": xvector,
        },
    }


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.asarray(v, order="C") if v.ndim else v for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def make_checkpoint(directory: str | os.PathLike, size: str = "tiny", seed: int = 0, family: str = "chatterbox") -> Path:
    """Write a random checkpoint (the five upstream files plus dims.json) into `directory`.

    The same (size, seed) always gives the same tensors. Each file draws from its own
    generator (seeded from `seed` and the file's name), so files are independent.
    family "turbo" writes the Chatterbox Turbo layout instead (models/turbo.py), "multilingual"
    Chatterbox Multilingual's six files (models/multilingual.py).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    if family == "turbo":
        return make_turbo_checkpoint(directory, size, seed)
    if family == "multilingual":
        return make_multilingual_checkpoint(directory, size, seed)
    from nightingale.models import t3, voice_encoder
    from nightingale.models.s3gen import s3gen
    from nightingale.models.tokenizer import write_stand_in_tokenizer_json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = component_configs(size)
    specs = {
        "t3_cfg.safetensors": t3.upstream_shapes(cfgs["t3"]),
        "ve.safetensors": voice_encoder.upstream_shapes(cfgs["ve"]),
        "s3gen.safetensors": s3gen.upstream_shapes(cfgs["s3gen"]),
    }
    for index, (name, spec) in enumerate(specs.items()):
        logger.info("writing %s (%d tensors)", name, len(spec))
        rng = np.random.default_rng([seed, index])
        weights = random_weights(spec, rng)
        save_safetensors(out / name, weights)
        del weights
    write_stand_in_tokenizer_json(out / "tokenizer.json")
    conds = random_conds(
        np.random.default_rng([seed, len(specs)]),
        size,
        speaker_dim=cfgs["t3"].speaker_embed_size,
        xvector_dim=cfgs["s3gen"].flow.spk_embed_dim,
    )
    torchsave.save(out / "conds.pt", conds)
    dims = {"size": size, "seed": seed, "t3": cfgs["t3"].to_dict(), "ve": cfgs["ve"].to_dict(), "s3gen": cfgs["s3gen"].to_dict()}
    (out / DIMS_FILE).write_text(json.dumps(dims, indent=2, sort_keys=True) + "\n")
    return out


def s3tokenizer_buffers(s3_cfg) -> dict[str, np.ndarray]:
    """The values upstream's S3Tokenizer registers as buffers (its mel filterbank and window):
    saved in Turbo's s3gen_meanflow.safetensors and Multilingual's s3gen.pt."""
    from nightingale.models.dsp import hann_window, mel_filters
    from nightingale.models.s3tokenizer import N_FFT, S3_SR

    filters = mel_filters(S3_SR, N_FFT, s3_cfg.tokenizer.n_mels, 0.0, S3_SR / 2)
    return {
        "tokenizer._mel_filters": np.asarray(filters, dtype=np.float32),
        "tokenizer.window": np.asarray(hann_window(N_FFT), dtype=np.float32),
    }


def make_multilingual_checkpoint(directory: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random multilingual checkpoint in upstream's layout (the six files) plus
    dims.json. Deterministic in (size, seed); each file draws from its own generator."""
    from nightingale.models import t3, voice_encoder
    from nightingale.models.multilingual import CONDS_FILE, FAMILY, S3GEN_FILE, T3_FILE, VE_FILE
    from nightingale.models.mtl_tokenizer import (
        CANGJIE_FILE,
        TOKENIZER_FILE,
        write_stand_in_cangjie_json,
        write_stand_in_tokenizer_json,
    )
    from nightingale.models.s3gen import s3gen

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = component_configs(size)
    cfgs["t3"] = cfgs["t3"].multilingual()
    rng = np.random.default_rng([seed, 0])
    logger.info("writing %s", T3_FILE)
    save_safetensors(out / T3_FILE, random_weights(t3.upstream_shapes(cfgs["t3"]), rng))
    ve = random_weights(voice_encoder.upstream_shapes(cfgs["ve"]), np.random.default_rng([seed, 1]))
    torchsave.save(out / VE_FILE, collections.OrderedDict(sorted(ve.items())))
    del ve
    s3 = random_weights(s3gen.upstream_shapes(cfgs["s3gen"]), np.random.default_rng([seed, 2]))
    s3.update(s3tokenizer_buffers(cfgs["s3gen"]))
    logger.info("writing %s (%d tensors)", S3GEN_FILE, len(s3))
    torchsave.save(out / S3GEN_FILE, collections.OrderedDict(sorted(s3.items())))
    del s3
    write_stand_in_tokenizer_json(out / TOKENIZER_FILE)
    write_stand_in_cangjie_json(out / CANGJIE_FILE)
    conds = random_conds(np.random.default_rng([seed, 3]), size, speaker_dim=cfgs["t3"].speaker_embed_size,
                         xvector_dim=cfgs["s3gen"].flow.spk_embed_dim)
    torchsave.save(out / CONDS_FILE, conds)
    dims = {"family": FAMILY, "size": size, "seed": seed, "t3": cfgs["t3"].to_dict(), "ve": cfgs["ve"].to_dict(),
            "s3gen": cfgs["s3gen"].to_dict()}
    (out / DIMS_FILE).write_text(json.dumps(dims, indent=2, sort_keys=True) + "\n")
    return out


TURBO_CONDS_PROMPT_TOKENS = {"tiny": (50, 25), "full": (375, 250)}  # (T3 prompt, S3Gen prompt)


def make_turbo_checkpoint(directory: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random Turbo checkpoint (the upstream files plus dims.json) into `directory`.

    Deterministic: the same (size, seed) gives the same tensors on every machine.
    """
    from nightingale.models import t3_turbo, voice_encoder
    from nightingale.models.s3gen import s3gen as s3gen_mod
    from nightingale.models.tokenizer_turbo import write_stand_in_tokenizer
    from nightingale.models.turbo import FAMILY, S3GEN_FILE, T3_FILE, VE_FILE, turbo_configs

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = turbo_configs(size)
    specs = {
        T3_FILE: t3_turbo.upstream_shapes(cfgs["t3"]),
        VE_FILE: voice_encoder.upstream_shapes(cfgs["ve"]),
        S3GEN_FILE: s3gen_mod.upstream_shapes(cfgs["s3gen"]),
    }
    for index, (name, spec) in enumerate(specs.items()):
        logger.info("writing %s (%d tensors)", name, len(spec))
        weights = random_weights(spec, np.random.default_rng([seed, 100 + index]))
        if name == S3GEN_FILE:
            weights |= s3tokenizer_buffers(cfgs["s3gen"])
        save_safetensors(out / name, weights)
        del weights
    write_stand_in_tokenizer(out)
    t3_tokens, gen_tokens = TURBO_CONDS_PROMPT_TOKENS[size]
    conds = random_conds(np.random.default_rng([seed, 103]), size, speaker_dim=cfgs["t3"].speaker_embed_size,
                         xvector_dim=cfgs["s3gen"].flow.spk_embed_dim)
    rng = np.random.default_rng([seed, 104])
    prompt = rng.integers(0, SPEECH_CODEBOOK, size=(1, max(t3_tokens, gen_tokens)), dtype=np.int64)
    conds["t3"]["cond_prompt_speech_tokens"] = prompt[:, :t3_tokens].copy()
    conds["gen"]["prompt_token"] = prompt[:, :gen_tokens].copy()
    conds["gen"]["prompt_token_len"] = np.array([gen_tokens], dtype=np.int64)
    conds["gen"]["prompt_feat"] = (rng.standard_normal((1, 2 * gen_tokens, 80)) * 2.0 - 3.5).astype(np.float32)
    torchsave.save(out / "conds.pt", conds)
    dims = {"family": FAMILY, "size": size, "seed": seed,
            **{name: cfg.to_dict() for name, cfg in cfgs.items()}}
    (out / DIMS_FILE).write_text(json.dumps(dims, indent=2, sort_keys=True) + "\n")
    return out


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """A digest of named tensors (keys sorted; names and raw bytes), recorded in parity
    fixtures so that a changed weight recipe is told apart from a port error."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(weights[key]).tobytes())
    return h.hexdigest()
