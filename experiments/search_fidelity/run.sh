#!/usr/bin/env bash
# The quickstart's ground truth and the replayed comparison of search strategies (2-core CPU; about two hours
# for the sweep, seconds for the replays). Every step resumes: re-running the sweep picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=experiments/search_fidelity

# 1. the sweep: 20 architectures x lrs {1e-3, 3.16e-3, 1e-2} x seeds {0, 1} at 600 steps (1x), then 6000 steps
#    (10x) at each architecture's best lr, both seeds; two workers, one core each, on one journal study
hybridnas sweep search_spaces/quickstart.yaml --budgets 1,10 --seeds 2 --n-lrs 3 --workers 2 \
  --storage "$dir/quickstart-sweep.journal" --study quickstart-sweep --out "$dir/quickstart_table.csv"

# 2. the table: spread, noise, Spearman of the 1x ranking against the 10x one
python "$dir/analyze.py" "$dir/quickstart_table.csv" | tee "$dir/analyze_output.txt"

# 3. replayed searches, 20 seeds per strategy: samplers x learning-rate handling x pruners
hybridnas replay search_spaces/quickstart.yaml --table "$dir/quickstart_table.csv" --seeds 20 \
  --compare "lr_mode=sample,halving,ladder;sampler=tpe,random;pruner=hyperband,median,none;prune_after=0,0.5" \
  --out "$dir/replay" | tee "$dir/replay_output.txt"

# 4. the default quickstart search, replayed (the issue's target line) and run for real on idle cores
hybridnas replay search_spaces/quickstart.yaml --table "$dir/quickstart_table.csv" --seeds 20 \
  | tee "$dir/replay_default.txt"

# 5. a third seed at 1x (only the missing runs train), its analysis and the default replayed on 40 seeds
hybridnas sweep search_spaces/quickstart.yaml --budgets 1 --seeds 3 --n-lrs 3 --workers 2 \
  --storage "$dir/quickstart-sweep.journal" --study quickstart-sweep
hybridnas sweep search_spaces/quickstart.yaml --budgets 1,10 --seeds 3 --storage "$dir/quickstart-sweep.journal" \
  --study quickstart-sweep --table-only --out "$dir/quickstart_table_3seeds.csv"
python "$dir/analyze.py" "$dir/quickstart_table_3seeds.csv" | tee "$dir/analyze_output_3seeds.txt"
hybridnas replay search_spaces/quickstart.yaml --table "$dir/quickstart_table_3seeds.csv" --seeds 40 \
  --compare "lr_mode=halving;sampler=tpe;pruner=median;prune_after=0.5;confirm_top=3,0" | tee "$dir/replay_3seeds.txt"

# 6. two single-seed pilots of harder tasks at 1x (stopped by hand after the 1x part: `--budgets 1` alone gives
#    the same runs), then their side-by-side summary
for p in kv8 mix; do
  hybridnas sweep "$dir/pilots/pilot_$p.yaml" --lrs 0.003,0.01 --seeds 1 --budgets 1 --workers 2 \
    --storage "runs/pilot_$p.journal" --out "$dir/pilots/pilot_$p.csv"
done
python "$dir/pilots/summarize.py" | tee "$dir/pilots/summary.txt"
