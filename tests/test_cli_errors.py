"""The command line on the way out: Ctrl-C, a closed pipe, several bad files, bad storages and bad numbers give one
clear line each and an exit code, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from hybridnas.cli import main

ROOT = Path(__file__).resolve().parents[1]

SPACE = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model: {{d_model: 16, pattern: [A, AA]}}
train: {{steps: 2, batch_size: 8, eval_every: 1, warmup_steps: 1}}
search: {{n_trials: 2, sampler: random, pruner: none, confirm_top: 0, save_weights: false}}
"""


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def env_with(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------------------ Ctrl-C

SLEEPY = '''
import os
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from layers.base import TokenwiseLayer


@dataclass
class Config:
    bias: bool = False


class Sleepy(TokenwiseLayer):
    """Signals that a trial is training, then sleeps in forward until interrupted."""

    kind = "mixer"
    Config = Config

    def __init__(self, d_model, config=None, *, layer_idx=0, n_layers=1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    @classmethod
    def param_count(cls, d_model, config):
        return d_model * d_model

    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x, ctx=None):
        Path(os.environ["SLEEPY_MARK"]).touch()
        time.sleep(120)
        return self.proj(x)
'''


def test_ctrl_c_prints_only_the_clean_message(tmp_path):
    (tmp_path / "sleepy_layers.py").write_text(SLEEPY, encoding="utf-8")
    space = write(tmp_path / "sleepy.yaml", SPACE.format(name="sleepy").replace("pattern: [A, AA]",
                                                                               "pattern: [Z]")
                  .replace("name: sleepy\n", "name: sleepy\nsymbols: {Z: sleepy_layers:Sleepy}\n"))
    mark = tmp_path / "training"
    env = env_with(tmp_path)
    env["SLEEPY_MARK"] = str(mark)
    # SIGINT at its default, as a terminal gives it: a test runner started in the background by a shell without job
    # control (a CI script's `cmd &`) ignores SIGINT, the child would inherit that, and Python then installs no
    # KeyboardInterrupt handler at all
    proc = subprocess.Popen([sys.executable, "-m", "hybridnas.cli", "search", space], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert mark.exists(), proc.communicate(timeout=10)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "failed with" not in err, err
    assert "interrupted: finished trials are saved" in err
    study = optuna.load_study(study_name="sleepy", storage=f"sqlite:///{tmp_path}/runs/sleepy.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]  # recorded, re-run on resume


# ------------------------------------------------------------------------------------------------ closed pipe


def test_show_into_a_closed_pipe_exits_quietly(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="piped", storage=storage, direction="maximize")
    for i in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.1 * i, user_attrs={"pattern": "AA", "params": 100 + i}))
    proc = subprocess.Popen([sys.executable, "-m", "hybridnas.cli", "show", "piped", "--storage", storage],
                            cwd=tmp_path, env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written (`| head -0`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err.strip() == ""
    assert proc.returncode == 141  # as a process killed by SIGPIPE: the pipeline's reader decides


def test_show_piped_into_head_exits_quietly(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="piped", storage=storage, direction="maximize")
    study.add_trials([optuna.trial.create_trial(value=0.001 * i, user_attrs={"pattern": "AA" * 40, "params": i})
                      for i in range(1500)])  # a table larger than the pipe's buffer
    cmd = f"{sys.executable} -m hybridnas.cli show piped --storage {storage} | head -1"
    res = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env_with(), capture_output=True, text=True,
                         timeout=300)
    assert res.stdout.startswith("study 'piped'") and len(res.stdout.splitlines()) == 1
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------------ validate


BAD_ONE = """\
name: bad_one
model:
  d_modle: 32
  pattern: AA
search:
  sampler: tpee
"""

BAD_TWO = """\
name: bad_two
task: {name: mqar, seq_len: 33}
model: {pattern: AA}
train:
  steps: -1
"""


def test_validate_checks_every_file_and_reports_every_error(tmp_path, capsys):
    one = write(tmp_path / "one.yaml", BAD_ONE)
    two = write(tmp_path / "two.yaml", BAD_TWO)
    assert main(["validate", one, two]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines == [
        f"error: {one}:3: model.d_modle: " + lines[0].split("model.d_modle: ", 1)[1],
        f"error: {one}:6: search.sampler: " + lines[1].split("search.sampler: ", 1)[1],
        f"error: {two}:2: task.seq_len: " + lines[2].split("task.seq_len: ", 1)[1],
        f"error: {two}:5: train.steps: " + lines[3].split("train.steps: ", 1)[1],
    ], err
    assert "did you mean 'd_model'" in lines[0] and "did you mean 'tpe'" in lines[1]
    assert "must be even" in lines[2] and "positive" in lines[3]


def test_validate_reports_good_files_after_a_bad_one(tmp_path, capsys):
    bad = write(tmp_path / "one.yaml", BAD_ONE)
    good = write(tmp_path / "good.yaml", SPACE.format(name="good"))
    assert main(["validate", bad, good]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: OK" in out and f"{bad}:3:" in err


# ------------------------------------------------------------------------------------------------ storages


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridnas.cli", *args], cwd=tmp_path, env=env_with(),
                          capture_output=True, text=True, timeout=300)


def assert_one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def storage_cases(tmp_path: Path) -> list[tuple[str, str]]:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    return [(f"sqlite:///{afile}/x.db", "sqlite"), (f"{afile}/x.journal", "journal")]


def test_storage_under_a_file_is_one_line(tmp_path):
    space = write(tmp_path / "s.yaml", SPACE.format(name="s"))
    for url, _ in storage_cases(tmp_path):
        assert_one_line(run_cli(tmp_path, "search", space, "--storage", url), f"storage {url}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_storage_in_a_read_only_folder_is_one_line(tmp_path):
    space = write(tmp_path / "s.yaml", SPACE.format(name="s"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for url in (f"sqlite:///{ro}/x.db", f"{ro}/x.journal"):
            assert_one_line(run_cli(tmp_path, "search", space, "--storage", url), f"storage {url}")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("url", ["postgresql://u:secret@127.0.0.1:1/db", "postgresql+psycopg://u:secret@127.0.0.1:1/db"])
def test_unreachable_postgresql_is_one_line_with_the_password_masked(tmp_path, url):
    space = write(tmp_path / "s.yaml", SPACE.format(name="s"))
    line = assert_one_line(run_cli(tmp_path, "search", space, "--storage", url), "127.0.0.1:1/db", "***")
    assert "secret" not in line
    assert "refused" in line.lower() or "connect" in line.lower(), line
    line = assert_one_line(run_cli(tmp_path, "show", "s", "--storage", url), "127.0.0.1:1/db")
    assert "secret" not in line


@pytest.mark.parametrize("args, flag", [
    (["--n-trials", "-3"], "--n-trials"), (["--n-trials", "0"], "--n-trials"),
    (["--workers", "0"], "--workers"), (["--workers", "-1"], "--workers"),
])
def test_bad_counts_on_the_command_line_are_one_line(tmp_path, capsys, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    space = write(tmp_path / "s.yaml", SPACE.format(name="s"))
    assert main(["search", space, *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}") and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # refused before any storage is touched
