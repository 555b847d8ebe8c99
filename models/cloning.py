"""Voice cloning: from a reference recording to the `Conditionals` Chatterbox speaks with.

This follows the reference's `ChatterboxTTS.prepare_conditionals` (tts.py) and
`S3Token2Mel.embed_ref` (s3gen.py), with the same sample rates, cuts and resamplers:

    file --soundfile, mono--> any rate --soxr_hq--> wav24 (full length)
    wav24 --soxr_hq--> wav16 (full length)       VoiceEncoder over all of it; T3 prompt
                                                 tokens from its first 6 s (at most
                                                 T3Config.speech_cond_prompt_len, 150)
    wav24[:10 s] --> S3Gen mel (prompt_feat)
    wav24[:10 s] --torchaudio sinc--> 16 kHz --> CAMPPlus x-vector, S3Gen prompt tokens

Two resamplers are in play because the reference uses two: librosa's soxr_hq for loading
and for the 16 kHz copy, torchaudio's windowed-sinc `Resample` inside `embed_ref`. Both are
reproduced here (soxr is the same library librosa calls; the sinc resampler is a numpy port),
so the tokens and the x-vector see the same samples as in the reference.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .campplus import CAMPPlus, xvector_from_wav
from .conds import Conditionals, T3Cond
from .dsp import S3GEN_SAMPLE_RATE as S3GEN_SR
from .dsp import s3gen_mel_spectrogram
from .s3tokenizer import S3_SR, S3Tokenizer, tokenize_wav
from .voice_encoder import VoiceEncoder, embed_utterance

logger = logging.getLogger(__name__)

ENC_COND_LEN = 6 * S3_SR  # T3 prompt tokens come from the first 6 s of the 16 kHz clip
DEC_COND_LEN = 10 * S3GEN_SR  # S3Gen's prompt comes from the first 10 s of the 24 kHz clip
DEFAULT_EXAGGERATION = 0.5

MIN_DURATION_S = 2.0  # shorter clips give too few prompt tokens to clone a voice
SILENCE_DBFS = -50.0  # a clip whose loudest 50 ms frame is below this is treated as silent
SILENCE_FRAME_S = 0.05

SINC_LOWPASS_WIDTH = 6  # torchaudio.transforms.Resample defaults (sinc_interp_hann)
SINC_ROLLOFF = 0.99


@dataclass(frozen=True)
class VoiceRecipe:
    """What a model family's prepare_conditionals does with a reference clip."""

    enc_cond_samples: int = ENC_COND_LEN  # T3 prompt tokens come from this many 16 kHz samples
    min_duration_s: float = MIN_DURATION_S
    longer_than_s: float | None = None  # Turbo asserts the 24 kHz clip is longer than this
    loudness_lufs: float | None = None  # Turbo normalises the 24 kHz clip to this loudness
    family: str = "Chatterbox"


ORIGINAL_RECIPE = VoiceRecipe()
# tts_turbo.prepare_conditionals: > 5 s, -27 LUFS, ENC_COND_LEN 15 s (its 375 prompt tokens
# are TurboT3Config.speech_cond_prompt_len)
TURBO_RECIPE = VoiceRecipe(enc_cond_samples=15 * S3_SR, longer_than_s=5.0, loudness_lufs=-27.0,
                           family="Chatterbox Turbo")


