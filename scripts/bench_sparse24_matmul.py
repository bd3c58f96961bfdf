"""One decode step's matmuls of the default model's shapes (SmolLM2-135M: qkv 576->960, o
576->576, gate_up 576->3072, down 1536->576), one activation row: sluice's 2:4 int4 kernel
against the int4 path this CPU runs (int4pack without AVX512-VNNI), interleaved, the best of
`--repeats` rounds of `--calls` calls each (the minimum is the least disturbed by other load).

    python scripts/bench_sparse24_matmul.py --threads 2    # one JSON line per shape
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sluice.compress.masks import Sparsity, keep_mask, magnitude_scores
from sluice.layers.quant import quantize
from sluice.layers.sparse24 import Sparse24Int4Weight

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def best_us(matmul, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        matmul(x)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, (rows, inputs) in SHAPES.items():
        weight = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(0))
        weight *= keep_mask(magnitude_scores(weight), Sparsity.parse("2:4"))
        sparse, dense = Sparse24Int4Weight(weight), quantize(weight, "int4")
        x = torch.randn(1, inputs)
        times = {"int4": [], "sparse24_int4": []}
        for _ in range(args.repeats):
            times["int4"].append(best_us(dense.matmul, x, args.calls))
            times["sparse24_int4"].append(best_us(sparse.matmul, x, args.calls))
        int4_us, sparse_us = min(times["int4"]), min(times["sparse24_int4"])
        print(
            json.dumps(
                {
                    "shape": name,
                    "rows": rows,
                    "inputs": inputs,
                    "threads": args.threads,
                    "int4_layout": type(dense).__name__,
                    "int4_us": round(int4_us, 1),
                    "sparse24_int4_us": round(sparse_us, 1),
                    "speedup": round(int4_us / sparse_us, 3),
                    "int4_bytes": dense.nbytes(),
                    "sparse24_int4_bytes": sparse.nbytes(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
