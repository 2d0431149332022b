#!/usr/bin/env bash
# Workflow tokens/s on a framework-started vLLM tensor-parallel service against
# vLLM's own benchmark client on the same server (see benchmarks/gpu_vllm.py).
#   benchmarks/gpu_vllm.sh MODEL_DIR [TP] [more benchmarks.gpu_vllm flags]
# TP defaults to every GPU nvidia-smi lists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL_DIR [TP] [--tasks N --concurrency C --repeats R ...]" >&2
  exit 2
fi
MODEL=$1; shift
TP=${1:-}
if [[ -n "$TP" && "$TP" != -* ]]; then shift; else TP=$(nvidia-smi -L | wc -l); fi
PYTHON=${MATRIX_HPC_PYTHON:-$(command -v python || command -v python3)}
exec "$PYTHON" -m benchmarks.gpu_vllm --model "$MODEL" --tp "$TP" "$@"
