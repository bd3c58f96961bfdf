# What the benchmark scripts share; sourced by them from the repository root.
set -euo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
S=.venv/bin/sluice
GGUF=$(.venv/bin/python -c "from sluice.loaders.model_path import resolve_model; print(resolve_model())")
bin=$(../shared/peers/llama_server.sh)
# A server compiles its steps before it answers /health: allow a first start's compile.
wait_health() { for _ in $(seq 300); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
