"""lm-evaluation-harness's `local-completions` model against the shared `sluice serve`: a local
multiple-choice task and a perplexity task (tests/data/lm_eval, no hub), scored the same as
sluice scores them in-process from prompt logprobs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from live_server import MODEL_NAME, ServerProcess

from sluice.api import LLM
from sluice.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

TASKS = Path(__file__).parent.parent / "data" / "lm_eval"


@pytest.fixture(scope="module")
def evaluated(server: ServerProcess, tmp_path_factory, monkeypatch_module) -> dict:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extras")
    from lm_eval.tasks import TaskManager

    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("tasks")
    for task in TASKS.glob("*.yaml"):
        (folder / task.name).write_text(task.read_text().replace("{data_dir}", str(TASKS)))
    model_args = (
        f"model={MODEL_NAME},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
        "num_concurrent=1,max_retries=1,max_length=1000"
    )
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["sluice_mc", "sluice_ppl"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The served model, in this process: the server's defaults, uncompiled as it is."""
    return LLM(compile=False)


def sequence_logprobs(llm: LLM, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """log P(continuation | context) of each pair from sluice's prompt logprobs, one request at
    a time as lm-eval sends them (`num_concurrent=1`): the int4 kernels' sums depend on the
    batch, so a batch would differ in the third decimal."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    results = [llm.generate([context + continuation], params)[0] for context, continuation in pairs]
    return [
        sum(lp.logprob for lp in result.outputs[0].prompt_logprobs[len(context) - 1 :])
        for (context, _), result in zip(pairs, results, strict=True)
    ]


def encode_pair(llm: LLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation tokens (`_encode_pair`)."""
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces:
        context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
    encode = llm.tokenizer.encode
    whole = encode(context + continuation, add_special_tokens=False)
    context_ids = encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


def test_multiple_choice_accuracy_equals_in_process_scoring(evaluated: dict, llm: LLM):
    samples = evaluated["samples"]["sluice_mc"]
    assert len(samples) == 12
    pairs = [encode_pair(llm, *a) for sample in samples for a in sample["arguments"]]
    ours = iter(sequence_logprobs(llm, pairs))
    correct = 0
    for sample in samples:
        served = [resp[0][0] for resp in sample["resps"]]
        scores = [next(ours) for _ in served]
        assert served == pytest.approx(scores, abs=1e-3)
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["target"]
    accuracy = evaluated["results"]["sluice_mc"]["acc,none"]
    assert accuracy == correct / len(samples)
    assert accuracy >= 0.5  # the default model knows most of these (chance is 0.25)


def test_perplexity_equals_in_process_scoring(evaluated: dict, llm: LLM):
    samples = evaluated["samples"]["sluice_ppl"]
    # lm-eval's rolling windows start at a prefix token: with the remote tokenizer, the BOS token
    # /tokenizer_info names (its id, if not 0), else the EOS token.
    names = llm.tokenizer.special_token_names()
    [bos] = llm.tokenizer.encode(names["bos_token"], add_special_tokens=False)
    [eos] = llm.tokenizer.encode(names["eos_token"], add_special_tokens=False)
    prefix = bos or eos
    texts = [sample["doc"]["text"] for sample in samples]
    ours = sequence_logprobs(
        llm, [([prefix], llm.tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    )
    assert [sample["resps"][0][0] for sample in samples] == pytest.approx(ours, abs=1e-3)
    words = sum(len(text.split()) for text in texts)
    word_perplexity = evaluated["results"]["sluice_ppl"]["word_perplexity,none"]
    assert word_perplexity == pytest.approx(math.exp(-sum(ours) / words), rel=1e-4)
