"""The quickstart's ground truth: spread of the table, noise, and how the short budget ranks against the long one.

    python experiments/search_fidelity/analyze.py experiments/search_fidelity/quickstart_table.csv

Prints every architecture's ground truth at each budget (its best lr's mean over seeds, the seed std there), the
spread (best minus median in noise bands), the seed-to-seed Spearman at the first budget (the ceiling any proxy can
reach), and the Spearman between the first budget's ranking and each longer budget's, over the architectures that
have both, with a bootstrap interval over seeds.
"""

from __future__ import annotations

import math
import random
import statistics
import sys

from hybridnas.replay import ground_truth, load_table, spearman


def bands(gap: float, band: float) -> str:
    return f"{gap / band:.1f}" if band > 0 else "inf"


def seed_reliability(rows, budget: float, lr_of: dict[str, float]) -> tuple[float, int]:
    """Mean pairwise seed-to-seed Spearman of the architectures' scores at ``budget`` (each at ``lr_of[arch]``),
    and the number of seeds every architecture has there."""
    by: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.budget == budget and r.arch_key in lr_of and r.lr == lr_of[r.arch_key]:
            by[(r.arch_key, r.seed)] = r.score
    seeds = sorted({s for _, s in by})
    keys = [k for k in lr_of if all((k, s) in by for s in seeds)]
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    if not pairs:
        return float("nan"), len(seeds)
    return statistics.fmean(spearman([by[(k, a)] for k in keys], [by[(k, b)] for k in keys]) for a, b in pairs), \
        len(seeds)


def brown(r: float, k: float) -> float:
    """Spearman-Brown: the reliability of a mean over k seeds from the single-seed reliability r."""
    return k * r / (1 + (k - 1) * r) if r > 0 else 0.0


def seeds_for(r: float, target: float) -> float:
    """Seeds whose mean reaches reliability ``target`` from single-seed reliability r (Spearman-Brown inverted)."""
    return target * (1 - r) / (r * (1 - target)) if r > 0 else math.inf


