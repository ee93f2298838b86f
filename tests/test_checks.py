"""vae/settings/checks.py: the start-up checks end a bad command with one line, before Hydra creates anything."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO, compose_train, subprocess_env
from vae.settings.checks import check_output_file
from vae.training.plan import ValidateOnStart
from vae.common.errors import UserError


def on_run_start(capsys, *overrides):
    """ValidateOnStart as `python train.py <overrides>` runs it: its exit status and the lines it printed."""
    cfg = compose_train(*overrides)
    with pytest.raises(SystemExit) as e:
        ValidateOnStart().on_run_start(cfg)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("override, needle", [
    ("hydra.run.dir=", "error: hydra.run.dir is empty (an unset shell variable?)"),
    ("hydra.run.dir=' '", "error: hydra.run.dir is empty"),
    ("hydra.job.chdir=true", "error: hydra.job.chdir=true is not supported"),
])
def test_hydra_settings_that_would_misplace_the_run_are_refused(tiny_data, tmp_path, capsys, override, needle):
    code, lines = on_run_start(capsys, "debug=tiny", f"data.root={tiny_data}", override)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(needle), lines


def test_a_name_too_long_for_the_file_system_is_one_line_and_creates_nothing(tiny_data, tmp_path):
    run_dir = tmp_path / "parent" / ("a" * 300)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "debug=tiny", f"data.root={tiny_data}",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "holds a name of 300 bytes, more than the 255 this file system allows" in lines[0]
    assert not (tmp_path / "parent").exists()


def test_an_empty_run_dir_leaves_the_current_directory_alone(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "debug=tiny", f"data.root={tiny_data}",
                           "hydra.run.dir="], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "hydra.run.dir is empty" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_while_checking_is_one_line(tiny_data, tmp_path, capsys):
    root = tmp_path / ("b" * 300)  # ENAMETOOLONG where the checks look at data.root
    code, lines = on_run_start(capsys, "debug=tiny", f"data.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot use {root}: File name too long")


def test_an_output_file_in_a_place_that_cannot_hold_one_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=f"out: {tmp_path / 'file' / 'x.json'} cannot be written \\(.*file is a file, "
                                        "not a directory\\); choose another out"):
        check_output_file(tmp_path / "file" / "x.json", "out")
    check_output_file(tmp_path / "new" / "x.json", "out")  # a directory that can be created is fine
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []
