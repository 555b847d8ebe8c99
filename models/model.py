"""The whole Chatterbox pipeline: text -> speech tokens (T3) -> 24 kHz audio (S3Gen).

`load_model` reads a checkpoint in the upstream layout (a directory or the Hugging Face
repo) strictly; `ChatterboxModel` exposes token generation, synthesis (the concatenation
of the stream), streaming synthesis, one-shot rendering of tokens (`tokens_to_audio`) and
voices. The API is synchronous and called from one thread; `stream` runs T3 on a helper
thread of its own (models/streaming.py TokenPump), started and joined within the call.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np

from . import loading, sampling, t3 as t3_mod, voice_encoder
from .conds import Conditionals
from .s3gen import s3gen as s3gen_mod
from .chunks import SAMPLE_RATE, AudioChunk
from .mtl_tokenizer import MTLTokenizer, UnsupportedLanguageError, check_language, punc_norm as mtl_punc_norm
from .tokenizer import EnTokenizer, punc_norm

logger = logging.getLogger(__name__)

DEFAULT_VOICE = "default"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
ENGLISH = "chatterbox"  # the English model (the name the Turbo work uses for it)
MULTILINGUAL = "multilingual"
ENGLISH_LANGUAGES = {"en": "English"}
DEFAULT_LANGUAGE = "en"  # what the multilingual model speaks when neither request nor voice says


@dataclass
class Checkpoint:
    """Where a model came from, for status and cache keys."""

    source: str
    path: Path
    size: str


class ChatterboxModel:
    """T3 + S3Gen + VoiceEncoder with a tokenizer and the built-in voice."""

    sample_rate = SAMPLE_RATE
    decoder_source: str | None = None  # set when S3Gen comes from another checkpoint (load_model decoder=)

    def __init__(
        self,
        t3: t3_mod.T3,
        s3gen: s3gen_mod.S3Gen,
        ve: voice_encoder.VoiceEncoder,
        tokenizer: EnTokenizer | MTLTokenizer,
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
        self.group_size = 64
        self.dtype = dtype
        self.dims: dict = {}

    @property
    def family(self) -> str:
        """"chatterbox" (English) or "multilingual" (the T3 text vocabulary says which, as
        upstream); models/turbo.py's TurboModel overrides it with "turbo"."""
        return MULTILINGUAL if self.t3.cfg.is_multilingual else ENGLISH

    @property
    def languages(self) -> dict[str, str]:
        """Language codes this model speaks, with their names."""
        from .mtl_tokenizer import SUPPORTED_LANGUAGES

        return dict(SUPPORTED_LANGUAGES) if self.family == MULTILINGUAL else dict(ENGLISH_LANGUAGES)

    def check_language(self, language: str | None) -> str | None:
        """The normalised code, or UnsupportedLanguageError. English-only models take None
        or "en" and give None (their text path has no language)."""
        if language is None:
            if self.family == MULTILINGUAL:
                raise UnsupportedLanguageError(
                    f"the multilingual model needs a language; supported: {', '.join(self.languages)}")
            return None
        code = check_language(language, self.languages)
        return code if self.family == MULTILINGUAL else None

    # -- voices ------------------------------------------------------------------------

    def prepare_voice(self, path_or_samples, sample_rate: int | None = None, exaggeration: float = 0.5) -> Conditionals:
        """Conditionals from reference audio (a file path, or samples with their rate)."""
        from . import cloning

        return cloning.prepare_voice(self, path_or_samples, sample_rate=sample_rate, exaggeration=exaggeration)

    def load_voice(self, path_or_name: str | os.PathLike) -> Conditionals:
        """A conds.pt file (upstream format), a stored voice name, or "default"."""
        from . import torchpickle, voice_store

        if str(path_or_name) == DEFAULT_VOICE:
            if self.conds is None:
                raise voice_store.VoiceNotFoundError("this checkpoint has no built-in voice (conds.pt)")
            return self.conds
        path = Path(path_or_name)
        if path.suffix == ".pt" or os.sep in str(path_or_name):
            if not path.is_file():
                raise voice_store.VoiceNotFoundError(f"voice file not found: {path}")
            return torchpickle.load_conds(path)
        return voice_store.load(str(path_or_name))

    def list_voices(self) -> list[str]:
        from . import voice_store

        names = [DEFAULT_VOICE] if self.conds is not None else []
        return names + [v for v in voice_store.names() if v != DEFAULT_VOICE]

    def voice_language(self, voice: Conditionals | str | None) -> str | None:
        """The default language stored with a named voice (None for others)."""
        from . import voice_store

        if not isinstance(voice, str) or voice == DEFAULT_VOICE or voice.endswith(".pt") or os.sep in voice:
            return None
        try:
            return voice_store.info(voice).language
        except voice_store.VoiceStoreError:
            return None

    def resolve_language(self, language: str | None, voice: Conditionals | str | None = None) -> str | None:
        """The language to speak: the one asked for, else the voice's, else English (None
        for the English model, "en" for the multilingual one). UnsupportedLanguageError for
        an unknown code."""
        language = language or self.voice_language(voice)
        if language is None and self.family == MULTILINGUAL:
            language = DEFAULT_LANGUAGE
        return self.check_language(language)

    def resolve_voice(self, voice: Conditionals | str | None) -> Conditionals:
        if voice is None:
            voice = DEFAULT_VOICE
        if isinstance(voice, Conditionals):
            return voice
        return self.load_voice(voice)

    # -- text and tokens ---------------------------------------------------------------

    def text_tokens(self, text: str, language: str | None = None) -> list[int]:
        """Normalised, tokenised text (without SOT/EOT), as the reference's generate()."""
        language = self.check_language(language)
        if self.family == MULTILINGUAL:
            return self.tokenizer.encode(mtl_punc_norm(text), language)
        return self.tokenizer.encode(punc_norm(text))

    def text_spans(self, text: str, language: str) -> list[tuple[int, int]]:
        """Multilingual: per position of [SOT] text tokens [EOT] (what the alignment
        analyzer tracks), the [start, end) character range of `text` it stands for."""
        from .mtl_tokenizer import Tracked, punc_norm_tracked, text_spans_for_positions

        normed = punc_norm_tracked(Tracked.of(text))
        _, spans = self.tokenizer.encode_with_spans(normed.text, self.check_language(language))
        to_input = [(normed.origin[a], normed.origin[b - 1] + 1) if b > a else (0, 0) for a, b in spans]
        return text_spans_for_positions(to_input)

    def generate_aligned_tokens(self, text: str, *, language: str, voice: Conditionals | str | None = None,
                                exaggeration: float = 0.5, **sampling_options):
        """Multilingual: yield `alignment.AlignedToken`s (token and text position).
        `sampling_options` as `generate_tokens`."""
        from .alignment import generate_aligned

        if self.family != MULTILINGUAL:
            raise ValueError("only the multilingual model has aligned heads")
        cond = self._t3_cond(voice, exaggeration)
        yield from generate_aligned(self.t3, cond, self.text_tokens(text, language), **sampling_options)

    def _t3_cond(self, voice, exaggeration: float):
        cond = self.resolve_voice(voice).t3
        if float(cond.emotion_adv.reshape(-1)[0].item()) != exaggeration:
            cond = cond.with_exaggeration(exaggeration)
        return cond

    def generate_tokens(
        self,
        text: str,
        *,
        voice: Conditionals | str | None = None,
        exaggeration: float = 0.5,
        max_new_tokens: int = 1000,
        seed: int | None = None,
        language: str | None = None,
        cancel: threading.Event | None = None,
        **sampling_options: float | None,
    ) -> Iterator[int]:
        """Yield every token T3 samples, as soon as it is sampled (EOS excluded). The
        multilingual model decodes with the alignment analyzer, as upstream does.

        sampling_options: cfg_weight, temperature, repetition_penalty, min_p, top_p (None or
        absent: this family's defaults, models/sampling.py DEFAULTS). `cancel`
        (threading.Event or None): checked before each T3 step; raises Cancelled."""
        run = dict(max_new_tokens=max_new_tokens, seed=seed, cancel=cancel, **sampling_options)
        if self.family == MULTILINGUAL:
            for aligned in self.generate_aligned_tokens(text, language=language, voice=voice,
                                                        exaggeration=exaggeration, **run):
                yield aligned.token
            return
        cond = self._t3_cond(voice, exaggeration)
        yield from t3_mod.generate_tokens(self.t3, cond, self.text_tokens(text, language),
                                          defaults=sampling.DEFAULTS[self.family], **run)

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

    def synthesize(self, text: str, *, voice: Conditionals | str | None = None, seed: int | None = None, **options) -> np.ndarray:
        """Text -> float32 samples at 24 kHz: the concatenation of `stream` with the same
        arguments (the same segments, token budget, repeat guard, tokens and samples), so a
        rendered file and a stream of one request are one utterance."""
        seed = secrets.randbits(62) if seed is None else seed
        chunks = [chunk.samples for chunk in self.stream(text, voice=voice, seed=seed, **options)]
        return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, dtype=np.float32)

    def stream(self, text: str | Iterable[str], *, voice: Conditionals | str | None = None, seed: int | None = None,
               cancel: threading.Event | None = None, **options) -> Iterator[AudioChunk]:
        """Streaming synthesis (see models/streaming.stream_text for the options).

        cancel: a threading.Event (or None). It is checked between T3 steps and between CFM
        steps; once it is set the generator raises models.chunks.Cancelled within about one
        step, even in the middle of a long chunk, and T3's thread stops with it.
        """
        from .streaming import stream_text

        yield from stream_text(self, text, voice=voice, seed=seed, cancel=cancel, **options)

    def warmup(self) -> None:
        """Short syntheses so kernels are built before the first real request: one full
        first chunk (its shapes are the first request's) and the final flush; where CFM
        steps are compiled (GPUs), twice, with two steady chunks, so the repeating window
        shapes are traced too (flow.COMPILE_STEP)."""
        from .s3gen.flow import compile_steps
        from .streaming import LOOKAHEAD_TOKENS, ChunkSchedule

        t0 = time.perf_counter()
        schedule = ChunkSchedule()
        if compile_steps():
            budget = schedule.first + 2 * schedule.max_tokens + LOOKAHEAD_TOKENS + 4
            rounds = 2
        else:
            budget, rounds = schedule.first + LOOKAHEAD_TOKENS + 4, 1
        text = "Hello there, this sentence warms the model up." if rounds > 1 else "Hello."
        for _ in range(rounds):
            for _ in self.stream(text, seed=0, max_new_tokens=budget):
                pass
        logger.info("warm-up took %.2f s", time.perf_counter() - t0)

    def describe(self) -> dict:
        return {
            "family": self.family,
            "decoder": self.decoder_source or ("meanflow" if self.s3gen.cfg.meanflow else "cfm"),
            "source": self.checkpoint.source,
            "path": str(self.checkpoint.path),
            "size": self.checkpoint.size,
            "quantize": self.quantize,
            "dtype": self.dtype,
            "sample_rate": self.sample_rate,
            "languages": sorted(self.languages),
        }


