"""vae/settings/config_files.py: a YAML file named on the command line that Hydra would choke on is refused in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO, subprocess_env
from vae.settings.config import CONFIG_DIR
from vae.settings.config_files import MAX_VALUES, problem

BOMB = "".join(f"{x}: &{x} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, x in zip([None, *"abcdef"], "abcdefg"))  # 9^7 = 4.8 million values from 7 lines
PYTHON = "defaults:\n  - config\n  - _self_\nseed: !!python/object/apply:os.system ['echo ran']\n"


def test_our_own_configs_pass():
    assert [p for p in CONFIG_DIR.rglob("*.yaml") if problem(p)] == []


@pytest.mark.parametrize("text, needle", [
    (BOMB, f"its aliases expand to 6,053,451 values, more than the {MAX_VALUES:,} a config may hold"),
    (PYTHON, "line 4 asks for a Python object (python/object/apply:os.system)"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "it nests too deeply"),
])
def test_a_hostile_yaml_is_found(tmp_path, text, needle):
    (tmp_path / "x.yaml").write_text(text)
    assert problem(tmp_path / "x.yaml") == needle


@pytest.mark.parametrize("text", [BOMB, PYTHON])
def test_train_py_refuses_it_in_one_line_before_hydra(tmp_path, text):
    (tmp_path / "x.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "train.py", "--config-dir", str(tmp_path), "--config-name", "x"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: config file {tmp_path / 'x.yaml'}: ")
