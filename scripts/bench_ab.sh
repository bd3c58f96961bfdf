#!/usr/bin/env bash
# A change against the commit before it, in one run on this machine: single-stream latency
# (8 and 512 input tokens) and 32 concurrent requests, interleaved A/B over rounds, since this
# machine drifts. BASE is a checkout of the earlier commit (e.g. `git worktree add ../base HEAD~1`).
#   BASE=../base ROUNDS=2 scripts/bench_ab.sh      # JSON lines in $OUT (default bench_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
BASE=$(cd "${BASE:?set BASE to a checkout of the commit to compare against}" && pwd)
HEAD_DIR=$(pwd)
PY=$HEAD_DIR/.venv/bin/python
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
wait_health() { for _ in $(seq 300); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }

# `python -m sluice.cli` from a tree's root imports that tree's sluice.
in_tree() { local dir=$1; shift; (cd "$dir" && "$PY" -m sluice.cli "$@"); }

CONCURRENT=(--dataset-name random --num-prompts 64 --random-input-len 128 --random-output-len 128
            --max-concurrency 32 --request-rate inf --ignore-eos --seed 0)
for round in $(seq "${ROUNDS:-2}"); do
  for label in base head; do
    dir=$BASE; [ "$label" = head ] && dir=$HEAD_DIR
    for len in 8 512; do
      in_tree "$dir" bench latency --input-len "$len" --output-len 128 --iters 3 --threads 2 \
        --output-file "$OUT/ab_latency_$label.jsonl"
    done
    (cd "$dir" && exec "$PY" -m sluice.cli serve --port 8076 --max-num-seqs 32 --kv-cache-memory-gb 0.5 --threads 2) & pid=$!
    wait_health http://127.0.0.1:8076 && in_tree "$HEAD_DIR" bench serve --base-url http://127.0.0.1:8076 \
      "${CONCURRENT[@]}" --output-file "$OUT/ab_concurrent_$label.jsonl"
    kill -TERM $pid; wait $pid || true
  done
done
