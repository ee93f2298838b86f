"""vae/training/checkpoint.py: a failed save keeps the previous checkpoint, and a checkpoint that cannot be resumed
(damaged, forged, trained on other data, a run directory instead of a file) is refused in one line."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch

from support import REPO, copy_run, limit_file_size, subprocess_env, train_in_process, validate_on_start
from vae.common.errors import UserError
from vae.training import checkpoint as ckpt_io


def test_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save_checkpoint({"format": "gumbel-vae/1", "v": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*intact"):
        ckpt_io.save_checkpoint({"format": "gumbel-vae/1", "v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_while_saving_ends_the_run_in_one_line_and_keeps_the_checkpoint(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    # The checkpoint (~15 MB) no longer fits; the event file and the log (a few KB) still do.
    args = [f"resume={last}", "epochs=2", f"hydra.run.dir={tmp_path / 'r2'}"]
    proc = subprocess.run([sys.executable, "train.py", *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240,
                          preexec_fn=limit_file_size(2_000_000))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write checkpoint {last}"), lines
    assert "File too large" in lines[0] and "the previous last.pt is intact" in lines[0]
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".tmp-*"))


@pytest.mark.parametrize("override", ["data.binarize=dynamic", "data=fashion_mnist", "data.binarize_seed=3"])
def test_resuming_with_other_data_is_refused(finished_run, tiny_data, tmp_path, override):
    run_dir = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(UserError, match=r"was trained on other data: data[.]\w+=.* in the checkpoint but"):
        train_in_process(tiny_data, tmp_path / "r2", f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2",
                         override)


# --- forged or damaged checkpoints with the right format tag ---------------------------------------------------------

def _forge(ckpt, change):
    change(ckpt)
    return ckpt


CUDA_RNG_STATE = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset

FORGERIES = {
    "config not a mapping": (lambda c: c.update(config=[1, 2, 3]), "config is a list, not a mapping"),
    "config of another version": (lambda c: c["config"].update(no_such_setting=1), "does not fit this version"),
    "empty optimizer state": (lambda c: c["optimizer"].update(state={}), "no state for parameter 0 after"),
    "no optimizer groups": (lambda c: c["optimizer"].update(param_groups=[]), "optimizer state is not Adam's"),
    "empty rng states": (lambda c: c.update(rng={}), "random-number states"),
    "an empty rng state": (lambda c: c["rng"].update(noise=torch.zeros(0, dtype=torch.uint8)), "random-number"),
    "epoch a string": (lambda c: c.update(epoch="1"), "epoch='1' is not an integer"),
    "epoch a float": (lambda c: c.update(epoch=1.5), "epoch=1.5 is not an integer"),
    "no running sums": (lambda c: c.pop("epoch_sums"), "lacks epoch_sums"),
    "running sums of another shape": (lambda c: c.update(interval_sums=torch.zeros(2)), "interval_sums"),
    "tau not a number": (lambda c: c.update(tau="hot"), "tau='hot'"),
    "estimator not a mapping": (lambda c: c.update(estimator=[0.5]), "estimator state is not a mapping"),
    "a newer format": (lambda c: c.update(format="gumbel-vae/2"), "has format 'gumbel-vae/2'"),
    "CUDA random streams on a CPU": (lambda c: c["rng"].update({k: CUDA_RNG_STATE for k in c["rng"]}),
                                     "written on a CUDA GPU; resume it with device=cuda"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_a_damaged_checkpoint_is_one_line_and_writes_nothing(finished_run, tiny_data, tmp_path, name):
    change, needle = FORGERIES[name]
    forged = tmp_path / "forged.pt"
    torch.save(_forge(torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True), change), forged)
    new = tmp_path / "new"
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        train_in_process(tiny_data, new, f"resume={forged}", "epochs=2")
    assert "\n" not in str(e.value)
    assert not list(new.glob("events.*")) and not (new / "checkpoints" / "last.pt").exists()


def test_resume_of_a_run_directory_points_at_its_last_checkpoint(finished_run, tiny_data, tmp_path, capsys):
    code, lines = validate_on_start(capsys, f"data.root={tiny_data}", f"resume={finished_run}", run_dir=tmp_path / "r")
    assert code == 2 and len(lines) == 1 and "is a directory, not a checkpoint" in lines[0], lines
    assert f"did you mean resume={finished_run / 'checkpoints' / 'last.pt'}?" in lines[0]
