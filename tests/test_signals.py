"""vae/common/signals.py: every signal that would end a run by default stops it cleanly instead (save, hint,
status). A second signal changes nothing; one during start-up ends the run at once."""
from __future__ import annotations

import signal

import pytest
import torch

from support import interrupt_during, logged_past, long_overrides, tiny_overrides
from vae.common.signals import SIGNAL_EXIT, StopFlag


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                         (signal.SIGQUIT, 131), (signal.SIGUSR1, 138)])
def test_each_stopping_signal_sets_the_flag_and_its_shell_status(sig, status):
    before = signal.getsignal(sig)
    with StopFlag() as stop:
        assert signal.getsignal(sig) == stop._handle  # else the signal's default would end this process
        signal.raise_signal(sig)
        assert stop() and stop.name == signal.Signals(sig).name and stop.exit_code == status
    assert signal.getsignal(sig) == before
    assert SIGNAL_EXIT[sig] == 128 + sig


def test_sighup_during_training_saves_and_says_how_to_resume(tmp_path):
    """An ssh session that closes sends SIGHUP: the run saves last.pt mid-epoch and exits 129."""
    from idx import make_tiny_dataset

    data = tmp_path / "data"
    make_tiny_dataset(data, n_train=2000, n_test=40, seed=1)
    run_dir = tmp_path / "run"
    proc = interrupt_during(long_overrides(data, run_dir, "epochs=3"), "epoch 1/3", signal.SIGHUP,
                            ready=logged_past(run_dir, 500))
    assert proc.returncode == 129, proc.stdout
    assert "stopped by SIGHUP" in proc.stdout and "resume=" in proc.stdout and "Traceback" not in proc.stdout
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_a_second_signal_is_heard_and_changes_nothing(capsys):
    import os

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.name in ("SIGINT", "SIGTERM")
    assert "stopping, please wait" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back as it was


def test_sigterm_during_start_up_exits_at_once_without_a_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = interrupt_during(tiny_overrides(tiny_data, run_dir, "epochs=1"), "run directory", signal.SIGTERM,
                            delay=0.0)
    assert proc.returncode == 143, proc.stdout
    assert "stopped by SIGTERM during start-up; nothing to save" in proc.stdout and "Traceback" not in proc.stdout
    assert not (run_dir / "checkpoints").exists()


def test_a_signal_inside_at_once_exits_there_with_its_status_and_says_why(caplog):
    with StopFlag() as stop, pytest.raises(SystemExit) as e, caplog.at_level("WARNING", logger="train"):
        with stop.at_once("while testing"):
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("the work went on after the signal")
    assert e.value.code == 143
    assert "stopped by SIGTERM while testing; nothing to save" in caplog.text


def test_the_stop_is_logged_after_the_interrupted_write_not_inside_it():
    """A signal that lands while the log is writing a line must not write the "stopped" line from inside that
    write: Python refuses a reentrant write to a buffered stream, and the message would become a traceback."""
    import logging

    class Writer(logging.Handler):
        def __init__(self):
            super().__init__()
            self.depth, self.nested = 0, []

        def emit(self, record):
            self.depth += 1
            try:
                if self.depth > 1:
                    self.nested.append(record.getMessage())
                if record.getMessage() == "busy writing":
                    signal.raise_signal(signal.SIGTERM)  # lands in the middle of this line's write
            finally:
                self.depth -= 1

    writer, train_log = Writer(), logging.getLogger("train")
    train_log.addHandler(writer)
    try:
        with StopFlag() as stop, pytest.raises(SystemExit):
            with stop.at_once("during start-up"):
                train_log.warning("busy writing")
    finally:
        train_log.removeHandler(writer)
    assert writer.nested == []
