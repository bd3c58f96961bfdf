"""The proposers on token sequences built by hand: what they propose, exactly."""

from __future__ import annotations

import random

import pytest

from sluice.config import SpeculativeConfig
from sluice.engine.request import Request
from sluice.sampling_params import SamplingParams
from sluice.spec.ngram import NgramProposer
from sluice.spec.suffix import SuffixProposer, SuffixTree


def request(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id, list(tokens), SamplingParams(), max_total_tokens=10_000)


def test_ngram_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(min_n=1, max_n=3)
    # "7 8 9" occurs twice before the tail: the later occurrence (followed by 4 5) wins.
    r = request([7, 8, 9, 1, 2, 3, 7, 8, 9, 4, 5, 6, 0, 8, 9])
    assert proposer.propose([r], 2) == [[4, 5]]
    r.output_token_ids += [4]  # now the tail "9 4" matches: 5 6 0 8 follow
    assert proposer.propose([r], 4) == [[5, 6, 0, 8]]
    r.output_token_ids += [99]  # a token never seen: nothing to propose
    assert proposer.propose([r], 4) == [[]]


def test_ngram_prefers_longer_matches_and_respects_min_n():
    tokens = [1, 2, 3, 5, 9, 2, 3, 6, 0, 1, 2, 3]
    # max_n 3: "1 2 3" matched at the start -> 5; a 2-gram match would give 6 (latest "2 3").
    assert NgramProposer(1, 3).propose([request(tokens)], 1) == [[5]]
    assert NgramProposer(1, 2).propose([request(tokens)], 1) == [[6]]
    assert NgramProposer(4, 5).propose([request(tokens)], 1) == [[]]


def test_ngram_incremental_index_equals_a_fresh_one():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(200)]
    live, live_request = NgramProposer(1, 3), request(tokens[:20])
    for end in range(20, 200):
        live_request.output_token_ids = tokens[20:end]
        fresh = NgramProposer(1, 3).propose([request(tokens[:end])], 4)
        assert live.propose([live_request], 4) == fresh


def test_suffix_tree_counts_substrings_and_forgets_removed_ones():
    tree = SuffixTree(max_depth=3)
    tree.add([1, 2, 3, 1, 2])
    node, length = tree.match([5, 1, 2])
    assert length == 2 and node.count == 2 and list(node.children) == [3]
    tree.add([1, 2, 4])
    tree.remove([1, 2, 3, 1, 2])
    node, length = tree.match([1, 2])
    assert length == 2 and node.count == 1 and list(node.children) == [4]
    tree.remove([1, 2, 4])
    assert tree.root.children == {}


def test_suffix_proposes_the_most_frequent_continuation_while_confident():
    proposer = SuffixProposer(max_depth=8, min_token_prob=0.3)
    # after "1 2": 3 twice, 4 once -> 3 (2/3); after "1 2 3": "7" then stop at unseen futures.
    r = request([1, 2, 3, 7, 1, 2, 4, 8, 1, 2, 3, 7, 5, 1, 2])
    assert proposer.propose([r], 8) == [[3, 7]]  # the match "5 1 2" is unknown; "1 2" is, length 2
    # Other requests' outputs teach the global tree.
    for i in range(3):
        finished = request([50], f"done{i}")
        finished.output_token_ids = [60, 61, 62, 63, 64, 65]
        proposer.finished(finished)
    new = request([9, 60, 61, 62], "new")
    assert proposer.propose([new], 3) == [[63, 64, 65]]
    assert proposer.propose([new], 8) == [[63, 64, 65]]  # the outputs end there


def test_suffix_global_tree_keeps_only_the_recent_outputs():
    proposer = SuffixProposer(max_depth=6, max_cached_outputs=2)
    for i, output in enumerate([[10, 11, 12], [20, 21, 22], [30, 31, 32]]):
        done = request([1], f"d{i}")
        done.output_token_ids = output
        proposer.finished(done)
    assert proposer.propose([request([10, 11], "a")], 2) == [[]]
    assert proposer.propose([request([30, 31], "b")], 2) == [[32]]


def test_suffix_forget_outputs_keeps_each_request_s_own_tree():
    proposer = SuffixProposer(max_depth=6, min_token_prob=0.3)
    done = request([1], "done")
    done.output_token_ids = [60, 61, 62, 63]
    proposer.finished(done)
    own = request([5, 6, 7, 8, 5, 6], "own")
    assert proposer.propose([request([60, 61], "a"), own], 2) == [[62, 63], [7, 8]]
    proposer.forget_outputs()
    assert proposer.propose([request([60, 61], "b"), own], 2) == [[], [7, 8]]
    proposer.finished(done)  # it learns again afterwards
    assert proposer.propose([request([60, 61], "c")], 2) == [[62, 63]]


@pytest.mark.parametrize(
    "settings, error",
    [
        ({"method": "eagle"}, "speculative method"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"ngram_min": 3, "ngram_max": 2}, "ngram_min"),
        ({"disable_batch_size": 0}, "disable_batch_size"),
        ({"method": "draft"}, "needs draft_model"),
        ({"method": "ngram", "draft_model": "self"}, "draft_model is for speculative method draft"),
        ({"method": "draft", "draft_model": "self", "draft_quantization": "int3"}, "int3"),
        ({"draft_row_cost": -0.5}, "draft_row_cost"),
    ],
)
def test_bad_settings_are_named(settings, error):
    with pytest.raises(ValueError, match=error):
        SpeculativeConfig(**settings)


@pytest.mark.parametrize(
    "settings, k",
    [
        ({"method": "ngram"}, 5),
        ({"method": "suffix"}, 12),
        ({"method": "draft", "draft_model": "self"}, 5),
        ({"method": "suffix", "num_speculative_tokens": 3}, 3),
        ({}, 5),
    ],
)
def test_k_defaults_per_method_unless_given(settings, k):
    assert SpeculativeConfig(**settings).num_speculative_tokens == k
