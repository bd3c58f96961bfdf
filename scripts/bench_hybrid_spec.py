"""Single-stream decode of a tiny random hybrid (Qwen3-Next or Bamba, built on the spot) with
speculation off, with n-gram drafts, and with every draft right (the off run's tokens replayed:
the most speculation can gain here), the three ways interleaved over rounds (this machine
drifts). Greedy: every way must give the same tokens, and does (checked).

    python scripts/bench_hybrid_spec.py qwen3_next --hidden-size 256 --num-layers 8   # a JSON line
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sluice.api import LLM
from sluice.bench.replay_proposer import ReplayProposer
from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint
from sluice.sampling_params import SamplingParams
from sluice.spec.stats import SpecStats

WAYS = ("off", "ngram", "all_right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=["qwen3_next", "bamba"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    # Qwen3-Next: 256 and 8 as in the #6 benchmark; Bamba's Mamba heads fit only its own sizes.
    parser.add_argument("--hidden-size", type=int, default=None, help="default: the tiny one")
    parser.add_argument("--num-layers", type=int, default=None, help="default: the tiny one")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix=f"tiny_{args.arch}_"))
    sizes = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers}
    make_tiny_checkpoint(args.arch, folder, **{k: v for k, v in sizes.items() if v is not None})
    llm = LLM(
        str(folder),
        dtype="float32",
        quantization="none",
        threads=args.threads,
        speculative_method="ngram",
        num_speculative_tokens=args.num_speculative_tokens,
    )
    prompt = torch.randint(
        3, VOCAB_SIZE, (args.input_len,), generator=torch.Generator().manual_seed(0)
    )
    prompt = prompt.tolist()
    greedy = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    plain = SamplingParams(max_tokens=args.output_len, ignore_eos=True, speculative=False)
    reference = llm.generate([prompt], plain)[0].outputs[0].token_ids  # warm-up; caches prompt
    proposers = {
        "ngram": llm.engine.proposer,
        "all_right": ReplayProposer([prompt], [reference], VOCAB_SIZE, wrong=False),
    }
    seconds = dict.fromkeys(WAYS, 0.0)
    stats = {way: SpecStats() for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            if way in proposers:
                llm.engine.proposer = proposers[way]
            before = llm.engine.scheduler.spec_stats.snapshot()
            start = time.perf_counter()
            out = llm.generate([prompt], plain if way == "off" else greedy)[0].outputs[0]
            seconds[way] += time.perf_counter() - start
            stats[way].record_all(llm.engine.scheduler.spec_stats.since(before))
            assert out.token_ids == reference, f"{way} changed the greedy tokens"
    tok_s = {way: args.rounds * args.output_len / seconds[way] for way in WAYS}
    record = {
        "bench": "hybrid_speculative",
        "model": f"tiny random {args.arch}, sizes {sizes}",
        "threads": args.threads,
        "rounds": args.rounds,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_speculative_tokens": args.num_speculative_tokens,
        **{f"output_tok_s_{way}": round(tok_s[way], 2) for way in WAYS},
        **{f"speedup_{way}": round(tok_s[way] / tok_s["off"], 3) for way in WAYS[1:]},
        **{
            f"tokens_per_verify_step_{way}": round(stats[way].mean_acceptance_length, 3)
            for way in WAYS[1:]
        },
        "ngram_acceptance_rate": round(stats["ngram"].acceptance_rate, 3),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
