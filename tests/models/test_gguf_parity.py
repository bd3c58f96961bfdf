"""The real default GGUF: our greedy continuations are transformers' (loaded from the same file)."""

from __future__ import annotations

import pytest
import torch

from sluice import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite book is",
    "In 1969, astronauts",
]


@pytest.fixture(scope="module")
def reference(default_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


def test_logits_match_transformers(make_llm, reference, default_model):
    llm = make_llm(kv_cache_dtype="float32", compile=False)  # the fp32 path all the way
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    result = llm.generate([ids], SamplingParams(max_tokens=1, logprobs=5))[0].outputs[0]
    top = result.logprobs[0].top
    expected_top = torch.log_softmax(expected, -1).topk(5)
    assert [t for t, _ in top] == expected_top.indices.tolist()
    torch.testing.assert_close(
        torch.tensor([v for _, v in top]), expected_top.values, atol=1e-4, rtol=0
    )


def test_greedy_continuations_match_transformers(make_llm, reference):
    llm = make_llm()
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:2]]
    prompts += [llm.tokenizer.encode(p) for p in PROMPTS[2:]]
    # min_tokens is transformers' min_new_tokens: EOS is masked, not just ignored.
    ours = llm.generate(prompts, SamplingParams(max_tokens=64, min_tokens=64))
    for ids, result in zip(prompts, ours):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False
            )[0, len(ids) :].tolist()
        assert result.outputs[0].token_ids == expected
