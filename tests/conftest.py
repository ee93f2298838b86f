"""Shared fixtures: tiny generated datasets and a helper that runs train.py in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from idx import make_tiny_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data root holding a tiny MNIST-format dataset (300 train, 100 test images)."""
    root = tmp_path_factory.mktemp("data")
    make_tiny_dataset(root, n_train=300, n_test=100, seed=0)
    return root


def tiny_overrides(data_root: Path, run_dir: Path, *extra: str) -> list:
    """Settings for a fast run on tiny data: small batches so an epoch has several steps."""
    return [f"data.root={data_root}", "data.verify=false", f"hydra.run.dir={run_dir}", "batch_size=50",
            "log_interval=2", "eval.batch_size=50", *extra]


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
