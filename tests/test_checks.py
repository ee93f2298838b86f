"""vae/settings/checks.py: the start-up checks end a bad command with one line, before Hydra creates anything (no run
directory, no .hydra/ files over a finished run's)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import (REPO, compose_train, copy_run, run_train, subprocess_env, tiny_overrides, train_in_process,
                     validate_on_start)
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


@pytest.mark.parametrize("overrides,needle", [
    (["device=cudaa"], "device='cudaa'"),
    (["device=cuda:abc"], "device='cuda:abc'"),
    (["seed=99999999999999999999"], "seed=99999999999999999999"),
    (["seed=-1"], "seed=-1"),
    (["threads=100000"], "threads=100000"),
    (["latent_dim=100000", "categorical_dim=1000"], "latent_dim=100000 x categorical_dim=1000"),
    (["eval.iw_samples=100000", "eval.iw_chunk=100000", "eval.batch_size=1000"], "eval.iw_chunk=100000"),
    (["prior_samples=1000000"], "prior_samples=1000000"),
    (["data.binarize_seed=-5"], "data.binarize_seed=-5"),
])
def test_start_up_checks_name_the_setting_in_one_line(tiny_data, tmp_path, capsys, overrides, needle):
    code, lines = validate_on_start(capsys, f"data.root={tiny_data}", *overrides, run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_a_bad_device_name_leaves_no_run_directory(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "device=cudaa"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "device='cudaa'" in proc.stderr
    assert not run_dir.exists()


def test_data_root_pointing_at_a_file_is_one_line(tiny_data, tmp_path, capsys):
    a_file = next((tiny_data / "MNIST" / "raw").iterdir())
    code, lines = validate_on_start(capsys, f"data.root={a_file}", run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and "is a file, not a directory" in lines[0], lines


def test_a_new_run_does_not_overwrite_a_finished_one(finished_run, tiny_data, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run"):
        train_in_process(tiny_data, run_dir)
    # On the command line the refusal comes before Hydra writes its .hydra/ files over the run's.
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the run's own\n")
    proc = run_train(tiny_overrides(tiny_data, run_dir))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the run's own\n"
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts} == before
