"""TensorBoard for a training run: scalars, image grids and the HParams entry (docs/dashboard.md lists every tag).

TensorBoard and torchvision take seconds to import, so both are imported when a run first writes, not before.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from vae.atomic import WriteFailed, is_write_failure, write_failed
from vae.errors import UserError
from vae.gumbel import one_hot_argmax

# The settings shown as columns in TensorBoard's HParams tab: those that change what is learned.
HPARAM_KEYS = ("latent_dim", "categorical_dim", "prior", "hard", "estimator", "temperature", "temp_min",
               "anneal_rate", "anneal_interval", "batch_size", "epochs", "lr", "seed", "data.name", "data.binarize")


def image_grid(x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Flat images [B, 784] in [0, 1] -> one [3, H, W] grid."""
    from torchvision.utils import make_grid

    return make_grid(x.detach().reshape(-1, 1, 28, 28).clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)


@contextlib.contextmanager
def write_failures(log_dir):
    """A failed write of the event file (disk full...), whatever type it arrives as, becomes one `WriteFailed` line.
    (TensorBoard writes from a thread and raises its error at the next call, often as a plain OSError.)"""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise write_failed(Path(log_dir) / "events.out.tfevents.*", e, "TensorBoard events",
                           kept="the checkpoints written so far are intact") from e


def _quiet_writer_thread(args) -> None:
    """threading.excepthook: TensorBoard's writer thread keeps its exception for the next call in the main thread
    (where write_failures reports it in one line), and also lets it escape: don't print that as a traceback."""
    if type(args.thread).__name__ != "_AsyncWriterThread":
        _quiet_writer_thread.previous(args)


def log_hparams(writer, cfg: DictConfig, metrics: dict) -> None:
    """Write the run's hyper-parameters into its own event file, so that TensorBoard's HParams tab pairs them with
    the run's scalars named in `metrics` (SummaryWriter.add_hparams would open a separate sub-run instead)."""
    from torch.utils.tensorboard.summary import hparams

    values = {k: OmegaConf.select(cfg, k) for k in HPARAM_KEYS}
    exp, ssi, sei = hparams(values, metrics)
    with write_failures(writer.log_dir):
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)


class TensorBoardLog:
    """A trainer callback writing the run's event file; a context manager that closes it on every exit path.

    purge_step: on resume, the step after the checkpoint's. Events a killed run wrote after its checkpoint are then
    hidden by TensorBoard, so the resumed run's scalars continue without duplicated steps.
    """

    def __init__(self, run_dir: Path, purge_step: Optional[int], recon_x: torch.Tensor, prior_noise: torch.Tensor,
                 test_split=None, cfg: Optional[DictConfig] = None):
        from torch.utils.tensorboard import SummaryWriter

        from vae.latents import custom_scalars_layout

        self.run_dir = Path(run_dir)
        self._dir_fd = None
        with write_failures(self.run_dir):
            self.writer = SummaryWriter(log_dir=self._writer_path(), purge_step=purge_step)
            self.writer.add_custom_scalars(custom_scalars_layout())
        if threading.excepthook is not _quiet_writer_thread:  # put back by __exit__
            _quiet_writer_thread.previous = threading.excepthook
            threading.excepthook = _quiet_writer_thread
        self.recon_x, self.prior_noise = recon_x, prior_noise  # fixed inputs: epochs compare picture to picture
        self.test_split, self.cfg = test_split, cfg

    def _writer_path(self) -> str:
        """The run directory as TensorBoard can name it. TensorBoard encodes a path as UTF-8 in some calls and in the
        locale's encoding in others: a non-ASCII name under a non-UTF-8 locale (LC_ALL=C) fails one or the other.
        Such a directory is handed over as /proc/self/fd/<n>, an ASCII name for the same directory (Linux)."""
        path = str(self.run_dir)
        try:
            if os.fsencode(path) == path.encode("utf-8"):  # both ways name the same bytes on disk
                return path
        except UnicodeError:
            pass
        if not os.path.isdir("/proc/self/fd"):
            raise UserError(f"TensorBoard cannot write into {path!r} under this locale (its name is not ASCII and "
                            f"the locale's encoding is {sys.getfilesystemencoding()}); use a UTF-8 locale (e.g. "
                            "LC_ALL=C.UTF-8) or an ASCII hydra.run.dir")
        self._dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._dir_fd}"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            with write_failures(self.run_dir):
                self.writer.close()
        except WriteFailed:
            if exc_type is None:  # else the run is failing already, most likely from the same full disk: report that
                raise
        finally:
            threading.excepthook = _quiet_writer_thread.previous
            if self._dir_fd is not None:
                os.close(self._dir_fd)

    def on_interval(self, trainer, means, grad_norm) -> None:
        step = trainer.state.step
        with write_failures(self.run_dir):
            for tag, value in zip(("loss", "bce", "kl"), means):
                self.writer.add_scalar(f"train/{tag}", value, step)
            self.writer.add_scalar("train/temperature", trainer.state.tau, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)

    def on_epoch_end(self, trainer, test: dict, is_best: bool, seconds: float) -> None:
        step = trainer.state.step
        with write_failures(self.run_dir):
            for key in ("loss", "bce", "kl", "elbo_discrete"):
                self.writer.add_scalar(f"test/{key}", test[key], step)
            self.write_images(trainer.model, step)
            self.write_latents(trainer.model, step)
            self.writer.flush()  # every epoch: a run killed later keeps what it showed

    @torch.no_grad()
    def write_images(self, model, step: int) -> None:
        recon = torch.sigmoid(model.decode(one_hot_argmax(model.encode(self.recon_x))))
        self.writer.add_image("test/reconstructions", image_grid(torch.cat([self.recon_x, recon]),
                                                                 nrow=len(self.recon_x)), step)
        codes = one_hot_argmax(model.log_prior() + self.prior_noise)
        self.writer.add_image("samples/prior", image_grid(torch.sigmoid(model.decode(codes))), step)

    def write_latents(self, model, step: int) -> None:
        """How the code is used (docs/dashboard.md): one more encoder pass over the test set, and a traversal of
        the first of the fixed test digits."""
        from vae.latents import code_usage, log_latents, traversal_grid

        cfg = self.cfg
        if cfg is None or self.test_split is None:  # no test split given: no code-usage views
            return
        generator = torch.Generator(device=self.test_split.device).manual_seed(cfg.seed)  # dynamic binarization
        stats = code_usage(model, self.test_split, batch_size=cfg.eval.batch_size, threshold=cfg.eval.active_kl,
                           generator=generator)
        grid = traversal_grid(model, self.recon_x[0], stats["kl_per_variable"], max_rows=cfg.eval.traversal_rows)
        log_latents(self.writer, stats, grid, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with write_failures(self.run_dir):
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        with write_failures(self.run_dir):
            self.writer.flush()
