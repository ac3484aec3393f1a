#!/usr/bin/env bash
# Chunked vs naive for the Hyena (H, both long filters) and RWKV-7 (R) mixers on the CPU: batch 8, length 1024,
# d_model 128, forward and forward+backward (median of 3 after 1 warm-up; ratios from one run, all backends of a
# row side by side). "naive" = the token loops (RWKV-7 recurrence; Hyena's direct causal convolution),
# "chunked" = the WY chunked form / the FFT convolution. Whole layers are timed (projections included), as
# `hybridnas bench` does. Then the worst fp32 relative errors (errors.py).
# Run from the repository root: bash experiments/hyena_rwkv_cpu/run.sh   (THREADS="2 1" by default)
# output.txt is appended to, one block per thread count, each headed by the time, torch and the load average:
# on a shared machine an oversubscribed 2-thread run slows many-small-op loops (the naive paths) far more than
# large batched ops, so the 1-thread rows are the conservative ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/hyena_rwkv_cpu/output.txt
for threads in ${THREADS:-2 1}; do
  {
    echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(python -c 'import torch;print("torch", torch.__version__)')  $(nproc) cores," \
         "--threads $threads (shared machine: load average $(cut -d' ' -f1-3 /proc/loadavg))"
    for params in "" "filter=implicit" "filter=modal"; do
      mixer=R; [ -n "$params" ] && mixer=H
      cmd="hybridnas bench --mixer $mixer ${params:+--params $params} --backends naive,chunked --seq-lens 1024 --batch 8 --d-model 128 --threads $threads --quiet"
      echo "# command: $cmd"
      $cmd
      echo
    done
  } 2>&1 | tee -a "$out"
done
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ)  command: python experiments/hyena_rwkv_cpu/errors.py"
  python experiments/hyena_rwkv_cpu/errors.py
} 2>&1 | tee experiments/hyena_rwkv_cpu/errors.txt
