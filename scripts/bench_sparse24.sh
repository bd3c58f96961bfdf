#!/usr/bin/env bash
# 2:4 + int4 against sluice's int4 (the default Q4_1 GGUF) and dense fp32 (the same GGUF
# dequantized), single-stream decode, interleaved over rounds (this machine drifts), 2 threads.
# Checkpoints from `sluice compress ... --quantize int4 -o DIR`, passed as arguments.
#   ROUNDS=2 scripts/bench_sparse24.sh /tmp/cmp/sparsegpt   # JSON lines in $OUT/sparse24_latency.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
LATENCY=(bench latency --input-len 8 --output-len 64 --iters 3 --threads 2 --no-compile
         --output-file "$OUT/sparse24_latency.jsonl")
for round in $(seq "${ROUNDS:-2}"); do
  "$PY" -m sluice.cli "${LATENCY[@]}"
  "$PY" -m sluice.cli "${LATENCY[@]}" --quantization none
  for model in "$@"; do
    "$PY" -m sluice.cli "${LATENCY[@]}" --model "$model"
  done
done
