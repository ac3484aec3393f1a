#!/usr/bin/env bash
# The M mixer on the CPU at batch 8, length 1024, d_model 128, d_state 32, headdim 32, expand 2:
# chunked vs naive (forward and forward+backward) for Mamba-3 SISO, MIMO R=2 and Mamba-2; then, only where the
# PyPI package mamba3-ssm (0.2.1, pure PyTorch loops, time only: its math differs) imports, chunked vs it;
# with mamba3-ssm-proj (that layer's own in_proj/out_proj alone: the floor of any backend, so mamba3-ssm /
# mamba3-ssm-proj is the most any implementation can gain on it); then the worst chunked-vs-naive relative errors
# of the op tests. Records everything in output.txt.
# Run from anywhere:  bash experiments/mamba_cpu/run.sh
# (mamba3-ssm is never a requirement; to include it: pip install --no-deps --target DIR mamba3-ssm==0.2.1 and
#  PYTHONPATH=DIR bash experiments/mamba_cpu/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
shape="--seq-lens 1024 --batch 8 --d-model 128"
configs=("variant=mamba3,mimo_rank=1,d_state=32,headdim=32,expand=2"
         "variant=mamba3,mimo_rank=2,d_state=32,headdim=32,expand=2"
         "variant=mamba2,d_state=32,headdim=32,expand=2")
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(python -c 'import torch;print("torch", torch.__version__)')  $(nproc --all) cores, torch threads $(python -c "import torch;print(torch.get_num_threads())")" \
       "(shared with other jobs: load average $(cut -d' ' -f1-3 /proc/loadavg))"
  for p in "${configs[@]}"; do
    echo; echo "\$ hybridnas bench --mixer M --params $p --backends naive,chunked $shape --repeat 5 --budget 30"
    hybridnas bench --mixer M --params "$p" --backends naive,chunked $shape --repeat 5 --budget 30 --quiet
  done
  if python -c 'import mamba3_ssm' 2>/dev/null; then
    for p in "${configs[@]:0:2}"; do
      echo; echo "\$ hybridnas bench --mixer M --params $p --backends mamba3-ssm,mamba3-ssm-proj,chunked $shape --modes fwd+bwd --repeat 5 --budget 30"
      hybridnas bench --mixer M --params "$p" --backends mamba3-ssm,mamba3-ssm-proj,chunked $shape --modes fwd+bwd \
        --repeat 5 --budget 30 --quiet
    done
  else
    echo; echo "# mamba3-ssm is not importable here: not measured"
  fi
  echo; echo "\$ python experiments/mamba_cpu/errors.py"
  python experiments/mamba_cpu/errors.py
} 2>&1 | tee experiments/mamba_cpu/output.txt
