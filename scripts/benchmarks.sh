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

# Issue #17: n-gram (k = 5, 8) and suffix (k = 8, 12) drafts off/on per workload, 32 streams, and
# what a verify step of 1 + k rows costs against a one-row decode.
export OMP_NUM_THREADS=2
$S bench verify-step --threads 2 --output-file "$OUT/verify_step.jsonl"
for method_k in "ngram 5" "ngram 8" "suffix 8" "suffix 12"; do
  read -r method k <<< "$method_k"
  $S bench speculative --threads 2 --rounds 7 --output-len 200 --speculative-method "$method" \
    --num-speculative-tokens "$k" --output-file "$OUT/spec_${method}_$k.jsonl"
done
$S bench speculative --threads 2 --rounds 3 --output-len 64 --concurrency 32 \
  --workloads code_edit open_chat --speculative-method suffix --num-speculative-tokens 12 \
  --output-file "$OUT/spec_suffix_32.jsonl"

# Issue #18: a 2k-token prompt's pages pulled over NIXL vs recomputed, and disaggregated vs
# co-located servers behind vllm-router on steady decodes with long prompts arriving.
export UCX_TLS=${UCX_TLS:-tcp}
$S bench pd-transfer --prompt-lens 2048 --repeats 2 --threads 1 --output-file "$OUT/pd_transfer.jsonl"
$S bench pd-mixed --rounds 2 --output-file "$OUT/pd_mixed.jsonl" --plot "$OUT/pd_mixed_itl.png" \
  --log-dir "$OUT/pd_mixed_logs"

# Issue #19: activation-sparse decoding, speed against perplexity.
$S bench sparsity --threads 2 --cett 0.05,0.1,0.2 --rules threshold,predictor --predictor-rank 16 \
  --calibration-tokens 2048 --search-tokens 512 --eval-tokens 2048 --rounds 3 --decode-tokens 64 \
  --profiles "$OUT/sparsity_profiles" --plot "$OUT/sparsity_speed_ppl.png" --output-file "$OUT/sparsity.jsonl"

# Issue #20: 2:4 + int4 checkpoints by each method, their accuracy, and the kernel against int4.
for method in magnitude wanda sparsegpt; do
  $S compress --method "$method" --quantize int4 --calibration-tokens 512 --threads 1 -o "$OUT/cmp/$method"
  $S eval --threads 1 --max-tokens 1024 --max-items 52 --model "$OUT/cmp/$method" --output-file "$OUT/eval.jsonl"
done
$S eval --threads 1 --max-tokens 1024 --max-items 52 --output-file "$OUT/eval.jsonl"
$S eval --threads 1 --max-tokens 1024 --max-items 52 --quantization none --output-file "$OUT/eval.jsonl"
.venv/bin/python scripts/bench_sparse24_matmul.py --threads 1 --repeats 7 > "$OUT/sparse24_matmul.jsonl"

# Issue #21: constrained vs unconstrained generation, and the grammar engines.
$S bench structured --threads 2 --streams 1,32 --rounds 2 --output-file "$OUT/structured.jsonl"
OMP_NUM_THREADS=1 .venv/bin/python scripts/compare_grammar_engines.py > "$OUT/grammar_engines.txt"
