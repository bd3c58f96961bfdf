"""Single-stream decode of 2:4 + int4 checkpoints against sluice's int4 (the default Q4_1 GGUF,
`--quantization auto`), all loaded once in one process and measured interleaved over rounds
(this machine drifts), eager steps (`--no-compile`), `--threads` threads.

    python scripts/bench_sparse24_decode.py /tmp/cmp/wanda --rounds 3   # one JSON line per run
"""

from __future__ import annotations

import argparse
import json

import torch

from sluice.api import LLM
from sluice.bench.datasets import load_tokenizer, random_id_requests
from sluice.bench.latency import measure_latency
from sluice.loaders.model_path import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoints", nargs="+", help="folders from `sluice compress --quantize int4`"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = [DEFAULT_MODEL, *args.checkpoints]
    llms = {model: LLM(model=model, compile=False, kv_cache_memory_gb=0.25) for model in models}
    requests = random_id_requests(
        load_tokenizer(DEFAULT_MODEL),
        2 * args.iters + 1,
        (args.input_len, args.input_len),
        (args.output_len, args.output_len),
        seed=0,
    )
    prompts = [r.prompt_ids for r in requests]
    for round_index in range(args.rounds):
        for model, llm in llms.items():
            result = measure_latency(llm, prompts, args.output_len, args.iters)
            print(
                json.dumps(
                    {
                        "round": round_index,
                        "model": model,
                        "threads": args.threads,
                        "decode_tok_s": round(result.decode_tok_s, 2),
                        "prefill_tok_s": round(result.prefill_tok_s, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
