"""Draft-model speculation on tiny random Llamas: the target's tokens, greedy or seeded, whatever
drafts (a random model's, mostly rejected; the target's own weights, all accepted; its int4
copy), batched, chunked and preempted; the draft's pages follow its requests; a draft with
another vocabulary is refused, naming what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from model_harness import assert_no_leaks, prompts, token_ids
from tokenizers import Tokenizer, models, pre_tokenizers

from sluice import LLM, SamplingParams
from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint
from sluice.engine.engine import Engine
from sluice.spec.draft_model import VocabularyMismatchError

pytestmark = pytest.mark.slow

LENGTHS = [3, 40, 9, 75, 17, 120, 5, 33, 60, 11, 90, 26, 7, 48, 140, 21]  # 16 mixed prompts
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SQUEEZED = {"max_num_batched_tokens": 16, "num_pages": 12, "enable_prefix_cache": False}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafts")
    make_tiny_checkpoint("llama", root / "target")
    make_tiny_checkpoint("llama", root / "draft", seed=1, num_hidden_layers=1)
    make_tiny_checkpoint("llama", root / "small_vocab", seed=1, vocab_size=256)
    shutil.copytree(root / "draft", root / "other_words")
    _write_other_words(root / "other_words")
    return {path.name: path for path in root.iterdir()}


def _write_other_words(folder: Path) -> None:
    """The word-level tokenizer of the tiny checkpoints, its tokens spelled "w0".."w511"."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB_SIZE)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "w1", "eos_token": "w2", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make(folder: Path, draft: str | Path | None = None, **options) -> LLM:
    """An LLM over the tiny target, eager over fp32 pages; `draft`: speculate with it."""
    if draft is not None:
        options |= {"speculative_method": "draft", "draft_model": str(draft)}
        options |= {"num_speculative_tokens": 4, "speculative_disable_batch_size": 64}
        options |= {"speculative_draft_row_cost": 0}  # every draft proposed, whatever it costs
    return LLM(str(folder), compile=False, kv_cache_dtype="float32", **options)


def generate_watching_the_draft(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of `batch`, checking after every step that the draft holds pages only for
    running requests (preempted and finished ones gave theirs back) and no others."""
    engine = llm.engine
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), engine.prepare(prompt, GREEDY))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        assert_draft_pages_follow_running(engine)
    return list(outputs.values())


def assert_draft_pages_follow_running(engine: Engine) -> None:
    draft = engine.proposer
    running = {r.request_id for r in engine.scheduler.running}
    assert set(draft._sequences) <= running
    held = sum(len(s.page_ids) for s in draft._sequences.values())
    assert draft.pool.num_used == held


@pytest.fixture(scope="module")
def expected(folders) -> list[list[int]]:
    plain = make(folders["target"])
    tokens = token_ids(plain.generate(prompts(LENGTHS), GREEDY))
    assert_no_leaks(plain.engine)
    return tokens


@pytest.mark.parametrize(
    "draft, options",
    [
        ("draft", {}),  # a random model of one layer: most drafts rejected
        ("self", {"quantization": "none", "draft_quantization": "none"}),  # the same weights
        ("self", {}),  # the target's weights quantized to int4
    ],
    ids=["random", "self", "self-int4"],
)
def test_greedy_tokens_are_the_targets_batched_chunked_and_preempted(
    folders, expected, draft, options
):
    draft = folders.get(draft, draft)
    batched = make(folders["target"], draft, **options)
    assert token_ids(batched.generate(prompts(LENGTHS), GREEDY)) == expected
    squeezed = make(folders["target"], draft, **options, **SQUEEZED)
    assert generate_watching_the_draft(squeezed, prompts(LENGTHS)) == expected
    assert squeezed.engine.scheduler.num_preemptions > 0

    stats = [llm.engine.scheduler.spec_stats for llm in (batched, squeezed)]
    assert all(s.num_draft_tokens > 0 for s in stats)
    rates = [s.acceptance_rate for s in stats]
    if draft == "self" and options:
        assert batched.engine.proposer.runner.model is batched.engine.executor.model
        assert rates == [1.0, 1.0]
    elif draft == "self":
        assert all(0.0 < rate < 1.0 for rate in rates), rates
    else:
        assert all(0.0 < rate < 0.5 for rate in rates), rates
    for llm in (batched, squeezed):
        assert_no_leaks(llm.engine)


def test_seeded_samples_are_the_same_alone_batched_and_without_drafts(folders):
    """A seeded request draws position i from its own (seed, i) generator, so a different
    draft's proposals, accepted or not, change none of its tokens."""
    prompt, *others = prompts([30, 12, 50], seed=3)
    params = SamplingParams(max_tokens=20, temperature=0.8, top_k=50, seed=7, n=2)
    want = make(folders["target"]).generate([prompt], params)[0].outputs
    spec = make(folders["target"], folders["draft"])
    alone = spec.generate([prompt], params)[0].outputs
    noise = SamplingParams(max_tokens=12, temperature=1.0)
    batched = spec.generate([others[0], prompt, others[1]], [noise, params, noise])[1].outputs
    for got in (alone, batched):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.text for c in got] == [c.text for c in want]
    stats = spec.engine.scheduler.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leaks(spec.engine)


def test_an_aborted_request_gives_its_draft_pages_back(folders):
    spec = make(folders["target"], folders["draft"])
    engine = spec.engine
    engine.add_request("cut", engine.prepare(prompts([40])[0], GREEDY))
    while engine.scheduler.spec_stats.num_drafts < 3:
        engine.step()
    assert engine.proposer.pool.num_used > 0
    engine.abort_request("cut")
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    "draft, difference",
    [
        ("small_vocab", r"vocabulary size 256 \(draft\) vs 512 \(target\)"),
        ("other_words", r"token 0 is 'w0' \(draft\) vs 't0' \(target\)"),
    ],
)
def test_a_draft_with_another_vocabulary_is_refused_naming_what_differs(folders, draft, difference):
    with pytest.raises(VocabularyMismatchError, match=difference):
        make(folders["target"], folders[draft])
