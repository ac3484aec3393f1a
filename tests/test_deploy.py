"""deploy/: the SLURM array and the Kubernetes Job run the worker command the tests run (hybridnas.workers'), and it
is a valid command line: parsed by the CLI's own parser, naming a space file that exists, taking the storage URL
from one environment variable that the template also defines."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from hybridnas.cli import build_parser
from hybridnas.workers import worker_command

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "search_array.sbatch"
K8S_POSTGRES = ROOT / "deploy" / "k8s" / "postgres.yaml"
K8S_JOB = ROOT / "deploy" / "k8s" / "search-job.yaml"
README = ROOT / "deploy" / "README.md"
PLACEHOLDER = "postgresql://user:pw@db:5432/hybridnas"


def _parse(argv: list[str]):
    """``argv`` after the program name, through the CLI's parser (argparse exits on anything it rejects)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # pragma: no cover - the failure is the point
        pytest.fail(f"not a valid hybridnas command line: {argv} (exit {e.code})")


def _check_worker(argv: list[str], storage_var: str):
    """Common checks of a template's worker command (``argv`` after ``hybridnas``, variables expanded)."""
    args = _parse(argv)
    assert args.command == "search" and args.func.__name__ == "cmd_search"
    assert (ROOT / args.space).is_file(), f"{args.space} is not a file of the repository"
    assert args.storage == PLACEHOLDER, f"--storage must come from ${storage_var}"
    assert args.study and args.worker_index is not None and args.workers is None
    # the same options as the worker command hybridnas itself starts (and tests/test_workers.py runs)
    ours = _parse(worker_command(args.space, PLACEHOLDER, args.study, 6, 0)[3:])
    def given(ns) -> set[str]:
        return {k for k, v in vars(ns).items() if v is not None and v is not False}

    assert given(args) <= given(ours), given(args) - given(ours)
    return args


# ------------------------------------------------------------------------------------------------- SLURM


def _sbatch_worker() -> tuple[list[str], dict[str, str], list[str]]:
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!"), "an sbatch script starts with a shebang"
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}\s*$", SBATCH.read_text(), re.M))
    required = re.findall(r'^: "\$\{(\w+):\?', SBATCH.read_text(), re.M)
    commands = [ln for ln in lines if not ln.lstrip().startswith("#") and "hybridnas search" in ln]
    assert len(commands) == 1, commands
    words = shlex.split(commands[0])
    if words[0] == "srun":
        words = words[1:]
    assert words[0] == "hybridnas", words
    return words[1:], defaults, required


def test_slurm_array_runs_the_worker_command():
    words, defaults, required = _sbatch_worker()
    storage_var = re.fullmatch(r"\$\{?(\w+)\}?", words[words.index("--storage") + 1]).group(1)
    assert storage_var in required, f"the script must stop with a message when ${storage_var} is not set"
    env = {**defaults, storage_var: PLACEHOLDER, "SLURM_ARRAY_TASK_ID": "3"}
    argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], w) for w in words]
    args = _check_worker(argv, storage_var)
    assert args.worker_index == 3  # each array task its own sampler seed
    assert re.search(r"^#SBATCH --array=\d+-\d+", SBATCH.read_text(), re.M)
    assert _k8s_storage_var() == storage_var, "SLURM and Kubernetes name the storage URL's variable alike"


# -------------------------------------------------------------------------------------------- Kubernetes


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _job_container() -> dict:
    jobs = [d for d in _docs(K8S_JOB) if d["kind"] == "Job"]
    assert len(jobs) == 1
    spec = jobs[0]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] >= 2
    (container,) = spec["template"]["spec"]["containers"]
    return container


def _k8s_storage_var() -> str:
    argv = _job_container()["command"] + _job_container().get("args", [])
    return re.fullmatch(r"\$\((\w+)\)", argv[argv.index("--storage") + 1]).group(1)


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def test_k8s_job_runs_the_worker_command_against_the_postgres_service():
    c = _job_container()
    env = {e["name"]: e for e in c["env"]}
    storage_var = _k8s_storage_var()
    assert storage_var in env, f"${storage_var} is used but not defined in the container's env"
    index_var = re.fullmatch(r"\$\((\w+)\)", (c["command"] + c.get("args", []))[
        (c["command"] + c.get("args", [])).index("--worker-index") + 1]).group(1)
    assert "job-completion-index" in env[index_var]["valueFrom"]["fieldRef"]["fieldPath"]
    argv = c["command"] + c.get("args", [])
    assert argv[0] == "hybridnas"
    args = _check_worker([_expand(w, {storage_var: PLACEHOLDER, index_var: "2"}) for w in argv[1:]], storage_var)
    assert args.worker_index == 2

    # the URL names the Service, port, user and database the PostgreSQL template makes, and its password Secret
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(K8S_POSTGRES)}
    (service,) = [d for (kind, _), d in docs.items() if kind == "Service"]
    (deployment,) = [d for (kind, _), d in docs.items() if kind in ("Deployment", "StatefulSet")]
    (pg,) = deployment["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in pg["env"]}
    secret_ref = pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ("Secret", secret_ref["name"]) in docs
    values = {k: e["value"] for k, e in env.items() if "value" in e}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret_ref
    url = _expand(values[storage_var], {"POSTGRES_PASSWORD": "pw"})
    m = re.fullmatch(r"postgresql://(\w+):pw@([\w.-]+):(\d+)/(\w+)", url)
    assert m, url
    user, host, port, db = m.groups()
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    assert user == pg_env["POSTGRES_USER"]["value"] and db == pg_env["POSTGRES_DB"]["value"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    names = [e["name"] for e in c["env"]]  # $(VAR) expands only variables defined before it
    assert names.index("POSTGRES_PASSWORD") < names.index(storage_var)


def test_deploy_readme_gives_the_command_that_starts_each():
    text = README.read_text()
    assert re.search(r"sbatch (\S+=\S+ )*deploy/slurm/search_array\.sbatch", text)
    assert "kubectl apply -f deploy/k8s/postgres.yaml -f deploy/k8s/search-job.yaml" in text
    for path in re.findall(r"deploy/[\w/.-]+\.(?:sbatch|yaml|md)|deploy/Dockerfile", text):
        assert (ROOT / path).is_file(), path
