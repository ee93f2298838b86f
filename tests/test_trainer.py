"""vae/trainer.py: a loss that explodes, to NaN or to huge finite values, is divergence, and saves nothing."""
from __future__ import annotations

import pytest

from conftest import compose_train, train_in_process
from vae.errors import TrainingDiverged
from vae.trainer import Trainer, training_sizes


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


@pytest.mark.parametrize("overrides, first", [
    ([], "batch_size=100"),
    (["estimator=rloo", "estimator_samples=100000"], "estimator_samples=100000 (estimator=rloo's samples per image)"),
    (["estimator=gumbel_rao"], "estimator_samples=10 (estimator=gumbel_rao's samples per image)"),
    (["estimator=exact", "latent_dim=4", "categorical_dim=4"], "the K^N = 4^4 codes of estimator=exact"),
])
def test_an_out_of_memory_hint_names_what_sizes_the_step_first(overrides, first):
    cfg = compose_train(*overrides)
    assert training_sizes(cfg).startswith(first)
