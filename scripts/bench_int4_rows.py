"""The default model's int4 matmuls (SmolLM2-135M: qkv 576->960, o 576->576, gate_up 576->3072,
down 1536->576, the 4-bit head 576->49152) for M rows of fp32 activations: sluice's AVX2 kernel
against torch's int4pack, interleaved, the best of `--repeats` rounds (the minimum is the least
disturbed by other load). How a kernel's time grows with M is what a verify step of 1 + k rows
costs against a one-row decode.

    python scripts/bench_int4_rows.py --threads 1 --rows 1,2,4,6,8,16,32   # one JSON line per shape
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sluice.layers.quant import quantize

SHAPES = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "head": (49152, 576),
}
LAYOUTS = ("avx2", "int4pack")


def seconds(matmul, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        matmul(x)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,6,8,16,32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        weight = torch.randn(*shape, generator=generator) * 0.05
        kernels = {layout: quantize(weight, "int4", layout=layout) for layout in LAYOUTS}
        record = {"shape": name, "out": shape[0], "in": shape[1], "threads": args.threads}
        for rows in (int(n) for n in args.rows.split(",")):
            x = torch.randn(rows, shape[1], generator=generator)
            calls = max(2, int(3e7 / (shape[0] * shape[1] * rows)))
            best = dict.fromkeys(LAYOUTS, float("inf"))
            for _ in range(args.repeats):
                for layout, kernel in kernels.items():
                    best[layout] = min(best[layout], seconds(kernel.matmul, x, calls))
            record[f"avx2_us_m{rows}"] = round(best["avx2"] * 1e6, 1)
            record[f"int4pack_us_m{rows}"] = round(best["int4pack"] * 1e6, 1)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
