"""hybridnas search | show | export | train | validate.

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


def cmd_validate(args: argparse.Namespace) -> int:
    from hybridnas.config import Range, load_arch, load_space

    for path in args.files:
        if args.arch:
            arch = load_arch(path)
            print(f"{path}: OK (architecture {arch.model.pattern!r}, d_model {arch.model.d_model})")
            continue
        space = load_space(path)
        searched = []
        for k, v in space.model.items():
            if k == "layers":
                for sym, params in v.items():
                    searched += [f"{sym}.{pk}" for pk, pv in params.items() if isinstance(pv, (list, Range))]
            elif isinstance(v, (list, Range)):
                searched.append(k)
        searched += [k for k, v in space.train.items() if isinstance(v, (list, Range))]
        print(f"{path}: OK")
        print(f"  study {space.search.study_name or space.name!r}, task {space.task.name}, "
              f"{len(space.patterns())} pattern(s), objective {space.search.objective}, "
              f"sampler {space.search.sampler}, pruner {space.search.pruner}, {space.search.n_trials} trials")
        print(f"  searched: {', '.join(searched) or '(nothing: a single configuration)'}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.config import load_space

    space = load_space(args.space)
    if args.seed is not None:
        space.search.seed = args.seed
    study = search.run_search(space, storage=args.storage, study_name=args.study, n_trials=args.n_trials,
                              timeout=args.timeout, quiet=args.quiet)
    best = search.best_trial(study)
    if best is None:
        print("no trial completed")
        return 1
    print(f"best: trial {best.number} value {best.value:.4f} pattern {best.user_attrs.get('pattern')} "
          f"params {best.user_attrs.get('params')}")
    out = args.export or space.export.dir
    if out:
        from hybridnas.export import export_best

        path = export_best(study, out)
        print(f"exported trial {best.number} to {path}/")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import optuna

    from hybridnas import search

    name, storage = _space_or_study(args.study, args.storage)
    study = search.load_study(name, storage)
    trials = study.get_trials(deepcopy=False)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    if args.sort == "score":
        def key(t):
            v = t.value if t.value is not None and math.isfinite(t.value) else None
            return (v is None, -(v or 0) if maximize else (v or 0), t.number)

        trials = sorted(trials, key=key)
    if args.top:
        trials = trials[:args.top]
    header = ["#", "state", "pattern", "params", "state_bytes", "score", "duration", "note"]
    rows = []
    for t in trials:
        dur = t.duration.total_seconds() if t.duration is not None else None
        note = t.user_attrs.get("fail_reason", "")
        if "duplicate_of" in t.user_attrs:
            note = f"duplicate of #{t.user_attrs['duplicate_of']}"
        if t.state == optuna.trial.TrialState.PRUNED:
            note = f"pruned at step {t.user_attrs.get('pruned_at_step', t.last_step)}"
        rows.append([str(t.number), t.state.name, str(t.user_attrs.get("pattern", "?")),
                     f"{t.user_attrs['params']:,}" if "params" in t.user_attrs else "-",
                     f"{t.user_attrs['state_bytes']:,}" if "state_bytes" in t.user_attrs else "-",
                     f"{t.value:.4f}" if t.value is not None else "-",
                     f"{dur:.1f}s" if dur is not None else "-", note])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"study {study.study_name!r}: {len(study.trials)} trials, {study.direction.name.lower()} "
          f"{study.user_attrs.get('objective', 'value')}")
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    best = search.best_trial(study)
    if best is not None:
        print(f"best: trial {best.number} ({best.value:.4f}) {best.user_attrs.get('pattern')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.export import export_best, export_trial

    name, storage = _space_or_study(args.study, args.storage)
    study = search.load_study(name, storage)
    if args.trial is not None:
        matches = [t for t in study.trials if t.number == args.trial]
        if not matches:
            print(f"error: study {name!r} has no trial {args.trial}", file=sys.stderr)
            return 2
        path = export_trial(study, matches[0], args.out)
    else:
        path = export_best(study, args.out)
    print(f"exported to {path}/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hybridnas.config import load_arch
    from hybridnas.export import save_checkpoint
    from hybridnas.tasks import build_task, trainer_for

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridnas", description="Architecture search over hybrid sequence models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run or resume the search a YAML space describes")
    s.add_argument("space", help="search-space YAML")
    s.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/<study>.db) or a journal file path")
    s.add_argument("--study", help="study name (default: the space's search.study_name or name)")
    s.add_argument("--n-trials", type=int, help="total finished trials to reach (default: search.n_trials)")
    s.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    s.add_argument("--seed", type=int, help="sampler seed (overrides search.seed)")
    s.add_argument("--export", metavar="DIR", help="export the best trial to DIR when done")
    s.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
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
    s.add_argument("--storage")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("train", help="train one architecture YAML and print its metrics")
    s.add_argument("arch", help="architecture YAML (or an export's architecture.yaml)")
    s.add_argument("--steps", type=int, help="override train.steps")
    s.add_argument("--log-dir", help="TensorBoard log folder")
    s.add_argument("--out", help="save architecture.yaml, config.json and model.safetensors here")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("validate", help="check search-space YAML files without training anything")
    s.add_argument("files", nargs="+")
    s.add_argument("--arch", action="store_true", help="the files are architecture files, not search spaces")
    s.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
