"""TensorBoard for a training run: scalars, the pictures of vae/pictures/__init__.py and the HParams entry (docs/dashboard.md
lists every tag).

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

from vae.common.atomic import WriteFailed, is_write_failure, write_failed
from vae.common.errors import UserError
from vae.core.schedule import lr_moves

# Settings that cannot change what a run learns or measures: where the files are, how fast it runs (device, compile,
# threads, the numerics' plumbing), how often it logs, its pictures. Every other setting of the config is a column of
# the HParams tab, so that two runs that differ in anything else can be told apart there. The same keys stay out of
# run names (hydra.job.config.override_dirname.exclude_keys in configs/config.yaml; tests/test_tensorboard.py checks
# that the two lists agree).
NOT_HPARAMS = ("device", "compile", "cuda_graph", "compile_min_steps", "tf32", "flush_denormal", "threads",
               "log_interval", "snr_interval", "snr_samples", "recon_images", "prior_samples", "resume",
               "data.root", "data.download", "data.sources", "data.system_path", "data.verify", "data.title",
               "eval.iw_chunk", "eval.batch_size", "eval.traversal_rows", "tracker", "tracker.name",
               "tracker.tracking_uri", "tracker.experiment")
# The columns the HParams tab shows before any is ticked: it shows five, those marked as differing between runs
# first, then by name. (Each run writes the list of columns; TensorBoard takes one run's list for all.)
SHOWN_HPARAMS = ("estimator", "estimator_samples", "lr", "seed", "temperature")


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


def hparam_values(cfg: DictConfig) -> dict:
    """The HParams tab's values for a run: every setting but NOT_HPARAMS, by dotted name.

    `estimator` is the one the run used (`hard=true` trains st_gumbel) and `estimator_samples` the number it drew
    (null means the estimator's default), so that equal runs show equal values. Lists become text; a setting left
    null is "null" (TensorBoard drops empty values, and with them the column).
    """
    from vae.settings.config import estimator_name
    from vae.estimators import default_samples

    values = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in NOT_HPARAMS:
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                values[name] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    values["estimator"] = estimator_name(cfg)
    if values.get("estimator_samples") is None:
        values["estimator_samples"] = default_samples(values["estimator"])
    return {k: "null" if v is None else str(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}


def log_hparams(writer, cfg: DictConfig, metrics: dict) -> None:
    """Write the run's hyper-parameters into its own event file, so that TensorBoard's HParams tab pairs them with
    the run's scalars named in `metrics` (SummaryWriter.add_hparams would open a separate sub-run instead)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, sei = hparams(hparam_values(cfg), metrics)
    # `differs` puts SHOWN_HPARAMS first among the columns shown before any is ticked (see SHOWN_HPARAMS).
    plugin_data = exp.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in SHOWN_HPARAMS
    plugin_data.content = data.SerializeToString()
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

        from vae.pictures.latents import custom_scalars_layout

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
        self.log_lr = cfg is not None and lr_moves(cfg)  # a constant lr is the `lr` setting itself

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
            if self.log_lr:
                self.writer.add_scalar("train/lr", trainer.lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)

    def on_epoch_end(self, trainer, test: dict, is_best: bool, seconds: float) -> None:
        step = trainer.state.step
        with write_failures(self.run_dir):
            for key in ("loss", "bce", "kl", "elbo_discrete"):
                self.writer.add_scalar(f"test/{key}", test[key], step)
                if "val" in test:  # the validation split's, which chooses best.pt
                    self.writer.add_scalar(f"val/{key}", test["val"][key], step)
            self.write_images(trainer.model, step)
            self.write_latents(trainer.model, step)
            self.writer.flush()  # every epoch: a run killed later keeps what it showed

    @torch.no_grad()
    def write_images(self, model, step: int) -> None:
        from vae.pictures import prior_grid, reconstruction_grid

        self.writer.add_image("test/reconstructions", reconstruction_grid(model, self.recon_x), step)
        self.writer.add_image("samples/prior", prior_grid(model, self.prior_noise), step)

    def write_latents(self, model, step: int) -> None:
        """How the code is used (docs/dashboard.md): one more encoder pass over the test set, and the pictures of
        the code (a traversal of the first of the fixed test digits, the usage map, the class means)."""
        from vae.pictures.latents import code_usage, log_latents
        from vae.pictures import latent_pictures

        cfg = self.cfg
        if cfg is None or self.test_split is None:  # no test split given: no code-usage views
            return
        generator = torch.Generator(device=self.test_split.device).manual_seed(cfg.seed)  # dynamic binarization
        stats = code_usage(model, self.test_split, batch_size=cfg.eval.batch_size, threshold=cfg.eval.active_kl,
                           generator=generator)
        pictures = latent_pictures(model, self.recon_x[0], stats, max_rows=cfg.eval.traversal_rows)
        log_latents(self.writer, stats, pictures, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with write_failures(self.run_dir):
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        with write_failures(self.run_dir):
            self.writer.flush()
