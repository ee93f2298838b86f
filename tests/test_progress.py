"""vae/training/progress.py: the epoch's log line."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vae.estimators import ESTIMATORS, make_estimator
from vae.training.progress import ProgressBar

USE_TAU = {"gumbel", "st_gumbel", "annealed_st", "gumbel_rao", "reinmax"}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_the_epoch_line_shows_tau_only_for_estimators_that_use_one(name, caplog):
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=1, tau=0.8765), cfg=SimpleNamespace(epochs=2, batch_size=50),
                              steps_per_epoch=6, estimator=make_estimator(name, {}, "cpu"))
    bar = ProgressBar()
    bar.first_step = 0
    test = {"train_loss": 101.0, "loss": 100.0, "elbo_discrete": 100.5}
    with caplog.at_level("INFO", logger="train"):
        bar.on_epoch_end(trainer, test, is_best=True, seconds=1.0)
    line = caplog.records[-1].getMessage()
    assert line.startswith("epoch 1/2 | train loss 101.00 | test loss 100.00 | test -elbo (discrete) 100.50")
    assert ("| tau 0.8765 |" in line) == (name in USE_TAU), line
