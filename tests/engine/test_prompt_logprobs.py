"""Prompt logprobs: computed with the prefill, chunk by chunk, equal to transformers' forward."""

from __future__ import annotations

import pytest
import torch

from sluice import SamplingParams
from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.models.registry import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    reference = make_tiny_checkpoint("llama", folder)
    return reference, load_model(folder, torch.device("cpu"), torch.float32)


def run(engine: Engine, prompt: list[int], params: SamplingParams):
    engine.add_request("r", engine.prepare(prompt, params))
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    return outputs


@pytest.mark.parametrize("budget", [7, 512])  # several prefill chunks, and one
def test_prompt_logprobs_equal_transformers(tiny, budget: int):
    reference, loaded = tiny
    prompt = torch.randint(3, VOCAB_SIZE, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(prompt.unsqueeze(0)).logits[0].float().log_softmax(-1)
    engine = Engine(
        EngineConfig.create(
            quantization="none",
            dtype="float32",
            kv_cache_dtype="float32",
            compile=False,
            page_size=4,
            max_num_batched_tokens=budget,
        ),
        loaded,
    )
    params = SamplingParams(max_tokens=2, prompt_logprobs=3, n=2, temperature=1.0, seed=0)
    outputs = run(engine, prompt.tolist(), params)
    firsts = [o for o in outputs if o.prompt_logprobs is not None]
    assert sorted(o.index for o in firsts) == [0, 1]  # once per sample, the prefix cache aside
    for out in firsts:
        logprobs = out.prompt_logprobs
        assert [lp.token_id for lp in logprobs] == prompt[1:].tolist()
        got = torch.tensor([lp.logprob for lp in logprobs])
        want = expected[:-1].gather(1, prompt[1:].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        top_values, top_ids = expected[:-1].topk(3, dim=-1)
        assert [[t for t, _ in lp.top] for lp in logprobs] == top_ids.tolist()
        got_top = torch.tensor([[v for _, v in lp.top] for lp in logprobs])
        torch.testing.assert_close(got_top, top_values, atol=1e-4, rtol=0)
