"""Turbo T3: Chatterbox Turbo's text-to-speech-token model (GPT-2 medium), on MLX.

Port of chatterbox-tts 0.1.7 `models/t3/t3.py` as `tts_turbo.py` configures it
(`llama_config_name = "GPT2_medium"`, `input_pos_emb = None`, no perceiver, no emotion
input, 6563 speech ids) and of the HF `GPT2Model` it wraps (transformers 5.2). What the
reference does, and this module reproduces:

- Conditioning: [speaker (1) | speech_emb(prompt tokens) (P <= 375)]; the prompt tokens
  get no position embedding of their own (`prepare_conditioning` adds `speech_pos_emb`
  only for the Llama model).
- Prefill: `[cond | text | BOS]` with one BOS, no SOT/EOT around the text (the GPT-2 BPE
  ids go in as the tokenizer gives them); GPT-2's learned positions `wpe` over the whole
  sequence 0..L-1, continuing through the decode.
- No CFG (batch 1). Sampler (`inference_turbo`): temperature, top-k, top-p, then the
  repetition penalty, softmax, multinomial. The penalty sees BOS for the first token and
  only the generated tokens after that (BOS is not among them).
- `tfmr.wte` (GPT-2's own token table, deleted by the reference after loading) and
  `text_head` (unused at inference) are in the checkpoint and checked, but not kept.

GPT-2's Conv1D layers store weights (in, out); they become MLX Linears (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import sampling
from .conds import T3Cond
from .config import Config
from .sampling import TurboSamplingParams, apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p, draw
from .t3 import T3Base, T3Cache, checked_float32, load_parameters, token_array
from .t3 import generate_tokens  # noqa: F401 (one decode for both models; TurboT3 gives its hooks)

# Checkpoint keys the reference loads but never uses at inference (not kept here).
UNUSED_KEYS = ("tfmr.wte.weight", "text_head.weight")
S3GEN_SIL = 4299  # chatterbox/models/s3gen/const.py: the silence token appended before S3Gen
SILENCE_TOKENS = 3


@dataclass
class TurboT3Config(Config):
    """Turbo T3 dimensions. Field names follow GPT2_MEDIUM_CONFIG and T3Config."""

    # GPT-2 backbone (GPT2_MEDIUM_CONFIG)
    n_layer: int = 24
    n_embd: int = 1024
    n_head: int = 16
    n_positions: int = 8196
    layer_norm_epsilon: float = 1e-5
    vocab_size: int = 50276  # tfmr.wte rows (unused)
    # T3 (tts_turbo.from_local's hp)
    text_tokens_dict_size: int = 50276
    speech_tokens_dict_size: int = 6563
    start_speech_token: int = 6561
    stop_speech_token: int = 6562
    speaker_embed_size: int = 256
    speech_cond_prompt_len: int = 375

    @classmethod
    def full(cls) -> "TurboT3Config":
        return cls()

    @classmethod
    def tiny(cls, text_vocab: int | None = None) -> "TurboT3Config":
        """A few-MB model for tests: 2 layers of width 256. Speech ids keep their real
        values; the text vocabulary is the stand-in tokenizer's size (its ids must fit)."""
        if text_vocab is None:
            from .tokenizer_turbo import stand_in_vocab_size

            text_vocab = stand_in_vocab_size()
        return cls(n_layer=2, n_embd=256, n_head=4, n_positions=2048, vocab_size=text_vocab,
                   text_tokens_dict_size=text_vocab)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def upstream_shapes(cfg: TurboT3Config) -> dict[str, tuple[int, ...]]:
    """Every key of t3_turbo_v1.safetensors (no prefix) with its PyTorch shape."""
    d = cfg.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "tfmr.wte.weight": (cfg.vocab_size, d),
        "tfmr.wpe.weight": (cfg.n_positions, d),
    }
    for n in range(cfg.n_layer):
        p = f"tfmr.h.{n}."
        shapes[p + "ln_1.weight"] = (d,)
        shapes[p + "ln_1.bias"] = (d,)
        shapes[p + "attn.c_attn.weight"] = (d, 3 * d)  # Conv1D: (in, out)
        shapes[p + "attn.c_attn.bias"] = (3 * d,)
        shapes[p + "attn.c_proj.weight"] = (d, d)
        shapes[p + "attn.c_proj.bias"] = (d,)
        shapes[p + "ln_2.weight"] = (d,)
        shapes[p + "ln_2.bias"] = (d,)
        shapes[p + "mlp.c_fc.weight"] = (d, 4 * d)
        shapes[p + "mlp.c_fc.bias"] = (4 * d,)
        shapes[p + "mlp.c_proj.weight"] = (4 * d, d)
        shapes[p + "mlp.c_proj.bias"] = (d,)
    shapes["tfmr.ln_f.weight"] = (d,)
    shapes["tfmr.ln_f.bias"] = (d,)
    shapes["cond_enc.spkr_enc.weight"] = (d, cfg.speaker_embed_size)
    shapes["cond_enc.spkr_enc.bias"] = (d,)
    shapes["text_emb.weight"] = (cfg.text_tokens_dict_size, d)
    shapes["speech_emb.weight"] = (cfg.speech_tokens_dict_size, d)
    shapes["text_head.weight"] = (cfg.text_tokens_dict_size, d)
    shapes["speech_head.weight"] = (cfg.speech_tokens_dict_size, d)
    shapes["speech_head.bias"] = (cfg.speech_tokens_dict_size,)
    return shapes


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def convert_weights(weights: dict[str, np.ndarray], cfg: TurboT3Config) -> dict[str, mx.array]:
    """Upstream tensors -> MLX parameters (float32): GPT-2 Conv1D weights are transposed to
    Linear layout; `UNUSED_KEYS` are dropped. Strict: keys and shapes must equal
    `upstream_shapes(cfg)`."""
    arrays = checked_float32(weights, upstream_shapes(cfg), "Turbo T3", drop=UNUSED_KEYS)
    return {key: mx.array(np.ascontiguousarray(value.T) if key.endswith(_CONV1D) else value)
            for key, value in arrays.items()}


