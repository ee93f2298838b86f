"""What the person at the terminal sees: a tqdm bar per epoch, one log line per epoch, and Ctrl-C / SIGTERM (and the
other signals that end a process by default) that stop the run cleanly instead of killing it mid-write."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys

from tqdm import tqdm

log = logging.getLogger("train")

# The signals that stop a run, each with its exit status as a shell reports it (128 + signal number): Ctrl-C,
# SIGTERM (kill, SLURM's time limit), SIGHUP (the ssh session or terminal closed), SIGQUIT (Ctrl-\) and SIGUSR1 (a
# cluster's "time is nearly up"). By default each would end the process at once, without a save and leaving a
# half-written temporary checkpoint. SIGUSR2 is left to submitit, whose own handler it is.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGQUIT: 131,
               signal.SIGUSR1: 138}


class StopFlag:
    """Ctrl-C / SIGTERM (any signal of SIGNAL_EXIT) only set a flag: the step in flight finishes, then the run saves
    and exits. Inside `at_once(...)` (start-up: nothing to save yet) a signal ends the process straight away
    instead."""

    def __init__(self):
        self.signum = None
        self._at_once = None  # what is going on, while a signal should end the process at once
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNAL_EXIT}

    @contextlib.contextmanager
    def at_once(self, doing: str):
        """A signal inside the block (or before it) exits at once (130, 143...): for start-up work (reading data,
        compiling the step) that has nothing to save and may take minutes."""
        self._at_once = doing
        try:
            if self.signum is not None:
                self._exit()
            yield
        finally:
            self._at_once = None

    def _exit(self):
        doing, self._at_once = self._at_once, None
        log.warning("stopped by %s %s; nothing to save", self.name, doing)
        raise SystemExit(self.exit_code)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """Put the previous handlers back (a run called in process, e.g. from a test, leaves no trace)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: let the user know we heard it
            print("\nstopping, please wait...", file=sys.stderr, flush=True)
        self.signum = signum
        if self._at_once is not None:
            self._exit()

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT[self.signum]

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


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