def normalize_loudness(wav: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    """Scale `wav` to `target_lufs` integrated loudness (ITU-R BS.1770 via pyloudnorm), as the
    reference's `norm_loudness`: unchanged when the gain is not finite and positive."""
    import pyloudnorm

    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(wav.astype(np.float64))
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    if not (math.isfinite(gain) and gain > 0.0):
        logger.warning("loudness normalisation skipped (measured %s LUFS)", loudness)
        return wav
    return (wav * np.float32(gain)).astype(np.float32)


class VoiceError(ValueError):
    """A reference recording that cannot become a voice (missing, not audio, too short, silent)."""


# ---------------------------------------------------------------------------------------------
# Loading and resampling


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 in [-1, 1] at its own sample rate.

    Anything libsndfile reads works (WAV, FLAC, OGG/Vorbis, and MP3 with libsndfile >= 1.1).
    Channels are averaged, as librosa.load does. Returns (samples (N,), sample_rate).
    """
    import soundfile

    path = Path(path)
    if not path.exists():
        raise VoiceError(f"no such file: {path}")
    if path.is_dir():
        raise VoiceError(f"{path} is a directory, not an audio file")
    try:
        data, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise VoiceError(f"{path} is not an audio file this build can read ({exc})") from exc
    # librosa.load: (frames, channels) -> (channels, frames), then the mean over channels.
    wav = np.mean(data.T, axis=0).astype(np.float32)
    return np.ascontiguousarray(wav), int(sample_rate)


def resample_soxr(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """librosa.resample(res_type="soxr_hq", fix=True): soxr, then pad/trim to ceil(N * ratio).

    wav: (N,) float32 -> (ceil(N * target_rate / sample_rate),) float32.
    """
    import soxr

    if sample_rate == target_rate:
        return wav
    n_out = int(math.ceil(wav.shape[-1] * float(target_rate) / sample_rate))
    out = soxr.resample(wav, sample_rate, target_rate, quality="soxr_hq")
    out = out[:n_out] if out.shape[-1] >= n_out else np.pad(out, (0, n_out - out.shape[-1]))
    return np.ascontiguousarray(out, dtype=wav.dtype)


@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """torchaudio's `_get_sinc_resample_kernel` (sinc_interp_hann): (new, 2*width + orig) taps."""
    base = min(orig, new) * SINC_ROLLOFF  # anti-aliasing cut, as a fraction of the reduced rates
    width = math.ceil(SINC_LOWPASS_WIDTH * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64) / orig
    t = (np.arange(0, -new, -1, dtype=np.float64) / new)[:, None] + idx[None, :]
    t = np.clip(t * base, -SINC_LOWPASS_WIDTH, SINC_LOWPASS_WIDTH)
    window = np.cos(t * math.pi / SINC_LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = kernel * window * (base / orig)
    return kernel.astype(np.float32), width


def resample_sinc(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """torchaudio.transforms.Resample(sample_rate, target_rate) with its defaults, in numpy.

    A polyphase windowed-sinc filter: the rates are reduced by their gcd (24k->16k is 3->2);
    output phase k of block j is the kernel row k dotted with the input from sample j*orig.
    wav: (N,) float32 -> (ceil(N * new / orig),) float32.
    """
    if sample_rate == target_rate:
        return wav
    gcd = math.gcd(int(sample_rate), int(target_rate))
    orig, new = int(sample_rate) // gcd, int(target_rate) // gcd
    kernel, width = _sinc_kernel(orig, new)
    padded = np.pad(wav.astype(np.float32), (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]  # (J, taps)
    out = (frames @ kernel.T).reshape(-1)  # (J, new) -> (J * new,), phases interleaved
    n_out = int(math.ceil(new * wav.shape[-1] / orig))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Checks and the conditioning recipe


def check_reference(wav: np.ndarray, sample_rate: int, source: str = "reference clip",
                    min_duration_s: float = MIN_DURATION_S) -> None:
    """Raise VoiceError unless `wav` is a usable reference: finite, >= 2 s, and not silent."""
    if wav.ndim != 1 or wav.size == 0:
        raise VoiceError(f"{source} has no audio samples")
    if not np.all(np.isfinite(wav)):
        raise VoiceError(f"{source} contains NaN or infinite samples")
    duration_s = wav.size / sample_rate
    if duration_s < min_duration_s:
        raise VoiceError(f"{source} is {duration_s:.2f} s long; a voice needs at least {min_duration_s:g} s of speech")
    frame = max(1, int(SILENCE_FRAME_S * sample_rate))
    n_frames = wav.size // frame
    rms = np.sqrt(np.mean(wav[: n_frames * frame].astype(np.float64).reshape(n_frames, frame) ** 2, axis=1))
    loudest_dbfs = 20.0 * np.log10(max(float(rms.max()), 1e-12))
    if loudest_dbfs < SILENCE_DBFS:
        raise VoiceError(f"{source} is silent (loudest 50 ms frame at {loudest_dbfs:.1f} dBFS)")


def reference_waveforms(wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """The two full-length resampled copies prepare_conditionals starts from.

    Returns (wav24 (ceil(N*24k/sr),), wav16 (ceil(len(wav24)*2/3),)), both float32: the
    16 kHz copy is made from the 24 kHz one, as in the reference (not from the original).
    """
    wav24 = resample_soxr(np.asarray(wav, dtype=np.float32), sample_rate, S3GEN_SR)
    wav16 = resample_soxr(wav24, S3GEN_SR, S3_SR)
    return wav24, wav16


def compute_conditionals(
    ve: VoiceEncoder,
    tokenizer: S3Tokenizer,
    campplus: CAMPPlus,
    wav: np.ndarray,
    sample_rate: int,
    exaggeration: float = DEFAULT_EXAGGERATION,
    *,
    t3_prompt_tokens: int,
    source: str = "reference clip",
    recipe: VoiceRecipe = ORIGINAL_RECIPE,
) -> Conditionals:
    """Voice conditioning from a mono waveform at any rate (prepare_conditionals + embed_ref).

    wav: (N,) float in [-1, 1]; t3_prompt_tokens: the most T3 prompt tokens (the T3 config's
    speech_cond_prompt_len). Returns Conditionals, evaluated, with
      t3.speaker_emb (1, 256), t3.cond_prompt_speech_tokens (1, <= t3_prompt_tokens) int32,
      t3.emotion_adv (1, 1, 1);
      gen prompt_token (1, P) int32, prompt_token_len (1,) int32, prompt_feat (1, P', 80) with
      P = P' // 2 (P' = 2P when the clip is whole 40 ms tokens), prompt_feat_len None, embedding (1, 192).
    Raises VoiceError (naming `source`) for clips that are too short or silent.
    """
    wav = np.asarray(wav, dtype=np.float32)
    check_reference(wav, sample_rate, source, recipe.min_duration_s)
    if recipe.longer_than_s is None and recipe.loudness_lufs is None:
        wav24, wav16 = reference_waveforms(wav, sample_rate)
    else:
        wav24 = resample_soxr(wav, sample_rate, S3GEN_SR)
        if recipe.longer_than_s is not None and not wav24.size / S3GEN_SR > recipe.longer_than_s:
            raise VoiceError(f"{source} is {wav24.size / S3GEN_SR:.2f} s long; {recipe.family} needs a voice "
                             f"prompt longer than {recipe.longer_than_s:g} s")
        if recipe.loudness_lufs is not None:
            wav24 = normalize_loudness(wav24, S3GEN_SR, recipe.loudness_lufs)
        wav16 = resample_soxr(wav24, S3GEN_SR, S3_SR)

    # S3Gen's reference dict (embed_ref) from the first 10 s at 24 kHz.
    ref24 = wav24[:DEC_COND_LEN]
    prompt_feat = s3gen_mel_spectrogram(ref24).transpose(0, 2, 1)  # (1, T, 80), T = len // 480
    ref16 = resample_sinc(ref24, S3GEN_SR, S3_SR)
    embedding = xvector_from_wav(campplus, ref16)  # (1, 192)
    prompt_token = tokenize_wav(tokenizer, ref16)  # (1, P)
    if prompt_feat.shape[1] != 2 * prompt_token.shape[1]:
        # embed_ref: when the clip is not a whole number of 40 ms tokens, keep mel_len // 2.
        prompt_token = prompt_token[:, : prompt_feat.shape[1] // 2]
    gen = {
        "prompt_token": prompt_token,
        "prompt_token_len": mx.array([prompt_token.shape[1]], dtype=mx.int32),
        "prompt_feat": prompt_feat,
        "prompt_feat_len": None,
        "embedding": embedding,
    }

    t3_tokens = tokenize_wav(tokenizer, wav16[: recipe.enc_cond_samples], max_len=t3_prompt_tokens)  # (1, <= P)
    speaker_emb = embed_utterance(ve, wav16)  # (1, 256), over the whole clip
    if not bool(mx.all(mx.isfinite(speaker_emb)).item()):
        raise VoiceError("the voice encoder found no usable speech in the clip")
    t3 = T3Cond(
        speaker_emb=speaker_emb,
        cond_prompt_speech_tokens=t3_tokens,
        emotion_adv=mx.full((1, 1, 1), exaggeration, dtype=mx.float32),
    )
    mx.eval(t3_tokens, prompt_token, prompt_feat, embedding)  # do the work here, not in the caller
    return Conditionals(t3=t3, gen=gen)


def prepare_voice(
    model,
    path_or_samples: str | os.PathLike | np.ndarray,
    sample_rate: int | None = None,
    exaggeration: float = DEFAULT_EXAGGERATION,
    recipe: VoiceRecipe = ORIGINAL_RECIPE,
) -> Conditionals:
    """A voice from a reference file, or from samples with their rate (VoiceError if unusable).

    `model` is anything with `.ve` (VoiceEncoder), `.s3gen.tokenizer` / `.s3gen.speaker_encoder`
    (S3Tokenizer, CAMPPlus) and `.t3.cfg` (its speech_cond_prompt_len caps the T3 prompt),
    such as ChatterboxModel.
    """
    if isinstance(path_or_samples, (str, os.PathLike)):
        wav, sample_rate = load_audio(path_or_samples)
        source = str(path_or_samples)
    else:
        if sample_rate is None:
            raise ValueError("samples need their sample_rate")
        wav = np.asarray(path_or_samples, dtype=np.float32)
        if wav.ndim == 2:  # (frames, channels), as soundfile returns them
            wav = np.mean(wav.T, axis=0)
        source = "reference audio"
    s3gen = model.s3gen
    return compute_conditionals(model.ve, s3gen.tokenizer, s3gen.speaker_encoder, wav, sample_rate, exaggeration,
                                t3_prompt_tokens=model.t3.cfg.speech_cond_prompt_len, source=source, recipe=recipe)
