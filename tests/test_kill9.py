"""kill -9 through train.py: a run killed after it logged past its last checkpoint resumes as if never killed.

The run is killed (SIGKILL: no handler, no flush, no cleanup) once its event file holds train scalars of steps
after the epoch-1 checkpoint. Those steps are then logged twice on disk, by the killed run and by the resumed one;
TensorBoard must show each once (the resumed writer's purge_step), a temporary file left in checkpoints/ must go,
and the weights must be bitwise those of a run never interrupted.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch

from support import REPO, subprocess_env, train_in_process
from idx import make_tiny_dataset
from tb_events import steps_on_disk
from test_train import events

STEPS_PER_EPOCH = 100  # 400 images, batch 4
SETTINGS = ("epochs=2", "batch_size=4", "log_interval=5", "latent_dim=8", "anneal_interval=7", "anneal_rate=1e-3")


def shown(run_dir, tag):
    """(step, value) of the scalars TensorBoard shows for `tag`."""
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def test_kill_9_after_logging_past_the_checkpoint_then_resume(tmp_path):
    data = tmp_path / "data"
    make_tiny_dataset(data, n_train=4 * STEPS_PER_EPOCH, n_test=40, seed=2)
    killed = tmp_path / "killed"
    args = ["debug=tiny", f"data.root={data}", f"hydra.run.dir={killed}", *SETTINGS]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        # 2 train/* intervals into epoch 2: past the epoch-1 checkpoint, 90 steps before epoch 2's (step 200)
        while time.time() < deadline and proc.poll() is None:
            if max(steps_on_disk(killed), default=0) >= STEPS_PER_EPOCH + 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"train.py ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    last = killed / "checkpoints" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (STEPS_PER_EPOCH, 1, 0)
    logged_by_killed = sorted(set(steps_on_disk(killed)))
    assert logged_by_killed[-1] > STEPS_PER_EPOCH, "the killed run logged nothing past its checkpoint"
    stray = last.parent / ".tmp-killed-mid-save"
    stray.write_bytes(b"half a checkpoint")

    train_in_process(data, tmp_path / "unused", f"resume={last}")  # continues in its own run directory
    straight = tmp_path / "straight"
    train_in_process(data, straight, *SETTINGS)

    assert not stray.exists() and not list(last.parent.glob(".tmp-*"))
    # On disk the steps the killed run logged after its checkpoint are there twice ...
    on_disk = steps_on_disk(killed)
    twice = [s for s in logged_by_killed if s > STEPS_PER_EPOCH]
    assert all(on_disk.count(s) == 2 for s in twice), "the resumed run did not log those steps again"
    # ... and TensorBoard shows each once, with the uninterrupted run's values.
    for tag in ("train/loss", "train/temperature", "test/loss"):
        assert shown(killed, tag) == shown(straight, tag), tag
    a = torch.load(last, map_location="cpu", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in b["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(a["optimizer"]["state"][i][k], v), (i, k)
