"""Tokenizer training (rustbpe) and the tiktoken wrapper: round trip, specials, byte lengths."""

import random

import numpy as np
import pytest

from harness import contract, tokenizer

WORDS = [f"{a}{b}{c}" for a in ("al", "be", "co", "du", "ex", "fi") for b in ("ra", "to", "mi", "se") for c in ("n", "st", "ck", "")]


def corpus(n_docs=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(60)) + f" {rng.randint(0, 99999)}." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.train_tokenizer(corpus(), vocab_size=300, folder=directory)
    return tokenizer.Tokenizer.from_directory(directory), directory


@pytest.mark.parametrize("text", ["", "alran bemist", "Unseen words: zebra quokka!", "numbers 1234567 and 3.14159",
                                  "unicode héllo wörld ✓ 🙂 中文", "tabs\tand\nnewlines\n\n  spaces  "])
def test_round_trip(tiny, text):
    tok, _ = tiny
    assert tok.decode(tok.encode(text)) == text


def test_vocab_and_bos(tiny):
    tok, _ = tiny
    assert tok.get_vocab_size() == 300
    bos = tok.get_bos_token_id()
    assert bos == 300 - len(tokenizer.SPECIAL_TOKENS)  # specials sit after the merged tokens
    ids = tok.encode("alran", prepend=bos)
    assert ids[0] == bos and bos not in ids[1:]
    batch = tok.encode(["alran", "bemist"], prepend=bos)
    assert [b[0] for b in batch] == [bos, bos]
    # special-token text in user data is ordinary text, never the BOS id
    assert bos not in tok.encode(tokenizer.BOS_TOKEN)


def test_training_learns_merges(tiny):
    tok, _ = tiny
    frequent = " ".join(WORDS[:5])
    assert len(tok.encode(frequent)) < len(frequent.encode()) / 2  # far fewer tokens than bytes


def test_numbers_split_in_chunks_of_two_digits(tiny):
    tok, _ = tiny
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "".join(pieces) == "1234567"
    assert all(len(p) <= 2 for p in pieces)


def test_token_bytes_match_utf8_lengths(tiny):
    tok, directory = tiny
    token_bytes = np.load(directory / "token_bytes.npy")
    assert token_bytes.shape == (300,)
    for i in range(300 - len(tokenizer.SPECIAL_TOKENS)):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i)), i
    assert (token_bytes[300 - len(tokenizer.SPECIAL_TOKENS):] == 0).all()  # specials carry no bytes


def test_too_little_text_is_refused(tmp_path):
    with pytest.raises(contract.HarnessError, match="too little text"):
        tokenizer.train_tokenizer(["just a few words here"], vocab_size=2000, folder=tmp_path)
    assert not (tmp_path / "tokenizer.pkl").exists()


def test_missing_tokenizer_says_run_prepare(tmp_path):
    with pytest.raises(contract.HarnessError, match="uv run prepare.py"):
        tokenizer.Tokenizer.from_directory(tmp_path)
