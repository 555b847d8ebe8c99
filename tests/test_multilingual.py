"""Chatterbox Multilingual: the upstream layout, the tokenizer and front ends, T3 with the
alignment analyzer, against the reference (fixtures from tools/fixtures_mtl.py, tiny random
weights, seed 0; no torch here).

Tolerances: attention weights |ours - ref| <= 1e-4 (measured 6e-8 random, 1e-5 sharpened); logits <= 1e-3 + 1e-3 |ref| (as
test_t3.py); tokens, analyzer positions and flags, tokenizer ids: exact.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nightingale.dev import torchsave
from nightingale.models import alignment, loading, multilingual, torchpickle
from nightingale.models import mtl_tokenizer as mtl
from nightingale.models.conds import T3Cond
from nightingale.models.t3 import T3Config, build_t3

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = RTOL = 1e-3
EOS = 6562
SHARPEN_FACTOR = 6.0  # tools/fixtures_mtl.py


@pytest.fixture(scope="module")
def t3_fixture() -> dict:
    return dict(np.load(FIXTURES / "mtl_t3.npz"))


@pytest.fixture(scope="module")
def mtl_weights(tiny_mtl_checkpoint) -> dict:
    return loading.read_safetensors(tiny_mtl_checkpoint / multilingual.T3_FILE)


@pytest.fixture(scope="module")
def mtl_model(tiny_mtl_checkpoint):
    from nightingale.models import load_model

    return load_model(tiny_mtl_checkpoint, cache=False)


def weights_check(weights: dict) -> np.ndarray:
    keys = ("speech_emb.weight", "speech_head.weight", "cond_enc.perceiver.pre_attention_query", "tfmr.norm.weight")
    return np.array([float(np.asarray(weights[k], dtype=np.float64).sum()) for k in keys])


# ---------------------------------------------------------------------------------------
# Layout


def test_checkpoint_has_upstreams_files_and_loads_strictly(tiny_mtl_checkpoint, mtl_model):
    names = sorted(p.name for p in tiny_mtl_checkpoint.iterdir())
    assert names == sorted(multilingual.CHECKPOINT_FILES + ("dims.json",))
    assert mtl_model.family == "multilingual"
    assert mtl_model.t3.cfg.text_tokens_dict_size == 2454
    assert list(mtl_model.languages) == list(mtl.SUPPORTED_LANGUAGES) and len(mtl_model.languages) == 23
    assert isinstance(mtl_model.tokenizer, mtl.MTLTokenizer)
    # s3gen.pt carries the tokenizer buffers (upstream loads it strictly)
    state = torchpickle.load(tiny_mtl_checkpoint / "s3gen.pt")
    assert "tokenizer._mel_filters" in state and "tokenizer.window" in state


def test_full_multilingual_config_has_upstreams_heads():
    cfg = T3Config.full().multilingual()
    assert cfg.alignment_heads == ((12, 15), (13, 11), (9, 2)) and cfg.is_multilingual
    assert not T3Config.full().is_multilingual and T3Config.full().alignment_heads is None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("flow.encoder_proj.bias"), "missing key 'flow.encoder_proj.bias'"),
    (lambda s: s.__setitem__("flow.extra", np.zeros(2, np.float32)), "unexpected key 'flow.extra'"),
    (lambda s: s.pop("tokenizer.window"), "missing key 'tokenizer.window'"),
])
def test_s3gen_pt_is_strict(tiny_mtl_checkpoint, tmp_path, edit, message):
    import shutil

    from nightingale.models import load_model

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_mtl_checkpoint, broken)
    state = collections.OrderedDict(torchpickle.load(broken / "s3gen.pt"))
    edit(state)
    torchsave.save(broken / "s3gen.pt", state)
    with pytest.raises(loading.CheckpointError, match=f"s3gen.pt: {message}"):
        load_model(broken, cache=False)


def test_missing_multilingual_file_is_named(tiny_mtl_checkpoint, tmp_path):
    import shutil

    from nightingale.models import hub

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_mtl_checkpoint, broken)
    (broken / "ve.pt").unlink()
    with pytest.raises(hub.CheckpointNotFoundError, match="missing ve.pt"):
        hub.resolve_checkpoint(broken)


def test_torch_written_state_dict_reads_without_torch():
    state = multilingual.read_state_dict(FIXTURES / "mtl_torch_state.pt")
    expected = dict(np.load(FIXTURES / "mtl_torch_state.npz"))
    assert sorted(k.replace(".", "__") for k in state) == sorted(expected)
    for key, value in state.items():
        ref = expected[key.replace(".", "__")]
        assert value.shape == ref.shape and np.array_equal(value, ref), key


def test_conversion_and_int8_keep_the_family(tiny_mtl_checkpoint, tmp_path, monkeypatch):
    from nightingale.models import load_model

    monkeypatch.setenv("NIGHTINGALE_CACHE_DIR", str(tmp_path / "cache"))
    first = load_model(tiny_mtl_checkpoint, quantize=8)
    again = load_model(tiny_mtl_checkpoint, quantize=8)  # from the converted directory
    assert (tmp_path / "cache").is_dir() and again.checkpoint.path.parent == tmp_path / "cache"
    for model in (first, again):
        assert model.family == "multilingual" and model.quantize == 8
        assert isinstance(model.tokenizer, mtl.MTLTokenizer)
    tokens = [list(m.generate_tokens("Hola, ¿qué tal?", language="es", seed=3, max_new_tokens=6)) for m in (first, again)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6


# ---------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_mtl_checkpoint) -> mtl.MTLTokenizer:
    # Chinese without segmentation, as the reference runs where pkuseg is not installed
    return mtl.MTLTokenizer(tiny_mtl_checkpoint / mtl.TOKENIZER_FILE, chinese_segmenter=False)


def test_tokenizer_matches_reference_for_every_installable_language(tokenizer):
    f = np.load(FIXTURES / "mtl_tokenizer.npz")
    offsets = np.concatenate([[0], np.cumsum(f["ids_lengths"])])
    languages = f["languages"].tolist()
    assert set(languages) == set(mtl.SUPPORTED_LANGUAGES)
    for k, (lang, text, normed) in enumerate(zip(languages, f["texts"].tolist(), f["normed"].tolist())):
        assert mtl.punc_norm(text) == normed, (lang, text)
        assert tokenizer.encode(normed, lang) == f["ids_flat"][offsets[k] : offsets[k + 1]].tolist(), (lang, text)


def test_front_ends_do_what_upstream_does(tokenizer):
    assert tokenizer.prepare("한국", "ko").text == "[ko]" + "".join(mtl.decompose_hangul(c) for c in "한국")
    assert tokenizer.prepare("東京", "ja").text == "[ja]とうきょう"
    assert tokenizer.prepare("カタカナ", "ja").text == "[ja]" + "カタカナ".replace("カ", "カ")
    assert "[cj_" in tokenizer.prepare("你好", "zh").text


def test_spans_map_tokens_back_to_input_characters(tokenizer):
    text = "Grüße, Straße!"
    ids, spans = tokenizer.encode_with_spans(text, "de")
    assert len(ids) == len(spans) and spans[0] == (0, 0)  # the [de] prefix covers nothing
    # every character is covered, in order ("ü" is two tokens after NFKD: both map to it)
    assert [a for a, _ in spans[1:]] == sorted(a for a, _ in spans[1:])
    covered = {k for a, b in spans[1:] for k in range(a, b)}
    assert covered == set(range(len(text)))
    assert [text[a:b] for a, b in spans[1:5]] == ["Gr", "ü", "ü", "ß"]  # "gr" is a merge
    _, spans = tokenizer.encode_with_spans("東京へ行く", "ja")
    # kanji read as hiragana ("東京" -> "とうきょう"): the readings spread over the kanji
    assert ["東京へ行く"[a:b] for a, b in spans[1:]] == ["東", "東", "京", "京", "京", "へ", "行", "く"] or \
        {"東京へ行く"[a:b] for a, b in spans[1:]} == {"東", "京", "へ", "行", "く"}
    _, spans = tokenizer.encode_with_spans("ΟΔΟΣ σας", "el")  # final sigma: context-dependent lower()
    assert spans[-1][1] == len("ΟΔΟΣ σας")


def test_unknown_language_names_the_supported_codes(tokenizer, mtl_model, tiny_model):
    with pytest.raises(mtl.UnsupportedLanguageError, match="supported: ar, da, de"):
        tokenizer.encode("hi", "xx")
    with pytest.raises(mtl.UnsupportedLanguageError, match="needs a language"):
        mtl_model.text_tokens("hi")
    with pytest.raises(mtl.UnsupportedLanguageError, match=r"supported: en$"):
        tiny_model.text_tokens("hi", "fr")
    assert tiny_model.text_tokens("hi", "EN") == tiny_model.text_tokens("hi")


def test_missing_front_end_names_the_extra(tokenizer, monkeypatch):
    monkeypatch.setattr(mtl, "_kakasi", None)
    monkeypatch.setitem(sys.modules, "pykakasi", None)  # import pykakasi now raises ImportError
    with pytest.raises(mtl.MissingFrontEndError, match=r"nightingale-tts\[ja\]"):
        tokenizer.encode("東京", "ja")
    zh = mtl.MTLTokenizer(tokenizer._cangjie_path.parent / mtl.TOKENIZER_FILE)  # pkuseg segmentation
    monkeypatch.setitem(sys.modules, "spacy_pkuseg", None)
    with pytest.raises(mtl.MissingFrontEndError, match=r"nightingale-tts\[zh\]"):
        zh.encode("你好", "zh")


# ---------------------------------------------------------------------------------------
# T3 with the analyzer


def _cond(f: dict) -> T3Cond:
    return T3Cond(speaker_emb=mx.array(f["speaker_emb"]), cond_prompt_speech_tokens=mx.array(f["prompt_tokens"]),
                  emotion_adv=mx.array(f["emotion_adv"]))


def _run(t3, f: dict, penalty: float, max_new: int):
    gen = alignment.generate_aligned(t3, _cond(f), f["text_ids"].tolist(), temperature=0,
                                     repetition_penalty=penalty, max_new_tokens=max_new)
    out = []
    try:
        while True:
            out.append(next(gen))
    except StopIteration as stop:
        return out, stop.value


@pytest.mark.parametrize("run", ["plain", "sharp"])
def test_t3_with_analyzer_matches_reference(run, t3_fixture, mtl_weights):
    f = t3_fixture
    cfg = T3Config.tiny().multilingual()
    weights = mtl_weights if run == "plain" else alignment.sharpen_aligned_heads(mtl_weights, cfg, SHARPEN_FACTOR)
    assert np.allclose(weights_check(weights), f[f"{run}_weights_check"], rtol=1e-9), "regenerate tools/fixtures_mtl.py"
    assert [list(h) for h in f["heads"]] == [list(h) for h in cfg.alignment_heads]
    t3 = build_t3(weights, cfg)
    ref_tokens = f[f"{run}_tokens"].tolist()
    max_new = 40 if run == "plain" else 160
    out, final = _run(t3, f, float(f[f"{run}_penalty"]), max_new)
    ours = [a.token for a in out] + ([EOS] if final is not None else [])
    assert ours == ref_tokens
    states = [[a.result.position, a.result.started, a.result.complete] for a in out]
    if final is not None:
        states.append([final.position, final.started, final.complete])
    assert states == f[f"{run}_states"].tolist()
    if run == "sharp":  # the guards act: completion, then a forced EOS
        assert ref_tokens[-1] == EOS and final.force_eos and final.alignment_repetition
        assert f["sharp_forced"][-1] and not f["sharp_forced"][:-1].any()
    else:  # random attention never reaches the end of the text: EOS stays suppressed
        assert final is None and all(a.result.eos_suppressed or a.result.complete for a in out)


@pytest.mark.parametrize("run", ["plain", "sharp"])
def test_probe_weights_and_logits_match_reference(run, t3_fixture, mtl_weights):
    f = t3_fixture
    cfg = T3Config.tiny().multilingual()
    weights = mtl_weights if run == "plain" else alignment.sharpen_aligned_heads(mtl_weights, cfg, SHARPEN_FACTOR)
    t3 = build_t3(weights, cfg)
    from nightingale.models.t3 import AttentionProbe
    from nightingale.models.tokenizer import wrap_text_tokens

    cond_emb = t3.prepare_conditioning(_cond(f))
    text = mx.array(wrap_text_tokens(f["text_ids"].tolist()), dtype=mx.int32)
    i, j = cond_emb.shape[1], cond_emb.shape[1] + text.shape[0]
    probe = AttentionProbe(cfg.alignment_heads)
    logits, cache = t3.prefill(cond_emb, text, probe=probe)
    rows, raw = [], [logits]
    tokens = f[f"{run}_tokens"].tolist()
    for k in range(len(f[f"{run}_attention_rows"])):
        mean = np.stack([np.array(w) for w in probe.weights]).mean(axis=0)
        rows.append(mean[-1, i:j])
        if k + 1 < len(f[f"{run}_attention_rows"]):
            logits, cache = t3.step(tokens[k], k + 1, cache, probe=probe)
            raw.append(logits)
    np.testing.assert_allclose(np.stack(rows), f[f"{run}_attention_rows"], atol=1e-4, rtol=0)
    ref_raw = f[f"{run}_raw_logits"]
    np.testing.assert_allclose(np.stack([np.array(x) for x in raw[: len(ref_raw)]]), ref_raw, atol=ATOL, rtol=RTOL)


def test_probe_does_not_change_the_decode(t3_fixture, mtl_weights):
    cfg = T3Config.tiny().multilingual()
    t3 = build_t3(mtl_weights, cfg)
    cond_emb = t3.prepare_conditioning(_cond(t3_fixture))
    text = mx.array([255, 5, 6, 7, 0], dtype=mx.int32)
    plain, _ = t3.prefill(cond_emb, text)
    probed, _ = t3.prefill(cond_emb, text, probe=alignment.t3_mod.AttentionProbe(cfg.alignment_heads))
    assert np.array_equal(np.array(plain), np.array(probed))


# ---------------------------------------------------------------------------------------
# The analyzer alone, on attention that makes every guard fire


@pytest.mark.parametrize("name", ["long_tail", "repetition", "discontinuity", "false_start", "short_text"])
def test_analyzer_matches_reference(name):
    f = np.load(FIXTURES / "mtl_analyzer.npz")
    cond, eos, s = int(f["cond_len"]), int(f["eos"]), int(f[f"{name}_text_len"])
    prefill, steps = f[f"{name}_prefill"], f[f"{name}_steps"]
    tokens, logits = f[f"{name}_tokens"].tolist(), f[f"{name}_logits"]
    returned, states = f[f"{name}_returned"], f[f"{name}_states"].tolist()
    analyzer = alignment.AlignmentStreamAnalyzer((cond, cond + s), eos)
    raised_at = int(f[f"{name}_raised_at"]) if f"{name}_raised_at" in f else None
    forced = []
    for k in range(len(steps) + 1):
        if k == 0:
            head = np.pad(prefill, ((prefill.shape[1] - 2, 0), (0, 0)))
        else:
            head = steps[k - 1][: prefill.shape[1] + k][None]
        out = analyzer.step([head * 0.5, head * 1.0, head * 1.5], mx.array(logits[k : k + 1]), next_token=tokens[k])
        if raised_at is not None and k >= raised_at:
            # upstream raises here (an empty max); the port reads it as no repetition
            assert not analyzer.last.alignment_repetition
            continue
        np.testing.assert_allclose(np.array(out)[0], returned[k], atol=1e-6, rtol=0)
        assert [analyzer.text_position, analyzer.started, analyzer.complete] == states[k], k
        forced.append(analyzer.last.force_eos)
    expect = {"long_tail": "long_tail", "repetition": "alignment_repetition", "discontinuity": "token_repetition"}
    if name in expect:
        assert any(forced), name
    if name == "short_text":
        assert raised_at is not None  # the reference's own bug, documented in models/alignment.py


# ---------------------------------------------------------------------------------------
# Text positions


def test_segment_origins_survive_collapsed_whitespace():
    from nightingale.models.positions import segment_origins

    text = "  Hello,\n\n world.  Next   one! "
    segments = ["Hello, world.", "Next one!"]
    origins = segment_origins(text, segments)
    for segment, orig in zip(segments, origins):
        assert "".join(text[k] for k in orig).split() == segment.split()


def test_positions_map_to_the_words_of_the_input(mtl_model):
    from nightingale.models.positions import SegmentPositions, segment_origins

    text = "Zażółć gęślą jaźń."
    spans = mtl_model.text_spans(text, "pl")
    assert len(spans) == len(mtl_model.text_tokens(text, "pl")) + 2  # SOT and EOT
    mapper = SegmentPositions(segment_origins("  " + text, [text])[0], spans)
    # the positions of the tokens of the second word give exactly that word
    second = [p for p, (a, b) in enumerate(spans) if b > a and text[a:b].strip() and a >= 7 and b <= 12]
    start, end = mapper.char_range(second)
    assert ("  " + text)[start:end] == "gęślą"
    assert mapper.char_range([0]) == (2, 2)  # SOT: nothing spoken yet
    assert SegmentPositions(list(range(2, 2 + len(text)))).char_range([5]) == (2, 2 + len(text))  # English: the segment


def test_voice_remembers_its_language(mtl_model, tmp_path):
    import soundfile

    from nightingale.models import voice_store

    wav = tmp_path / "ref.wav"
    soundfile.write(wav, np.zeros(2400, dtype=np.float32), 24000)
    info = voice_store.add("amelie", mtl_model.conds, wav, language="FR")
    assert info.language == "fr" and voice_store.info("amelie").language == "fr"
    assert "language fr" in voice_store.describe(info)
    assert mtl_model.resolve_language(None, "amelie") == "fr"
    assert mtl_model.resolve_language("de", "amelie") == "de"  # the request wins
    assert mtl_model.resolve_language(None, None) == "en"
    # older records (no language field) still load
    record = voice_store.voices_dir() / "amelie.json"
    import json

    data = json.loads(record.read_text())
    del data["language"]
    record.write_text(json.dumps(data))
    assert voice_store.info("amelie").language is None and mtl_model.resolve_language(None, "amelie") == "en"


def test_stream_reports_text_ranges_in_order_of_segments(mtl_model):
    text = "Bonjour tout le monde.  Comment allez-vous?"
    chunks = list(mtl_model.stream(text, language="fr", seed=1, max_new_tokens=30))
    assert chunks[-1].is_last
    ranges = [(c.text_start, c.text_end) for c in chunks]
    assert all(0 <= a <= b <= len(text) for a, b in ranges)
    second = text.index("Comment")
    # chunks of the first sentence stay in it, those of the second in it
    firsts = [r for r, c in zip(ranges, chunks) if r[1] <= second]
    seconds = [r for r in ranges if r[0] >= second]
    assert firsts and seconds and len(firsts) + len(seconds) == len(ranges)


def test_aligned_decode_stops_on_cancel(mtl_model):
    import threading

    from nightingale.models.chunks import Cancelled

    cancel = threading.Event()
    tokens = mtl_model.generate_tokens("Bonjour.", language="fr", seed=0, max_new_tokens=50, cancel=cancel)
    next(tokens)
    cancel.set()
    with pytest.raises(Cancelled):
        next(tokens)


# ---------------------------------------------------------------------------------------
# Sentence splitting in every script


@pytest.mark.parametrize("text, expected", [
    ("你好。我是中国人！今天天气很好？好的", ["你好。", "我是中国人！", "今天天气很好？", "好的"]),
    ("東京へ行きます。「はい」と言った。", ["東京へ行きます。", "「はい」と言った。"]),
    ("مرحبا بالعالم؟ كيف حالك. جيد", ["مرحبا بالعالم؟", "كيف حالك.", "جيد"]),
    ("नमस्ते दुनिया। आप कैसे हैं? ठीक॥ हाँ", ["नमस्ते दुनिया।", "आप कैसे हैं?", "ठीक॥", "हाँ"]),
    ("Hello there. How are you?", ["Hello there.", "How are you?"]),
])
def test_sentences_end_in_every_script(text, expected):
    from nightingale.models.streaming import split_text

    assert split_text(text) == expected


def test_long_cjk_and_arabic_sentences_split_at_clauses_without_inventing_spaces():
    from nightingale.models.streaming import split_text

    pieces = split_text("你好，" * 80, max_chars=100)
    assert all(len(p) <= 100 for p in pieces) and "".join(pieces) == "你好，" * 80
    arabic = "، ".join(["كلمة طويلة جدا"] * 30)
    pieces = split_text(arabic, max_chars=100)
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces) == arabic


def test_streamed_cjk_text_is_spoken_sentence_by_sentence():
    from nightingale.daemon.utterance import TextFeed

    feed = TextFeed()
    feed.push("你好。我是中国人！今天")
    assert feed.next_segment(timeout=0.1) == "你好。我是中国人！"
    feed.push("天气很好。")
    feed.end()
    assert feed.next_segment(timeout=0.1) == "今天天气很好。" and feed.next_segment(timeout=0.1) is None