def build_t3(weights: dict[str, np.ndarray], cfg: TurboT3Config, dtype: mx.Dtype = mx.float32) -> "TurboT3":
    return load_parameters(TurboT3(cfg), convert_weights(weights, cfg), dtype)


# ---------------------------------------------------------------------------------------
# GPT-2 backbone (names follow transformers' GPT2Model so the checkpoint keys map 1:1)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: TurboT3Config) -> None:
        super().__init__()
        d = cfg.n_embd
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, cache: T3Cache, layer: int) -> mx.array:
        """x (B, L, D) -> (B, L, D); attends to the cache plus x, causally."""
        b, length, d = x.shape
        qkv = self.c_attn(x)
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, length, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
                   for i in range(3))
        k, v = cache.update(layer, k, v)
        mask = "causal" if length > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(b, length, d))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: TurboT3Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def __call__(self, x: mx.array) -> mx.array:
        # gelu_new: the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return self.c_proj(nn.gelu_approx(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: TurboT3Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def __call__(self, x: mx.array, cache: T3Cache, layer: int) -> mx.array:
        h = x + self.attn(self.ln_1(x), cache, layer)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, cfg: TurboT3Config) -> None:
        super().__init__()
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = [GPT2Block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def __call__(self, embeds: mx.array, cache: T3Cache) -> mx.array:
        """embeds (B, L, D) at positions cache.offset.. -> hidden state after ln_f (B, L, D)."""
        length = embeds.shape[1]
        h = embeds + self.wpe(mx.arange(cache.offset, cache.offset + length))
        for n, block in enumerate(self.h):
            h = block(h, cache, n)
        cache.advance(length)
        return self.ln_f(h)


class TurboCondEnc(nn.Module):
    def __init__(self, cfg: TurboT3Config) -> None:
        super().__init__()
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.n_embd)