def main(path: str) -> None:
    rows = load_table(path)
    budgets = sorted({r.budget for r in rows})
    first = ground_truth(rows, budgets[0])
    longer = {b: ground_truth(rows, b) for b in budgets[1:]}
    print(f"{path}: {len(rows)} runs, budgets {budgets}, {len(first.archs)} architectures")
    head = f"{'pattern':8s} {'params':32s} {'1x best lr':>10s} {'1x score':>9s} {'1x std':>7s}"
    for b in budgets[1:]:
        head += f" {f'{b:g}x score':>10s} {f'{b:g}x std':>8s}"
    print(head)
    for a in sorted(first.archs.values(), key=lambda a: -a.score):
        extra = {k: v for k, v in a.params.items() if k != "pattern"}
        line = f"{a.pattern:8s} {str(extra):32s} {a.lr:10.3g} {a.score:9.4f} {a.std:7.4f}"
        for b in budgets[1:]:
            t = longer[b].archs.get(a.arch_key)
            line += f" {t.score:10.4f} {t.std:8.4f}" if t else f" {'-':>10s} {'-':>8s}"
        print(line)
    med = first.median_score()
    b = first.best
    print(f"best {b.pattern} {b.params} {b.score:.4f} (seed std {b.std:.4f}, band 2 SE {b.band:.4f}); median "
          f"{med:.4f}; best - median = {bands(b.score - med, b.band)} of the best's bands")
    print(f"pooled seed std over architectures {first.sigma:.4f} (band 2 SE {first.pooled_band:.4f}): best - median "
          f"= {bands(b.score - med, first.pooled_band)} pooled bands")
    mid = sorted(first.archs.values(), key=lambda a: a.score)[len(first.archs) // 2]
    gap_se = math.sqrt((b.std ** 2 / b.n_seeds) + (mid.std ** 2 / mid.n_seeds))
    print(f"best vs the median architecture ({mid.pattern} {mid.params} {mid.score:.4f}, std {mid.std:.4f}): "
          f"gap {b.score - mid.score:.4f} = {bands(b.score - mid.score, 2 * gap_se)} x 2 SE of the difference")
    # seed-to-seed ceiling at the first budget: rank by seed 0 against rank by seed 1, each at the arch's best lr
    seeds = sorted({r.seed for r in rows})
    by = {}
    for r in rows:
        if r.budget == budgets[0]:
            by[(r.arch_key, r.lr, r.seed)] = r.score
    if len(seeds) >= 2:
        keys = list(first.archs)
        s0 = [by.get((k, first.archs[k].lr, seeds[0])) for k in keys]
        s1 = [by.get((k, first.archs[k].lr, seeds[1])) for k in keys]
        print(f"seed-to-seed Spearman at {budgets[0]:g}x (seed {seeds[0]} vs {seeds[1]}): {spearman(s0, s1):.3f}")
    for b, truth in longer.items():
        keys = [k for k in first.archs if k in truth.archs]
        rho = spearman([first.archs[k].score for k in keys], [truth.archs[k].score for k in keys])
        # bootstrap over seeds: resample each architecture's runs (at its chosen lr) with replacement
        rng = random.Random(0)
        long_runs = {k: [r.score for r in rows if r.budget == b and r.arch_key == k] for k in keys}
        short_runs = {k: [r.score for r in rows if r.budget == budgets[0] and r.arch_key == k
                          and r.lr == first.archs[k].lr] for k in keys}
        boots = []
        for _ in range(1000):
            xs = [statistics.fmean(rng.choices(short_runs[k], k=len(short_runs[k]))) for k in keys]
            ys = [statistics.fmean(rng.choices(long_runs[k], k=len(long_runs[k]))) for k in keys]
            boots.append(spearman(xs, ys))
        boots = sorted(v for v in boots if v == v)
        lo, hi = boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]
        print(f"Spearman {budgets[0]:g}x vs {b:g}x over {len(keys)} architectures: {rho:.3f} "
              f"(bootstrap over seeds, 95%: {lo:.3f} to {hi:.3f})")
        solved = sum(truth.archs[k].score >= 0.99 for k in keys)
        print(f"  at {b:g}x, {solved} of {len(keys)} architectures reach a mean of 0.99 (the early-stop target): "
              "their order is ties broken by noise")
        # the anytime view: mean accuracy over the long run's evaluations (an early-stopped run keeps its last
        # value to the end), so reaching the target sooner ranks higher
        auc = {}
        for k in keys:
            vals = []
            for r in rows:
                if r.budget == b and r.arch_key == k and r.curve:
                    n_evals = max(len(r.curve), r.steps // r.curve[0][0])  # the first evaluation is at eval_every
                    accs = [a for _, _, a, _ in r.curve]
                    accs += [accs[-1]] * max(0, n_evals - len(accs))
                    vals.append(statistics.fmean(accs))
            auc[k] = statistics.fmean(vals)
        rho_auc = spearman([first.archs[k].score for k in keys], [auc[k] for k in keys])
        print(f"Spearman {budgets[0]:g}x score vs {b:g}x mean accuracy over the run (anytime view): {rho_auc:.3f}")
        # the noise ceiling: how well each budget's ranking reproduces itself from one seed to another bounds how
        # well any two rankings built from those seeds can agree (attenuation: observed <= sqrt(rel_1 * rel_b))
        r1, n1 = seed_reliability(rows, budgets[0], {k: first.archs[k].lr for k in keys})
        rb, nb = seed_reliability(rows, b, {k: truth.archs[k].lr for k in keys})
        rel1, relb = brown(r1, n1), brown(rb, nb)
        print(f"  noise ceiling: seed-to-seed Spearman {r1:.3f} at {budgets[0]:g}x ({n1} seeds: reliability of the "
              f"mean {rel1:.3f}), {rb:.3f} at {b:g}x ({nb} seeds: {relb:.3f}); the highest Spearman these seeds "
              f"can show between a perfect proxy and the truth is sqrt({rel1:.3f} x {relb:.3f}) = "
              f"{math.sqrt(rel1 * relb):.3f}")
        print(f"  a ceiling of 0.9 needs reliability 0.9 at both budgets: {math.ceil(seeds_for(r1, 0.9))} seeds "
              f"at {budgets[0]:g}x and {math.ceil(seeds_for(rb, 0.9))} at {b:g}x for this task")


if __name__ == "__main__":
    main(sys.argv[1])
