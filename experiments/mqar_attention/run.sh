#!/usr/bin/env bash
# Trains the 2-layer attention model of arch.yaml on MQAR (seq 64, 8 kv pairs, vocab 256) on the CPU and
# records the log. Run from the repository root: bash experiments/mqar_attention/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(python -c 'import torch;print("torch", torch.__version__)')  $(nproc) cores"
  echo "# command: hybridnas train experiments/mqar_attention/arch.yaml --out runs/mqar_attention"
  /usr/bin/time -f "# wall %e s, max RSS %M KiB" hybridnas train experiments/mqar_attention/arch.yaml --out runs/mqar_attention
} 2>&1 | tee experiments/mqar_attention/output.txt
