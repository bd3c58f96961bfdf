#!/usr/bin/env bash
# The GPU path in one command (issue #22): every CUDA test, then the GPU benchmarks, as JSON lines
# in $OUT (default gpu_out/). Needs no network: the model comes from the checkout's virtual
# environment (make setup-test), the transformers baseline from the same GGUF.
#   scripts/gpu_check.sh               # all of it (~20-40 min on an H100)
#   SKIP_BENCH=1 scripts/gpu_check.sh  # the tests alone
#   HF_MODEL=path/to/hf_folder ...     # also a bf16 HF checkpoint of the same size
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
$PY - >"$OUT/machine.jsonl" <<'PY'
import json, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                  "torch": torch.__version__, "cuda": torch.version.cuda}))
PY

# 1. every CUDA test in the suite (the `cuda` marker)
$PY -m pytest -m cuda -q -rs tests --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "{\"check\": \"pytest -m cuda\", \"exit_code\": $tests_rc}" >>"$OUT/checks.jsonl"
[ -n "${SKIP_BENCH:-}" ] && exit "$tests_rc"

# 2. offline throughput at batch 1, 64 and 256: sluice (int4 and bf16 weights, CUDA graphs on and
# off) beside transformers eager bf16 on the same requests. One JSON line each, in a file per run.
offline() {  # label, batch size, then sluice bench offline's options
  local label=$1 batch=$2; shift 2
  local prompts=$((batch < 4 ? 4 : 4 * batch))
  $PY -m sluice.cli bench offline --device cuda --dtype bfloat16 --batch-size "$batch" \
    --num-prompts "$prompts" --input-len-min 100 --input-len-max 512 --output-len-min 256 \
    --output-len-max 256 --kv-cache-memory-gb 16 --max-num-batched-tokens 4096 \
    --output-file "$OUT/offline_${label}_b${batch}.jsonl" "$@" || echo "{\"failed\": \"$label b$batch\"}" >>"$OUT/checks.jsonl"
}
for batch in 1 64 256; do
  offline transformers "$batch" --backend transformers
  offline int4_graphs "$batch"
  offline int4_eager "$batch" --no-cuda-graphs
  offline bf16_graphs "$batch" --quantization none
  offline bf16_eager "$batch" --quantization none --no-cuda-graphs
  if [ -n "${HF_MODEL:-}" ]; then
    offline hf_bf16_graphs "$batch" --model "$HF_MODEL"
    offline hf_transformers "$batch" --model "$HF_MODEL" --backend transformers
  fi
done
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("offline_*.jsonl")):
    for line in path.read_text().splitlines():
        row = json.loads(line)
        print(path.stem, {k: v for k, v in row.items() if k.endswith("_tok_s")})
PY
exit "$tests_rc"
