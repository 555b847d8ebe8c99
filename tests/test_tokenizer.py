"""Text front end against the reference (`chatterbox.tts.punc_norm`, `EnTokenizer.encode`),
fixture written by tools/fixtures_t3.py with the stand-in tokenizer.json. Exact equality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nightingale.models.tokenizer import (
    EOT,
    SOT,
    EnTokenizer,
    punc_norm,
    stand_in_tokenizer,
    wrap_text_tokens,
    write_stand_in_tokenizer_json,
)

FIXTURE = Path(__file__).parent / "fixtures" / "t3_tokenizer.npz"


@pytest.fixture(scope="module")
def expected() -> dict:
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return write_stand_in_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_punc_norm_matches_reference(expected):
    for text, normed in zip(expected["texts"].tolist(), expected["normed"].tolist()):
        assert punc_norm(text) == normed, repr(text)


def test_punc_norm_edge_cases():
    assert punc_norm("") == "You need to add some text for me to talk."
    assert punc_norm("ßig") == "SSig."  # str.upper expands the first character
    assert punc_norm("a... b") == "A,  b."  # upstream leaves the double space
    assert punc_norm("Wait:") == "Wait,"
    assert punc_norm("“Hi”") == '"Hi".'
    assert punc_norm("x — y") == "X - y."


def test_encode_matches_reference(expected, tokenizer_path):
    tok = EnTokenizer(tokenizer_path)
    offsets = np.concatenate([[0], np.cumsum(expected["ids_lengths"])])
    for i, normed in enumerate(expected["normed"].tolist()):
        assert tok.encode(normed) == expected["ids_flat"][offsets[i] : offsets[i + 1]].tolist(), repr(normed)


def test_stand_in_follows_reference_conventions(tokenizer_path):
    spec = json.loads(tokenizer_path.read_text())
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"]["type"] == "Whitespace"
    assert spec["model"]["type"] == "BPE" and spec["model"]["unk_token"] == "[UNK]"
    vocab = spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(704))
    assert {k: vocab[k] for k in ("[STOP]", "[UNK]", "[SPACE]", "[START]")} == {
        "[STOP]": EOT, "[UNK]": 1, "[SPACE]": 2, "[START]": SOT}
    assert {"[PAD]", "[SEP]", "[CLS]", "[MASK]"} <= set(vocab)
    assert all(ch in vocab for ch in "azAZ09.,!?'\"-")
    # deterministic bytes
    again = tokenizer_path.parent / "again.json"
    write_stand_in_tokenizer_json(again)
    assert again.read_bytes() == tokenizer_path.read_bytes()


def test_encode_uses_space_token_and_merges(tokenizer_path):
    tok = EnTokenizer(tokenizer_path)
    ids = tok.encode("the cat")
    assert 2 in ids and len(ids) < len("the cat")  # [SPACE] and at least one merge
    assert tok.decode(ids) == "the cat"
    assert tok.encode("é") == [1]  # no byte fallback: unknown -> [UNK]
    assert wrap_text_tokens(ids) == [SOT, *ids, EOT]


def test_tokenizer_without_start_is_rejected(tmp_path):
    spec = json.loads(stand_in_tokenizer().to_str())
    del spec["model"]["vocab"]["[START]"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[START]"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"\[START\]"):
        EnTokenizer(path)
