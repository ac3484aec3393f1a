#!/usr/bin/env bash
# The reduced MAD ranking of README.md: 7 designs x 6 tasks on 2 CPU worker processes (one torch thread each),
# then bits per byte of the best and worst design on data/prose.txt. Run from anywhere:
#   bash experiments/mad_ranking/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(python -c 'import torch;print("torch", torch.__version__)')  $(nproc) cores"
  echo "# command: python experiments/mad_ranking/run.py --steps 600 --lm-steps 300 --d-model 64 --jobs 2"
  /usr/bin/time -f "# wall %e s, max RSS %M KiB" \
    python experiments/mad_ranking/run.py --steps 600 --lm-steps 300 --d-model 64 --jobs 2
} 2>&1 | tee experiments/mad_ranking/output.txt
