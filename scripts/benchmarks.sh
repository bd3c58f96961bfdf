#!/usr/bin/env bash
# Runs every benchmark recorded in docs/benchmarks.md, sluice and its peers side by side in one
# run on this machine. JSON lines go to $OUT (default bench_out/), plots beside them.
#   scripts/benchmarks.sh            # needs .venv (make setup-test) and ../shared/peers
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench_env.sh

offline() {  # batch size, prompts, max input, max output
  local args=(--batch-size "$1" --num-prompts "$2" --input-len-min 100 --input-len-max "$3"
              --output-len-min 100 --output-len-max "$4" --output-file "$OUT/offline.jsonl")
  $S bench offline --backend sluice "${args[@]}" --kv-cache-memory-gb 4
  $S bench offline --backend transformers "${args[@]}"
}
offline 1 4 512 256
offline 32 64 512 256

OUT=$OUT scripts/bench_cpu_speed.sh  # issue #5: single stream, 32 streams, memory

GSP=(--dataset-name generated-shared-prefix --gsp-num-groups 8 --gsp-prompts-per-group 8
     --gsp-system-prompt-len 1024 --gsp-question-len 64 --gsp-output-len 64 --max-concurrency 8
     --request-rate inf --ignore-eos --seed 0)
RANDOM_LOAD=(--dataset-name random --num-prompts 32 --random-input-len 256 --random-output-len 64
             --random-range-ratio 0.5 --max-concurrency 8 --request-rate inf --ignore-eos --seed 0)
serve_bench() {  # label, url, extra args
  local label=$1 url=$2; shift 2
  $S bench serve --base-url "$url" "${GSP[@]}" "$@" --output-file "$OUT/serve_gsp_$label.jsonl" --plot "$OUT/serve_gsp_$label.png"
  $S bench serve --base-url "$url" "${RANDOM_LOAD[@]}" "$@" --output-file "$OUT/serve_random_$label.jsonl"
}

$S serve --port 8071 --max-num-seqs 8 --kv-cache-memory-gb 4 & pid=$!
wait_health http://127.0.0.1:8071 && serve_bench sluice http://127.0.0.1:8071
kill -TERM $pid; wait $pid || true

"$bin/llama-server" -m "$GGUF" --host 127.0.0.1 --port 8072 -t 2 -np 8 -c 16384 --cache-prompt >"$OUT/llama_server.log" 2>&1 & pid=$!
wait_health http://127.0.0.1:8072 && serve_bench llama http://127.0.0.1:8072 --model smollm2
kill -TERM $pid; wait $pid || true

# Hybrid model (tiny random Qwen3-Next: 8 layers, DeltaNet and attention taking turns, hidden
# 256): the hybrid prefix cache (state checkpoints) on and off on a shared-prefix workload.
TINY="$OUT/tiny-qwen3-next"
.venv/bin/python -m sluice.bench.tiny_checkpoint qwen3_next "$TINY" --hidden-size 256 --num-layers 8 --max-positions 4096
HYBRID_GSP=(--dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 8
            --gsp-system-prompt-len 1024 --gsp-question-len 64 --gsp-output-len 32 --max-concurrency 4
            --request-rate inf --ignore-eos --seed 0 --tokenizer-model "$TINY" --prompt-format ids)
for cache in on off; do
  flags=(); [ "$cache" = off ] && flags=(--no-prefix-cache)
  $S serve --model "$TINY" --port 8073 --max-num-seqs 4 "${flags[@]}" & pid=$!
  wait_health http://127.0.0.1:8073 && $S bench serve --base-url http://127.0.0.1:8073 "${HYBRID_GSP[@]}" \
    --output-file "$OUT/hybrid_gsp_cache_$cache.jsonl" --plot "$OUT/hybrid_gsp_cache_$cache.png"
  kill -TERM $pid; wait $pid || true
done

# Issue #16: the KV and prefix-cache bookkeeping of one decode step by context length (no model).
$S bench prefix-cache --contexts 2048,8192,32768 --output-file "$OUT/prefix_cache.jsonl"

# Issue #17: the default model's fp32 weights drafted by its own Q4_1 blocks (off/on per workload).
OMP_NUM_THREADS=1 $S bench speculative --threads 1 --quantization none --speculative-method draft \
  --draft-model self --rounds 1 --output-len 200 --workloads summary_quotes code_edit open_chat \
  --output-file "$OUT/spec_draft_self_int4.jsonl"
