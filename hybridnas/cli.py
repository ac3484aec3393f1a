"""hybridnas search | show | export | plot | dashboard | storage-proxy | train | eval | generate | serve | sweep
| replay | distill-search | bench | validate.

Errors a user can fix (bad YAML, unknown study, missing file, a storage that cannot be opened, a bad number on the
command line) print one clear line each and exit 2; a bug in a trial's code prints its traceback once and the
trial's parameters, and exits 1; a search that ends short of its target for another reason than its time limit
says so and exits 1; Ctrl-C exits 130 after Optuna has recorded the interrupted trial, so re-running resumes; a
closed pipe (``hybridnas show X | head -1``) exits 141 without a word, as a process killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

from hybridnas.yamlio import ConfigError


def _print_error(e: BaseException) -> None:
    """``error: ...`` on stderr, one line per problem (a :class:`~hybridnas.yamlio.ConfigErrors` holds several)."""
    for line in str(e).splitlines() or [type(e).__name__]:
        print(f"error: {line}", file=sys.stderr)


def _space_or_study(arg: str, storage: str | None) -> tuple[str, str | None]:
    """STUDY may be a study name or the search-space YAML that made it. Only the space's name and its search
    section's ``study_name`` and ``storage`` are read: nothing it names (custom layers) is imported."""
    if arg.endswith((".yaml", ".yml")) and Path(arg).exists():
        from hybridnas.validation import check_value
        from hybridnas.yamlio import load_file

        data, src = load_file(arg)
        if not isinstance(data, dict):
            raise src.error((), "expected a search space: a mapping with name, task, model, train, search")
        name = check_value(data.get("name") or Path(arg).stem, str, ("name",), src)
        search_section = data.get("search") or {}
        if not isinstance(search_section, dict):
            raise src.error(("search",), "expected a mapping of search settings")
        study = search_section.get("study_name")
        url = search_section.get("storage")
        study = name if study is None else check_value(study, str, ("search", "study_name"), src)
        url = None if url is None else check_value(url, str, ("search", "storage"), src)
        return study, storage or url
    return arg, storage


def _trusted(args: argparse.Namespace, space=None):
    """What ``--trust-custom-code`` allows: everything, or else the import paths the user's own space named."""
    if getattr(args, "trust_custom_code", False):
        return True
    return list(space.symbols.values()) if space is not None else False


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
    """Every file is checked and every error of each is printed; exit 2 if any file has one."""
    bad = 0
    for path in args.files:
        try:
            _validate_file(path, args.arch, args.trust_custom_code)
        except ConfigError as e:
            _print_error(e)
            bad += 1
    return 2 if bad else 0


def _validate_file(path: str, arch_file: bool, trust: bool) -> None:
    from hybridnas.config import load_arch, load_space
    from hybridnas.schema import Range

    if arch_file:
        arch = load_arch(path, trust_custom_code=trust)
        print(f"{path}: OK (architecture {arch.model.pattern!r}, d_model {arch.model.d_model})")
        return
    if _is_distill_file(path):
        _validate_distill(path, trust)
        return
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


def _is_distill_file(path: str) -> bool:
    """A ``distill-search`` file names a teacher and no model (a search space is the other way round)."""
    from hybridnas.yamlio import load_file

    try:
        data, _ = load_file(path)
    except (ConfigError, OSError):
        return False  # load_space reports it
    return isinstance(data, dict) and "teacher" in data and "model" not in data


def _validate_distill(path: str, trust: bool) -> None:
    from hybridnas import patterns
    from hybridnas.config import load_distill_space

    space = load_distill_space(path, trust_custom_code=trust)
    pattern = space.teacher_pattern
    attn = [i for i, s in enumerate(patterns.to_primary(pattern)) if s == "A"]
    st = space.student
    limit = f"keep {st.keep}" if st.keep is not None else ""
    if st.budget is not None:
        b = st.budget
        limit += (", " if limit else "") + (f"state_bytes {b.state_bytes:g}" if b.state_bytes is not None
                                            else f"decode_ms {b.decode_ms:g}")
    print(f"{path}: OK (a distill-search file)")
    print(f"  teacher {space.teacher}: pattern {pattern!r}, attention at {attn}")
    print(f"  student {st.symbol} ({st.init} init), {limit}, select {space.select}, compare "
          f"{', '.join(space.compare) or 'nothing'}; {len(attn) + 1} scoring runs of {space.distill.score_steps} "
          f"steps, {(1 + len(space.compare)) * len(space.distill.seeds)} final runs of {space.distill.final_steps}")


def _fmt_values(values) -> str:
    return "-" if values is None else "/".join(f"{v:.4f}" for v in values)


