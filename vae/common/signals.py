"""Ctrl-C, SIGTERM and the other signals that end a process by default, turned into a flag that a command checks
between two steps: the run (or the evaluation) stops cleanly, saving what it has, instead of dying mid-write."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

log = logging.getLogger("train")

# The signals that stop a run, each with its exit status as a shell reports it (128 + signal number): Ctrl-C,
# SIGTERM (kill, SLURM's time limit), SIGHUP (the ssh session or terminal closed), SIGQUIT (Ctrl-\) and SIGUSR1 (a
# cluster's "time is nearly up"). By default each would end the process at once, without a save and leaving a
# half-written temporary checkpoint. SIGUSR2 is left to submitit, whose own handler it is.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGQUIT: 131,
               signal.SIGUSR1: 138}


class _StopNow(BaseException):
    """A stopping signal inside `StopFlag.at_once`: a BaseException, so that no `except Exception` on the way
    swallows it."""


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
                self._exit(doing)
            yield
        except _StopNow:
            # Said here, not in the signal handler: the signal may have interrupted a write to the very stream the
            # log writes to, and Python refuses that reentrant write (the message would be lost to a traceback).
            self._exit(doing)
        finally:
            self._at_once = None

    def _exit(self, doing: str):
        self._at_once = None
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
            try:
                print("\nstopping, please wait...", file=sys.stderr, flush=True)
            except RuntimeError:  # it interrupted a write to stderr (tqdm's bar): Python refuses a reentrant one
                with contextlib.suppress(OSError):
                    os.write(2, b"\nstopping, please wait...\n")
        self.signum = signum
        if self._at_once is not None:
            raise _StopNow  # unwinds the interrupted work to at_once(), which says why and exits

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT[self.signum]

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