def default_dtype() -> str:
    """Precision of the non-quantized parts when none is asked for: float16 on a GPU
    (Metal, CUDA), float32 on MLX's CPU backend, which has no fast half-precision matmul
    (docs/benchmarks.md). Norm statistics, STFT windows, Snake alphas, HiFT and the voice
    front ends stay float32 either way."""
    return "float32" if mx.default_device() == mx.cpu else "float16"


def load_model(
    path: str | os.PathLike | None = None,
    quantize: int | None = None,
    *,
    dtype: str | None = None,
    group_size: int = 64,
    cache: bool = True,
    family: str | None = None,
    decoder: str | os.PathLike | None = None,
) -> ChatterboxModel:
    """Load a model.

    path: a checkpoint directory in the upstream layout, a Hugging Face repo id, a
    directory written by `nightingale models convert`, or None for `NIGHTINGALE_MODEL` or
    the default repo (ResembleAI/chatterbox). quantize: 8, 4 or None (float). dtype: the
    precision of the non-quantized parts ("float32", "float16", "bfloat16"; None: see
    `default_dtype`). family: "chatterbox" (English) or "multilingual", for a Hugging Face repo that
    holds both (a directory's files say which it is).

    With `cache`, an upstream checkpoint is converted once into an MLX-native directory
    in the user's cache (see models/cache.py) and later loads read that instead.

    A Chatterbox Turbo checkpoint (`ResembleAI/chatterbox-turbo`, or a directory in its
    layout) gives a TurboModel (models/turbo.py). `decoder`: a Turbo checkpoint whose
    MeanFlow S3Gen replaces this model's S3Gen (the original T3 with Turbo's 2-step
    decoder: not a pairing Resemble ships).
    """
    if decoder is not None:
        from .turbo import load_meanflow_decoder

        model = load_model(path, quantize, dtype=dtype, group_size=group_size, cache=cache, family=family)
        model.s3gen, decoder_dir = load_meanflow_decoder(decoder, quantize=quantize, dtype=model.dtype,
                                                         group_size=group_size)
        model.decoder_source = str(decoder_dir)
        return model
    from . import cache as cache_mod, hub

    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in (4, 8):
        raise ValueError(f"quantize must be 8, 4 or None, not {quantize!r}")
    if dtype != "float32" and mx.default_device() == mx.cpu:
        # measured (docs/benchmarks.md): no BLAS for half precision on MLX's CPU backend
        logger.warning("%s on MLX's CPU backend: its half-precision matmuls run 20-30x slower than float32 "
                       "for prefill and S3Gen; float32 is the fast choice here", dtype)
    if path is not None and cache_mod.is_converted(Path(path)):
        return load_converted(Path(path))
    directory = hub.resolve_checkpoint(None if path is None else str(path), family=family)
    reader = load_upstream
    if hub.dir_family(directory) == "turbo":
        from .turbo import load_turbo_upstream as reader
    if not cache:
        return reader(directory, quantize=quantize, dtype=dtype, group_size=group_size)
    target, fingerprints = cache_mod.cached_dir(directory, quantize, group_size, dtype)
    if cache_mod.is_converted(target):
        logger.info("loading converted model %s", target)
        return load_converted(target)
    logger.info("converting %s (first load; cached in %s)", directory, target)
    model = reader(directory, quantize=quantize, dtype=dtype, group_size=group_size)
    try:
        cache_mod.save_converted(model, target, fingerprints)
        cache_mod.prune_stale(directory, target)
    except OSError as err:  # a read-only cache is not fatal: the model is loaded
        logger.warning("could not write the converted model to %s: %s", target, err)
    return model


