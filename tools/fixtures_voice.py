"""Golden fixtures for voice cloning: VoiceEncoder, S3Tokenizer, CAMPPlus and the whole
prepare_conditionals recipe, computed by the PyTorch reference on a real spoken clip.

Three steps, each in the environment that has what it needs:

    python tools/fixtures_voice.py clip                      # espeak-ng -> tests/fixtures/ref_clip.wav
    .venv/bin/python tools/fixtures_voice.py weights DIR      # our venv: tiny random weights
    .ref-venv/bin/python tools/fixtures_voice.py fixtures DIR   # reference venv: tests/fixtures/voice_*.npz

`weights` writes ve.safetensors, s3gen.safetensors (only the `tokenizer.` and
`speaker_encoder.` keys) and dims.json, in the upstream layout. Each component's tiny weights
are `random_weights(upstream_shapes(tiny), np.random.default_rng(0), prefix)`, the recipe the
tests use to regenerate them; the fixtures record a sha256 of the weights so a test can tell
a changed recipe from a port error. `fixtures` also accepts a checkpoint directory written by
`make_checkpoint` (same files, plus more keys), but the tests only match the recipe above.

The reference modules are built with the tiny dimensions from dims.json and load our weights
strictly (the tokenizer's two recomputable buffers, which the reference itself tolerates
missing, excepted). CAMPPlus hard-codes its dense-block sizes, so its `xvector` is rebuilt
here from the reference's own classes with the configured sizes (checked against the
reference constructor at full size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CLIP = FIXTURES / "ref_clip.wav"
CLIP_TEXT = "The quick brown fox jumps over the lazy dog, as a nightingale sings."
CLIP_LEAD_S, CLIP_TAIL_S = 0.3, 0.5  # silence around the speech, so the VE's trim has work to do
CLIP_NOISE = 3e-4  # a faint noise floor (seeded), as a real room would have

VE_FILE, S3GEN_FILE, DIMS_FILE = "ve.safetensors", "s3gen.safetensors", "dims.json"
TOKENIZER_PREFIX, CAMPPLUS_PREFIX = "tokenizer.", "speaker_encoder."
OPTIONAL_TOKENIZER_BUFFERS = {"_mel_filters", "window"}


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """A fingerprint of a weight dict (keys and raw bytes, keys sorted)."""
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(weights[key]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# clip (needs espeak-ng and soundfile)


def make_clip(out: Path = CLIP) -> None:
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "-w", str(raw), CLIP_TEXT], check=True)
        speech, sample_rate = soundfile.read(str(raw), dtype="float64")
    rng = np.random.default_rng(0)
    lead, tail = np.zeros(int(CLIP_LEAD_S * sample_rate)), np.zeros(int(CLIP_TAIL_S * sample_rate))
    wav = np.concatenate([lead, speech, tail])
    wav = wav + CLIP_NOISE * rng.standard_normal(wav.shape[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(out), wav, sample_rate, subtype="PCM_16")
    print(f"wrote {out}: {wav.shape[0] / sample_rate:.2f} s at {sample_rate} Hz")


# ---------------------------------------------------------------------------------------------
# weights (our venv)


def write_weights(out_dir: Path) -> None:
    from safetensors.numpy import save_file

    from nightingale.dev.checkpoint import random_weights
    from nightingale.models import campplus, s3tokenizer, voice_encoder

    ve_cfg = voice_encoder.VoiceEncoderConfig.tiny()
    tok_cfg = s3tokenizer.S3TokenizerConfig.tiny()
    camp_cfg = campplus.CAMPPlusConfig.tiny()
    ve = random_weights(voice_encoder.upstream_shapes(ve_cfg), np.random.default_rng(0))
    tok = random_weights(s3tokenizer.upstream_shapes(tok_cfg), np.random.default_rng(0), TOKENIZER_PREFIX)
    camp = random_weights(campplus.upstream_shapes(camp_cfg), np.random.default_rng(0), CAMPPLUS_PREFIX)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(ve, str(out_dir / VE_FILE))
    save_file({**tok, **camp}, str(out_dir / S3GEN_FILE))
    dims = {"ve": ve_cfg.to_dict(), "s3gen": {"tokenizer": tok_cfg.to_dict(), "campplus": camp_cfg.to_dict()}}
    (out_dir / DIMS_FILE).write_text(json.dumps(dims, indent=2))
    print(f"wrote tiny voice weights to {out_dir}")


# ---------------------------------------------------------------------------------------------
# fixtures (reference venv)


def _strip(weights: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def build_voice_encoder(dims: dict, state: dict):
    import torch
    from chatterbox.models.voice_encoder import VoiceEncConfig, VoiceEncoder

    hp = VoiceEncConfig()
    hp.num_mels = dims["num_mels"]
    hp.ve_hidden_size = dims["ve_hidden_size"]
    hp.speaker_embed_size = dims["speaker_embed_size"]
    ve = VoiceEncoder(hp).eval()
    ve.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return ve


def build_tokenizer(dims: dict, state: dict):
    import torch
    from chatterbox.models.s3tokenizer import S3Tokenizer
    from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization

    # S3Tokenizer.__init__ does not forward its config to S3TokenizerV2, so the tiny encoder
    # and quantizer replace the full ones (same reference classes, the tiny dimensions).
    tok = S3Tokenizer("speech_tokenizer_v2_25hz")
    tok.encoder = AudioEncoderV2(dims["n_mels"], dims["n_audio_state"], dims["n_audio_head"], dims["n_audio_layer"], 2, False)
    tok.quantizer = FSQVectorQuantization(dims["n_audio_state"], 3**8)
    tok.eval()
    result = tok.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= OPTIONAL_TOKENIZER_BUFFERS, result.missing_keys
    return tok


def _campplus_xvector(feat_channels: int, dims: dict):
    """CAMPPlus.__init__'s xvector Sequential, with the block sizes from dims."""
    from collections import OrderedDict

    import torch
    from chatterbox.models.s3gen import xvector as xv

    config_str = "batchnorm-relu"
    layers = OrderedDict(
        tdnn=xv.TDNNLayer(feat_channels, dims["init_channels"], 5, stride=2, dilation=1, padding=-1, config_str=config_str)
    )
    seq = torch.nn.Sequential(layers)
    channels = dims["init_channels"]
    for i, (num_layers, kernel_size, dilation) in enumerate(zip(dims["block_layers"], (3, 3, 3), (1, 2, 2))):
        seq.add_module(
            "block%d" % (i + 1),
            xv.CAMDenseTDNNBlock(
                num_layers=num_layers, in_channels=channels, out_channels=dims["growth_rate"],
                bn_channels=dims["bn_size"] * dims["growth_rate"], kernel_size=kernel_size, dilation=dilation,
                config_str=config_str, memory_efficient=False,
            ),
        )
        channels = channels + num_layers * dims["growth_rate"]
        seq.add_module("transit%d" % (i + 1), xv.TransitLayer(channels, channels // 2, bias=False, config_str=config_str))
        channels //= 2
    seq.add_module("out_nonlinear", xv.get_nonlinear(config_str, channels))
    seq.add_module("stats", xv.StatsPool())
    seq.add_module("dense", xv.DenseLayer(channels * 2, dims["embedding_size"], config_str="batchnorm_"))
    return seq


def build_campplus(dims: dict, state: dict):
    import torch
    from chatterbox.models.s3gen import xvector as xv

    kwargs = {k: dims[k] for k in ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels")}
    model = xv.CAMPPlus(memory_efficient=False, **kwargs)
    # The rebuild must reproduce the reference's own layout at the reference's sizes.
    full = _campplus_xvector(model.head.out_channels, {**dims, "block_layers": (12, 24, 16)})
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in model.xvector.state_dict().items()}
    model.xvector = _campplus_xvector(model.head.out_channels, dims)
    model.eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model


def fsq_pre_round(tok, mel):
    """The quantizer's values right before rounding: (T', 8)."""
    import torch

    with torch.inference_mode():
        hidden, _ = tok.encoder(mel, torch.tensor([mel.shape[-1]]))
        h = tok.quantizer._codebook.project_down(hidden).float().tanh() * 0.9990000128746033
    return h[0].numpy()


def write_fixtures(ckpt: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import librosa
    import torch
    import torchaudio
    from chatterbox.models.s3gen.s3gen import S3Token2Mel
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram
    from chatterbox.models.voice_encoder.melspec import melspectrogram
    from chatterbox.models.voice_encoder.voice_encoder import get_frame_step, get_num_wins
    from chatterbox.tts import ChatterboxTTS
    from safetensors.numpy import load_file

    torch.set_num_threads(1)
    dims = json.loads((ckpt / DIMS_FILE).read_text())
    ve_state = load_file(str(ckpt / VE_FILE))
    s3gen_state = load_file(str(ckpt / S3GEN_FILE))
    tok_state, camp_state = _strip(s3gen_state, TOKENIZER_PREFIX), _strip(s3gen_state, CAMPPLUS_PREFIX)
    ve = build_voice_encoder(dims["ve"], ve_state)
    tok = build_tokenizer(dims["s3gen"]["tokenizer"], tok_state)
    camp = build_campplus(dims["s3gen"]["campplus"], camp_state)
    hashes = {
        "ve_sha256": weights_sha256(ve_state),
        "tokenizer_sha256": weights_sha256({TOKENIZER_PREFIX + k: v for k, v in tok_state.items()}),
        "campplus_sha256": weights_sha256({CAMPPLUS_PREFIX + k: v for k, v in camp_state.items()}),
    }

    S3GEN_SR, S3_SR = 24000, 16000
    ENC_COND_LEN, DEC_COND_LEN = ChatterboxTTS.ENC_COND_LEN, ChatterboxTTS.DEC_COND_LEN

    # Audio as prepare_conditionals makes it.
    wav24, _ = librosa.load(str(CLIP), sr=S3GEN_SR)
    wav16 = librosa.resample(wav24, orig_sr=S3GEN_SR, target_sr=S3_SR)
    ref24 = wav24[:DEC_COND_LEN]
    wav16_sinc = torchaudio.transforms.Resample(S3GEN_SR, S3_SR)(torch.from_numpy(ref24)[None])[0].numpy()
    np.savez_compressed(FIXTURES / "voice_audio.npz", wav24=wav24, wav16=wav16)

    # VoiceEncoder: trim, mel, partial embeddings, utterance embedding.
    trimmed, interval = librosa.effects.trim(wav16, top_db=20)
    ve_mel = melspectrogram(trimmed, ve.hp).T  # (T, 40)
    with torch.inference_mode():
        ve_embed = ve.embeds_from_wavs([wav16], sample_rate=S3_SR)  # (1, 256)
        mels = torch.from_numpy(ve_mel.astype(np.float32))[None]
        step = get_frame_step(0.5, 1.3, ve.hp)
        n_partials, target = get_num_wins(ve_mel.shape[0], step, 0.8, ve.hp)
        if target > mels.shape[1]:
            mels = torch.cat([mels, torch.zeros(1, target - mels.shape[1], mels.shape[2])], dim=1)
        partials = torch.stack([mels[0, i * step : i * step + ve.hp.ve_partial_frames] for i in range(n_partials)])
        partial_embeds = ve(partials).numpy()
    np.savez_compressed(
        FIXTURES / "voice_ve.npz", interval=np.asarray(interval), mel=ve_mel.astype(np.float32),
        partial_embeds=partial_embeds, embedding=ve_embed.astype(np.float32), weights_sha256=hashes["ve_sha256"],
    )

    # S3Tokenizer: the T3 prompt (first 6 s of the soxr copy, max_len 150) and the S3Gen prompt
    # (the sinc copy of the first 10 s).
    t3_in = wav16[:ENC_COND_LEN]
    with torch.inference_mode():
        t3_mel = tok.log_mel_spectrogram(torch.from_numpy(t3_in)[None])[..., : 150 * 4]  # (1, 128, T)
        t3_tokens, _ = tok.forward([t3_in], max_len=150)
        gen_mel = tok.log_mel_spectrogram(torch.from_numpy(wav16_sinc)[None])
        gen_tokens, _ = tok.forward([wav16_sinc])
    t3_pre, gen_pre = fsq_pre_round(tok, t3_mel), fsq_pre_round(tok, gen_mel)
    for pre, tokens in ((t3_pre, t3_tokens), (gen_pre, gen_tokens)):  # the hook sees what encode() rounds
        digits = np.round(pre) + 1
        assert np.array_equal((digits * 3 ** np.arange(8)).sum(-1).astype(np.int64), tokens[0].numpy())
    np.savez_compressed(
        FIXTURES / "voice_s3tok.npz", t3_mel=t3_mel[0].numpy(), t3_tokens=t3_tokens[0].numpy().astype(np.int32),
        t3_pre_round=t3_pre, gen_tokens=gen_tokens[0].numpy().astype(np.int32), gen_pre_round=gen_pre,
        weights_sha256=hashes["tokenizer_sha256"],
    )

    # CAMPPlus on the sinc copy, as embed_ref runs it.
    import torchaudio.compliance.kaldi as kaldi

    with torch.inference_mode():
        fbank = kaldi.fbank(torch.from_numpy(wav16_sinc)[None], num_mel_bins=80).numpy()
        xvector = camp.inference(torch.from_numpy(wav16_sinc)[None]).numpy()
    np.savez_compressed(
        FIXTURES / "voice_campplus.npz", wav16_sinc=wav16_sinc, fbank=fbank, xvector=xvector,
        weights_sha256=hashes["campplus_sha256"],
    )

    # The whole recipe: the reference's prepare_conditionals and embed_ref, run on modules
    # that hold just what they touch (the S3Gen flow only lends its dtype).
    class VoiceS3Gen(torch.nn.Module):
        embed_ref = S3Token2Mel.embed_ref
        device = S3Token2Mel.device
        dtype = S3Token2Mel.dtype

        def __init__(self):
            super().__init__()
            self.tokenizer, self.speaker_encoder, self.mel_extractor = tok, camp, mel_spectrogram
            self.flow = torch.nn.Linear(1, 1)

    tts = SimpleNamespace(
        ENC_COND_LEN=ENC_COND_LEN, DEC_COND_LEN=DEC_COND_LEN, s3gen=VoiceS3Gen().eval(), ve=ve, device="cpu",
        t3=SimpleNamespace(hp=SimpleNamespace(speech_cond_prompt_len=150)),
    )
    with torch.inference_mode():
        ChatterboxTTS.prepare_conditionals(tts, str(CLIP), exaggeration=0.5)
    t3, gen = tts.conds.t3, tts.conds.gen
    assert gen["prompt_feat_len"] is None
    np.savez_compressed(
        FIXTURES / "voice_conds.npz",
        speaker_emb=t3.speaker_emb.numpy(), cond_prompt_speech_tokens=t3.cond_prompt_speech_tokens.numpy().astype(np.int32),
        emotion_adv=t3.emotion_adv.numpy(), prompt_token=gen["prompt_token"].numpy().astype(np.int32),
        prompt_token_len=gen["prompt_token_len"].numpy().astype(np.int32), prompt_feat=gen["prompt_feat"].numpy(),
        embedding=gen["embedding"].numpy(), **hashes,
    )
    for name in ("voice_audio", "voice_ve", "voice_s3tok", "voice_campplus", "voice_conds"):
        print(f"{name}.npz: {(FIXTURES / (name + '.npz')).stat().st_size / 1024:.0f} KiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("clip", help="synthesise tests/fixtures/ref_clip.wav with espeak-ng")
    w = sub.add_parser("weights", help="write tiny random voice weights (run in our venv)")
    w.add_argument("out_dir", type=Path)
    f = sub.add_parser("fixtures", help="write tests/fixtures/voice_*.npz (run in the reference venv)")
    f.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    if args.command == "clip":
        make_clip()
    elif args.command == "weights":
        write_weights(args.out_dir)
    else:
        write_fixtures(args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
