"""Workloads: exact token lengths after the server's decode -> encode, shared prefixes, seeds."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sluice.bench.datasets import (
    MixedWorkload,
    RandomDataset,
    SharedPrefixDataset,
    draw_length,
    load_tokenizer,
    random_id_requests,
    round_trip_token_ids,
)
from sluice.loaders.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The default model's (SmolLM2, byte-level BPE, no BOS)."""
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory) -> Tokenizer:
    """A small byte-level BPE that adds a BOS, loaded as an HF folder."""
    folder: Path = tmp_path_factory.mktemp("bos_tokenizer")
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog while seven wizards quietly hum"] * 20
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text("{}")
    return load_tokenizer(str(folder))


def test_round_trip_tokens_encode_to_themselves(tokenizer: Tokenizer) -> None:
    pool = round_trip_token_ids(tokenizer)
    assert len(pool) > 10_000
    assert not any(tokenizer.is_special(t) for t in pool)
    for token_id in pool[::500]:
        assert tokenizer.encode(tokenizer.decode([token_id])) == [token_id]


@pytest.mark.parametrize("length", [1, 7, 300])
def test_random_prompts_have_exact_length_after_decode_encode(
    tokenizer: Tokenizer, length: int
) -> None:
    requests = RandomDataset(20, input_len=length, output_len=5, range_ratio=1.0).build(
        tokenizer, seed=3
    )
    for request in requests:
        assert len(tokenizer.encode(request.text)) == request.prompt_len == length
        assert request.output_len == 5


def test_random_lengths_are_drawn_from_ratio_to_full(tokenizer: Tokenizer) -> None:
    requests = RandomDataset(200, input_len=40, output_len=20, range_ratio=0.5).build(
        tokenizer, seed=0
    )
    input_lens = {len(tokenizer.encode(r.text)) for r in requests}
    output_lens = {r.output_len for r in requests}
    assert min(input_lens) >= 20 and max(input_lens) == 40 and len(input_lens) > 10
    assert min(output_lens) >= 10 and max(output_lens) == 20 and len(output_lens) > 5


def test_draw_length_bounds() -> None:
    rng = random.Random(0)
    assert {draw_length(rng, 8, 0.0) for _ in range(500)} == set(range(1, 9))
    assert {draw_length(rng, 8, 1.0) for _ in range(50)} == {8}


def test_bos_counts_toward_the_prompt_length(bos_tokenizer: Tokenizer) -> None:
    bos = bos_tokenizer.bos_token_id
    requests = RandomDataset(10, input_len=12, output_len=3, range_ratio=1.0).build(
        bos_tokenizer, seed=1
    )
    for request in requests:
        encoded = bos_tokenizer.encode(request.text)
        assert encoded == request.prompt_ids
        assert len(encoded) == 12 and encoded[0] == bos and bos not in encoded[1:]


def test_shared_prefix_groups(tokenizer: Tokenizer) -> None:
    spec = SharedPrefixDataset(
        num_groups=3, prompts_per_group=4, system_prompt_len=30, question_len=6, output_len=9
    )
    requests = spec.build(tokenizer, seed=5)
    assert len(requests) == 12
    groups = defaultdict(list)
    for request in requests:
        ids = tokenizer.encode(request.text)
        assert len(ids) == request.prompt_len == 36
        assert request.output_len == 9
        groups[tuple(ids[:30])].append(ids[30:])
    assert len(groups) == 3  # one system prompt per group, shared by all its prompts
    assert all(len(questions) == 4 for questions in groups.values())
    assert len({tuple(q) for questions in groups.values() for q in questions}) == 12
    first_group = tuple(tokenizer.encode(requests[0].text)[:30])
    positions = [i for i, r in enumerate(requests) if r.prompt_ids[:30] == list(first_group)]
    assert positions != list(range(positions[0], positions[0] + 4))  # shuffled, not in runs


@pytest.mark.parametrize(
    "spec", [RandomDataset(8, 20, 4, 0.5), SharedPrefixDataset(2, 3, 10, 4, 4)], ids=str
)
def test_seeds_are_reproducible(tokenizer: Tokenizer, spec) -> None:
    assert spec.build(tokenizer, seed=7) == spec.build(tokenizer, seed=7)
    assert spec.build(tokenizer, seed=7) != spec.build(tokenizer, seed=8)


def test_random_id_requests(tokenizer: Tokenizer) -> None:
    requests = random_id_requests(tokenizer, 50, (3, 9), (2, 4), seed=11)
    assert requests == random_id_requests(tokenizer, 50, (3, 9), (2, 4), seed=11)
    assert {r.prompt_len for r in requests} == set(range(3, 10))
    assert {r.output_len for r in requests} == {2, 3, 4}
    assert all(r.text is None for r in requests)
    ids = [t for r in requests for t in r.prompt_ids]
    assert not any(tokenizer.is_special(t) for t in ids)
    assert all(0 <= t < tokenizer.vocab_size for t in ids)


def test_mixed_workload_lengths(tokenizer: Tokenizer) -> None:
    workload = MixedWorkload(
        num_decodes=5,
        decode_input_len=12,
        decode_output_len=7,
        num_long_prompts=4,
        long_input_min=100,
        long_input_max=140,
        long_output_len=3,
    )
    decodes, long_prompts, warmups = workload.build(tokenizer, seed=3)
    assert [(len(tokenizer.encode(r.text)), r.output_len) for r in decodes] == [(12, 7)] * 5
    lengths = [len(tokenizer.encode(r.text)) for r in long_prompts]
    assert all(100 <= n <= 140 for n in lengths) and len(set(lengths)) > 1
    assert [r.output_len for r in long_prompts] == [3] * 4
    assert [len(tokenizer.encode(r.text)) for r in warmups] == [12, 100]
    assert not {r.text for r in warmups} & {r.text for r in decodes + long_prompts}
