"""The whole Chatterbox pipeline: text -> speech tokens (T3) -> 24 kHz audio (S3Gen).

`load_model` reads a checkpoint in the upstream layout (a directory or the Hugging Face
repo) strictly; `ChatterboxModel` exposes token generation, one-shot synthesis, streaming
synthesis and voices. Everything here is synchronous: the daemon runs it on one thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from . import loading, t3 as t3_mod, voice_encoder
from .conds import Conditionals
from .s3gen import s3gen as s3gen_mod
from .stream import SAMPLE_RATE, AudioChunk
from .tokenizer import EnTokenizer, punc_norm

logger = logging.getLogger(__name__)

START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
DEFAULT_VOICE = "default"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def filter_speech_tokens(tokens: list[int]) -> list[int]:
    """The reference's post-filter: keep ids < 6561 (generate_tokens already stops at EOS).

    drop_invalid_tokens also discards everything up to a stray SOS (6561) in the middle;
    T3 feeds SOS back like any token, so that rule is kept.
    """
    if START_SPEECH_TOKEN in tokens:
        tokens = tokens[len(tokens) - tokens[::-1].index(START_SPEECH_TOKEN):]
    return [t for t in tokens if t < START_SPEECH_TOKEN]


@dataclass
class Checkpoint:
    """Where a model came from, for status and cache keys."""

    source: str
    path: Path
    size: str


class ChatterboxModel:
    """T3 + S3Gen + VoiceEncoder with a tokenizer and the built-in voice."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        t3: t3_mod.T3,
        s3gen: s3gen_mod.S3Gen,
        ve: voice_encoder.VoiceEncoder,
        tokenizer: EnTokenizer,
        conds: Conditionals | None,
        checkpoint: Checkpoint,
        quantize: int | None = None,
        dtype: str = "float32",
    ):
        self.t3 = t3
        self.s3gen = s3gen
        self.ve = ve
        self.tokenizer = tokenizer
        self.conds = conds
        self.checkpoint = checkpoint
        self.quantize = quantize
        self.dtype = dtype

    # -- voices ------------------------------------------------------------------------

    def prepare_voice(self, path_or_samples, sample_rate: int | None = None, exaggeration: float = 0.5) -> Conditionals:
        """Conditionals from reference audio (a file path, or samples with their rate)."""
        from . import voice

        return voice.prepare_voice(self, path_or_samples, sample_rate=sample_rate, exaggeration=exaggeration)

    def load_voice(self, path_or_name: str | os.PathLike) -> Conditionals:
        """A conds.pt file (upstream format), a stored voice name, or "default"."""
        from . import torchpickle, voices

        if str(path_or_name) == DEFAULT_VOICE:
            if self.conds is None:
                raise voices.VoiceNotFoundError("this checkpoint has no built-in voice (conds.pt)")
            return self.conds
        path = Path(path_or_name)
        if path.suffix == ".pt" or os.sep in str(path_or_name):
            if not path.is_file():
                raise voices.VoiceNotFoundError(f"voice file not found: {path}")
            return torchpickle.load_conds(path)
        return voices.load(str(path_or_name))

    def list_voices(self) -> list[str]:
        from . import voices

        names = [DEFAULT_VOICE] if self.conds is not None else []
        return names + [v for v in voices.names() if v != DEFAULT_VOICE]

    def resolve_voice(self, voice: Conditionals | str | None) -> Conditionals:
        if voice is None:
            voice = DEFAULT_VOICE
        if isinstance(voice, Conditionals):
            return voice
        return self.load_voice(voice)

    # -- text and tokens ---------------------------------------------------------------

    def text_tokens(self, text: str) -> list[int]:
        """Normalised, tokenised text (without SOT/EOT), as the reference's generate()."""
        return self.tokenizer.encode(punc_norm(text))

    def generate_tokens(
        self,
        text: str,
        *,
        voice: Conditionals | str | None = None,
        exaggeration: float = 0.5,
        cfg_weight: float = 0.5,
        temperature: float = 0.8,
        repetition_penalty: float = 1.2,
        min_p: float = 0.05,
        top_p: float = 1.0,
        max_new_tokens: int = 1000,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield every token T3 samples, as soon as it is sampled (EOS excluded)."""
        conds = self.resolve_voice(voice)
        cond = conds.t3
        if float(cond.emotion_adv.reshape(-1)[0].item()) != exaggeration:
            cond = cond.with_exaggeration(exaggeration)
        yield from t3_mod.generate_tokens(
            self.t3,
            cond,
            self.text_tokens(text),
            cfg_weight=cfg_weight,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            min_p=min_p,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )

    # -- audio -------------------------------------------------------------------------

    def tokens_to_audio(
        self,
        tokens: list[int],
        *,
        voice: Conditionals | str | None = None,
        seed: int | None = None,
        n_timesteps: int | None = None,
    ) -> np.ndarray:
        """Speech tokens (ids < 6561) -> float32 samples at 24 kHz, 960 per token.

        The CFM and source noise are position-indexed buffers drawn from `seed`, the same
        ones streaming uses, so a stream of these tokens converges to this waveform."""
        from .streaming import StreamOptions, render_tokens

        conds = self.resolve_voice(voice)
        seed = secrets.randbits(62) if seed is None else seed
        return render_tokens(self, tokens, conds.gen, seed, StreamOptions(n_timesteps=n_timesteps))

    def synthesize(self, text: str, *, voice: Conditionals | str | None = None, seed: int | None = None, **sampling) -> np.ndarray:
        """One-shot: text -> float32 samples at 24 kHz (T3, post-filter, S3Gen, trim fade)."""
        conds = self.resolve_voice(voice)
        seed = secrets.randbits(63) if seed is None else seed
        tokens = filter_speech_tokens(list(self.generate_tokens(text, voice=conds, seed=seed, **sampling)))
        return self.tokens_to_audio(tokens, voice=conds, seed=seed + 1)

    def stream(self, text: str, *, voice: Conditionals | str | None = None, seed: int | None = None, **options) -> Iterator[AudioChunk]:
        """Streaming synthesis (see models/streaming.py)."""
        from .streaming import stream_text

        yield from stream_text(self, text, voice=voice, seed=seed, **options)

    def warmup(self) -> None:
        """One short synthesis so kernels are compiled before the first real request."""
        t0 = time.perf_counter()
        for _ in self.stream("Hello.", seed=0, max_new_tokens=8):
            pass
        logger.info("warm-up took %.2f s", time.perf_counter() - t0)

    def describe(self) -> dict:
        return {
            "source": self.checkpoint.source,
            "path": str(self.checkpoint.path),
            "size": self.checkpoint.size,
            "quantize": self.quantize,
            "dtype": self.dtype,
            "sample_rate": self.sample_rate,
        }


def load_model(
    path: str | os.PathLike | None = None,
    quantize: int | None = None,
    *,
    dtype: str | None = None,
    group_size: int = 64,
) -> ChatterboxModel:
    """Load a checkpoint: a directory in the upstream layout, a Hugging Face repo id, or
    None for `NIGHTINGALE_MODEL` or the default repo (ResembleAI/chatterbox)."""
    from . import hub, torchpickle

    source = str(path) if path is not None else (os.environ.get("NIGHTINGALE_MODEL") or hub.DEFAULT_REPO)
    directory = hub.resolve_checkpoint(source)
    dims = loading.Dims.read(directory)
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")

    t0 = time.perf_counter()
    t3_cfg = t3_mod.T3Config.from_dict(dims.section("t3")) if dims.section("t3") else t3_mod.T3Config.full()
    t3_weights = loading.read_safetensors(directory / "t3_cfg.safetensors")
    loading.check_keys("t3_cfg.safetensors", t3_weights, t3_mod.upstream_shapes(t3_cfg))
    t3 = t3_mod.build_t3(t3_weights, t3_cfg, DTYPES[dtype])
    del t3_weights

    ve_cfg = voice_encoder.VoiceEncoderConfig.from_dict(dims.section("ve")) if dims.section("ve") else voice_encoder.VoiceEncoderConfig.full()
    ve_weights = loading.read_safetensors(directory / "ve.safetensors")
    loading.check_keys("ve.safetensors", ve_weights, voice_encoder.upstream_shapes(ve_cfg))
    ve = voice_encoder.VoiceEncoder(ve_cfg)
    ve.load_weights(list(voice_encoder.convert_weights(ve_weights, ve_cfg).items()), strict=True)

    s3_cfg = s3gen_mod.S3GenConfig.from_dict(dims.section("s3gen"))
    s3_weights = loading.read_safetensors(directory / "s3gen.safetensors")
    optional = s3gen_mod.optional_shapes(s3_cfg)
    loading.check_keys(
        "s3gen.safetensors",
        s3_weights,
        {**s3gen_mod.upstream_shapes(s3_cfg), **optional},
        optional=frozenset(optional),
    )
    s3gen = s3gen_mod.S3Gen(s3_cfg)
    s3gen.load_upstream(s3_weights)
    del s3_weights
    mx.eval(s3gen.parameters(), ve.parameters())

    tokenizer = EnTokenizer(directory / "tokenizer.json")
    conds_path = directory / "conds.pt"
    conds = torchpickle.load_conds(conds_path) if conds_path.exists() else None
    logger.info("loaded %s in %.2f s", directory, time.perf_counter() - t0)
    checkpoint = Checkpoint(source=source, path=directory, size=dims.raw.get("size", "full"))
    model = ChatterboxModel(t3, s3gen, ve, tokenizer, conds, checkpoint, quantize=None, dtype=dtype)
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, bits=quantize, group_size=group_size)
    return model
