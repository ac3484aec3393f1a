#!/usr/bin/env bash
# 64 concurrent clients against `hybridnas serve` on the CPU: a tiny untrained export (MMMA, d_model 64, byte
# tokenizer), the server started as its own process on a free port of 127.0.0.1, 64 asyncio+httpx clients at once,
# each a conversation of 2 requests (the second continues from the server's state cache), 16 tokens each,
# alternating plain JSON and SSE streaming. The machine is shared with other jobs: `uptime` before and after.
# Records everything in output.txt (MMMA) and output-mmmm.txt (MMMM).
# Run from anywhere:  bash experiments/serve/run.sh   (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python}
export OMP_NUM_THREADS=1
# MMMA (output.txt, calls.json): the attention block batches requests with equally many tokens seen;
# MMMM (output-mmmm.txt, calls-mmmm.json): recurrent only, every request in its decode phase steps in one batch.
for pattern in MMMA MMMM; do
  suffix=$([ "$pattern" = MMMA ] && echo "" || echo "-$(echo "$pattern" | tr A-Z a-z)")
  {
    echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $("$py" -c 'import torch;print("torch", torch.__version__)')  $(nproc --all) cores," \
         "OMP_NUM_THREADS=1 (server and clients); shared with other jobs (a long CPU experiment runs beside this)"
    echo "\$ python experiments/serve/load.py --clients 64 --turns 2 --max-tokens 16 --pattern $pattern --d-model 64"
    nice -n 5 "$py" experiments/serve/load.py --clients 64 --turns 2 --max-tokens 16 --pattern "$pattern" --d-model 64 \
      --json "experiments/serve/calls$suffix.json"
  } 2>&1 | tee "experiments/serve/output$suffix.txt"
done
