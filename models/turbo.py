"""Chatterbox Turbo: Turbo T3 (GPT-2) + the MeanFlow S3Gen, loaded from the upstream layout.

The `ResembleAI/chatterbox-turbo` repository holds (what `ChatterboxTurboTTS.from_local`
reads): `t3_turbo_v1.safetensors` (loaded strictly), `s3gen_meanflow.safetensors` (strictly,
the two S3Tokenizer buffers included), `ve.safetensors`, `conds.pt`, and the GPT-2 tokenizer
files (vocab.json, merges.txt, added_tokens.json, special_tokens_map.json,
tokenizer_config.json). `load_turbo_upstream` reads them with every key and shape checked;
nightingale/dev/checkpoint.py writes random checkpoints in exactly that layout.

`TurboModel` is a `ChatterboxModel` (same voices, streaming renderer, warm-up, daemon
interface) whose text front end, T3 and sampler are Turbo's; its decoder is the MeanFlow
S3Gen (2 Euler steps, no CFG). As `tts_turbo.generate` does, three silence tokens
(S3GEN_SIL) follow the sampled tokens into S3Gen.

`load_meanflow_decoder` loads only Turbo's S3Gen, for pairing it with the original T3
(`load_model(..., decoder=...)`): a combination Resemble does not ship.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from . import loading, t3_turbo, voice_encoder
from .conds import Conditionals
from .model import DTYPES, ChatterboxModel, assemble_converted, assemble_upstream, build_s3gen, build_voice_encoder
from .s3gen import s3gen as s3gen_mod
from .tokenizer_turbo import TurboTokenizer, punc_norm

logger = logging.getLogger(__name__)

FAMILY = "turbo"
T3_FILE = "t3_turbo_v1.safetensors"
S3GEN_FILE = "s3gen_meanflow.safetensors"
VE_FILE = "ve.safetensors"
IGNORED_OPTIONS = ("exaggeration", "cfg_weight", "min_p")  # the original model's; Turbo has no such inputs


def is_turbo_dir(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory is in the Turbo layout (it holds t3_turbo_v1.safetensors)."""
    return (Path(path) / T3_FILE).is_file()


def turbo_configs(size: str) -> dict:
    if size not in loading.SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose from {', '.join(loading.SIZES)}")
    if size == "tiny":
        return {
            "t3": t3_turbo.TurboT3Config.tiny(),
            "ve": voice_encoder.VoiceEncoderConfig.tiny(),
            "s3gen": s3gen_mod.S3GenConfig.tiny().with_meanflow(),
        }
    return {
        "t3": t3_turbo.TurboT3Config.full(),
        "ve": voice_encoder.VoiceEncoderConfig.full(),
        "s3gen": s3gen_mod.S3GenConfig.full().with_meanflow(),
    }


def meanflow_shapes(cfg: s3gen_mod.S3GenConfig) -> dict[str, tuple[int, ...]]:
    """Every key of s3gen_meanflow.safetensors: the reference loads it strictly, so the two
    S3Tokenizer buffers the original file may omit are required here."""
    return {**s3gen_mod.upstream_shapes(cfg), **s3gen_mod.optional_shapes(cfg)}


def _configs(dims: dict) -> tuple[t3_turbo.TurboT3Config, voice_encoder.VoiceEncoderConfig, s3gen_mod.S3GenConfig]:
    full = turbo_configs("full")
    return (
        t3_turbo.TurboT3Config.from_dict(dims["t3"]) if dims.get("t3") else full["t3"],
        voice_encoder.VoiceEncoderConfig.from_dict(dims["ve"]) if dims.get("ve") else full["ve"],
        s3gen_mod.S3GenConfig.from_dict(dims["s3gen"]) if dims.get("s3gen") else full["s3gen"],
    )


def read_meanflow_s3gen(directory: Path, s3_cfg: s3gen_mod.S3GenConfig, dtype: str = "float32") -> s3gen_mod.S3Gen:
    """s3gen_meanflow.safetensors, checked strictly, as an MLX S3Gen (meanflow)."""
    if not s3_cfg.meanflow:
        raise ValueError("a MeanFlow S3Gen needs S3GenConfig(meanflow=True)")
    weights = loading.read_safetensors(directory / S3GEN_FILE)
    loading.check_keys(S3GEN_FILE, weights, meanflow_shapes(s3_cfg))
    return build_s3gen(weights, s3_cfg, dtype)


