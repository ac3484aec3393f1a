#!/usr/bin/env bash
# Issue 16's experiment, end to end on the CPU: the corpus, the 8-layer attention teacher, then distill-search
# (KL-guided restoration scoring of the 8 attention layers, keep 2, the rest Mamba-3; KL-selected vs evenly
# spaced vs random, 3 seeds each). Run from the repository root: bash experiments/distill_search/run.sh
# Every stage resumes: train with --resume from its checkpoints, distill-search from its study.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/distill_search
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(python -c 'import torch;print("torch", torch.__version__)')  $(nproc) cores"
  echo "# uptime: $(uptime)"
  python experiments/distill_search/make_corpus.py --out runs/distill_search/stdlib.txt
  if [ ! -f runs/distill_search/teacher/model.safetensors ]; then
    resume=""; [ -d runs/distill_search/teacher/checkpoints ] && resume="--resume"
    OMP_NUM_THREADS=1 /usr/bin/time -f "# teacher: wall %e s, max RSS %M KiB" \
      hybridnas train $out/teacher.yaml --out runs/distill_search/teacher --checkpoint-every 200 --quiet $resume
  fi
  /usr/bin/time -f "# distill-search: wall %e s, max RSS %M KiB" \
    hybridnas distill-search $out/distill.yaml --out runs/distill_search/search
  echo "# uptime: $(uptime)"
} 2>&1 | tee $out/output.txt
cp runs/distill_search/search/report.md runs/distill_search/search/report.json $out/
