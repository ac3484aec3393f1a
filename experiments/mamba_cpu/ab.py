"""The chunked ``M`` layer at this checkout against an earlier commit, side by side in one run.

Three columns: the earlier commit and this checkout with the system's malloc, then this checkout with
``hybridnas.runtime.tune_malloc`` (what ``hybridnas`` commands run with), so the code change and the malloc
setting are measured apart. Each cell runs in its own process (the commit's ``layers`` package first on
``sys.path``), cells alternating, ``--rounds`` times; a cell's figure is its best median of 11 forward+backward
passes at batch 8, length 1024, d_model 128, d_state 32, headdim 32, expand 2 (the shape of ``run.sh``). On a
shared 2-core VM single runs swing by 15-20%, hence the alternation and the best-of-rounds.

    python experiments/mamba_cpu/ab.py --ref 7a652a2          # from the repository root
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ["variant=mamba3,mimo_rank=1", "variant=mamba3,mimo_rank=2", "variant=mamba2"]

CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
if sys.argv[3] == "tuned":
    from hybridnas.runtime import tune_malloc
    assert tune_malloc()
import layers
from hybridnas.bench import parse_params, run_bench
assert layers.__file__.startswith(sys.argv[1]), layers.__file__
params = {**parse_params(sys.argv[2]), "d_state": 32, "headdim": 32, "expand": 2}
res = run_bench("M", params, ["chunked"], [1024], repeat=11, warmup=2, modes=("fwd+bwd",))
print(res.rows[0].fwd_bwd_s)
"""

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the earlier commit")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(ref_tree), args.ref],
                       check=True, capture_output=True)
        try:
            cells = {args.ref: (ref_tree, "system"), "this checkout": (here, "system"),
                     "+ tune_malloc": (here, "tuned")}
            best: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for cfg in CONFIGS:
                    for name, (tree, malloc) in cells.items():
                        out = subprocess.run([sys.executable, "-c", CHILD, str(tree), cfg, malloc], check=True,
                                             capture_output=True, text=True).stdout
                        best.setdefault((cfg, name), []).append(float(out.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(ref_tree)], check=False)
    print(f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, best of {args.rounds} rounds of median-of-11 "
          f"forward+backward, ms")
    names = list(cells)
    print(f"{'config':28s}" + "".join(f"{n:>16s}" for n in names) + "   speed-ups vs the first")
    for cfg in CONFIGS:
        t = [min(best[(cfg, n)]) for n in names]
        spread = max(statistics.pstdev(best[(cfg, n)]) for n in names) * 1e3
        print(f"{cfg:28s}" + "".join(f"{x * 1e3:13.1f} ms" for x in t)
              + "   " + ", ".join(f"{t[0] / x:.2f}x" for x in t[1:]) + f"   (round-to-round sd up to {spread:.0f} ms)")


if __name__ == "__main__":
    main()
