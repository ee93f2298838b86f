"""How tests run the trainer: in this process (most tests: compose the config, call train.py's `train`) or as a
real process (what needs one: signals, the command line's errors, kill -9, Hydra's own files). Plain functions that
tests import; the fixtures are conftest.py's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