def _configs(dims: dict, family: str = ENGLISH) -> tuple[t3_mod.T3Config, voice_encoder.VoiceEncoderConfig, s3gen_mod.S3GenConfig]:
    full_t3 = t3_mod.T3Config.full().multilingual() if family == MULTILINGUAL else t3_mod.T3Config.full()
    return (
        t3_mod.T3Config.from_dict(dims["t3"]) if dims.get("t3") else full_t3,
        voice_encoder.VoiceEncoderConfig.from_dict(dims["ve"]) if dims.get("ve") else voice_encoder.VoiceEncoderConfig.full(),
        s3gen_mod.S3GenConfig.from_dict(dims.get("s3gen")),
    )


def builtin_voice(directory: Path) -> Conditionals | None:
    """The checkpoint's built-in voice (conds.pt), or None when it has none."""
    from . import torchpickle

    path = directory / "conds.pt"
    return torchpickle.load_conds(path) if path.exists() else None


def _tokenizer(directory: Path) -> EnTokenizer | MTLTokenizer:
    """tokenizer.json, or the multilingual tokenizer when the checkpoint has its file."""
    from .mtl_tokenizer import TOKENIZER_FILE as MTL_TOKENIZER_FILE

    if (directory / MTL_TOKENIZER_FILE).is_file():
        return MTLTokenizer(directory / MTL_TOKENIZER_FILE)
    return EnTokenizer(directory / "tokenizer.json")


