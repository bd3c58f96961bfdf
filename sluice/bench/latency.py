"""`sluice bench latency`: one stream at a time, prefill speed and decode speed.

Prefill: time to first token of a 1-token generation of an `input_len` prompt. Decode: the
`output_len - 1` tokens after the first over the time from the first token to the last. Each
is averaged over `iters` runs after one warmup run. Every run gets a prompt of its own, so the
prefix cache never shortens a prefill.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from sluice.api import LLM
from sluice.bench.datasets import load_tokenizer, random_id_requests
from sluice.bench.inprocess import load_llm, record_header
from sluice.bench.report import emit
from sluice.sampling_params import SamplingParams


@dataclass(frozen=True)
class LatencyResult:
    prefill_tokens: int
    ttft_s: float  # mean over iterations
    decode_tokens: int
    decode_s: float  # mean first-to-last-token time

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        return (self.decode_tokens - 1) / self.decode_s


def token_times(llm: LLM, prompt_ids: list[int], max_tokens: int) -> list[float]:
    """Seconds from submitting the request to the arrival of each of its tokens."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    times: list[float] = []
    for out in llm.stream(prompt_ids, params):
        times += [time.perf_counter() - start] * len(out.new_token_ids)
    return times


def measure_latency(
    llm: LLM, prompts: list[list[int]], output_len: int, iters: int
) -> LatencyResult:
    """`prompts`: 2 * iters + 1 distinct prompts of the same length, the first for warmup."""
    token_times(llm, prompts[0], 2)  # warmup: one prefill and one decode step
    prefill_prompts, decode_prompts = prompts[1 : iters + 1], prompts[iters + 1 :]
    ttfts = [token_times(llm, prompt, 1)[0] for prompt in prefill_prompts]
    decode_spans = []
    for prompt in decode_prompts:
        times = token_times(llm, prompt, output_len)
        if len(times) != output_len:
            raise RuntimeError(f"got {len(times)} tokens, expected {output_len}")
        decode_spans.append(times[-1] - times[0])
    return LatencyResult(
        prefill_tokens=len(prompts[0]),
        ttft_s=sum(ttfts) / iters,
        decode_tokens=output_len,
        decode_s=sum(decode_spans) / iters,
    )


def main(args: argparse.Namespace) -> int:
    requests = random_id_requests(
        load_tokenizer(args.model),
        2 * args.iters + 1,
        (args.input_len, args.input_len),
        (args.output_len, args.output_len),
        args.seed,
    )
    llm = load_llm(args)
    result = measure_latency(llm, [r.prompt_ids for r in requests], args.output_len, args.iters)
    record = {
        **record_header("latency", "sluice", args),
        "iters": args.iters,
        "prefill_tokens": result.prefill_tokens,
        "prefill_tok_s": result.prefill_tok_s,
        "ttft_s": result.ttft_s,
        "decode_tokens": result.decode_tokens,
        "decode_tok_s": result.decode_tok_s,
        "tpot_ms": 1000 / result.decode_tok_s,
    }
    sparse = llm.engine.executor.sparse
    if sparse is not None:  # what the sparse decodes skipped, per layer
        record["sparse_rule"] = sparse.rule
        record["mlp_sparsity"] = sparse.mean_sparsity()
        record["sparse_layers"] = sparse.layer_stats()
    emit(record, args.output_file)
    return 0
