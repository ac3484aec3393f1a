#!/usr/bin/env bash
# Decoding cost of whole models at equal width on the CPU, batch 1, one torch thread, untrained weights (decode
# cost does not depend on their values): d_model 128, 4 blocks, vocab 256, layer defaults except H's modal
# filter (StripedHyena's recurrent form, constant state).
#  1. ms/token and state bytes after 1K, 8K and 32K tokens of context for AAAA (attention only), MMMM (Mamba-3),
#     RRRR (RWKV-7), HHHA (Hyena-heavy) and MMMA (Jamba-like); each context prefilled once (timed), then 64
#     greedy tokens decoded through step by all patterns in lock-step (one token each per round, so they share
#     the same machine load), each step timed alone (median).
#  2. A 2K-token conversation continued by a 16-token turn: from the cached state (what `hybridnas serve` does
#     with a conversation_id) against re-prefilling all 2064 tokens, alternating round by round, medians; at
#     d_model 128 and 64.
# The machine is shared with other jobs: `uptime` is recorded before and after each part, and the load average
# beside every row. Records everything in output.txt.
# Run from anywhere:  bash experiments/decode/run.sh   (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python}
export OMP_NUM_THREADS=1
run() { echo; echo "\$ hybridnas $*"; echo "# uptime: $(uptime)"; nice -n 5 "$py" -m hybridnas.cli "$@"; echo "# uptime: $(uptime)"; }
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $("$py" -c 'import torch;print("torch", torch.__version__)')  $(nproc --all) cores," \
       "OMP_NUM_THREADS=1; shared with other jobs (a long CPU experiment runs beside this): read ratios measured" \
       "side by side in one run, not absolute times"
  run bench --decode --patterns AAAA,MMMM,RRRR,HHHA,MMMA --d-model 128 --params H.filter=modal \
      --contexts 1024,8192,32768 --decode-tokens 64 --warmup 2 --quiet
  run bench --decode --patterns MMMM,MMMA --d-model 128 --conversation 2048+16 --rounds 9 --quiet
  run bench --decode --patterns MMMM,MMMA --d-model 64 --conversation 2048+16 --rounds 9 --quiet
} 2>&1 | tee experiments/decode/output.txt
