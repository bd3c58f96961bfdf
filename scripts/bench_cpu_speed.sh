#!/usr/bin/env bash
# Issue #5 (CPU speed), sluice and llama.cpp side by side in one run: single-stream prefill and
# decode (three interleaved rounds, since this machine drifts), then 32 concurrent requests against
# 32 slots with each server's peak resident memory. JSON lines go to $OUT (default bench_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench_env.sh

latency() {  # input length, extra engine flags...
  local len=$1; shift
  $S bench latency --input-len "$len" --output-len 128 --iters 3 --threads 2 "$@" --output-file "$OUT/latency.jsonl"
}
for round in 1 2 3; do
  latency 8; latency 512  # decode from a near-empty context (as llama-bench -n 128) and after 512
  "$bin/llama-bench" -m "$GGUF" -t 2 -p 512 -n 0 -o jsonl >> "$OUT/llama_bench.jsonl"
  "$bin/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -o jsonl >> "$OUT/llama_bench.jsonl"
  "$bin/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -d 512 -o jsonl >> "$OUT/llama_bench.jsonl"
done
latency 512 --kv-cache-dtype float32  # the full-precision cache (the default is float16 on the CPU)
for len in 8 512; do latency $len --no-compile; done  # the eager engine, for the compiled share

peak_rss_mib() { awk '/VmHWM/ {print $2 / 1024}' "/proc/$1/status"; }
CONCURRENT=(--dataset-name random --num-prompts 64 --random-input-len 128 --random-output-len 128
            --max-concurrency 32 --request-rate inf --ignore-eos --seed 0)
# llama.cpp's single stream again beside the concurrent runs (before and after), for the 3x goal
single_stream() { "$bin/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -o jsonl >> "$OUT/llama_bench_beside_concurrent.jsonl"; }
single_stream
for flags in "--compile" "--compile --dtype bfloat16" "--compile --kv-cache-dtype float32" "--no-compile"; do
  label=$(echo "$flags" | tr -d ' -')
  $S serve --port 8074 --max-num-seqs 32 --kv-cache-memory-gb 0.5 --threads 2 $flags & pid=$!
  wait_health http://127.0.0.1:8074 && $S bench serve --base-url http://127.0.0.1:8074 "${CONCURRENT[@]}" --output-file "$OUT/concurrent_sluice_$label.jsonl"
  echo "{\"server\": \"sluice $flags\", \"peak_rss_mib\": $(peak_rss_mib $pid)}" >> "$OUT/peak_rss.jsonl"
  kill -TERM $pid; wait $pid || true
done
"$bin/llama-server" -m "$GGUF" --host 127.0.0.1 --port 8075 -t 2 -np 32 -c 16384 >"$OUT/llama_server_32.log" 2>&1 & pid=$!
wait_health http://127.0.0.1:8075 && $S bench serve --base-url http://127.0.0.1:8075 "${CONCURRENT[@]}" --model smollm2 --output-file "$OUT/concurrent_llama.jsonl"
echo "{\"server\": \"llama-server\", \"peak_rss_mib\": $(peak_rss_mib $pid)}" >> "$OUT/peak_rss.jsonl"
kill -TERM $pid; wait $pid || true
single_stream
