"""vae/tensorboard.py: the event file is written wherever the run directory is, whatever its name and the locale."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO, subprocess_env, tiny_overrides


def test_a_non_ascii_run_directory_under_the_c_locale(tiny_data, tmp_path):
    """LC_ALL=C without UTF-8 mode: Python decodes the name into surrogates, which TensorBoard's UTF-8 calls refuse
    and the locale's ASCII refuses in the other direction."""
    from test_train import events

    run_dir = tmp_path / "résumé"
    overrides = tiny_overrides(tiny_data, run_dir)
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir")] + [f"hydra.run.dir='{run_dir}'"]
    env = subprocess_env(LC_ALL="C", PYTHONUTF8="0")
    env.pop("LANG", None), env.pop("LC_CTYPE", None)
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr + proc.stdout and b"Logging error" not in proc.stderr + proc.stdout
    assert events(run_dir).Scalars("test/loss")
    assert f"run directory {run_dir}" in (run_dir / "train.log").read_text(encoding="utf-8")
