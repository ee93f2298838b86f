"""What the person at the terminal sees: a tqdm bar per epoch and one log line per epoch."""
from __future__ import annotations

import logging

from tqdm import tqdm

log = logging.getLogger("train")


class ProgressBar:
    """A trainer callback: one bar per epoch (quiet when the output is not a terminal) and the epoch's log line."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, trainer) -> None:
        s = trainer.state
        self.first_step = s.epoch_step
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=s.epoch_step,
                        desc=f"epoch {s.epoch + 1}/{trainer.cfg.epochs}", leave=False, dynamic_ncols=True,
                        disable=None)

    def on_step(self, trainer) -> None:
        self.bar.update()

    def on_interval(self, trainer, means, grad_norm) -> None:
        tau = {"tau": f"{trainer.state.tau:.3f}"} if trainer.estimator.uses_tau else {}
        self.bar.set_postfix(loss=f"{means[0]:.2f}", **tau)

    def on_epoch_end(self, trainer, test: dict, is_best: bool, seconds: float) -> None:
        self.close()
        s = trainer.state
        images = (trainer.steps_per_epoch - self.first_step) * trainer.cfg.batch_size
        val = f" | val loss {test['val']['loss']:.2f}" if "val" in test else ""
        # The temperature only for the estimators it acts on (st, sf, rloo, muprop and exact use none).
        tau = f" | tau {s.tau:.4f}" if trainer.estimator.uses_tau else ""
        log.info("epoch %d/%d | train loss %.2f%s | test loss %.2f | test -elbo (discrete) %.2f%s | %.2f s, "
                 "%.0f images/s", s.epoch, trainer.cfg.epochs, test["train_loss"], val, test["loss"],
                 test["elbo_discrete"], tau, seconds, images / seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
