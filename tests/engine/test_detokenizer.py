"""Streaming detokenization: deltas add up to the full decode, and never show half a character."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sluice.engine.detokenizer import IncrementalDetokenizer
from sluice.loaders.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "héllo wörld, ça va? naïve café",
    "e\u0301 a\u0308 n\u0303 combining marks: Z\u0351\u0352\u0353algo",
    "你好，世界！日本語のテキストと한국어",
    "emoji 😀 then 👍🏽 then 👨‍👩‍👧‍👦 then 🇫🇷 and ❤️🤖",
    "spaces   and\ttabs\n\nand newlines 123 4567  ",
    "mixed: 数字123 😀😀😀 ✓ ∑ ≠ ½ ²",
]


class DecodeSpy:
    """Our tokenizer, recording the longest id list each decode is asked for."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    """A Llama-style vocabulary trained on English only, so CJK and emoji fall back to bytes."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["Hello, world! The quick brown fox jumps over it."] * 4, trainer)
    state = json.loads(backend.to_str())["model"]
    vocab = dict(state["vocab"])
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    merges = [tuple(merge) for merge in state["merges"]]
    byte_fallback = BackendTokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    byte_fallback.add_special_tokens(["<unk>", "<s>", "</s>"])
    byte_fallback.pre_tokenizer = backend.pre_tokenizer
    byte_fallback.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return Tokenizer(byte_fallback, special_token_ids={"bos_token": 1, "eos_token": 2})


@pytest.fixture(params=["smollm", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_decode_without_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_split_characters_are_held_until_complete(smollm: Tokenizer) -> None:
    ids = smollm.encode("a😀", add_special_tokens=False)
    assert [smollm.token_bytes(i) for i in ids] == [b"a", b"\xf0\x9f", b"\x98", b"\x80"]
    assert stream(smollm, ids) == ["a", "", "", "😀", ""]


def byte_token(tokenizer: Tokenizer, byte: int) -> int:
    """The id of the token that is this one byte alone."""
    return next(i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i) == bytes([byte]))


def test_byte_fallback_runs_are_held_until_they_end(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("Hello 你 fox", add_special_tokens=False)
    assert [sentencepiece.token_bytes(i) for i in ids[3:8]] == [
        b" ",
        b"\xe4",
        b"\xbd",
        b"\xa0",
        b" ",
    ]
    assert [sentencepiece.is_fallback_byte(i) for i in ids[3:8]] == [False, True, True, True, False]
    assert stream(sentencepiece, ids) == ["He", "ll", "o", " ", "", "", "", "你 ", "fo", "x", ""]


def test_bad_byte_after_a_complete_character(sentencepiece: Tokenizer) -> None:
    """Decoding renders a byte-fallback run with one bad byte as U+FFFD for every byte, even the
    bytes of a character that was already complete: the stream must not have shown it yet."""
    ids = sentencepiece.encode("你", add_special_tokens=False)
    ids += [
        byte_token(sentencepiece, 0xA9),
        *sentencepiece.encode(" fox", add_special_tokens=False),
    ]
    assert sentencepiece.decode(ids).startswith("\ufffd" * 4)
    assert "".join(stream(sentencepiece, ids)) == sentencepiece.decode(ids)


def test_sentencepiece_keeps_spaces_after_the_first_token(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("Hello world fox", add_special_tokens=False)
    assert sentencepiece.token_bytes(ids[0]) == b" He"
    deltas = stream(sentencepiece, ids)
    # The prefix space is stripped once, as decode does; later tokens keep theirs.
    assert deltas[:5] == ["He", "ll", "o", " ", "wor"]
    assert "".join(deltas) == "Hello world fox"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(smollm: Tokenizer, skip_special_tokens: bool) -> None:
    ids = smollm.encode("<|im_start|>assistant\nHi 😀<|im_end|>", add_special_tokens=False)
    deltas = stream(smollm, ids, skip_special_tokens)
    assert "".join(deltas) == smollm.decode(ids, skip_special_tokens)
    assert ("<|im_end|>" in deltas) is not skip_special_tokens


def test_invalid_bytes_and_a_final_replacement_char_are_flushed(smollm: Tokenizer) -> None:
    """A lone continuation byte decodes to U+FFFD; at the end of the stream only `flush` shows it
    (tokenizers' DecodeStream would drop it)."""
    stray = [byte_token(smollm, 0xA9)]
    ids = smollm.encode("ok", add_special_tokens=False) + stray
    assert stream(smollm, ids)[-2:] == ["", "\ufffd"]
    ids = stray + smollm.encode(" then text", add_special_tokens=False)
    assert "".join(stream(smollm, ids)) == smollm.decode(ids) == "\ufffd then text"


def test_random_token_streams_add_up_to_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip), ids


def test_each_step_decodes_a_short_window(smollm: Tokenizer) -> None:
    ids = smollm.encode(" ".join(TEXTS * 20), add_special_tokens=False)
    spy = DecodeSpy(smollm)
    deltas = stream(spy, ids)  # type: ignore[arg-type]
    assert "".join(deltas) == smollm.decode(ids)
    assert len(ids) > 1000
    assert spy.longest <= 8