def _check_search_args(args: argparse.Namespace) -> None:
    """Counts and amounts on the command line, refused in one line before anything is opened."""
    for flag, value, low in (("--n-trials", args.n_trials, 1), ("--workers", args.workers, 1),
                             ("--confirm-top", args.confirm_top, 0), ("--confirm-seeds", args.confirm_seeds, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be {'a positive integer' if low else '0 or more'}, got {value}")
    for flag, value in (("--timeout", args.timeout), ("--confirm-budget", args.confirm_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value:g}")
    if math.isnan(args.progress_after) or args.progress_after < 0:
        raise ValueError(f"--progress-after must be 0 or more seconds, got {args.progress_after:g}")


def _trial_error(e) -> int:
    """A bug in a trial's code: its traceback once, then one line naming the trial, its parameters and the error."""
    traceback.print_exception(e.error)
    print(f"error: {e}; the search stopped: this is a bug in the code the trial ran, not a failure of the "
          "candidate. Fix it and run the same command again to resume (the trial runs again), or set "
          "search.on_error: record to record such errors as failed trials and go on", file=sys.stderr)
    return 1


def cmd_search(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.config import load_space

    _check_search_args(args)
    space = load_space(args.space)
    if args.seed is not None:
        space.search.seed = args.seed
    if args.dry_run:
        from hybridnas.dryrun import candidates, render

        if args.dry_run_n < 1:
            raise ValueError(f"--dry-run-n must be at least 1, got {args.dry_run_n}")
        rows, finite = candidates(space, args.dry_run_n)
        print(render(space, rows, finite))
        return 0
    s = space.search
    workers = args.workers if args.workers is not None else s.workers
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
        if search.finished_count(study) < total and not (args.timeout or s.timeout):
            return 1  # run_workers said how far it got; no confirmation or export of a study short of its target
    else:
        report: dict = {}
        try:
            study = search.run_search(space, storage=args.storage, study_name=args.study, n_trials=total,
                                      timeout=args.timeout, quiet=args.quiet, workers=workers,
                                      seed_offset=args.worker_index or 0, report=report,
                                      progress_after=args.progress_after)
        except search.TrialError as e:
            return _trial_error(e)
        if args.worker_index is None and report.get("short") not in (None, "timeout"):
            return 1  # it said why; no confirmation or export of a study short of its target
    if args.worker_index is not None:
        return 0
    top_k = args.confirm_top if args.confirm_top is not None else s.confirm_top
    confirmed_best = None
    if top_k and len(study.directions) == 1:  # a Pareto front is exported whole: nothing to confirm
        from hybridnas.confirm import run_confirmation

        summary = run_confirmation(study, top_k, args.confirm_seeds or s.confirm_seeds,
                                   args.confirm_budget or s.confirm_budget, log=(lambda *a: None) if args.quiet
                                   else print, trust_custom_code=_trusted(args, space))
        _print_confirmation(summary)
        confirmed_best = next((c for c in summary["rows"] if c.values), None)
    best = search.best_trial(study)
    if confirmed_best is not None:
        print(f"best (confirmed): trial {confirmed_best.trial.number} mean {confirmed_best.mean:.4f} "
              f"pattern {confirmed_best.trial.user_attrs.get('pattern')}")
    elif len(study.directions) > 1:
        from hybridnas.plots import pareto_front

        front = pareto_front(study)  # each architecture once: a duplicate proposal shares its original's values
        print(f"Pareto front: {len(front)} trial(s): "
              + ", ".join(f"#{t.number} {t.user_attrs.get('pattern')} {_fmt_values(t.values)}" for t in front))
    elif best is None:
        print("no trial completed")
        return 1
    else:
        print(f"best: trial {best.number} value {best.value:.4f} pattern {best.user_attrs.get('pattern')} "
              f"params {best.user_attrs.get('params')}")
    out = args.export or space.export.dir
    if out:
        from hybridnas.export import export_best, export_pareto

        trust = _trusted(args, space)
        if len(study.directions) > 1:
            path = export_pareto(study, out, trust_custom_code=trust)
            print(f"exported the Pareto front to {path}/")
        else:
            path = export_best(study, out, trust_custom_code=trust)
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
    # every sampled parameter, in the order the trials first name them (a sampled `pattern` is the pattern column)
    settings: list[str] = []
    for t in trials:
        settings += [k for k in t.params if k not in settings and k != "pattern"]
    score_cols = ["score"] if len(names) == 1 else [f"score_{n}" for n in names]
    # text tasks report bits per byte (comparable across tokenizers): a column when any trial has it
    bpb = ["bits_per_byte"] if any("bits_per_byte" in (t.user_attrs.get("metrics") or {}) for t in trials) else []
    csv_header = ["number", "state", "pattern", "params", "state_bytes", *score_cols, *bpb, "steps", *settings,
                  "duration_s", "note"]
    header = ["#", "state", "pattern", "params", "state_bytes", "score: " + "/".join(names), *bpb, "steps",
              *settings, "duration", "note"]
    rows, raw_rows = [], []
    for t in trials:
        dur = t.duration.total_seconds() if t.duration is not None else None
        note = search.trial_note(t)
        if t.state == optuna.trial.TrialState.PRUNED and search.bookkeeping(t) is None:
            note = ", ".join(filter(None, [f"pruned at step {t.user_attrs.get('pruned_at_step', t.last_step)}",
                                           note]))
        if t.state == optuna.trial.TrialState.FAIL and not note:
            note = "interrupted (re-run on resume)"
        pattern = t.user_attrs.get("pattern") or t.user_attrs.get("pattern_repaired", "?")
        steps = (t.user_attrs.get("metrics") or {}).get("steps")
        if steps is None and t.state == optuna.trial.TrialState.PRUNED:
            steps = t.user_attrs.get("pruned_at_step", t.last_step)
        values = list(t.values) if t.values else [None] * len(score_cols)
        bpb_v = [(t.user_attrs.get("metrics") or {}).get("bits_per_byte")] if bpb else []
        raw_rows.append([t.number, t.state.name, pattern, t.user_attrs.get("params"), t.user_attrs.get("state_bytes"),
                         *values, *bpb_v, steps, *[t.params.get(k) for k in settings],
                         None if dur is None else round(dur, 3), note])
        rows.append([str(t.number), t.state.name, str(pattern),
                     f"{t.user_attrs['params']:,}" if "params" in t.user_attrs else "-",
                     f"{t.user_attrs['state_bytes']:,}" if "state_bytes" in t.user_attrs else "-",
                     _fmt_values(t.values), *["-" if v is None else f"{v:.3f}" for v in bpb_v],
                     "-" if steps is None else str(steps),
                     *[_fmt_setting(t.params[k]) if k in t.params else "-" for k in settings],
                     f"{dur:.1f}s" if dur is not None else "-", note])
    if args.format == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(csv_header)
        w.writerows([["" if v is None else v for v in r] for r in raw_rows])
        return 0
    if args.format == "md":
        def cell(c: str) -> str:
            return c.replace("|", "\\|") or " "

        print("| " + " | ".join(cell(c) for c in header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            print("| " + " | ".join(cell(c) for c in r) + " |")
        return 0
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


def _fmt_setting(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_export(args: argparse.Namespace) -> int:
    from hybridnas import search
    from hybridnas.export import export_best, export_pareto, export_trial

    name, storage = _space_or_study(args.study, args.storage)
    study = search.load_study(name, storage)
    trust = _trusted(args)
    if args.pareto:
        path = export_pareto(study, args.out, trust_custom_code=trust)
    elif args.trial is not None:
        matches = [t for t in study.trials if t.number == args.trial]
        if not matches:
            print(f"error: study {name!r} has no trial {args.trial}", file=sys.stderr)
            return 2
        path = export_trial(study, matches[0], args.out, trust_custom_code=trust)
    else:
        path = export_best(study, args.out, trust_custom_code=trust)
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


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    import signal

    from hybridnas.storage import run_proxy

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill`, a job scheduler or Kubernetes stop it as Ctrl-C does
    try:
        run_proxy(args.storage, args.host, args.port)
    except KeyboardInterrupt:
        print("storage proxy stopped", file=sys.stderr)
    return 0


def _train_source(arg: str) -> tuple[str, Path | None]:
    """ARCH may be an architecture YAML or a model folder (an export, a ``train --out``): its architecture.yaml,
    and the folder whose weights the run starts from."""
    p = Path(arg)
    if p.is_dir():
        from hybridnas.checkpoint import ARCH_FILE, WEIGHTS_FILE

        if not (p / ARCH_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{arg}: a folder to train further needs {ARCH_FILE} and {WEIGHTS_FILE}")
        return str(p / ARCH_FILE), p
    return arg, None


def cmd_train(args: argparse.Namespace) -> int:
    from hybridnas import train as train_mod
    from hybridnas.checkpoint import (
        TRAIN_LOG,
        checkpoint_steps,
        latest_train_checkpoint,
        load_train_checkpoint,
        load_weights_into,
        save_checkpoint,
        save_train_checkpoint,
    )
    from hybridnas.config import load_arch
    from hybridnas.model import HybridLM
    from hybridnas.tasks import build_task
    from hybridnas.trainers import trainer_for

    for opt, value in (("--checkpoint-every", args.checkpoint_every), ("--keep", args.keep),
                       ("--steps", args.steps), ("--stop-after", args.stop_after)):
        if value is not None and value < 1:
            raise ValueError(f"{opt} must be at least 1, got {value}")
    needs_out = [o for o, v in (("--checkpoint-every", args.checkpoint_every), ("--resume", args.resume),
                                ("--stop-after", args.stop_after)) if v]
    if needs_out and not args.out:
        raise ValueError(f"{needs_out[0]} needs --out DIR (the checkpoints are written under DIR/checkpoints)")
    arch_path, weights_from = _train_source(args.arch)
    arch = load_arch(arch_path, trust_custom_code=args.trust_custom_code)
    if args.preset is not None:
        if weights_from is not None:
            raise ValueError(f"--preset changes the model's size; it cannot train the weights in {args.arch} further")
        from hybridnas.presets import apply_preset

        arch = apply_preset(arch, args.preset)
    if args.steps is not None:
        arch.train.steps = args.steps
    resume_from = None
    if args.out:
        out = Path(args.out)
        if args.resume:
            resume_from = latest_train_checkpoint(out)
            if resume_from is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'} "
                                        "(train with --checkpoint-every N first)")
        elif checkpoint_steps(out):
            raise ValueError(f"{out} already holds checkpoints of a run: pass --resume to continue it, or choose "
                             "another --out")
    data = build_task(arch.task.name, arch.task.build_config())
    hparams = {"pattern": arch.model.pattern, "d_model": arch.model.d_model, "lr": arch.train.lr}

    def on_eval(step: int, ev: dict) -> None:
        if log is not None:
            log({k: v for k, v in ev.items() if isinstance(v, (int, float))})
        if not args.quiet:
            print(f"step {step:6d}  valid loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}  "
                  f"train loss {ev['train_loss']:.4f}", flush=True)

    trainer = trainer_for(arch.task.name)
    if trainer is not train_mod.train:
        if needs_out or weights_from is not None:
            raise ValueError(f"task {arch.task.name!r} trains several runs per architecture: checkpoints, "
                             "--resume, --stop-after and training a folder further need a single-run task")
        log = None
        result = trainer(arch, data, on_eval=on_eval, log_dir=args.log_dir, hparams=hparams)
    else:
        start_model = None
        if resume_from is not None:
            from hybridnas.checkpoint import ARCH_FILE

            saved = load_arch(str(resume_from / ARCH_FILE), trust_custom_code=args.trust_custom_code)
            if not _same_model(saved.model, arch.model):
                raise ValueError(f"--resume: {resume_from} holds a different model ({saved.model.pattern!r}, d_model "
                                 f"{saved.model.d_model}) than {args.arch} ({arch.model.pattern!r}, d_model "
                                 f"{arch.model.d_model}); pass the same architecture and options")
        if weights_from is not None or resume_from is not None:
            import torch

            torch.manual_seed(arch.train.seed)
            try:
                start_model = load_weights_into(HybridLM(arch.model), resume_from or weights_from)
            except RuntimeError as e:  # a tensor missing or of another shape: not this architecture's weights
                first = str(e).strip().splitlines()[0]
                raise ValueError(f"{resume_from or weights_from}: the weights do not fit the architecture: "
                                 f"{first}") from None
        log_lines, log = _train_log(Path(args.out) / TRAIN_LOG if args.out else None, resume_from)

        def on_step(step: int, loss: float, lr: float) -> None:
            log({"step": step, "train_loss": loss, "lr": lr})

        def on_checkpoint(run) -> None:
            plain, state = run.state_dict()
            path = save_train_checkpoint(args.out, arch, run.model, plain, state, keep=args.keep)
            if not args.quiet:
                print(f"checkpoint {path}", flush=True)

        saved_state = load_train_checkpoint(resume_from) if resume_from is not None else None
        run = train_mod.TrainRun(arch, data, log_dir=args.log_dir, hparams=hparams, model=start_model,
                                 on_step=on_step if args.out else None, checkpoint_every=args.checkpoint_every,
                                 on_checkpoint=on_checkpoint if args.out else None, stop_after=args.stop_after,
                                 # TensorBoard drops what a killed run logged after its checkpoint
                                 purge_step=None if saved_state is None else int(saved_state[0]["step"]) + 1)
        try:
            if saved_state is not None:
                run.load_state_dict(*saved_state)
                print(f"resumed from {resume_from} at step {run.step}", flush=True)
            elif weights_from is not None:
                print(f"training further from the weights in {weights_from}", flush=True)
            while (ev := run.advance()) is not None:
                on_eval(int(ev["step"]), ev)
            if run.stop_reason == "stopped":
                print(f"stopped after step {run.step}; continue with --resume", flush=True)
                return 0
            result = run.finish()
        except KeyboardInterrupt:
            last = latest_train_checkpoint(args.out) if args.out else None
            print(f"\ninterrupted at step {run.step}: " + (f"the latest checkpoint is {last}; run the same command "
                                                          "with --resume to continue" if last is not None else
                                                          "no checkpoint written (train with --checkpoint-every N "
                                                          "--out DIR to resume later)"), file=sys.stderr)
            return 130
        finally:
            run.close()
            if log_lines is not None:
                log_lines.close()
    print(json.dumps(result.metrics, indent=2))
    if args.out:
        save_checkpoint(args.out, arch, result.model.to("cpu"), tokenizer=True)
        print(f"saved to {args.out}/")
    return 0 if result.metrics["stop_reason"] != "nan" else 1


def _same_model(a, b) -> bool:
    """Whether two model configs build the same model: the same blocks, sizes and resolved layer parameters
    (numbers compared by value: the ``expand: 2`` of a file is the ``2.0`` a saved folder reads back)."""
    from dataclasses import asdict

    from hybridnas import patterns
    from hybridnas.schema import resolved_layers

    def plain(m) -> dict:
        return {**{k: v for k, v in asdict(m).items() if k not in ("pattern", "layers")},
                "symbols": patterns.to_primary(m.pattern), "layers": resolved_layers(m)}

    return plain(a) == plain(b)


def _task_override(value: str, base):
    """``--task-override``: a task name, a YAML mapping (``{path: other.txt}``, ``{name: mqar, seed: 1}``) or a
    YAML file holding one. Fields without a ``name``, or under the export's own task name, update the export's
    task; another name starts from that task's defaults. Checked as a file's ``task:`` section is."""
    from hybridnas.config import _parse_task
    from hybridnas.yamlio import load_file, load_text

    if value.endswith((".yaml", ".yml")) and Path(value).is_file():
        data, src = load_file(value)
        data = data.get("task", data) if isinstance(data, dict) else data
    else:
        data, src = load_text(f"task: {value}", "--task-override")
        data = data["task"] if isinstance(data, dict) else data
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise src.error(("task",), "expected a task name or a mapping of task fields")
    if data.get("name", base.name) == base.name:
        data = {**base.params, **data, "name": base.name}
    return _parse_task(data, src)


def cmd_eval(args: argparse.Namespace) -> int:
    from hybridnas.checkpoint import ARCH_FILE, build_model
    from hybridnas.config import load_arch
    from hybridnas.tasks import build_task
    from hybridnas.train import autocast_dtype, evaluate, resolve_device
    from hybridnas.trainers import TRAINERS

    folder = Path(args.export)
    if not (folder / ARCH_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no {ARCH_FILE}; see hybridnas export / train --out)")
    arch = load_arch(str(folder / ARCH_FILE), trust_custom_code=args.trust_custom_code)
    task = _task_override(args.task_override, arch.task) if args.task_override else arch.task
    if task.name in TRAINERS:
        raise ValueError(f"task {task.name!r} is scored by several training runs; eval scores a trained model on a "
                         "single task (use --task-override)")
    data = build_task(task.name, task.build_config())
    if data.vocab_size > arch.model.vocab_size:
        raise ValueError(f"task {task.name!r} has a vocabulary of {data.vocab_size} tokens, more than the model's "
                         f"{arch.model.vocab_size}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be at least 1, got {args.max_examples}")
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    model = build_model(folder, device=device, trust_custom_code=args.trust_custom_code)
    x, y = data.valid_inputs, data.valid_labels
    if args.max_examples is not None:
        x, y = x[:args.max_examples], y[:args.max_examples]
    ev = evaluate(model, x, y, max(arch.train.batch_size, 64), device,
                  autocast_dtype(arch.train, device) is not None, metric=data.accuracy_metric,
                  bytes_per_token=data.bytes_per_token)
    out = {"task": task.name, **ev, "examples": int(x.size(0)), "params": model.num_params()}
    print(json.dumps(out, indent=2))
    return 0


def _train_log(path: Path | None, resume_from: Path | None):
    """``(file, write)``: the per-step JSON-lines log of ``hybridnas train --out``. A fresh run starts it anew; a
    resumed run keeps the lines up to its checkpoint's step (a killed run's later lines are dropped)."""
    if path is None:
        return None, lambda row: None
    rows = []
    if resume_from is not None and path.exists():
        from hybridnas.checkpoint import TRAINER_STATE

        step = json.loads((resume_from / TRAINER_STATE).read_text())["step"]
        rows = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w", encoding="utf-8")  # noqa: SIM115  (closed by the caller)
    f.writelines(r + "\n" for r in rows)
    f.flush()

    def write(row: dict) -> None:
        f.write(json.dumps(row) + "\n")
        f.flush()

    return f, write


def _parse_number(text: str | None, name: str, kind: type, default=None):
    """``--name`` as ``kind`` (int or float), or ``default`` when not given; ValueError naming the option."""
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {text!r}") from None


def _device(name: str) -> str:
    """``--device``: cpu, cuda, cuda:N, or auto (cuda when available)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return name


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Usage errors of ``parser`` as one line (no usage block), exit 2."""

    def error(message: str):
        print(f"error: {parser.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from hybridnas.generation import Decoder, Sampling, load_export
    from hybridnas.hf_tokenizer import StreamDecoder

    max_new = _parse_number(args.max_new_tokens, "max_new_tokens", int, 64)
    if max_new < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new}")
    cfg = Sampling(temperature=_parse_number(args.temperature, "temperature", float, 1.0),
                   top_k=_parse_number(args.top_k, "top_k", int, None),
                   top_p=_parse_number(args.top_p, "top_p", float, 1.0),
                   seed=_parse_number(args.seed, "seed", int, None))
    try:
        cfg.check()
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    export = load_export(args.export, trust_custom_code=args.trust_custom_code, device=_device(args.device))
    if args.ids:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise ValueError(f"--ids: the prompt must be token ids separated by spaces, got {args.prompt!r}") from None
    else:
        if export.tokenizer is None:
            raise ValueError(f"{args.export} has no tokenizer.json: pass the prompt as token ids with --ids")
        ids = export.tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    export.check_ids(ids)
    decoder = Decoder(export.model)
    decoder.feed(ids)
    stream = StreamDecoder(None if args.ids else export.tokenizer)
    for tok in decoder.generate(max_new, cfg, eos_id=export.eos_id):
        if tok == export.eos_id:  # the end of the text: not printed
            break
        piece = stream.push(tok)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from hybridnas.serve import serve
    except ImportError as e:
        raise ValueError(f"hybridnas serve needs the serve extra (pip install -e '.[serve]'): {e}") from None
    port = _parse_number(args.port, "port", int, 8000)
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    max_context = _parse_number(args.max_context, "max_context", int, None)
    if max_context is not None and max_context < 1:
        raise ValueError(f"--max-context must be >= 1, got {max_context}")
    cache_bytes = _parse_number(args.cache_bytes, "cache_bytes", int, 256 << 20)
    if cache_bytes < 0:
        raise ValueError(f"--cache-bytes must be >= 0, got {cache_bytes}")
    ttl = _parse_number(args.cache_ttl, "cache_ttl", float, 600.0)
    if not ttl > 0:
        raise ValueError(f"--cache-ttl must be > 0, got {ttl}")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"hybridnas serve needs the serve extra (pip install -e '.[serve]'): {e}") from None
    serve(args.export, host=args.host, port=port, max_context=max_context, cache_bytes=cache_bytes, cache_ttl=ttl,
          trust_custom_code=args.trust_custom_code, device=_device(args.device))
    return 0


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


def cmd_distill_search(args: argparse.Namespace) -> int:
    from hybridnas.config import load_distill_space
    from hybridnas.distill import run_distill_search

    space = load_distill_space(args.space, trust_custom_code=args.trust_custom_code)
    out = args.out or f"runs/{space.name}"
    run_distill_search(space, out, storage=args.storage, trust_custom_code=args.trust_custom_code)
    return 0


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


STORAGE = ("Optuna storage: an SQLAlchemy URL (default sqlite:///runs/<study>.db; postgresql://USER:PW@HOST/DB for "
           "many machines), grpc://HOST:PORT for a `hybridnas storage-proxy`, or a journal file path")
TRUST = ("import the custom layer modules a file or a study's recorded architectures name under `symbols:` "
         "(importing a module runs its code; only for files you trust)")


def _closed_pipe() -> int:
    """The reader of our stdout left (``| head -1``): nothing more can be said there, and Python's flush at exit
    would raise again, so stdout goes to /dev/null; 141 is what a process killed by SIGPIPE returns."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def build_parser() -> argparse.ArgumentParser:
    p = _one_line_errors(argparse.ArgumentParser(prog="hybridnas",
                                                 description="Architecture search over hybrid sequence models."))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run or resume the search a YAML space describes")
    s.add_argument("space", help="search-space YAML")
    s.add_argument("--storage", help=STORAGE)
    s.add_argument("--study", help="study name (default: the space's search.study_name or name)")
    s.add_argument("--n-trials", type=int, help="total trained trials to reach (default: search.n_trials)")
    s.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    s.add_argument("--seed", type=int, help="sampler seed (overrides search.seed)")
    s.add_argument("--export", metavar="DIR", help="export the best trial to DIR when done")
    s.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    s.add_argument("--dry-run", action="store_true",
                   help="list the candidates (all of a finite space, else --dry-run-n sampled) with params and "
                        "state bytes; train nothing, write nothing")
    s.add_argument("--dry-run-n", type=int, default=20, metavar="N",
                   help="candidates sampled by --dry-run from a space it cannot list (default 20)")
    s.add_argument("--progress-after", type=float, default=10.0, metavar="SECONDS",
                   help="a trial running longer than this prints a line per evaluation (step/steps, loss, accuracy, "
                        "elapsed), at most one every SECONDS (default 10; 0: every evaluation; not with --workers)")
    s.add_argument("--workers", type=int, help="local worker processes on this study (default: search.workers)")
    s.add_argument("--worker-index", type=int, metavar="I",
                   help="run as worker I of many on a shared --storage (a SLURM array task, an indexed Kubernetes "
                        "Job, `--workers`' children): sampler seed + I, and no confirmation or export at the end "
                        "(run the command once more without it when all are done)")
    s.add_argument("--confirm-top", type=int, metavar="K",
                   help="re-train the K best on new seeds (default: search.confirm_top, 3; 0 skips)")
    s.add_argument("--confirm-seeds", type=int, metavar="S",
                   help="new seeds per confirmed trial (default: search.confirm_seeds, 1)")
    s.add_argument("--confirm-budget", type=float, metavar="X",
                   help="steps multiplier for confirmation (default: search.confirm_budget, 1)")
    s.add_argument("--trust-custom-code", action="store_true",
                   help="confirm and export trials whose recorded layers the space does not name (a shared study); "
                        + TRUST)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("show", help="print a table of a study's trials")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--storage", help=STORAGE)
    s.add_argument("--sort", choices=["number", "score"], default="number")
    s.add_argument("--top", type=int, help="only the first N rows")
    s.add_argument("--format", choices=["table", "csv", "md"], default="table",
                   help="table (default: with the study's summary lines), csv (raw values, one column per sampled "
                        "setting) or md (a Markdown table)")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("export", help="write the best (or a chosen) trial as a loadable folder")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--trial", type=int, help="trial number (default: the best)")
    s.add_argument("--pareto", action="store_true", help="export every Pareto-optimal trial (multi-objective)")
    s.add_argument("--storage", help=STORAGE)
    s.add_argument("--trust-custom-code", action="store_true", help=TRUST)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("plot", help="write PNG plots of a study")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--top-fraction", type=float, default=0.25, help="best trials used for the symbol heatmap")
    s.add_argument("--storage", help=STORAGE)
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("dashboard", help="start optuna-dashboard on a study's storage")
    s.add_argument("study", help="study name, or the search-space YAML")
    s.add_argument("--storage", help=STORAGE)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("storage-proxy", help="serve an RDB storage to many workers through Optuna's gRPC proxy "
                                             "(workers then pass --storage grpc://HOST:PORT)")
    s.add_argument("--storage", required=True, help="the RDB URL behind the proxy (postgresql://..., sqlite:///FILE)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; the proxy "
                                                       "has no authentication, so only on a trusted network)")
    s.add_argument("--port", type=int, default=13000)
    s.set_defaults(func=cmd_storage_proxy)

    s = sub.add_parser("train", help="train one architecture YAML and print its metrics")
    s.add_argument("arch", help="architecture YAML (or an export's architecture.yaml: trained from scratch), or a "
                                "model folder (an export, a train --out): trained further from its weights")
    s.add_argument("--steps", type=int, help="override train.steps")
    s.add_argument("--log-dir", help="TensorBoard log folder")
    s.add_argument("--out", help="save architecture.yaml, config.json and model.safetensors here (and "
                                 "train_log.jsonl: one line per step)")
    s.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="write a checkpoint every N steps under OUT/checkpoints/ (weights, optimizer, data "
                        "position, RNG states, config; atomically)")
    s.add_argument("--keep", type=int, default=2, metavar="K", help="checkpoints kept, newest first (default 2)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, at the same step and data position")
    s.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop after this step (the schedule still spans --steps), checkpoint, and exit: "
                        "continue later with --resume (a job's time slice)")
    s.add_argument("--preset", help="size preset: tiny, small or base (d_model, layers, batch, lm seq_len; "
                                    "README table)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--trust-custom-code", action="store_true", help=TRUST)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="score a model folder (an export, a train --out) on its task's validation set")
    s.add_argument("export", help="model folder (hybridnas export --out DIR, hybridnas train --out DIR)")
    s.add_argument("--task-override", metavar="TASK",
                   help="score on another task: a name, a YAML mapping ('{path: other.txt}' updates the folder's "
                        "own task; '{name: mqar, seed: 1}') or a YAML file with one")
    s.add_argument("--max-examples", type=int, help="score only the first N validation examples")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.add_argument("--trust-custom-code", action="store_true", help="import custom layer code the folder names")
    s.set_defaults(func=cmd_eval)

    s = _one_line_errors(sub.add_parser("generate", help="decode from an export folder, printing tokens as they come"))
    s.add_argument("export", help="export folder (hybridnas export --out DIR)")
    s.add_argument("--prompt", required=True, help="prompt text (needs the folder's tokenizer), or ids with --ids")
    s.add_argument("--ids", action="store_true", help="the prompt is token ids separated by spaces; print ids")
    s.add_argument("--max-new-tokens", help="tokens to generate (default 64)")
    s.add_argument("--temperature", help="0 for greedy; default 1")
    s.add_argument("--top-k", help="sample among the k most likely tokens")
    s.add_argument("--top-p", help="nucleus sampling: the smallest set of tokens with this probability (default 1)")
    s.add_argument("--seed", help="random seed of the sampling")
    s.add_argument("--trust-custom-code", action="store_true", help="import custom layer code the folder names")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.set_defaults(func=cmd_generate)

    s = _one_line_errors(sub.add_parser("serve", help="serve an export folder: OpenAI-style /v1/completions, "
                                                      "/health, /metrics"))
    s.add_argument("export", help="export folder (hybridnas export --out DIR)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", help="port (default 8000)")
    s.add_argument("--max-context", help="tokens a conversation may reach (default: config.json "
                                         "max_position_embeddings, else 2048)")
    s.add_argument("--cache-bytes", help="conversation state cache budget in bytes (default 256 MiB; LRU eviction)")
    s.add_argument("--cache-ttl", help="seconds an unused conversation state is kept (default 600)")
    s.add_argument("--trust-custom-code", action="store_true", help="import custom layer code the folder names")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("bench", help="time a mixer's forward and forward+backward over backends and lengths; "
                                     "--decode: whole patterns' ms/token and state bytes against context length")
    s.add_argument("--mixer", help="registered symbol, e.g. M (required without --decode)")
    s.add_argument("--params", default="", help="layer parameters, e.g. variant=mamba3,mimo_rank=2,d_state=32 "
                                                "(with --decode: SYMBOL.key=value, e.g. M.d_state=16,H.filter=modal)")
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
    d = s.add_argument_group("decode (--decode)")
    d.add_argument("--decode", action="store_true", help="time whole models decoding: prefill, ms/token and state "
                                                         "bytes after each context length (batch 1, CPU)")
    d.add_argument("--patterns", help="comma list of patterns at the same --d-model, e.g. AAAA,MMMM,RRRR,HHHA,MMMA")
    d.add_argument("--contexts", default="1024,8192,32768", help="comma list of context lengths (tokens)")
    d.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded after each context (median)")
    d.add_argument("--prefill-repeat", type=int, default=1, help="timed prefills per cell (the median)")
    d.add_argument("--conversation", help="HISTORY+TURN, e.g. 2048+16: a turn fed from the cached state of the "
                                          "history against re-prefilling both, alternating rounds")
    d.add_argument("--rounds", type=int, default=7, help="timed rounds of --conversation (medians)")
    d.add_argument("--vocab-size", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    s.add_argument("--compile", action="store_true",
                   help="also time each backend through torch.compile (rows <backend>+compile, compiled in warm-up)")
    s.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile (inductor)")
    s.add_argument("--peak-size", type=int, default=2048,
                   help="the square matmul timed for the GEMM peak behind each row's time / floor (2048)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("distill-search", help="post-training hybrid search: which attention layers of a trained "
                                              "model to keep, the rest distilled into another mixer")
    s.add_argument("space", help="distill-search YAML (teacher, student, distill, data, compare, select)")
    s.add_argument("--out", metavar="DIR", help="report, runs' weights, study and export (default runs/<name>)")
    s.add_argument("--storage", help="Optuna storage of the runs (default sqlite:///DIR/study.db; postgresql://... "
                                     "as for search)")
    s.add_argument("--trust-custom-code", action="store_true",
                   help="allow a teacher whose architecture.yaml names custom layer code to import")
    s.set_defaults(func=cmd_distill_search)

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
    s.add_argument("--storage", help=STORAGE)
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
    s.add_argument("--trust-custom-code", action="store_true", help=TRUST + " (architecture files; a search space's "
                                                                           "own layers are always imported)")
    s.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    from hybridnas.runtime import tune_malloc

    tune_malloc()  # large CPU temporaries reused, not re-faulted every step
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return _closed_pipe()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _print_error(e)
        return 2
    except ConnectionError as e:  # a storage that does not answer (storage.StorageUnavailableError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
