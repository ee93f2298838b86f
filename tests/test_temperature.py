"""The temperature the training step consumes, not the one the log reports.

`train/temperature` and `state.tau` are Python floats; the step reads `Trainer.tau_t`, a 0-d device tensor (a
compiled function or a captured CUDA graph keeps reading the tensor it was given). If that tensor stopped being
updated, training would run at tau=1.0 while every logged number followed the schedule. So these tests record the
value the step receives, at each step, through train.py (in process), across an epoch boundary and a resume.
"""
from __future__ import annotations

import pytest
import torch

import vae.training.trainer
from support import train_in_process
from vae.training.engine import TrainStep
from vae.core.schedule import temperature_at

# tau_t = max(0.1, exp(-0.2 t)), t rounded down to a multiple of 5: it moves at steps 5, 10 and 15 (to the floor).
# Epochs have 6 steps (300 images, batch 50). Run 1 trains 2 epochs (steps 0-11), crossing the epoch boundary at
# step 6 mid-interval; the resumed run trains steps 12-17. Step 12 is mid-interval as well, so the schedule does
# not move there: the step reads the tensor as the checkpoint restored it (with anneal_interval=1 every step
# would refill it and a resume that left it at 1.0 would go unseen).
SCHEDULE = dict(temperature=1.0, temp_min=0.1, anneal_rate=0.2, anneal_interval=5)
OVERRIDES = [f"{k}={v}" for k, v in SCHEDULE.items()]
EXPECTED = [temperature_at(t, **SCHEDULE) for t in range(18)]


class SpyStep(TrainStep):
    """The trainer's step, recording the tau value each training step hands to the loss (and the step's loss).

    Eager and compile: the loss function is wrapped *outside* the compiled region after construction (compile's
    warm-up step, at tau=1, is not recorded), so the record is the tensor the compiled loss reads. CUDA graph: the
    captured graph reads `static_tau`; it is read back after each replay."""

    seen: list = []
    losses: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        inner = self.loss_fn

        def loss_fn(model, x, noise, tau):
            SpyStep.seen.append(tau.item())
            return inner(model, x, noise, tau)

        self.loss_fn = loss_fn

    def __call__(self, idx, tau, grad_norm=False):
        stats, norm = super().__call__(idx, tau, grad_norm)
        if self.graph is not None:  # the replay ran the captured body, not loss_fn
            SpyStep.seen.append(self.static_tau.item())
        SpyStep.losses.append(stats[0].item())
        return stats, norm


def taus_consumed(data_root, tmp_path, monkeypatch, *mode):
    """Train 2 epochs, resume to 3; the tau each of the 18 steps received, per run."""
    monkeypatch.setattr(vae.training.trainer, "TrainStep", SpyStep)
    monkeypatch.setattr(SpyStep, "seen", [])
    monkeypatch.setattr(SpyStep, "losses", [])
    run = tmp_path / "run"
    m = train_in_process(data_root, run, "epochs=2", *OVERRIDES, *mode)
    assert m["step"] == 12
    first = list(SpyStep.seen)
    SpyStep.seen.clear()
    SpyStep.losses.clear()
    m = train_in_process(data_root, tmp_path / "again", f"resume={run / 'checkpoints' / 'last.pt'}", "epochs=3",
                         *mode)
    assert m["step"] == 18 and m["tau"] == pytest.approx(EXPECTED[17])
    return first, list(SpyStep.seen)


def check(first, resumed):
    # float32 tensors: compare at float32 precision
    assert first == pytest.approx(EXPECTED[:12], rel=1e-6), "the step did not receive the scheduled tau"
    assert resumed == pytest.approx(EXPECTED[12:], rel=1e-6), "after resume, the step did not receive the scheduled tau"
    assert len(set(round(t, 6) for t in first + resumed)) == 4  # 1.0, e^-1, e^-2 and the 0.1 floor: it did move


def test_eager_step_receives_the_scheduled_tau(tiny_data, tmp_path, monkeypatch):
    check(*taus_consumed(tiny_data, tmp_path, monkeypatch, "compile=false"))


@pytest.mark.slow  # compiling the loss on a 2-core CPU: ~50 s with a cold Inductor cache, ~12 s with a warm one
def test_compiled_step_receives_the_scheduled_tau(tiny_data, tmp_path, monkeypatch):
    first, resumed = taus_consumed(tiny_data, tmp_path, monkeypatch, "compile=true")
    check(first, resumed)


def straight_losses(data_root, run_dir, monkeypatch, *extra):
    """Per-step losses of steps 12-17 of an uninterrupted 3-epoch run, as the trainer's step returns them; and the
    taus that run's (not captured) step received."""
    monkeypatch.setattr(vae.training.trainer, "TrainStep", SpyStep)
    monkeypatch.setattr(SpyStep, "seen", [])
    monkeypatch.setattr(SpyStep, "losses", [])
    train_in_process(data_root, run_dir, "epochs=3", *OVERRIDES, *extra)
    return torch.tensor(SpyStep.losses, dtype=torch.float64)[12:], list(SpyStep.seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["cuda_graph", "compile+cuda_graph"])
def test_captured_step_receives_the_scheduled_tau(tiny_data, tmp_path, monkeypatch, compile):
    mode = ("device=cuda", "cuda_graph=true", f"compile={str(compile).lower()}")
    first, resumed = taus_consumed(tiny_data, tmp_path, monkeypatch, *mode)
    check(first, resumed)
    captured = torch.tensor(SpyStep.losses, dtype=torch.float64)  # the resumed run's 6 replays (steps 12-17)
    # A side effect of the temperature the replays computed with, not of the spy: their losses are those of the same
    # step not captured (same generators, same draws) at the scheduled tau, much closer than to that
    # step held at tau=1.0.
    uncaptured = ("device=cuda", "cuda_graph=false", f"compile={str(compile).lower()}")
    reference, taus = straight_losses(tiny_data, tmp_path / "reference", monkeypatch, *uncaptured)
    assert taus == pytest.approx(EXPECTED, rel=1e-6)
    at_one, taus = straight_losses(tiny_data, tmp_path / "tau1", monkeypatch, *uncaptured, "temp_min=1.0")
    assert set(taus) == {1.0}
    effect, deviation = (at_one - reference).abs().max().item(), (captured - reference).abs().max().item()
    assert deviation < effect / 10, (deviation, effect, captured.tolist(), reference.tolist())