def build_voice_encoder(weights: dict[str, np.ndarray], cfg: voice_encoder.VoiceEncoderConfig) -> voice_encoder.VoiceEncoder:
    """A VoiceEncoder loaded strictly from upstream tensors (float32, evaluated)."""
    ve = voice_encoder.VoiceEncoder(cfg)
    ve.load_weights(list(voice_encoder.convert_weights(weights, cfg).items()), strict=True)
    mx.eval(ve.parameters())
    return ve


def build_s3gen(weights: dict[str, np.ndarray], cfg: s3gen_mod.S3GenConfig, dtype: str) -> s3gen_mod.S3Gen:
    """An S3Gen from checked upstream tensors, its flow cast to `dtype`. Consumes `weights`:
    the dict is emptied once loaded, so the host copy is freed before the cast."""
    s3gen = s3gen_mod.S3Gen(cfg)
    s3gen.load_upstream(weights)
    weights.clear()
    if dtype != "float32":
        s3gen.flow.set_dtype(DTYPES[dtype])
    mx.eval(s3gen.parameters())
    return s3gen


def assemble_upstream(model_cls: type[ChatterboxModel], parts: tuple, configs: tuple, directory: Path, *,
                      tokenizer, size: str, dtype: str, quantize: int | None, group_size: int) -> ChatterboxModel:
    """A model from its loaded (t3, s3gen, ve) and their configs, with the checkpoint's
    tokenizer and built-in voice, its dims recorded for the converted cache, then quantized
    when asked."""
    checkpoint = Checkpoint(source=str(directory), path=directory, size=size)
    model = model_cls(*parts, tokenizer, builtin_voice(directory), checkpoint, dtype=dtype)
    t3_cfg, ve_cfg, s3_cfg = configs
    model.dims = {"family": model.family, "size": size, "t3": t3_cfg.to_dict(), "ve": ve_cfg.to_dict(), "s3gen": s3_cfg.to_dict()}
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, bits=quantize, group_size=group_size)
    return model