class TurboModel(ChatterboxModel):
    """Turbo T3 + MeanFlow S3Gen + VoiceEncoder, with the GPT-2 tokenizer and built-in voice."""

    family = FAMILY
    # runaway guard of models/streaming.py: a GPT-2 BPE token (about 4 characters, or a tag
    # such as [laugh]) is worth several of the original's 1-2 character tokens
    budget_tokens_per_text_token = 25
    copied_files = ("conds.pt", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                    "tokenizer_config.json")

    def prepare_voice(self, path_or_samples, sample_rate: int | None = None, exaggeration: float = 0.0) -> Conditionals:
        """Conditionals from reference audio, as `ChatterboxTurboTTS.prepare_conditionals`:
        longer than 5 s, loudness-normalised to -27 LUFS, T3 prompt of up to 375 tokens from
        the first 15 s."""
        from . import cloning

        return cloning.prepare_voice(self, path_or_samples, sample_rate=sample_rate, exaggeration=exaggeration,
                                     recipe=cloning.TURBO_RECIPE)

    def text_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(punc_norm(text))

    def generate_tokens(
        self,
        text: str,
        *,
        voice: Conditionals | str | None = None,
        max_new_tokens: int = 1000,
        seed: int | None = None,
        cancel: threading.Event | None = None,
        **sampling_options: float | None,
    ) -> Iterator[int]:
        """Yield every token Turbo T3 samples (EOS excluded), then the 3 silence tokens the
        reference appends before S3Gen. sampling_options: temperature, top_k, top_p,
        repetition_penalty (None or absent: models/sampling.py TURBO); the original model's
        exaggeration, cfg_weight and min_p are accepted and ignored, as the reference does."""
        ignored = {name: sampling_options.pop(name, None) for name in IGNORED_OPTIONS}
        if any(ignored.values()):
            logger.debug("Turbo ignores %s", ", ".join(IGNORED_OPTIONS))
        conds = self.resolve_voice(voice)
        yield from t3_turbo.generate_tokens(self.t3, conds.t3, self.text_tokens(text), max_new_tokens=max_new_tokens,
                                            seed=seed, cancel=cancel, **sampling_options)
        yield from [t3_turbo.S3GEN_SIL] * t3_turbo.SILENCE_TOKENS


def load_turbo_upstream(directory: Path, *, quantize: int | None = None, dtype: str = "float32",
                        group_size: int = 64) -> TurboModel:
    """Read the Turbo files strictly, convert layouts, optionally quantize."""
    t0 = time.perf_counter()
    dims = loading.Dims.read(directory).raw
    t3_cfg, ve_cfg, s3_cfg = _configs(dims)

    t3_weights = loading.read_safetensors(directory / T3_FILE)
    loading.check_keys(T3_FILE, t3_weights, t3_turbo.upstream_shapes(t3_cfg))
    t3 = t3_turbo.build_t3(t3_weights, t3_cfg, DTYPES[dtype])
    del t3_weights

    ve_weights = loading.read_safetensors(directory / VE_FILE)
    loading.check_keys(VE_FILE, ve_weights, voice_encoder.upstream_shapes(ve_cfg))
    ve = build_voice_encoder(ve_weights, ve_cfg)

    s3gen = read_meanflow_s3gen(directory, s3_cfg, dtype)
    model = assemble_upstream(TurboModel, (t3, s3gen, ve), (t3_cfg, ve_cfg, s3_cfg), directory,
                              tokenizer=TurboTokenizer(directory), size=dims.get("size", "full"), dtype=dtype,
                              quantize=quantize, group_size=group_size)
    logger.info("loaded Turbo %s in %.2f s", directory, time.perf_counter() - t0)
    return model


def load_turbo_converted(directory: Path, config: dict) -> TurboModel:
    """An MLX-native Turbo directory (models/cache.py)."""
    t0 = time.perf_counter()
    model = assemble_converted(TurboModel, t3_turbo.TurboT3, _configs(config["dims"]), directory, config,
                               TurboTokenizer(directory))
    logger.info("loaded converted Turbo model %s in %.2f s", directory, time.perf_counter() - t0)
    return model


def load_meanflow_decoder(path_or_repo: str | os.PathLike, *, quantize: int | None = None, dtype: str = "float32",
                          group_size: int = 64) -> tuple[s3gen_mod.S3Gen, Path]:
    """Turbo's MeanFlow S3Gen alone (from a Turbo checkpoint directory or repo id), converted
    and optionally quantized with the same flow predicate as a whole model."""
    from . import hub

    directory = hub.resolve_checkpoint(str(path_or_repo))
    if not is_turbo_dir(directory):
        raise hub.CheckpointNotFoundError(f"{directory} is not a Chatterbox Turbo checkpoint (no {S3GEN_FILE})")
    _, _, s3_cfg = _configs(loading.Dims.read(directory).raw)
    s3gen = read_meanflow_s3gen(directory, s3_cfg, dtype)
    if quantize is not None:
        from .quantize import quantize_flow

        quantize_flow(s3gen.flow, quantize, group_size, DTYPES[dtype])
    return s3gen, directory