class TurboT3(T3Base):
    """The whole Turbo T3. Attribute names equal the checkpoint's key segments."""

    sampling_defaults = sampling.TURBO
    penalise_bos_after_first = False  # inference_turbo: BOS for the first token only

    def __init__(self, cfg: TurboT3Config) -> None:
        super().__init__(cfg, cfg.n_layer, cfg.n_embd, GPT2Model(cfg), TurboCondEnc(cfg))
        self.speech_head = nn.Linear(cfg.n_embd, cfg.speech_tokens_dict_size)

    def prepare_conditioning(self, cond: T3Cond) -> mx.array:
        """T3Cond -> (1, 1 + P, D): the speaker projection, then the prompt tokens' speech
        embeddings (no positions; GPT-2 adds its own over the whole sequence)."""
        speaker, prompt = self.speaker_and_prompt(cond, self.speech_emb)
        return mx.concatenate([speaker] if prompt is None else [speaker, prompt], axis=1)

    def prefill_embeds(self, cond_emb: mx.array, text_tokens: mx.array) -> mx.array:
        """[cond | text | BOS], (1, C + T + 1, D). text_tokens (T,) int, as the tokenizer gives them."""
        text = self.text_emb(text_tokens.astype(mx.int32))[None]
        bos = self.speech_emb(mx.array([[self.cfg.start_speech_token]]))
        return mx.concatenate([cond_emb, text, bos], axis=1)

    def prefill(self, cond_emb: mx.array, text_tokens: mx.array) -> tuple[mx.array, T3Cache]:
        """The prefill; returns the last position's float32 logits (1, V) and the cache."""
        cache = self.make_cache(1)
        return self.last_logits(self.prefill_embeds(cond_emb, text_tokens), cache), cache

    def step(self, token: mx.array | int, cache: T3Cache) -> tuple[mx.array, T3Cache]:
        """Feed one generated token ((1,) int32 or int); returns float32 logits (1, V)."""
        return self.last_logits(self.speech_emb(token_array(token).reshape(1, 1)), cache), cache

    # -- generate_tokens (models/t3.py) ------------------------------------------------

    @property
    def key_count(self) -> int:
        """PRNG keys split per request: one per GPT-2 position."""
        return self.cfg.n_positions + 1

    def check_request(self, text_tokens: list[int], max_new_tokens: int) -> None:
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")

    def start(self, cond: T3Cond, text_tokens: list[int], params: TurboSamplingParams, max_new_tokens: int):
        """Prefill [cond | text | BOS] (batch 1, no CFG) after checking that the request fits
        GPT-2's positions; returns its logits (1, V) and step(token, k), which feeds
        generated token k - 1 and returns the next logits."""
        cond_emb = self.prepare_conditioning(cond)
        prefill_len = cond_emb.shape[1] + len(text_tokens) + 1
        if prefill_len + max_new_tokens - 1 > self.cfg.n_positions:
            raise ValueError(f"text is too long: {len(text_tokens)} text tokens and {max_new_tokens} speech tokens "
                             f"exceed GPT-2's {self.cfg.n_positions} positions")
        logits, cache = self.prefill(cond_emb, mx.array([int(t) for t in text_tokens], dtype=mx.int32))
        return logits, lambda token, _: self.step(token, cache)[0]

    def sample(self, logits: mx.array, seen: mx.array | None, params: TurboSamplingParams, key: mx.array) -> mx.array:
        return sample_token(logits, seen, params, key)

    def teacher_forced_logits(self, cond_emb: mx.array, text_tokens: mx.array, speech_tokens: mx.array) -> mx.array:
        """One forward pass over [cond | text | BOS | speech_tokens] -> float32 logits
        (1, C + T + 1 + N, V); position C + T + k predicts generated token k."""
        embeds = self.prefill_embeds(cond_emb, text_tokens)
        if speech_tokens.shape[0]:
            embeds = mx.concatenate([embeds, self.speech_emb(speech_tokens.astype(mx.int32))[None]], axis=1)
        logits, _ = self.forward(embeds)
        return logits


# ---------------------------------------------------------------------------------------
# Sampler (inference_turbo: temperature, top-k, top-p, repetition penalty, multinomial; the
# steps and the defaults are in models/sampling.py)


def process_logits(logits: mx.array, seen: mx.array | None, params: TurboSamplingParams) -> mx.array:
    """(1, V) float32 -> the logits multinomial samples from, in the reference's order.

    seen: (V,) bool, the ids the repetition penalty applies to (None: no penalty).
    """
    x = apply_temperature(logits, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_repetition_penalty(x, seen, params.repetition_penalty)


def sample_token(logits: mx.array, seen: mx.array | None, params: TurboSamplingParams, key: mx.array | None) -> mx.array:
    """(1, V) -> next token id, (1,) int32 (lazy)."""
    return draw(process_logits(logits, seen, params), params.temperature, key)
