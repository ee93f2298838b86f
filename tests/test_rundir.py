"""vae/training/rundir.py: where a resumed run writes, one run per run directory (a lock the kernel releases with
its process), the overrides a run keeps in metrics.json, and a resume command that can be pasted."""
from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from support import REPO, copy_run, subprocess_env, train_in_process
from vae.common.errors import UserError
from vae.training import checkpoint as ckpt_io


# --- where a resumed run writes ---------------------------------------------------------------------------------------

def test_resuming_a_copied_checkpoint_writes_into_the_new_run_directory(finished_run, tiny_data, tmp_path, caplog):
    downloads = tmp_path / "home" / "Downloads"
    downloads.mkdir(parents=True)
    copied = downloads / "model.pt"
    shutil.copy(finished_run / "checkpoints" / "last.pt", copied)
    new = tmp_path / "new"
    with caplog.at_level("INFO", logger="train"):
        result = train_in_process(tiny_data, new, f"resume={copied}", "epochs=2")
    assert "not in a run's checkpoints/ directory, so this run writes into its new run directory" in caplog.text
    assert result["epochs"] == 2
    assert (new / "checkpoints" / "last.pt").is_file() and list(new.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["Downloads"]  # nothing in the grandparent
    assert [p.name for p in downloads.iterdir()] == ["model.pt"]


def test_a_run_directory_that_cannot_be_written_is_not_resumed_in_place(finished_run, tiny_data, tmp_path,
                                                                         monkeypatch):
    import os

    import vae.training.rundir

    run_dir = copy_run(finished_run, tmp_path / "run")
    before = sorted(p.name for p in run_dir.rglob("*"))
    real_access = os.access
    # We run as root here, for whom chmod does not make a directory read-only: say it is.
    monkeypatch.setattr(vae.training.rundir.os, "access", lambda p, mode: False if str(p).startswith(str(run_dir))
                        else real_access(p, mode))
    new = tmp_path / "new"
    train_in_process(tiny_data, new, f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert (new / "checkpoints" / "last.pt").is_file() and (new / "metrics.json").is_file()
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_resuming_best_pt_does_not_overwrite_the_runs_later_last_pt(finished_run, tiny_data, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    last = (run_dir / "checkpoints" / "last.pt").read_bytes()
    new = tmp_path / "new"
    train_in_process(tiny_data, new, f"resume={run_dir / 'checkpoints' / 'best.pt'}", "epochs=2")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == last
    assert (new / "checkpoints" / "last.pt").is_file()


# --- one run per run directory ---------------------------------------------------------------------------------------

def test_a_second_run_in_a_run_directory_in_use_refuses(tiny_data, tmp_path):
    from vae.training.rundir import locked

    run_dir = tmp_path / "run"
    with locked(run_dir):  # another train.py, training there now
        with pytest.raises(UserError, match=f"run directory {run_dir} is in use by another train.py"):
            train_in_process(tiny_data, run_dir)
    assert not (run_dir / "checkpoints").exists()
    train_in_process(tiny_data, run_dir)  # released: the directory can be used


def test_a_resume_of_a_run_being_trained_refuses(finished_run, tiny_data, tmp_path):
    from vae.training.rundir import locked

    run_dir = copy_run(finished_run, tmp_path / "run")
    with locked(run_dir):
        with pytest.raises(UserError, match="being trained by another process"):
            train_in_process(tiny_data, tmp_path / "new", f"resume={run_dir / 'checkpoints' / 'last.pt'}",
                             "epochs=2")


HOLD_THE_LOCK = r"""
import sys, time
from vae.training.rundir import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_kill_9_leaves_no_stale_lock(tmp_path):
    from vae.training.rundir import locked

    proc = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            with locked(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with locked(tmp_path):  # the kernel released it with the process
        pass


# --- what a resumed run records and prints -------------------------------------------------------------------------

def test_extending_a_run_keeps_its_overrides_and_appends_the_resumes(finished_run, tiny_data, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    original = json.loads((run_dir / "metrics.json").read_text())["overrides"]
    metrics = train_in_process(tiny_data, tmp_path / "r2", f"resume={run_dir / 'checkpoints' / 'last.pt'}",
                               "epochs=2")
    assert metrics["epochs"] == 2 and metrics["overrides"] == original
    assert metrics["resumes"] == [["debug=tiny", f"data.root={tiny_data}",
                                   f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2"]]


@pytest.mark.parametrize("name", ["my runs/run 1", "0_lr=0.001,temperature=0.5"])  # spaces; a sweep job's directory
def test_the_printed_resume_command_can_be_pasted(tiny_data, tmp_path, monkeypatch, caplog, name):
    import os

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from vae.training.progress import ProgressBar

    # SIGTERM to this process at the first step: train.py's own handler, its save and its message.
    monkeypatch.setattr(ProgressBar, "on_step", lambda self, trainer: os.kill(os.getpid(), signal.SIGTERM))
    run_dir = tmp_path / name
    with pytest.raises(SystemExit) as e, caplog.at_level("INFO", logger="train"):
        train_in_process(tiny_data, run_dir, "epochs=2")
    assert e.value.code == 143
    line = caplog.text[caplog.text.index("Resume with:"):].splitlines()[1]
    argv = shlex.split(line)  # as a shell reads it
    assert argv[:2] == ["python", "train.py"] and len(argv) == 3
    resume = OverridesParser.create().parse_overrides(argv[2:])[0]  # ... and then Hydra
    assert resume.key_or_group == "resume" and resume.value() == str(run_dir / "checkpoints" / "last.pt")
    assert ckpt_io.load_checkpoint(resume.value())["step"] == 1
