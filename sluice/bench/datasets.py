"""Benchmark workloads: random prompts of exact token lengths, alone or behind shared prefixes.

The in-process benchmarks feed token ids straight to the engine, so any non-special id will do.
A server gets text and tokenizes it again, so text prompts are built only from tokens that come
back as themselves: a space followed by ASCII letters. Pre-tokenizers cut text before every such
run, so the decoded text of any sequence of these tokens encodes to the same sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from sluice.loaders.gguf import open_gguf
from sluice.loaders.model_path import resolve_model
from sluice.loaders.tokenizer import Tokenizer


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. For text prompts, `prompt_ids` is `text` as the model's
    tokenizer encodes it, special tokens included: what a server will prefill."""

    prompt_ids: list[int]
    output_len: int
    text: str | None = None  # None: a token-id prompt for the in-process benchmarks

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def load_tokenizer(model: str | None) -> Tokenizer:
    """The tokenizer of a model alias, .gguf file or HF folder, without loading its weights."""
    path = resolve_model(model)
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(open_gguf(path))
    return Tokenizer.from_hf_folder(path)


def draw_length(rng: random.Random, full_len: int, range_ratio: float) -> int:
    """Uniform in [full_len * range_ratio, full_len], at least 1 (SGLang's bench_serving rule)."""
    return rng.randint(max(1, int(full_len * range_ratio)), full_len)


def random_id_requests(
    tokenizer: Tokenizer,
    num_requests: int,
    input_lens: tuple[int, int],
    output_lens: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """Token-id prompts of non-special tokens, lengths uniform in the inclusive ranges."""
    rng = random.Random(seed)
    pool = [t for t in range(tokenizer.vocab_size) if not tokenizer.is_special(t)]
    return [
        BenchRequest(rng.choices(pool, k=rng.randint(*input_lens)), rng.randint(*output_lens))
        for _ in range(num_requests)
    ]


class TextPromptSampler:
    """Builds text prompts whose encoding, special tokens included, has an exact length."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.pool = round_trip_token_ids(tokenizer)
        if not self.pool:
            raise ValueError("the tokenizer has no space-then-letters tokens to build prompts from")
        with_special = tokenizer.encode("a")
        self.num_special_tokens = len(with_special) - len(
            tokenizer.encode("a", add_special_tokens=False)
        )

    def random_ids(self, length: int) -> list[int]:
        return self.rng.choices(self.pool, k=length)

    def prefix_ids(self, length: int) -> list[int]:
        """The ids that start a prompt of `length` tokens: the server adds its bos/eos to them."""
        return self.random_ids(max(1, length - self.num_special_tokens))

    def request(self, body_ids: list[int], output_len: int) -> BenchRequest:
        text = self.tokenizer.decode(body_ids)
        return BenchRequest(self.tokenizer.encode(text), output_len, text)


def round_trip_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that encode back to themselves alone when written after a space: byte-level BPE
    tokens spelled as a space then ASCII letters, or whole ASCII words of a word-level vocabulary
    (whose decoder puts the spaces between them)."""
    pool = []
    for token_id in range(tokenizer.vocab_size):
        if tokenizer.is_special(token_id) or not _is_plain_word(tokenizer.token_bytes(token_id)):
            continue
        word = tokenizer.token_bytes(token_id).removeprefix(b" ").decode()
        if tokenizer.encode(" " + word, add_special_tokens=False) == [token_id]:
            pool.append(token_id)
    return pool


def _is_plain_word(spelling: bytes) -> bool:
    if spelling[:1] == b" ":
        return spelling[1:].isascii() and spelling[1:].isalpha()
    return spelling.isascii() and spelling.isalnum()


@dataclass(frozen=True)
class RandomDataset:
    """Independent random prompts; input and output lengths each drawn from [len * ratio, len]."""

    name: ClassVar[str] = "random"
    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 1024
    range_ratio: float = 0.0

    def build(self, tokenizer: Tokenizer, seed: int) -> list[BenchRequest]:
        sampler = TextPromptSampler(tokenizer, seed)
        requests = []
        for _ in range(self.num_prompts):
            input_len = draw_length(sampler.rng, self.input_len, self.range_ratio)
            output_len = draw_length(sampler.rng, self.output_len, self.range_ratio)
            requests.append(sampler.request(sampler.prefix_ids(input_len), output_len))
        return requests


@dataclass(frozen=True)
class SharedPrefixDataset:
    """SGLang's generated-shared-prefix workload: `num_groups` random system prompts, each
    followed by `prompts_per_group` random questions of their own. A prompt is
    system_prompt_len + question_len tokens; requests of all groups arrive shuffled together."""

    name: ClassVar[str] = "generated-shared-prefix"
    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256

    def build(self, tokenizer: Tokenizer, seed: int) -> list[BenchRequest]:
        sampler = TextPromptSampler(tokenizer, seed)
        requests = []
        for _ in range(self.num_groups):
            system_ids = sampler.prefix_ids(self.system_prompt_len)
            requests += [
                sampler.request(system_ids + sampler.random_ids(self.question_len), self.output_len)
                for _ in range(self.prompts_per_group)
            ]
        # Interleaved groups make a prefix cache hold many prefixes at once, as real traffic does.
        sampler.rng.shuffle(requests)
        return requests


Dataset = RandomDataset | SharedPrefixDataset


@dataclass(frozen=True)
class MixedWorkload:
    """Steady decodes with long prompts arriving among them, the load prefill/decode
    disaggregation is for: short prompts with long outputs (a load generator keeps a fixed
    number of them in flight) and prompts of `long_input_min`..`long_input_max` tokens with short
    outputs. `num_decodes` is a supply to draw from: the load decides how many run."""

    num_decodes: int = 512
    decode_input_len: int = 64
    decode_output_len: int = 128
    num_long_prompts: int = 6
    long_input_min: int = 1024
    long_input_max: int = 2048
    long_output_len: int = 16

    def build(
        self, tokenizer: Tokenizer, seed: int
    ) -> tuple[list[BenchRequest], list[BenchRequest], list[BenchRequest]]:
        """(decodes, long prompts, warmups): the warmups are a decode's and the shortest long
        prompt's lengths, prompts of their own."""
        sampler = TextPromptSampler(tokenizer, seed)
        warmups = [
            sampler.request(sampler.prefix_ids(length), 4)
            for length in (self.decode_input_len, self.long_input_min)
        ]
        decodes = [
            sampler.request(sampler.prefix_ids(self.decode_input_len), self.decode_output_len)
            for _ in range(self.num_decodes)
        ]
        long_prompts = [
            sampler.request(
                sampler.prefix_ids(sampler.rng.randint(self.long_input_min, self.long_input_max)),
                self.long_output_len,
            )
            for _ in range(self.num_long_prompts)
        ]
        return decodes, long_prompts, warmups
