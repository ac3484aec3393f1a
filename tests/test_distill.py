"""Post-training hybrid search (hybridnas.distill, `hybridnas distill-search`): student construction from a trained
attention teacher, forward-KL distillation, KL-guided restoration scoring that resumes, the final comparison and its
export, and the one-line errors of a bad space file. Everything is tiny (d_model 32, a few steps)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from hybridnas import distill
from hybridnas.checkpoint import build_model, save_checkpoint
from hybridnas.cli import main
from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, ModelConfig, TaskSpec, TrainConfig

WORDS = ("the cat sat on a mat while dogs ran past old red barns and slow green rivers under bright cold stars "
         "def return import class yield lambda for in if else").split()


def _corpus(path: Path, n_lines: int = 900) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _teacher(folder: Path, corpus: Path, pattern: str = "A-A-A-", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = ModelConfig(vocab_size=257, d_model=32, pattern=pattern,
                        layers={"A": {"n_heads": 2, "n_kv_heads": 1}, "F": {}} if "A" in pattern else {})
    arch = ArchConfig(model, TaskSpec("lm", {"path": str(corpus), "seq_len": 32, "cache_dir": str(folder / "c")}),
                      TrainConfig(), name="teacher")
    save_checkpoint(folder, arch, HybridLM(model))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus) -> Path:
    return _teacher(tmp_path_factory.mktemp("teacher"), corpus)


M2 = {"variant": "mamba2", "d_state": 16, "headdim": 16, "expand": 1}
M3 = {"variant": "mamba3", "d_state": 16, "headdim": 16, "expand": 1}


# ---------------------------------------------------------------------------------------------- construction


def test_attention_positions_and_student_pattern(teacher_dir):
    teacher = build_model(teacher_dir)
    assert distill.attention_positions(teacher.cfg) == [0, 2, 4]
    cfg = distill.student_config(teacher.cfg, keep=[2], symbol="M", params=M2)
    assert cfg.pattern == "MFAFMF"
    assert cfg.layers["M"] == M2 and cfg.layers["A"] == teacher.cfg.layers["A"]


@pytest.mark.parametrize("params", [M2, M3], ids=["mamba2", "mamba3"])
def test_student_copies_teacher_and_maps_attention(teacher_dir, params):
    teacher = build_model(teacher_dir)
    student, notes = distill.build_student(teacher, keep=[2], symbol="M", params=params, init="teacher", seed=0)
    t, s = teacher.state_dict(), student.state_dict()
    # embeddings, every norm, the FFN blocks and the kept attention are the teacher's
    for key in t:
        if not key.startswith(("blocks.0.layer", "blocks.4.layer")):
            assert torch.equal(t[key], s[key]), key
    hd, d = 16, 32
    for i in (0, 4):
        qkv, out = t[f"blocks.{i}.layer.qkv.weight"], t[f"blocks.{i}.layer.out.weight"]
        q, k, v = qkv[:2 * hd], qkv[2 * hd:3 * hd], qkv[3 * hd:]
        w = s[f"blocks.{i}.layer.in_proj.weight"]
        x_rows = w[d:2 * d]  # [z, x, ...]: x after z (d_inner = 32)
        assert torch.equal(x_rows, torch.cat([v, v]))  # one kv head repeated over the 2 query heads
        B = w[2 * d:2 * d + 16]
        C = w[2 * d + 16:2 * d + 32]
        assert torch.equal(B, k) and torch.equal(C, q[:hd])
        assert torch.equal(s[f"blocks.{i}.layer.out_proj.weight"], out)
    assert any("C <- Q" in n for n in notes["M"]["copied"])
    x = torch.randint(0, 257, (2, 16))
    assert torch.isfinite(student(x)).all()


def test_mapping_says_what_it_cannot_copy(teacher_dir):
    teacher = build_model(teacher_dir)
    params = {**M2, "d_state": 8}
    student, notes = distill.build_student(teacher, keep=[2], symbol="M", params=params, init="teacher", seed=0)
    w = student.state_dict()["blocks.0.layer.in_proj.weight"]
    k = teacher.state_dict()["blocks.0.layer.qkv.weight"][32:48]
    assert not torch.equal(w[64:72], k[:8])
    assert any("d_state 8" in n for n in notes["M"]["not_copied"])
    # random init copies nothing into the mixer, but still copies the rest
    student, notes = distill.build_student(teacher, keep=[2], symbol="M", params=M2, init="random", seed=0)
    assert not torch.equal(student.state_dict()["blocks.0.layer.out_proj.weight"],
                           teacher.state_dict()["blocks.0.layer.out.weight"])
    assert torch.equal(student.embed.weight, teacher.embed.weight)


def test_placements():
    assert distill.even_placement(4, 2) == [1, 3]
    assert distill.even_placement(8, 2) == [2, 6]
    assert distill.even_placement(3, 3) == [0, 1, 2]
    r = distill.random_placement(8, 3, seed=5)
    assert r == sorted(r) and len(set(r)) == 3 and r == distill.random_placement(8, 3, seed=5)


# ---------------------------------------------------------------------------------------------- distillation


def _settings(**kw) -> distill.DistillSettings:
    base = dict(score_steps=4, final_steps=4, lr=3e-3, batch_size=4, seq_len=32, seeds=[0], eval_tokens=512,
                warmup_steps=1, device="cpu")
    return distill.DistillSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def data(teacher_dir, corpus, tmp_path_factory):
    return distill.load_data({"path": str(corpus), "seq_len": 32,
                              "cache_dir": str(tmp_path_factory.mktemp("cache"))})


def test_kl_of_the_teacher_copy_is_zero_and_distilling_lowers_it(teacher_dir, data):
    teacher = build_model(teacher_dir)
    ev = distill.Evaluator(teacher, data, _settings())
    same, _ = distill.build_student(teacher, keep=[0, 2, 4], symbol="M", params=M2, init="teacher", seed=0)
    assert ev(same)["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev(same)["bits_per_byte"] == pytest.approx(ev.teacher_bpb, rel=1e-6)
    student, _ = distill.build_student(teacher, keep=[], symbol="M", params=M2, init="teacher", seed=0)
    before = ev(student)["kl"]
    after = distill.train_student(student, teacher, data, _settings(lr=1e-2), steps=12, seed=0, evaluator=ev)
    assert after["kl"] < before


def test_freeze_keeps_ffn_and_embeddings(teacher_dir, data):
    teacher = build_model(teacher_dir)
    student, _ = distill.build_student(teacher, keep=[], symbol="M", params=M2, init="teacher", seed=0,
                                       freeze=["ffn", "embed"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distill.train_student(student, teacher, data, _settings(), steps=3, seed=0)
    after = student.state_dict()
    assert torch.equal(after["embed.weight"], before["embed.weight"])
    for i in (1, 3, 5):
        for k in before:
            if k.startswith(f"blocks.{i}."):
                assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["blocks.0.layer.in_proj.weight"], before["blocks.0.layer.in_proj.weight"])


# ---------------------------------------------------------------------------------------------- scoring resumes


def test_scoring_resumes_without_repeating_a_layer(teacher_dir, data, tmp_path, monkeypatch):
    teacher = build_model(teacher_dir)
    storage = f"sqlite:///{tmp_path}/study.db"
    student = distill.StudentSpec(symbol="M", layers={"M": M2}, keep=1)
    runs: list[str] = []
    real = distill.train_student

    def counting(*a, **kw):
        runs.append(kw.get("label", "?"))
        if len(runs) == 2 and stop[0]:
            raise KeyboardInterrupt
        return real(*a, **kw)

    stop = [True]
    monkeypatch.setattr(distill, "train_student", counting)
    study = distill.open_study("s", storage)
    with pytest.raises(KeyboardInterrupt):
        distill.score_layers(study, teacher, data, student, _settings(), log=lambda *a, **k: None)
    assert len(runs) == 2
    stop[0] = False
    runs.clear()
    study = distill.open_study("s", storage)
    scores = distill.score_layers(study, teacher, data, student, _settings(), log=lambda *a, **k: None)
    assert len(runs) == 3  # the all-linear student and the 3 restorations less the one finished before
    assert sorted(scores) == [0, 2, 4] and all(isinstance(v, float) for v in scores.values())
    runs.clear()
    quiet = lambda *a, **k: None  # noqa: E731
    distill.score_layers(distill.open_study("s", storage), teacher, data, student, _settings(), log=quiet)
    assert runs == []


# ---------------------------------------------------------------------------------------------- the command


def _space(tmp_path: Path, teacher: Path, corpus: Path, extra: str = "", student: str | None = None) -> str:
    student = student or "{symbol: M, layers: {M: {variant: mamba2, d_state: 16, headdim: 16, expand: 1}}, keep: 1}"
    text = (f"name: tiny\nteacher: {teacher}\nstudent: {student}\n"
            "distill: {score_steps: 3, final_steps: 3, lr: 3.0e-3, batch_size: 4, seq_len: 32, seeds: [0, 1],\n"
            "          eval_tokens: 512, warmup_steps: 1, device: cpu}\n"
            f"data: {{path: {corpus}, cache_dir: {tmp_path / 'cache'}}}\n" + extra)
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_cli_end_to_end_resumes_and_exports(teacher_dir, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = _space(tmp_path, teacher_dir, corpus)
    out = tmp_path / "out"
    assert main(["distill-search", space, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["selected"]) == 1 and report["selected"][0] in (0, 2, 4)
    assert set(report["placements"]) == {"kl", "even", "random"}
    assert len(report["placements"]["kl"]["bits_per_byte"]) == 2
    assert report["teacher"]["bits_per_byte"] > 0 and report["scoring_minutes"] >= 0
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "KL-selected" in md
    model = build_model(out / "export")
    assert model.cfg.pattern.count("A") == 1 and model.cfg.pattern.count("M") == 2
    # a rerun trains nothing: every scoring and final run is a finished trial of the study
    runs = []
    real = distill.train_student
    monkeypatch.setattr(distill, "train_student", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    assert main(["distill-search", space, "--out", str(out)]) == 0
    assert runs == []
    capsys.readouterr()
    assert main(["generate", str(out / "export"), "--prompt", "the cat", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    # the runs' weights gone (another machine's study): the export distils the best seed's run again, same numbers
    seed = report["export"]["seed"]
    first = json.loads((out / "export" / "distill.json").read_text())
    assert first["seed"] == seed and first["keep"] == report["selected"]
    assert first["bits_per_byte"] == report["placements"]["kl"]["bits_per_byte"][report["seeds"].index(seed)]
    shutil.rmtree(out / "runs")
    shutil.rmtree(out / "export")
    assert main(["distill-search", space, "--out", str(out)]) == 0
    assert runs == [1]
    again = json.loads((out / "export" / "distill.json").read_text())
    assert again["seed"] == seed and again["bits_per_byte"] == pytest.approx(first["bits_per_byte"], rel=1e-6)
    # the export is a normal one: transformers loads it and greedy generation matches the model's own
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "export")
    ours = build_model(out / "export").eval()
    x = torch.randint(0, ours.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hf(x).logits, ours(x), atol=1e-5)
    assert torch.equal(hf.generate(x, max_new_tokens=4, do_sample=False), ours.generate(x, max_new_tokens=4))


#: the bad cases' student sections (the default one where a case has none) and lines added to the space
BAD_STUDENTS = {"keep_too_many": "{symbol: M, keep: 3}", "bad_symbol": "{symbol: Q, keep: 1}",
                "attention_symbol": "{symbol: A, keep: 1}", "no_keep": "{symbol: M}",
                "bad_layer_param": "{symbol: M, keep: 1, layers: {M: {d_stat: 4}}}"}
BAD_EXTRAS = {"unknown_key": "select: greedy\n", "bad_compare": "compare: [evenly]\n"}


@pytest.mark.parametrize("case, field", [
    ("unknown_key", "distill.steps"),
    ("no_teacher", "teacher"),
    ("no_attention", "teacher"),
    ("keep_too_many", "student.keep"),
    ("bad_symbol", "student.symbol"),
    ("attention_symbol", "student.symbol"),
    ("no_keep", "student"),
    ("bad_layer_param", "student.layers.M"),
    ("bad_compare", "compare[0]"),
])
def test_bad_space_is_one_line(case, field, teacher_dir, corpus, tmp_path, capsys):
    teacher = teacher_dir
    if case == "no_teacher":
        teacher = tmp_path / "nowhere"
    if case == "no_attention":
        teacher = _teacher(tmp_path / "mlp", corpus, pattern="MFMF")
    space = _space(tmp_path, teacher, corpus, BAD_EXTRAS.get(case, ""), BAD_STUDENTS.get(case))
    if case == "unknown_key":
        text = Path(space).read_text().replace("score_steps: 3", "steps: 3")
        Path(space).write_text(text)
    assert main(["distill-search", space, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {space}:") and f" {field}:" in err[0], err[0]


def test_validate_checks_a_distill_file(teacher_dir, corpus, tmp_path, capsys):
    space = _space(tmp_path, teacher_dir, corpus)
    assert main(["validate", space]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{space}: OK" in out and "distill-search" in out and "attention at [0, 2, 4]" in out
    bad = _space(tmp_path, teacher_dir, corpus, student="{symbol: M, keep: 3}")
    assert main(["validate", bad]) == 2
    assert " student.keep: " in capsys.readouterr().err


def test_shipped_example_reads(teacher_dir, corpus, tmp_path):
    from hybridnas.config import load_distill_space

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    text = (root / "distill_example.yaml").read_text(encoding="utf-8")
    assert "teacher: runs/distill_teacher" in text and "path: runs/stdlib.txt" in text
    text = text.replace("runs/distill_teacher", str(teacher_dir)).replace("runs/stdlib.txt", str(corpus))
    text = text.replace("d_state: 32, headdim: 32", "d_state: 16, headdim: 16")  # the tiny teacher's heads are 16
    path = tmp_path / "example.yaml"
    path.write_text(text, encoding="utf-8")
    space = load_distill_space(str(path))
    assert space.student.keep == 2 and space.distill.seeds == [0, 1, 2] and space.compare == ["even", "random"]
    arch = (root / "distill_teacher.yaml").read_text(encoding="utf-8")
    assert "pattern: (A-)x4" in arch and "path: runs/stdlib.txt" in arch


def test_scoring_is_keyed_by_its_seed(teacher_dir, data, tmp_path, monkeypatch):
    teacher = build_model(teacher_dir)
    storage = f"sqlite:///{tmp_path}/study.db"
    student = distill.StudentSpec(symbol="M", layers={"M": M2}, keep=1)
    quiet = lambda *a, **k: None  # noqa: E731
    distill.score_layers(distill.open_study("s", storage), teacher, data, student, _settings(score_steps=1),
                         log=quiet)
    runs = []
    real = distill.train_student
    monkeypatch.setattr(distill, "train_student", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    # keep and the later seeds do not change a scoring run; the first seed does
    distill.score_layers(distill.open_study("s", storage), teacher, data, distill.StudentSpec("M", {"M": M2}, 2),
                         _settings(score_steps=1, seeds=[0, 5]), log=quiet)
    assert runs == []
    distill.score_layers(distill.open_study("s", storage), teacher, data, student,
                         _settings(score_steps=1, seeds=[5]), log=quiet)
    assert len(runs) == 4


def test_teacher_targets_are_computed_once_per_batch_across_runs(teacher_dir, data, monkeypatch):
    teacher = build_model(teacher_dir)
    calls = []
    real_forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda x: calls.append(1) or real_forward(x))
    results = []
    targets = distill.TeacherTargets(max_bytes=1 << 30)
    for _ in range(2):
        student, _ = distill.build_student(teacher, [2], "M", M2, seed=0)
        results.append(distill.train_student(student, teacher, data, _settings(), steps=5, seed=0, targets=targets))
    assert len(calls) == 5  # the second run on the same seed reads the first one's
    student, _ = distill.build_student(teacher, [2], "M", M2, seed=0)
    plain = distill.train_student(student, teacher, data, _settings(), steps=5, seed=0)
    assert results[0]["train_loss"] == results[1]["train_loss"] == plain["train_loss"]
    # a cap keeps what fits and computes the rest each time; another seed starts afresh
    calls.clear()
    small = distill.TeacherTargets(max_bytes=2 * (4 * 32 * 257 * 4 + 4 * 32 * 8))  # two batches: log-probs, ids
    for seed in (0, 0, 1):
        student, _ = distill.build_student(teacher, [2], "M", M2, seed=0)
        distill.train_student(student, teacher, data, _settings(), steps=5, seed=seed, targets=small)
    assert len(calls) == 5 + 3 + 5


def test_scoring_and_final_runs_share_the_teacher_targets(teacher_dir, data, tmp_path, monkeypatch):
    teacher = build_model(teacher_dir)
    settings = _settings(score_steps=3, final_steps=2, seeds=[0, 1])
    ev = distill.Evaluator(teacher, data, settings)
    calls = []
    real_forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda x: calls.append(1) or real_forward(x))
    study = distill.open_study("s", f"sqlite:///{tmp_path}/study.db")
    student = distill.StudentSpec(symbol="M", layers={"M": M2}, keep=1)
    quiet = lambda *a, **k: None  # noqa: E731
    distill.score_layers(study, teacher, data, student, settings, evaluator=ev, log=quiet)
    assert len(calls) == 3  # 4 runs of 3 steps, one seed
    calls.clear()
    plan = distill.placements([2], [0, 2, 4], ["even", "random"], [0, 1])
    arch = lambda keep, seed: ArchConfig(distill.student_config(teacher.cfg, keep, "M", M2), TaskSpec("lm", {}),  # noqa: E731
                                   TrainConfig())
    distill.final_stage(study, teacher, data, student, settings, plan, tmp_path / "runs", arch, evaluator=ev,
                        log=quiet)
    assert len(calls) == 2 * 2  # every placement of a seed reads the same 2 batches


def test_a_symbol_without_a_mapping_starts_from_its_own_init(teacher_dir):
    teacher = build_model(teacher_dir)
    student, notes = distill.build_student(teacher, [2], "H", {}, init="teacher", seed=0)
    assert "no mapping" in notes["H"]["not_copied"][0] and notes["H"]["copied"] == []
    assert student.cfg.pattern == "HFAFHF"
    assert torch.isfinite(student(torch.randint(0, 257, (1, 8)))).all()


def test_ce_weight_adds_cross_entropy(teacher_dir, data):
    teacher = build_model(teacher_dir)
    losses = []
    for ce in (0.0, 1.0):
        student, _ = distill.build_student(teacher, [2], "M", M2, seed=0)
        losses.append(distill.train_student(student, teacher, data, _settings(ce_weight=ce), steps=1,
                                            seed=0)["train_loss"])
    assert losses[1] > losses[0] + 1.0  # a random teacher: cross-entropy near ln 257, KL near 0


def test_budget_goes_through_distill_select(teacher_dir, monkeypatch):
    from hybridnas import distill_select

    calls = {}

    def layer_costs(cfg, positions, symbol, params, metric, seq_len):
        calls["costs"] = (positions, symbol, params, metric, seq_len)
        return [1.0, 2.0, 3.0]

    def kept_budget(total, cfg, positions, symbol, params, seq_len):
        calls["kept"] = (total, positions, seq_len)
        return 4.0

    def select_layers(scores, k, costs, budget, method):
        calls["select"] = (scores, k, costs, budget, method)
        return [0, 2]

    for name, fn in (("layer_costs", layer_costs), ("kept_budget", kept_budget), ("select_layers", select_layers)):
        monkeypatch.setattr(distill_select, name, fn)
    teacher = build_model(teacher_dir)
    budget = distill.DistillBudget(state_bytes=1e6, seq_len=4096)
    student = distill.StudentSpec(symbol="M", layers={"M": M2}, keep=None, budget=budget)
    chosen = distill.select({0: 0.5, 2: 0.1, 4: 0.3}, student, teacher.cfg, _settings(), "greedy")
    assert chosen == [0, 4]
    assert calls["costs"] == ([0, 2, 4], "M", M2, "state_bytes", 4096)
    assert calls["kept"] == (1e6, [0, 2, 4], 4096)
    assert calls["select"] == ([0.5, 0.1, 0.3], None, [1.0, 2.0, 3.0], 4.0, "greedy")
    student.budget = distill.DistillBudget(decode_ms=0.25)
    distill.select({0: 0.5, 2: 0.1, 4: 0.3}, student, teacher.cfg, _settings(seq_len=64), "milp")
    assert calls["costs"][3:] == ("decode_ms", 64) and calls["select"][3] == 0.25


def test_a_state_budget_keeps_what_fits(teacher_dir):
    from hybridnas.distill_select import base_cost, layer_costs

    teacher = build_model(teacher_dir)
    attn = [0, 2, 4]
    one = layer_costs(teacher.cfg, attn, "M", M2, "state_bytes", 4096)[0]
    total = base_cost(teacher.cfg, attn, "M", M2, 4096) + 1.5 * one  # room for one attention layer's KV cache
    student = distill.StudentSpec(symbol="M", layers={"M": M2}, budget=distill.DistillBudget(state_bytes=total,
                                                                                            seq_len=4096))
    assert distill.select({0: 0.1, 2: 0.3, 4: 0.2}, student, teacher.cfg, _settings(), "milp") == [2]
    student.keep = 2
    with pytest.raises(ValueError, match="budget"):
        distill.select({0: 0.1, 2: 0.3, 4: 0.2}, student, teacher.cfg, _settings(), "milp")


def test_a_budget_nothing_fits_is_refused_before_any_run(teacher_dir, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = []
    monkeypatch.setattr(distill, "train_student", lambda *a, **kw: runs.append(1))
    student = ("{symbol: M, layers: {M: {variant: mamba2, d_state: 16, headdim: 16, expand: 1}}, keep: 1, "
               "budget: {state_bytes: 1000, seq_len: 4096}}")
    space = _space(tmp_path, teacher_dir, corpus, student=student)
    assert main(["distill-search", space, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0] and runs == []


def test_a_hugging_face_llama_folder_is_a_teacher(corpus, tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    space = _space(tmp_path, folder, corpus)
    assert main(["validate", space]) == 0, capsys.readouterr().err
    assert "attention at [0, 2, 4]" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["distill-search", space, "--out", str(out)]) == 0, capsys.readouterr().err
    model = build_model(out / "export")
    assert model.cfg.pattern.count("A") == 1 and model.cfg.pattern.count("M") == 2 and model.cfg.vocab_size == 300
    bad = _space(tmp_path, folder, corpus, student="{symbol: M, keep: 3}")
    assert main(["distill-search", bad, "--out", str(out)]) == 2
    assert " student.keep: " in capsys.readouterr().err


def test_a_retrained_teacher_is_not_answered_from_the_old_runs(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = _teacher(tmp_path / "t", corpus)
    space = _space(tmp_path, teacher, corpus, extra="compare: []\n")
    Path(space).write_text(Path(space).read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    assert main(["distill-search", space, "--out", str(tmp_path / "o")]) == 0
    runs = []
    real = distill.train_student
    monkeypatch.setattr(distill, "train_student", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    _teacher(tmp_path / "t", corpus, seed=1)  # new weights in the same folder
    assert main(["distill-search", space, "--out", str(tmp_path / "o")]) == 0
    assert len(runs) == 4 + 1  # every scoring run and the final run again


def test_scoring_minutes_count_only_these_settings(teacher_dir, data, tmp_path):
    teacher = build_model(teacher_dir)
    study = distill.open_study("s", f"sqlite:///{tmp_path}/study.db")
    student = distill.StudentSpec(symbol="M", layers={"M": M2}, keep=1)
    quiet = lambda *a, **k: None  # noqa: E731
    for steps in (1, 2):
        distill.score_layers(study, teacher, data, student, _settings(score_steps=steps), log=quiet)
    both = distill.scoring_minutes(study)
    one = distill.scoring_minutes(study, student, _settings(score_steps=2))
    assert 0 < one < both