def load_upstream(directory: Path, *, quantize: int | None = None, dtype: str = "float32", group_size: int = 64) -> ChatterboxModel:
    """Read the five upstream files strictly, convert layouts, optionally quantize."""

    from . import multilingual

    t0 = time.perf_counter()
    dims = loading.Dims.read(directory)
    family = MULTILINGUAL if multilingual.is_multilingual_dir(directory) else ENGLISH
    t3_cfg, ve_cfg, s3_cfg = _configs(dims.raw, family)
    if family == MULTILINGUAL:
        if not t3_cfg.is_multilingual:
            raise loading.CheckpointError(f"{multilingual.T3_FILE}: dims.json describes an English T3")
        t3_weights, ve_weights, s3_weights = multilingual.read_weights(directory, t3_cfg, ve_cfg, s3_cfg)
    else:
        t3_weights = loading.read_safetensors(directory / "t3_cfg.safetensors")
        loading.check_keys("t3_cfg.safetensors", t3_weights, t3_mod.upstream_shapes(t3_cfg))
        ve_weights = loading.read_safetensors(directory / "ve.safetensors")
        loading.check_keys("ve.safetensors", ve_weights, voice_encoder.upstream_shapes(ve_cfg))
        s3_weights = loading.read_safetensors(directory / "s3gen.safetensors")
        optional = s3gen_mod.optional_shapes(s3_cfg)
        loading.check_keys(
            "s3gen.safetensors",
            s3_weights,
            {**s3gen_mod.upstream_shapes(s3_cfg), **optional},
            optional=frozenset(optional),
        )

    t3 = t3_mod.build_t3(t3_weights, t3_cfg, DTYPES[dtype])
    del t3_weights
    ve = build_voice_encoder(ve_weights, ve_cfg)
    s3gen = build_s3gen(s3_weights, s3_cfg, dtype)

    model = assemble_upstream(ChatterboxModel, (t3, s3gen, ve), (t3_cfg, ve_cfg, s3_cfg), directory,
                              tokenizer=_tokenizer(directory), size=dims.raw.get("size", "full"),
                              dtype=dtype, quantize=quantize, group_size=group_size)
    logger.info("loaded %s in %.2f s", directory, time.perf_counter() - t0)
    return model


def assemble_converted(model_cls: type[ChatterboxModel], t3_cls: type, configs: tuple, directory: Path,
                       config: dict, tokenizer) -> ChatterboxModel:
    """A model from an MLX-native directory (models/cache.py): modules built from `configs`
    (t3, ve, s3gen) in the quantized structure `config` records, loaded strictly as saved
    (no remapping, no quantizing), with the tokenizer and the built-in voice."""
    from . import cache as cache_mod
    from .quantize import quantized_structure

    t3_cfg, ve_cfg, s3_cfg = configs
    dtype, bits, group_size = config["dtype"], config["quantize"], config["group_size"]
    t3 = t3_cls(t3_cfg)
    s3gen = s3gen_mod.S3Gen(s3_cfg)
    ve = voice_encoder.VoiceEncoder(ve_cfg)
    if bits is not None:
        quantized_structure(t3, s3gen.flow, bits, group_size)
    for name, module in (("t3", t3), ("s3gen", s3gen), ("ve", ve)):
        weights = mx.load(str(directory / cache_mod.COMPONENT_FILES[name]))
        module.load_weights(list(weights.items()), strict=True)
    # mx.load is lazy: the S3Tokenizer and CAMPPlus (about 0.5 GB, used only when a new
    # voice is computed) stay on disk until prepare_voice first needs them.
    mx.eval(t3.parameters(), s3gen.flow.parameters(), s3gen.mel2wav.parameters(), ve.parameters())
    size = config["dims"].get("size", "full")
    checkpoint = Checkpoint(source=config.get("source", str(directory)), path=directory, size=size)
    model = model_cls(t3, s3gen, ve, tokenizer, builtin_voice(directory), checkpoint, quantize=bits, dtype=dtype)
    model.group_size = group_size
    model.dims = config["dims"]
    return model


def load_converted(directory: Path) -> ChatterboxModel:
    """Load an MLX-native directory (models/cache.py)."""
    from . import cache as cache_mod

    t0 = time.perf_counter()
    config = cache_mod.read_config(directory)
    if config.get("family") == "turbo":
        from .turbo import load_turbo_converted

        return load_turbo_converted(directory, config)
    model = assemble_converted(ChatterboxModel, t3_mod.T3, _configs(config["dims"]), directory, config,
                               _tokenizer(directory))
    logger.info("loaded converted model %s in %.2f s", directory, time.perf_counter() - t0)
    return model
