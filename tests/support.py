"""How tests run the trainer: in this process (most tests: compose the config, call train.py's `train`) or as a
real process (what needs one: signals, the command line's errors, kill -9, Hydra's own files). Plain functions that
tests import; the fixtures are conftest.py's. Also what several test files share: a copy of a finished run, a signal
sent to a running train.py, the start-up checks' verdict, a full disk, a sweep and its summary."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # train.py, for the tests that call it in process


def tiny_overrides(data_root: Path, run_dir: Path, *extra: str) -> list:
    """Settings for a fast run on tiny data: small batches so an epoch has several steps."""
    return [f"data.root={data_root}", "data.verify=false", f"hydra.run.dir={run_dir}", "batch_size=50",
            "log_interval=2", "eval.batch_size=50", "data.val_size=0", *extra]


def subprocess_env(**extra) -> dict:
    # One thread: the tiny models here gain nothing from a second one, and OpenMP threads that spin against
    # other processes on a 2-core machine make every step many times slower.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_script(args, timeout=240, env_extra=None, script="train.py") -> subprocess.CompletedProcess:
    env = subprocess_env(**(env_extra or {}))
    cmd = [sys.executable, script, *args] if script.endswith(".py") else [sys.executable, "-m", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_train(args, **kw) -> subprocess.CompletedProcess:
    return run_script(args, **kw)


def compose_train(*overrides: str, run_dir=None):
    """The config `python train.py <overrides>` would run, with Hydra's own settings (for HydraConfig)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import vae.tools.sweep_plan  # noqa: F401  the ${new_dir:} resolver, registered as Hydra's callbacks do in train.py
    from vae.settings.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir or cfg.hydra.run.dir)
        cfg.hydra.job.num = 0
    return cfg


def train_in_process(data_root: Path, run_dir: Path, *extra: str) -> dict:
    """Run train.py's `train` in this process on tiny data (configs/debug/tiny.yaml); returns metrics.json.

    As lightning-hydra-template's tests do: compose the config, register it as Hydra's, call the task. Hydra's own
    files (.hydra/, train.log) are not written; the run's are (checkpoints, events, metrics.json).
    """
    import json

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import train as train_script

    # Hydra's quotes: a directory name may hold `=` or `,` (a sweep job's does)
    overrides = ["debug=tiny", f"data.root={data_root}", f'hydra.run.dir="{run_dir}"', *extra]
    cfg = compose_train(*overrides, run_dir=run_dir)
    HydraConfig.instance().set_config(cfg)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    import torch

    threads = torch.get_num_threads()
    try:
        train_script.train(task_cfg)
    finally:
        HydraConfig.instance().cfg = None
        # The run set process-wide math settings (threads, the subnormal flush): leave this process as it was, so
        # that the tests after it compute what they would alone.
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    from vae.training.rundir import run_dir_of

    run_dir = Path(run_dir)
    if task_cfg.resume is not None:  # a resumed run writes into its own directory, when it can
        run_dir = run_dir_of(task_cfg.resume)[0] or run_dir
    return json.loads((run_dir / "metrics.json").read_text())


# --- runs that tests share: a finished run's copy, a run interrupted by a signal, the start-up checks ---------

def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest


def long_overrides(data_root, run_dir, *extra):
    return tiny_overrides(data_root, run_dir, "batch_size=4", "log_interval=50", "latent_dim=8",
                          "anneal_interval=7", "anneal_rate=1e-3", *extra)


def interrupt_during(args, wait_for: str, sig, delay: float = 0.4, ready=None) -> subprocess.CompletedProcess:
    """Start train.py, wait for a line containing `wait_for`, let it run `delay` s more (or until `ready()`), then
    send `sig`."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if wait_for in line:
            break
    if ready is None:
        time.sleep(delay)
    else:
        deadline = time.time() + 120
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out) + rest, "")


def logged_past(run_dir, step: int):
    """A `ready` for interrupt_during: the event file holds train scalars of a step after `step` (the end of epoch
    1), so the run is inside epoch 2. The epoch's log line alone is printed before the epoch's checkpoint, images and
    flush: a signal sent a fixed delay after it can land before epoch 2's first step on a loaded machine."""
    from tb_events import steps_on_disk

    return lambda: max(steps_on_disk(run_dir), default=0) > step


def validate_on_start(capsys, *overrides, run_dir):
    """What ValidateOnStart does with `python train.py <overrides>`: its exit status and the lines it printed."""
    from vae.training.plan import ValidateOnStart

    cfg = compose_train(*overrides, f"hydra.run.dir={run_dir}", run_dir=run_dir)
    with pytest.raises(SystemExit) as e:
        ValidateOnStart().on_run_start(cfg)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def limit_file_size(limit: int):
    """For preexec_fn: files may not grow beyond `limit` bytes, as on a full disk (write() fails with EFBIG rather
    than the process being killed by SIGXFSZ)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


class StopAfter:
    """A stand-in for StopFlag that says "stop" from its n-th question on."""

    name, exit_code = "SIGTERM", 143

    def __init__(self, n):
        self.asked, self.n = 0, n

    def at_once(self, doing):
        import contextlib

        return contextlib.nullcontext()

    def __call__(self):
        self.asked += 1
        return self.asked >= self.n


# --- sweeps: what tests/test_sweep.py and tests/project/test_ship.py run and check ---------------------------

TINY = ("epochs=1", "latent_dim=4")


def multirun(tiny_data, sweep_dir: Path, *args: str, timeout=300) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(tiny_data, sweep_dir / "unused-run-dir", *TINY, f"hydra.sweep.dir={sweep_dir}", *args)
    proc = run_train(["-m", *overrides], timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def summary_rows(sweep_dir: Path) -> list:
    with (sweep_dir / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def assert_complete_jobs(sweep_dir: Path, n: int) -> list:
    rows = summary_rows(sweep_dir)
    assert len(rows) == n and all(r["status"] == "done" for r in rows)
    assert sorted(int(r["job"]) for r in rows) == list(range(n))
    for r in rows:
        run_dir = sweep_dir / r["dir"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert float(r["test_loss"]) == pytest.approx(metrics["test_loss"])
        assert float(r["test_elbo_discrete"]) == pytest.approx(metrics["test_elbo_discrete"])
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        assert list(run_dir.glob("events.out.tfevents.*"))
    elbos = [float(r["test_elbo_discrete"]) for r in rows]
    assert elbos == sorted(elbos)  # best first (by the discrete -ELBO: tests/test_sweep.py)
    assert (sweep_dir / "summary.md").is_file()
    return rows
