"""hybridnas search | show | export | plot | dashboard | train | sweep | replay | bench | validate.

Errors a user can fix (bad YAML, unknown study, missing file) print one clear message and exit 2;
Ctrl-C exits 130 after Optuna has recorded the interrupted trial, so re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from hybridnas.yamlio import ConfigError


def _space_or_study(arg: str, storage: str | None) -> tuple[str, str | None]:
    """STUDY may be a study name or the search-space YAML that made it."""
    if arg.endswith((".yaml", ".yml")) and Path(arg).exists():
        from hybridnas.config import load_space

        space = load_space(arg)
        return space.search.study_name or space.name, storage or space.search.storage
    return arg, storage


def _check_custom_symbols(space) -> None:
    """The layer contract's numerical checks (``registry.check_layer``) on each symbol the space declares, at its
    smallest d_model with the first option of each parameter; a failure is reported at the ``symbols`` entry."""
    from hybridnas import registry
    from hybridnas.config import ModelConfig, value_options

    d_model = min(value_options(space.model.get("d_model", ModelConfig.d_model)))
    for sym in space.symbols:
        spec = registry.get(sym)
        params = {k: value_options(v)[0] for k, v in space.model.get("layers", {}).get(spec.symbol, {}).items()}
        problems = registry.check_layer(spec, d_model, params)
        if problems:
            raise space.source.error(("symbols", sym), f"{sym} ({spec.name}) breaks the layer contract: "
                                     + "; ".join(problems))


def cmd_validate(args: argparse.Namespace) -> int:
    from hybridnas.config import load_arch, load_space
    from hybridnas.schema import Range

    for path in args.files:
        if args.arch:
            arch = load_arch(path)
            print(f"{path}: OK (architecture {arch.model.pattern!r}, d_model {arch.model.d_model})")
            continue
        space = load_space(path)
        _check_custom_symbols(space)
        searched = []
        for k, v in space.model.items():
            if k == "layers":
                for sym, params in v.items():
                    searched += [f"{sym}.{pk}" for pk, pv in params.items() if isinstance(pv, (list, Range))]
            elif isinstance(v, (list, Range)):
                searched.append(k)
        searched += [k for k, v in space.train.items() if isinstance(v, (list, Range))
                     and not (k == "lr" and space.search.lr_mode != "sample")]
        print(f"{path}: OK")
        print(f"  study {space.search.study_name or space.name!r}, task {space.task.name}, "
              f"{len(space.patterns())} pattern(s), objective {space.search.objective}, "
              f"sampler {space.search.sampler}, pruner {space.search.pruner}, {space.search.n_trials} trials")
        print(f"  searched: {', '.join(searched) or '(nothing: a single configuration)'}")
        if space.search.lr_mode != "sample":
            from hybridnas.ladder import ladder_from

            rates = ladder_from(space.train.get("lr", 1e-3), space.search.lr_ladder)
            print(f"  learning rate: {space.search.lr_mode} over {', '.join(f'{r:g}' for r in rates)} inside each "
                  "trial")
    return 0


def _fmt_values(values) -> str:
    return "-" if values is None else "/".join(f"{v:.4f}" for v in values)


def cmd_search(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.config import load_space

    space = load_space(args.space)
    if args.seed is not None:
        space.search.seed = args.seed
    s = space.search
    workers = args.workers or s.workers
    name = args.study or s.study_name or space.name
    total = args.n_trials if args.n_trials is not None else s.n_trials
    if workers > 1 and args.worker_index is None:
        from hybridnas.workers import run_workers

        url = search.resolve_storage(space, args.storage, args.study, workers)
        search.open_study(space, url, name, workers=workers)  # create it once, before the workers race to
        failed = run_workers(space, workers, storage=url, study_name=name, n_trials=total, timeout=args.timeout,
                             seed=args.seed, quiet=args.quiet)
        study = search.load_study(name, url)
        if failed:
            return 1
    else:
        study = search.run_search(space, storage=args.storage, study_name=args.study, n_trials=total,
                                  timeout=args.timeout, quiet=args.quiet, workers=workers,
                                  seed_offset=args.worker_index or 0)
    if args.worker_index is not None:
        return 0
    top_k = args.confirm_top if args.confirm_top is not None else s.confirm_top
    confirmed_best = None
    if top_k and len(study.directions) == 1:  # a Pareto front is exported whole: nothing to confirm
        from hybridnas.confirm import run_confirmation

        summary = run_confirmation(study, top_k, args.confirm_seeds or s.confirm_seeds,
                                   args.confirm_budget or s.confirm_budget, log=(lambda *a: None) if args.quiet
                                   else print)
        _print_confirmation(summary)
        confirmed_best = next((c for c in summary["rows"] if c.values), None)
    best = search.best_trial(study)
    if confirmed_best is not None:
        print(f"best (confirmed): trial {confirmed_best.trial.number} mean {confirmed_best.mean:.4f} "
              f"pattern {confirmed_best.trial.user_attrs.get('pattern')}")
    elif len(study.directions) > 1:
        print(f"Pareto front: {len(study.best_trials)} trial(s): "
              + ", ".join(f"#{t.number} {t.user_attrs.get('pattern')} {_fmt_values(t.values)}"
                          for t in study.best_trials))
    elif best is None:
        print("no trial completed")
        return 1
    else:
        print(f"best: trial {best.number} value {best.value:.4f} pattern {best.user_attrs.get('pattern')} "
              f"params {best.user_attrs.get('params')}")
    out = args.export or space.export.dir
    if out:
        from hybridnas.export import export_best, export_pareto

        if len(study.directions) > 1:
            path = export_pareto(study, out)
            print(f"exported the Pareto front to {path}/")
        else:
            path = export_best(study, out)
            print(f"exported the best trial to {path}/")
    return 0


def _print_confirmation(summary: dict) -> None:
    rows = summary["rows"]
    if not rows:
        return
    print("confirmation (ranked by confirmed mean):")
    print("  rank  trial  pattern  short-run  confirmed mean ± std  runs")
    for i, c in enumerate(rows, 1):
        print(f"  {i:<4}  {c.trial.number:<5}  {c.trial.user_attrs.get('pattern', '?'):<7}  "
              f"{c.trial.values[0]:.4f}     {c.mean:.4f} ± {c.std:.4f}         {len(c.values)}")
    rho = summary["spearman"]
    print(f"  Spearman(short-run, confirmed) = {rho:.3f}" if rho is not None
          else "  Spearman(short-run, confirmed): needs at least two confirmed trials with distinct values")


def cmd_show(args: argparse.Namespace) -> int:
    import optuna

    from hybridnas import search
    from hybridnas.confirm import summarize
    from hybridnas.plots import importances

    name, storage = _space_or_study(args.study, args.storage)
    study = search.load_study(name, storage)
    trials = [t for t in study.get_trials(deepcopy=False) if "over_cap" not in t.user_attrs]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    if args.sort == "score":
        def key(t):
            v = t.values[0] if t.values and math.isfinite(t.values[0]) else None
            return (v is None, -(v or 0) if maximize else (v or 0), t.number)

        trials = sorted(trials, key=key)
    if args.top:
        trials = trials[:args.top]
    names = study.metric_names or [study.user_attrs.get("objective", "value")]
    header = ["#", "state", "pattern", "params", "state_bytes", "score: " + "/".join(names), "duration", "note"]
    rows = []
    for t in trials:
        dur = t.duration.total_seconds() if t.duration is not None else None
        note = search.trial_note(t)
        if t.state == optuna.trial.TrialState.PRUNED and search.bookkeeping(t) is None:
            note = ", ".join(filter(None, [f"pruned at step {t.user_attrs.get('pruned_at_step', t.last_step)}",
                                           note]))
        if t.state == optuna.trial.TrialState.FAIL and not note:
            note = "interrupted (re-run on resume)"
        pattern = t.user_attrs.get("pattern") or t.user_attrs.get("pattern_repaired", "?")
        rows.append([str(t.number), t.state.name, str(pattern),
                     f"{t.user_attrs['params']:,}" if "params" in t.user_attrs else "-",
                     f"{t.user_attrs['state_bytes']:,}" if "state_bytes" in t.user_attrs else "-",
                     _fmt_values(t.values), f"{dur:.1f}s" if dur is not None else "-", note])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"study {study.study_name!r}: {len(trials)} trials ({search.finished_count(study)} trained), "
          + ", ".join(f"{d.name.lower()} {n}" for d, n in zip(study.directions, names, strict=False)))
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    best = search.best_trial(study)
    if best is not None:
        print(f"best: trial {best.number} ({best.value:.4f}) {best.user_attrs.get('pattern')}")
    elif len(study.directions) > 1:
        print("Pareto front: " + ", ".join(f"#{t.number}" for t in study.best_trials))
    imp = importances(study)
    if imp:
        print("parameter importances (" + names[0] + "): "
              + ", ".join(f"{k} {v:.2f}" for k, v in list(imp.items())[:8]))
    _print_confirmation(summarize(study))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.export import export_best, export_pareto, export_trial

    name, storage = _space_or_study(args.study, args.storage)
    study = search.load_study(name, storage)
    if args.pareto:
        path = export_pareto(study, args.out)
    elif args.trial is not None:
        matches = [t for t in study.trials if t.number == args.trial]
        if not matches:
            print(f"error: study {name!r} has no trial {args.trial}", file=sys.stderr)
            return 2
        path = export_trial(study, matches[0], args.out)
    else:
        path = export_best(study, args.out)
    print(f"exported to {path}/")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.plots import plot_study

    name, storage = _space_or_study(args.study, args.storage)
    written = plot_study(search.load_study(name, storage), args.out, top_fraction=args.top_fraction)
    for p in written:
        print(p)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.storage import find_storage, make_storage

    name, storage = _space_or_study(args.study, args.storage)
    url = storage or find_storage(name)
    search.load_study(name, url)  # a clear error for a missing study, before the server starts
    try:
        import optuna_dashboard
    except ImportError:
        print("error: optuna-dashboard is not installed: pip install optuna-dashboard", file=sys.stderr)
        return 2
    print(f"optuna-dashboard for {url} on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(make_storage(url), host=args.host, port=args.port)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hybridnas.checkpoint import save_checkpoint
    from hybridnas.config import load_arch
    from hybridnas.tasks import build_task
    from hybridnas.trainers import trainer_for

    arch = load_arch(args.arch)
    if args.steps is not None:
        arch.train.steps = args.steps
    data = build_task(arch.task.name, arch.task.build_config())
    hparams = {"pattern": arch.model.pattern, "d_model": arch.model.d_model, "lr": arch.train.lr}

    def on_eval(step: int, ev: dict) -> None:
        if not args.quiet:
            print(f"step {step:6d}  valid loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}  "
                  f"train loss {ev['train_loss']:.4f}", flush=True)

    result = trainer_for(arch.task.name)(arch, data, on_eval=on_eval, log_dir=args.log_dir, hparams=hparams)
    print(json.dumps(result.metrics, indent=2))
    if args.out:
        save_checkpoint(args.out, arch, result.model.to("cpu"))
        print(f"saved to {args.out}/")
    return 0 if result.metrics["stop_reason"] != "nan" else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from hybridnas import bench

    return bench.main(args)


def _floats(text: str | None, what: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of numbers, got {text!r}") from None


def cmd_doctor(args: argparse.Namespace) -> int:
    from hybridnas import doctor

    return doctor.run(interpret=args.interpret)


def cmd_sweep(args: argparse.Namespace) -> int:
    from hybridnas.config import load_space
    from hybridnas.sweep import SweepPlan, enumerate_space, lr_ladder, open_sweep_study, run_sweep, write_table

    space = load_space(args.space)
    seeds = [int(v) for v in _floats(args.seed_list, "--seed-list")] if args.seed_list else list(range(args.seeds))
    plan = SweepPlan(space, enumerate_space(space), lr_ladder(space, args.n_lrs, _floats(args.lrs, "--lrs")), seeds,
                     _floats(args.budgets, "--budgets") or [1.0], args.long_lrs)
    log = (lambda *a: None) if args.quiet else print
    log(f"sweep of {space.name!r}: {len(plan.candidates)} architectures x lrs {plan.lrs} x seeds {plan.seeds} at "
        f"budget {plan.budgets[0]:g}x, then budgets {plan.budgets[1:]} at {args.long_lrs} lr: {plan.total()} runs")
    if args.workers > 1 and not args.table_only:
        from hybridnas.sweep import run_sweep_workers, sweep_study_name

        name = args.study or sweep_study_name(space)
        storage = args.storage or f"runs/{name}.journal"
        open_sweep_study(space, storage, name)  # created once, before the workers start
        argv = [args.space, "--study", name, "--n-lrs", str(args.n_lrs), "--budgets", args.budgets,
                "--long-lrs", args.long_lrs, "--seed-list", ",".join(map(str, seeds))]
        if args.lrs:
            argv += ["--lrs", args.lrs]
        log(f"{args.workers} workers on {storage}; logs in runs/{name}/")
        failed = run_sweep_workers(argv, args.workers, storage, f"runs/{name}")
        study = open_sweep_study(space, storage, name)
        if failed:
            print(f"{failed} worker(s) exited with an error; see runs/{name}/", file=sys.stderr)
            return 1
    elif args.table_only:
        study = open_sweep_study(space, args.storage, args.study)
    else:
        study = run_sweep(plan, storage=args.storage, study_name=args.study, max_runs=args.max_runs, log=log)
    if args.out:
        n = write_table(study, args.out)
        print(f"wrote {n} runs to {args.out}")
    return 0


def _overrides(text: str) -> list[dict[str, str]]:
    """``"sampler=tpe,random;pruner=hyperband,none"`` -> every combination as a dict of search settings."""
    import itertools

    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        if not values:
            raise ValueError(f"--compare: {part!r} must look like key=value1,value2")
        axes.append([(key.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def _bands(gap: float, band: float) -> str:
    return f"{gap / band:.1f}" if band > 0 else "inf"


def cmd_replay(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hybridnas.config import load_space
    from hybridnas.replay import ground_truth, load_table, replay, write_comparison
    from hybridnas.validation import check_search_overrides

    space = load_space(args.space)
    rows = load_table(args.table)
    base = {k: v for k, v in (("sampler", args.sampler), ("pruner", args.pruner), ("lr_mode", args.lr_mode),
                              ("prune_after", args.prune_after), ("n_trials", args.n_trials)) if v is not None}
    combos = [{**base, **c} for c in _overrides(args.compare or "")]
    truth = ground_truth(rows, args.budget, space.directions()[0] == "maximize")
    best = truth.best
    print(f"table {args.table}: {len(truth.archs)} architectures at budget {args.budget:g}x; best {best.pattern} "
          f"{best.params} {best.score:.4f} at lr {best.lr:g} (its noise band {truth.band:.4f}); median "
          f"{truth.median_score():.4f}; pooled seed std {truth.sigma:.4f} (band {truth.pooled_band:.4f}); "
          f"best - median = {_bands(best.score - truth.median_score(), truth.band)} of the best's bands, "
          f"{_bands(best.score - truth.median_score(), truth.pooled_band)} pooled bands")
    summaries = []
    for combo in combos:
        settings = check_search_overrides(space.search, combo)
        sp = replace(space, search=settings)
        label = ", ".join(f"{k}={v}" for k, v in combo.items()) or "as the space says"
        summary = replay(sp, rows, args.seeds, budget=args.budget, label=label, first_seed=args.first_seed)
        summaries.append(summary)
        exported = {}
        for r in summary.results:
            exported[r.pattern] = exported.get(r.pattern, 0) + 1
        print(f"{label}: {summary.line()}  (exported: "
              + ", ".join(f"{p} x{n}" for p, n in sorted(exported.items(), key=lambda kv: -kv[1])) + ")")
    if args.out:
        write_comparison(summaries, args.out)
        print(f"wrote {args.out}.png and {args.out}.json")
    print(summaries[0].line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridnas", description="Architecture search over hybrid sequence models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run or resume the search a YAML space describes")
    s.add_argument("space", help="search-space YAML")
    s.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/<study>.db) or a journal file path")
    s.add_argument("--study", help="study name (default: the space's search.study_name or name)")
    s.add_argument("--n-trials", type=int, help="total trained trials to reach (default: search.n_trials)")
    s.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    s.add_argument("--seed", type=int, help="sampler seed (overrides search.seed)")
    s.add_argument("--export", metavar="DIR", help="export the best trial to DIR when done")
    s.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    s.add_argument("--workers", type=int, help="local worker processes on this study (default: search.workers)")
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.add_argument("--confirm-top", type=int, metavar="K",
                   help="re-train the K best on new seeds (default: search.confirm_top, 3; 0 skips)")
    s.add_argument("--confirm-seeds", type=int, metavar="S",
                   help="new seeds per confirmed trial (default: search.confirm_seeds, 1)")
    s.add_argument("--confirm-budget", type=float, metavar="X",
                   help="steps multiplier for confirmation (default: search.confirm_budget, 1)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("show", help="print a table of a study's trials")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--storage")
    s.add_argument("--sort", choices=["number", "score"], default="number")
    s.add_argument("--top", type=int, help="only the first N rows")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("export", help="write the best (or a chosen) trial as a loadable folder")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--trial", type=int, help="trial number (default: the best)")
    s.add_argument("--pareto", action="store_true", help="export every Pareto-optimal trial (multi-objective)")
    s.add_argument("--storage")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("plot", help="write PNG plots of a study")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--top-fraction", type=float, default=0.25, help="best trials used for the symbol heatmap")
    s.add_argument("--storage")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("dashboard", help="start optuna-dashboard on a study's storage")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--storage")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("train", help="train one architecture YAML and print its metrics")
    s.add_argument("arch", help="architecture YAML (or an export's architecture.yaml)")
    s.add_argument("--steps", type=int, help="override train.steps")
    s.add_argument("--log-dir", help="TensorBoard log folder")
    s.add_argument("--out", help="save architecture.yaml, config.json and model.safetensors here")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("bench", help="time a mixer's forward and forward+backward over backends and lengths")
    s.add_argument("--mixer", required=True, help="registered symbol, e.g. M")
    s.add_argument("--params", default="", help="layer parameters, e.g. variant=mamba3,mimo_rank=2,d_state=32")
    s.add_argument("--backends", default="naive,chunked",
                   help="comma list: naive, chunked, triton, auto, or a peer (mamba3-ssm, mamba3-ssm-proj, "
                        "fla-simple-gla, fla-rwkv7, mamba-ssm-ssd, mamba-ssm-mamba3, sdpa); ratios vs the first")
    s.add_argument("--seq-lens", default="1024", help="comma list of sequence lengths")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--d-model", type=int, default=128)
    s.add_argument("--repeat", type=int, default=3, help="timed runs per cell (the median is reported)")
    s.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    s.add_argument("--budget", type=float, help="seconds per cell: a slower path is run fewer times (at least once)")
    s.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    s.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    s.add_argument("--device", default="cpu", help="cpu or cuda (the triton backend and the GPU peers need cuda)")
    s.add_argument("--dtype", default="float32", help="float32, bf16 or fp16 for the layer, peers and input")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    s.add_argument("--compile", action="store_true",
                   help="also time each backend through torch.compile (rows <backend>+compile, compiled in warm-up)")
    s.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile (inductor)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="train every architecture of a finite space over an lr ladder, seeds and "
                                     "budgets: the ground-truth table (resumable, shareable by many workers)")
    s.add_argument("space", help="search-space YAML (finite: lists of choices)")
    s.add_argument("--out", help="write the table (CSV, one row per run) here when done")
    s.add_argument("--lrs", help="comma list of learning rates (default: --n-lrs points over the space's lr range)")
    s.add_argument("--n-lrs", type=int, default=3, help="ladder length when --lrs is not given (default 3)")
    s.add_argument("--seeds", type=int, default=2, help="seeds 0..S-1 (default 2)")
    s.add_argument("--seed-list", help="comma list of seeds (overrides --seeds)")
    s.add_argument("--budgets", default="1", help="comma list of step multipliers, first one at every lr (e.g. 1,10)")
    s.add_argument("--long-lrs", choices=["best", "all"], default="best",
                   help="longer budgets at each architecture's best lr (default) or at every lr")
    s.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/<study>.db) or a journal file path")
    s.add_argument("--study", help="study name (default: <space name>-sweep)")
    s.add_argument("--max-runs", type=int, help="stop after this many runs in this process")
    s.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study (a journal file "
                                                          "under runs/ by default), cores // N threads each")
    s.add_argument("--table-only", action="store_true", help="write the table from the study without training")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("replay", help="replay the search loop against a sweep table over many seeds: hit rate, "
                                      "compute and regret of a search strategy")
    s.add_argument("space", help="the search-space YAML the table was swept from")
    s.add_argument("--table", required=True, help="the sweep's table (hybridnas sweep --out)")
    s.add_argument("--seeds", type=int, default=20, help="search seeds to replay (default 20)")
    s.add_argument("--first-seed", type=int, default=0)
    s.add_argument("--budget", type=float, default=1.0, help="the table budget the search runs at (default 1)")
    s.add_argument("--sampler", help="override search.sampler")
    s.add_argument("--pruner", help="override search.pruner")
    s.add_argument("--lr-mode", help="override search.lr_mode (sample, ladder, halving)")
    s.add_argument("--prune-after", type=float, help="override search.prune_after")
    s.add_argument("--n-trials", type=int, help="override search.n_trials")
    s.add_argument("--compare", help="strategies to compare, e.g. 'sampler=tpe,random;pruner=hyperband,none' "
                                     "(every combination; the last line is the first combination's)")
    s.add_argument("--out", help="write OUT.png (hit rate and regret against compute) and OUT.json")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("doctor", help="versions, devices, the backend each op gets on each device, and the Triton "
                                      "self-checks")
    s.add_argument("--interpret", action="store_true",
                   help="on CPU, check the Triton kernels under TRITON_INTERPRET=1 (slow; CPU training skips them)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("validate", help="check search-space YAML files without training anything")
    s.add_argument("files", nargs="+")
    s.add_argument("--arch", action="store_true", help="the files are architecture files, not search spaces")
    s.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    from hybridnas.runtime import tune_malloc

    tune_malloc()  # large CPU temporaries reused, not re-faulted every step
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
