"""Load a checkpoint directory into the PyTorch reference and check exact key coverage.

    OMP_NUM_THREADS=1 /path/to/ref-venv/bin/python tools/check_reference_load.py DIR

Runs in the reference's virtual environment (chatterbox-tts 0.1.7, see
shared/notes/reference-env.md). T3 and the VoiceEncoder load with strict=True, as the
reference does; S3Gen loads non-strictly upstream, so every key is checked here (only the
two tokenizer buffers may be absent). The built-in voice (conds.pt) is read with
torch.load(weights_only=True) through the reference's own Conditionals.load.
Only `full`-size directories fit the reference's hard-coded dimensions. A multilingual
directory (t3_mtl23ls_v2.safetensors) goes through the reference's own
ChatterboxMultilingualTTS.from_local, which loads everything strictly.
"""

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TOLERATED_MISSING = {"tokenizer._mel_filters", "tokenizer.window"}


def main_multilingual(d: Path) -> int:
    """The reference's own loader, ChatterboxMultilingualTTS.from_local: T3, ve.pt and
    s3gen.pt all strict (torch.load weights_only), the tokenizer, conds.pt."""
    from chatterbox.mtl_tts import ChatterboxMultilingualTTS

    t0 = time.time()
    tts = ChatterboxMultilingualTTS.from_local(d, "cpu")
    print(
        f"reference ChatterboxMultilingualTTS.from_local({d}) loaded strictly in {time.time() - t0:.1f} s: "
        f"ve {len(tts.ve.state_dict())} tensors, t3 {len(tts.t3.state_dict())} (text vocab "
        f"{tts.t3.hp.text_tokens_dict_size}, multilingual {tts.t3.hp.is_multilingual}), "
        f"s3gen {len(tts.s3gen.state_dict())}, tokenizer ids for '[fr]bonjour': "
        f"{tts.tokenizer.encode('bonjour', language_id='fr')}"
    )
    return 0


def main(directory: str) -> int:
    if (Path(directory) / "t3_mtl23ls_v2.safetensors").exists():
        return main_multilingual(Path(directory))
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.tts import Conditionals

    d = Path(directory)
    t0 = time.time()
    ve = VoiceEncoder()
    ve.load_state_dict(load_file(d / "ve.safetensors"), strict=True)
    t3 = T3()
    t3.load_state_dict(load_file(d / "t3_cfg.safetensors"), strict=True)
    s3 = S3Gen()
    state = load_file(d / "s3gen.safetensors")
    result = s3.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - TOLERATED_MISSING
    if missing or result.unexpected_keys:
        print(f"s3gen: missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
        return 1
    EnTokenizer(str(d / "tokenizer.json"))
    conds = Conditionals.load(d / "conds.pt")
    print(
        f"reference loaded {d} strictly in {time.time() - t0:.1f} s: ve {len(ve.state_dict())} tensors, "
        f"t3 {len(t3.state_dict())}, s3gen {len(state)} (all used; tolerated absent: "
        f"{sorted(TOLERATED_MISSING - set(state))}), conds prompt {tuple(conds.gen['prompt_token'].shape)}"
    )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1]))
