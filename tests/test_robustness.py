"""Faults and exact resume: signals, kill -9 while saving, non-finite loss, write errors."""
from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_train, subprocess_env, tiny_overrides
from idx import make_tiny_dataset
from vae import checkpoint as ckpt_io
from vae.atomic import remove_stray_temporaries
from vae.errors import UserError


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Enough images for 500 steps per epoch at batch_size=4: time to land a signal mid-epoch."""
    root = tmp_path_factory.mktemp("long")
    make_tiny_dataset(root, n_train=2000, n_test=40, seed=1)
    return root


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


def model_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(long_data, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    proc = run_train(long_overrides(long_data, straight, "epochs=4"))
    assert proc.returncode == 0, proc.stderr

    proc = interrupt_during(long_overrides(long_data, broken, "epochs=4"), "epoch 1/4", signal.SIGTERM,
                            ready=logged_past(broken, 500))
    assert proc.returncode == 143, proc.stdout
    assert "resume=" in proc.stdout and "SIGTERM" in proc.stdout
    ckpt = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500, (ckpt["epoch"], ckpt["epoch_step"])

    proc = run_train([f"resume={broken / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'again'}"])
    assert proc.returncode == 0, proc.stderr
    a, b = model_of(straight / "checkpoints" / "last.pt"), model_of(broken / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # TensorBoard: the same scalar steps as the uninterrupted run, none twice
    from test_train import scalar_steps

    assert scalar_steps(broken, "train/loss") == scalar_steps(straight, "train/loss")
    assert scalar_steps(broken, "test/loss") == scalar_steps(straight, "test/loss")


def test_ctrl_c_saves_and_exits_130(long_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = interrupt_during(long_overrides(long_data, run_dir, "epochs=3"), "epoch 1/3", signal.SIGINT,
                            ready=logged_past(run_dir, 500))
    assert proc.returncode == 130, proc.stdout
    assert "Traceback" not in proc.stdout
    ckpt = ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] > 0
    # Saved on the signal, mid-epoch 2: the epoch-1 checkpoint (step 500, epoch_step 0), written before the
    # signal, would satisfy the check above on its own.
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500, (ckpt["epoch"], ckpt["epoch_step"])
    assert ckpt["step"] == 500 + ckpt["epoch_step"] and ckpt["step"] % 500 != 0
    # the event file was flushed and closed: the scalars written before the signal are readable
    from test_train import scalar_steps

    assert scalar_steps(run_dir, "train/loss")


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(tiny_overrides(tiny_data, run_dir, "epochs=1")).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = run_train([f"resume={last}", "epochs=3", "lr=1e30", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert proc.returncode == 3, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "NaN" in message and "at step" in message and "lr" in message and "temp_min" in message
    assert "Traceback" not in proc.stderr
    assert last.read_bytes() == before
    assert torch.isfinite(torch.cat([v.flatten().float() for v in model_of(last).values()])).all()


SAVER = r"""
import sys, torch
from vae.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint({"format": "gumbel-vae/1", "i": i, "blob": torch.full((8_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO)
    try:
        deadline = time.time() + 60
        # wait until a complete file exists and the next write is in progress
        while time.time() < deadline and not (path.exists() and any(".tmp-" in p.name for p in path.parent.iterdir())):
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait()
    assert any(".tmp-" in p.name for p in path.parent.iterdir()), "the kill did not land during a write"
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["blob"], torch.full((8_000_000,), float(ckpt["i"])))
    removed = remove_stray_temporaries(path.parent)
    assert removed and not any(".tmp-" in p.name for p in path.parent.iterdir())


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


def test_a_compiler_that_fails_falls_back_to_eager(tiny_data, tmp_path):
    # torch.compile on a CPU needs a C++ compiler; a broken one must cost a warning, never the run. (A fresh
    # Inductor cache, or a cached kernel from an earlier run would hide the broken compiler.)
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "epochs=1", "compile=true"),
                     env_extra={"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 0, proc.stderr
    assert "compile=true failed here" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file()
