"""vae/trainer.py: a loss that explodes, to NaN or to huge finite values, is divergence, and saves nothing."""
from __future__ import annotations

import pytest

from conftest import train_in_process
from vae.errors import TrainingDiverged
from vae.trainer import Trainer


@pytest.fixture
def run_dir(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(tiny_data, run_dir)
    return run_dir


def saved(run_dir):
    return (run_dir / "checkpoints" / "last.pt").read_bytes(), (run_dir / "metrics.json").read_bytes()


def test_a_training_loss_exploding_to_huge_finite_values_is_divergence(tiny_data, run_dir, monkeypatch):
    before = saved(run_dir)
    build = Trainer._build_step

    def exploding(self):  # every step's loss, bce and kl x 1e35: about 5e37, finite in float32
        build(self)
        step = self.step_fn
        self.step_fn = lambda *a: (lambda stats, norm: (stats * 1e35, norm))(*step(*a))

    monkeypatch.setattr(Trainer, "_build_step", exploding)
    with pytest.raises(TrainingDiverged, match=r"exploded past 1e\+10 nats at step 7 \(epoch 2"):
        train_in_process(tiny_data, run_dir, f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert saved(run_dir) == before


def test_a_test_loss_exploding_to_huge_finite_values_is_divergence(tiny_data, run_dir, monkeypatch):
    before = saved(run_dir)
    monkeypatch.setattr(Trainer, "test", lambda self, split: {"loss": 1e35, "bce": 1e35, "kl": 1.0,
                                                              "elbo_discrete": 1e35})
    with pytest.raises(TrainingDiverged, match=r"exploded past 1e\+10 nats in epoch 2"):
        train_in_process(tiny_data, run_dir, f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert saved(run_dir) == before

