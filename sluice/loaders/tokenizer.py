"""Text <-> token ids: a `tokenizers.Tokenizer` built from GGUF metadata or an HF checkpoint folder.

A GGUF has no tokenizer.json. llama.cpp stores the vocabulary, the merges (or scores), each token's
type and the special ids as metadata, and we rebuild the tokenizer they describe the way
transformers' GGUF converter does, so the ids match it. We part from that converter in two places,
both where it departs from llama.cpp and from the model's own tokenizer.json:

- `tokenizer.ggml.pre = smollm` (the StarCoder family) splits every digit off first, so a run of
  spaces before a digit stays one token; transformers uses the plain GPT-2 split there.
- `tokenizer.ggml.add_space_prefix = false` turns the SentencePiece prefix space off; transformers
  ignores the key and always adds it.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from sluice.loaders.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    content_spans,
    render_chat_template,
)
from sluice.loaders.gguf_file import GGUFFile
from sluice.sampling_params import InvalidParameterError

logger = logging.getLogger(__name__)

_KEYS = gguf.Keys.Tokenizer

# Role names as chat templates see them, and the GGUF key holding each role's token id.
_SPECIAL_TOKEN_KEYS = {
    "bos_token": _KEYS.BOS_ID,
    "eos_token": _KEYS.EOS_ID,
    "unk_token": _KEYS.UNK_ID,
    "pad_token": _KEYS.PAD_ID,
}

# Special tokens that close a turn or a document in the chat formats we know. Generating one ends
# the reply even when the file names another token as eos; llama.cpp keeps a similar list. Not
# Phi-3's `<|end|>`: gpt-oss ends its reasoning with it and goes on.
_END_OF_GENERATION_TOKENS = frozenset(
    {
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<|return|>",
        "<｜end▁of▁sentence｜>",
        "<EOT>",
    }
)

_SPACE_MARK = "\u2581"  # SentencePiece's visible space, "▁"
# Stands in for a special token of the template's own while text around it is encoded with
# special-token strings spelled out: a Unicode noncharacter, for internal use.
_SPECIAL_MARK = "\ufdd2{}\ufdd3"
# How much a normalizer (NFC composing accents or Hangul jamo, ...) may shorten a text, at most.
_NORMALIZER_SHRINK = 4
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [byte for byte in range(256) if byte not in printable]
    spelling = {byte: chr(byte) for byte in printable}
    spelling.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return spelling


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_CHAR_TO_BYTE = {char: byte for byte, char in _BYTE_TO_CHAR.items()}

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as the models' tokenizer.json files (and
# llama.cpp) have them. Names not listed use GPT-2's split, built into `ByteLevel`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
# llama.cpp splits these on `\p{N}` before the GPT-2 regex, as their tokenizer.json's `Digits`
# pre-tokenizer does.
_DIGIT_FIRST_PRE_TOKENIZERS = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
_GPT2_PRE_TOKENIZERS = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})


class Tokenizer:
    """Encodes text to token ids and back, and renders chat prompts, for one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_token_ids: dict[str, int],
        end_of_generation_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        """`special_token_ids` maps `bos_token`/`eos_token`/`unk_token`/`pad_token` to ids;
        `end_of_generation_ids` are further ids the model file says end a reply."""
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._special_token_ids = dict(special_token_ids)
        self._added_tokens = backend.get_added_tokens_decoder()
        decoder_kinds = _decoder_kinds(backend.decoder)
        self._piece_to_bytes = _piece_decoding(decoder_kinds)
        self._fallback_byte_ids = _fallback_byte_ids(backend, decoder_kinds)
        self._chat_template = chat_template
        self._eos_token_ids = self._end_of_generation_ids(end_of_generation_ids)

    @classmethod
    def from_gguf(cls, reader: GGUFFile) -> Tokenizer:
        """The tokenizer a GGUF file's `tokenizer.*` metadata describes."""
        model = reader.metadata.get(_KEYS.MODEL)
        tokens: list[str] = reader.metadata.get(_KEYS.LIST)
        merges = _gguf_merges(reader, tokens)
        if model == "gpt2":
            backend = _byte_level_bpe(tokens, merges, reader.metadata.get(_KEYS.PRE, "default"))
        elif model == "llama":
            unk_id = reader.metadata.get(_KEYS.UNK_ID)
            backend = _sentencepiece_bpe(
                tokens,
                merges,
                unk_token=None if unk_id is None else tokens[unk_id],
                add_space_prefix=reader.metadata.get(_KEYS.ADD_PREFIX, True),
            )
        else:
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r}: expected 'gpt2' or 'llama'"
            )
        # Some converters write a padding id past the vocabulary; such an id names no token.
        special_ids = {
            role: token_id
            for role, key in _SPECIAL_TOKEN_KEYS.items()
            if (token_id := reader.metadata.get(key)) is not None and token_id < len(tokens)
        }
        _add_gguf_added_tokens(backend, tokens, reader.metadata.get(_KEYS.TOKEN_TYPE, []), model)
        _add_special_tokens(backend, special_ids.values())
        # llama.cpp adds BOS for a SentencePiece vocabulary whose file does not say otherwise.
        add_bos = reader.metadata.get(_KEYS.ADD_BOS, model == "llama")
        add_eos = reader.metadata.get(_KEYS.ADD_EOS, False)
        backend.post_processor = _bos_eos_processor(
            backend,
            special_ids.get("bos_token") if add_bos else None,
            special_ids.get("eos_token") if add_eos else None,
        )
        turn_end_ids = [reader.metadata.get(key) for key in (_KEYS.EOT_ID, _KEYS.EOM_ID)]
        return cls(
            backend,
            special_token_ids=special_ids,
            end_of_generation_ids=[token_id for token_id in turn_end_ids if token_id is not None],
            chat_template=reader.metadata.get(_KEYS.CHAT_TEMPLATE),
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of an HF checkpoint folder: tokenizer.json plus tokenizer_config.json,
        with eos ids also taken from generation_config.json and config.json."""
        folder = Path(path)
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        special_ids = {
            role: token_id
            for role in _SPECIAL_TOKEN_KEYS
            if (token := _token_content(config.get(role))) is not None
            and (token_id := backend.token_to_id(token)) is not None
        }
        _add_special_tokens(backend, special_ids.values())
        # tokenizer.json's post-processor decides bos/eos, as in transformers 5; the config's
        # add_*_token flags only fill in for a tokenizer.json without one (transformers 5 ignores
        # them even then).
        if backend.post_processor is None:
            backend.post_processor = _bos_eos_processor(
                backend,
                special_ids.get("bos_token") if config.get("add_bos_token") else None,
                special_ids.get("eos_token") if config.get("add_eos_token") else None,
            )
        eos_ids = [
            token_id
            for name in ("generation_config.json", "config.json")
            for token_id in _as_list(_read_json(folder / name).get("eos_token_id"))
        ]
        return cls(
            backend,
            special_token_ids=special_ids,
            end_of_generation_ids=eos_ids,
            chat_template=_hf_chat_template(folder, config),
        )

    def save_hf_folder(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, which `from_hf_folder` reads back into
        the same tokenizer (eos ids beyond eos_token go in the model's config.json)."""
        folder = Path(folder)
        self._backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            role: self._backend.id_to_token(token_id)
            for role, token_id in self._special_token_ids.items()
        }
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_token_ids.get("bos_token")

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: eos, the file's end-of-turn ids and known turn ends."""
        return set(self._eos_token_ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the bos/eos the model file asks for.
        Special-token strings in `text` (like `<|im_start|>`) become their single ids. Raises
        InvalidParameterError("prompt") for text that is not valid Unicode."""
        check_unicode(text)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def max_chars(self, num_tokens: int) -> int:
        """A text longer than this has more than `num_tokens` tokens, whatever it holds: no token
        stands for more characters than the longest token has bytes. Lets a caller refuse a huge
        text without the time it takes to tokenize it."""
        return num_tokens * self._max_token_bytes

    @functools.cached_property
    def _max_token_bytes(self) -> int:
        longest = max(len(self.token_bytes(token_id)) for token_id in range(self.vocab_size))
        return longest * (_NORMALIZER_SHRINK if self._backend.normalizer is not None else 1)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether the token is special (a control token), which `skip_special_tokens` drops."""
        added = self._added_tokens.get(token_id)
        return added is not None and added.special

    def is_fallback_byte(self, token_id: int) -> bool:
        """Whether the token is a `<0xNN>` byte of a byte-fallback vocabulary. Decoding renders a
        run of them as one: valid UTF-8, or one U+FFFD per byte if any byte in the run is bad."""
        return token_id in self._fallback_byte_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token adds to the text; a token may hold part of a character."""
        added = self._added_tokens.get(token_id)
        if added is not None:
            return added.content.encode()
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        if self._piece_to_bytes is None:
            return self.decode([token_id], skip_special_tokens=False).encode()
        return self._piece_to_bytes(piece)

    def id_to_token(self, token_id: int) -> str:
        """The text of one token, leading space included (as logprobs show it). A token holding
        part of a multi-byte character shows as U+FFFD; `token_bytes` gives its exact bytes."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        allow_special_tokens_in_content: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the chat prompt for `messages` (see `apply_chat_template`).

        Only the template's own text becomes special tokens: `<|im_end|>` written in a message's
        content is encoded as text, so a user cannot close their turn and forge a system one,
        unless `allow_special_tokens_in_content`. Ordinary content encodes exactly as the whole
        rendered prompt does. Raises InvalidParameterError("messages") for content that holds
        special-token text where the template does not copy content verbatim. Invalid Unicode in a
        message's content is an InvalidParameterError naming it, `messages[i].content`.
        """
        for index, message in enumerate(messages):
            for path, content in _content_texts(message.get("content")):
                check_unicode(content, f"messages[{index}].content{path}")
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        check_unicode(text)
        # The template already writes any BOS it wants; do not add a second one.
        encoding = self._backend.encode(text, add_special_tokens=False)
        special = [
            (start, end, token_id)
            for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
            if self.is_special(token_id)
        ]
        if allow_special_tokens_in_content or not special:
            return encoding.ids
        spans = content_spans(
            self._chat_template or DEFAULT_CHAT_TEMPLATE,
            messages,
            text,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_token_names(),
            **kwargs,
        )
        if spans is None:
            return self._refuse_special_content(messages, encoding.ids)
        in_template = [
            (start, end, token_id)
            for start, end, token_id in special
            if not _overlaps_any(start, end, spans)
        ]
        if len(in_template) == len(special):
            return encoding.ids
        return self._encode_special_as_text(text, in_template)

    def _refuse_special_content(self, messages: list[dict[str, Any]], ids: list[int]) -> list[int]:
        """When contents cannot be located in the prompt, one holding special tokens is refused."""
        for index, message in enumerate(messages):
            for path, content in _content_texts(message.get("content")):
                content_ids = self._backend.encode(content, add_special_tokens=False).ids
                if any(self.is_special(token_id) for token_id in content_ids):
                    raise InvalidParameterError(
                        "messages",
                        f"messages[{index}].content{path} holds special-token text, which this "
                        "model's chat template does not let sluice keep apart from its own",
                    )
        return ids

    def _encode_special_as_text(self, text: str, kept: list[tuple[int, int, int]]) -> list[int]:
        """Ids of `text` with special-token strings encoded as text, but for the occurrences in
        `kept` (start, end, id), which stay special tokens. One encode call, so the text between
        them tokenizes as it would around real special tokens."""
        if "\ufdd2" in text:
            raise InvalidParameterError("messages", "the text holds U+FDD2, which sluice reserves")
        marked, position = [], 0
        for start, end, token_id in kept:
            marked += [text[position:start], _SPECIAL_MARK.format(token_id)]
            position = end
        marked.append(text[position:])
        backend, mark_ids = self._special_as_text_backend
        ids = backend.encode("".join(marked), add_special_tokens=False).ids
        return [mark_ids.get(token_id, token_id) for token_id in ids]

    @functools.cached_property
    def _special_as_text_backend(self) -> tuple[BackendTokenizer, dict[int, int]]:
        """A copy of the tokenizer that spells special tokens out as text, with a mark per special
        token (matched as the token is: same stripping) and a map from marks' ids to tokens'."""
        backend = BackendTokenizer.from_str(self._backend.to_str())
        backend.encode_special_tokens = True
        specials = {i: token for i, token in self._added_tokens.items() if token.special}
        backend.add_tokens(
            [
                AddedToken(
                    _SPECIAL_MARK.format(token_id),
                    single_word=token.single_word,
                    lstrip=token.lstrip,
                    rstrip=token.rstrip,
                    normalized=token.normalized,
                    special=False,
                )
                for token_id, token in specials.items()
            ]
        )
        mark_ids = {backend.token_to_id(_SPECIAL_MARK.format(i)): i for i in specials}
        return backend, mark_ids

    def special_token_names(self) -> dict[str, str]:
        return {
            role: self._backend.id_to_token(token_id)
            for role, token_id in self._special_token_ids.items()
        }

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt for `messages`, rendered with the model's template (or ChatML if it has
        none). `kwargs` become template variables, e.g. `tools` or `enable_thinking`."""
        return render_chat_template(
            self._chat_template or DEFAULT_CHAT_TEMPLATE,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_token_names(),
            **kwargs,
        )

    def _end_of_generation_ids(self, file_ids: Iterable[int]) -> frozenset[int]:
        ids = set(file_ids)
        if "eos_token" in self._special_token_ids:
            ids.add(self._special_token_ids["eos_token"])
        ids.update(
            token_id
            for token_id, token in self._added_tokens.items()
            if token.special and token.content in _END_OF_GENERATION_TOKENS
        )
        return frozenset(ids)


def check_unicode(text: str, param: str = "prompt") -> None:
    """InvalidParameterError(`param`) naming the first lone surrogate (like "\\ud800", which JSON
    can carry but no UTF-8 text can) and where it is; the tokenizer would raise a bare TypeError."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidParameterError(
            param,
            f"the text is not valid Unicode: a lone surrogate U+{ord(text[error.start]):04X} "
            f"at character {error.start}",
        ) from None


def _overlaps_any(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether [start, end) overlaps one of `spans`, which are sorted and do not overlap: a binary
    search, so that a conversation of many messages costs no more than its length."""
    index = bisect.bisect_right(spans, start, key=lambda span: span[1])
    return index < len(spans) and spans[index][0] < end


def _content_texts(content: Any) -> Iterable[tuple[str, str]]:
    """(path, text) of a message's content: one string, or OpenAI's text parts."""
    if isinstance(content, str):
        yield "", content
    elif isinstance(content, list):
        for index, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield f"[{index}].text", part["text"]


def _gguf_merges(reader: GGUFFile, tokens: list[str]) -> list[tuple[str, str]]:
    merges = reader.metadata.get(_KEYS.MERGES)
    if merges is not None:
        return [tuple(merge.split(" ", 1)) for merge in merges]
    return _merges_from_vocabulary(tokens, reader.metadata.get(_KEYS.SCORES))


def _merges_from_vocabulary(
    tokens: Sequence[str], scores: Sequence[float] | None
) -> list[tuple[str, str]]:
    """BPE merges for a vocabulary stored without them (SentencePiece GGUFs).

    Every way to cut a token into two tokens is a merge, ranked by the token's score, best first
    (or by its id, lowest first, without scores); ties go to the longer left then right piece.
    Same order as transformers' `generate_merges`, so the two tokenize alike.
    """
    ids = {token: index for index, token in enumerate(tokens)}
    ranks = dict(zip(tokens, scores, strict=True)) if scores is not None else ids
    merges: list[tuple[str, str, float]] = []
    for token, rank in ranks.items():
        cuts = [
            (token[:cut], token[cut:], rank)
            for cut in range(1, len(token))
            if token[:cut] in ids and token[cut:] in ids
        ]
        merges.extend(sorted(cuts, key=lambda merge: (ids[merge[0]], ids[merge[1]])))
    merges.sort(
        key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=scores is not None
    )
    return [(left, right) for left, right, _ in merges]


def _byte_level_bpe(
    tokens: Sequence[str], merges: list[tuple[str, str]], pre: str
) -> BackendTokenizer:
    # A token spelled outside the byte alphabet (llama.cpp writes some added tokens as plain text)
    # is respelled byte by byte, so the BPE model can produce it.
    vocab = {_byte_level_spelling(token): index for index, token in enumerate(tokens)}
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_spelling(token: str) -> str:
    if set(token) <= _CHAR_TO_BYTE.keys():
        return token
    return "".join(_BYTE_TO_CHAR[byte] for byte in token.encode())


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGIT_FIRST_PRE_TOKENIZERS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        if pre not in _GPT2_PRE_TOKENIZERS:
            logger.warning("unknown GGUF pre-tokenizer %r: splitting text as GPT-2 does", pre)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_bpe(
    tokens: Sequence[str],
    merges: list[tuple[str, str]],
    *,
    unk_token: str | None,
    add_space_prefix: bool,
) -> BackendTokenizer:
    """SentencePiece BPE: `▁` for spaces, `<0xNN>` tokens for bytes missing from the vocabulary."""
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    # "first": the prefix space goes before the text, not after every special token inside it.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE_MARK,
        prepend_scheme="first" if add_space_prefix else "never",
        split=False,
    )
    steps = [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_gguf_added_tokens(
    backend: BackendTokenizer, tokens: Sequence[str], token_types: Sequence[int], model: str
) -> None:
    """Register CONTROL tokens as special and USER_DEFINED ones (like `<think>`) as plain added
    tokens: both are matched whole in the text instead of being cut into pieces."""
    control, user_defined = [], []
    # Files without token types have no added tokens: zip stops at the empty list.
    for token, token_type in zip(tokens, token_types, strict=False):
        if token_type == gguf.TokenType.CONTROL:
            # In a byte-level vocabulary a control token outside the byte alphabet is a llama.cpp
            # mislabel; transformers skips those too.
            if model != "gpt2" or set(token) <= _CHAR_TO_BYTE.keys():
                control.append(AddedToken(token, normalized=False, special=True))
        elif token_type == gguf.TokenType.USER_DEFINED and backend.token_to_id(token) is not None:
            user_defined.append(AddedToken(token, normalized=False, special=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user_defined)


def _add_special_tokens(backend: BackendTokenizer, token_ids: Iterable[int]) -> None:
    """Make the bos/eos/unk/pad tokens special (matched whole, skipped on decode), as transformers
    does for its named special tokens."""
    added = backend.get_added_tokens_decoder()
    backend.add_special_tokens(
        [
            AddedToken(backend.id_to_token(token_id), normalized=False, special=True)
            for token_id in token_ids
            if token_id not in added and backend.id_to_token(token_id) is not None
        ]
    )


def _bos_eos_processor(
    backend: BackendTokenizer, bos_id: int | None, eos_id: int | None
) -> processors.TemplateProcessing:
    """Wraps each encoded text in bos/eos when `add_special_tokens` is on."""
    bos = [] if bos_id is None else [(backend.id_to_token(bos_id), bos_id)]
    eos = [] if eos_id is None else [(backend.id_to_token(eos_id), eos_id)]
    return processors.TemplateProcessing(
        single=[token for token, _ in bos] + ["$A"] + [token for token, _ in eos],
        special_tokens=bos + eos,
    )


def _decoder_kinds(decoder: decoders.Decoder | None) -> set[str]:
    """The types of the decoder's steps, e.g. {"Sequence", "Replace", "ByteFallback"}."""
    if decoder is None:
        return set()
    return set(re.findall(r'"type":\s*"(\w+)"', decoder.__getstate__().decode()))


def _piece_decoding(decoder_kinds: set[str]) -> Callable[[str], bytes] | None:
    """How a vocabulary piece spells its bytes; None when the decoder is of a kind where only
    decoding the token tells."""
    if "ByteLevel" in decoder_kinds:
        return _byte_level_piece_bytes
    if decoder_kinds & {"ByteFallback", "Metaspace"}:
        return _sentencepiece_piece_bytes
    return None


def _fallback_byte_ids(backend: BackendTokenizer, decoder_kinds: set[str]) -> frozenset[int]:
    if "ByteFallback" not in decoder_kinds:
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(token_id for piece, token_id in vocab.items() if _BYTE_PIECE.fullmatch(piece))


def _byte_level_piece_bytes(piece: str) -> bytes:
    if set(piece) <= _CHAR_TO_BYTE.keys():
        return bytes(_CHAR_TO_BYTE[char] for char in piece)
    return piece.encode()


def _sentencepiece_piece_bytes(piece: str) -> bytes:
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte is not None:
        return bytes([int(byte.group(1), 16)])
    return piece.replace(_SPACE_MARK, " ").encode()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _hf_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """Newer checkpoints keep the template in chat_template.jinja; older ones in the config, either
    as one string or as a list of named templates, of which we take "default"."""
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template
